"""Reading frame sequences (video files, folders of frames) and writing depth as encoded video.

Decoding and encoding go through PyAV (FFmpeg bindings; `pip install "dpt-fast[video]"`), imported
only when a video is opened, so the rest of the package does not need it.

Reading: `open_sequence(path)` gives a `VideoFile` or a `FrameFolder`; both iterate lazily
(`for frame in seq: ...`), one decoded frame in memory at a time, as `Frame(index, time, image)` with
`image` a uint8 RGB tensor [3, H, W] (the layout `dpt_fast.transforms.preprocess` takes). A video's
rotation metadata (phone videos) is applied, as players do.

Writing: `VideoWriter` encodes uint8 RGB frames (a coloured preview: H.264 in .mp4, yuv420p) or uint16
greyscale frames (16-bit depth: FFV1 gray16le in .mkv, lossless, so values round-trip exactly).
`DepthVideoWriter` turns float depth maps into both. Files are written under a temporary name and
renamed when closed, so an interrupted run never leaves a truncated video under the final name.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..fileio import temporary_path
from ..image_io import colormap_lut, is_image_name, read_image
from ..input_files import VIDEO_EXTENSIONS, is_video_name  # noqa: F401 (part of this module's API)

__all__ = ["Frame", "VideoReadError", "VideoFile", "FrameFolder", "open_sequence", "is_video_name",
           "natural_key", "VideoWriter", "DepthVideoWriter", "quantize_depth", "dequantize_depth",
           "VIDEO_EXTENSIONS", "RANGE_TAG", "read_depth16_video"]

# Metadata tag of a 16-bit depth video holding the fixed value range its codes map to ("low high").
RANGE_TAG = "DPT_FAST_RANGE"


class VideoReadError(ValueError):
    """A video or frame folder that cannot be read; the message is one line naming the path."""


@dataclass
class Frame:
    index: int            # position in the sequence, from 0
    time: float | None    # presentation time in seconds (None for a folder read without an fps)
    image: torch.Tensor   # uint8 RGB [3, H, W]


def natural_key(name: str):
    """Sort key that orders digit runs by value: frame2.png before frame10.png."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part.lower())
            for part in re.split(r"(\d+)", name) if part]


def _import_av():
    try:
        import av
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ImportError('video input and output need PyAV: pip install "dpt-fast[video]" (or pip install av)') from exc
    return av


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# --- reading -------------------------------------------------------------------------------------

class VideoFile:
    """A video file's first video stream, decoded lazily.

    `fps` (a Fraction: the stream's average rate, else its guessed rate, else None), `time_base`,
    `num_frames` (the container's count, None when it does not say), `size` (height, width as
    displayed) are read on construction; iteration decodes one frame at a time, so memory does not
    grow with the video's length. Iterating again starts again from the first frame.
    """

    def __init__(self, path, threads: bool = True):
        self.path = Path(path)
        self.threads = threads
        with self._open() as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            self.fps: Fraction | None = Fraction(rate) if rate else None
            self.time_base: Fraction | None = stream.time_base
            self.num_frames: int | None = int(stream.frames) or None
            self.size = (stream.codec_context.height, stream.codec_context.width)
            try:  # the displayed size: a quarter turn of rotation metadata swaps height and width
                first = next(container.decode(stream))
                if round((getattr(first, "rotation", 0) or 0) / 90) % 2:
                    self.size = self.size[::-1]
            except StopIteration:
                raise VideoReadError(f"{self.path}: has no frames") from None
            except Exception as exc:
                raise VideoReadError(f"{self.path}: cannot decode ({_one_line(exc)})") from None

    def _open(self):
        av = _import_av()
        if not self.path.is_file():
            raise VideoReadError(f"{self.path}: no such file")
        try:
            container = av.open(str(self.path))
        except Exception as exc:  # av.error.* are ValueError/OSError subclasses; one message for all
            raise VideoReadError(f"{self.path}: cannot read as a video ({_one_line(exc)})") from None
        if not container.streams.video:
            container.close()
            raise VideoReadError(f"{self.path}: has no video stream")
        return container

    def __repr__(self) -> str:
        return f"VideoFile({str(self.path)!r}, fps={self.fps}, num_frames={self.num_frames}, size={self.size})"

    def __iter__(self) -> Iterator[Frame]:
        container = self._open()
        try:
            stream = container.streams.video[0]
            if self.threads:
                stream.thread_type = "AUTO"
            index = 0
            decoded = container.decode(stream)
            while True:
                try:
                    frame = next(decoded)
                except StopIteration:
                    break
                except Exception as exc:
                    raise VideoReadError(f"{self.path}: decoding failed at frame {index} ({_one_line(exc)})") from None
                rgb = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)
                turns = round((getattr(frame, "rotation", 0) or 0) / 90) % 4
                if turns:  # the display matrix: rotate counter-clockwise by `rotation` degrees to show upright
                    rgb = torch.rot90(rgb, turns, dims=(1, 2))
                time = float(frame.time) if frame.time is not None else (
                    index / float(self.fps) if self.fps else None)
                yield Frame(index, time, rgb.contiguous())
                index += 1
        finally:
            container.close()

    def __len__(self) -> int:
        if self.num_frames is None:
            raise TypeError(f"{self.path}: the container does not record its frame count")
        return self.num_frames


class FrameFolder:
    """The image files directly inside a folder, in natural order (frame2 before frame10), as one sequence.

    `fps` (optional) gives each frame a time of index / fps. Unreadable images raise VideoReadError.
    """

    def __init__(self, path, fps: float | Fraction | None = None):
        self.path = Path(path)
        if not self.path.is_dir():
            raise VideoReadError(f"{self.path}: not a folder")
        self.files = sorted((p for p in self.path.iterdir() if p.is_file() and is_image_name(p.name)
                             and not p.name.startswith(".")), key=lambda p: natural_key(p.name))
        if not self.files:
            raise VideoReadError(f"{self.path}: no image files in this folder")
        self.fps = Fraction(fps).limit_denominator(1001000) if fps else None
        self.time_base = 1 / self.fps if self.fps else None
        self.num_frames = len(self.files)
        self._size = None

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the first frame (frames of other sizes are allowed)."""
        if self._size is None:
            self._size = tuple(self._read(self.files[0]).shape[1:])
        return self._size

    def __repr__(self) -> str:
        return f"FrameFolder({str(self.path)!r}, num_frames={self.num_frames}, fps={self.fps})"

    def _read(self, file: Path) -> torch.Tensor:
        try:
            return torch.from_numpy(read_image(file)).permute(2, 0, 1).contiguous()
        except Exception as exc:
            raise VideoReadError(f"{file}: cannot read as an image ({_one_line(exc)})") from None

    def __iter__(self) -> Iterator[Frame]:
        for index, file in enumerate(self.files):
            yield Frame(index, index / float(self.fps) if self.fps else None, self._read(file))

    def __len__(self) -> int:
        return self.num_frames


def open_sequence(path, fps: float | None = None) -> VideoFile | FrameFolder:
    """A folder -> FrameFolder(path, fps); a file -> VideoFile(path) (`fps` then overrides the stream's
    rate only for the frame times of a stream that has none)."""
    path = Path(path)
    if path.is_dir():
        return FrameFolder(path, fps=fps)
    video = VideoFile(path)
    if video.fps is None and fps:
        video.fps = Fraction(fps).limit_denominator(1001000)
    return video


# --- writing -------------------------------------------------------------------------------------

_FORMATS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm", ".avi": "avi"}


def _codec_available(av, name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
        return True
    except Exception:
        return False


class _FinishOnExit:
    """`with` support for writers: close() (the file appears under its name) on success, abort() (nothing
    left behind) when the block raised."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


class VideoWriter(_FinishOnExit):
    """Encode frames of one kind into a video file, atomically (a temporary name, renamed on close).

    kind="rgb": uint8 [H, W, 3] (numpy) or [3, H, W] (tensor) frames; H.264 yuv420p (libx264, CRF
    `crf`) when the FFmpeg build has it, else MPEG-4 Part 2; frames of odd height/width are padded by
    one replicated row/column (4:2:0 needs even sizes). For .mp4/.mov/.mkv/.avi.
    kind="gray16": uint16 [H, W] frames; FFV1 (lossless) gray16le; the container must be Matroska (.mkv).

    `fps` is a number or Fraction (e.g. the source's Fraction(30000, 1001)). `metadata` goes to the
    video stream's tags. Use as a context manager: leaving the block by an exception discards the
    temporary file and keeps any earlier file at `path` untouched.
    """

    def __init__(self, path, fps, kind: str = "rgb", crf: int = 18, metadata: dict | None = None):
        av = _import_av()
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if kind not in ("rgb", "gray16"):
            raise ValueError(f"kind must be 'rgb' or 'gray16', got {kind!r}")
        if kind == "gray16" and suffix != ".mkv":
            raise ValueError(f"{self.path}: a 16-bit depth video needs a .mkv name (FFV1 gray16le in Matroska)")
        if suffix not in _FORMATS:
            raise ValueError(f"{self.path}: unsupported video extension {suffix!r} (use one of {', '.join(_FORMATS)})")
        if kind == "rgb" and suffix == ".webm":
            raise ValueError(f"{self.path}: use .mp4 for the coloured preview (H.264)")
        self.kind, self.crf, self.metadata = kind, crf, dict(metadata or {})
        self.fps = Fraction(fps).limit_denominator(1001000) if not isinstance(fps, Fraction) else fps
        if self.fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = temporary_path(self.path)  # fileio.stale_temporaries finds it after a kill
        self._container = av.open(str(self._tmp), "w", format=_FORMATS[suffix])
        self._av = av
        self._stream = None
        self.frames_written = 0
        self.closed = False

    def _start(self, height: int, width: int):
        av = self._av
        if self.kind == "gray16":
            stream = self._container.add_stream("ffv1", rate=self.fps)
            stream.pix_fmt = "gray16le"
        else:
            codec = "libx264" if _codec_available(av, "libx264") else "mpeg4"
            stream = self._container.add_stream(codec, rate=self.fps)
            stream.pix_fmt = "yuv420p"
            if codec == "libx264":
                stream.options = {"crf": str(self.crf)}
            height, width = height + height % 2, width + width % 2
        stream.width, stream.height = width, height
        for key, value in self.metadata.items():
            stream.metadata[key] = str(value)
        self._stream = stream
        self._shape = None

    def write(self, frame) -> None:
        if self.closed:
            raise ValueError(f"{self.path}: writer is closed")
        array = frame.detach().cpu().numpy() if isinstance(frame, torch.Tensor) else np.asarray(frame)
        if self.kind == "rgb":
            if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
                array = array.transpose(1, 2, 0)
            if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
                raise ValueError(f"expected a uint8 RGB frame [H, W, 3], got {array.dtype} {array.shape}")
        elif array.ndim != 2 or array.dtype != np.uint16:
            raise ValueError(f"expected a uint16 frame [H, W], got {array.dtype} {array.shape}")
        if self._stream is None:
            self._start(*array.shape[:2])
            self._shape = array.shape
        elif array.shape != self._shape:
            raise ValueError(f"{self.path}: frame {self.frames_written} is {array.shape[:2]}, "
                             f"earlier frames {self._shape[:2]} (a video has one size)")
        if self.kind == "rgb":
            pad_h, pad_w = array.shape[0] % 2, array.shape[1] % 2
            if pad_h or pad_w:
                array = np.pad(array, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
            av_frame = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
        else:
            av_frame = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="gray16le")
        for packet in self._stream.encode(av_frame):
            self._container.mux(packet)
        self.frames_written += 1

    def close(self) -> None:
        """Flush the encoder and move the file to its final name."""
        if self.closed:
            return
        self.closed = True
        try:
            if self._stream is None:
                raise ValueError(f"{self.path}: no frames were written")
            for packet in self._stream.encode():
                self._container.mux(packet)
            self._container.close()
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Discard the partial file."""
        self.closed = True
        try:
            self._container.close()
        except Exception:
            pass
        try:
            self._tmp.unlink()
        except FileNotFoundError:
            pass


def quantize_depth(depth, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Float [H, W] -> uint16 [H, W]: `value_range` (low, high) maps linearly onto 0..65535 (values
    outside clip); None normalises this frame by its own min and max (as the image outputs do)."""
    values = depth.detach().float().cpu().numpy() if isinstance(depth, torch.Tensor) else np.asarray(depth, np.float32)
    finite = np.isfinite(values)
    if value_range is None:
        if not finite.any():
            return np.zeros(values.shape, np.uint16)
        low, high = float(values[finite].min()), float(values[finite].max())
    else:
        low, high = map(float, value_range)
    span = high - low
    scaled = (np.nan_to_num(values, nan=low) - low) / span if span > 0 else np.zeros_like(values)
    return np.clip(np.rint(scaled * 65535.0), 0, 65535).astype(np.uint16)


def dequantize_depth(codes: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """The inverse of `quantize_depth` with a fixed range (to within half a code)."""
    low, high = map(float, value_range)
    return low + codes.astype(np.float64) / 65535.0 * (high - low)


class DepthVideoWriter(_FinishOnExit):
    """Float depth maps -> a coloured preview video and/or a 16-bit depth video.

    color_path (.mp4): each frame coloured with `cmap`. depth16_path (.mkv): FFV1 gray16le codes.
    `value_range` (low, high) fixes the mapping for every frame (recorded in the 16-bit video's
    `DPT_FAST_RANGE` tag, so `dequantize_depth` recovers the values); "first" fixes it from the first
    frame's min and max, each widened by `margin` times their span (for streams whose range is not
    known in advance; later values outside it clip); None normalises each frame by its own min and
    max, which keeps per-frame detail but discards the scale between frames (only do that for
    viewing). Use the temporally aligned depth, or a model that is consistent over time, for a fixed
    range to be meaningful.
    """

    def __init__(self, fps, color_path=None, depth16_path=None, value_range=None, cmap: str = "inferno",
                 crf: int = 18, margin: float = 0.25):
        if color_path is None and depth16_path is None:
            raise ValueError("give color_path and/or depth16_path")
        if not (value_range is None or value_range == "first" or len(value_range) == 2):
            raise ValueError(f"value_range must be None, 'first' or (low, high), got {value_range!r}")
        self.value_range, self.cmap, self.margin = value_range, cmap, margin
        self.writers = []
        try:
            if color_path is not None:
                self.writers.append(("color", VideoWriter(color_path, fps, "rgb", crf=crf)))
            if depth16_path is not None:
                self.writers.append(("depth16", VideoWriter(depth16_path, fps, "gray16")))
        except BaseException:
            self.abort()
            raise

    def _fix_range(self, depth) -> None:
        values = (depth.detach().float().cpu().numpy() if isinstance(depth, torch.Tensor)
                  else np.asarray(depth, np.float32))
        finite = values[np.isfinite(values)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        span = (high - low) or 1.0
        self.value_range = (low - self.margin * span, high + self.margin * span)

    def write(self, depth) -> None:
        if isinstance(self.value_range, str):  # "first": fixed from the first frame, widened by the margin
            self._fix_range(depth)
        if self.value_range is not None:
            for kind, writer in self.writers:
                if kind == "depth16" and writer.frames_written == 0:
                    writer.metadata[RANGE_TAG] = f"{self.value_range[0]!r} {self.value_range[1]!r}"
        codes = quantize_depth(depth, self.value_range)
        for kind, writer in self.writers:
            if kind == "depth16":
                writer.write(codes)
            else:  # colour the codes, so a fixed range gives a fixed colour scale too
                writer.write(colormap_lut(self.cmap)[codes >> 8])

    def close(self) -> None:
        for _, writer in self.writers:
            writer.close()

    def abort(self) -> None:
        for _, writer in self.writers:
            writer.abort()


def read_depth16_video(path) -> tuple[Iterator[np.ndarray], tuple[float, float] | None]:
    """A 16-bit depth video written by `DepthVideoWriter` -> (lazy iterator of uint16 [H, W] codes,
    the fixed value range from its tag, or None when each frame was normalised on its own)."""
    video = VideoFile(path)
    with video._open() as container:
        stream = container.streams.video[0]
        tag = stream.metadata.get(RANGE_TAG)
        if stream.codec_context.pix_fmt not in ("gray16le", "gray16be"):
            raise VideoReadError(f"{video.path}: not a 16-bit greyscale video ({stream.codec_context.pix_fmt})")
    value_range = tuple(float(v) for v in tag.split()) if tag else None

    def frames():
        container = video._open()
        try:
            for frame in container.decode(container.streams.video[0]):
                yield frame.to_ndarray(format="gray16le")
        finally:
            container.close()
    return frames(), value_range
