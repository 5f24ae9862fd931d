"""Temporal consistency of predicted depth sequences, without optical flow.

`temporal_consistency(predictions, targets=None, static_mask=None)` measures, after ONE scale and
shift for the whole sequence (so per-frame jumps in scale are not hidden by the alignment itself):

  flicker         the mean absolute change of the prediction between consecutive frames, at the same
                  pixel, over `static_mask` (all pixels if none). On a static camera every change is
                  flicker; with a moving camera it also contains the true change.
  temporal_error  (with targets) the flow-free variant: the mean absolute difference between the
                  predicted and the true change between consecutive frames at the same pixel,
                  |(p_t - p_t-1) - (g_t - g_t-1)|. Zero for a perfect predictor under any camera move,
                  so it separates flicker from motion on synthetic sequences whose truth is known.
  true_change     (with targets) the same-pixel mean absolute change of the truth (the motion's scale).
  abs_rel         (with targets) the mean |p - g| / g over the sequence after the one alignment.

With targets, the prediction is aligned to them by least squares over all frames and every number is
divided by the targets' mean absolute value; without, the prediction is normalised by its median and
mean absolute deviation over the whole sequence. Pass disparities (inverse depth) for relative models.

`evaluate_synthetic(predict, ...)` renders the library's synthetic camera moves
(`dpt_fast.video.synthetic`), runs a per-frame predictor on them (optionally temporally aligned) and
reports these numbers per motion.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from .align import TemporalAligner
from .synthetic import MOTIONS, camera_sequence

__all__ = ["temporal_consistency", "evaluate_synthetic"]


def _stack(frames) -> torch.Tensor:
    if isinstance(frames, torch.Tensor):
        return frames.detach().double().cpu()
    if isinstance(frames, np.ndarray):
        return torch.from_numpy(frames).double()
    return torch.stack([torch.as_tensor(f).detach().double().cpu().reshape(torch.as_tensor(f).shape[-2:])
                        for f in frames])


def temporal_consistency(predictions, targets=None, static_mask=None, mask=None) -> dict[str, float]:
    """Predictions (and targets) as [T, H, W] tensors/arrays or sequences of [H, W] frames -> dict.

    static_mask: bool [H, W] (or [T, H, W]) where `flicker` is measured. mask: bool [H, W] or
    [T, H, W] of valid pixels for everything (targets' non-finite pixels are invalid too).
    """
    p = _stack(predictions)
    if p.dim() != 3 or p.shape[0] < 2:
        raise ValueError(f"expected at least 2 frames [T, H, W], got shape {tuple(p.shape)}")
    valid = torch.isfinite(p)
    if mask is not None:
        valid &= torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask).bool().expand_as(p)
    result: dict[str, float] = {"frames": float(p.shape[0])}
    if targets is not None:
        g = _stack(targets)
        if g.shape != p.shape:
            raise ValueError(f"predictions {tuple(p.shape)} and targets {tuple(g.shape)} differ in shape")
        valid &= torch.isfinite(g)
        x, y = p[valid], g[valid]
        x_mean, y_mean = x.mean(), y.mean()
        scale = ((x - x_mean) * (y - y_mean)).sum() / ((x - x_mean) ** 2).sum().clamp_min(1e-30)
        p = scale * p + (y_mean - scale * x_mean)
        unit = y.abs().mean()
    else:
        x = p[valid]
        median = x.median()
        p = (p - median) / (x - median).abs().mean().clamp_min(1e-30)
        g, unit = None, torch.tensor(1.0, dtype=torch.float64)
    pair = valid[1:] & valid[:-1]
    static = pair if static_mask is None else pair & torch.as_tensor(
        np.asarray(static_mask) if not isinstance(static_mask, torch.Tensor) else static_mask).bool().expand_as(pair)
    change = (p[1:] - p[:-1]).abs()
    result["flicker"] = float(change[static].mean() / unit) if static.any() else float("nan")
    if g is not None:
        true_change = g[1:] - g[:-1]
        result["temporal_error"] = float(((p[1:] - p[:-1]) - true_change).abs()[pair].mean() / unit)
        result["true_change"] = float(true_change.abs()[pair].mean() / unit)
        result["abs_rel"] = float(((p - g).abs() / g.abs().clamp_min(1e-30))[valid].mean())
    return result


def evaluate_synthetic(predict: Callable[[torch.Tensor], torch.Tensor], motions: Sequence[str] = MOTIONS,
                       num_frames: int = 12, height: int = 64, width: int = 96, seed: int = 0,
                       temporal_align: bool = False, aligner_kwargs: dict | None = None) -> dict[str, dict[str, float]]:
    """Temporal consistency of `predict` on the synthetic camera moves, per motion.

    predict: uint8 RGB image [3, H, W] -> predicted disparity (inverse depth) [H, W] at the same size
    (e.g. a model with `dpt_fast.transforms` pre/post-processing). temporal_align runs the predictions
    through a TemporalAligner(**aligner_kwargs) first. The targets are the true disparities.
    """
    report = {}
    for motion in motions:
        sequence = camera_sequence(motion, num_frames=num_frames, height=height, width=width, seed=seed)
        aligner = TemporalAligner(**(aligner_kwargs or {})) if temporal_align else None
        predictions = []
        for image in sequence["images"]:
            with torch.no_grad():
                prediction = predict(torch.from_numpy(image).permute(2, 0, 1).contiguous())
            prediction = prediction.detach().float().cpu().reshape(height, width)
            predictions.append(aligner(prediction) if aligner is not None else prediction)
        report[motion] = temporal_consistency(predictions, sequence["disparity"])
    return report
