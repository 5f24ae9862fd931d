"""`dpt_fast::reassemble`: one Reassemble_s stage, tokens -> channels_last feature map.

See dpt_fast.reference.reassemble for the definition. Fused path: dpt_fast.kernels.reassemble (Triton).
"""
from __future__ import annotations

import torch

from .. import backend, reference
from ..kernels import on_device
from .common import autocast_inputs, with_strides_of
from ..reference.reassemble import READOUTS, RESAMPLES

_OP = "dpt_fast::reassemble"


def _kernels():
    from ..kernels import reassemble as kernels  # lazily: TRITON_INTERPRET is read at import
    return kernels


def _use_fused(tokens: torch.Tensor, readout: str, resample: str, params=(),
               backend_name: str | None = None) -> bool:
    if (backend_name or backend.get_backend()) != "fused" or not (tokens.is_cuda or backend.triton_interpreting()):
        return False
    # mixed dtypes or devices: the reference serves (and raises aten's usual error)
    if any(p is not None and (p.dtype != tokens.dtype or p.device != tokens.device) for p in params):
        return False
    return _kernels().supports(tokens, readout, resample)


def output_shape(tokens, proj_weight, resample_weight, grid_h, grid_w, resample):
    channels = proj_weight.shape[0] if resample == "none" else resample_weight.shape[0 if resample == "down2" else 1]
    if resample == "up4":
        grid_h, grid_w = grid_h * 4, grid_w * 4
    elif resample == "up2":
        grid_h, grid_w = grid_h * 2, grid_w * 2
    elif resample == "down2":
        grid_h, grid_w = (grid_h + 1) // 2, (grid_w + 1) // 2
    return tokens.shape[0], channels, grid_h, grid_w


@torch.library.custom_op("dpt_fast::reassemble", mutates_args=())
def reassemble_op(tokens: torch.Tensor, readout_weight: torch.Tensor | None, readout_bias: torch.Tensor | None,
                  proj_weight: torch.Tensor, proj_bias: torch.Tensor, resample_weight: torch.Tensor | None,
                  resample_bias: torch.Tensor | None, grid_h: int, grid_w: int, start_index: int,
                  readout: str, resample: str) -> torch.Tensor:
    args = (tokens, readout_weight, readout_bias, proj_weight, proj_bias, resample_weight, resample_bias,
            grid_h, grid_w, start_index, readout, resample)
    if _use_fused(tokens, readout, resample, args[1:7]):
        backend.record(_OP, "triton")
        with on_device(tokens):
            return _kernels().reassemble_forward(*args)
    backend.record(_OP, "reference")
    return reference.reassemble(*args)


@reassemble_op.register_fake
def _(tokens, readout_weight, readout_bias, proj_weight, proj_bias, resample_weight, resample_bias,
      grid_h, grid_w, start_index, readout, resample):
    shape = output_shape(tokens, proj_weight, resample_weight, grid_h, grid_w, resample)
    return torch.empty(shape, dtype=tokens.dtype, device=tokens.device, memory_format=torch.channels_last)


@torch.library.custom_op("dpt_fast::reassemble_backward", mutates_args=())
def reassemble_backward_op(grad_out: torch.Tensor, tokens: torch.Tensor, readout_weight: torch.Tensor | None,
                           readout_bias: torch.Tensor | None, proj_weight: torch.Tensor, proj_bias: torch.Tensor,
                           resample_weight: torch.Tensor | None, resample_bias: torch.Tensor | None,
                           grid_h: int, grid_w: int, start_index: int, readout: str,
                           resample: str, backend_name: str) -> list[torch.Tensor]:
    args = (grad_out, tokens, readout_weight, readout_bias, proj_weight, proj_bias, resample_weight,
            resample_bias, grid_h, grid_w, start_index, readout, resample)
    params = [tokens, readout_weight, readout_bias, proj_weight, proj_bias, resample_weight, resample_bias]
    if _use_fused(tokens, readout, resample, params[1:] + [grad_out], backend_name):
        backend.record("dpt_fast::reassemble_backward", "triton")
        with on_device(tokens):
            grads = _kernels().reassemble_backward(*args)
    else:
        backend.record("dpt_fast::reassemble_backward", "reference")
        grads = reference.reassemble_backward(*args)
    return [g if p is None else with_strides_of(g, p) for g, p in zip(grads, params)]


@reassemble_backward_op.register_fake
def _(grad_out, tokens, readout_weight, readout_bias, proj_weight, proj_bias, resample_weight, resample_bias,
      grid_h, grid_w, start_index, readout, resample, backend_name):
    params = [tokens, readout_weight, readout_bias, proj_weight, proj_bias, resample_weight, resample_bias]
    return [tokens.new_empty(0) if p is None else torch.empty_like(p) for p in params]


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:7])
    ctx.meta = inputs[7:]
    ctx.present = [t is not None for t in inputs[:7]]
    ctx.backend_name = backend.get_backend()  # the backward may run in autograd's device thread


def _backward(ctx, grad_out):
    grads = reassemble_backward_op(grad_out.contiguous(memory_format=torch.channels_last),
                                   *ctx.saved_tensors, *ctx.meta, ctx.backend_name)
    return (*[g if present else None for g, present in zip(grads, ctx.present)],
            None, None, None, None, None)


reassemble_op.register_autograd(_backward, setup_context=_setup_context)


def reassemble(tokens: torch.Tensor, readout_weight, readout_bias, proj_weight, proj_bias,
               resample_weight, resample_bias, grid_h: int, grid_w: int, start_index: int = 1,
               readout: str = "project", resample: str = "none") -> torch.Tensor:
    """Run one Reassemble_s stage; validates the arguments and calls `dpt_fast::reassemble`."""
    if readout not in READOUTS:
        raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
    if resample not in RESAMPLES:
        raise ValueError(f"resample must be one of {RESAMPLES}, got {resample!r}")
    if start_index < 0 or (readout != "ignore" and start_index < 1):
        raise ValueError(f"readout={readout!r} reads token 0 as the readout token: start_index must be >= 1 "
                         f"(0 only with readout='ignore'), got {start_index}")
    if tokens.dim() != 3 or tokens.shape[1] != start_index + grid_h * grid_w:
        raise ValueError(f"reassemble expects tokens [B, {start_index} + {grid_h}*{grid_w}, D], "
                         f"got {tuple(tokens.shape)}")
    if readout == "project" and readout_weight is None:
        raise ValueError("readout='project' needs readout_weight and readout_bias")
    if resample != "none" and resample_weight is None:
        raise ValueError(f"resample={resample!r} needs resample_weight and resample_bias")
    tensors = autocast_inputs(tokens, readout_weight, readout_bias, proj_weight, proj_bias, resample_weight,
                              resample_bias)
    return reassemble_op(*tensors, grid_h, grid_w, start_index, readout, resample)
