"""Training losses of the DPT paper (Ranftl et al., 2021), which follows MiDaS (Ranftl et al., 2020).

Depth (relative, on inverse depth = disparity). All tensors are [B, H, W]; `mask` is boolean (True =
valid pixel); M_n is the number of valid pixels of image n.

- Scale-and-shift alignment: per image, (s, t) = argmin sum_mask (s*pred + t - target)^2, solved in
  closed form (`align_least_squares`).
- `ssi_mse_loss`:     1/(2 M_n) sum (s*pred + t - target)^2                   (MiDaS L_ssimse)
- `ssi_trimmed_loss`: both maps normalised robustly, d^ = (d - median(d)) / mean|d - median(d)|, then
                      1/(2 M_n) sum of the smallest (1 - trim) * M_n residuals |d^ - d*^|, trim = 0.2
                      (MiDaS L_ssitrim, the loss the DPT paper trains with).
- `gradient_matching_loss`: 1/M_n sum_k sum (|grad_x R^k| + |grad_y R^k|), R = aligned pred - target,
                      k = 4 scales, scale k taking every 2^k-th pixel (MiDaS L_reg).
- `ScaleShiftInvariantLoss`: L_ssi + alpha * L_reg with alpha = 0.5, the paper's combination.

Metric fine-tuning (NYU / KITTI): the network output is first mapped to metric depth by one global
scale and shift (the average of per-sample alignments: dpt_fast.train.estimate_metric_alignment), then
trained with Eigen et al.'s scale-invariant log loss `silog_loss`. Depth Anything's metric models
predict metres themselves and train on the square root of that loss (`root=True`).

Depth Anything's relative models predict disparity (inverse depth) as MiDaS and DPT do, so they train
with the same scale-and-shift-invariant losses on the same disparity targets.

Segmentation: `segmentation_loss`, cross-entropy on the main logits plus 0.2 x the auxiliary head's,
with an ignore index (255).

Reductions: "image" (default) computes each image's loss normalised by its own valid pixels and
averages over images, as the papers' equations are written (and so the loss of a batch split across
DDP ranks averages to the loss of the whole batch); "batch" divides the batch's summed loss by the
batch's total valid pixels, as the MiDaS training code does; "none" returns the per-image losses [B].
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "align_least_squares", "apply_alignment", "normalize_median", "ssi_mse_loss", "ssi_trimmed_loss",
    "gradient_matching_loss", "ScaleShiftInvariantLoss", "silog_loss", "segmentation_loss",
]

_REDUCTIONS = ("image", "batch", "none")


def _check(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if pred.dim() != 3 or pred.shape != target.shape:
        raise ValueError(f"expected pred and target of the same shape [B, H, W], got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")
    if mask is None:
        return torch.ones_like(target, dtype=torch.bool)
    if mask.shape != pred.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from pred shape {tuple(pred.shape)}")
    return mask.bool()


def _reduce(numerator: torch.Tensor, denominator: torch.Tensor, reduction: str) -> torch.Tensor:
    """numerator, denominator: per image [B]. Images without valid pixels contribute nothing."""
    if reduction == "batch":
        total = denominator.sum()
        return numerator.sum() / total.clamp_min(1)
    per_image = numerator / denominator.clamp_min(1)
    if reduction == "none":
        return per_image
    if reduction == "image":
        return per_image.mean()
    raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def align_least_squares(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
                        trim: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image scale and shift [B] minimising sum_mask (scale * pred + shift - target)^2.

    Closed form of the 2x2 normal equations (computed in float64 at least). An image whose system is
    singular (fewer than two distinct valid predictions) gets scale 0 and shift = mean target.
    `trim` > 0 refits once without the largest `trim` fraction of residuals of the first fit (a robust
    variant for estimating alignments of a trained model). Not differentiated through.
    """
    mask = _check(pred, target, mask)
    with torch.no_grad():
        dtype = torch.promote_types(pred.dtype, torch.float64)
        p, g, m = pred.to(dtype), target.to(dtype), mask.to(dtype)
        g = torch.where(mask, g, torch.zeros((), dtype=dtype, device=g.device))  # tolerate inf/nan off-mask
        scale, shift = _solve_2x2(p, g, m)
        if trim > 0:
            residual = (scale[:, None, None] * p + shift[:, None, None] - g).abs()
            keep = _keep_smallest(residual, mask, 1.0 - trim)
            scale, shift = _solve_2x2(p, g, keep.to(dtype))
    return scale.to(pred.dtype), shift.to(pred.dtype)


def _solve_2x2(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = (1, 2)
    a00 = (m * p * p).sum(dims)
    a01 = (m * p).sum(dims)
    a11 = m.sum(dims)
    b0 = (m * p * g).sum(dims)
    b1 = (m * g).sum(dims)
    det = a00 * a11 - a01 * a01
    # singular when all valid predictions are equal: relative test on the centred second moment
    singular = det <= 1e-12 * a00.abs() * a11.clamp_min(1)
    safe_det = torch.where(singular, torch.ones_like(det), det)
    scale = torch.where(singular, torch.zeros_like(det), (a11 * b0 - a01 * b1) / safe_det)
    shift = torch.where(singular, b1 / a11.clamp_min(1), (a00 * b1 - a01 * b0) / safe_det)
    return scale, shift


def apply_alignment(pred: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """scale * pred + shift with per-image [B] (or scalar) scale and shift."""
    scale, shift = torch.as_tensor(scale, device=pred.device), torch.as_tensor(shift, device=pred.device)
    if scale.dim() == 1:
        scale, shift = scale[:, None, None], shift[:, None, None]
    return scale.to(pred.dtype) * pred + shift.to(pred.dtype)


def _keep_smallest(values: torch.Tensor, mask: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean [B, H, W]: the floor(fraction * M_n) smallest masked values of each image."""
    b = values.shape[0]
    flat = torch.where(mask, values, torch.full_like(values, float("inf"))).reshape(b, -1)
    order = flat.argsort(dim=1)
    count = torch.floor(mask.reshape(b, -1).sum(1).to(torch.float64) * fraction).to(torch.long)
    ranks = torch.arange(flat.shape[1], device=values.device).expand(b, -1)
    keep_sorted = ranks < count[:, None]
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    return keep.reshape(values.shape) & mask


def _masked_median(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-image lower median [B] of the masked values (torch.median's convention); 0 when none valid."""
    b = x.shape[0]
    flat = torch.where(mask, x, torch.full_like(x, float("inf"))).reshape(b, -1)
    ordered, _ = flat.sort(dim=1)
    count = mask.reshape(b, -1).sum(1)
    index = ((count - 1).clamp_min(0) // 2)[:, None]
    median = ordered.gather(1, index)[:, 0]
    return torch.where(count > 0, median, torch.zeros_like(median))


def normalize_median(x: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """MiDaS's robust normalisation: (x - median) / mean|x - median| over the valid pixels, per image.

    The median and the scale are taken as they are in the graph (they carry gradient, as in MiDaS).
    Values outside the mask are returned as 0.
    """
    mask = _check(x, x, mask)
    x = torch.where(mask, x, torch.zeros_like(x))
    shift = _masked_median(x, mask)[:, None, None]
    centred = torch.where(mask, x - shift, torch.zeros_like(x))
    count = mask.sum((1, 2)).clamp_min(1)
    scale = (centred.abs().sum((1, 2)) / count).clamp_min(eps)[:, None, None]
    return centred / scale


def _ssi_terms(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, trimmed: bool, trim: float):
    """(per-image data-term numerator [B], aligned prediction, aligned target) of L_ssitrim or L_ssimse."""
    if trimmed:
        pred_n, target_n = normalize_median(pred, mask), normalize_median(target, mask)
        residual = (pred_n - target_n).abs()
        keep = _keep_smallest(residual.detach(), mask, 1.0 - trim)
        numerator = torch.where(keep, residual, torch.zeros_like(residual)).sum((1, 2))
    else:
        scale, shift = align_least_squares(pred, target, mask)
        pred_n, target_n = apply_alignment(pred, scale, shift), target
        residual = torch.where(mask, pred_n - target_n, torch.zeros_like(pred))
        numerator = (residual * residual).sum((1, 2))
    return numerator, pred_n, target_n


def _prepare(pred, target, mask):
    mask = _check(pred, target, mask)
    return pred, torch.where(mask, target, torch.zeros_like(target)), mask  # off-mask inf/nan -> 0


def ssi_mse_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
                 reduction: str = "image") -> torch.Tensor:
    """MiDaS L_ssimse: least-squares-aligned prediction, 1/(2M) sum of squared residuals."""
    pred, target, mask = _prepare(pred, target, mask)
    numerator, _, _ = _ssi_terms(pred, target, mask, trimmed=False, trim=0.0)
    return _reduce(numerator, 2 * mask.sum((1, 2)), reduction)


def ssi_trimmed_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
                     trim: float = 0.2, reduction: str = "image") -> torch.Tensor:
    """MiDaS L_ssitrim: median/mean-absolute-deviation normalisation of prediction and target, then
    1/(2M) sum of the (1 - trim) * M smallest absolute residuals (the largest `trim` are dropped)."""
    pred, target, mask = _prepare(pred, target, mask)
    numerator, _, _ = _ssi_terms(pred, target, mask, trimmed=True, trim=trim)
    return _reduce(numerator, 2 * mask.sum((1, 2)), reduction)


def gradient_matching_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
                           scales: int = 4, reduction: str = "image") -> torch.Tensor:
    """MiDaS L_reg on already aligned maps: sum over `scales` of 1/M sum(|grad_x R| + |grad_y R|),
    R = pred - target, at scale k every 2^k-th pixel; a difference counts when both pixels are valid.
    M is the number of valid pixels at each scale."""
    pred, target, mask = _prepare(pred, target, mask)
    total = 0
    for k in range(scales):
        step = 2 ** k
        m = mask[:, ::step, ::step]
        r = torch.where(m, pred[:, ::step, ::step] - target[:, ::step, ::step], torch.zeros((), dtype=pred.dtype, device=pred.device))
        grad_x = (r[:, :, 1:] - r[:, :, :-1]).abs() * (m[:, :, 1:] & m[:, :, :-1])
        grad_y = (r[:, 1:, :] - r[:, :-1, :]).abs() * (m[:, 1:, :] & m[:, :-1, :])
        total = total + _reduce(grad_x.sum((1, 2)) + grad_y.sum((1, 2)), m.sum((1, 2)), reduction)
    return total


class ScaleShiftInvariantLoss(nn.Module):
    """The DPT/MiDaS depth objective on inverse depth: L_ssi + alpha * L_reg (alpha = 0.5, 4 scales).

    trimmed=True (default): L_ssitrim on robustly normalised maps, gradient matching on those
    normalised maps (the paper's loss). trimmed=False: L_ssimse with least-squares alignment,
    gradient matching on the aligned prediction. alpha=0 disables gradient matching (sparse ground
    truth such as KITTI). Computed in float32 whatever the prediction's dtype.
    """

    def __init__(self, alpha: float = 0.5, scales: int = 4, trimmed: bool = True, trim: float = 0.2,
                 reduction: str = "image"):
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.alpha, self.scales, self.trimmed, self.trim, self.reduction = alpha, scales, trimmed, trim, reduction

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        pred, target, mask = _prepare(pred.float(), target.float(), mask)
        numerator, pred_n, target_n = _ssi_terms(pred, target, mask, self.trimmed, self.trim)
        loss = _reduce(numerator, 2 * mask.sum((1, 2)), self.reduction)
        if self.alpha > 0:
            loss = loss + self.alpha * gradient_matching_loss(pred_n, target_n, mask, self.scales, self.reduction)
        return loss


def silog_loss(pred_depth: torch.Tensor, target_depth: torch.Tensor, mask: torch.Tensor | None = None,
               lambd: float = 0.5, eps: float = 1e-8, reduction: str = "image", root: bool = False) -> torch.Tensor:
    """Eigen et al. (2014) scale-invariant log loss on metric depth, per image:
    1/n sum d_i^2 - lambd/n^2 (sum d_i)^2, d = log(pred) - log(target) over valid pixels (target > 0).
    lambd = 0.5 as Eigen et al. train (1 gives the fully scale-invariant error, 0 the log MSE).
    root=True takes the square root of that (per image, or of the batch's with reduction="batch"), the
    form Depth Anything's metric fine-tuning minimises; an image without valid pixels then adds a
    constant 1e-4 with no gradient."""
    mask = _check(pred_depth, target_depth, mask)
    mask = mask & (target_depth > 0)
    one = torch.ones_like(pred_depth)
    d = torch.where(mask, torch.log(pred_depth.float().clamp_min(eps)) - torch.log(torch.where(mask, target_depth, one).float()),
                    torch.zeros_like(pred_depth, dtype=torch.float32))
    n = mask.sum((1, 2)).to(d.dtype)
    # >= (1 - lambd) mean(d)^2 >= 0 exactly; the clamp keeps rounding (and empty images) off sqrt's pole
    finish = (lambda value: value.clamp_min(1e-8).sqrt()) if root else (lambda value: value)
    if reduction == "batch":
        total = n.sum().clamp_min(1)
        return finish((d * d).sum() / total - lambd * d.sum() ** 2 / total ** 2)
    per_image = finish((d * d).sum((1, 2)) / n.clamp_min(1) - lambd * d.sum((1, 2)) ** 2 / n.clamp_min(1) ** 2)
    if reduction == "none":
        return per_image
    if reduction == "image":
        return per_image.mean()
    raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, aux_logits: torch.Tensor | None = None,
                      aux_weight: float = 0.2, ignore_index: int = 255) -> torch.Tensor:
    """Cross-entropy on the main logits [B, C, H, W] plus aux_weight x that of the auxiliary head.

    Logits at another resolution than the labels [B, H, W] (the auxiliary head predicts at half
    resolution) are upsampled bilinearly (align_corners=True, as the heads upsample) before the loss,
    as in the protocol of Zhang et al. that the paper follows. Labels equal to ignore_index count for
    nothing; the loss is the mean over the other pixels of the batch.
    """
    target = target.long()

    def ce(x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != target.shape[-2:]:
            x = F.interpolate(x.float(), size=target.shape[-2:], mode="bilinear", align_corners=True)
        return F.cross_entropy(x.float(), target, ignore_index=ignore_index)

    loss = ce(logits)
    if aux_logits is not None and aux_weight:
        loss = loss + aux_weight * ce(aux_logits)
    return loss
