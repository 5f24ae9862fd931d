"""Depth for many videos: sharded by video, resumable per video, with progress per video and overall.

    from dpt_fast.video.batch import collect_sequences, predict_videos
    sources = collect_sequences(["clips/", "extra.mp4"])              # videos (folders searched recursively)
    summary = predict_videos(sources, "depth/", predict, temporal_align=True, rank=rank, world_size=world)

`predict` is a per-frame function (uint8 RGB [3, H, W] -> depth [H, W], e.g.
`dpt_fast.video.model_predictor(model)`), or, with `per_frame=False`, a sequence function
(iterable of Frames -> iterator of depth maps, e.g. Video Depth Anything's windowed inference).

Outputs of `SOURCE` (its path relative to the input argument it came from, extension dropped, is the
output name `NAME`): `NAME-depth.mp4` (coloured preview), `NAME-depth.mkv` (16-bit depth, FFV1) and/or
`NAME/000000.png`... (16-bit PNG per frame). Videos go to ranks by position in the sorted list (video i
to rank i mod world_size: each video is processed by exactly one process, never split by frame).
A video is done when its marker `.NAME.done.json` (the settings it was made with) exists: re-runs
skip done videos with the same settings and redo the others from their first frame. Every file is
written under a temporary name and renamed when complete, and the marker is written last, so an
interrupted run leaves no partial output under a final name.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from ..image_io import atomic_write_bytes, write_png16
from .align import TemporalAligner
from .io import DepthVideoWriter, VideoReadError, is_video_name, natural_key, open_sequence, quantize_depth

__all__ = ["Source", "collect_sequences", "shard", "predict_videos", "VideoSummary", "FORMATS"]

FORMATS = ("color", "depth16", "png16")


@dataclass(frozen=True)
class Source:
    path: Path   # a video file or a folder of frames
    name: str    # output name (relative path, no extension, "/" separated)


@dataclass
class VideoSummary:
    done: list[str] = field(default_factory=list)      # names processed now
    skipped: list[str] = field(default_factory=list)   # names already done with the same settings
    failed: list[tuple[str, str]] = field(default_factory=list)  # (name, one-line reason)
    frames: int = 0


def collect_sequences(inputs: Sequence, sequence: bool = False) -> list[Source]:
    """Video files named directly or found (recursively) in folders, sorted; with `sequence=True` each
    folder argument is instead one sequence of frames. Raises FileNotFoundError for a missing input."""
    sources = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or folder")
        if path.is_dir() and sequence:
            sources.append(Source(path, path.name))
        elif path.is_dir():
            for file in sorted(path.rglob("*"), key=lambda p: natural_key(str(p))):
                if file.is_file() and is_video_name(file.name) and not file.name.startswith("."):
                    sources.append(Source(file, file.relative_to(path).with_suffix("").as_posix()))
        else:
            sources.append(Source(path, path.stem))
    names = [s.name for s in sources]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"two inputs would write the same outputs: {', '.join(duplicates[:3])} "
                         "(rename one, or run them into different output folders)")
    return sorted(sources, key=lambda s: natural_key(s.name))


def shard(sources: Sequence[Source], rank: int, world_size: int) -> list[Source]:
    """Video i of the list goes to rank i mod world_size."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return list(sources[rank::world_size])


def _marker(out_dir: Path, name: str) -> Path:
    path = out_dir / name
    return path.parent / f".{path.name}.done.json"


def _outputs(out_dir: Path, name: str, formats) -> dict[str, Path]:
    base = out_dir / name
    paths = {"color": base.parent / f"{base.name}-depth.mp4", "depth16": base.parent / f"{base.name}-depth.mkv",
             "png16": base}
    return {f: paths[f] for f in formats}


def predict_videos(sources: Sequence[Source], out_dir, predict: Callable, *,
                   formats: Iterable[str] = ("color", "depth16"), per_frame: bool = True,
                   temporal_align: bool = False, value_range="first", overwrite: bool = False, rank: int = 0,
                   world_size: int = 1, progress: bool = True, settings: dict | None = None) -> VideoSummary:
    """Run `predict` over this rank's share of `sources`, writing `formats` under `out_dir`.

    temporal_align: pass per-frame predictions through a TemporalAligner (per video).
    value_range: the 16-bit/colour mapping of DepthVideoWriter ("first", (low, high) or None); the
    per-frame PNGs use the same mapping. settings: anything else that changes the outputs (model, input
    size; JSON values): recorded in the done-marker, so a re-run with other settings recomputes. Unreadable videos
    are recorded in `failed` (with a one-line reason) and the run continues.
    """
    formats = tuple(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"formats must be some of {', '.join(FORMATS)}, got {list(formats)}")
    out_dir = Path(out_dir)
    record = {"formats": sorted(formats), "temporal_align": bool(temporal_align), "per_frame": per_frame,
              "value_range": value_range if isinstance(value_range, (str, type(None))) else list(value_range),
              **(settings or {})}
    mine = shard(sources, rank, world_size)
    summary = VideoSummary()
    from tqdm import tqdm
    overall = tqdm(total=len(mine), unit="video", desc=f"videos (rank {rank})" if world_size > 1 else "videos",
                   disable=not progress, dynamic_ncols=True, position=0)
    try:
        for source in mine:
            marker = _marker(out_dir, source.name)
            if not overwrite and marker.is_file() and _read_marker(marker) == record:
                summary.skipped.append(source.name)
                overall.update(1)
                continue
            try:
                count = _one_video(source, out_dir, predict, formats, per_frame, temporal_align, value_range, progress)
            except VideoReadError as exc:
                summary.failed.append((source.name, str(exc)))
                overall.update(1)
                continue
            marker.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(marker, json.dumps({**record, "frames": count}, sort_keys=True).encode())
            summary.done.append(source.name)
            summary.frames += count
            overall.update(1)
    finally:
        overall.close()
    return summary


def _read_marker(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    data.pop("frames", None)
    return data


def _one_video(source: Source, out_dir: Path, predict, formats, per_frame, temporal_align, value_range,
               progress) -> int:
    from tqdm import tqdm
    sequence = open_sequence(source.path)
    fps = sequence.fps or 30
    paths = _outputs(out_dir, source.name, formats)
    video_formats = {f: paths[f] for f in ("color", "depth16") if f in paths}
    writer = DepthVideoWriter(fps, color_path=video_formats.get("color"), depth16_path=video_formats.get("depth16"),
                              value_range=value_range) if video_formats else None
    png_dir = paths.get("png16")
    aligner = TemporalAligner() if temporal_align else None
    bar = tqdm(total=sequence.num_frames, unit="frame", desc=source.name, leave=False, disable=not progress,
               dynamic_ncols=True, position=1)
    count = 0
    fixed_range = value_range
    try:
        frames = iter(sequence)
        depths = (predict(frame.image) for frame in frames) if per_frame else predict(frames)
        for depth in depths:
            depth = depth.detach().float().cpu()
            if aligner is not None:
                depth = aligner(depth)
            if writer is not None:
                writer.write(depth)
                fixed_range = writer.value_range
            if png_dir is not None:
                if fixed_range == "first":  # no video writer to fix it: same rule as DepthVideoWriter
                    finite = depth[torch.isfinite(depth)]
                    low, high = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 1.0)
                    span = (high - low) or 1.0
                    fixed_range = (low - 0.25 * span, high + 0.25 * span)
                write_png16(png_dir / f"{count:06d}.png", quantize_depth(depth, fixed_range))
            count += 1
            bar.update(1)
        if count == 0:
            raise VideoReadError(f"{source.path}: no frames")
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        bar.close()
    if png_dir is not None and fixed_range is not None:
        atomic_write_bytes(png_dir / "range.json", json.dumps({"value_range": list(fixed_range)}).encode())
    return count
