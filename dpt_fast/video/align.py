"""Temporal alignment for single-frame depth models: per-frame scale and shift fitted to the previous frame.

What it is: relative depth models (DPT/MiDaS, Depth Anything) predict each frame's inverse depth only
up to an unknown scale and shift, and the two change from frame to frame, which is seen as flicker.
`TemporalAligner` fits, for each new frame, the scale s > 0 and shift b that bring s * prediction + b
closest to the previous aligned frame, pixel for pixel, by iteratively trimmed least squares (fit,
keep the pixels whose residual is small against the median residual, refit; started from a match of
medians and median absolute deviations, so that outliers cannot steer the first fit), and returns the
aligned frame. It does not track motion: the
"overlap" is the same pixel in both frames, which is right for the static parts of a scene and for
small camera moves between consecutive frames; regions that move are what the trimming drops. It
removes the per-frame jumps in scale and shift, not errors of shape, and slow drift over long moves
remains possible (each frame is tied to the one before, not to a fixed anchor).

The fit is done in disparity (inverse depth) space, where relative models are affine-ambiguous; for
a model that outputs depth, pass space="depth" and the aligner inverts before and after the fit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["fit_scale_shift", "TemporalAligner", "align_sequence"]


def _sample(values: torch.Tensor, max_points: int) -> torch.Tensor:
    """A deterministic, evenly strided subset (keeps the fit's cost bounded on large frames)."""
    if values.numel() <= max_points:
        return values
    step = -(-values.numel() // max_points)
    return values[::step]


def _least_squares(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float] | None:
    x_mean, y_mean = x.mean(), y.mean()
    dx = x - x_mean
    var = (dx * dx).sum()
    if not torch.isfinite(var) or var <= 1e-12 * max(float((x * x).sum()), 1e-30):
        return None
    scale = (dx * (y - y_mean)).sum() / var
    return float(scale), float(y_mean - scale * x_mean)


def fit_scale_shift(source: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, *,
                    trim: float = 0.2, threshold: float = 3.0, iterations: int = 6, max_points: int = 1 << 14,
                    min_points: int = 16) -> tuple[float, float] | None:
    """(scale, shift) fitting scale * source + shift to target by trimmed least squares, or None.

    Pixels that are non-finite in either map, or False in `mask`, are ignored. The start matches the
    medians and median absolute deviations of the two maps (robust to a minority of outliers). Each of
    `iterations` rounds then solves least squares on the inliers of the current fit: the pixels whose
    residual is within `threshold` robust standard deviations (1.4826 * the median absolute residual)
    and, at most, the (1 - trim) fraction with the smallest residuals. None when fewer than
    `min_points` pixels are usable or `source` is constant on them.
    """
    if source.shape != target.shape:
        raise ValueError(f"source {tuple(source.shape)} and target {tuple(target.shape)} differ in shape")
    if not 0.0 <= trim < 1.0:
        raise ValueError(f"trim must be in [0, 1), got {trim}")
    x, y = source.detach().reshape(-1).double(), target.detach().reshape(-1).double()
    valid = torch.isfinite(x) & torch.isfinite(y)
    if mask is not None:
        valid &= mask.reshape(-1).to(torch.bool).to(x.device)
    x, y = _sample(x[valid], max_points), _sample(y[valid], max_points)
    if x.numel() < min_points:
        return None
    x_med, y_med = x.median(), y.median()
    x_dev, y_dev = (x - x_med).abs().median(), (y - y_med).abs().median()
    if x_dev <= 0:
        return None
    scale = float(y_dev / x_dev)
    shift = float(y_med - scale * x_med)
    keep = max(min_points, int(round(x.numel() * (1.0 - trim))))
    for _ in range(iterations):
        residual = (scale * x + shift - y).abs()
        bound = threshold * 1.4826 * residual.median()
        if keep < x.numel():  # the trim caps the inlier count
            bound = torch.minimum(bound, residual.kthvalue(keep).values)
        inliers = residual <= bound
        if int(inliers.sum()) < min_points:
            inliers = residual <= residual.kthvalue(min_points).values
        fit = _least_squares(x[inliers], y[inliers])
        if fit is None:
            return None
        scale, shift = fit
    finite = all(v == v and abs(v) != float("inf") for v in (scale, shift))
    return (scale, shift) if finite else None


class TemporalAligner:
    """Stateful per-frame scale/shift alignment of a single-frame model's output (see the module doc).

    aligner = TemporalAligner()
    for prediction in per_frame_predictions:          # [H, W] (or [1, H, W]) tensors, one frame at a time
        aligned = aligner(prediction)                 # same shape; the first frame is returned as is

    space: "disparity" (the prediction is inverse depth, as relative models output) or "depth".
    momentum: 0 aligns to the previous aligned frame; m in (0, 1) aligns to an exponential average of
      the aligned frames (reference = m * reference + (1 - m) * aligned), which averages out fitting
      noise on a static camera but lags behind camera moves.
    When a fit is impossible (too few valid pixels, a constant frame, or a non-positive scale), the
    previous frame's scale and shift are reused and `last_fit_ok` is False. `scale`/`shift` hold the
    values applied to the last frame; `reset()` starts a new sequence. Memory: one reference frame.
    """

    def __init__(self, space: str = "disparity", trim: float = 0.2, threshold: float = 3.0, iterations: int = 6,
                 momentum: float = 0.0, max_points: int = 1 << 14):
        if space not in ("disparity", "depth"):
            raise ValueError(f"space must be 'disparity' or 'depth', got {space!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.space, self.trim, self.threshold, self.iterations = space, trim, threshold, iterations
        self.momentum, self.max_points = momentum, max_points
        self.reset()

    def reset(self) -> None:
        self.reference: torch.Tensor | None = None
        self.scale, self.shift = 1.0, 0.0
        self.last_fit_ok = True
        self.frames_seen = 0

    def _to_disparity(self, values: torch.Tensor) -> torch.Tensor:
        if self.space == "disparity":
            return values
        return torch.where(values > 0, 1.0 / values.clamp_min(1e-12), torch.full_like(values, float("nan")))

    def _from_disparity(self, values: torch.Tensor) -> torch.Tensor:
        if self.space == "disparity":
            return values
        return torch.where(values > 0, 1.0 / values.clamp_min(1e-12), torch.full_like(values, float("inf")))

    def __call__(self, prediction: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Align one frame; `mask` (bool, same shape) marks pixels that may be used for the fit."""
        disparity = self._to_disparity(prediction.detach().float())
        if self.reference is None:
            aligned = disparity
            self.last_fit_ok = True
        else:
            reference = self.reference
            if reference.shape[-2:] != disparity.shape[-2:]:  # a change of resolution mid-sequence
                reference = F.interpolate(reference.reshape(1, 1, *reference.shape[-2:]), size=disparity.shape[-2:],
                                          mode="bilinear", align_corners=False).reshape(disparity.shape)
            fit = fit_scale_shift(disparity, reference.reshape(disparity.shape), mask, trim=self.trim,
                                  threshold=self.threshold, iterations=self.iterations, max_points=self.max_points)
            self.last_fit_ok = fit is not None and fit[0] > 0
            if self.last_fit_ok:
                self.scale, self.shift = fit
            aligned = disparity * self.scale + self.shift
        if self.reference is None or self.momentum == 0.0 or self.reference.shape != aligned.shape:
            self.reference = aligned
        else:
            self.reference = self.momentum * self.reference + (1.0 - self.momentum) * aligned
        self.frames_seen += 1
        return self._from_disparity(aligned).to(prediction.dtype)


def align_sequence(predictions, mask=None, **kwargs) -> list[torch.Tensor]:
    """Align a whole sequence with one TemporalAligner(**kwargs); `mask` is one mask for every frame or None."""
    aligner = TemporalAligner(**kwargs)
    return [aligner(p, mask) for p in predictions]
