"""Benchmark the fused attention (dpt_fast::attention, Triton) against every PyTorch SDPA backend and the
whole attention block against timm's Attention. GPU only (exits with status 2 without CUDA).

Kernel table: for N in --sizes (default 577, 1370, 2305, 4097, 9217, 16385, 32401 tokens), --heads 16,
--head-dim 64, bf16, random normal data, batch chosen so that batch * N is about --tokens (65536) (and,
for the largest N, batch 1 as well, plus 577 tokens at batch 16). Times forward (no_grad), backward
(autograd of a retained graph) and forward+backward of:

  dpt_fast   dpt_fast.ops.attention on the fused backend: reads the packed qkv [B, N, 3*H*D], writes
             [B, N, H*D]; the gradient is the packed dqkv
  flash, efficient, cudnn, math
             torch.nn.functional.scaled_dot_product_attention under torch.nn.attention.sdpa_kernel(<one
             backend>), on q, k, v taken as strided views of the same packed qkv (as timm does) and made
             leaves, so the SDPA rows carry no split or packing cost (the block table does). math only
             where its N^2 score tensors fit (estimate vs free memory) and N <= --math-max-tokens.

TFLOP/s count the attention matmuls: forward 4*B*H*N^2*D, backward 2.5x that, forward+backward 3.5x
(the FlashAttention convention). "vs best" is the best SDPA time divided by ours (> 1: we are faster).
The bf16 dense matmul peak and the copy bandwidth are measured in the same process
(dpt_fast.measure.measure_ceilings: 8192^3 torch.matmul, a 1 GiB copy) and every row states the fraction of
the peak reached. Each row records dpt_fast.implementations_ran() and a verdict (`fused_path`): a row where
the reference served a call is marked, and the script exits with status 1.

Block table: timm.layers.Attention(dim=H*D, num_heads=H, qkv_bias=True) with fused_attn (SDPA, default
backend choice) against the same module's weights run as qkv Linear -> dpt_fast.ops.attention -> proj;
forward (no_grad) and forward+backward (gradients of the input and every parameter).

Times are medians of triton.testing.do_bench (CUDA events, warm-up excluded; Triton autotuning happens
in an explicit warm-up call before timing). The JSON (--out; rewritten after every row so a run cut short
keeps its measurements) records device, torch/triton/timm versions, date, git commit, the measured
matmul peak and dpt_fast.implementations_ran(), which must show the Triton path and never the reference.
Rows run most important first (kernel rows at N = 577, 1370, 2305, 4097, 9217, the block rows there, then
the rest); no new row starts after --budget-s seconds.

--preset da replaces the default rows with the shapes Depth Anything runs (head dim 64; 6, 12 and 16 heads
for DINOv2 S, B and L): N = 1370 (518 x 518, a 37 x 37 patch grid and the class token) at batch 1 and 16,
and N = 10002 (a 1022 x 1918 video frame, 73 x 137 patches and the class token) at batch 1. --smoke runs the same code on the CPU with tiny
shapes and float32 (Triton interpreter): a dry run for the tests, never a measurement.

    python benchmarks/bench_attention.py --out benchmarks/results/attention-H100-2025-01-01.json
    python benchmarks/bench_attention.py --sizes 577 4097 --no-block --out /tmp/attn.json
    python benchmarks/bench_attention.py --preset da --out benchmarks/results/attention-da-H100.json
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness.py beside this script, however it is run
import harness  # noqa: E402

DEFAULT_SIZES = (577, 1370, 2305, 4097, 9217, 16385, 32401)
SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")
OPS_REQUIRED = ("dpt_fast::attention", "dpt_fast::attention_backward")  # what every row must call
# Depth Anything V2 (DINOv2 ViT-S/B/L, head dim 64): (tokens, batch, heads) of 518 x 518 images at batch 1
# and 16, and of one 1022 x 1918 video frame.
DA_TOKENS_518 = 37 * 37 + 1
DA_TOKENS_FRAME = (1022 // 14) * (1918 // 14) + 1
DA_HEADS = (6, 12, 16)
DA_CASES = tuple((n, b, h) for n, b in ((DA_TOKENS_518, 1), (DA_TOKENS_518, 16), (DA_TOKENS_FRAME, 1))
                 for h in DA_HEADS)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON results path (directories are created)")
    p.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="token counts N")
    p.add_argument("--heads", type=int, default=16, help="heads of every --sizes/--extra row (default 16)")
    p.add_argument("--preset", choices=("da",), default=None,
                   help="da: Depth Anything's rows instead of --sizes/--extra (N 1370 at batch 1 and 16, N 10002 "
                        "at batch 1; 6, 12 and 16 heads)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--tokens", type=int, default=65536, help="batch = max(1, round(tokens / N))")
    p.add_argument("--extra", type=str, nargs="*", default=["577x16", "max x1"],
                   help="extra 'N x BATCH' cases ('max' = the largest N)")
    p.add_argument("--math-max-tokens", type=int, default=4097, help="largest N for the math backend")
    p.add_argument("--no-block", action="store_true", help="skip the attention block table")
    p.add_argument("--budget-s", type=float, default=360.0, help="start no new row after this many seconds")
    p.add_argument("--smoke", action="store_true",
                   help="CPU dry run of the code path (tiny shapes, float32, Triton interpreter); no measurement")
    return p.parse_args(argv)


# --- the steps of a run (torch and triton imported inside them, so --help works anywhere) ----------

def attention_flops(batch, tokens, heads, head_dim):
    forward = 4.0 * batch * heads * tokens * tokens * head_dim
    return {"fwd": forward, "bwd": 2.5 * forward, "fwd_bwd": 3.5 * forward}


def block_flops(batch, tokens, heads, head_dim):
    dim = heads * head_dim
    linear = 2.0 * batch * tokens * dim * (3 * dim + dim)  # qkv and proj
    core = attention_flops(batch, tokens, heads, head_dim)
    return {"fwd": linear + core["fwd"], "fwd_bwd": 3 * linear + core["fwd_bwd"]}


def cases(args):
    """[(tokens, batch, heads)] of the run: --preset's rows, or --sizes and --extra at --heads."""
    if args.preset == "da":
        return list(args.preset_cases)
    sizes = list(args.sizes)
    out = [(n, max(1, round(args.tokens / n))) for n in sizes]
    for spec in args.extra:
        match = re.fullmatch(r"\s*(\d+|max)\s*x\s*(\d+)\s*", spec)
        if match is None:
            raise SystemExit(f"--extra expects NxBATCH (N may be 'max'), got {spec!r}")
        n, b = match.groups()
        n = max(sizes) if n == "max" else int(n)
        if (n, int(b)) not in out:
            out.append((n, int(b)))
    return [(n, b, args.heads) for n, b in out]


def task_order(kernel_cases, block_cases, first=(577, 2305, 4097, 9217, DA_TOKENS_518)):
    """Most important rows first, so that a run cut short by its budget still answers the targets:
    the kernel rows at `first` token counts, the block rows there, then the remaining kernel rows, then
    the remaining block rows. Cases are (tokens, batch, heads)."""
    def split(kind, items):
        head = [(kind, *case) for case in items if case[0] in first]
        return head, [(kind, *case) for case in items if case[0] not in first]
    k_head, k_tail = split("kernel", kernel_cases)
    b_head, b_tail = split("block", block_cases)
    return k_head + b_head + k_tail + b_tail


def main(argv=None):
    args = parse_args(argv)
    refused = harness.refuse_without_gpu("bench_attention.py", args.smoke)
    if refused is not None:
        return refused
    run = start_run(args, *device_and_dtype(args))
    block = None if args.no_block else timm_attention(run.report)
    all_cases = cases(args)
    tasks = task_order(all_cases, [] if block is None else all_cases)
    run.report["planned"] = [f"{kind} N={n} B={b} H={h}" for kind, n, b, h in tasks]
    save(run)
    measure_tasks(run, tasks, block)
    record_kernel_choices(run.report)
    save(run)
    return run.finish(run.report["kernel"] + run.report["block"], markdown, "Triton")


def device_and_dtype(args):
    """cuda and --dtype; --smoke: the CPU, float32 (the interpreter's bf16 dots are wrong) and shapes in the
    seconds range (args changed to say so). Sets args.preset_cases: --preset's rows, kept in the report's args."""
    import torch
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    dev = "cuda"
    if args.smoke:
        dev, dtype, args.dtype = "cpu", torch.float32, "fp32"
        args.sizes, args.extra, args.heads, args.tokens = [17, 40], ["17x3"], 2, 64
    # --preset da: Depth Anything's rows; --smoke keeps their layout (varying heads, two batches) at toy sizes
    args.preset_cases = ([(17, 1, 1), (17, 3, 2)] if args.smoke else list(DA_CASES)) if args.preset else []
    return dev, dtype


def start_run(args, device, dtype):
    run = harness.KernelBenchmark("attention", args, device, dtype, dtype=args.dtype,
                                  heads=sorted({c[2] for c in cases(args)}) if args.preset else args.heads,
                                  head_dim=args.head_dim, preset=args.preset)
    run.report.update(kernel=[], block=[])
    return run


def timm_attention(report):
    """timm's Attention class for the block table; None (and a note) when timm is not installed."""
    try:
        from timm.layers import Attention
    except ImportError:
        report["notes"].append("timm not installed: no block table")
        return None
    return Attention


def save(run):
    """The rows in token order, then the JSON."""
    for table in ("kernel", "block"):
        run.report[table].sort(key=lambda r: (r["tokens"], -r["batch"], r["heads"]))
    run.save()


def measure_tasks(run, tasks, block):
    """Each (kind, tokens, batch, heads) task in order, through run.attempt (a failing row is noted and the run
    goes on); none starts after --budget-s."""
    args = run.args
    for kind, tokens, batch, heads in tasks:
        label = f"{kind} N={tokens} B={batch} H={heads}"
        if run.elapsed() > args.budget_s:
            run.report["notes"].append(f"skipped: time budget (--budget-s {args.budget_s:.0f}) spent: {label}")
            print(f"[budget] skipped {label}", flush=True)
            save(run)
            continue
        run.attempt(label, lambda: (kernel_row(run, tokens, batch, heads) if kind == "kernel"
                                    else block_row(run, tokens, batch, heads, block)))
        save(run)


def record_kernel_choices(report):
    """The configs the autotuner chose and which kernels launched (the TMA or the pointer ones)."""
    from dpt_fast.kernels import attention as kernels
    report["autotuned_configs"] = {  # {kernel: {(N, head dim, dtypes...): chosen config}}
        name: {str(key): str(cfg) for key, cfg in getattr(getattr(kernels, name, None), "cache", {}).items()}
        for name in ("_attention_fwd", "_attention_bwd_dkdv", "_attention_bwd_dq",
                     "_attention_fwd_tma", "_attention_bwd_dkdv_tma", "_attention_bwd_dq_tma")}
    report["attention_kernel_launches"] = kernels.kernel_launches()  # whether the TMA or the pointer kernels ran


def tflops(flop, ms):
    return flop / (ms * 1e-3) / 1e12


def time_variant(run, make, grad):
    """make() -> (forward callable, leaves). Returns {fwd, bwd, fwd_bwd} in ms and one forward output."""
    import torch
    fwd, leaves = make()
    with torch.no_grad():
        out_ref = fwd()  # warm-up: Triton autotuning / backend selection happen here
    out = fwd()
    torch.autograd.grad(out, leaves, grad)  # warm-up of the backward (autotuning)
    res = {}
    with torch.no_grad():
        res["fwd"] = harness.median_ms(fwd, run.device)
    out = fwd()
    res["bwd"] = harness.median_ms(lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True), run.device)
    out = None
    res["fwd_bwd"] = harness.median_ms(lambda: torch.autograd.grad(fwd(), leaves, grad), run.device)
    return res, out_ref


def kernel_row(run, tokens, batch, heads):
    """One kernel-table row: ours and every SDPA backend on the same packed qkv, their TFLOP/s, the best SDPA
    backend per pass, and the forward outputs compared."""
    import torch
    head_dim = run.args.head_dim
    qkv = torch.randn(batch, tokens, 3 * heads * head_dim, device=run.device, dtype=run.dtype)
    grad = torch.randn(batch, tokens, heads * head_dim, device=run.device, dtype=run.dtype)
    flop = attention_flops(batch, tokens, heads, head_dim)
    row = {"tokens": tokens, "batch": batch, "heads": heads, "flops": flop, "ms": {}, "tflops": {}, "errors": {}}
    outputs = {"dpt_fast": time_ours(run, row, qkv, grad, heads)}
    for name in SDPA_BACKENDS:
        out = time_sdpa(run, row, name, qkv, grad)
        if out is not None:
            outputs[name] = out
    summarise_kernel_row(row, flop, outputs, run.ceilings["matmul_tflops"])
    run.report["kernel"].append(row)
    print(f"N={tokens} B={batch} H={heads}: ours fwd {row['tflops']['dpt_fast']['fwd']} TFLOP/s, "
          f"vs best SDPA {row['vs_best_sdpa']}" + harness.fused_path_remark(row), flush=True)


def time_ours(run, row, qkv, grad, heads):
    """dpt_fast.ops.attention on the fused backend: row["ms"]["dpt_fast"] and what served it. Returns the
    forward output."""
    import dpt_fast
    from dpt_fast import ops

    def make_ours():
        x = qkv.clone().requires_grad_(True)
        return (lambda: ops.attention(x, heads)), [x]

    dpt_fast.implementations_ran(reset=True)
    with dpt_fast.use_backend("fused"):
        times, ours_out = time_variant(run, make_ours, grad)
    run.account(row, dpt_fast.implementations_ran(reset=True), OPS_REQUIRED)
    row["ms"]["dpt_fast"] = times
    return ours_out


def math_blocker(run, batch, tokens, heads):
    """Why the math backend is not run for this shape (its N^2 fp32 tensors), or None."""
    import torch
    need = 16 * batch * heads * tokens * tokens  # fp32 scores, probabilities and their grads
    free = torch.cuda.mem_get_info()[0] if run.device == "cuda" else 2**34
    if tokens > run.args.math_max_tokens or need > 0.6 * free:
        return f"not run: N^2 scores need ~{need / 2**30:.0f} GiB (free {free / 2**30:.0f})"
    return None


def time_sdpa(run, row, name, qkv, grad):
    """One SDPA backend on strided q, k, v views of the packed qkv (contiguous copies when it refuses the
    views): row["ms"][name], or row["errors"][name] saying why not. Returns the forward output as
    [B, N, H*D], or None."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    batch, tokens, heads, head_dim = row["batch"], row["tokens"], row["heads"], run.args.head_dim
    if name == "math":
        blocker = math_blocker(run, batch, tokens, heads)
        if blocker:
            row["errors"][name] = blocker
            return None
    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]

    def make_sdpa(contiguous):
        views = qkv.view(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        # strided views of the packed qkv, as timm's split leaves them (or [B, H, N, D] copies)
        q, k, v = ((t.contiguous() if contiguous else t).detach().requires_grad_(True) for t in views)

        def fwd():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)
        return fwd, [q, k, v]

    sdpa_grad = grad.view(batch, tokens, heads, head_dim).transpose(1, 2)
    out = None
    for contiguous in (False, True):  # a backend refusing the strided views gets contiguous q, k, v
        try:
            times, out = time_variant(run, lambda: make_sdpa(contiguous), sdpa_grad)
            if contiguous:
                row["errors"][name + "_strided"] = "refused strided q/k/v views; timed on contiguous copies"
            break
        except (RuntimeError, torch.cuda.OutOfMemoryError) as err:  # backend cannot serve this input
            row["errors"][name] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            harness.empty_cache(run.device)
    if out is None:
        return None
    row["errors"].pop(name, None)
    row["ms"][name] = times
    return out.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


def summarise_kernel_row(row, flop, outputs, peak):
    """TFLOP/s of every variant, the best SDPA backend per pass and ours against it, the fraction of the
    matmul peak, and each SDPA forward output's largest difference from ours (bf16 rounding level expected)."""
    import torch
    for variant, times in row["ms"].items():
        row["tflops"][variant] = {m: round(tflops(flop[m], t), 1) for m, t in times.items()}
    sdpa_rows = {k: v for k, v in row["ms"].items() if k != "dpt_fast"}
    row["best_sdpa"], row["vs_best_sdpa"] = {}, {}
    for mode in ("fwd", "bwd", "fwd_bwd"):
        if sdpa_rows:
            best = min(sdpa_rows, key=lambda k: sdpa_rows[k][mode])
            row["best_sdpa"][mode] = best
            row["vs_best_sdpa"][mode] = round(sdpa_rows[best][mode] / row["ms"]["dpt_fast"][mode], 3)
    row["fraction_of_matmul_peak"] = {m: (round(row["tflops"]["dpt_fast"][m] / peak, 3) if peak else None)
                                      for m in flop}
    row["max_abs_diff_vs_dpt_fast"] = {k: (v.float() - outputs["dpt_fast"].float()).abs().max().item()
                                       for k, v in outputs.items() if k != "dpt_fast"}
    row["dpt_fast_output_finite"] = bool(torch.isfinite(outputs["dpt_fast"]).all())


def block_row(run, tokens, batch, heads, Attention):
    """One block-table row: timm's Attention (SDPA) against the same weights run as qkv Linear ->
    dpt_fast.ops.attention -> proj, forward and forward+backward."""
    import torch

    import dpt_fast
    from dpt_fast import ops
    dev, dtype, head_dim = run.device, run.dtype, run.args.head_dim
    dim = heads * head_dim
    attn = Attention(dim, num_heads=heads, qkv_bias=True).to(device=dev, dtype=dtype)
    attn.fused_attn = True
    params = list(attn.parameters())
    x0 = torch.randn(batch, tokens, dim, device=dev, dtype=dtype)
    grad = torch.randn(batch, tokens, dim, device=dev, dtype=dtype)
    flop = block_flops(batch, tokens, heads, head_dim)
    row = {"tokens": tokens, "batch": batch, "heads": heads, "flops": flop, "ms": {}}

    def ours(x):
        return attn.proj(ops.attention(attn.qkv(x), attn.num_heads, attn.scale))

    outs = {}
    for name, fn in (("timm", attn), ("dpt_fast", ours)):
        x = x0.clone().requires_grad_(True)
        dpt_fast.implementations_ran(reset=True)
        with dpt_fast.use_backend("fused"):
            with torch.no_grad():
                outs[name] = fn(x)
            torch.autograd.grad(fn(x), [x, *params], grad)  # warm-up
            with torch.no_grad():
                fwd = harness.median_ms(lambda: fn(x), dev)
            fwd_bwd = harness.median_ms(lambda: torch.autograd.grad(fn(x), [x, *params], grad), dev)
        if name == "dpt_fast":
            run.account(row, dpt_fast.implementations_ran(reset=True), OPS_REQUIRED)
        row["ms"][name] = {"fwd": fwd, "fwd_bwd": fwd_bwd}
    row["tflops"] = {k: {m: round(tflops(flop[m], t), 1) for m, t in v.items()} for k, v in row["ms"].items()}
    row["speedup_vs_timm"] = {m: round(row["ms"]["timm"][m] / row["ms"]["dpt_fast"][m], 3)
                              for m in ("fwd", "fwd_bwd")}
    row["max_abs_diff_vs_timm"] = (outs["dpt_fast"].float() - outs["timm"].float()).abs().max().item()
    run.report["block"].append(row)
    print(f"block N={tokens} B={batch} H={heads}: speedup vs timm {row['speedup_vs_timm']}"
          + harness.fused_path_remark(row), flush=True)


def _pct(value):
    return "-" if value is None else f"{value:.0%}"


def markdown(report):
    lines = [f"Attention, {report['device']}, {report['dtype']}, H={report['heads']}, D={report['head_dim']}; "
             f"torch {report['versions']['torch']}, triton {report['versions']['triton']}, {report['date']}; "
             f"measured {report['dtype']} matmul peak {report['matmul_peak_tflops']} TFLOP/s",
             "",
             "| N | B | H | pass | dpt_fast TFLOP/s | flash | efficient | cudnn | math | best SDPA | ours / best | of peak |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["kernel"]:
        for mode in ("fwd", "bwd", "fwd_bwd"):
            cells = [str(row["tflops"].get(v, {}).get(mode, "-")) for v in ("dpt_fast",) + SDPA_BACKENDS]
            lines.append(f"| {row['tokens']} | {row['batch']} | {row.get('heads', report['heads'])} | {mode} | "
                         + " | ".join(cells)
                         + f" | {row['best_sdpa'].get(mode, '-')} | {row['vs_best_sdpa'].get(mode, '-')}x"
                         + f" | {_pct(row['fraction_of_matmul_peak'][mode])} |"
                         + ("" if row["fused_path"]["verified"] else " (reference ran)"))
    if report["block"]:
        lines += ["", "Attention block (qkv Linear -> attention -> proj) vs timm Attention (fused_attn, SDPA)", "",
                  "| N | B | H | pass | timm ms | dpt_fast ms | speedup |", "|---|---|---|---|---|---|---|"]
        for row in report["block"]:
            for mode in ("fwd", "fwd_bwd"):
                lines.append(f"| {row['tokens']} | {row['batch']} | {row.get('heads', report['heads'])} | {mode} | "
                             f"{row['ms']['timm'][mode]:.3f} | "
                             f"{row['ms']['dpt_fast'][mode]:.3f} | {row['speedup_vs_timm'][mode]}x |"
                             + ("" if row["fused_path"]["verified"] else " (reference ran)"))
    return "\n".join(lines + harness.note_lines(report))


if __name__ == "__main__":
    sys.exit(main())
