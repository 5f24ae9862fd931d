"""Preprocessing: the original's "minimal" resize rule, normalisation, and the inverse."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dpt_fast.transforms import normalize_depth, preprocess, resize_prediction, target_size


def _original_rule(h, w, size, multiple=32):
    """MiDaS/DPT Resize(keep_aspect_ratio=True, resize_method="minimal"), restated with numpy rounding."""
    sh, sw = size / h, size / w
    if abs(1 - sw) < abs(1 - sh):
        sh = sw
    else:
        sw = sh
    nh = int(np.round(sh * h / multiple) * multiple)
    nw = int(np.round(sw * w / multiple) * multiple)
    return nh, nw


@pytest.mark.parametrize("h,w", [(480, 640), (2160, 3840), (375, 1242), (1000, 333), (384, 384), (97, 1001)])
@pytest.mark.parametrize("size", [384, 480])
def test_target_size_follows_the_original_minimal_rule(h, w, size):
    assert target_size(h, w, size) == _original_rule(h, w, size)


def test_known_sizes():
    assert target_size(480, 640) == (384, 512)
    assert target_size(2160, 3840) == (384, 672)


def test_preprocess_resizes_bicubic_and_normalises_with_half():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 120, 160), dtype=torch.uint8, generator=g)
    out = preprocess(images, size=96)
    expected = F.interpolate(images.float() / 255, size=(96, 128), mode="bicubic", align_corners=False)
    torch.testing.assert_close(out, (expected - 0.5) / 0.5)
    native = preprocess(images[0], size=None)
    assert native.shape == (1, 3, 128, 160)


def test_preprocess_rejects_bad_images():
    with pytest.raises(ValueError, match="B, 3, H, W"):
        preprocess(torch.rand(1, 4, 8, 8))
    with pytest.raises(ValueError, match="uint8 or floating"):
        preprocess(torch.ones(1, 3, 8, 8, dtype=torch.int32))


def test_resize_prediction_restores_the_input_size():
    depth = torch.rand(2, 48, 64)
    assert resize_prediction(depth, (100, 130)).shape == (2, 100, 130)
    logits = torch.rand(2, 5, 48, 64)
    assert resize_prediction(logits, (100, 130), mode="bilinear").shape == (2, 5, 100, 130)


def test_normalize_depth_spans_the_16_bit_range_per_image():
    depth = torch.rand(2, 10, 12) * torch.tensor([3.0, 100.0]).view(2, 1, 1) + 1
    out = normalize_depth(depth)
    for i in range(2):
        d = depth[i]
        expected = np.floor((65535 * (d - d.min()) / (d.max() - d.min())).numpy())
        np.testing.assert_allclose(out[i].numpy(), expected, atol=1)
    assert out.max() == 65535 and out.min() == 0
    assert (normalize_depth(torch.ones(1, 4, 4)) == 0).all()
