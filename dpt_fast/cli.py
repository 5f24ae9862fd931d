"""The `dpt-fast` command: `predict` (batch inference), `bench` (end-to-end benchmark), `train`.

    dpt-fast predict photos/ -o depth/ --model dpt_hybrid-midas-501f0c75.pt
    torchrun --standalone --nproc-per-node 8 --no-python dpt-fast predict photos/ -o depth/ --model ...
    dpt-fast bench --models large,hybrid --sizes 384,1536,4k --out benchmarks/results
    dpt-fast train --help
    dpt-fast export dpt_hybrid-midas-501f0c75.pt -o dpt_hybrid.onnx --check
"""
from __future__ import annotations

import argparse
import sys

from .cli_args import COMMANDS


def _parser() -> argparse.ArgumentParser:
    """The command line, built without importing PyTorch (`--help` and `--version` answer at once)."""
    from . import __version__, cli_args
    parser = argparse.ArgumentParser(
        prog="dpt-fast", description="Dense Prediction Transformer with fused kernels.",
        epilog="Run 'dpt-fast COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"dpt-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from . import predict
    predict.add_arguments(sub.add_parser("predict", help=COMMANDS["predict"], description=predict.__doc__.split("\n\n")[0]))
    cli_args.add_bench_arguments(sub.add_parser("bench", help=COMMANDS["bench"],
                                                description=cli_args.BENCH_DESCRIPTION))
    sub.add_parser("train", help=COMMANDS["train"], add_help=False)
    from . import export_cli
    export_cli.add_arguments(sub.add_parser("export", help=COMMANDS["export"], description=export_cli.DESCRIPTION))
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":  # train owns its whole command line
        from .cli_args import train_parser
        train_parser().parse_args(argv[1:])  # --help and usage errors answer here, before PyTorch is imported
        from . import train
        return train.main(argv[1:]) or 0
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command == "predict":
        from . import predict
        try:
            return predict.run(args)
        except predict.UsageError as e:
            print(f"dpt-fast predict: {e}", file=sys.stderr)
            return 2
    if args.command == "bench":
        from . import bench
        return bench.run(args)
    if args.command == "export":
        from . import export_cli
        return export_cli.run(args)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
