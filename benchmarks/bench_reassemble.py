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
of the ceilings measured in the same process (bf16 matmul TFLOP/s, copy TB/s: dpt_fast.measure.measure_ceilings),
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
from typing import NamedTuple

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
OPS_REQUIRED = {"fwd": ("dpt_fast::reassemble",),  # the operators a row of each mode must call
                "fwd+bwd": ("dpt_fast::reassemble", "dpt_fast::reassemble_backward")}
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


class Case(NamedTuple):
    """One table entry: a model's stage set (one stage, or "all" four) at one input size, and its tokens."""
    model: str
    size: int
    label: str  # the stage: "1".."4" or "all"
    stages: list  # [EagerStage]
    tokens: list  # one [batch, 1 + grid^2, dim] tensor per stage
    grid: int  # tokens per side
    dim: int  # token width


def main(argv=None):
    args = parse_args(argv)
    refused = harness.refuse_without_gpu("bench_reassemble.py", args.smoke)
    if refused is not None:
        return refused
    harness.allow_a_compile_per_shape()
    device, dtype, models = device_dtype_and_models(args)
    run = harness.KernelBenchmark("reassemble", args, device, dtype)
    run.report["results"] = []
    measured = run.measure_rows(plan_rows(args, make_cases(run, models)), row_label,
                                lambda mode_case: measure_row(run, *mode_case), describe_row)
    if not args.no_compile:
        time_compiled_baselines(run, measured)
    return run.finish(run.report["results"], markdown, "Triton")


def device_dtype_and_models(args):
    """cuda, bf16 and the models' real widths; --smoke: the CPU, float32, narrow widths and a 2x2 token grid
    (args changed to say so; the interpreter's bf16 dots are wrong)."""
    if not args.smoke:
        return "cuda", torch.bfloat16, MODELS
    args.sizes, args.stages = "32", "1,4,all"
    if args.preset:  # one model of the preset: the others differ only in widths
        args.models = args.models.split(",")[0]
    args.compile_timeout_s, args.budget_s = min(args.compile_timeout_s, 2.0), 60.0
    return "cpu", torch.float32, SMOKE_MODELS


def make_cases(run, models):
    """[Case] of every model, size and stage label asked for: the eager stages (the fused operator takes their
    parameters) and random tokens, one set per model and size shared by its stage labels."""
    args, cases = run.args, []
    for model in args.models.split(","):
        dim, stage_specs = models[model]
        stage_mods = {n: EagerStage(dim, f, ro, rs).to(run.device, run.dtype) for n, ro, rs, f in stage_specs}
        for size in map(int, args.sizes.split(",")):
            g = size // PATCH[model]
            tokens = {n: torch.randn(args.batch, 1 + g * g, dim, device=run.device, dtype=run.dtype)
                      for n in stage_mods}
            for label in args.stages.split(","):
                names = list(stage_mods) if label == "all" else [int(label)] if int(label) in stage_mods else []
                if names:
                    cases.append(Case(model, size, label, [stage_mods[n] for n in names], [tokens[n] for n in names],
                                      g, dim))
    return cases


def plan_rows(args, cases):
    """[(mode, Case)] in the order they run: the four-stage chain ("all") of every case in both modes first,
    then the single stages' forward rows, then their forward+backward rows."""
    return sorted(((mode, case) for mode in args.modes.split(",") for case in cases),
                  key=lambda mc: (mc[1].label != "all", mc[1].label != "all" and mc[0] != "fwd"))


def row_label(mode_case):
    mode, case = mode_case
    return f"{case.model} {case.size} stage {case.label} {mode}"


def describe_row(row):
    return (f"{row['model']:6s} {row['size']:5d} stage {row['stage']:3s} {row['mode']:7s} "
            f"eager {row['eager_ms']:8.3f} ms  fused {row['fused_ms']:8.3f} ms  x{row['speedup_vs_eager']:.2f}  "
            f"err {row['fused_max_rel_err_vs_eager']:.1e}")


def with_gradients(case, mode):
    """(tokens, the tensors to differentiate or None): for fwd+bwd fresh leaves of the tokens and every
    parameter of the stages."""
    if mode != "fwd+bwd":
        return case.tokens, None
    tokens = [t.detach().requires_grad_(True) for t in case.tokens]
    return tokens, tokens + [p for st in case.stages for p in st.parameters()]


def measure_row(run, mode, case):
    """One row: the fused outputs against the eager chain, eager and fused times, what served the calls, and
    (forward) the fused time's fractions of the measured ceilings."""
    import dpt_fast
    g = case.grid
    tokens, grad_inputs = with_gradients(case, mode)
    eager = chain(eager_call, case.stages, g, g)
    fused = chain(fused_stage, case.stages, g, g)
    dpt_fast.implementations_ran(reset=True)
    with torch.no_grad(), dpt_fast.use_backend("fused"):
        ref, out = eager(*tokens), fused(*tokens)
    grads = [torch.randn_like(o) for o in ref]
    grads_cl = [gr.contiguous(memory_format=torch.channels_last) for gr in grads]
    err = max(((o.float() - r.float()).abs().max() / r.float().abs().max()).item() for o, r in zip(out, ref))
    row = {"model": case.model, "size": case.size, "batch": run.args.batch, "stage": case.label, "mode": mode,
           "grid": [g, g], "dim": case.dim,
           "stages": [{"readout": st.readout, "resample": st.resample_name, "features": st.conv.out_channels}
                      for st in case.stages],
           "fused_max_rel_err_vs_eager": err,
           "fused_output_finite": all(bool(torch.isfinite(o).all()) for o in out),
           "fused_out_channels_last": all(o.is_contiguous(memory_format=torch.channels_last) for o in out)}
    del ref, out
    row["eager_ms"] = harness.time_ms(lambda: eager(*tokens), grad_inputs, grads, device=run.device)
    with dpt_fast.use_backend("fused"):
        row["fused_ms"] = harness.time_ms(lambda: fused(*tokens), grad_inputs, grads_cl, device=run.device)
    run.account(row, dpt_fast.implementations_ran(reset=True), OPS_REQUIRED[mode])
    row["speedup_vs_eager"] = row["eager_ms"] / row["fused_ms"]
    if mode == "fwd":
        add_throughput(row, case, run.ceilings)
    return row


def add_throughput(row, case, ceilings):
    """The fused forward time as TFLOP/s and TB/s and their fractions of the measured ceilings."""
    flops, nbytes = count(case.stages, row["batch"], case.grid, case.grid, case.dim)
    sec = row["fused_ms"] * 1e-3
    row.update(flops=flops, bytes=nbytes, fused_tflops=flops / sec / 1e12, fused_tbps=nbytes / sec / 1e12)
    row["fraction_of_matmul_peak"] = harness.fraction(row["fused_tflops"], ceilings["matmul_tflops"])
    row["fraction_of_copy_bandwidth"] = harness.fraction(row["fused_tbps"], ceilings["copy_tbps"])


def time_compiled_baselines(run, measured):
    """The compiled baseline of each measured row, most important first, each compile capped, within the
    time budget. One compiled chain per model and stage set; a compile cut short drops it."""
    from dpt_fast.measure import warm_up_compiler
    if measured:
        warm_up_compiler(run.device)  # lazy imports done before any compile deadline
    compiled_fns = {}  # (model, label) -> compiled chain of that stage set
    for (mode, case), row in sorted(measured, key=lambda mc_row: compile_priority(mc_row[0][1].size,
                                                                                   mc_row[0][1].label,
                                                                                   mc_row[0][0])):
        key, g = (case.model, case.label), case.grid
        if key not in compiled_fns:
            compiled_fns[key] = torch.compile(chain(eager_call, case.stages, g, g), mode=run.args.compile_mode,
                                              dynamic=False)
        compiled = compiled_fns[key]
        toks, grad_inputs = with_gradients(case, mode)
        grads = None
        if mode == "fwd+bwd":
            with torch.no_grad():
                grads = [torch.randn_like(o) for o in chain(eager_call, case.stages, g, g)(*toks)]
        run.time_compiled(row, lambda: harness.time_ms(lambda: compiled(*toks), grad_inputs, grads, compiled=True,
                                                       device=run.device),
                          f"{case.model:6s} {row['size']:5d} stage {case.label:3s} {mode:7s}",
                          forget=lambda: compiled_fns.pop(key, None))


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
        c, vc = harness.compiled_cells(r)
        tbps = f"{r['fused_tbps']:.2f}" if r.get("fused_tbps") is not None else "-"
        mark = "" if r["fused_path"]["verified"] else " (reference ran)"
        lines.append(f"| {r['model']} | {r['size']} | {r['stage']} | {r['mode']} | {r['eager_ms']:.3f} | {c} | "
                     f"{r['fused_ms']:.3f}{mark} | {r['speedup_vs_eager']:.2f}x | {vc} | {tbps} |")
    return "\n".join(lines + harness.note_lines(report))


if __name__ == "__main__":
    sys.exit(main())
