"""Streaming depth: frames in one by one (a camera, a decoder), depth out with bounded latency and memory.

    from dpt_fast.video.stream import DepthStream, model_predictor
    stream = DepthStream(model_predictor(model, size=384), temporal_align=True)
    for result in stream(camera_frames):          # any iterable of frames; read on a background thread
        show(result.depth)                        # [H, W] float32 at the frame's size
        print(result.index, result.latency)       # seconds from the frame's arrival to its depth

Between the source and the model sits a queue of at most `max_pending` frames. With
`drop_late=True` (a live camera) a new frame that finds the queue full replaces the oldest pending
one, so the depth shown is never more than `max_pending` frames behind the camera and a slow model
skips frames instead of falling further behind; with `drop_late=False` (a file) the reader waits, so
every frame is processed, in order. Memory is bounded by the queue, the frame being processed and
the aligner's one reference frame, whatever the length of the stream. `stream.process(frame)` is the
synchronous single-frame call (the same prediction and alignment, no thread).
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from ..transforms import preprocess, resize_prediction
from .align import TemporalAligner

__all__ = ["DepthStream", "StreamResult", "model_predictor", "measure_latency"]

_END = object()


@dataclass
class StreamResult:
    index: int             # the frame's position in the source (dropped frames leave gaps)
    depth: torch.Tensor    # the prediction [H, W], temporally aligned when the stream aligns
    arrival: float         # time.perf_counter() when the frame was taken from the source
    latency: float         # seconds from arrival to this result
    dropped: int           # frames dropped since the previous result


def _as_image(frame) -> torch.Tensor:
    """A Frame (dpt_fast.video.io), a [3, H, W] tensor or an [H, W, 3] array -> [3, H, W] tensor."""
    image = getattr(frame, "image", frame)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"expected an RGB array [H, W, 3], got shape {image.shape}")
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an RGB frame [3, H, W], got {type(image).__name__} "
                         f"{tuple(getattr(image, 'shape', ()))}")
    return image


def model_predictor(model: torch.nn.Module, size: int | tuple[int, int] | None = 0, multiple: int | None = None,
                    device=None, autocast_dtype: torch.dtype | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A single-image depth model -> predict(uint8 RGB [3, H, W]) -> float32 [H, W] on the CPU at the
    frame's size.

    DPT models: `dpt_fast.transforms.preprocess` (mean = std = 0.5, multiples of 32, default size 384),
    the output resized back bicubically. Depth Anything models: `depth_anything_preprocess` (ImageNet
    mean/std, multiples of 14, default size 518), resized back bilinearly, as their releases do.
    `size` None keeps the frame's resolution (rounded to the multiple). `device` defaults to the
    model's; autocast_dtype (e.g. torch.bfloat16 on a GPU) runs the model under autocast.
    """
    from ..transforms import depth_anything_preprocess
    model.eval()
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    depth_anything = getattr(model, "config", {}).get("model_class") == "DepthAnythingModel"
    if depth_anything:
        size = 518 if size == 0 else size
        prepare = lambda image: depth_anything_preprocess(image, size=size, multiple=multiple or 14)  # noqa: E731
        mode = "bilinear"
    else:
        size = 384 if size == 0 else size
        prepare = lambda image: preprocess(image, size=size, multiple=multiple or 32)  # noqa: E731
        mode = "bicubic"

    def predict(image: torch.Tensor) -> torch.Tensor:
        image = _as_image(image).to(device, non_blocking=True)
        with torch.inference_mode(), torch.autocast(device.type, autocast_dtype or torch.float32,
                                                    enabled=autocast_dtype is not None):
            output = model(prepare(image))
        return resize_prediction(output.float(), image.shape[-2:], mode=mode)[0].cpu()
    return predict


class DepthStream:
    """Per-frame depth over a stream of frames (see the module doc).

    predict: frame [3, H, W] uint8 -> depth [H, W] (e.g. `model_predictor(model)`).
    temporal_align: False, True (a TemporalAligner() in disparity space) or a TemporalAligner.
    max_pending: the queue's capacity (>= 1). drop_late: drop the oldest pending frame when full.
    After a run, `dropped` counts the dropped frames and `latencies` holds the latest (at most 1024).
    """

    def __init__(self, predict: Callable[[torch.Tensor], torch.Tensor], *, temporal_align=False,
                 max_pending: int = 1, drop_late: bool = True):
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {max_pending}")
        self.predict = predict
        if temporal_align is True:
            temporal_align = TemporalAligner()
        self.aligner: TemporalAligner | None = temporal_align or None
        self.max_pending, self.drop_late = max_pending, drop_late
        self.dropped = 0
        self.max_queued = 0
        self.latencies: collections.deque = collections.deque(maxlen=1024)

    def process(self, frame) -> torch.Tensor:
        """Depth of one frame (aligned to the frames before it when the stream aligns)."""
        depth = self.predict(_as_image(frame))
        return self.aligner(depth) if self.aligner is not None else depth

    def reset(self) -> None:
        """Forget the previous frames (a new scene or camera)."""
        if self.aligner is not None:
            self.aligner.reset()

    def __call__(self, frames: Iterable) -> Iterator[StreamResult]:
        queue: collections.deque = collections.deque()
        cond = threading.Condition()
        state = {"stop": False, "error": None, "dropped": 0}

        def read():
            try:
                for index, frame in enumerate(frames):
                    arrival = time.perf_counter()
                    with cond:
                        while len(queue) >= self.max_pending and not self.drop_late and not state["stop"]:
                            cond.wait()
                        if state["stop"]:
                            return
                        if len(queue) >= self.max_pending:
                            queue.popleft()
                            state["dropped"] += 1
                        queue.append((index, arrival, frame))
                        self.max_queued = max(self.max_queued, len(queue))
                        cond.notify_all()
            except BaseException as exc:  # handed to the consumer, raised there
                with cond:
                    state["error"] = exc
            finally:
                with cond:
                    queue.append(_END)
                    cond.notify_all()

        reader = threading.Thread(target=read, name="dpt-fast-stream-reader", daemon=True)
        reader.start()
        self._reader = reader
        try:
            while True:
                with cond:
                    while not queue:
                        cond.wait()
                    item = queue.popleft()
                    dropped, state["dropped"] = state["dropped"], 0
                    cond.notify_all()
                if item is _END:
                    if state["error"] is not None:
                        raise state["error"]
                    return
                index, arrival, frame = item
                depth = self.process(frame)
                latency = time.perf_counter() - arrival
                self.dropped += dropped
                self.latencies.append(latency)
                yield StreamResult(index, depth, arrival, latency, dropped)
        finally:  # the consumer stopped (or finished): let the reader end at its next frame
            with cond:
                state["stop"] = True
                cond.notify_all()


def measure_latency(stream: DepthStream, height: int = 240, width: int = 320, frames: int = 20, warmup: int = 3,
                    camera_fps: float = 30.0, seed: int = 0) -> dict[str, float]:
    """Time `stream` on random frames: the compute time of one frame, then a simulated camera that
    delivers `frames` frames at `camera_fps` through the stream as configured (its queue and dropping).

    Returns {"compute_median_ms": one frame's prediction (+ alignment) alone, "latency_median_ms",
    "latency_p90_ms", "latency_max_ms": arrival to result under the camera, "processed", "dropped"}.
    """
    rng = np.random.default_rng(seed)
    images = [torch.from_numpy(rng.integers(0, 256, (3, height, width), dtype=np.uint8)) for _ in range(frames)]
    for image in images[:warmup]:
        stream.process(image)
    compute = []
    for image in images:
        start = time.perf_counter()
        stream.process(image)
        compute.append(time.perf_counter() - start)
    stream.reset()

    def camera():
        start = time.perf_counter()
        for i, image in enumerate(images):
            time.sleep(max(0.0, start + i / camera_fps - time.perf_counter()))
            yield image

    dropped_before = stream.dropped
    latencies = [result.latency for result in stream(camera())]
    ms = np.array(latencies) * 1e3
    return {"compute_median_ms": float(np.median(compute) * 1e3), "latency_median_ms": float(np.median(ms)),
            "latency_p90_ms": float(np.percentile(ms, 90)), "latency_max_ms": float(ms.max()),
            "processed": len(latencies), "dropped": stream.dropped - dropped_before}
