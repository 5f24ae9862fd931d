"""`dpt-fast predict`: DPT or Depth Anything over images and videos (files, folders, globs).

The command-line layer over dpt_fast.inference (images; it does the work and documents the pipeline)
and dpt_fast.video.batch (videos and --sequence folders of frames): argument checks, model loading,
messages, signals and exit statuses.

Exit status: 0 everything written (or already done); 1 some input failed (unreadable, too large, out
of memory even in tiles; a video that cannot be decoded) or was a conflict (its output name holds a
file dpt-fast did not write);
2 a usage error (bad option, missing or empty input, unloadable model: nothing was computed);
130 stopped by Ctrl-C (SIGINT), 143 stopped by SIGTERM: the images in flight are finished and
written, no temporary file stays, and running the same command again continues.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from datetime import timedelta
from pathlib import Path

from . import distributed
from .distributed import Place, process_place, rendezvous_set
from .specs import DPT_PREPROCESSING, DPT_SEGMENTATION_SIZE

SIZE_MULTIPLE = DPT_PREPROCESSING.multiple
DEPTH_SIZE, SEGMENTATION_SIZE = DPT_PREPROCESSING.size, DPT_SEGMENTATION_SIZE  # from specs: --help imports no torch

WEIGHTS_HELP = """\
--model is a checkpoint file or folder; any of these works:

  * an original release file (github.com/isl-org/DPT, "Releases"):
      dpt_large-midas-2f21e586.pt      depth, ViT-L/16
      dpt_hybrid-midas-501f0c75.pt     depth, ViT-Hybrid (ResNet-50 + ViT-B/16)
      dpt_hybrid_kitti-cb926ef4.pt     metric depth, KITTI
      dpt_hybrid_nyu-2ce69ec7.pt       metric depth, NYUv2
      dpt_large-ade20k-b12dca68.pt     segmentation, ADE20K (150 classes), ViT-L/16
      dpt_hybrid-ade20k-53898607.pt    segmentation, ADE20K, ViT-Hybrid
  * a Hugging Face DPT folder written by save_pretrained, e.g. of Intel/dpt-large,
    Intel/dpt-hybrid-midas or Intel/dpt-large-ade:
      python -c "from transformers import DPTForDepthEstimation as M; M.from_pretrained('Intel/dpt-large').save_pretrained('dpt-large')"
  * a folder written by dpt_fast.save_model.
  * Depth Anything (preprocessed as it was trained: ImageNet mean/std, multiples of 14, 518):
      depth_anything_v2_vit{s,b,l}.pth                  relative disparity
      depth_anything_v2_metric_hypersim_vit{s,b,l}.pth  depth in metres (max 20)
      depth_anything_v2_metric_vkitti_vit{s,b,l}.pth    depth in metres (max 80)
      depth_anything_vit{s,b,l}14.pth                   V1, relative disparity
      a transformers DepthAnythingForDepthEstimation folder (save_pretrained)
  * Video Depth Anything, for videos: video_depth_anything_vit{s,b,l}.pth (windows of 32 frames).

Example: dpt-fast predict photos/ -o depth/ --model dpt_hybrid-midas-501f0c75.pt
"""

DTYPES = ("bf16", "fp16", "fp32")

# Names kept importable from here; they live in dpt_fast.inference (loaded on first use: `--help`
# does not import torch).
_LIBRARY_NAMES = {"Job", "Predictor", "Writer", "ImageFiles", "OutputManifest", "UsageError", "collect_inputs",
                  "plan_jobs", "check_outputs", "shard", "write_outputs", "DEPTH_FORMATS", "SEGMENTATION_FORMATS",
                  "FORMAT_SUFFIX", "FALLBACK_TILE", "_tile_starts", "_ramp", "_OutOfMemory"}


def __getattr__(name):
    if name in _LIBRARY_NAMES:
        from . import inference
        return getattr(inference, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _usage_error(message: str):
    from .inference import UsageError
    return UsageError(message)


# --- options -------------------------------------------------------------------------------------

def parse_formats(text: str | None, segmentation: bool) -> tuple[str, ...]:
    from .inference import DEPTH_FORMATS, SEGMENTATION_FORMATS
    if not text:
        return ("png",) if segmentation else ("png16",)
    formats = tuple(dict.fromkeys(f.strip().lower() for f in text.split(",") if f.strip()))
    if segmentation:
        formats = tuple("png" if f == "palette" else f for f in formats)
        allowed = SEGMENTATION_FORMATS
    else:
        formats = tuple("png16" if f == "png" else f for f in formats)
        allowed = DEPTH_FORMATS
    bad = [f for f in formats if f not in allowed]
    if bad:
        kind = "segmentation" if segmentation else "depth"
        raise _usage_error(f"--format {','.join(bad)} is not a {kind} output; choose from {','.join(allowed)}")
    return formats


VIDEO_FORMATS = {"preview": "color", "video16": "depth16", "png16": "png16", "npy": "npy", "pfm": "pfm"}
DEFAULT_VIDEO_FORMATS = "preview,video16"


def parse_video_formats(text: str | None) -> tuple[str, ...]:
    """--format for videos -> dpt_fast.video.batch format names."""
    names = tuple(dict.fromkeys(f.strip().lower() for f in (text or DEFAULT_VIDEO_FORMATS).split(",") if f.strip()))
    bad = [f for f in names if f not in VIDEO_FORMATS]
    if bad or not names:
        raise _usage_error(f"--format {','.join(bad) or text!r} is not a video output; choose from "
                           f"{','.join(VIDEO_FORMATS)}")
    return tuple(VIDEO_FORMATS[f] for f in names)


def parse_size(text: str | None, segmentation: bool, default: int | None = None):
    if text is None:
        return SEGMENTATION_SIZE if segmentation else (default or DEPTH_SIZE)
    if text.lower() == "native":
        return None
    try:
        size = int(text)
    except ValueError:
        raise _usage_error(f"--size must be a number of pixels or 'native', got {text!r}") from None
    if size < SIZE_MULTIPLE:
        raise _usage_error(f"--size must be at least {SIZE_MULTIPLE}, got {size}")
    return size


def _place():
    """This process's place in the run (dpt_fast.distributed); garbage in torchrun's variables is a usage error."""
    from .inference import UsageError
    return process_place(error=UsageError)


def distributed_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment (1 process when unset)."""
    place = _place()
    return place.rank, place.world, place.local_rank


def _init_group(world: int) -> bool:
    """A gloo process group, only when there are several processes with a rendezvous address
    (torchrun sets it): used to agree on the exit status and to sum the counts at the end."""
    import torch.distributed as dist
    if world <= 1 or not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    if not rendezvous_set():
        return False
    # Ranks finish at different times; the final all_reduce must wait for the slowest shard.
    dist.init_process_group("gloo", timeout=timedelta(days=7))
    return True


def pick_device(requested: str | None, place: Place):
    """The device for --device (dpt_fast.distributed.pick_device: under torchrun, LOCAL_RANK modulo the visible GPUs);
    one it cannot use is a usage error."""
    from .inference import UsageError
    try:
        return distributed.pick_device(requested, place, error=UsageError)
    except UsageError as e:
        raise UsageError(f"--{e}") from None


def _default_workers(device, local_world: int) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type != "cuda":
        return 0  # decoding would compete with the model for the same cores
    return max(1, min(8, cpus // max(1, local_world) - 1))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = "%(prog)s INPUT [INPUT ...] -o OUT --model MODEL [options]"
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="image or video files, folders (searched recursively) or glob patterns; images and "
                        "videos go in separate calls")
    required = parser.add_argument_group("required")
    required.add_argument("-o", "--out", required=True, metavar="OUT",
                          help="output folder (input subfolders are kept)")
    required.add_argument("--model", "-m", metavar="MODEL",
                          help="checkpoint: an original DPT release .pt, a Depth Anything (V1, V2, metric) or Video "
                          "Depth Anything release .pth, a Hugging Face DPT or DepthAnything folder, or a "
                          "dpt_fast.save_model folder (e.g. a training run's OUT/model)")
    parser.add_argument("--size", default=None,
                        help="processing size: N (resized as the model's release does; default 384 for DPT depth, "
                        "518 for Depth Anything, 480 for segmentation) or 'native' (each image at its own resolution)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per batch (default 16 on CUDA "
                        "at a fixed size, 1 at native size or on CPU)")
    parser.add_argument("--dtype", default=None, choices=DTYPES,
                        help="compute dtype (default bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--format", default=None, help="comma-separated outputs; depth: png16 (default), pfm, "
                        "npy, color; segmentation: png (palette, default), npy, color; videos: preview (coloured "
                        "NAME-depth.mp4), video16 (16-bit NAME-depth.mkv), png16, npy, pfm (per frame in NAME/; "
                        "default preview,video16). Metric models write metres to pfm/npy")
    parser.add_argument("--overwrite", action="store_true", help="recompute outputs that are already up to "
                        "date (files in OUT that dpt-fast did not write are never replaced)")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default cuda when available; "
                        "under torchrun, cuda:LOCAL_RANK)")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="decoding processes per GPU process (default from the CPU count on CUDA, 0 on CPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--compile-mode", default="default",
                        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                        help="torch.compile mode with --compile (reduce-overhead and max-autotune use CUDA graphs)")
    parser.add_argument("--tile", type=int, default=None,
                        help="run images whose processed size exceeds N pixels in overlapping N x N tiles")
    parser.add_argument("--tile-overlap", type=float, default=0.25,
                        help="tile overlap as a fraction of --tile (default 0.25)")
    parser.add_argument("--label-offset", type=int, default=1, help="segmentation: label = class index + N "
                        "(default 1, as the original: ADE20K's ids, 0 meaning unlabelled; 0 gives class indices)")
    parser.add_argument("--max-pixels", type=int, default=None, help="refuse images of more pixels, checked "
                        "from the file's header before decoding (default 2**30 = 1073741824, about 1.07 gigapixels)")
    parser.add_argument("--backend", default="fused", choices=["fused", "reference"],
                        help="dpt_fast operator implementations (default fused: kernels where they apply)")
    parser.add_argument("--writers", type=int, default=2, help="writer threads (default 2)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar (default shown when stderr is a terminal)")
    video = parser.add_argument_group("videos")
    video.add_argument("--sequence", action="store_true", help="each folder INPUT is one video: its image files "
                       "(directly inside it, in natural order: frame2 before frame10) are the frames")
    video.add_argument("--temporal-align", action="store_true", help="single-frame models: fit each frame's "
                       "scale and shift to the previous frame (robust least squares) against flicker; it does "
                       "not track motion or fix shape errors")
    video.add_argument("--fps", type=float, default=None, help="frame rate of --sequence folders' output videos "
                       "(default 30; video files keep their own)")


# --- stopping ------------------------------------------------------------------------------------

class StopRequest(threading.Event):
    """Set by the first SIGINT or SIGTERM: the run ends after the images in flight (all computed
    predictions written). A second signal interrupts at once (KeyboardInterrupt); files stay whole."""

    signum: int | None = None


EXIT_FOR_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


def _say(message: str) -> None:
    print(f"dpt-fast predict: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _stop_on_signals():
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop  # signal handlers can only be installed from the main thread
        return

    def handle(signum, _frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.signum = signum
        stop.set()
        _say(f"{signal.Signals(signum).name}: stopping after the images in progress (send it again to stop at once)")

    previous = {s: signal.signal(s, handle) for s in EXIT_FOR_SIGNAL}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# --- the command ---------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    """The command; returns the exit status (see the module docstring)."""
    from . import use_backend
    with use_backend(args.backend), _stop_on_signals() as stop:  # both restored afterwards
        try:
            return _run(args, stop)
        except KeyboardInterrupt:  # a second signal (or one before the handlers were in place)
            _say("stopped at once; the files written are whole. Run the same command again to continue.")
            return EXIT_FOR_SIGNAL.get(stop.signum, 130)


def _check_options(args) -> None:
    if args.tile is not None and args.tile < 2 * SIZE_MULTIPLE:
        raise _usage_error(f"--tile must be at least {2 * SIZE_MULTIPLE}")
    if not 0 <= args.tile_overlap < 1:
        raise _usage_error("--tile-overlap must be in [0, 1)")
    if args.batch_size is not None and args.batch_size < 1:
        raise _usage_error("--batch-size must be at least 1")
    if args.max_pixels is not None and args.max_pixels < 1:
        raise _usage_error("--max-pixels must be at least 1")
    parse_size(args.size, False)  # a bad --size is reported before the model is loaded


def _training_folder_hint(model_path) -> str | None:
    """For `--model runs/tiny` where runs/tiny is a training run's output folder: where its model is."""
    path = Path(model_path).expanduser()
    if path.is_dir() and not (path / "config.json").exists() and (
            (path / "checkpoint.pt").exists() or (path / "model" / "config.json").exists()):
        if (path / "model").is_dir():
            return (f"{model_path} is a training run's output folder: its trained model is "
                    f"{path / 'model'} (use --model {path / 'model'})")
        return (f"{model_path} is a training run's output folder without a finished model/ yet (the run "
                f"writes {path / 'model'} when it ends; resume it with dpt-fast train --resume --out {model_path})")
    return None


def _load_model(args, device, dtype, log):
    """The model, or None after explaining (one line, or the weights help) why it cannot be loaded."""
    from .weights import load_model
    hint = _training_folder_hint(args.model)
    if hint:
        log(hint)
        return None
    try:
        return load_model(args.model, device=device, dtype=dtype)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
        print(f"dpt-fast predict: cannot read the model: {e}\n", file=sys.stderr)
        print(WEIGHTS_HELP, file=sys.stderr, end="")
    except ValueError as e:  # weights.CheckpointError and friends: the message says what did not fit
        log(f"cannot load the model {args.model}: {e}")
    return None


def _report(summary, log, rank: int, world: int) -> None:
    """Per-run lines: failures, conflicts, and the constant-output warning (named images)."""
    where = f" on rank {rank}" if world > 1 else ""
    if summary.failures:
        log(f"failed inputs{where}:\n" + "\n".join(f"  {src}: {why}" for src, why in summary.failures))
    if summary.constant:
        names = ", ".join(summary.constant[:5]) + (f" (+{len(summary.constant) - 5} more)"
                                                   if len(summary.constant) > 5 else "")
        log(f"warning: the model's output is the same value everywhere in {len(summary.constant)} image(s){where}: "
            f"{names}; an untrained or broken model?")


def _run(args: argparse.Namespace, stop: StopRequest) -> int:
    if not args.model:
        print("dpt-fast predict: --model is missing.\n\n" + WEIGHTS_HELP, file=sys.stderr, end="")
        return 2
    _check_options(args)
    out_dir = Path(args.out).expanduser()
    from . import inference
    place = _place()
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    reporter = inference.Reporter(prefix="dpt-fast predict: ", progress=show and place.main,
                                  desc=f"predict (rank 0 of {place.world})" if place.world > 1 else "predict")
    # inputs first: a usage error costs no model loading
    videos = _video_inputs(args, out_dir, reporter.log, inference)
    if videos is not None:
        return _run_videos(args, stop, videos, out_dir, reporter, show, place)
    if args.temporal_align or args.fps is not None:
        raise _usage_error(f"--{'temporal-align' if args.temporal_align else 'fps'} applies to videos; the inputs "
                           "are images (use --sequence to take folders of frames as videos)")
    try:
        items = inference.collect_images(args.inputs, out_dir, reporter=reporter, rank=place.rank)
    except inference.InputProblems as e:
        for arg, why in e.problems:
            reporter.log(f"{arg}: {why}")
        return 2
    return _run_images(args, stop, items, out_dir, reporter, place)


def _device_and_dtype(args, place: Place):
    """--device and --dtype: the device (made current, so that streams and events live where the work
    runs) and the compute dtype (default bf16 on CUDA, fp32 elsewhere)."""
    import torch
    device = pick_device(args.device, place)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    return device, dtype


def _run_images(args, stop: StopRequest, items, out_dir: Path, reporter, place: Place) -> int:
    """Images: the model loaded in the compute dtype, then dpt_fast.inference plans and runs them."""
    import torch

    from . import inference
    from .image_io import MAX_IMAGE_PIXELS
    log = reporter.log
    device, dtype = _device_and_dtype(args, place)
    model = _load_model(args, device, dtype, log)
    if model is None:
        return 2
    from .video.predictors import is_video_model
    if is_video_model(model):
        log(f"{args.model} is a Video Depth Anything model: it takes videos (video files, or folders of frames "
            "with --sequence), not single images")
        return 2
    segmentation = inference.is_segmentation(model)
    inference.keep_head_float32(model)  # as predict_images does: 16-bit PNGs of a 16-bit model not banded
    size = parse_size(args.size, segmentation, inference.model_preprocessing(model).size)
    formats = parse_formats(args.format, segmentation)
    batch_size = args.batch_size or (16 if device.type == "cuda" and size is not None else 1)
    jobs = inference.plan_images(args.inputs, out_dir, formats, items=items, rank=place.rank, world=place.world)
    grouped = _init_group(place.world)
    compiled = None
    if args.compile:
        compiled = torch.compile(model, mode=None if args.compile_mode == "default" else args.compile_mode)
    workers = args.num_workers if args.num_workers is not None else _default_workers(device, place.local_world)
    if stop.is_set():
        log("stopped before any image was processed")
        return EXIT_FOR_SIGNAL.get(stop.signum, 130)
    summary = inference.run_planned(
        model, jobs, out_dir, model_id=inference.file_fingerprint(args.model), device=device, dtype=dtype,
        size=size, segmentation=segmentation, batch_size=batch_size, tile=args.tile,
        tile_overlap=args.tile_overlap, overwrite=args.overwrite, num_workers=workers, writers=args.writers,
        compiled=compiled, label_offset=args.label_offset, max_pixels=args.max_pixels or MAX_IMAGE_PIXELS,
        reporter=reporter, stop=stop, single_process=place.world == 1)
    if summary.stopped:
        log(f"stopped: {summary.written} written, {summary.remaining} left, {len(summary.failures)} failed in "
            f"{summary.elapsed:.1f} s -> {out_dir}; run the same command again to continue")
        return EXIT_FOR_SIGNAL.get(stop.signum, 130)
    return _finish(summary, log, place.rank, place.world, grouped, out_dir)


def _video_inputs(args, out_dir: Path, log, inference):
    """The videos to run ([(video file or frame folder, relative name)]), or None when the inputs are
    images. Inputs holding both are refused (their outputs and options differ)."""
    from .input_files import collect_videos
    videos, problems = collect_videos(args.inputs, exclude=out_dir, sequence=args.sequence)
    if not args.sequence and not videos:
        return None
    if not args.sequence:
        from .image_io import is_image_name
        images = [item for item in inference.collect_inputs(args.inputs, exclude=out_dir)[0] if is_image_name(item[0])]
        if images:
            raise _usage_error(
                f"the inputs hold both images ({len(images)}, e.g. {images[0][0]}) and videos ({len(videos)}, e.g. "
                f"{videos[0][0]}): run images and videos in separate calls (folders of frames are taken as one "
                "video each with --sequence)")
    if problems:
        for arg, why in problems[:-1]:
            log(f"{arg}: {why}")
        raise _usage_error(f"{problems[-1][0]}: {problems[-1][1]}")
    inference.check_outputs([], args.inputs, out_dir)  # -o may not be an input folder
    return videos


def _video_output(model, model_path) -> tuple[bool, dict]:
    """(metric, manifest fields) of a model run over videos: Video Depth Anything's metric release files
    are named `metric_video_depth_anything_*` (same architecture, depth in metres)."""
    from .inference import model_output
    from .video.predictors import is_video_model
    if is_video_model(model):
        from .models.video_depth_anything import is_metric_release_file
        if is_metric_release_file(model_path):
            return True, {"output": "metric_depth", "unit": "m"}
        return False, {"output": "relative_disparity"}
    fields = model_output(model)
    return fields.get("output") == "metric_depth", fields


def _run_videos(args, stop: StopRequest, videos, out_dir: Path, reporter, show: bool, place: Place) -> int:
    """Videos (or --sequence folders of frames): one process per video, resumable per video."""
    import time

    from .input_files import plan_jobs
    from .video.batch import Source, predict_videos
    log = reporter.log
    started = time.perf_counter()
    _check_video_options(args)
    formats = parse_video_formats(args.format)
    device, dtype = _device_and_dtype(args, place)
    # Weights in float32 first: Video Depth Anything runs under autocast, single-frame models are cast.
    model = _load_model(args, device, None, log)
    if model is None:
        return 2
    prepared = _video_model(args, model, device, dtype, log)
    if prepared is None:
        return 2
    predict, per_frame, value_range, settings = prepared
    sources = [Source(job.src, job.rel) for job in plan_jobs(videos, out_dir, ("npy",))]
    grouped = _init_group(place.world)
    if stop.is_set():
        log("stopped before any video was processed")
        return EXIT_FOR_SIGNAL.get(stop.signum, 130)
    summary = predict_videos(sources, out_dir, predict, formats=formats, per_frame=per_frame,
                             temporal_align=args.temporal_align, value_range=value_range, overwrite=args.overwrite,
                             rank=place.rank, world_size=place.world, progress=show and place.main,
                             settings=settings, fps=args.fps, stop=stop, log=log)
    elapsed = time.perf_counter() - started
    if summary.stopped:
        log(f"stopped: {len(summary.done)} video(s) written, {summary.remaining} left (the one in progress restarts "
            f"from its first frame), {len(summary.failed)} failed in {elapsed:.1f} s -> {out_dir}; run the same "
            "command again to continue")
        return EXIT_FOR_SIGNAL.get(stop.signum, 130)
    if summary.skipped:
        log(f"{len(summary.skipped)} video(s) already done with this model and these settings: skipped "
            "(--overwrite recomputes them)")
    from .inference import Summary
    totals = Summary(written=len(summary.done), skipped=len(summary.skipped), failures=list(summary.failed),
                     conflicts=list(summary.conflicts), elapsed=elapsed)
    return _finish(totals, log, place.rank, place.world, grouped, out_dir, unit=" video(s)", frames=summary.frames)


def _check_video_options(args) -> None:
    """Options that apply to images only, and --fps, refused before the model is loaded."""
    for option, value in (("--tile", args.tile), ("--compile", args.compile or None),
                          ("--batch-size", args.batch_size)):
        if value is not None:
            raise _usage_error(f"{option} applies to images; videos run frame by frame (Video Depth Anything: "
                               "in windows of 32 frames)")
    if args.fps is not None and not args.fps > 0:
        raise _usage_error(f"--fps must be positive, got {args.fps}")


def _video_model(args, model, device, dtype, log):
    """(predict, per_frame, value_range, settings) for dpt_fast.video.batch.predict_videos, or None after
    saying why `model` does not take videos. Video Depth Anything runs under autocast (its last
    convolutions in float32, as the release does); a single-frame model is cast to `dtype`, its head
    kept in float32 as for images."""
    import torch

    from . import inference
    from .video.predictors import is_video_model, sequence_predictor
    if inference.is_segmentation(model):
        log(f"{args.model} is a segmentation model: videos take depth models")
        return None
    video_model = is_video_model(model)
    if video_model and args.temporal_align:
        raise _usage_error("--temporal-align is for single-frame models: Video Depth Anything aligns its windows "
                           "itself")
    autocast_dtype = None
    if dtype != torch.float32 and video_model:
        autocast_dtype = dtype
    elif dtype != torch.float32:
        model.to(dtype)
        inference.keep_head_float32(model)
    size = parse_size(args.size, False, inference.model_preprocessing(model).size)
    metric, output = _video_output(model, args.model)
    predict, per_frame = sequence_predictor(model, size=size, device=device, metric=metric,
                                            autocast_dtype=autocast_dtype)
    # metric Depth Anything: the 16-bit codes map 0 .. max_depth metres, the same for every video
    value_range = (0.0, float(output["max_depth"])) if metric and output.get("max_depth") else "first"
    settings = {"model": inference.file_fingerprint(args.model), "size": "native" if size is None else int(size),
                "dtype": str(dtype).replace("torch.", ""), **output}
    if args.sequence:
        settings["fps"] = args.fps or 30
    return predict, per_frame, value_range, settings


def _finish(summary, log, rank: int, world: int, grouped: bool, out_dir, unit: str = "",
            frames: int | None = None) -> int:
    """Report, sum the counts over ranks, and decide the exit status."""
    import torch
    _report(summary, log, rank, world)
    counts = torch.tensor([summary.written, summary.skipped, len(summary.failures), len(summary.conflicts)],
                          dtype=torch.int64)
    mine = [int(c) for c in counts]
    if grouped:
        import torch.distributed as dist
        dist.all_reduce(counts)
    written, skipped, failed, conflicts = (int(c) for c in counts)
    if world > 1:
        log(f"rank {rank} of {world}: {mine[0]}{unit} written, {mine[1]} skipped, {mine[2]} failed")
    if frames:
        log(f"{frames} frame(s) predicted" + (f" on rank {rank}" if world > 1 else ""))
    if rank == 0:
        msg = f"{written}{unit} written, {skipped} skipped (already done), {failed} failed"
        if conflicts:
            msg += f", {conflicts} conflict(s) (output names held by files dpt-fast did not write)"
        if world > 1:
            msg += f" across {world} processes" + ("" if grouped else " (this process only: no process group)")
        log(f"{msg} in {summary.elapsed:.1f} s -> {out_dir}")
    if grouped:
        # Every rank has written and reported before any exits: torchrun stops the others as soon as
        # one process exits with a failure status.
        dist.barrier()
        dist.destroy_process_group()
    return 1 if failed or conflicts else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dpt-fast predict", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    from .inference import UsageError
    try:
        return run(args)
    except UsageError as e:
        print(f"dpt-fast predict: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
