"""torch.compile traces a whole model through the three operators without graph breaks.

`aot_eager` runs Dynamo and AOTAutograd (fake tensors, the operators' fake implementations and
autograd registrations) without Inductor's code generation, so it is quick on a CPU; Inductor and
CUDA graphs are exercised by the GPU suite."""
import pytest
import torch

import dpt_fast
from dpt_fast import DPTDepthModel, use_backend


@pytest.mark.parametrize("backend_name", ["reference", "fused"])
def test_full_graph_compile_forward_and_backward_match_eager(backend_name):
    torch.manual_seed(0)
    model = DPTDepthModel(backbone="vit_tiny_patch16_224", hooks=[2, 5, 8, 11], features=32, non_negative=False)
    x = torch.randn(2, 3, 64, 96)
    with use_backend(backend_name):
        eager = model(x)
        params = list(model.parameters())  # the final norm and classifier are unused: allow_unused
        eager_grads = torch.autograd.grad(eager.square().mean(), params, allow_unused=True)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        dpt_fast.implementations_ran(reset=True)
        out = compiled(x)
        grads = torch.autograd.grad(out.square().mean(), params, allow_unused=True)
    ran = dpt_fast.implementations_ran()
    # CPU tensors: the fused backend runs the Triton kernels only through the interpreter
    fused_here = backend_name == "fused" and dpt_fast.backend.triton_interpreting()
    expected_impl = "triton" if fused_here else "reference"
    assert set(ran["dpt_fast::attention_backward"]) == {expected_impl}, ran  # the compiled graph ran the ops
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    assert sum(g is not None for g in eager_grads) > 100
    for g, e in zip(grads, eager_grads):
        assert (g is None) == (e is None)
        if e is not None:
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
