"""Video Depth Anything's windowed inference over a whole video, as a pure procedure over a window model.

The published procedure (Video Depth Anything, `infer_video_depth`; its constants are "do not
change" settings of the release):

- Windows of INFER_LEN = 32 frames start every INFER_LEN - OVERLAP = 22 frames (OVERLAP = 10), at
  0, 22, 44, ... while the start is inside the video; the video is padded at its end with copies of
  its last frame so that the last window is full.
- In every window after the first, the first OVERLAP positions are replaced by the previous window's
  (already substituted) inputs at KEYFRAMES = [0, 12, 24, 25, ..., 31]. Unrolled: position 0 is always
  the video's first frame, position 1 the frame 10 before the window's start, and positions 2..9 the
  frames start + 2 .. start + 9 (the previous window's last 8, which are the same frames).
- The window model predicts all 32 positions. The first window's predictions are kept as they are.
  Each later window gets one scale and shift, by least squares fitting its predictions at positions
  0 and 1 (the two key frames, align_len = OVERLAP - INTERP_LEN = 2) to the reference: the first
  window's prediction of frame 0 and the previous window's aligned prediction at position 12.
  Scaled predictions are clamped at 0. The INTERP_LEN = 8 frames both windows predicted (positions
  24..31 of the previous, 2..9 of the current) are blended linearly, weight i / 7 on the new window
  for the i-th of them; the positions 10..31 follow. A metric model skips the scale and shift.

`window_plan(num_frames)` gives each window's source-frame indices; `merge_windows(...)` turns the
windows' predictions into one aligned depth per frame; `windowed_video_depth(frames, predict_window)`
drives both over a lazily read frame sequence. All three hold at most one window of frames or
predictions (plus frame 0 and the references), not the whole video: a frame's depth is emitted as
soon as no later window can change it.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch

__all__ = ["INFER_LEN", "OVERLAP", "KEYFRAMES", "INTERP_LEN", "window_plan", "merge_windows",
           "windowed_video_depth", "least_squares_scale_shift"]

INFER_LEN = 32
OVERLAP = 10
KEYFRAMES = (0, 12, 24, 25, 26, 27, 28, 29, 30, 31)
INTERP_LEN = 8
STEP = INFER_LEN - OVERLAP        # 22: window starts
ALIGN_LEN = OVERLAP - INTERP_LEN  # 2: key frames used for the scale/shift fit
# blend weights of the new window over the INTERP_LEN shared frames: 0, 1/7, ..., 1
BLEND = tuple(i / (INTERP_LEN - 1) for i in range(INTERP_LEN))


def _num_windows(num_frames: int) -> int:
    return -(-num_frames // STEP)


def window_plan(num_frames: int) -> list[list[int]]:
    """Source-frame indices of every window's INFER_LEN positions (the end padded with the last frame)."""
    if num_frames < 1:
        raise ValueError(f"a video needs at least one frame, got {num_frames}")
    plan = []
    for w in range(_num_windows(num_frames)):
        start = w * STEP
        own = [min(start + i, num_frames - 1) for i in range(INFER_LEN)]
        if w > 0:  # position 0: frame 0 (carried through every window); 1: the previous window's position 12
            own[0], own[1] = 0, plan[-1][KEYFRAMES[1]]
        plan.append(own)
    return plan


def least_squares_scale_shift(prediction: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """Plain least squares (scale, shift) of prediction onto target over all pixels; (1, 0) if singular."""
    x, y = prediction.reshape(-1).double(), target.reshape(-1).double()
    a00, a01, a11 = (x * x).sum(), x.sum(), float(x.numel())
    b0, b1 = (x * y).sum(), y.sum()
    det = a00 * a11 - a01 * a01
    if det == 0:
        return 1.0, 0.0
    return float((a11 * b0 - a01 * b1) / det), float((a00 * b1 - a01 * b0) / det)


def _merge(window_depths: Iterable[torch.Tensor], metric: bool) -> Iterator[torch.Tensor]:
    """All STEP * windows + OVERLAP aligned frames (the padding included), each yielded once final."""
    tail: list[torch.Tensor] = []   # the last INTERP_LEN aligned frames, still to be blended
    reference: list[torch.Tensor] = []
    for count, depth in enumerate(window_depths):
        if depth.shape[0] != INFER_LEN:
            raise ValueError(f"a window prediction has {depth.shape[0]} frames, expected {INFER_LEN}")
        if count == 0:
            reference = [depth[KEYFRAMES[0]], depth[KEYFRAMES[1]]]
            yield from depth[:INFER_LEN - INTERP_LEN]
            tail = list(depth[INFER_LEN - INTERP_LEN:])
            continue
        if metric:
            scale, shift = 1.0, 0.0
        else:
            scale, shift = least_squares_scale_shift(depth[:ALIGN_LEN], torch.stack(reference))
        scaled = (depth * scale + shift).clamp_min(0)
        for old, new, weight in zip(tail, scaled[ALIGN_LEN:OVERLAP], BLEND):
            yield old * (1 - weight) + new * weight
        yield from scaled[OVERLAP:INFER_LEN - INTERP_LEN]
        tail = list(scaled[INFER_LEN - INTERP_LEN:])
        reference = [reference[0], scaled[KEYFRAMES[1]]]
    yield from tail


def merge_windows(window_depths: Iterable[torch.Tensor], num_frames: int, metric: bool = False) -> Iterator[torch.Tensor]:
    """Per-window predictions [INFER_LEN, H, W] (in `window_plan(num_frames)` order) -> the aligned
    depth [H, W] of frames 0 .. num_frames - 1, in order, each yielded as soon as it is final. Reading
    stops at the window that completes the last frame; too few windows raise ValueError."""
    expected = _num_windows(num_frames)
    windows = 0

    def counted():
        nonlocal windows
        for depth in window_depths:
            windows += 1
            yield depth
    for index, depth in enumerate(_merge(counted(), metric)):
        if index == num_frames:
            break
        yield depth
    else:
        if windows != expected:
            raise ValueError(f"got {windows} windows, a {num_frames}-frame video has {expected}")


def windowed_video_depth(frames: Iterable, predict_window: Callable[[list], torch.Tensor],
                         metric: bool = False) -> Iterator[torch.Tensor]:
    """Video Depth Anything's windowed inference over a lazily read sequence.

    frames: any iterable (decoded frames, or frames already preprocessed for the model; each is read
    once and kept only while a window still needs it). predict_window: a list of INFER_LEN items
    (frames of one window, in `window_plan` order) -> depth [INFER_LEN, H, W]. Yields the aligned depth
    [H, W] of every frame, in order, holding about two windows of frames at a time. The depths are
    those of `merge_windows` over every window of `window_plan`, except that a last window which can
    change no frame of the video (it starts one or two frames before the end) is not run.
    """
    iterator = iter(frames)
    buffer: dict[int, object] = {}
    first = None
    total = 0  # frames read so far
    exhausted = False

    def read_until(index: int) -> None:
        nonlocal total, exhausted, first
        while not exhausted and total <= index:
            try:
                item = next(iterator)
            except StopIteration:
                exhausted = True
                break
            if total == 0:
                first = item
            buffer[total] = item
            total += 1

    def windows():
        window = 0
        previous_key = None
        while True:
            start = window * STEP
            read_until(start + INFER_LEN - 1)
            if start >= total:
                if total == 0:
                    raise ValueError("the sequence has no frames")
                return
            last = total - 1
            if window == 0:
                items = [buffer[min(i, last)] for i in range(INFER_LEN)]
            else:
                items = [first, previous_key] + [buffer[min(start + i, last)] for i in range(ALIGN_LEN, INFER_LEN)]
            previous_key = items[KEYFRAMES[1]]
            keep_from = min(start + STEP + ALIGN_LEN, total - 1)  # the next window's position 2, or the last frame
            for index in [i for i in buffer if i < keep_from and i != 0]:
                del buffer[index]  # later windows read frame 0 and their positions 2.. (or padding) only
            yield predict_window(items)
            window += 1

    # Frame i is yielded only after the window holding it was formed, which read the sequence past
    # i or to its end, so `total` is known to exceed i or final by then.
    for index, depth in enumerate(_merge(windows(), metric)):
        if index >= total:
            return
        yield depth
