"""The `dpt-fast` subcommands' command-line arguments, importing nothing but argparse.

Building the parser must not import PyTorch (seconds), so that `dpt-fast --help`, `--version` and
`dpt-fast COMMAND --help` answer at once. bench.py and train.py, which import PyTorch at the top, take their
`add_arguments` from here; predict.py and export_cli.py define theirs in modules that import PyTorch only
when the command runs.
"""
from __future__ import annotations

import argparse

from .backend import BACKENDS  # the operator backends' names (backend.py imports only the standard library)

COMMANDS = {
    "predict": "depth or segmentation maps for files, folders and globs (multi-GPU with torchrun)",
    "bench": "end-to-end benchmark: dpt-fast against the reference, torch.compile and Hugging Face (DPT, Depth Anything)",
    "train": "train or fine-tune a DPT model (see dpt-fast train --help)",
    "export": "export a model to ONNX or a torch.export program (dynamic batch and size), checked against eager",
}

# --- bench ---------------------------------------------------------------------------------------

BENCH_DESCRIPTION = ("`dpt-fast bench`: end-to-end DPT latency, throughput, memory and FLOP/s, dpt-fast "
                     "against the baselines.")
# the architectures `dpt-fast bench --models` knows: name -> the constructor arguments of DPTDepthModel
# ("backbone": an entry of dpt_fast.specs by its DPT backbone name, or a timm ViT) or of DepthAnythingModel
# ("arch": an entry of dpt_fast.specs); widths, taps and patch size come from dpt_fast.specs.
BENCH_MODELS = {
    "large": {"backbone": "vitl16_384"},
    "hybrid": {"backbone": "vitb_rn50_384"},
    "base": {"backbone": "vitb16_384"},
    "tiny": {"backbone": "vit_tiny_patch16_224", "hooks": [2, 5, 8, 11], "features": 32},
    "da2-small": {"arch": "da2-small"},
    "da2-base": {"arch": "da2-base"},
    "da2-large": {"arch": "da2-large"},
    # a Depth Anything V2 of four 64-wide blocks (one head of 64, what the fused attention runs), for CPU runs
    "da2-tiny": {"arch": "da2-small", "taps": [0, 1, 2, 3], "out_channels": [16, 24, 32, 48], "features": 32,
                 "head_hidden": 16, "vit_kwargs": {"embed_dim": 64, "depth": 4, "num_heads": 1}},
}
BENCH_VARIANTS = ("fused", "reference", "reference+compile", "fused+compile", "hf-sdpa")
BENCH_TINY_DEFAULTS = {"models": "tiny,da2-tiny", "sizes": "64,96", "batch": "2", "warmup": 2, "runs": 7}
BENCH_DTYPES = ("bf16", "fp16", "fp32")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default=None, help=f"comma-separated, from {','.join(BENCH_MODELS)} "
                        "(default large,hybrid; tiny,da2-tiny with --tiny). Depth Anything sizes are multiples of 14: "
                        "518:1,518:16,1022x1918:1")
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
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON, table and plot "
                        "(default benchmarks/results)")
    parser.add_argument("--tiny", action="store_true", help="small settings that run on a CPU in seconds: "
                        f"models {BENCH_TINY_DEFAULTS['models']}, sizes {BENCH_TINY_DEFAULTS['sizes']}, batch {BENCH_TINY_DEFAULTS['batch']}, "
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


# --- train -------------------------------------------------------------------------------------

TRAIN_DESCRIPTION = ("Training and fine-tuning DPT: `dpt-fast train ...` (or `python -m dpt_fast.train ...`) "
                     "and `train()`.")
TRAIN_DEPTH_LOSSES = ("ssitrim", "ssimse", "silog")
TRAIN_IGNORE_INDEX = 255  # dpt_fast.data.IGNORE_INDEX (tests/test_cli.py checks that they agree)


def int_list(text: str) -> list[int]:
    return [int(v) for v in str(text).replace(" ", "").split(",") if v]


def features_arg(text: str):
    values = int_list(text)
    return values[0] if len(values) == 1 else values


def float_tuple(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in str(text).split(","))


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `dpt-fast train` flags. Defaults given as None are resolved per task (dpt_fast.train.TASK_DEFAULTS)."""
    data = parser.add_argument_group("data")
    data.add_argument("--data", action="append", metavar="SRC",
                      help="required for a new run: 'synthetic' (or 'synthetic:N' samples) or a dataset folder "
                           "(layout: dpt_fast.data); repeat to mix datasets (each drawn with equal probability)")
    data.add_argument("--task", choices=("depth", "segmentation"), default="depth", help="what to train")
    data.add_argument("--size", type=int, help="square crop side, a multiple of the model's input multiple (32 "
                                               "DPT, 14 Depth Anything; default 384 DPT depth, 480 segmentation, "
                                               "518 Depth Anything)")
    data.add_argument("--scale-range", type=float_tuple, metavar="LO,HI",
                      help="random rescaling of the resized image (default 1,1 depth; 0.5,2 segmentation)")
    data.add_argument("--no-flip", dest="flip", action="store_false", help="disable random horizontal flips")
    data.add_argument("--num-classes", type=int, help="segmentation classes (default: the init model's, or 8 "
                                                      "for synthetic data)")
    data.add_argument("--ignore-index", type=int, default=TRAIN_IGNORE_INDEX,
                      help="segmentation label value that the loss skips")
    data.add_argument("--num-workers", type=int, help="data loader processes per training process "
                                                     "(default: 4, at most the CPU count)")

    model = parser.add_argument_group("model")
    model.add_argument("--backbone", default="vitb_rn50_384",
                       help="vitb_rn50_384 (DPT-Hybrid), vitl16_384 (DPT-Large), vitb16_384, or any timm ViT "
                            "name together with --hooks")
    model.add_argument("--hooks", type=int_list, metavar="I,J,K,L",
                       help="four block indices to tap (default: the named backbone's or --arch's; with --init of a "
                            "Depth Anything file whose encoder is none of the released sizes, its taps)")
    model.add_argument("--features", type=features_arg, default=256, metavar="N|A,B,C,D",
                       help="fusion width (int), or the four Reassemble widths")
    model.add_argument("--fusion-features", type=int, metavar="N",
                       help="fusion width when --features lists the Reassemble widths (default 256)")
    model.add_argument("--readout", choices=("ignore", "add", "project"), default="project",
                       help="how the class token enters the Reassemble stages")
    model.add_argument("--init", metavar="PATH",
                       help="checkpoint to fine-tune from (original DPT .pt or Depth Anything .pth, Hugging Face "
                            "folder, dpt_fast folder or a training checkpoint), loaded with dpt_fast.load_model")
    model.add_argument("--arch", metavar="NAME",
                       help="build a fresh, randomly initialised model of a dpt_fast.specs architecture instead "
                            "of --backbone, e.g. da2-small or da2-metric-hypersim-small (Depth Anything; "
                            "smoke tests: real training starts from --init)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--steps", type=int, default=1000,
                       help="total optimiser steps of the run (with --resume: a larger value extends it)")
    optim.add_argument("--batch-size", type=int, default=16, help="global batch, split over the processes")
    optim.add_argument("--lr", type=float, help="decoder learning rate (default 1e-4 DPT depth, 2e-3 segmentation, "
                                                "5e-5 Depth Anything)")
    optim.add_argument("--backbone-lr", type=float, help="encoder learning rate (default lr/10)")
    optim.add_argument("--optimizer", choices=("adam", "adamw", "sgd"),
                       help="optimiser (default adam DPT depth, sgd segmentation, adamw Depth Anything)")
    optim.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    optim.add_argument("--weight-decay", type=float, help="weight decay (default 0 DPT depth, 1e-4 segmentation, "
                                                          "0.01 Depth Anything)")
    optim.add_argument("--schedule", choices=("constant", "poly"),
                       help="learning-rate schedule (default constant DPT depth, poly segmentation and Depth "
                            "Anything)")
    optim.add_argument("--poly-power", type=float, default=0.9, help="exponent of the poly schedule")
    optim.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps")
    optim.add_argument("--clip-grad", type=float, default=0.0, help="clip the gradient norm (0: off)")
    optim.add_argument("--depth-loss", choices=TRAIN_DEPTH_LOSSES, default="ssitrim",
                       help="ssitrim (paper), ssimse, or silog for metric fine-tuning (default silog for metric "
                            "Depth Anything models, ssitrim otherwise)")
    optim.add_argument("--grad-loss-weight", type=float, default=0.5,
                       help="gradient-matching weight alpha (0: off; default 0 for metric Depth Anything models, "
                            "0.5 otherwise)")
    optim.add_argument("--aux-weight", type=float, default=0.2, help="segmentation auxiliary-head loss weight")
    optim.add_argument("--align-samples", type=int, default=64,
                       help="silog: samples used to estimate the metric alignment of the initial model")

    run = parser.add_argument_group("run")
    run.add_argument("--out", default="runs/dpt", help="output folder")
    run.add_argument("--resume", nargs="?", const="auto", metavar="CKPT",
                     help="continue from OUT/checkpoint.pt (or CKPT; OUT is then its folder unless --out) exactly "
                          "where it stopped, with the recorded settings (only --steps and the options of how it "
                          "runs may change)")
    run.add_argument("--save-every", type=int, default=1000, help="checkpoint every N steps (0: only at the end)")
    run.add_argument("--log-every", type=int, default=10, help="metrics.jsonl line every N steps")
    run.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the data stream")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (torchrun: cuda:LOCAL_RANK)")
    run.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                     help="bf16 autocast (auto: bf16 on CUDA, fp32 on CPU)")
    run.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                     help="channels_last memory format for convolutions (default: on)")
    run.add_argument("--grad-checkpointing", action="store_true",
                     help="activation checkpointing of the transformer blocks (less memory, more compute)")
    run.add_argument("--backend", choices=BACKENDS, default="fused", help="dpt_fast operator backend")
    run.add_argument("--compile", action="store_true", help="torch.compile the model")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="progress bar (default: when stderr is a terminal)")
    return parser


class TrainHelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" only where the help text does not state the default itself, and not for
    on/off switches or defaults resolved later (None: per task, from the backbone, the environment)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or not action.option_strings or action.default is None
                or action.default is argparse.SUPPRESS or isinstance(action.default, bool)):
            return text
        return text + " (default: %(default)s)"


def train_parser() -> argparse.ArgumentParser:
    """The `dpt-fast train` command line (dpt_fast.train parses with it; `--help` needs no torch)."""
    return add_train_arguments(argparse.ArgumentParser(
        prog="dpt-fast train", description=TRAIN_DESCRIPTION, formatter_class=TrainHelpFormatter,
        epilog="exit status: 0 done, 1 failed (e.g. a non-finite loss), 2 usage error (options, output "
               "folder, data), 130 interrupted (checkpoint saved; continue with --resume)"))
