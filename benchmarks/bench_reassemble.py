"""Benchmark the fused Reassemble operator (dpt_fast::reassemble, Triton) against the original's eager
module chain and against torch.compile(mode="max-autotune") of that chain. GPU only.

For every model width set, input size and stage (1-4 and "all" four in one call chain), forward
(no_grad) and forward+backward (gradients of tokens and every parameter), bf16, random data:

  eager     the original release's act_postprocess chain: cat(t_i, t_0) -> nn.Linear(2D, D) -> nn.GELU
            (readout project), transpose(1, 2), unflatten, nn.Conv2d 1x1, nn.ConvTranspose2d / nn.Conv2d;
            output NCHW as the original produces it
  compiled  torch.compile(mode=--compile-mode) of exactly that chain
  fused     dpt_fast.ops.reassemble on the fused backend, same parameters, output channels_last

Times are medians of triton.testing.do_bench (CUDA events, L2 flushed, warm-up excluded; Triton
autotuning and torch.compile happen in a warm-up call before timing). Each row records the fused output's
error against the eager chain, the FLOPs and bytes the fused algorithm must spend, the achieved fraction
of the ceilings measured in the same process (bf16 matmul TFLOP/s, copy TB/s: dpt_fast.bench.measure_ceilings),
and dpt_fast.implementations_ran() with a verdict (`fused_path`): a row where the reference served any
call is marked, and the script exits with status 1.

Order, so that a run cut short still answers the targets: the eager and fused rows of the four-stage
chain in both modes, then the single stages' forward rows, then their forward+backward rows, using at most
(1 - --compile-share) of --budget-s; then compiled
baselines, most important first (forward at 1024^2 and 1536^2, all four stages before single ones, then
384^2, then forward+backward), each compile capped at --compile-timeout-s (a compile over it is recorded as
"skipped: compile over budget"). The JSON is rewritten after every row.

    python benchmarks/bench_reassemble.py --out benchmarks/results/reassemble-H100-2025-01-01.json
    python benchmarks/bench_reassemble.py --sizes 1024 --models large --no-compile --out /tmp/r.json
    python benchmarks/bench_reassemble.py --preset da --out benchmarks/results/reassemble-da-H100.json

--preset da times Depth Anything V2's decoder inputs instead: DINOv2 S/B/L tokens (class token ignored, the
widths and resampling of dpt_fast.specs) on the 37 x 37 patch grid of a 518 x 518 image (patch 14).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness.py beside this script, however it is run
import harness  # noqa: E402

from dpt_fast import specs  # noqa: E402

MODELS = {  # name: (token width D, [(stage, readout, resample, features), ...])
    "large": (1024, [(1, "project", "up4", 256), (2, "project", "up2", 512), (3, "project", "none", 1024),
                     (4, "project", "down2", 1024)]),
    "hybrid": (768, [(3, "project", "none", 768), (4, "project", "down2", 768)]),
}
PATCH = {"large": 16, "hybrid": 16}  # pixels per token: the grid of a size is size // patch
DA_MODELS = ("da2-small", "da2-base", "da2-large")
for _name in DA_MODELS:  # Depth Anything V2's four stages, from the table of architecture facts
    _spec = specs.get(_name)
    MODELS[_name] = (_spec.embed_dim, [(i + 1, _spec.readout, resample, width) for i, (resample, width)
                                       in enumerate(zip(_spec.resample, _spec.reassemble_widths))])
    PATCH[_name] = _spec.patch_size
PRESETS = {"da": {"models": ",".join(DA_MODELS), "sizes": "518"}}
SMOKE_MODELS = {  # --smoke: the same stage kinds at widths the Triton interpreter runs in a moment
    "large": (32, [(1, "project", "up4", 8), (2, "project", "up2", 16), (3, "project", "none", 32),
                   (4, "project", "down2", 32)]),
    "hybrid": (32, [(3, "project", "none", 16), (4, "project", "down2", 16)]),
    **{name: (32, [(1, "ignore", "up4", 8), (2, "ignore", "up2", 8), (3, "ignore", "none", 16),
                   (4, "ignore", "down2", 16)]) for name in DA_MODELS},
}


class EagerStage(nn.Module):
    """The original release's Reassemble_s as a module chain (readout, transpose, unflatten, 1x1, resample)."""

    def __init__(self, dim, features, readout, resample, start_index=1):
        super().__init__()
        self.readout, self.start_index = readout, start_index
        self.project = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU()) if readout == "project" else None
        self.conv = nn.Conv2d(dim, features, kernel_size=1)
        if resample in ("up4", "up2"):
            s = 4 if resample == "up4" else 2
            self.resample = nn.ConvTranspose2d(features, features, kernel_size=s, stride=s)
        elif resample == "down2":
            self.resample = nn.Conv2d(features, features, kernel_size=3, stride=2, padding=1)
        else:
            self.resample = nn.Identity()
        self.resample_name = resample

    def forward(self, tokens, grid_h, grid_w):
        x = tokens[:, self.start_index:]
        if self.readout == "project":
            x = self.project(torch.cat((x, tokens[:, :1].expand_as(x)), -1))
        elif self.readout == "add":
            x = x + tokens[:, :1]
        x = x.transpose(1, 2).unflatten(2, (grid_h, grid_w))
        return self.resample(self.conv(x))

    def params(self):
        """(readout_weight, readout_bias, proj_weight, proj_bias, resample_weight, resample_bias) as the
        operator takes them: the same tensors the chain uses."""
        rw, rb = (self.project[0].weight, self.project[0].bias) if self.project is not None else (None, None)
        res = self.resample if self.resample_name != "none" else None
        return (rw, rb, self.conv.weight, self.conv.bias,
                None if res is None else res.weight, None if res is None else res.bias)


def fused_stage(stage: EagerStage, tokens, grid_h, grid_w):
    from dpt_fast import ops
    return ops.reassemble(tokens, *stage.params(), grid_h, grid_w, stage.start_index, stage.readout,
                          stage.resample_name)


def chain(fn, stages, grid_h, grid_w):
    """A function of the stages' token tensors running `fn(stage, tokens, h, w)` for each stage."""
    def run(*tokens):
        return [fn(stage, t, grid_h, grid_w) for stage, t in zip(stages, tokens)]
    return run


def eager_call(stage, tokens, grid_h, grid_w):
    return stage(tokens, grid_h, grid_w)


def count(stages, batch, grid_h, grid_w, dim):
    """(FLOPs, bytes) the fused algorithm spends for one forward of `stages`: readout with the class-token
    half as a per-image bias, 1x1 conv, resample GEMM (or 3x3 stride-2 conv); bytes = tokens read once,
    output written once, weights read once (bf16)."""
    m = batch * grid_h * grid_w
    flops = bytes_ = 0
    for st in stages:
        f = st.conv.out_channels
        if st.readout == "project":
            flops += 2 * m * dim * dim + 2 * batch * dim * dim
        flops += 2 * m * dim * f
        if st.resample_name in ("up4", "up2"):
            s = 4 if st.resample_name == "up4" else 2
            flops += 2 * m * f * s * s * f
            out = m * s * s * f
        elif st.resample_name == "down2":
            mo = batch * ((grid_h + 1) // 2) * ((grid_w + 1) // 2)
            flops += 2 * mo * 9 * f * f
            out = mo * f
        else:
            out = m * f
        weights = sum(p.numel() for p in st.parameters())
        bytes_ += 2 * (batch * (1 + grid_h * grid_w) * dim + out + weights)
    return flops, bytes_


def compile_priority(size, label, mode):
    """Sort key of the compiled baselines: forward first; 1024^2, 1536^2, then the rest; all four stages
    before single stages."""
    return (mode != "fwd", {1024: 0, 1536: 1}.get(size, 2), label != "all", label)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write the results as JSON here (rewritten after every row)")
    ap.add_argument("--models", default="large,hybrid", help="comma list of: " + ", ".join(MODELS))
    ap.add_argument("--sizes", default="384,1024,1536", help="square input sizes in pixels (multiples of the "
                    "model's patch: 16 DPT, 14 Depth Anything)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="da: --models " + PRESETS["da"]["models"] + " --sizes " + PRESETS["da"]["sizes"]
                         + " (the 37 x 37 grid)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--stages", default="1,2,3,4,all", help="stages to time separately, and 'all' (the chain)")
    ap.add_argument("--modes", default="fwd,fwd+bwd")
    ap.add_argument("--compile-mode", default="max-autotune", help="torch.compile mode of the baseline")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--budget-s", type=float, default=380.0,
                    help="start no new row or compile after this many seconds in total")
    ap.add_argument("--compile-share", type=float, default=0.5,
                    help="fraction of --budget-s kept for the compiled baselines (the eager/fused rows stop "
                         "starting at (1 - share) x budget)")
    ap.add_argument("--compile-timeout-s", type=float, default=120.0,
                    help="cap on one compile (first call incl. autotuning); over it the row says so")
    ap.add_argument("--smoke", action="store_true", help="CPU dry run of the code path (tiny token grids, "
                    "float32, Triton interpreter, compile capped at 2 s); no measurement")
    args = ap.parse_args(argv)
    if args.preset:
        args.models, args.sizes = PRESETS[args.preset]["models"], PRESETS[args.preset]["sizes"]
    for m in args.models.split(","):
        if m not in MODELS:
            ap.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    for mode in args.modes.split(","):
        if mode not in ("fwd", "fwd+bwd"):
            ap.error(f"unknown mode {mode!r}: fwd, fwd+bwd")
    for label in args.stages.split(","):
        if label != "all" and label not in ("1", "2", "3", "4"):
            ap.error(f"unknown stage {label!r}: 1, 2, 3, 4, all")
    return args


def main(argv=None):
    args = parse_args(argv)
    refused = harness.refuse_without_gpu("bench_reassemble.py", args.smoke)
    if refused is not None:
        return refused

    import dpt_fast
    from dpt_fast.bench import warm_up_compiler
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    dev, dtype = "cuda", torch.bfloat16
    models = SMOKE_MODELS if args.smoke else MODELS
    if args.smoke:  # the interpreter's bf16 dots are wrong: float32; narrow widths, a 2x2 token grid
        dev, dtype = "cpu", torch.float32
        args.sizes, args.stages = "32", "1,4,all"
        if args.preset:  # one model of the preset: the others differ only in widths
            args.models = args.models.split(",")[0]
        args.compile_timeout_s, args.budget_s = min(args.compile_timeout_s, 2.0), 60.0
    run = harness.KernelBenchmark("reassemble", args, dev, dtype)
    report, ceilings = run.report, run.ceilings
    report["results"] = []
    ops_required = {"fwd": ("dpt_fast::reassemble",),
                    "fwd+bwd": ("dpt_fast::reassemble", "dpt_fast::reassemble_backward")}

    want_stages = args.stages.split(",")
    modes = args.modes.split(",")
    cases = []  # (model, size, stage label, stages, tokens, grid)
    for model in args.models.split(","):
        dim, specs = models[model]
        stage_mods = {n: EagerStage(dim, f, ro, rs).to(dev, dtype) for n, ro, rs, f in specs}
        for size in map(int, args.sizes.split(",")):
            g = size // PATCH[model]
            tokens = {n: torch.randn(args.batch, 1 + g * g, dim, device=dev, dtype=dtype) for n in stage_mods}
            for label in want_stages:
                names = list(stage_mods) if label == "all" else [int(label)] if int(label) in stage_mods else []
                if names:
                    cases.append((model, size, label, [stage_mods[n] for n in names], [tokens[n] for n in names], g))

    def run_case(model, size, label, stages, tokens, g, mode):
        grad_inputs = None
        if mode == "fwd+bwd":
            tokens = [t.detach().requires_grad_(True) for t in tokens]
            grad_inputs = tokens + [p for st in stages for p in st.parameters()]
        eager = chain(eager_call, stages, g, g)
        fused = chain(fused_stage, stages, g, g)
        dpt_fast.implementations_ran(reset=True)
        with torch.no_grad(), dpt_fast.use_backend("fused"):
            ref, out = eager(*tokens), fused(*tokens)
        grads = [torch.randn_like(o) for o in ref]
        grads_cl = [gr.contiguous(memory_format=torch.channels_last) for gr in grads]
        err = max(((o.float() - r.float()).abs().max() / r.float().abs().max()).item() for o, r in zip(out, ref))
        row = {"model": model, "size": size, "batch": args.batch, "stage": label, "mode": mode,
               "grid": [g, g], "dim": models[model][0],
               "stages": [{"readout": st.readout, "resample": st.resample_name, "features": st.conv.out_channels}
                          for st in stages],
               "fused_max_rel_err_vs_eager": err,
               "fused_output_finite": all(bool(torch.isfinite(o).all()) for o in out),
               "fused_out_channels_last": all(o.is_contiguous(memory_format=torch.channels_last) for o in out)}
        del ref, out
        row["eager_ms"] = harness.time_ms(lambda: eager(*tokens), grad_inputs, grads, device=dev)
        with dpt_fast.use_backend("fused"):
            row["fused_ms"] = harness.time_ms(lambda: fused(*tokens), grad_inputs, grads_cl, device=dev)
        run.account(row, dpt_fast.implementations_ran(reset=True), ops_required[mode])
        row["speedup_vs_eager"] = row["eager_ms"] / row["fused_ms"]
        if mode == "fwd":
            flops, nbytes = count(stages, args.batch, g, g, models[model][0])
            sec = row["fused_ms"] * 1e-3
            row.update(flops=flops, bytes=nbytes, fused_tflops=flops / sec / 1e12, fused_tbps=nbytes / sec / 1e12)
            row["fraction_of_matmul_peak"] = harness.fraction(row["fused_tflops"], ceilings["matmul_tflops"])
            row["fraction_of_copy_bandwidth"] = harness.fraction(row["fused_tbps"], ceilings["copy_tbps"])
        row["compiled_ms"] = None
        row["compiled_note"] = "not run (--no-compile)" if args.no_compile else "pending"
        return row

    # 1. eager and fused rows: the four-stage chain ("all") of every case in both modes first, then the
    #    single stages' forward rows, then their forward+backward rows
    rows_deadline = args.budget_s * (1.0 if args.no_compile else 1.0 - args.compile_share)
    pending = []
    order = sorted(((mode, case) for mode in modes for case in cases),
                   key=lambda mc: (mc[1][2] != "all", mc[1][2] != "all" and mc[0] != "fwd"))
    for mode, (model, size, label, stages, tokens, g) in order:
        name = f"{model} {size} stage {label} {mode}"
        if run.elapsed() > rows_deadline:
            report["notes"].append(f"skipped: time budget for eager/fused rows spent: {name}")
            continue
        row = run.attempt(name, lambda: run_case(model, size, label, stages, tokens, g, mode))
        if row is None:
            continue
        report["results"].append(row)
        print(f"{model:6s} {size:5d} stage {label:3s} {mode:7s} eager {row['eager_ms']:8.3f} ms  "
              f"fused {row['fused_ms']:8.3f} ms  x{row['speedup_vs_eager']:.2f}  err {row['fused_max_rel_err_vs_eager']:.1e}"
              + ("" if row["fused_path"]["verified"] else f"  NOT THE FUSED PATH: {row['fused_path']['problems']}"),
              flush=True)
        run.save()
        if not args.no_compile:
            pending.append((compile_priority(size, label, mode), row, model, label, stages, tokens, g, mode))

    # 2. compiled baselines, most important first, each compile capped, within the time budget
    if pending:
        warm_up_compiler(dev)  # lazy imports done before any compile deadline
    compiled_fns = {}  # (model, label) -> compiled chain of that stage set
    for _, row, model, label, stages, tokens, g, mode in sorted(pending, key=lambda p: p[0]):
        key = (model, label)
        if key not in compiled_fns:
            compiled_fns[key] = torch.compile(chain(eager_call, stages, g, g), mode=args.compile_mode,
                                              dynamic=False)
        compiled = compiled_fns[key]
        grad_inputs = grads = None
        toks = tokens
        if mode == "fwd+bwd":
            toks = [t.detach().requires_grad_(True) for t in tokens]
            grad_inputs = toks + [p for st in stages for p in st.parameters()]
            with torch.no_grad():
                grads = [torch.randn_like(o) for o in chain(eager_call, stages, g, g)(*toks)]
        run.time_compiled(row, lambda: harness.time_ms(lambda: compiled(*toks), grad_inputs, grads, compiled=True,
                                                       device=dev),
                          f"{model:6s} {row['size']:5d} stage {label:3s} {mode:7s}",
                          forget=lambda: compiled_fns.pop(key, None))

    return run.finish(report["results"], markdown, "Triton")


def markdown(report):
    env = report
    lines = [f"Reassemble, {env['device']}, {env['dtype']}, batch {report['args']['batch']}; torch {env['versions']['torch']}, "
             f"triton {env['versions']['triton']}, {env['date']}; measured ceilings "
             f"{report['ceilings']['matmul_tflops']} TFLOP/s, {report['ceilings']['copy_tbps']} TB/s",
             "",
             "| model | size | stage | mode | eager ms | compiled ms | fused ms | vs eager | vs compiled | fused TB/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    order = {"fwd": 0, "fwd+bwd": 1}
    for r in sorted(report["results"], key=lambda r: (r["model"], r["size"], r["stage"], order.get(r["mode"], 2))):
        c = f"{r['compiled_ms']:.3f}" if r.get("compiled_ms") is not None else (
            "over budget" if "over budget" in r.get("compiled_note", "") else "-")
        vc = f"{r['speedup_vs_compiled']:.2f}x" if r.get("speedup_vs_compiled") else "-"
        tbps = f"{r['fused_tbps']:.2f}" if r.get("fused_tbps") is not None else "-"
        mark = "" if r["fused_path"]["verified"] else " (reference ran)"
        lines.append(f"| {r['model']} | {r['size']} | {r['stage']} | {r['mode']} | {r['eager_ms']:.3f} | {c} | "
                     f"{r['fused_ms']:.3f}{mark} | {r['speedup_vs_eager']:.2f}x | {vc} | {tbps} |")
    if report["notes"]:
        lines += [""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
