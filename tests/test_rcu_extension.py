"""The CUDA residual conv unit (dpt_fast._C, csrc/) and its dispatch from `dpt_fast::residual_conv_unit`.

Three groups:
- build/registration (CPU): when the extension is built, `import dpt_fast._C` registers the CUDA kernels
  (and only CUDA kernels); when the toolchain is present and DPT_FAST_BUILD_CUDA is not 0, the
  extension must have been built (that is how CI proves the build). Skipped with a reason otherwise.
- CPU fallback: the fused backend on CPU tensors runs the reference, forward and backward, and says so.
- training operator (CPU): inputs that require grad run `dpt_fast::residual_conv_unit_train`, whose saved
  hidden activation spares the backward's conv1 (6 convolutions, not 7); model and torch.compile dispatch.
- GPU (marker gpu): the kernels against the reference evaluated in float64, bf16 and fp16, odd sizes,
  batch 1 and 5, 64 and 256 channels, with and without the extra addend, forward and every gradient
  (inference and training operators; the training backward calls no conv1);
  layouts, fallbacks, a batch split above 2^31 bytes, opcheck, and a compute-sanitizer memcheck run.
"""
from __future__ import annotations

import collections
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import dpt_fast
from dpt_fast import ops, reference
from dpt_fast.ops import rcu as rcu_ops
from dpt_fast.reference import rcu as reference_rcu
from helpers import extension_built as _extension_built
from helpers import extension_gpu as gpu
from helpers import needs_extension

FWD, BWD = "dpt_fast::residual_conv_unit", "dpt_fast::residual_conv_unit_backward"
INTERNAL_OPS = ("dpt_fast::_rcu_fused_forward", "dpt_fast::_rcu_fused_conv1", "dpt_fast::_rcu_fused_conv2")
TRAIN = "dpt_fast::residual_conv_unit_train"


def _toolchain_present() -> bool:
    nvcc = os.environ.get("CUDACXX") or shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    cutlass = importlib.util.find_spec("cutlass_library") is not None
    cmake = shutil.which("cmake") is not None or importlib.util.find_spec("cmake") is not None
    return bool(nvcc and torch.version.cuda and cutlass and cmake)


# --- build and registration (no GPU needed) ---------------------------------------------------------


def test_extension_built_when_toolchain_present():
    """The install rule: unset DPT_FAST_BUILD_CUDA + nvcc + CUDA torch (+ cmake, nvidia-cutlass) => built."""
    if os.environ.get("DPT_FAST_BUILD_CUDA", "").strip() == "0":
        pytest.skip("DPT_FAST_BUILD_CUDA=0: the extension is meant to be absent")
    if not _toolchain_present():
        pytest.skip("no CUDA toolchain (nvcc, CUDA torch, cmake, nvidia-cutlass): pure-Python install expected")
    assert _extension_built(), (
        "nvcc, a CUDA build of torch, cmake and nvidia-cutlass are present, so `pip install --no-build-isolation -e .` "
        "should have built dpt_fast._C; rebuild, or install with DPT_FAST_BUILD_CUDA=0")


@needs_extension
def test_import_registers_cuda_kernels_only():
    import dpt_fast._C  # noqa: F401

    for name in INTERNAL_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), name
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), name
    assert str(torch.ops.dpt_fast._rcu_fused_forward.default._schema) == (
        "dpt_fast::_rcu_fused_forward(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor? extra) -> Tensor")
    assert str(torch.ops.dpt_fast._rcu_fused_conv2.default._schema) == (
        "dpt_fast::_rcu_fused_conv2(Tensor hidden, Tensor x, Tensor w2, Tensor b2, Tensor? extra) -> Tensor")
    assert rcu_ops.cuda_kernel_registered()


@needs_extension
def test_internal_ops_fake_strides():
    rcu_ops.cuda_kernel_registered()  # registers the fakes
    x = torch.empty(2, 16, 5, 7, device="meta", dtype=torch.bfloat16)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    w = torch.empty(16, 16, 3, 3, device="meta", dtype=torch.bfloat16)
    b = torch.empty(16, device="meta", dtype=torch.bfloat16)
    assert torch.ops.dpt_fast._rcu_fused_forward(x_cl, w, b, w, b, None).stride() == x_cl.stride()
    assert torch.ops.dpt_fast._rcu_fused_forward(x, w, b, w, b, x).stride() == x.stride()
    assert torch.ops.dpt_fast._rcu_fused_conv1(x, w, b).stride() == x_cl.stride()
    assert torch.ops.dpt_fast._rcu_fused_conv2(x_cl, x_cl, w, b, None).stride() == x_cl.stride()
    assert torch.ops.dpt_fast._rcu_fused_conv2(x_cl, x, w, b, x).stride() == x.stride()


@needs_extension
def test_internal_op_rejects_cpu_tensors():
    import dpt_fast._C  # noqa: F401

    x = torch.randn(1, 8, 4, 4)
    w, b = torch.randn(8, 8, 3, 3), torch.randn(8)
    with pytest.raises(NotImplementedError):
        torch.ops.dpt_fast._rcu_fused_forward(x, w, b, w, b, None)
    with pytest.raises(NotImplementedError):
        torch.ops.dpt_fast._rcu_fused_conv2(x, x, w, b, None)


# --- CPU fallback --------------------------------------------------------------------------------------


def _params(channels, dtype, device, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    scale = (9 * channels) ** -0.5
    ps = [torch.randn(channels, channels, 3, 3, generator=gen) * scale, torch.randn(channels, generator=gen) * 0.1,
          torch.randn(channels, channels, 3, 3, generator=gen) * scale, torch.randn(channels, generator=gen) * 0.1]
    return [p.to(device=device, dtype=dtype).requires_grad_(requires_grad) for p in ps]


def _activation(batch, channels, height, width, dtype, device, seed=1, channels_last=True, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(batch, channels, height, width, generator=gen).to(device=device, dtype=dtype)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_(requires_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_extra", [False, True])
def test_cpu_fallback_runs_reference(dtype, with_extra):
    x = _activation(2, 64, 7, 9, dtype, "cpu", requires_grad=True)
    extra = _activation(2, 64, 7, 9, dtype, "cpu", seed=2, requires_grad=True) if with_extra else None
    params = _params(64, dtype, "cpu", requires_grad=True)
    grad = _activation(2, 64, 7, 9, dtype, "cpu", seed=3)
    dpt_fast.implementations_ran(reset=True)
    with dpt_fast.use_backend("fused"):
        out = ops.residual_conv_unit(x, *params, extra)
        grads = torch.autograd.grad(out, [x, *params] + ([extra] if with_extra else []), grad)
    ran = dpt_fast.implementations_ran(reset=True)
    assert ran[FWD] == {"reference": 1} and ran[BWD] == {"reference": 1}
    expected = reference.residual_conv_unit(x.detach(), *[p.detach() for p in params],
                                            None if extra is None else extra.detach())
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert out.stride() == x.stride()
    assert all(g is not None and g.shape == t.shape for g, t in zip(grads, [x, *params]))


def test_backward_strides_follow_the_fake_implementation():
    """dx must have x's strides (what the fake promises; torch.compile asserts it) even when the incoming
    gradient has another layout (here NCHW for a channels_last x)."""
    x = _activation(2, 16, 5, 7, torch.float32, "cpu")
    params = _params(16, torch.float32, "cpu")
    grad = _activation(2, 16, 5, 7, torch.float32, "cpu", seed=3, channels_last=False)
    grads = torch.ops.dpt_fast.residual_conv_unit_backward(grad, x, *params, True, "reference")
    expected = reference.residual_conv_unit_backward(grad, x, *params, True)
    for g, e, t in zip(grads, expected, [x, *params, grad]):
        assert g.stride() == torch.empty_like(t).stride()
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def _op_counts(fn) -> collections.Counter:
    """How often each operator (dispatcher op names, e.g. "aten::convolution") ran during fn()."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return collections.Counter(e.name for e in prof.events())


def _top_level_op_counts(fn) -> collections.Counter:
    """Like _op_counts for the operators called directly (not those inside another operator's body), with
    far less overhead than the profiler."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counts[func.name()] += 1
            return func(*args, **(kwargs or {}))

    counts = collections.Counter()
    with Count():
        fn()
    return counts


def _convolutions(counts) -> int:
    """Convolutions run: a forward convolution is one, a convolution backward (dgrad + wgrad) two."""
    return counts["aten::convolution"] + 2 * counts["aten::convolution_backward"]


@pytest.mark.parametrize("with_extra", [False, True])
def test_training_keeps_hidden_and_runs_six_convolutions(with_extra):
    """Inputs that require grad: the training operator runs, its backward gets the kept hidden activation:
    2 + 4 convolutions (eager's count). No grad: the inference operator, 2 convolutions. The inference
    operator's own backward (no hidden) still recomputes conv1: 7."""
    x = _activation(2, 16, 7, 5, torch.float32, "cpu", requires_grad=True)
    extra = _activation(2, 16, 7, 5, torch.float32, "cpu", seed=2, requires_grad=True) if with_extra else None
    params = _params(16, torch.float32, "cpu", requires_grad=True)
    grad = _activation(2, 16, 7, 5, torch.float32, "cpu", seed=3)
    leaves = [x, *params] + ([extra] if with_extra else [])

    outs = {}
    dpt_fast.implementations_ran(reset=True)
    fwd = _op_counts(lambda: outs.setdefault("train", ops.residual_conv_unit(x, *params, extra)))
    bwd = _op_counts(lambda: outs.setdefault("grads", torch.autograd.grad(outs["train"], leaves, grad)))
    assert fwd[TRAIN] == 1 and fwd[FWD] == 0 and _convolutions(fwd) == 2
    assert bwd[BWD] == 1 and bwd["aten::convolution"] == 0 and _convolutions(bwd) == 4
    assert dpt_fast.implementations_ran(reset=True) == {FWD: {"reference": 1}, BWD: {"reference": 1}}

    with torch.no_grad():
        counts = _op_counts(lambda: outs.setdefault("inference", ops.residual_conv_unit(x, *params, extra)))
    assert counts[FWD] == 1 and counts[TRAIN] == 0 and _convolutions(counts) == 2
    torch.testing.assert_close(outs["inference"], outs["train"], rtol=0, atol=0)
    assert dpt_fast.implementations_ran(reset=True) == {FWD: {"reference": 1}}

    def plain():  # the inference operator under autograd: its backward has no hidden
        out = rcu_ops.residual_conv_unit_op(x, *params, extra)
        outs["plain_grads"] = torch.autograd.grad(out, leaves, grad)
    counts = _op_counts(plain)
    assert counts[FWD] == 1 and counts[TRAIN] == 0 and _convolutions(counts) == 7
    for g, p in zip(outs["grads"], outs["plain_grads"]):
        torch.testing.assert_close(g, p, rtol=0, atol=0)


def test_requires_grad_only_on_weights_or_extra_picks_the_training_operator():
    x = _activation(1, 8, 5, 3, torch.float32, "cpu")
    params = _params(8, torch.float32, "cpu")
    extra = _activation(1, 8, 5, 3, torch.float32, "cpu", seed=2)
    for which in range(5):
        args = [x, *params, extra]
        args[[1, 2, 3, 4, 5][which]] = args[[1, 2, 3, 4, 5][which]].detach().clone().requires_grad_(True)
        counts = _op_counts(lambda: ops.residual_conv_unit(*args))
        assert counts[TRAIN] == 1 and counts[FWD] == 0, which
    counts = _op_counts(lambda: ops.residual_conv_unit(x, *params, extra))  # nothing requires grad
    assert counts[FWD] == 1 and counts[TRAIN] == 0
    with torch.inference_mode():
        counts = _op_counts(lambda: ops.residual_conv_unit(x.requires_grad_(True), *params, extra))
    assert counts[FWD] == 1 and counts[TRAIN] == 0


def test_model_trains_with_the_training_operator_and_infers_with_the_plain_one():
    from dpt_fast import DPTDepthModel
    torch.manual_seed(0)
    model = DPTDepthModel(backbone="vit_tiny_patch16_224", hooks=[2, 5, 8, 11], features=16, non_negative=False)
    x = torch.randn(1, 3, 32, 48)
    rcus = sum(type(m).__name__ == "ResidualConvUnit" for m in model.modules())
    train = _top_level_op_counts(lambda: model.train()(x).square().mean().backward())
    assert 0 < train[TRAIN] <= rcus and train[FWD] == 0 and train[BWD] == train[TRAIN], train
    with torch.no_grad():
        infer = _top_level_op_counts(lambda: model.eval()(x))
    assert infer[FWD] == train[TRAIN] and infer[TRAIN] == 0


def test_compiled_training_step_keeps_hidden():
    """torch.compile (aot_eager: Dynamo + AOTAutograd through the fake implementations, fullgraph) of a fusion
    block's RCU pair in training: same output and gradients as eager, and the compiled backward runs no
    forward convolution (the hidden activations are saved, not recomputed)."""
    from dpt_fast.models.blocks import ResidualConvUnit

    class Pair(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rcu1, self.rcu2 = ResidualConvUnit(8), ResidualConvUnit(8)

        def forward(self, x0, skip):
            return self.rcu2(self.rcu1(skip, extra=x0))

    torch.manual_seed(3)
    pair = Pair()
    x0 = _activation(2, 8, 9, 7, torch.float32, "cpu", seed=4, requires_grad=True)
    skip = _activation(2, 8, 9, 7, torch.float32, "cpu", seed=5, requires_grad=True)
    grad = _activation(2, 8, 9, 7, torch.float32, "cpu", seed=6)
    leaves = [x0, skip, *pair.parameters()]
    eager = pair(x0, skip)
    eager_grads = torch.autograd.grad(eager, leaves, grad)
    torch._dynamo.reset()
    compiled = torch.compile(pair, backend="aot_eager", fullgraph=True)
    out = compiled(x0, skip)  # compiles here
    counts = _op_counts(lambda: torch.autograd.grad(compiled(x0, skip), leaves, grad))
    assert counts[TRAIN] == 2 and counts[FWD] == 0 and counts[BWD] == 2, counts
    assert counts["aten::convolution"] == 4 and counts["aten::convolution_backward"] == 4, counts
    grads = torch.autograd.grad(out, leaves, grad)
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_fused_supported_is_false_on_cpu():
    x = torch.randn(1, 64, 4, 4, dtype=torch.bfloat16)
    assert not rcu_ops.fused_supported(x, torch.randn(64, 64, 3, 3, dtype=torch.bfloat16))


# --- GPU -----------------------------------------------------------------------------------------------


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _run(x, params, extra, grad, backend_name):
    """Output and gradients [dx, dw1, db1, dw2, db2, (dextra)] through the public operator."""
    leaves = [x, *params] + ([extra] if extra is not None else [])
    with dpt_fast.use_backend(backend_name):
        out = ops.residual_conv_unit(x, *params, extra)
        grads = torch.autograd.grad(out, leaves, grad) if grad is not None else []
    return out, list(grads)


def _case(batch, channels, height, width, dtype, with_extra, requires_grad=False, channels_last=True):
    x = _activation(batch, channels, height, width, dtype, "cuda", channels_last=channels_last,
                    requires_grad=requires_grad)
    params = _params(channels, dtype, "cuda", requires_grad=requires_grad)
    extra = (_activation(batch, channels, height, width, dtype, "cuda", seed=2, requires_grad=requires_grad)
             if with_extra else None)
    return x, params, extra


def _float64(x, params, extra, requires_grad):
    up = lambda t: None if t is None else t.detach().double().requires_grad_(requires_grad)  # noqa: E731
    return up(x), [up(p) for p in params], up(extra)


# bf16 keeps 8 significant bits, fp16 11: the fused kernels must be as close to the float64 truth as
# the same-dtype reference (cuDNN) is, give or take a factor, with an absolute floor for tiny errors.
_FLOOR = {torch.bfloat16: 8e-3, torch.float16: 1e-3}

# 72 channels: a partial 64-wide K chunk and a partial 128-wide N tile; 384: three N tiles; 16 channels on a
# 1x2 map: every 3x3 window mostly padding, one tile for everything
SHAPES = [(1, 64, 37, 53), (5, 256, 37, 53), (5, 64, 24, 24), (1, 256, 96, 96), (2, 72, 11, 13),
          (1, 384, 19, 23), (3, 16, 1, 2)]


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,channels,height,width", SHAPES)
@pytest.mark.parametrize("with_extra", [False, True])
def test_forward_matches_reference(dtype, batch, channels, height, width, with_extra):
    x, params, extra = _case(batch, channels, height, width, dtype, with_extra)
    dpt_fast.implementations_ran(reset=True)
    out, _ = _run(x, params, extra, None, "fused")
    assert dpt_fast.implementations_ran(reset=True)[FWD] == {"cuda": 1}
    ref, _ = _run(x, params, extra, None, "reference")
    truth, _ = _run(*_float64(x, params, extra, False), None, "reference")
    assert out.dtype == dtype and out.shape == x.shape and out.stride() == x.stride()
    assert torch.isfinite(out).all()
    err, ref_err = _rel_l2(out, truth), _rel_l2(ref, truth)
    assert err <= max(2 * ref_err, _FLOOR[dtype]), (err, ref_err)
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-2
    torch.testing.assert_close(out.double(), truth, atol=tol, rtol=tol)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,channels,height,width", [(1, 64, 37, 53), (5, 256, 37, 53), (2, 72, 11, 13)])
@pytest.mark.parametrize("with_extra", [False, True])
def test_gradients_match_reference(dtype, batch, channels, height, width, with_extra):
    x, params, extra = _case(batch, channels, height, width, dtype, with_extra, requires_grad=True)
    grad = _activation(batch, channels, height, width, dtype, "cuda", seed=3)
    dpt_fast.implementations_ran(reset=True)
    out, grads = _run(x, params, extra, grad, "fused")
    assert dpt_fast.implementations_ran(reset=True) == {FWD: {"cuda": 1}, BWD: {"cuda": 1}}
    ref_out, ref_grads = _run(x, params, extra, grad, "reference")
    truth_out, truth_grads = _run(*_float64(x, params, extra, True), grad.double(), "reference")
    names = ["dx", "dw1", "db1", "dw2", "db2", "dextra"]
    for name, g, r, t, leaf in zip(names, grads, ref_grads, truth_grads, [x, *params, extra]):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape and g.stride() == torch.empty_like(leaf).stride(), name
        err, ref_err = _rel_l2(g, t), _rel_l2(r, t)
        assert err <= max(2 * ref_err, 2 * _FLOOR[dtype]), (name, err, ref_err)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("channels", [64, 256])
@pytest.mark.parametrize("with_extra", [False, True])
def test_training_operator_matches_reference(dtype, batch, channels, with_extra):
    """The training path (inputs require grad: residual_conv_unit_train, hidden kept) on 37x53 maps: output,
    hidden and every gradient against float64, as close as the same-dtype reference. float32: the
    reference serves (no fused kernel) and must say so."""
    x, params, extra = _case(batch, channels, 37, 53, dtype, with_extra, requires_grad=True)
    grad = _activation(batch, channels, 37, 53, dtype, "cuda", seed=3)
    impl = "reference" if dtype == torch.float32 else "cuda"
    dpt_fast.implementations_ran(reset=True)
    counts = _top_level_op_counts(lambda: _run(x, params, extra, grad, "fused"))
    assert counts[TRAIN] == 1 and counts[FWD] == 0 and counts[BWD] == 1
    assert dpt_fast.implementations_ran(reset=True) == {FWD: {impl: 1}, BWD: {impl: 1}}
    out, grads = _run(x, params, extra, grad, "fused")
    ref_out, ref_grads = _run(x, params, extra, grad, "reference")
    truth_out, truth_grads = _run(*_float64(x, params, extra, True), grad.double(), "reference")
    floor = _FLOOR.get(dtype, 1e-3)  # float32 on the GPU: TF32 convolutions as configured
    assert out.dtype == dtype and out.stride() == x.stride() and torch.isfinite(out).all()
    assert _rel_l2(out, truth_out) <= max(2 * _rel_l2(ref_out, truth_out), floor)
    names = ["dx", "dw1", "db1", "dw2", "db2", "dextra"]
    for name, g, r, t, leaf in zip(names, grads, ref_grads, truth_grads, [x, *params, extra]):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape and g.stride() == torch.empty_like(leaf).stride(), name
        err, ref_err = _rel_l2(g, t), _rel_l2(r, t)
        assert err <= max(2 * ref_err, 2 * floor), (name, err, ref_err)
    with dpt_fast.use_backend("fused"), torch.no_grad():
        _, hidden = rcu_ops.residual_conv_unit_train_op(x, *params, extra)
    truth_hidden = reference_rcu.residual_conv_unit_hidden(x.double(), params[0].double(), params[1].double())
    assert hidden.dtype == dtype and hidden.stride() == x.stride()
    assert _rel_l2(hidden, truth_hidden) <= max(
        2 * _rel_l2(reference_rcu.residual_conv_unit_hidden(x, params[0], params[1]), truth_hidden), floor)


@gpu
def test_fused_backward_uses_the_kept_hidden_activation():
    """Training forward = _rcu_fused_conv1 + _rcu_fused_conv2; its backward runs no conv1 (the kept hidden
    serves) and two convolution backwards. The inference operator's own backward still recomputes it
    with one _rcu_fused_conv1. No grad: one _rcu_fused_forward."""
    x, params, extra = _case(2, 64, 19, 23, torch.bfloat16, True, requires_grad=True)
    grad = _activation(2, 64, 19, 23, torch.bfloat16, "cuda", seed=3)
    leaves = [x, *params, extra]
    kept = {}
    with dpt_fast.use_backend("fused"):
        fwd = _op_counts(lambda: kept.setdefault("out", ops.residual_conv_unit(x, *params, extra)))
        bwd = _op_counts(lambda: kept.setdefault("grads", torch.autograd.grad(kept["out"], leaves, grad)))
        torch.cuda.synchronize()
        assert fwd["dpt_fast::_rcu_fused_conv1"] == 1 and fwd["dpt_fast::_rcu_fused_conv2"] == 1, fwd
        assert fwd["dpt_fast::_rcu_fused_forward"] == 0 and fwd["aten::convolution"] == 0, fwd
        assert bwd[BWD] == 1 and bwd["dpt_fast::_rcu_fused_conv1"] == 0 and bwd["aten::convolution"] == 0, bwd
        assert bwd["aten::convolution_backward"] == 2, bwd

        def plain():
            out = rcu_ops.residual_conv_unit_op(x, *params, extra)
            kept["plain_out"] = out
            kept["plain_grads"] = torch.autograd.grad(out, leaves, grad)
        counts = _op_counts(plain)
        assert counts["dpt_fast::_rcu_fused_forward"] == 1 and counts["dpt_fast::_rcu_fused_conv1"] == 1, counts
        with torch.no_grad():
            counts = _op_counts(lambda: ops.residual_conv_unit(x, *params, extra))
        assert counts["dpt_fast::_rcu_fused_forward"] == 1 and counts["dpt_fast::_rcu_fused_conv1"] == 0, counts
    # the same kernels, so the same numbers (up to cuDNN's choice of algorithm between the two backwards)
    torch.testing.assert_close(kept["out"], kept["plain_out"], rtol=0, atol=0)
    for g, p in zip(kept["grads"], kept["plain_grads"]):
        assert _rel_l2(g, p) < 1e-2


@gpu
def test_fused_conv2_matches_reference():
    for channels_last, with_extra in ((True, True), (False, False), (False, True)):
        x, params, extra = _case(3, 64, 13, 29, torch.bfloat16, with_extra, channels_last=channels_last)
        hidden = reference_rcu.residual_conv_unit_hidden(x, params[0], params[1])
        out = torch.ops.dpt_fast._rcu_fused_conv2(hidden, x, params[2], params[3], extra)
        assert out.stride() == x.stride()
        ref = reference_rcu.residual_conv_unit_from_hidden(hidden.double(), x.double(), params[2].double(),
                                                           params[3].double(), None if extra is None else extra.double())
        assert _rel_l2(out, ref) < 1e-2
        torch.testing.assert_close(out.double(), ref, atol=5e-2, rtol=5e-2)
    with pytest.raises(RuntimeError, match="hidden must have x's dtype"):
        torch.ops.dpt_fast._rcu_fused_conv2(hidden.half(), x, params[2], params[3], None)


@gpu
def test_training_input_not_channels_last():
    x, params, extra = _case(2, 64, 19, 23, torch.bfloat16, True, channels_last=False, requires_grad=True)
    grad = _activation(2, 64, 19, 23, torch.bfloat16, "cuda", seed=3, channels_last=False)
    dpt_fast.implementations_ran(reset=True)
    out, grads = _run(x, params, extra, grad, "fused")
    assert dpt_fast.implementations_ran(reset=True) == {FWD: {"cuda": 1}, BWD: {"cuda": 1}}
    ref, ref_grads = _run(x, params, extra, grad, "reference")
    assert out.stride() == x.stride() and grads[0].stride() == x.stride()
    torch.testing.assert_close(out, ref, atol=5e-2, rtol=5e-2)
    for g, r in zip(grads, ref_grads):
        assert _rel_l2(g, r) < 5e-2


@gpu
def test_input_not_channels_last_is_converted_once():
    x, params, extra = _case(2, 64, 19, 23, torch.bfloat16, True, channels_last=False)
    assert x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    dpt_fast.implementations_ran(reset=True)
    out, _ = _run(x, params, extra, None, "fused")
    assert dpt_fast.implementations_ran(reset=True)[FWD] == {"cuda": 1}
    ref, _ = _run(x, params, extra, None, "reference")
    assert out.stride() == x.stride()  # torch.empty_like(x), as the fake implementation says
    torch.testing.assert_close(out, ref, atol=5e-2, rtol=5e-2)


@gpu
def test_unsupported_calls_fall_back_to_reference_on_cuda():
    cases = [
        _case(1, 64, 9, 11, torch.float32, False),   # float32: the reference serves (cuDNN, TF32 as configured)
        _case(1, 12, 9, 11, torch.bfloat16, False),  # channels not a multiple of 8
    ]
    for x, params, extra in cases:
        dpt_fast.implementations_ran(reset=True)
        out, _ = _run(x, params, extra, None, "fused")
        assert dpt_fast.implementations_ran(reset=True)[FWD] == {"reference": 1}
        torch.testing.assert_close(out, reference.residual_conv_unit(x, *params, extra), rtol=0, atol=0)
    x, params, extra = _case(1, 64, 9, 11, torch.bfloat16, False)
    dpt_fast.implementations_ran(reset=True)
    _run(x, params, extra, None, "reference")
    assert dpt_fast.implementations_ran(reset=True)[FWD] == {"reference": 1}


@gpu
def test_mixed_dtypes_fall_back_to_reference():
    """A bias or extra in another dtype than x: the reference serves (aten's behaviour, an error or a
    promotion), never the kernel converting it silently (its backward would then mix dtypes)."""
    for which in ("bias1", "weight2", "extra"):
        x, params, extra = _case(1, 64, 9, 11, torch.bfloat16, True)
        if which == "extra":
            extra = extra.float()
        else:
            i = {"bias1": 1, "weight2": 2}[which]
            params[i] = params[i].float()
        dpt_fast.implementations_ran(reset=True)
        try:
            _run(x, params, extra, None, "fused")
        except RuntimeError:
            pass  # aten's dtype error, from the reference
        assert dpt_fast.implementations_ran(reset=True)[FWD] == {"reference": 1}, which


@gpu
def test_side_stream_and_cuda_graph_capture():
    """The kernels launch on the current stream (graph capture fails on any other, and a side stream's
    result would race): eager on a side stream, then a captured graph replayed on new data."""
    x, params, extra = _case(2, 64, 19, 23, torch.bfloat16, True)
    with dpt_fast.use_backend("reference"):
        expected = ops.residual_conv_unit(x, *params, extra)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    dpt_fast.implementations_ran(reset=True)
    with torch.cuda.stream(side), dpt_fast.use_backend("fused"):
        out = ops.residual_conv_unit(x, *params, extra)
    torch.cuda.current_stream().wait_stream(side)
    assert dpt_fast.implementations_ran(reset=True)[FWD] == {"cuda": 1}
    torch.testing.assert_close(out, expected, atol=5e-2, rtol=5e-2)

    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    with dpt_fast.use_backend("fused"):
        ops.residual_conv_unit(static_x, *params, extra)  # warm-up outside the capture
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            static_out = ops.residual_conv_unit(static_x, *params, extra)
    new_x = _activation(2, 64, 19, 23, torch.bfloat16, "cuda", seed=7)
    static_x.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    with dpt_fast.use_backend("reference"):
        expected = ops.residual_conv_unit(new_x, *params, extra)
    torch.testing.assert_close(static_out, expected, atol=5e-2, rtol=5e-2)


@gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_a_device_that_is_not_the_current_one():
    with torch.cuda.device(0):
        x, params, extra = _case(2, 64, 13, 17, torch.bfloat16, True, requires_grad=True)
        x, params, extra = (x.detach().to("cuda:1").requires_grad_(), [p.detach().to("cuda:1").requires_grad_()
                            for p in params], extra.detach().to("cuda:1").requires_grad_())
        grad = torch.randn_like(x)
        dpt_fast.implementations_ran(reset=True)
        out, grads = _run(x, params, extra, grad, "fused")
        assert dpt_fast.implementations_ran(reset=True) == {FWD: {"cuda": 1}, BWD: {"cuda": 1}}
        ref, ref_grads = _run(x, params, extra, grad, "reference")
    assert out.device == x.device
    torch.testing.assert_close(out, ref, atol=5e-2, rtol=5e-2)
    for g, r in zip(grads, ref_grads):
        assert _rel_l2(g, r) < 5e-2


@gpu
def test_noncontiguous_weights():
    x, params, extra = _case(2, 64, 13, 17, torch.bfloat16, True)
    w1, b1, w2, b2 = params
    odd = [w1.contiguous(memory_format=torch.channels_last), b1, w2.transpose(2, 3).contiguous().transpose(2, 3), b2]
    assert not odd[2].is_contiguous()
    dpt_fast.implementations_ran(reset=True)
    out, _ = _run(x, odd, extra, None, "fused")
    assert dpt_fast.implementations_ran(reset=True)[FWD] == {"cuda": 1}
    ref, _ = _run(x, params, extra, None, "reference")
    torch.testing.assert_close(out, ref, atol=5e-2, rtol=5e-2)


@gpu
def test_empty_batch():
    x, params, _ = _case(0, 64, 5, 5, torch.bfloat16, False)
    dpt_fast.implementations_ran(reset=True)
    out, _ = _run(x, params, None, None, "fused")
    assert dpt_fast.implementations_ran(reset=True)[FWD] == {"cuda": 1}
    assert out.shape == x.shape


@gpu
def test_batch_split_above_2gb():
    # 5 x 64 x 2048 x 2048 bf16 = 2.7 GB: the kernels run it as two launches per convolution.
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs 40 GiB of GPU memory")
    x, params, extra = _case(5, 64, 2048, 2048, torch.bfloat16, True)
    dpt_fast.implementations_ran(reset=True)
    out, _ = _run(x, params, extra, None, "fused")
    assert dpt_fast.implementations_ran(reset=True)[FWD] == {"cuda": 1}
    ref, _ = _run(x, params, extra, None, "reference")
    assert _rel_l2(out, ref) < 1e-2
    for n in (0, 2, 3, 4):  # both sides of the split
        torch.testing.assert_close(out[n], ref[n], atol=6e-2, rtol=5e-2)
    del ref
    # the training forward's two operators (conv1 into a full-batch hidden, conv2 reading it) go through the
    # same batch loop with their own per-chunk offsets into hidden: the same kernels, so the same numbers
    with torch.no_grad():
        hidden = torch.ops.dpt_fast._rcu_fused_conv1(x, params[0], params[1])
        out2 = torch.ops.dpt_fast._rcu_fused_conv2(hidden, x, params[2], params[3], extra)
    torch.cuda.synchronize()
    assert hidden.is_contiguous(memory_format=torch.channels_last) and out2.stride() == x.stride()
    assert torch.equal(out2, out), [torch.equal(out2[n], out[n]) for n in range(x.shape[0])]
    del x, extra, out, hidden, out2
    torch.cuda.empty_cache()


@gpu
def test_opcheck_cuda():
    x, params, extra = _case(2, 64, 9, 11, torch.bfloat16, True, requires_grad=True)
    dpt_fast.implementations_ran(reset=True)
    with dpt_fast.use_backend("fused"), torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        torch.library.opcheck(rcu_ops.residual_conv_unit_op, (x, *params, extra))
        torch.library.opcheck(rcu_ops.residual_conv_unit_train_op, (x, *params, extra))
    ran = dpt_fast.implementations_ran(reset=True)
    assert set(ran[FWD]) == {"cuda"} and set(ran[BWD]) == {"cuda"}, ran


def _compute_sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if not found and root and os.path.isfile(os.path.join(root, "bin", "compute-sanitizer")):
            found = os.path.join(root, "bin", "compute-sanitizer")
    return found


_SANITIZED_CASE = textwrap.dedent("""
    import torch, dpt_fast
    from dpt_fast.ops import rcu
    assert rcu.cuda_kernel_registered()
    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        for (b, c, h, w), extra in (((1, 64, 13, 21), True), ((2, 72, 5, 3), False)):
            x = torch.randn(b, c, h, w, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
            ws = [torch.randn(c, c, 3, 3, device="cuda", dtype=dtype) * 0.05, torch.randn(c, device="cuda", dtype=dtype),
                  torch.randn(c, c, 3, 3, device="cuda", dtype=dtype) * 0.05, torch.randn(c, device="cuda", dtype=dtype)]
            e = torch.randn_like(x) if extra else None
            out = torch.ops.dpt_fast._rcu_fused_forward(x, *ws, e)
            hidden = torch.ops.dpt_fast._rcu_fused_conv1(x, ws[0], ws[1])
            out2 = torch.ops.dpt_fast._rcu_fused_conv2(hidden, x, ws[2], ws[3], e)
            torch.cuda.synchronize()
            assert torch.isfinite(out).all() and torch.isfinite(hidden).all()
            assert torch.equal(out, out2)  # the same two kernels, split in two calls
    print("sanitized case ok")
""")


@gpu
def test_compute_sanitizer_memcheck():
    sanitizer = _compute_sanitizer()
    if sanitizer is None:
        pytest.skip("compute-sanitizer not found (PATH, CUDA_HOME/bin, /usr/local/cuda/bin)")
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")  # exact allocations: overruns are caught
    proc = subprocess.run(
        [sanitizer, "--tool", "memcheck", "--error-exitcode", "3", "--leak-check", "no",
         sys.executable, "-c", _SANITIZED_CASE],
        capture_output=True, text=True, timeout=900, env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert "sanitized case ok" in output
    assert "ERROR SUMMARY: 0 errors" in output, output[-6000:]
