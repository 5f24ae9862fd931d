"""What the three operator files share: autocast casting and the strides promised by fake impls.

Autocast: a custom operator is opaque to autocast, so under `torch.autocast` it would receive activations in
the autocast dtype next to float32 weights. Like aten's conv and linear, the operators run in the
autocast dtype: their floating-point inputs are cast before the call, and autograd carries the
gradients back through the casts to the float32 parameters.
"""
from __future__ import annotations

import torch


def autocast_inputs(*tensors):
    """`tensors` cast to the active autocast dtype of their device (None entries kept), or unchanged."""
    first = next(t for t in tensors if t is not None)
    device_type = first.device.type
    if device_type == "meta" or not torch.is_autocast_enabled(device_type):  # meta: tracing, FLOP counting
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def with_strides_of(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """t with the strides torch.empty_like(ref) has: what the fake implementations promise, and what
    torch.compile asserts (e.g. the gradient of a channels_last weight after
    model.to(memory_format=torch.channels_last))."""
    out = torch.empty_like(ref, dtype=t.dtype)
    if t.shape != out.shape or t.stride() == out.stride():
        return t
    return out.copy_(t)
