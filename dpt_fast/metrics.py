"""Evaluation metrics: depth (AbsRel, delta < 1.25, RMSE after alignment) and segmentation (pixel
accuracy, mIoU from an accumulated confusion matrix).

Depth follows the MiDaS zero-shot protocol: a relative prediction in inverse depth is aligned per
image to the ground-truth inverse depth by least squares (scale and shift), clamped to the depth cap,
inverted to depth, and compared with the ground truth on the valid pixels; per-image values are
averaged over images. Metric predictions (depth) are compared as they are with align=False.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .losses import align_least_squares, apply_alignment

__all__ = ["depth_metrics", "DepthMetrics", "ConfusionMatrix"]

DEPTH_METRICS = ("abs_rel", "delta1", "rmse")


def depth_metrics(pred: torch.Tensor, target_depth: torch.Tensor, mask: torch.Tensor | None = None, *,
                  align: bool = True, pred_is_disparity: bool = True, max_depth: float | None = None,
                  min_depth: float = 1e-3) -> dict[str, torch.Tensor]:
    """Per-image {"abs_rel", "delta1", "rmse"} as float64 tensors [B], and "pixels" [B] (valid count).

    pred: [B, H, W] inverse depth (pred_is_disparity=True, the relative model's output) or depth.
    target_depth: [B, H, W] ground-truth depth; valid where mask (default: all) and
    min_depth < target (< max_depth when given). align: fit per-image scale and shift by least squares
    in the prediction's space (inverse depth against 1/target, or depth against target) first.
    The prediction's depth is clamped to [min_depth, max_depth] before the errors are taken.
    """
    if pred.shape != target_depth.shape or pred.dim() != 3:
        raise ValueError(f"expected pred and target [B, H, W] of one shape, got {tuple(pred.shape)}, "
                         f"{tuple(target_depth.shape)}")
    pred, target = pred.detach().double(), target_depth.detach().double()
    valid = torch.isfinite(target) & (target > min_depth)
    if max_depth is not None:
        valid &= target < max_depth
    if mask is not None:
        valid &= mask.bool()
    safe_target = torch.where(valid, target, torch.ones_like(target))
    if pred_is_disparity:
        if align:
            pred = apply_alignment(pred, *align_least_squares(pred, 1.0 / safe_target, valid))
        low = 1.0 / max_depth if max_depth is not None else 1.0 / 1e8
        depth = 1.0 / pred.clamp(low, 1.0 / min_depth)
    else:
        if align:
            pred = apply_alignment(pred, *align_least_squares(pred, safe_target, valid))
        depth = pred.clamp(min_depth, max_depth if max_depth is not None else float("inf"))
    n = valid.sum((1, 2)).clamp_min(1)
    zero = torch.zeros_like(depth)
    abs_rel = torch.where(valid, (depth - safe_target).abs() / safe_target, zero).sum((1, 2)) / n
    ratio = torch.maximum(depth / safe_target, safe_target / depth)
    delta1 = torch.where(valid, (ratio < 1.25).double(), zero).sum((1, 2)) / n
    rmse = (torch.where(valid, (depth - safe_target) ** 2, zero).sum((1, 2)) / n).sqrt()
    return {"abs_rel": abs_rel, "delta1": delta1, "rmse": rmse, "pixels": valid.sum((1, 2))}


class DepthMetrics:
    """Running mean over images of depth_metrics(); images without valid pixels are skipped."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.sums = torch.zeros(len(DEPTH_METRICS), dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.float64)

    def update(self, pred: torch.Tensor, target_depth: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        values = depth_metrics(pred, target_depth, mask, **self.kwargs)
        used = values["pixels"] > 0
        self.sums += torch.stack([values[k][used].sum() for k in DEPTH_METRICS]).cpu()
        self.count += used.sum().cpu()

    def all_reduce(self) -> None:
        """Sum the accumulators over the ranks of the default process group (no-op without one)."""
        if dist.is_available() and dist.is_initialized():
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            packed = torch.cat([self.sums, self.count[None]]).to(device)
            dist.all_reduce(packed)
            self.sums, self.count = packed[:-1].cpu(), packed[-1].cpu()

    def compute(self) -> dict[str, float]:
        n = max(float(self.count), 1.0)
        return {k: float(v) / n for k, v in zip(DEPTH_METRICS, self.sums)}


class ConfusionMatrix:
    """Accumulates a num_classes x num_classes confusion matrix (rows: ground truth, columns:
    prediction); labels equal to ignore_index (or outside [0, num_classes)) are skipped."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred: class indices [B, H, W] or logits [B, C, H, W]; target: labels [B, H, W]."""
        if pred.dim() == target.dim() + 1:
            pred = pred.argmax(1)
        pred, target = pred.detach().reshape(-1).long(), target.detach().reshape(-1).long()
        keep = (target != self.ignore_index) & (target >= 0) & (target < self.num_classes)
        index = target[keep] * self.num_classes + pred[keep].clamp(0, self.num_classes - 1)
        counts = torch.bincount(index, minlength=self.num_classes ** 2)
        self.matrix += counts.reshape(self.num_classes, self.num_classes).cpu()

    def all_reduce(self) -> None:
        if dist.is_available() and dist.is_initialized():
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            m = self.matrix.to(device)
            dist.all_reduce(m)
            self.matrix = m.cpu()

    def pixel_accuracy(self) -> float:
        total = self.matrix.sum()
        return float(self.matrix.diag().sum()) / max(float(total), 1.0)

    def iou(self) -> torch.Tensor:
        """Per-class IoU [C] (float64); NaN for classes absent from both ground truth and prediction."""
        tp = self.matrix.diag().double()
        union = self.matrix.sum(0).double() + self.matrix.sum(1).double() - tp
        return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))

    def mean_iou(self) -> float:
        """Mean IoU over the classes that occur in the ground truth or the prediction."""
        iou = self.iou()
        present = ~torch.isnan(iou)
        return float(iou[present].mean()) if present.any() else 0.0

    def compute(self) -> dict[str, float]:
        return {"pixel_accuracy": self.pixel_accuracy(), "miou": self.mean_iou()}
