"""Temporal consistency of a depth model on the library's synthetic camera moves, as a command.

    python -m dpt_fast.video.evaluate --model dpt_hybrid-midas-501f0c75.pt [--temporal-align] [--out report.json]

Loads the model with `dpt_fast.load_model`, renders the synthetic sequences (static, pan, dolly,
zoom; `dpt_fast.video.synthetic`), predicts every frame and prints, per motion, the numbers of
`dpt_fast.video.consistency.temporal_consistency` (flicker, temporal_error, true_change, abs_rel),
with and without temporal alignment when `--temporal-align` is given. Exit status: 0, or 2 for bad
arguments or a model that cannot be loaded (one-line message).
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys

import torch

from .consistency import evaluate_synthetic
from .stream import model_predictor
from .synthetic import MOTIONS


def evaluate_model(model: torch.nn.Module, size=0, motions=MOTIONS, num_frames: int = 12, height: int = 96,
                   width: int = 128, seed: int = 0, temporal_align: bool = False, device=None,
                   autocast_dtype=None) -> dict:
    """{"raw": {motion: metrics}, ["aligned": {...}]} for a single-image depth model."""
    predict = model_predictor(model, size=size, device=device, autocast_dtype=autocast_dtype)
    common = dict(motions=motions, num_frames=num_frames, height=height, width=width, seed=seed)
    report = {"raw": evaluate_synthetic(predict, **common)}
    if temporal_align:
        report["aligned"] = evaluate_synthetic(predict, temporal_align=True, **common)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpt_fast.video.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a checkpoint or folder dpt_fast.load_model reads")
    parser.add_argument("--size", type=int, default=0, help="network input size (default: the model family's)")
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--motions", default=",".join(MOTIONS), help=f"comma-separated, of {', '.join(MOTIONS)}")
    parser.add_argument("--temporal-align", action="store_true", help="also report with TemporalAligner")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="write the report as JSON here too")
    args = parser.parse_args(argv)
    motions = [m for m in args.motions.split(",") if m]
    bad = [m for m in motions if m not in MOTIONS]
    if bad or args.frames < 2 or args.height < 8 or args.width < 8:
        print(f"error: motions must be some of {', '.join(MOTIONS)}; --frames >= 2; --height/--width >= 8",
              file=sys.stderr)
        return 2
    import dpt_fast
    try:
        model = dpt_fast.load_model(args.model).to(args.device)
    except Exception as exc:  # the loaders' messages are one line and say what is wrong
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    report = evaluate_model(model, size=args.size, motions=motions, num_frames=args.frames, height=args.height,
                            width=args.width, seed=args.seed, temporal_align=args.temporal_align, device=args.device)
    report["settings"] = {**vars(args), "torch": torch.__version__,
                          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    text = json.dumps(report, indent=2, sort_keys=True)
    print(text)
    if args.out:
        from ..image_io import atomic_write_bytes
        atomic_write_bytes(args.out, text.encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
