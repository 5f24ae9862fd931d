"""Benchmark the fused Reassemble operator (dpt_fast::reassemble, Triton) against the original's eager
module chain and against torch.compile(mode="max-autotune") of that chain. GPU only.

For every model width set, input size and stage (1-4 and "all" four in one call chain), forward
(no_grad) and forward+backward (gradients of tokens and every parameter), bf16, random data:

  eager     the original release's act_postprocess chain: cat(t_i, t_0) -> nn.Linear(2D, D) -> nn.GELU
            (readout project), transpose(1, 2), unflatten, nn.Conv2d 1x1, nn.ConvTranspose2d / nn.Conv2d;
            output NCHW as the original produces it
  compiled  torch.compile(mode=--compile-mode) of exactly that chain
  fused     dpt_fast.ops.reassemble on the fused backend, same parameters, output channels_last

Times are medians of triton.testing.do_bench (CUDA events, warm-up excluded; Triton autotuning and
torch.compile happen in a warm-up call before timing). Each row records the fused output's error
against the eager chain, the FLOPs and bytes the fused algorithm must spend, and the achieved fraction
of the DESIGN.md ceilings (H100: 800 TFLOP/s bf16 dense, 3.0 TB/s). The JSON also holds device,
versions, date and dpt_fast.implementations_ran(), so a run shows that the Triton path was timed.

torch.compile with max-autotune takes minutes per graph: the eager/fused rows for every case come
first, then compiled baselines in order of importance (forward at 1024^2 and 1536^2, then 384^2, then
forward+backward) until --budget-s runs out; rows left without a compiled time say so. The JSON is
rewritten after every row, so a run cut short still leaves its measurements.

    python benchmarks/bench_reassemble.py --out benchmarks/results/reassemble-H100-2025-01-01.json
    python benchmarks/bench_reassemble.py --sizes 1024 --models large --no-compile
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch import nn

MODELS = {  # name: (token width D, [(stage, readout, resample, features), ...])
    "large": (1024, [(1, "project", "up4", 256), (2, "project", "up2", 512), (3, "project", "none", 1024),
                     (4, "project", "down2", 1024)]),
    "hybrid": (768, [(3, "project", "none", 768), (4, "project", "down2", 768)]),
}
PEAK_TFLOPS, PEAK_TBPS = 800.0, 3.0  # DESIGN.md section 7, H100 bf16 dense and copy bandwidth


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


def bench(fn, backward_inputs=None, grad=None):
    """Median ms of fn() (no_grad) or of fn() + autograd.grad over backward_inputs."""
    import triton.testing
    if backward_inputs is None:
        def call():
            with torch.no_grad():
                fn()
    else:
        def call():
            outs = fn()
            torch.autograd.grad(outs, backward_inputs, grad)
    call()  # compile / autotune outside the timing
    torch.cuda.synchronize()
    return triton.testing.do_bench(call, return_mode="median")


def environment():
    from dpt_fast.bench import environment as common_environment
    return {**common_environment(torch.device("cuda"), torch.bfloat16), "benchmark": "reassemble",
            "method": "triton.testing.do_bench median (ms), CUDA events, warm-up excluded; random normal data",
            "ceilings": {"tflops_bf16": PEAK_TFLOPS, "tbps": PEAK_TBPS}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write the results as JSON here (rewritten after every row)")
    ap.add_argument("--models", default="large,hybrid", help="comma list of: " + ", ".join(MODELS))
    ap.add_argument("--sizes", default="384,1024,1536", help="square input sizes in pixels (multiples of 16)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--stages", default="1,2,3,4,all", help="stages to time separately, and 'all' (the chain)")
    ap.add_argument("--modes", default="fwd,fwd+bwd")
    ap.add_argument("--compile-mode", default="max-autotune", help="torch.compile mode of the baseline")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--budget-s", type=float, default=380.0,
                    help="stop starting compiled baselines after this many seconds in total")
    args = ap.parse_args(argv)

    from dpt_fast.bench import gpu_benchmark_blocker
    blocker = gpu_benchmark_blocker()
    if blocker:
        print(f"bench_reassemble.py: {blocker}", file=sys.stderr)
        return 2

    import dpt_fast
    start = time.time()
    torch.manual_seed(0)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    dev, dtype = "cuda", torch.bfloat16
    report = {**environment(), "args": vars(args), "results": [], "implementations_ran": {}, "notes": []}

    def save():
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)

    want_stages = args.stages.split(",")
    modes = args.modes.split(",")
    cases = []  # (model, size, stage label, stages, tokens, grid)
    for model in args.models.split(","):
        dim, specs = MODELS[model]
        stage_mods = {n: EagerStage(dim, f, ro, rs).to(dev, dtype) for n, ro, rs, f in specs}
        for size in map(int, args.sizes.split(",")):
            g = size // 16
            tokens = {n: torch.randn(args.batch, 1 + g * g, dim, device=dev, dtype=dtype) for n in stage_mods}
            for label in want_stages:
                names = list(stage_mods) if label == "all" else [int(label)] if int(label) in stage_mods else []
                if names:
                    cases.append((model, size, label, [stage_mods[n] for n in names], [tokens[n] for n in names], g))

    compiled_fns = {}  # (model, label) -> compiled chain of that stage set

    def run_case(model, size, label, stages, tokens, g, mode):
        grad_inputs = None
        if mode == "fwd+bwd":
            tokens = [t.detach().requires_grad_(True) for t in tokens]
            grad_inputs = tokens + [p for st in stages for p in st.parameters()]
        eager = chain(eager_call, stages, g, g)
        fused = chain(fused_stage, stages, g, g)
        with torch.no_grad():
            ref, out = eager(*tokens), fused(*tokens)
        grads = [torch.randn_like(o) for o in ref]
        grads_cl = [gr.contiguous(memory_format=torch.channels_last) for gr in grads]
        err = max(((o.float() - r.float()).abs().max() / r.float().abs().max()).item() for o, r in zip(out, ref))
        row = {"model": model, "size": size, "batch": args.batch, "stage": label, "mode": mode,
               "grid": [g, g], "dim": MODELS[model][0],
               "stages": [{"readout": st.readout, "resample": st.resample_name, "features": st.conv.out_channels}
                          for st in stages],
               "fused_max_rel_err_vs_eager": err,
               "fused_out_channels_last": all(o.is_contiguous(memory_format=torch.channels_last) for o in out)}
        row["eager_ms"] = bench(lambda: eager(*tokens), grad_inputs, grads)
        dpt_fast.implementations_ran(reset=True)
        with dpt_fast.use_backend("fused"):
            row["fused_ms"] = bench(lambda: fused(*tokens), grad_inputs, grads_cl)
        ran = dpt_fast.implementations_ran(reset=True)
        row["implementations_ran"] = ran
        for op, impls in ran.items():
            total = report["implementations_ran"].setdefault(op, {})
            for impl, n in impls.items():
                total[impl] = total.get(impl, 0) + n
        row["speedup_vs_eager"] = row["eager_ms"] / row["fused_ms"]
        if mode == "fwd":
            flops, nbytes = count(stages, args.batch, g, g, MODELS[model][0])
            sec = row["fused_ms"] * 1e-3
            row.update(flops=flops, bytes=nbytes, fused_tflops=flops / sec / 1e12, fused_tbps=nbytes / sec / 1e12,
                       fraction_of_peak_flops=flops / sec / 1e12 / PEAK_TFLOPS,
                       fraction_of_peak_bandwidth=nbytes / sec / 1e12 / PEAK_TBPS)
        row["compiled_ms"] = None
        row["compiled_note"] = "not run (--no-compile)" if args.no_compile else "pending"
        return row

    pending = []
    for model, size, label, stages, tokens, g in cases:
        for mode in modes:
            try:
                row = run_case(model, size, label, stages, tokens, g, mode)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                report["notes"].append(f"out of memory: {model} {size} stage {label} {mode}")
                save()
                continue
            report["results"].append(row)
            print(f"{model:6s} {size:5d} stage {label:3s} {mode:7s} eager {row['eager_ms']:8.3f} ms  "
                  f"fused {row['fused_ms']:8.3f} ms  x{row['speedup_vs_eager']:.2f}  err {row['fused_max_rel_err_vs_eager']:.1e}",
                  flush=True)
            save()
            if not args.no_compile:
                priority = (mode != "fwd", {1024: 0, 1536: 1}.get(size, 2), label == "all")
                pending.append((priority, row, model, label, stages, tokens, g, mode))

    # compiled baselines, most important first, within the time budget
    for _, row, model, label, stages, tokens, g, mode in sorted(pending, key=lambda p: p[0]):
        if time.time() - start > args.budget_s:
            row["compiled_note"] = f"skipped: --budget-s {args.budget_s:.0f} s spent"
            continue
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
        t0 = time.time()
        try:
            row["compiled_ms"] = bench(lambda: compiled(*toks), grad_inputs, grads)
        except Exception as e:  # a failed compile is a result to record, not a crash of the whole run
            row["compiled_note"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
            save()
            continue
        row["compiled_note"] = f"mode={args.compile_mode}, first call (compile) {time.time() - t0:.0f} s"
        row["speedup_vs_compiled"] = row["compiled_ms"] / row["fused_ms"]
        print(f"{model:6s} {row['size']:5d} stage {label:3s} {mode:7s} compiled {row['compiled_ms']:8.3f} ms  "
              f"fused x{row['speedup_vs_compiled']:.2f}", flush=True)
        save()

    report["wall_s"] = time.time() - start
    save()
    print("\n| model | size | stage | mode | eager ms | compiled ms | fused ms | vs eager | vs compiled |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in report["results"]:
        c = f"{r['compiled_ms']:.3f}" if r["compiled_ms"] is not None else "-"
        vc = f"{r['speedup_vs_compiled']:.2f}x" if r.get("speedup_vs_compiled") else "-"
        print(f"| {r['model']} | {r['size']} | {r['stage']} | {r['mode']} | {r['eager_ms']:.3f} | {c} | "
              f"{r['fused_ms']:.3f} | {r['speedup_vs_eager']:.2f}x | {vc} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
