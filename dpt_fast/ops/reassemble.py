"""`dpt_fast::reassemble`: one Reassemble_s stage, tokens -> channels_last feature map.

See dpt_fast.reference.reassemble for the definition. Fused path: dpt_fast.kernels.reassemble (Triton).
Every call, whichever implementation serves it, is first checked by `check_reassemble_args` (the
kernels trust the shapes they are given). Under the "inline" backend `reassemble()` computes
reference.reassemble_plain instead (no operator call).
"""
from __future__ import annotations

import torch

from .. import backend, reference
from ..kernels import on_device
from .common import autocast_inputs, with_strides_of
from .dispatch import fused_chosen, inlined, serve
from ..reference.reassemble import READOUTS, RESAMPLES

_OP = "dpt_fast::reassemble"


def _kernels():
    from ..kernels import reassemble as kernels  # lazily: TRITON_INTERPRET is read at import
    return kernels


def _use_fused(tokens: torch.Tensor, readout: str, resample: str, params=(),
               backend_name: str | None = None) -> bool:
    if not fused_chosen(backend_name) or not (tokens.is_cuda or backend.triton_interpreting()):
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


def _fused_forward(*args):
    with on_device(args[0]):
        return _kernels().reassemble_forward(*args)


def _fused_backward(*args):
    with on_device(args[1]):
        return _kernels().reassemble_backward(*args)


@torch.library.custom_op("dpt_fast::reassemble", mutates_args=())
def reassemble_op(tokens: torch.Tensor, readout_weight: torch.Tensor | None, readout_bias: torch.Tensor | None,
                  proj_weight: torch.Tensor, proj_bias: torch.Tensor, resample_weight: torch.Tensor | None,
                  resample_bias: torch.Tensor | None, grid_h: int, grid_w: int, start_index: int,
                  readout: str, resample: str) -> torch.Tensor:
    args = (tokens, readout_weight, readout_bias, proj_weight, proj_bias, resample_weight, resample_bias,
            grid_h, grid_w, start_index, readout, resample)
    check_reassemble_args(*args)
    return serve(_OP, _use_fused(tokens, readout, resample, args[1:7]), _fused_forward, reference.reassemble, *args)


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
    grads = serve("dpt_fast::reassemble_backward",
                  _use_fused(tokens, readout, resample, params[1:] + [grad_out], backend_name),
                  _fused_backward, reference.reassemble_backward, *args)
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


def _expect_shape(name: str, t, shape: tuple, meaning: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"reassemble: {name} must be a tensor {meaning}, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"reassemble: {name} must have shape {list(shape)} {meaning}, got {list(t.shape)}")


def check_reassemble_args(tokens, readout_weight, readout_bias, proj_weight, proj_bias, resample_weight,
                          resample_bias, grid_h, grid_w, start_index, readout, resample) -> None:
    """Every check of a Reassemble call, shared by all implementations and run before any of them: the
    options, the token count against the grid, and each parameter's shape against the tokens' width D
    and the stage's width F (proj_weight's first dim). A ValueError that says what was expected."""
    if readout not in READOUTS:
        raise ValueError(f"reassemble: readout must be one of {READOUTS}, got {readout!r}")
    if resample not in RESAMPLES:
        raise ValueError(f"reassemble: resample must be one of {RESAMPLES}, got {resample!r}")
    if start_index < 0 or (readout != "ignore" and start_index < 1):
        raise ValueError(f"readout={readout!r} reads token 0 as the readout token: start_index must be >= 1 "
                         f"(0 only with readout='ignore'), got {start_index}")
    if grid_h < 1 or grid_w < 1:
        raise ValueError(f"reassemble: the grid must be at least 1x1, got {grid_h}x{grid_w}")
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3 or tokens.shape[1] != start_index + grid_h * grid_w:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"reassemble expects tokens [B, {start_index} + {grid_h}*{grid_w}, D], got {shape}")
    if not tokens.is_floating_point():
        raise ValueError(f"reassemble expects floating-point tokens, got {tokens.dtype}")
    dim = tokens.shape[2]
    if not isinstance(proj_weight, torch.Tensor) or proj_weight.dim() != 4:
        raise ValueError("reassemble: proj_weight must be the 1x1 convolution's weight [F, D, 1, 1], got "
                         + (str(list(proj_weight.shape)) if isinstance(proj_weight, torch.Tensor)
                            else type(proj_weight).__name__))
    features = proj_weight.shape[0]
    _expect_shape("proj_weight", proj_weight, (features, dim, 1, 1), f"(1x1 conv D={dim} -> F)")
    _expect_shape("proj_bias", proj_bias, (features,), f"(F={features})")
    if readout == "project":
        if readout_weight is None or readout_bias is None:
            raise ValueError("reassemble: readout='project' needs readout_weight and readout_bias")
        _expect_shape("readout_weight", readout_weight, (dim, 2 * dim), f"(Linear 2D -> D, D={dim})")
        _expect_shape("readout_bias", readout_bias, (dim,), f"(D={dim})")
    if resample != "none":
        if resample_weight is None or resample_bias is None:
            raise ValueError(f"reassemble: resample={resample!r} needs resample_weight and resample_bias")
        kernel = {"up4": 4, "up2": 2, "down2": 3}[resample]
        if resample_weight.dim() != 4:
            raise ValueError(f"reassemble: resample_weight must be 4-D, got {list(resample_weight.shape)}")
        if resample == "down2":  # Conv2d weight [F_out, F, 3, 3]
            out_features = resample_weight.shape[0]
            expected, meaning = (out_features, features, 3, 3), f"(Conv2d 3x3 stride 2 from F={features})"
        else:  # ConvTranspose2d weight [F, F_out, k, k]
            out_features = resample_weight.shape[1]
            expected, meaning = (features, out_features, kernel, kernel), \
                f"(ConvTranspose2d {kernel}x{kernel} stride {kernel} from F={features})"
        _expect_shape("resample_weight", resample_weight, expected, meaning)
        _expect_shape("resample_bias", resample_bias, (out_features,), f"(F_out={out_features})")


def reassemble(tokens: torch.Tensor, readout_weight, readout_bias, proj_weight, proj_bias,
               resample_weight, resample_bias, grid_h: int, grid_w: int, start_index: int = 1,
               readout: str = "project", resample: str = "none") -> torch.Tensor:
    """Run one Reassemble_s stage: validates the arguments, then calls `dpt_fast::reassemble` (or, under
    the "inline" backend, computes the same math as plain PyTorch)."""
    args = (tokens, readout_weight, readout_bias, proj_weight, proj_bias, resample_weight, resample_bias,
            grid_h, grid_w, start_index, readout, resample)
    check_reassemble_args(*args)
    tensors = autocast_inputs(*args[:7])
    if inlined():
        return reference.reassemble_plain(*tensors, grid_h, grid_w, start_index, readout, resample)
    return reassemble_op(*tensors, grid_h, grid_w, start_index, readout, resample)
