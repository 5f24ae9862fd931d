"""A whole tiny model on the fused backend against the reference backend.

Without a GPU the Triton kernels run through the interpreter (tests/conftest.py sets TRITON_INTERPRET),
so this proves the attention and Reassemble kernels inside the model, forward and backward; the CUDA
residual-conv-unit kernel cannot run on CPU and its reference serves (checked explicitly)."""
import pytest
import torch

import dpt_fast
from dpt_fast import DPTDepthModel, backend, use_backend
from helpers import relative_error

pytestmark = pytest.mark.skipif(not backend.triton_interpreting(), reason="CPU interpreter test")


def _model():
    torch.manual_seed(0)
    model = DPTDepthModel(backbone="vit_tiny_patch16_224", hooks=[2, 5, 8, 11], features=32, non_negative=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def test_fused_tiny_model_matches_reference_forward_and_gradients():
    model = _model()
    x = torch.randn(2, 3, 64, 80)
    grad = torch.randn(2, 64, 80)

    def run(name):
        model.zero_grad()
        with use_backend(name):
            out = model(x)
            out.backward(grad)
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        return out.detach(), grads

    dpt_fast.implementations_ran(reset=True)
    ref_out, ref_grads = run("reference")
    ran = dpt_fast.implementations_ran(reset=True)
    assert set(ran["dpt_fast::attention"]) == {"reference"}
    out, grads = run("fused")
    ran = dpt_fast.implementations_ran(reset=True)
    assert ran["dpt_fast::attention"] == {"triton": 12}
    assert ran["dpt_fast::attention_backward"] == {"triton": 12}
    assert ran["dpt_fast::reassemble"] == {"triton": 4}
    assert ran["dpt_fast::reassemble_backward"] == {"triton": 4}
    assert set(ran["dpt_fast::residual_conv_unit"]) == {"reference"}  # CUDA-only kernel

    assert relative_error(out, ref_out) < 1e-4
    assert ref_grads.keys() == grads.keys()
    worst = max(relative_error(grads[k], ref_grads[k]) for k in grads if ref_grads[k].norm() > 0)
    assert worst < 1e-3


def test_backward_uses_the_backend_of_its_forward():
    """Autograd may run a backward in another thread (its CUDA device thread) or outside the `with`
    block: the backward must still run the implementation family its forward was asked for."""
    model = _model()
    x = torch.randn(1, 3, 64, 64)
    dpt_fast.implementations_ran(reset=True)
    with use_backend("reference"):
        out = model(x)
    out.sum().backward()  # outside the block: the thread's backend is "fused" again
    ran = dpt_fast.implementations_ran(reset=True)
    for op in ("attention", "reassemble", "residual_conv_unit"):
        assert set(ran[f"dpt_fast::{op}_backward"]) == {"reference"}, ran
    with use_backend("fused"):
        out = model(x)
    with use_backend("reference"):
        out.sum().backward()
    ran = dpt_fast.implementations_ran(reset=True)
    assert set(ran["dpt_fast::attention_backward"]) == {"triton"}
    assert set(ran["dpt_fast::reassemble_backward"]) == {"triton"}
