"""Losses and metrics against hand-computed cases and their defining invariances."""
import math

import pytest
import torch
import torch.nn.functional as F

from dpt_fast import losses
from dpt_fast.metrics import ConfusionMatrix, DepthMetrics, depth_metrics


def _row(*values):
    return torch.tensor([[values]], dtype=torch.float64)  # [1, 1, N]


def _random_case(seed=0, batch=3, size=(12, 10)):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(batch, *size, generator=g, dtype=torch.float64) + 0.1
    pred = target * 1.7 + 0.3 + 0.2 * torch.randn(batch, *size, generator=g, dtype=torch.float64)
    mask = torch.rand(batch, *size, generator=g) > 0.25
    return pred, target, mask


# --- alignment ---------------------------------------------------------------------------------------

def test_least_squares_alignment_recovers_scale_and_shift_under_the_mask():
    pred, _, mask = _random_case()
    target = 2.5 * pred - 0.3
    target[~mask] = float("nan")  # off-mask garbage must not matter
    scale, shift = losses.align_least_squares(pred, target, mask)
    torch.testing.assert_close(scale, torch.full((3,), 2.5, dtype=torch.float64))
    torch.testing.assert_close(shift, torch.full((3,), -0.3, dtype=torch.float64))


def test_least_squares_alignment_hand_case_and_singular_image():
    # p = 0,1,2,3; g = 1,0,2,3: cov = 4, var = 5 -> s = 0.8, t = 1.5 - 0.8 * 1.5 = 0.3
    scale, shift = losses.align_least_squares(_row(0, 1, 2, 3), _row(1, 0, 2, 3))
    torch.testing.assert_close(scale, torch.tensor([0.8], dtype=torch.float64))
    torch.testing.assert_close(shift, torch.tensor([0.3], dtype=torch.float64))
    scale, shift = losses.align_least_squares(_row(2, 2, 2), _row(1, 2, 6))
    assert scale.item() == 0 and shift.item() == pytest.approx(3.0)


def test_trimmed_alignment_ignores_an_outlier():
    p = torch.arange(10, dtype=torch.float64).view(1, 1, 10)
    g = 3 * p + 1
    g[0, 0, 4] = 100.0
    plain, _ = losses.align_least_squares(p, g)
    robust, robust_shift = losses.align_least_squares(p, g, trim=0.2)
    assert abs(plain.item() - 3) > 0.1
    assert robust.item() == pytest.approx(3.0) and robust_shift.item() == pytest.approx(1.0)


# --- scale-and-shift-invariant losses -----------------------------------------------------------------

def test_ssi_mse_hand_case():
    # aligned prediction 0.3, 1.1, 1.9, 2.7 against 1, 0, 2, 3: squared residuals sum 1.8, / (2 * 4)
    loss = losses.ssi_mse_loss(_row(0, 1, 2, 3), _row(1, 0, 2, 3))
    assert loss.item() == pytest.approx(0.225)


def test_ssi_trimmed_hand_case():
    # p = 0,1,2,3,10: median 2, mean |dev| 2.4 -> -0.8333, -0.4167, 0, 0.4167, 3.3333
    # g = 0,1,2,3,4:  median 2, mean |dev| 1.2 -> -1.6667, -0.8333, 0, 0.8333, 1.6667
    # |residuals| 0.8333, 0.4167, 0, 0.4167, 1.6667; keep the 4 smallest: 1.6667; / (2 * 5) = 1/6
    loss = losses.ssi_trimmed_loss(_row(0, 1, 2, 3, 10), _row(0, 1, 2, 3, 4))
    assert loss.item() == pytest.approx(1 / 6)
    untrimmed = losses.ssi_trimmed_loss(_row(0, 1, 2, 3, 10), _row(0, 1, 2, 3, 4), trim=0.0)
    assert untrimmed.item() == pytest.approx((1 / 6 * 10 + 1.6667) / 10, rel=1e-4)


def test_median_normalisation_uses_the_lower_median_of_valid_pixels():
    x = _row(5, 1, 3, 100, 2)
    mask = torch.tensor([[[True, True, True, False, True]]])
    # valid 5,1,3,2: lower median 2, mean |dev| (3+1+1+0)/4 = 1.25
    expected = torch.tensor([[[3, -1, 1, 0, 0]]], dtype=torch.float64) / 1.25
    torch.testing.assert_close(losses.normalize_median(x, mask), expected)


@pytest.mark.parametrize("trimmed", [True, False])
def test_ssi_losses_are_invariant_to_scale_and_shift_of_the_prediction(trimmed):
    pred, target, mask = _random_case(1)
    loss = losses.ScaleShiftInvariantLoss(trimmed=trimmed)
    base = loss(pred, target, mask)
    assert base.item() > 1e-3
    for a, b in [(3.0, 0.0), (0.01, 5.0), (250.0, -40.0)]:
        torch.testing.assert_close(loss(a * pred + b, target, mask), base, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(losses.ssi_mse_loss(-2 * pred + 1, target, mask), losses.ssi_mse_loss(pred, target, mask))
    torch.testing.assert_close(losses.ssi_trimmed_loss(7 * pred - 3, target, mask),
                               losses.ssi_trimmed_loss(pred, target, mask), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("trimmed", [True, False])
def test_ssi_loss_is_zero_for_an_affine_prediction_and_has_finite_gradients(trimmed):
    _, target, mask = _random_case(2)
    pred = (0.5 * target + 2.0).requires_grad_()
    loss = losses.ScaleShiftInvariantLoss(trimmed=trimmed)(pred, target, mask)
    assert loss.item() == pytest.approx(0.0, abs=1e-5)  # computed in float32
    noisy = (pred.detach() + 0.05 * torch.randn_like(pred)).requires_grad_()
    value = losses.ScaleShiftInvariantLoss(trimmed=trimmed)(noisy, target, mask)
    value.backward()
    assert value.item() > 1e-3 and torch.isfinite(noisy.grad).all()
    assert (noisy.grad[~mask] == 0).all()


def test_gradient_matching_hand_case_and_zero_when_aligned():
    pred, target = _row(0, 1, 3), _row(0, 0, 0)
    # scale 0: |1-0| + |3-1| = 3 over 3 pixels; scale 1 (every 2nd pixel): |3-0| over 2 pixels
    assert losses.gradient_matching_loss(pred, target, scales=1).item() == pytest.approx(1.0)
    assert losses.gradient_matching_loss(pred, target, scales=2).item() == pytest.approx(2.5)
    # a masked pixel removes the differences it takes part in: only |1 - 0| of pixels 0,1 remains
    mask = torch.tensor([[[True, True, False]]])
    assert losses.gradient_matching_loss(pred, target, mask, scales=1).item() == pytest.approx(0.5)
    _, t, m = _random_case(3, size=(16, 16))
    assert losses.gradient_matching_loss(t + 0.0, t, m).item() == 0.0
    assert losses.gradient_matching_loss(t + 0.7, t, m).item() == pytest.approx(0.0, abs=1e-12)  # constant R
    assert losses.gradient_matching_loss(t * 1.1, t, m).item() > 0


def test_combination_is_data_term_plus_half_gradient_term():
    pred, target, mask = _random_case(4, size=(16, 16))
    total = losses.ScaleShiftInvariantLoss(alpha=0.5, trimmed=False)(pred, target, mask)
    scale, shift = losses.align_least_squares(pred, target, mask)
    aligned = losses.apply_alignment(pred, scale, shift)
    expected = losses.ssi_mse_loss(pred, target, mask) + 0.5 * losses.gradient_matching_loss(aligned, target, mask, 4)
    torch.testing.assert_close(total.double(), expected, rtol=1e-5, atol=1e-7)
    trimmed = losses.ScaleShiftInvariantLoss(alpha=0.5)(pred, target, mask)
    expected = losses.ssi_trimmed_loss(pred, target, mask) + 0.5 * losses.gradient_matching_loss(
        losses.normalize_median(pred, mask), losses.normalize_median(target, mask), mask)
    torch.testing.assert_close(trimmed.double(), expected, rtol=1e-5, atol=1e-7)


def test_reductions_per_image_and_per_batch():
    pred = torch.cat([_row(0, 1, 2, 3), _row(0, 1, 2, 3)])
    target = torch.cat([_row(1, 0, 2, 3), _row(0, 1, 2, 7)])
    mask = torch.tensor([[[True] * 4], [[True, True, True, False]]])
    per_image = losses.ssi_mse_loss(pred, target, mask, reduction="none")
    torch.testing.assert_close(per_image, torch.tensor([0.225, 0.0], dtype=torch.float64))
    assert losses.ssi_mse_loss(pred, target, mask).item() == pytest.approx(0.1125)
    assert losses.ssi_mse_loss(pred, target, mask, reduction="batch").item() == pytest.approx(1.8 / 14)


def test_image_without_valid_pixels_contributes_nothing():
    pred, target, mask = _random_case(5)
    mask[1] = False
    per_image = losses.ssi_trimmed_loss(pred, target, mask, reduction="none")
    assert per_image[1].item() == 0 and torch.isfinite(per_image).all()


# --- metric depth and segmentation ---------------------------------------------------------------------

def test_silog_hand_case_and_invariance():
    # d = log(pred) - log(target) = 0, 1: 1/2 * 1 - 0.5 / 4 * 1 = 0.375
    pred, target = torch.tensor([[[1.0, math.e]]]), torch.tensor([[[1.0, 1.0]]])
    assert losses.silog_loss(pred, target).item() == pytest.approx(0.375)
    pred, target, mask = _random_case(6)
    full = losses.silog_loss(pred.abs() + 0.1, target, mask, lambd=1.0)
    torch.testing.assert_close(losses.silog_loss(3 * (pred.abs() + 0.1), target, mask, lambd=1.0), full)
    assert losses.silog_loss(target * 1.0, target, mask).item() == pytest.approx(0.0, abs=1e-12)


def test_segmentation_loss_hand_case_with_aux_head_and_ignore_index():
    target = torch.tensor([[[0, 1], [255, 1]]])
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 1, 0, 1] = math.log(3.0)  # p(class 1) = 3/4 at pixel (0, 1)
    # valid pixels: (0,0) -> log 2, (0,1) -> -log(3/4), (1,1) -> log 2
    main = (2 * math.log(2) - math.log(0.75)) / 3
    assert losses.segmentation_loss(logits, target).item() == pytest.approx(main, rel=1e-6)
    aux = torch.zeros(1, 2, 1, 1)  # half resolution, upsampled: log 2 everywhere
    total = losses.segmentation_loss(logits, target, aux)
    assert total.item() == pytest.approx(main + 0.2 * math.log(2), rel=1e-6)
    assert losses.segmentation_loss(logits, target, aux, aux_weight=0.0).item() == pytest.approx(main, rel=1e-6)
    other = torch.tensor([[[0, 1], [7, 1]]])
    assert losses.segmentation_loss(logits, other, ignore_index=7).item() == pytest.approx(main, rel=1e-6)


def test_segmentation_loss_upsamples_aux_logits_like_the_heads():
    g = torch.Generator().manual_seed(0)
    logits, aux = torch.randn(2, 5, 8, 8, generator=g), torch.randn(2, 5, 4, 4, generator=g)
    target = torch.randint(0, 5, (2, 8, 8), generator=g)
    up = F.interpolate(aux, size=(8, 8), mode="bilinear", align_corners=True)
    expected = F.cross_entropy(logits, target) + 0.2 * F.cross_entropy(up, target)
    torch.testing.assert_close(losses.segmentation_loss(logits, target, aux), expected)


def test_depth_metrics_after_alignment_and_hand_case():
    _, depth, mask = _random_case(7)
    pred_disparity = 3.0 / depth + 0.2  # affine in inverse depth: perfect after alignment
    m = depth_metrics(pred_disparity, depth, mask)
    torch.testing.assert_close(m["abs_rel"], torch.zeros(3, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(m["delta1"], torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(m["rmse"], torch.zeros(3, dtype=torch.float64), atol=1e-9, rtol=0)
    # depth 1, 2 against 1, 4 (no alignment): AbsRel (0 + 0.5) / 2, delta (1, 2 -> one of two), RMSE sqrt(4 / 2)
    m = depth_metrics(torch.tensor([[[1.0, 2.0]]]), torch.tensor([[[1.0, 4.0]]]), align=False, pred_is_disparity=False)
    assert m["abs_rel"].item() == pytest.approx(0.25)
    assert m["delta1"].item() == pytest.approx(0.5)
    assert m["rmse"].item() == pytest.approx(math.sqrt(2))
    acc = DepthMetrics(align=False, pred_is_disparity=False)
    acc.update(torch.tensor([[[1.0, 2.0]], [[1.0, 1.0]]]), torch.tensor([[[1.0, 4.0]], [[1.0, 1.0]]]))
    assert acc.compute()["abs_rel"] == pytest.approx(0.125)


def test_confusion_matrix_pixel_accuracy_and_miou():
    cm = ConfusionMatrix(3, ignore_index=255)
    target = torch.tensor([[0, 0, 1, 1, 255, 2]])
    pred = torch.tensor([[0, 1, 1, 1, 0, 1]])
    cm.update(pred, target)
    # valid (target, pred): (0,0) (0,1) (1,1) (1,1) (2,1); correct 3 of 5.
    # IoU = TP / (GT + pred - TP): class 0: 1/(2+1-1) = 1/2, class 1: 2/(2+4-2) = 1/2, class 2: 0/(1+0-0) = 0
    assert cm.pixel_accuracy() == pytest.approx(3 / 5)
    assert cm.mean_iou() == pytest.approx((1 / 2 + 1 / 2 + 0) / 3)
    torch.testing.assert_close(cm.iou(), torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
    logits = F.one_hot(pred, 3).permute(0, 2, 1).float().unsqueeze(-1)  # [1, 3, 6, 1]
    cm2 = ConfusionMatrix(3)
    cm2.update(logits, target.unsqueeze(-1))
    assert torch.equal(cm.matrix, cm2.matrix)
