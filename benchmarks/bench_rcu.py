"""Benchmark the fused residual conv unit (dpt_fast::residual_conv_unit, CUDA/CUTLASS, dpt_fast._C) in
the fusion block's pair, against eager cuDNN and torch.compile(mode="max-autotune"). GPU only.

The fusion block's RCU pair (refinenetN): out = RCU2(x0 + RCU1(skip)), RCU(x) = x + conv2(relu(conv1(relu(x)))),
convs 3x3, 256 channels, bias, bf16, channels_last, random data. For every map size and batch, forward
(no_grad) and forward+backward (gradients of x0, skip and all eight conv parameters):

  eager     nn.Conv2d / torch.relu / + chain, channels_last (cuDNN), as the original release runs it
  compiled  torch.compile(mode=--compile-mode) of exactly that chain
  fused     two dpt_fast.ops.residual_conv_unit calls on the fused backend (the x0 add rides in RCU1's
            epilogue as `extra`), same parameters: 4 kernels forward

Times are medians of triton.testing.do_bench (CUDA events, L2 flushed, warm-up excluded; compilation
happens in a warm-up call before timing). Each row records the fused output's error against eager, the
FLOPs of the four convolutions and the bytes a fully fused forward must move, the achieved fractions of
the ceilings measured in the same process (bf16 matmul TFLOP/s, copy TB/s: dpt_fast.measure.measure_ceilings),
and dpt_fast.implementations_ran() with a verdict (`fused_path`): a row where the reference served any
call (e.g. dpt_fast._C not built) is marked, and the script exits with status 1.

Order, so that a run cut short still answers the targets: the forward rows (eager and fused) of every
case, then forward+backward, within (1 - --compile-share) of --budget-s; then compiled baselines, most
important first (forward at batch 8: 384^2, 192^2, 96^2, 768^2, then batch 1, then the smaller maps, then
forward+backward), each compile capped at --compile-timeout-s ("skipped: compile over budget" otherwise).
The JSON is rewritten after every row.

    python benchmarks/bench_rcu.py --out benchmarks/results/rcu-H100-2025-01-01.json
    python benchmarks/bench_rcu.py --maps 96,384 --batches 8 --no-compile --out /tmp/rcu.json
    python benchmarks/bench_rcu.py --preset da --out benchmarks/results/rcu-da-H100.json

--channels sets the width (default 256, DPT's); --preset da runs Depth Anything V2's fusion blocks
instead: 64, 128 and 256 channels (S, B, L) on the maps of a 518 x 518 image (19, 37, 74 and 148 per side:
the 37 x 37 patch grid, its stride-2 stage and its x2 and x4 stages), batches 1 and 16.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness.py beside this script, however it is run
import harness  # noqa: E402

CHANNELS = 256
CL = torch.channels_last
DEFAULT_MAPS, DEFAULT_BATCHES = "24,48,96,192,384,768", "1,8"
# Depth Anything V2 S/B/L fusion widths and the fusion maps of a 518 x 518 input (patch grid 37)
PRESETS = {"da": {"channels": "64,128,256", "maps": "19,37,74,148", "batches": "1,16"}}
OPS_REQUIRED = {"fwd": ("dpt_fast::residual_conv_unit",),  # the operators a row of each mode must call
                "fwd+bwd": ("dpt_fast::residual_conv_unit", "dpt_fast::residual_conv_unit_backward")}


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


def compile_priority(batch, size, mode, batches):
    """Sort key of the compiled baselines: forward first; the largest batch first; maps 384, 192, 96, 768
    (the target's range), then the smaller ones."""
    return (mode != "fwd", batch != max(batches), {384: 0, 192: 1, 96: 2, 768: 3}.get(size, 4), -size)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write the results as JSON here (rewritten after every row)")
    ap.add_argument("--maps", default=DEFAULT_MAPS, help="square feature-map sizes (pixels per side)")
    ap.add_argument("--batches", default=DEFAULT_BATCHES)
    ap.add_argument("--channels", default=str(CHANNELS), help="comma-separated widths (default 256)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="da: --channels 64,128,256 --maps 19,37,74,148 --batches 1,16 (Depth Anything V2)")
    ap.add_argument("--modes", default="fwd,fwd+bwd")
    ap.add_argument("--compile-mode", default="max-autotune", help="torch.compile mode of the baseline")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--budget-s", type=float, default=380.0,
                    help="start no new row or compile after this many seconds in total")
    ap.add_argument("--compile-share", type=float, default=0.5,
                    help="fraction of --budget-s kept for the compiled baselines")
    ap.add_argument("--compile-timeout-s", type=float, default=120.0,
                    help="cap on one compile (first call incl. autotuning); over it the row says so")
    ap.add_argument("--smoke", action="store_true", help="CPU dry run of the code path (float32, the reference "
                    "serves, maps 8 and 12 and batches 1 and 2 unless given, compile capped at 2 s); no measurement")
    args = ap.parse_args(argv)
    if args.preset:
        args.channels, args.maps, args.batches = (PRESETS[args.preset][k] for k in ("channels", "maps", "batches"))
    try:
        args.map_list = [int(v) for v in args.maps.split(",")]
        args.batch_list = [int(v) for v in args.batches.split(",")]
        args.channel_list = [int(v) for v in args.channels.split(",")]
    except ValueError:
        ap.error("--maps, --batches and --channels take comma-separated integers")
    for mode in args.modes.split(","):
        if mode not in ("fwd", "fwd+bwd"):
            ap.error(f"unknown mode {mode!r}: fwd, fwd+bwd")
    return args


def main(argv=None):
    args = parse_args(argv)
    refused = harness.refuse_without_gpu("bench_rcu.py", args.smoke)
    if refused is not None:
        return refused
    harness.allow_a_compile_per_shape()
    run = start_run(args, *device_and_dtype(args))
    pairs = eager_pairs(run)
    measured = run.measure_rows(plan_rows(args), row_label, lambda case: measure_row(run, pairs, *case), describe_row)
    if not args.no_compile:
        time_compiled_baselines(run, pairs, [row for _, row in measured])
    return run.finish(run.report["results"], markdown, "CUDA")


def device_and_dtype(args):
    """cuda and bf16; --smoke: the CPU, float32 and interpreter-sized rows (args changed to say so)."""
    if not args.smoke:
        return "cuda", torch.bfloat16
    if args.maps == DEFAULT_MAPS:
        args.map_list = [8, 12]
    if args.batches == DEFAULT_BATCHES:
        args.batch_list = [1, 2]
    if args.preset:  # the preset's layout (several widths, two batches) at interpreter sizes
        args.map_list, args.batch_list, args.channel_list = [5], [1, 2], [8, 16]
    args.compile_timeout_s, args.budget_s = min(args.compile_timeout_s, 2.0), 120.0
    return "cpu", torch.float32


def start_run(args, device, dtype):
    """The run's report, with a note when the CUDA kernel is missing (the fused rows then time the reference)."""
    from dpt_fast.ops.rcu import cuda_kernel_registered
    run = harness.KernelBenchmark("rcu", args, device, dtype, rcu_cuda_kernel_registered=cuda_kernel_registered(),
                                  channels=args.channel_list if len(args.channel_list) > 1 else args.channel_list[0],
                                  memory_format="channels_last")
    run.report["results"] = []
    if not cuda_kernel_registered():
        run.report["notes"].append("dpt_fast._C is not built/registered: the 'fused' rows time the reference")
        print("bench_rcu: WARNING dpt_fast._C not registered; fused rows run the reference", file=sys.stderr)
    return run


def eager_pairs(run):
    """{channels: the eager pair of that width}, channels_last, with trained-like weight scales (activations
    stay O(1) through the chain)."""
    pairs = {}
    for width in run.args.channel_list:
        pairs[width] = EagerPair(width).to(run.device, run.dtype).to(memory_format=CL)
        with torch.no_grad():
            for p in pairs[width].parameters():
                p.copy_(torch.randn_like(p) * ((9 * width) ** -0.5 if p.dim() == 4 else 0.1))
    return pairs


def plan_rows(args):
    """[(mode, channels, size, batch)] in the order they run: every forward row first, then forward+backward."""
    return [(mode, channels, size, batch) for mode in args.modes.split(",") for channels in args.channel_list
            for size in args.map_list for batch in args.batch_list]


def row_label(case):
    mode, channels, size, batch = case
    return f"{size}^2 batch {batch} {mode}" + (f" {channels} channels" if channels != CHANNELS else "")


def describe_row(row):
    return (f"{row['size']:4d}^2 b{row['batch']} c{row['channels']} {row['mode']:7s} "
            f"eager {row['eager_ms']:9.3f} ms  fused {row['fused_ms']:9.3f} ms  x{row['speedup_vs_eager']:.2f}  "
            f"{row['fused_tflops']:.0f} TFLOP/s  err {row['fused_rel_l2_err_vs_eager']:.1e}")


def inputs(run, batch, size, requires_grad, channels):
    """x0 and skip: random, channels_last."""
    mk = lambda: torch.randn(batch, channels, size, size, device=run.device, dtype=run.dtype)  # noqa: E731
    return [mk().contiguous(memory_format=CL).requires_grad_(requires_grad) for _ in range(2)]


def measure_row(run, pairs, mode, channels, size, batch):
    """One row: the fused output against eager, eager and fused times, what served the calls, and the fused
    time's fractions of the measured ceilings."""
    import dpt_fast
    pair = pairs[channels]
    params = list(pair.parameters())
    x0, skip = inputs(run, batch, size, mode == "fwd+bwd", channels)
    grad_inputs = [x0, skip, *params] if mode == "fwd+bwd" else None
    dpt_fast.implementations_ran(reset=True)
    with torch.no_grad(), dpt_fast.use_backend("fused"):
        ref, out = pair(x0, skip), fused_pair(pair, x0, skip)
    grad = torch.randn_like(ref).contiguous(memory_format=CL) if mode == "fwd+bwd" else None
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    row = {"size": size, "batch": batch, "mode": mode, "channels": channels,
           "fused_rel_l2_err_vs_eager": err, "fused_output_finite": bool(torch.isfinite(out).all()),
           "fused_out_channels_last": out.is_contiguous(memory_format=CL)}
    del ref, out
    row["eager_ms"] = harness.time_ms(lambda: pair(x0, skip), grad_inputs, grad, device=run.device, scale_to_call=True)
    with dpt_fast.use_backend("fused"):
        row["fused_ms"] = harness.time_ms(lambda: fused_pair(pair, x0, skip), grad_inputs, grad, device=run.device,
                                          scale_to_call=True)
    run.account(row, dpt_fast.implementations_ran(reset=True), OPS_REQUIRED[mode])
    row["speedup_vs_eager"] = row["eager_ms"] / row["fused_ms"]
    add_throughput(row, run.ceilings)
    return row


def add_throughput(row, ceilings):
    """The fused time as TFLOP/s (and, forward only, TB/s) and their fractions of the measured ceilings."""
    flops, nbytes = count(row["batch"], row["size"], row["channels"])
    if row["mode"] == "fwd+bwd":
        flops *= 3  # dgrad + wgrad; the fused backward also recomputes conv1 (not counted)
        nbytes = None
    sec = row["fused_ms"] * 1e-3
    row.update(flops=flops, fused_tflops=flops / sec / 1e12,
               fraction_of_matmul_peak=harness.fraction(flops / sec / 1e12, ceilings["matmul_tflops"]))
    if nbytes is not None:
        row.update(bytes=nbytes, fused_tbps=nbytes / sec / 1e12,
                   fraction_of_copy_bandwidth=harness.fraction(nbytes / sec / 1e12, ceilings["copy_tbps"]))


def time_compiled_baselines(run, pairs, rows):
    """The compiled baseline of each measured row, most important first, each compile capped, within the
    time budget. A compile cut short drops the compiled pairs (the next row compiles afresh)."""
    from dpt_fast.measure import warm_up_compiler
    if rows:
        warm_up_compiler(run.device)  # lazy imports done before any compile deadline
    compiled = {}  # channels -> the compiled pair of that width

    def forget():
        compiled.clear()

    for row in sorted(rows, key=lambda r: (compile_priority(r["batch"], r["size"], r["mode"], run.args.batch_list),
                                           r["channels"])):
        batch, size, mode, channels = row["batch"], row["size"], row["mode"], row["channels"]
        if channels not in compiled:
            compiled[channels] = torch.compile(pairs[channels], mode=run.args.compile_mode, dynamic=False)
        compiled_pair = compiled[channels]
        x0, skip = inputs(run, batch, size, mode == "fwd+bwd", channels)
        grad_inputs = [x0, skip, *pairs[channels].parameters()] if mode == "fwd+bwd" else None
        grad = None
        if mode == "fwd+bwd":
            grad = torch.randn(batch, channels, size, size, device=run.device, dtype=run.dtype)
            grad = grad.contiguous(memory_format=CL)
        run.time_compiled(row, lambda: harness.time_ms(lambda: compiled_pair(x0, skip), grad_inputs, grad,
                                                       compiled=True, device=run.device, scale_to_call=True),
                          f"{size:4d}^2 b{batch} {mode:7s}", forget=forget)
        x0 = skip = grad_inputs = grad = None
        harness.empty_cache(run.device)


def markdown(report):
    lines = [f"Residual conv unit pair (fusion block), {report['device']}, {report['dtype']}, {report['channels']} channels, "
             f"channels_last; torch {report['versions']['torch']}, {report['date']}; measured ceilings "
             f"{report['ceilings']['matmul_tflops']} TFLOP/s, {report['ceilings']['copy_tbps']} TB/s",
             "",
             "| map | batch | channels | mode | eager ms | compiled ms | fused ms | vs eager | vs compiled | fused TFLOP/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    order = {"fwd": 0, "fwd+bwd": 1}
    for r in sorted(report["results"], key=lambda r: (r.get("channels", 0), r["size"], r["batch"],
                                                      order.get(r["mode"], 2))):
        c, vc = harness.compiled_cells(r)
        mark = "" if r["fused_path"]["verified"] else " (reference ran)"
        lines.append(f"| {r['size']}^2 | {r['batch']} | {r.get('channels', report['channels'])} | {r['mode']} | "
                     f"{r['eager_ms']:.3f} | {c} | {r['fused_ms']:.3f}{mark} | "
                     f"{r['speedup_vs_eager']:.2f}x | {vc} | {r['fused_tflops']:.0f} |")
    return "\n".join(lines + harness.note_lines(report))


if __name__ == "__main__":
    sys.exit(main())
