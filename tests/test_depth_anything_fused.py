"""A tiny Depth Anything on the fused backend against the reference backend, forward and backward.

Without a GPU the Triton kernels run through the interpreter (tests/conftest.py sets TRITON_INTERPRET):
attention at head dim 64 (the DINOv2 head width), Reassemble with the 'ignore' and 'project' readouts
on normed taps and all four resamplings; the CUDA residual-conv-unit kernel falls back to its reference
on CPU (checked explicitly)."""
import pytest
import torch

import dpt_fast
from dpt_fast import backend, use_backend
from dpt_fast.models.depth_anything import DepthAnythingModel

from helpers import relative_error
from model_helpers import randomize_

pytestmark = pytest.mark.skipif(not backend.triton_interpreting(), reason="CPU interpreter test")

DEPTH = 4


@pytest.mark.parametrize("use_clstoken,metric", [(False, False), (True, True)])
def test_fused_tiny_depth_anything_matches_reference_forward_and_gradients(use_clstoken, metric):
    model = DepthAnythingModel("da2-small", taps=[0, 1, 2, 3], out_channels=[8, 16, 16, 32], features=16,
                               head_hidden=8, use_clstoken=use_clstoken, metric=metric, max_depth=10.0,
                               vit_kwargs=dict(embed_dim=64, depth=DEPTH, num_heads=1, mlp_ratio=1, img_size=70))
    randomize_(model, seed=1, matrix_std=0.05)
    x = torch.randn(1, 3, 42, 56)  # a 3 x 4 patch grid: the position grid (5 x 5) is resized
    grad = torch.randn(1, 42, 56)

    def run(name):
        model.zero_grad()
        with use_backend(name):
            out = model(x)
            out.backward(grad)
        return out.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    dpt_fast.implementations_ran(reset=True)
    ref_out, ref_grads = run("reference")
    dpt_fast.implementations_ran(reset=True)
    out, grads = run("fused")
    ran = dpt_fast.implementations_ran(reset=True)
    assert ran["dpt_fast::attention"] == {"triton": DEPTH}
    assert ran["dpt_fast::attention_backward"] == {"triton": DEPTH}
    assert ran["dpt_fast::reassemble"] == {"triton": 4}
    assert ran["dpt_fast::reassemble_backward"] == {"triton": 4}
    assert set(ran["dpt_fast::residual_conv_unit"]) == {"reference"}  # CUDA-only kernel

    assert ref_out.std() > 0
    assert relative_error(out, ref_out) < 1e-4
    assert ref_grads.keys() == grads.keys()
    assert "pretrained.blocks.0.attn.qkv.weight" in grads
    if use_clstoken:
        assert "depth_head.readout_projects.0.0.weight" in grads
    worst = max(relative_error(grads[k], ref_grads[k]) for k in grads if ref_grads[k].norm() > 0)
    assert worst < 1e-3
