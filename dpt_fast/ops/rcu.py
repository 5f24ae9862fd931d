"""`dpt_fast::residual_conv_unit`: x + conv2(relu(conv1(relu(x)) + b1)) + b2 [+ extra], 3x3 convs.

Fused path (CUDA tensors on sm_80+, float16/bfloat16, channels a multiple of 8, one image under 2^31 bytes): the
CUTLASS kernels of the dpt_fast._C extension (csrc/), registered there for the CUDA dispatch key as
`dpt_fast::_rcu_fused_forward` (two kernels: conv1 with the input ReLU in its mainloop and bias + ReLU in
its epilogue; conv2 with bias + x [+ extra] in its epilogue), `dpt_fast::_rcu_fused_conv1` (conv1 alone) and
`dpt_fast::_rcu_fused_conv2` (conv2 alone, reading a given hidden activation).
Everything else (CPU, float32/float64, other channel counts, no extension) runs the reference.

Two forward operators, one public function (`residual_conv_unit` picks; under the "inline" backend it calls
neither and computes reference.residual_conv_unit_plain; every call is first checked by `check_rcu_args`):
- inference (grad disabled, or no input requires grad): `dpt_fast::residual_conv_unit`, one
  `_rcu_fused_forward` call; the hidden activation h = relu(conv1(relu(x)) + b1) lives in a scratch buffer.
- training (autograd will need the backward): `dpt_fast::residual_conv_unit_train` -> (out, hidden), the
  same two kernels as `_rcu_fused_conv1` + `_rcu_fused_conv2`, returning h as well. Autograd saves h
  (non-differentiable) with the inputs, and the backward starts from it.

Backward (`dpt_fast::residual_conv_unit_backward`, hidden optional): aten's convolution backward (cuDNN)
for both convolutions with the ReLU masks as one aten.threshold_backward pass each. Forward + backward is
6 convolutions (2 forward, 2 x dgrad + wgrad), as in eager. The trade: one saved activation of x's size per
RCU that trains (eager autograd saves relu(x), conv1's output and relu(h) instead). When the backward gets
no hidden (`residual_conv_unit`'s own autograd, e.g. a direct call of the operator), it recomputes h with
conv1 -- 7 convolutions, no saved h.

Both forwards record their calls under `dpt_fast::residual_conv_unit` in `dpt_fast.implementations_ran()`
(the implementation that served an RCU forward); the backward under `dpt_fast::residual_conv_unit_backward`.
"""
from __future__ import annotations

import functools
import importlib.util
import warnings

import torch

from .. import backend, reference
from .common import autocast_inputs, with_strides_of
from .dispatch import fused_chosen, inlined, serve
from ..reference import rcu as _reference_rcu

_OP = "dpt_fast::residual_conv_unit"
_OP_BACKWARD = "dpt_fast::residual_conv_unit_backward"
_INTERNAL_OPS = ("dpt_fast::_rcu_fused_forward", "dpt_fast::_rcu_fused_conv1", "dpt_fast::_rcu_fused_conv2")
_MAX_TENSOR_BYTES = 2**31 - 1  # the kernels address one launch's tensors with 32-bit offsets


@functools.lru_cache(maxsize=None)
def cuda_kernel_registered() -> bool:
    """True when the compiled extension is importable and its CUDA kernel is registered."""
    if importlib.util.find_spec("dpt_fast._C") is None:  # not built (pure-Python install)
        return False
    try:
        from .. import _C  # noqa: F401  (loading registers the kernels)
    except ImportError as exc:  # built, but does not load (e.g. built against another torch): say so once
        warnings.warn(f"dpt_fast._C is present but failed to load ({exc}); the reference residual conv "
                      "unit serves instead of the CUDA kernel. Rebuild: pip install --no-build-isolation -e .",
                      RuntimeWarning, stacklevel=2)
        return False
    registered = [_has_cuda_kernel(name) for name in _INTERNAL_OPS]
    if registered[0] and not all(registered):
        warnings.warn("dpt_fast._C is out of date (it lacks " + ", ".join(
            n for n, r in zip(_INTERNAL_OPS, registered) if not r) + "); the reference residual conv unit "
            "serves instead of the CUDA kernels. Rebuild: pip install --no-build-isolation -e .",
            RuntimeWarning, stacklevel=2)
    registered = all(registered)
    if registered:
        try:
            _register_internal_fakes()
        except RuntimeError:  # already registered (the cache was cleared)
            pass
    return registered


def _has_cuda_kernel(name: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")
    except RuntimeError:  # no such operator
        return False


def _register_internal_fakes() -> None:
    """Fake (meta) implementations of the extension's internal operators, for tracing tools."""
    @torch.library.register_fake("dpt_fast::_rcu_fused_forward")
    def _(x, w1, b1, w2, b2, extra):
        return torch.empty_like(x)

    @torch.library.register_fake("dpt_fast::_rcu_fused_conv1")
    def _(x, w1, b1):
        return torch.empty_like(x, memory_format=torch.channels_last)

    @torch.library.register_fake("dpt_fast::_rcu_fused_conv2")
    def _(hidden, x, w2, b2, extra):
        return torch.empty_like(x)


def fused_supported(x: torch.Tensor, weight1: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """Whether the CUDA kernel can run this call (ignoring the backend choice). `others`: the call's other
    tensors (bias1, weight2, bias2, extra; None entries ignored), which must share x's dtype and device."""
    if not (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and x.dim() == 4):
        return False
    # mixed dtypes or devices: the reference serves (and raises aten's usual error). The kernel would
    # convert them silently, and the backward's aten convolutions would then fail on the mixed dtypes.
    if any(t is not None and (t.dtype != x.dtype or t.device != x.device) for t in (weight1, *others)):
        return False
    if torch.cuda.get_device_capability(x.device) < (8, 0):  # the extension is built for sm_80 and sm_90a
        return False
    channels = x.shape[1]
    if channels % 8 != 0 or tuple(weight1.shape) != (channels, channels, 3, 3):
        return False
    if channels * x.shape[2] * x.shape[3] * x.element_size() > _MAX_TENSOR_BYTES:
        return False
    return cuda_kernel_registered()


def _use_fused(tensors, backend_name: str | None = None) -> bool:
    """tensors: (x, weight1, bias1, weight2, bias2[, extra or grad_out])."""
    return fused_chosen(backend_name) and fused_supported(*tensors)


def _fused_forward(x, weight1, bias1, weight2, bias2, extra):
    return torch.ops.dpt_fast._rcu_fused_forward(x, weight1, bias1, weight2, bias2, extra)


@torch.library.custom_op("dpt_fast::residual_conv_unit", mutates_args=())
def residual_conv_unit_op(x: torch.Tensor, weight1: torch.Tensor, bias1: torch.Tensor, weight2: torch.Tensor,
                          bias2: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
    args = (x, weight1, bias1, weight2, bias2, extra)
    check_rcu_args(*args)
    return serve(_OP, _use_fused(args), _fused_forward, reference.residual_conv_unit, *args, fused_name="cuda")


@residual_conv_unit_op.register_fake
def _(x, weight1, bias1, weight2, bias2, extra):
    return torch.empty_like(x)


@torch.library.custom_op("dpt_fast::residual_conv_unit_train", mutates_args=())
def residual_conv_unit_train_op(x: torch.Tensor, weight1: torch.Tensor, bias1: torch.Tensor, weight2: torch.Tensor,
                                bias2: torch.Tensor, extra: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, hidden): the RCU's output and its hidden activation relu(conv1(relu(x)) + b1), kept for the
    backward. hidden has the strides of torch.empty_like(x)."""
    args = (x, weight1, bias1, weight2, bias2, extra)
    check_rcu_args(*args)
    return serve(_OP, _use_fused(args), _fused_train_forward, _reference_train_forward, *args, fused_name="cuda")


def _fused_train_forward(x, weight1, bias1, weight2, bias2, extra):
    xc = x.contiguous(memory_format=torch.channels_last)  # converted once for both kernels
    hidden = torch.ops.dpt_fast._rcu_fused_conv1(xc, weight1, bias1)
    out = torch.ops.dpt_fast._rcu_fused_conv2(hidden, xc, weight2, bias2, extra)
    return with_strides_of(out, x), with_strides_of(hidden, x)


def _reference_train_forward(x, weight1, bias1, weight2, bias2, extra):
    hidden = _reference_rcu.residual_conv_unit_hidden(x, weight1, bias1)
    out = _reference_rcu.residual_conv_unit_from_hidden(hidden, x, weight2, bias2, extra)
    return out, with_strides_of(hidden, x)


@residual_conv_unit_train_op.register_fake
def _(x, weight1, bias1, weight2, bias2, extra):
    return torch.empty_like(x), torch.empty_like(x)


def _fused_backward(grad_out, x, weight1, bias1, weight2, bias2, has_extra, hidden=None):
    cl = torch.channels_last
    conv_backward = _reference_rcu.conv3x3_backward
    g = grad_out.contiguous(memory_format=cl)
    xc = x.contiguous(memory_format=cl)
    if hidden is not None:  # saved by the training forward: relu(conv1(relu(x)) + b1)
        relu_hidden = hidden.contiguous(memory_format=cl)
    else:  # recomputed, bias + ReLU fused
        relu_hidden = torch.ops.dpt_fast._rcu_fused_conv1(xc, weight1, bias1)
    d_relu_hidden, d_weight2 = conv_backward(g, relu_hidden, weight2)
    d_hidden = torch.ops.aten.threshold_backward(d_relu_hidden, relu_hidden, 0)  # relu_hidden > 0 <=> hidden > 0
    del d_relu_hidden, relu_hidden
    d_relu_x, d_weight1 = conv_backward(d_hidden, torch.relu(xc), weight1)
    d_x = torch.ops.aten.threshold_backward(d_relu_x, xc, 0).add_(g)
    del d_relu_x
    d_extra = grad_out.clone() if has_extra else grad_out.new_empty(0)
    return [with_strides_of(d_x, x), with_strides_of(d_weight1, weight1), d_hidden.sum((0, 2, 3)).to(bias1.dtype),
            with_strides_of(d_weight2, weight2), g.sum((0, 2, 3)).to(bias2.dtype), d_extra]


@torch.library.custom_op("dpt_fast::residual_conv_unit_backward", mutates_args=())
def residual_conv_unit_backward_op(grad_out: torch.Tensor, x: torch.Tensor, weight1: torch.Tensor,
                                   bias1: torch.Tensor, weight2: torch.Tensor, bias2: torch.Tensor,
                                   has_extra: bool, backend_name: str,
                                   hidden: torch.Tensor | None = None) -> list[torch.Tensor]:
    """hidden: relu(conv1(relu(x)) + b1) as the training forward kept it; None recomputes it."""
    return serve(_OP_BACKWARD, _use_fused((x, weight1, bias1, weight2, bias2, grad_out), backend_name),
                 _fused_backward, _reference_backward, grad_out, x, weight1, bias1, weight2, bias2, has_extra, hidden,
                 fused_name="cuda")


def _reference_backward(grad_out, x, weight1, bias1, weight2, bias2, has_extra, hidden):
    grads = reference.residual_conv_unit_backward(grad_out, x, weight1, bias1, weight2, bias2, has_extra, hidden)
    # the strides the fake implementation promises (dx follows grad_out's layout otherwise)
    return [with_strides_of(g, p) for g, p in zip(grads[:5], (x, weight1, bias1, weight2, bias2))] + grads[5:]


@residual_conv_unit_backward_op.register_fake
def _(grad_out, x, weight1, bias1, weight2, bias2, has_extra, backend_name, hidden=None):
    d_extra = torch.empty_like(grad_out) if has_extra else grad_out.new_empty(0)
    return [torch.empty_like(x), torch.empty_like(weight1), torch.empty_like(bias1),
            torch.empty_like(weight2), torch.empty_like(bias2), d_extra]


def _setup_context(ctx, inputs, output):
    x, weight1, bias1, weight2, bias2, extra = inputs
    ctx.save_for_backward(x, weight1, bias1, weight2, bias2)
    ctx.has_extra = extra is not None
    ctx.backend_name = backend.get_backend()  # the backward may run in autograd's device thread


def _backward(ctx, grad_out):
    grads = residual_conv_unit_backward_op(grad_out, *ctx.saved_tensors, ctx.has_extra, ctx.backend_name)
    return (*grads[:5], grads[5] if ctx.has_extra else None)


residual_conv_unit_op.register_autograd(_backward, setup_context=_setup_context)


def _train_setup_context(ctx, inputs, output):
    x, weight1, bias1, weight2, bias2, extra = inputs
    _, hidden = output
    ctx.save_for_backward(x, weight1, bias1, weight2, bias2, hidden)
    ctx.mark_non_differentiable(hidden)
    ctx.set_materialize_grads(False)  # hidden's (absent) gradient stays None, no zero tensor
    ctx.has_extra = extra is not None
    ctx.backend_name = backend.get_backend()


def _train_backward(ctx, grad_out, _grad_hidden):
    if grad_out is None:
        return (None,) * 6
    x, weight1, bias1, weight2, bias2, hidden = ctx.saved_tensors
    grads = residual_conv_unit_backward_op(grad_out, x, weight1, bias1, weight2, bias2, ctx.has_extra,
                                           ctx.backend_name, hidden)
    return (*grads[:5], grads[5] if ctx.has_extra else None)


residual_conv_unit_train_op.register_autograd(_train_backward, setup_context=_train_setup_context)


def _needs_backward(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def check_rcu_args(x, weight1, bias1, weight2, bias2, extra=None) -> None:
    """Every check of a residual conv unit call, shared by all implementations and run before any of
    them: x [B, C, H, W], both 3x3 weights [C, C, 3, 3], both biases [C], extra x's shape. A ValueError
    that says what was expected."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"residual_conv_unit expects x [B, C, H, W], got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"residual_conv_unit expects a floating-point x, got {x.dtype}")
    channels = x.shape[1]
    for name, t, shape in (("weight1", weight1, (channels, channels, 3, 3)), ("bias1", bias1, (channels,)),
                           ("weight2", weight2, (channels, channels, 3, 3)), ("bias2", bias2, (channels,))):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"residual_conv_unit: {name} must have shape {list(shape)} for x with C={channels} "
                             f"channels, got {got}")
    if extra is not None and (not isinstance(extra, torch.Tensor) or extra.shape != x.shape):
        got = tuple(extra.shape) if isinstance(extra, torch.Tensor) else type(extra).__name__
        raise ValueError(f"residual_conv_unit: extra must have x's shape {tuple(x.shape)}, got {got}")


def residual_conv_unit(x: torch.Tensor, weight1: torch.Tensor, bias1: torch.Tensor, weight2: torch.Tensor,
                       bias2: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
    """x + conv2(relu(conv1(relu(x)) + b1)) + b2 [+ extra]: validates the arguments, then calls the inference
    or the training operator (or, under the "inline" backend, computes the same math as plain PyTorch)."""
    check_rcu_args(x, weight1, bias1, weight2, bias2, extra)
    x, weight1, bias1, weight2, bias2, extra = autocast_inputs(x, weight1, bias1, weight2, bias2, extra)
    if inlined():
        return reference.residual_conv_unit_plain(x, weight1, bias1, weight2, bias2, extra)
    if _needs_backward(x, weight1, bias1, weight2, bias2, extra):
        return residual_conv_unit_train_op(x, weight1, bias1, weight2, bias2, extra)[0]
    return residual_conv_unit_op(x, weight1, bias1, weight2, bias2, extra)
