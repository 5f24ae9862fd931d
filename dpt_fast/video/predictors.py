"""Which sequence function runs a model over a video: per frame, or in Video Depth Anything's windows.

    predict, per_frame = sequence_predictor(model, size=518)
    predict_videos(sources, "depth/", predict, per_frame=per_frame)

Single-frame models (DPT, Depth Anything) predict each frame on its own (`model_predictor`, with the
model family's preprocessing); Video Depth Anything predicts 32-frame windows and aligns them
(`windowed_video_depth`), so it is given the whole sequence (`per_frame` False).
"""
from __future__ import annotations

from typing import Callable

import torch

__all__ = ["is_video_model", "sequence_predictor"]


def is_video_model(model) -> bool:
    """A model that takes clips [B, T, 3, H, W] (Video Depth Anything), not single images."""
    return (getattr(model, "config", None) or {}).get("model_class") == "VideoDepthAnythingModel"


def sequence_predictor(model, *, size: int | None = 0, device=None, autocast_dtype: torch.dtype | None = None,
                       metric: bool = False) -> tuple[Callable, bool]:
    """(predict, per_frame) for `dpt_fast.video.batch.predict_videos`.

    size: the processing size (0: the family's default, 384 for DPT and 518 for Depth Anything; None:
    each frame's own resolution rounded to the model's multiple). metric: for Video Depth Anything,
    whether the model's output is metric depth, which the windowed procedure must not rescale (the
    release's `metric_video_depth_anything_*` files).
    """
    if not is_video_model(model):
        from .stream import model_predictor
        return model_predictor(model, size=size, device=device, autocast_dtype=autocast_dtype), True

    from ..models.video_depth_anything import window_predictor
    from ..transforms import DEPTH_ANYTHING_SIZE, depth_anything_preprocess
    from .windows import windowed_video_depth
    target = DEPTH_ANYTHING_SIZE if size == 0 else size

    def prepare(frame) -> torch.Tensor:
        return depth_anything_preprocess(getattr(frame, "image", frame), size=target)[0]

    predict_window = window_predictor(model, prepare, device=device, autocast_dtype=autocast_dtype)

    def predict(frames):
        return windowed_video_depth(frames, predict_window, metric=metric)
    return predict, False
