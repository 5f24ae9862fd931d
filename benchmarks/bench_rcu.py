"""Benchmark the fused residual conv unit (dpt_fast::residual_conv_unit, CUDA/CUTLASS, dpt_fast._C) in
the fusion block's pair, against eager cuDNN and torch.compile(mode="max-autotune"). GPU only.

The fusion block's RCU pair (refinenetN): out = RCU2(x0 + RCU1(skip)), RCU(x) = x + conv2(relu(conv1(relu(x)))),
convs 3x3, 256 channels, bias, bf16, channels_last, random data. For every map size and batch, forward
(no_grad) and forward+backward (gradients of x0, skip and all eight conv parameters):

  eager     nn.Conv2d / torch.relu / + chain, channels_last (cuDNN), as the original release runs it
  compiled  torch.compile(mode=--compile-mode) of exactly that chain
  fused     two dpt_fast.ops.residual_conv_unit calls on the fused backend (the x0 add rides in RCU1's
            epilogue as `extra`), same parameters: 4 kernels forward

Times are medians of triton.testing.do_bench (CUDA events, warm-up excluded; compilation happens in a
warm-up call before timing). Each row records the fused output's error against eager, the FLOPs of the
four convolutions and the bytes a fully fused forward must move, and the achieved fractions of the
DESIGN.md ceilings (H100: 800 TFLOP/s bf16 dense, 3.0 TB/s). The JSON also holds device, versions, date
and dpt_fast.implementations_ran(), so a run shows that the CUDA path (not the reference) was timed.

torch.compile with max-autotune takes a long time per graph: eager/fused rows for every case come first,
then compiled baselines in order of importance (forward at 384^2 and 192^2 and 96^2, batch 8, then the
rest, then forward+backward) until --budget-s runs out; rows left without a compiled time say so. The
JSON is rewritten after every row, so a run cut short still leaves its measurements.

    python benchmarks/bench_rcu.py --out benchmarks/results/rcu-H100-2025-01-01.json
    python benchmarks/bench_rcu.py --maps 96,384 --batches 8 --no-compile
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch import nn

PEAK_TFLOPS, PEAK_TBPS = 800.0, 3.0  # DESIGN.md section 7, H100 bf16 dense and copy bandwidth
CHANNELS = 256


class EagerRCU(nn.Module):
    """The original release's ResidualConvUnit (no BN): relu, conv, relu, conv, + input."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=True)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(torch.relu(x)))) + x

    def params(self):
        return self.conv1.weight, self.conv1.bias, self.conv2.weight, self.conv2.bias


class EagerPair(nn.Module):
    """The fusion block's two RCUs: RCU2(x0 + RCU1(skip))."""

    def __init__(self, channels):
        super().__init__()
        self.rcu1, self.rcu2 = EagerRCU(channels), EagerRCU(channels)

    def forward(self, x0, skip):
        return self.rcu2(x0 + self.rcu1(skip))


def fused_pair(pair: EagerPair, x0, skip):
    from dpt_fast import ops
    out = ops.residual_conv_unit(skip, *pair.rcu1.params(), x0)  # x0 + RCU1(skip), the add in the epilogue
    return ops.residual_conv_unit(out, *pair.rcu2.params())


def count(batch, size, channels=CHANNELS):
    """(FLOPs of the pair's four convolutions, bytes a fully fused forward moves: per RCU read x (+x0)
    twice, write hidden once and read it once, write the output once; weights once; bf16)."""
    pixels = batch * size * size
    flops = 4 * 2 * 9 * channels * channels * pixels
    act = 2 * pixels * channels
    weights = 2 * 2 * (9 * channels * channels + channels)
    # RCU1: read skip (conv1 + residual), x0, write/read hidden, write out; RCU2: same without x0
    bytes_ = act * (2 + 1 + 2 + 1) + act * (2 + 2 + 1) + weights
    return flops, bytes_


def bench(fn, backward_inputs=None, grad=None, compiled=False):
    """Median ms of fn() (no_grad) or of fn() + autograd.grad over backward_inputs."""
    import triton.testing

    def mark():
        if compiled:  # CUDA-graph trees (max-autotune) want a step marker per iteration
            torch.compiler.cudagraph_mark_step_begin()

    if backward_inputs is None:
        def call():
            mark()
            with torch.no_grad():
                fn()
    else:
        def call():
            mark()
            torch.autograd.grad(fn(), backward_inputs, grad)
    call()  # compile / first-call set-up outside the timing
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    call()
    torch.cuda.synchronize()
    once_ms = (time.perf_counter() - t0) * 1e3
    return triton.testing.do_bench(call, warmup=max(25, 2 * once_ms), rep=max(100, 8 * once_ms),
                                   return_mode="median")


def environment():
    from dpt_fast.bench import environment as common_environment
    from dpt_fast.ops.rcu import cuda_kernel_registered
    return {**common_environment(torch.device("cuda"), torch.bfloat16), "benchmark": "rcu",
            "rcu_cuda_kernel_registered": cuda_kernel_registered(), "channels": CHANNELS,
            "memory_format": "channels_last",
            "method": "triton.testing.do_bench median (ms), CUDA events, warm-up excluded; random normal data",
            "ceilings": {"tflops_bf16": PEAK_TFLOPS, "tbps": PEAK_TBPS}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write the results as JSON here (rewritten after every row)")
    ap.add_argument("--maps", default="24,48,96,192,384,768", help="square feature-map sizes (pixels per side)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--modes", default="fwd,fwd+bwd")
    ap.add_argument("--compile-mode", default="max-autotune", help="torch.compile mode of the baseline")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--budget-s", type=float, default=380.0,
                    help="stop starting compiled baselines after this many seconds in total")
    args = ap.parse_args(argv)

    from dpt_fast.bench import gpu_benchmark_blocker
    blocker = gpu_benchmark_blocker()
    if blocker:
        print(f"bench_rcu.py: {blocker}", file=sys.stderr)
        return 2

    import dpt_fast
    from dpt_fast.ops.rcu import cuda_kernel_registered
    start = time.time()
    torch.manual_seed(0)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    dev, dtype, cl = "cuda", torch.bfloat16, torch.channels_last
    report = {**environment(), "args": vars(args), "results": [], "implementations_ran": {}, "notes": []}
    if not cuda_kernel_registered():
        report["notes"].append("dpt_fast._C is not built/registered: the 'fused' rows time the reference")
        print("bench_rcu: WARNING dpt_fast._C not registered; fused rows run the reference", file=sys.stderr)

    def save():
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)

    pair = EagerPair(CHANNELS).to(dev, dtype).to(memory_format=cl)
    with torch.no_grad():  # trained-like scales keep activations O(1)
        for p in pair.parameters():
            p.copy_(torch.randn_like(p) * ((9 * CHANNELS) ** -0.5 if p.dim() == 4 else 0.1))
    params = list(pair.parameters())
    modes = args.modes.split(",")
    compiled_pair = None

    def inputs(batch, size, requires_grad):
        mk = lambda: torch.randn(batch, CHANNELS, size, size, device=dev, dtype=dtype)  # noqa: E731
        return [mk().contiguous(memory_format=cl).requires_grad_(requires_grad) for _ in range(2)]

    def run_case(batch, size, mode):
        x0, skip = inputs(batch, size, mode == "fwd+bwd")
        grad_inputs = [x0, skip, *params] if mode == "fwd+bwd" else None
        with torch.no_grad(), dpt_fast.use_backend("fused"):
            ref, out = pair(x0, skip), fused_pair(pair, x0, skip)
        grad = torch.randn_like(ref).contiguous(memory_format=cl) if mode == "fwd+bwd" else None
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        row = {"size": size, "batch": batch, "mode": mode, "channels": CHANNELS,
               "fused_rel_l2_err_vs_eager": err, "fused_out_channels_last": out.is_contiguous(memory_format=cl)}
        del ref, out
        row["eager_ms"] = bench(lambda: pair(x0, skip), grad_inputs, grad)
        dpt_fast.implementations_ran(reset=True)
        with dpt_fast.use_backend("fused"):
            row["fused_ms"] = bench(lambda: fused_pair(pair, x0, skip), grad_inputs, grad)
        ran = dpt_fast.implementations_ran(reset=True)
        row["implementations_ran"] = ran
        for op, impls in ran.items():
            total = report["implementations_ran"].setdefault(op, {})
            for impl, n in impls.items():
                total[impl] = total.get(impl, 0) + n
        row["speedup_vs_eager"] = row["eager_ms"] / row["fused_ms"]
        flops, nbytes = count(batch, size)
        if mode == "fwd+bwd":
            flops *= 3  # dgrad + wgrad; the fused backward also recomputes conv1 (not counted)
            nbytes = None
        sec = row["fused_ms"] * 1e-3
        row.update(flops=flops, fused_tflops=flops / sec / 1e12, fraction_of_peak_flops=flops / sec / 1e12 / PEAK_TFLOPS)
        if nbytes is not None:
            row.update(bytes=nbytes, fused_tbps=nbytes / sec / 1e12,
                       fraction_of_peak_bandwidth=nbytes / sec / 1e12 / PEAK_TBPS)
        row["compiled_ms"] = None
        row["compiled_note"] = "not run (--no-compile)" if args.no_compile else "pending"
        return row, (x0, skip, grad_inputs, grad)

    pending = []
    maps = [int(s) for s in args.maps.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    for size in maps:
        for batch in batches:
            for mode in modes:
                try:
                    row, tensors = run_case(batch, size, mode)
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    report["notes"].append(f"out of memory: {size}^2 batch {batch} {mode}")
                    save()
                    continue
                report["results"].append(row)
                print(f"{size:4d}^2 b{batch} {mode:7s} eager {row['eager_ms']:9.3f} ms  fused {row['fused_ms']:9.3f} ms"
                      f"  x{row['speedup_vs_eager']:.2f}  {row['fused_tflops']:.0f} TFLOP/s"
                      f"  err {row['fused_rel_l2_err_vs_eager']:.1e}", flush=True)
                save()
                if not args.no_compile:
                    priority = (mode != "fwd", batch != max(batches), {384: 0, 192: 1, 96: 2}.get(size, 3), -size)
                    pending.append((priority, row, batch, size, mode))
                del tensors
                torch.cuda.empty_cache()

    # compiled baselines, most important first, within the time budget
    for _, row, batch, size, mode in sorted(pending, key=lambda p: p[0]):
        if time.time() - start > args.budget_s:
            row["compiled_note"] = f"skipped: --budget-s {args.budget_s:.0f} s spent"
            continue
        if compiled_pair is None:
            compiled_pair = torch.compile(pair, mode=args.compile_mode, dynamic=False)
        x0, skip = inputs(batch, size, mode == "fwd+bwd")
        grad_inputs = [x0, skip, *params] if mode == "fwd+bwd" else None
        grad = (torch.randn(batch, CHANNELS, size, size, device=dev, dtype=dtype).contiguous(memory_format=cl)
                if mode == "fwd+bwd" else None)
        t0 = time.time()
        try:
            row["compiled_ms"] = bench(lambda: compiled_pair(x0, skip), grad_inputs, grad, compiled=True)
        except Exception as e:  # a failed compile is a result to record, not a crash of the whole run
            row["compiled_note"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
            save()
            continue
        finally:
            del x0, skip, grad_inputs, grad
        row["compiled_note"] = f"mode={args.compile_mode}, first call (compile) {time.time() - t0:.0f} s"
        row["speedup_vs_compiled"] = row["compiled_ms"] / row["fused_ms"]
        print(f"{size:4d}^2 b{batch} {mode:7s} compiled {row['compiled_ms']:9.3f} ms  fused x{row['speedup_vs_compiled']:.2f}",
              flush=True)
        save()
        torch.cuda.empty_cache()

    report["wall_s"] = time.time() - start
    save()
    print("\n| map | batch | mode | eager ms | compiled ms | fused ms | vs eager | vs compiled | fused TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in report["results"]:
        c = f"{r['compiled_ms']:.3f}" if r["compiled_ms"] is not None else "-"
        vc = f"{r['speedup_vs_compiled']:.2f}x" if r.get("speedup_vs_compiled") else "-"
        print(f"| {r['size']}^2 | {r['batch']} | {r['mode']} | {r['eager_ms']:.3f} | {c} | {r['fused_ms']:.3f} | "
              f"{r['speedup_vs_eager']:.2f}x | {vc} | {r['fused_tflops']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
