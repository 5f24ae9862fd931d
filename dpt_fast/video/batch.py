"""Depth for many videos: sharded by video, resumable per video, with progress per video and overall.

    from dpt_fast.video.batch import collect_sequences, predict_videos
    sources = collect_sequences(["clips/", "extra.mp4"])              # videos (folders searched recursively)
    summary = predict_videos(sources, "depth/", predict, temporal_align=True, rank=rank, world_size=world)

`predict` is a per-frame function (uint8 RGB [3, H, W] -> depth [H, W], e.g.
`dpt_fast.video.model_predictor(model)`), or, with `per_frame=False`, a sequence function
(iterable of Frames -> iterator of depth maps, e.g. Video Depth Anything's windowed inference).

Outputs of `SOURCE` (its path relative to the input argument it came from, extension dropped, is the
output name `NAME`): `NAME-depth.mp4` (coloured preview), `NAME-depth.mkv` (16-bit depth, FFV1) and/or
per frame in `NAME/`: `000000.png`... (16-bit PNG), `000000.npy` / `.pfm` (raw float values). Videos go
to ranks by position in the sorted list (video i to rank i mod world_size: each video is processed by
exactly one process, never split by frame). A video is done when its marker `.NAME.done.json` (the
settings it was made with) exists: re-runs skip done videos with the same settings and redo the others
from their first frame. Every file is written under a temporary name and renamed when complete, and
the marker is written last, so an interrupted run leaves no partial output under a final name. A
`.NAME.started.json` marker, written before any output, tells this tool's leftovers from files it did
not write: those are never replaced (the video is reported as a conflict).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from ..image_io import atomic_write_bytes, npy_bytes, pfm_bytes, write_png16
from .align import TemporalAligner
from .io import DepthVideoWriter, VideoReadError, is_video_name, natural_key, open_sequence, quantize_depth

__all__ = ["Source", "collect_sequences", "shard", "predict_videos", "VideoSummary", "FORMATS"]

# color: coloured preview (.mp4); depth16: 16-bit depth video (.mkv); per frame in NAME/: png16 (16-bit
# PNGs of the same fixed range, with range.json), npy and pfm (the raw float values: metres for metric models)
FORMATS = ("color", "depth16", "png16", "npy", "pfm")
FRAME_FORMATS = ("png16", "npy", "pfm")


@dataclass(frozen=True)
class Source:
    path: Path   # a video file or a folder of frames
    name: str    # output name (relative path, no extension, "/" separated)


@dataclass
class VideoSummary:
    done: list[str] = field(default_factory=list)      # names processed now
    skipped: list[str] = field(default_factory=list)   # names already done with the same settings
    failed: list[tuple[str, str]] = field(default_factory=list)  # (name, one-line reason)
    conflicts: list[tuple[str, str]] = field(default_factory=list)  # (name, why): outputs dpt-fast did not write
    frames: int = 0
    stopped: bool = False                              # `stop` was set: the video in progress was dropped
    remaining: int = 0                                 # videos of this rank neither done, skipped nor failed


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


def _marker(out_dir: Path, name: str, kind: str = "done") -> Path:
    path = out_dir / name
    return path.parent / f".{path.name}.{kind}.json"


def _outputs(out_dir: Path, name: str, formats) -> dict[str, Path]:
    base = out_dir / name
    paths = {"color": base.parent / f"{base.name}-depth.mp4", "depth16": base.parent / f"{base.name}-depth.mkv"}
    return {f: paths.get(f, base) for f in formats}


def _foreign_output(out_dir: Path, name: str, formats) -> Path | None:
    """An output path of `name` holding something dpt-fast did not write: it exists while neither of
    the video's markers does (the `started` marker is written before any output, the `done` marker
    after all of them)."""
    if _marker(out_dir, name).exists() or _marker(out_dir, name, "started").exists():
        return None
    for fmt, path in _outputs(out_dir, name, formats).items():
        if fmt in FRAME_FORMATS:
            if path.is_dir() and any(path.iterdir()):
                return path
        elif path.exists() or path.is_symlink():
            return path
    return None


def predict_videos(sources: Sequence[Source], out_dir, predict: Callable, *,
                   formats: Iterable[str] = ("color", "depth16"), per_frame: bool = True,
                   temporal_align: bool = False, value_range="first", overwrite: bool = False, rank: int = 0,
                   world_size: int = 1, progress: bool = True, settings: dict | None = None,
                   fps: float | None = None, stop=None, log: Callable[[str], None] | None = None) -> VideoSummary:
    """Run `predict` over this rank's share of `sources`, writing `formats` under `out_dir`.

    formats: "color" (NAME-depth.mp4), "depth16" (NAME-depth.mkv), per frame in NAME/: "png16",
    "npy", "pfm" (raw values). temporal_align: pass per-frame predictions through a TemporalAligner
    (per video). value_range: the 16-bit/colour mapping of DepthVideoWriter ("first", (low, high) or
    None); the per-frame PNGs use the same mapping. settings: anything else that changes the outputs
    (model, input size; JSON values): recorded in the done-marker, so a re-run with other settings
    recomputes. fps: the frame rate of frame folders (default 30). stop: an Event; once set, the video
    in progress is dropped (its partial files removed) and the run returns with `stopped` set.

    Unreadable videos and videos that run out of memory are recorded in `failed` (a one-line reason,
    also given to `log`) and the run continues. A video whose output names hold files dpt-fast did
    not write (no marker of this tool beside them) is left alone and recorded in `conflicts`, even with
    `overwrite`.
    """
    formats = _checked_formats(formats)
    log = log or (lambda message: None)
    out_dir = Path(out_dir)
    record = _settings_record(formats, temporal_align, per_frame, value_range, settings)

    def run(source: Source) -> int | None:
        return _one_video(source, out_dir, predict, formats, per_frame, temporal_align, value_range, progress, fps,
                          stop)

    mine = shard(sources, rank, world_size)
    summary = VideoSummary(remaining=len(mine))
    from tqdm import tqdm
    overall = tqdm(total=len(mine), unit="video", desc=f"videos (rank {rank})" if world_size > 1 else "videos",
                   disable=not progress, dynamic_ncols=True, position=0)
    try:
        for source in mine:
            if stop is not None and stop.is_set():
                summary.stopped = True
                break
            if not overwrite and _done_with(out_dir, source.name, record):
                summary.skipped.append(source.name)
            elif (foreign := _foreign_output(out_dir, source.name, formats)) is not None:
                why = (f"{foreign} exists and was not written by dpt-fast: left as it is and this video skipped "
                       "(move it, or choose another output folder)")
                summary.conflicts.append((source.name, why))
                log(f"conflict: {source.path}: {why}")
            else:
                count, reason = _attempt(source, out_dir, record, run)
                if count is None and reason is None:  # stopped inside this video
                    summary.stopped = True
                    break
                if reason is not None:
                    summary.failed.append((source.name, reason))
                    log(f"failed: {source.path}: {reason}")
                else:
                    summary.done.append(source.name)
                    summary.frames += count
            summary.remaining -= 1
            overall.update(1)
    finally:
        overall.close()
    return summary


def _checked_formats(formats) -> tuple[str, ...]:
    formats = tuple(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"formats must be some of {', '.join(FORMATS)}, got {list(formats)}")
    return formats


def _settings_record(formats, temporal_align, per_frame, value_range, settings) -> dict:
    """What a video's markers record about how its outputs were made (a re-run with another record
    recomputes the video)."""
    return {"formats": sorted(formats), "temporal_align": bool(temporal_align), "per_frame": per_frame,
            "value_range": value_range if isinstance(value_range, (str, type(None))) else list(value_range),
            **(settings or {})}


def _done_with(out_dir: Path, name: str, record: dict) -> bool:
    """Whether the video `name` was finished with these settings (its done marker holds `record`)."""
    marker = _marker(out_dir, name)
    return marker.is_file() and _read_marker(marker) == record


def _attempt(source: Source, out_dir: Path, record: dict, run) -> tuple[int | None, str | None]:
    """Run one video between its markers: `started` before any output (what tells this tool's files from
    others'), `done` after all of them. Returns (frames, None) when done, (None, reason) when the video
    cannot be read or runs out of memory (it fails alone), (None, None) when stopped inside it."""
    started = _marker(out_dir, source.name, "started")
    started.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(started, json.dumps(record, sort_keys=True).encode())
    marker = _marker(out_dir, source.name)
    marker.unlink(missing_ok=True)  # the outputs are about to change
    try:
        count = run(source)
    except VideoReadError as exc:
        return None, str(exc)
    except Exception as exc:  # noqa: BLE001 -- running out of memory fails this video only
        from ..inference import is_out_of_memory
        if not is_out_of_memory(exc):
            raise
        return None, f"out of memory ({' '.join(str(exc).split())[:160]})"
    if count is None:
        return None, None
    atomic_write_bytes(marker, json.dumps({**record, "frames": count}, sort_keys=True).encode())
    started.unlink(missing_ok=True)
    return count, None


def _read_marker(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    data.pop("frames", None)
    return data


def _fixed_range(depth: torch.Tensor, margin: float = 0.25) -> tuple[float, float]:
    """DepthVideoWriter's "first" rule, for the per-frame PNGs when no video writer fixes the range."""
    finite = depth[torch.isfinite(depth)]
    low, high = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 1.0)
    span = (high - low) or 1.0
    return (low - margin * span, high + margin * span)


def _one_video(source: Source, out_dir: Path, predict, formats, per_frame, temporal_align, value_range,
               progress, fps=None, stop=None) -> int | None:
    """Write one video's outputs; returns its frame count, or None when `stop` was set (the partial
    video files are removed; per-frame files already written stay, and are redone by a re-run)."""
    from tqdm import tqdm
    sequence = open_sequence(source.path, fps=fps)
    frame_rate = sequence.fps or 30
    paths = _outputs(out_dir, source.name, formats)
    video_formats = {f: paths[f] for f in ("color", "depth16") if f in paths}
    writer = DepthVideoWriter(frame_rate, color_path=video_formats.get("color"),
                              depth16_path=video_formats.get("depth16"),
                              value_range=value_range) if video_formats else None
    frame_dir = out_dir / source.name
    frame_formats = [f for f in FRAME_FORMATS if f in formats]
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
            if "png16" in frame_formats:
                if fixed_range == "first":  # no video writer to fix it: same rule as DepthVideoWriter
                    fixed_range = _fixed_range(depth)
                write_png16(frame_dir / f"{count:06d}.png", quantize_depth(depth, fixed_range))
            if "npy" in frame_formats:
                atomic_write_bytes(frame_dir / f"{count:06d}.npy", npy_bytes(depth.numpy()))
            if "pfm" in frame_formats:
                atomic_write_bytes(frame_dir / f"{count:06d}.pfm", pfm_bytes(depth.numpy()))
            count += 1
            bar.update(1)
            if stop is not None and stop.is_set():
                if writer is not None:
                    writer.abort()
                return None
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
    if "png16" in frame_formats and fixed_range is not None:
        atomic_write_bytes(frame_dir / "range.json", json.dumps({"value_range": list(fixed_range)}).encode())
    return count
