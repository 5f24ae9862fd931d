"""`dpt_fast::attention`: multi-head self-attention from the packed qkv projection output.

    attention(qkv [B, N, 3*H*D], num_heads, scale) -> out [B, N, H*D]

The registered operator also returns the log-sum-exp (float32; float64 for float64 input) [B, H, N] that the backward needs;
`attention()` below hides it. Fused path: the Triton kernels in dpt_fast.kernels.attention. Under the
"inline" backend `attention()` computes reference.attention_plain instead (no operator call).

Registration: `torch.library.custom_op` (forward and backward ops with fake impls), not `triton_op` +
`wrap_triton`. torch.compile treats a custom op as one opaque node: it traces through the model without a
graph break (tests/test_compile.py checks fullgraph), and the op keeps what `wrap_triton` cannot trace:
autotuned configs with a pre-hook (the TMA kernels set their descriptors' block shapes there; torch's
triton_kernel_wrap rejects "pre_hook ... in triton.Autotune or triton.Config"), host-side TMA descriptors,
the per-thread backend choice with its reference fallback, and the record of what ran. What is lost:
Inductor cannot fuse into or around the kernels, which are already fused.
"""
from __future__ import annotations

import math

import torch

from .. import backend, reference
from .dispatch import fused_chosen, inlined, serve

_OP = "dpt_fast::attention"


def _kernels():
    from ..kernels import attention as kernels  # imported lazily: TRITON_INTERPRET is read at import
    return kernels


def _use_fused(qkv: torch.Tensor, num_heads: int, backend_name: str | None = None) -> bool:
    if not fused_chosen(backend_name) or not (qkv.is_cuda or backend.triton_interpreting()):
        return False
    return _kernels().supports(qkv, num_heads)


def _fused_forward(qkv, num_heads, scale):
    return _kernels().attention_forward(qkv, num_heads, scale)


def _fused_backward(grad_out, qkv, out, lse, num_heads, scale):
    return _kernels().attention_backward(grad_out, qkv, out, lse, num_heads, scale)


@torch.library.custom_op("dpt_fast::attention", mutates_args=())
def attention_op(qkv: torch.Tensor, num_heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    check_attention_args(qkv, num_heads, scale)
    return serve(_OP, _use_fused(qkv, num_heads), _fused_forward, reference.attention, qkv, num_heads, scale)


@attention_op.register_fake
def _(qkv, num_heads, scale):
    batch, tokens, width = qkv.shape
    out = qkv.new_empty(batch, tokens, width // 3)
    lse = qkv.new_empty(batch, num_heads, tokens, dtype=reference.attention_accumulation_dtype(qkv.dtype))
    return out, lse


@torch.library.custom_op("dpt_fast::attention_backward", mutates_args=())
def attention_backward_op(grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                          num_heads: int, scale: float, backend_name: str) -> torch.Tensor:
    return serve("dpt_fast::attention_backward", _use_fused(qkv, num_heads, backend_name), _fused_backward,
                 reference.attention_backward, grad_out, qkv, out, lse, num_heads, scale)


@attention_backward_op.register_fake
def _(grad_out, qkv, out, lse, num_heads, scale, backend_name):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    qkv, num_heads, scale = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse)
    ctx.num_heads, ctx.scale = num_heads, scale
    ctx.backend_name = backend.get_backend()  # the backward may run in autograd's device thread


def _backward(ctx, grad_out, grad_lse):
    qkv, out, lse = ctx.saved_tensors
    grad_qkv = attention_backward_op(grad_out.contiguous(), qkv, out, lse, ctx.num_heads, ctx.scale,
                                     ctx.backend_name)
    return grad_qkv, None, None


attention_op.register_autograd(_backward, setup_context=_setup_context)


def check_attention_args(qkv: torch.Tensor, num_heads: int, scale: float | None = None) -> None:
    """Every check of an attention call, shared by all implementations and run before any of them:
    a ValueError that says what was expected."""
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"dpt_fast.attention needs num_heads >= 1, got {num_heads!r}")
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 3 or qkv.shape[-1] % (3 * num_heads) != 0:
        shape = tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__
        raise ValueError(f"dpt_fast.attention expects qkv of shape [B, N, 3*H*D] with H={num_heads}, got {shape}")
    if qkv.shape[-1] == 0:
        raise ValueError(f"dpt_fast.attention needs a head dim >= 1, got qkv of shape {tuple(qkv.shape)}")
    if not qkv.is_floating_point():
        raise ValueError(f"dpt_fast.attention expects a floating-point qkv, got {qkv.dtype}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"dpt_fast.attention needs a finite scale, got {scale!r}")


check_attention_input = check_attention_args  # the earlier name


def attention(qkv: torch.Tensor, num_heads: int, scale: float | None = None) -> torch.Tensor:
    """Self-attention on the packed qkv projection output; returns [B, N, H*D]."""
    check_attention_args(qkv, num_heads, scale)
    if scale is None:
        scale = (qkv.shape[-1] // (3 * num_heads)) ** -0.5
    if inlined():
        return reference.attention_plain(qkv, num_heads, float(scale), backend.inline_attention())
    return attention_op(qkv, num_heads, float(scale))[0]
