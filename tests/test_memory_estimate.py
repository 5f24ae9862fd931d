"""Memory of a 4K frame with DPT-Large, estimated on the CPU without allocating it.

The model runs on the meta device (shapes only) under torch's MemTracker, which adds up every tensor
live between operators. The fused operators allocate nothing else that grows with the image except
their outputs and the attention's log-sum-exp, so this is the inference peak up to the kernels' small
scratch and the allocator's rounding: an estimate for the goal that `dpt-fast predict --size native`
runs a 4K frame on one 80 GB GPU without tiling, not a measurement (that is the GPU suite's job).
"""
import pytest
import torch

import dpt_fast

try:  # a private module of torch (there since 2.5): skip rather than fail if it moves
    from torch.distributed._tools.mem_tracker import MemTracker
except ImportError:  # pragma: no cover
    MemTracker = None

GIB = 2**30


def _inference_peak_bytes(backbone: str, height: int, width: int) -> tuple[int, int, tuple]:
    """(peak of all tensors, peak of activations, output shape) in bytes."""
    with torch.device("meta"):
        model = dpt_fast.DPTDepthModel(backbone=backbone).eval().to(torch.bfloat16)
        image = torch.randn(1, 3, height, width, dtype=torch.bfloat16)
    tracker = MemTracker()
    tracker.track_external(model, image)
    with tracker, torch.no_grad():
        depth = model(image)
    peak = tracker.get_tracker_snapshot("peak")[torch.device("meta")]
    activations = sum(v for k, v in peak.items() if getattr(k, "name", None) == "ACT")
    return peak["Total"], activations, tuple(depth.shape)


@pytest.mark.skipif(MemTracker is None, reason="torch.distributed._tools.mem_tracker not available")
@pytest.mark.parametrize("backbone", ["vitl16_384", "vitb_rn50_384"])
def test_4k_frame_fits_one_80gb_gpu_without_tiling(backbone):
    peak, _, shape = _inference_peak_bytes(backbone, 2160, 3840)
    assert shape == (1, 2160, 3840)
    # One materialised attention score matrix of this frame (16 heads x 32401^2 x 2 bytes) would alone
    # be ~31 GiB: the whole forward must stay far below it, and below an 80 GB card with room to spare.
    tokens = (2160 // 16 + 1) * (3840 // 16) + 1  # padded to 2176 rows: 136 x 240 patches + class token
    score_matrix = 16 * tokens * tokens * 2
    assert peak < score_matrix / 4
    assert peak < 16 * GIB, f"estimated peak {peak / GIB:.1f} GiB"
    # and not trivially small: the full-resolution head alone holds 128 channels at 3840 x 2160
    assert peak > 128 * 2160 * 3840 * 2


@pytest.mark.skipif(MemTracker is None, reason="torch.distributed._tools.mem_tracker not available")
def test_estimate_grows_with_the_image():
    _, small, _ = _inference_peak_bytes("vitb_rn50_384", 384, 384)
    _, large, _ = _inference_peak_bytes("vitb_rn50_384", 1536, 1536)
    assert small > 0 and 12 < large / small < 20  # activations scale with the pixel count (16x)
