"""The `dpt-fast` subcommands' command-line arguments, importing nothing but argparse.

Building the parser must not import PyTorch (seconds), so that `dpt-fast --help`, `--version` and
`dpt-fast COMMAND --help` answer at once. Each command's module (bench.py, predict.py, train.py) takes its
`add_arguments` from here and imports the heavy libraries only when it runs.
"""
from __future__ import annotations

import argparse

COMMANDS = {
    "predict": "depth or segmentation maps for files, folders and globs (multi-GPU with torchrun)",
    "bench": "end-to-end benchmark: dpt-fast against the reference, torch.compile and Hugging Face DPT",
    "train": "train or fine-tune a DPT model (see dpt-fast train --help)",
    "export": "export a model to ONNX or a torch.export program (dynamic batch and size), checked against eager",
}

# --- bench ---------------------------------------------------------------------------------------

BENCH_DESCRIPTION = ("`dpt-fast bench`: end-to-end DPT latency, throughput, memory and FLOP/s, dpt-fast "
                     "against the baselines.")
# the architectures `dpt-fast bench --models` knows: name -> DPTDepthModel arguments
BENCH_MODELS = {
    "large": {"backbone": "vitl16_384"},
    "hybrid": {"backbone": "vitb_rn50_384"},
    "base": {"backbone": "vitb16_384"},
    "tiny": {"backbone": "vit_tiny_patch16_224", "hooks": [2, 5, 8, 11], "features": 32},
}
BENCH_VARIANTS = ("fused", "reference", "reference+compile", "fused+compile", "hf-sdpa")
BENCH_TINY_DEFAULTS = {"models": "tiny", "sizes": "64,96", "batch": "2", "warmup": 2, "runs": 7}
BENCH_DTYPES = ("bf16", "fp16", "fp32")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default=None, help=f"comma-separated, from {','.join(BENCH_MODELS)} "
                        "(default large,hybrid; tiny with --tiny)")
    parser.add_argument("--sizes", default=None, help="comma-separated: N (square), HxW, 4k, 1080p; "
                        "optionally SIZE:BATCH (default 384,1024,1536,4k)")
    parser.add_argument("--batch", default=None, help="batch size for all sizes, or one per size "
                        "(default 16 up to 384x384, else 1)")
    parser.add_argument("--skip", default=None, help="comma-separated MODEL@SIZE pairs not to run, SIZE as "
                        "given to --sizes without its batch (e.g. hybrid@4k)")
    parser.add_argument("--train", action="store_true", help="time a training step (forward + backward) "
                        "instead of inference")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=BENCH_DTYPES, help="default bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--threads", type=int, default=None, help="CPU runs: intra-op threads (default 1: "
                        "a parallel region waits for its slowest thread, so on a machine whose cores are "
                        "shared, more threads make every timing slower by an unpredictable factor)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON, table and plot")
    parser.add_argument("--tiny", action="store_true", help="small settings that run on a CPU in seconds: "
                        f"model tiny, sizes {BENCH_TINY_DEFAULTS['sizes']}, batch {BENCH_TINY_DEFAULTS['batch']}, "
                        f"{BENCH_TINY_DEFAULTS['warmup']} warm-up and {BENCH_TINY_DEFAULTS['runs']} timed calls")
    parser.add_argument("--variants", default=None, help=f"comma-separated, from {','.join(BENCH_VARIANTS)} "
                        "(default: all; the compile variants only on CUDA unless named here)")
    parser.add_argument("--compile-mode", default="max-autotune", help="torch.compile mode of the compile "
                        "variants (default max-autotune)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls before timing (default 3)")
    parser.add_argument("--runs", type=int, default=None, help="timed calls at most (default 50)")
    parser.add_argument("--max-time", type=float, default=10.0, help="stop timing a variant after this many "
                        "seconds (at least 3 runs; default 10)")
    parser.add_argument("--budget-s", type=float, default=None, help="time budget of the whole run: variants "
                        "that would start later are recorded as skipped, a running one is stopped at it "
                        "(default: none). Order: fused and hf-sdpa of every configuration, then "
                        "reference+compile, reference, fused+compile")
    parser.add_argument("--compile-timeout-s", type=float, default=None, help="cap on a compiled variant's "
                        "first call (compilation and autotuning); over it the variant is recorded as skipped "
                        "(default: none)")
    parser.add_argument("--compile-fallback-mode", default=None, help="torch.compile mode to retry with when "
                        "--compile-mode runs over --compile-timeout-s (e.g. default); the row names the mode used")
