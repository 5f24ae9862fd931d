"""`dpt_fast::residual_conv_unit`: x + conv2(relu(conv1(relu(x)) + b1)) + b2 [+ extra], 3x3 convs.

Fused path: the CUDA kernels of the dpt_fast._C extension (csrc/), registered there as
`dpt_fast::_rcu_fused_forward` for the CUDA dispatch key. Backward composes aten convolution backward.
"""
from __future__ import annotations

import torch

from .. import backend, reference

_OP = "dpt_fast::residual_conv_unit"


def cuda_kernel_registered() -> bool:
    """True when the compiled extension is importable and its CUDA kernel is registered."""
    try:
        from .. import _C  # noqa: F401  (loading registers the kernels)
    except ImportError:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("dpt_fast::_rcu_fused_forward", "CUDA")


def _use_fused(x: torch.Tensor) -> bool:
    return (backend.get_backend() == "fused" and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
            and cuda_kernel_registered())


@torch.library.custom_op("dpt_fast::residual_conv_unit", mutates_args=())
def residual_conv_unit_op(x: torch.Tensor, weight1: torch.Tensor, bias1: torch.Tensor, weight2: torch.Tensor,
                          bias2: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
    if _use_fused(x):
        backend.record(_OP, "cuda")
        return torch.ops.dpt_fast._rcu_fused_forward(x, weight1, bias1, weight2, bias2, extra)
    backend.record(_OP, "reference")
    return reference.residual_conv_unit(x, weight1, bias1, weight2, bias2, extra)


@residual_conv_unit_op.register_fake
def _(x, weight1, bias1, weight2, bias2, extra):
    return torch.empty_like(x)


@torch.library.custom_op("dpt_fast::residual_conv_unit_backward", mutates_args=())
def residual_conv_unit_backward_op(grad_out: torch.Tensor, x: torch.Tensor, weight1: torch.Tensor,
                                   bias1: torch.Tensor, weight2: torch.Tensor, bias2: torch.Tensor,
                                   has_extra: bool) -> list[torch.Tensor]:
    backend.record("dpt_fast::residual_conv_unit_backward", "reference")
    return reference.residual_conv_unit_backward(grad_out, x, weight1, bias1, weight2, bias2, has_extra)


@residual_conv_unit_backward_op.register_fake
def _(grad_out, x, weight1, bias1, weight2, bias2, has_extra):
    d_extra = torch.empty_like(grad_out) if has_extra else grad_out.new_empty(0)
    return [torch.empty_like(x), torch.empty_like(weight1), torch.empty_like(bias1),
            torch.empty_like(weight2), torch.empty_like(bias2), d_extra]


def _setup_context(ctx, inputs, output):
    x, weight1, bias1, weight2, bias2, extra = inputs
    ctx.save_for_backward(x, weight1, bias1, weight2, bias2)
    ctx.has_extra = extra is not None


def _backward(ctx, grad_out):
    grads = residual_conv_unit_backward_op(grad_out, *ctx.saved_tensors, ctx.has_extra)
    return (*grads[:5], grads[5] if ctx.has_extra else None)


residual_conv_unit_op.register_autograd(_backward, setup_context=_setup_context)


def residual_conv_unit(x: torch.Tensor, weight1: torch.Tensor, bias1: torch.Tensor, weight2: torch.Tensor,
                       bias2: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
    if x.dim() != 4 or weight1.shape[1] != x.shape[1]:
        raise ValueError(f"residual_conv_unit expects x [B, C, H, W] matching weight1 [C, C, 3, 3]; "
                         f"got x {tuple(x.shape)} and weight1 {tuple(weight1.shape)}")
    if extra is not None and extra.shape != x.shape:
        raise ValueError(f"residual_conv_unit: extra must have x's shape {tuple(x.shape)}, got {tuple(extra.shape)}")
    return residual_conv_unit_op(x, weight1, bias1, weight2, bias2, extra)
