"""`dpt-fast export`: the command line of dpt_fast.export (arguments built without importing PyTorch).

    dpt-fast export MODEL -o FILE [--format onnx|pt2] [--dtype float32|float16] [--opset N] [--aoti] [--check]

Exit status: 0 written (and, with --check, within tolerance); 1 the check found the exported model
further from eager PyTorch than the dtype's tolerance; 2 bad arguments, a model that cannot be read,
or a model (part) that cannot be exported (the message names it); 130 interrupted (the output file is
only ever replaced whole).
"""
from __future__ import annotations

import argparse
import sys

DESCRIPTION = ("Export a model to ONNX or a torch.export program with dynamic batch, height and width, "
               "optionally checked against eager PyTorch at sizes it was not traced at.")
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="checkpoint: anything dpt_fast.load_model reads (an "
                        "original release .pt/.pth, a Hugging Face folder, a dpt_fast folder)")
    parser.add_argument("-o", "--out", required=True, metavar="FILE", help="output file (.onnx or .pt2)")
    parser.add_argument("--format", choices=("onnx", "pt2"), default=None,
                        help="onnx, or pt2 (a torch.export program); default from FILE's suffix, else onnx")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                        help="weights and input/output dtype of the exported model (default float32)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset, 18 or newer (default 18)")
    parser.add_argument("--aoti", action="store_true",
                        help="with --format pt2: an AOTInductor package (compiled now; runs without dpt_fast)")
    parser.add_argument("--check", action="store_true",
                        help="run the exported model at sizes other than the traced one and compare with eager "
                             f"PyTorch; exit {EXIT_CHECK_FAILED} when over the dtype's tolerance")


def run(args: argparse.Namespace) -> int:
    prog = "dpt-fast export"
    from . import export
    from .weights import load_model
    try:
        model = load_model(args.model)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        print(f"{prog}: cannot load {args.model}: {export.first_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = export.export(model, args.out, format=args.format, dtype=export.DTYPES[args.dtype],
                               opset=args.opset, aoti=args.aoti, check=args.check, progress=True)
    except export.ExportError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (the output file is only ever replaced whole)", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"{result.path}: {result.format}, {args.dtype}; input image [B, 3, H, W], H and W multiples of "
          f"{result.input_multiple}; output {result.output_name}")
    if args.check and not result.check_passed:
        print(f"{prog}: the exported model differs from eager PyTorch beyond the tolerance "
              f"{export.TOLERANCE[result.dtype]:g}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    return 0
