"""The Triton fused Reassemble (dpt_fast.kernels.reassemble) against the reference operator.

Two groups:
- CPU tests through the Triton interpreter (fp32 and fp16; bf16 dots are wrong in the interpreter),
  run when tests/conftest.py turned the interpreter on (no CUDA). Every readout x resample, odd grids
  (7x13 patches), batch 1 and 3, widths that are not multiples of the block sizes, forward and every
  gradient through the public op on the fused backend, against the reference evaluated in float64.
- GPU tests (marker gpu): compiled kernels, bf16 at DPT-Large/Hybrid widths, against the reference in
  float32, and torch.compile(fullgraph=True). Skipped without CUDA or when interpreting.
"""
import pytest
import torch

import dpt_fast
from dpt_fast import backend, ops, reference
from dpt_fast.ops.reassemble import output_shape, reassemble_op
from dpt_fast.reference.reassemble import READOUTS, RESAMPLES

INTERPRETING = backend.triton_interpreting()
interpreter = pytest.mark.skipif(not INTERPRETING, reason="CPU interpreter tests: run with TRITON_INTERPRET=1")


def gpu(fn):
    skip = pytest.mark.skipif(INTERPRETING or not torch.cuda.is_available(), reason="needs CUDA, compiled Triton")
    return pytest.mark.gpu(skip(fn))


FWD, BWD = "dpt_fast::reassemble", "dpt_fast::reassemble_backward"


def _kernels():
    from dpt_fast.kernels import reassemble as kernels
    assert kernels._INTERPRET == INTERPRETING, "dpt_fast.kernels.reassemble was imported under another TRITON_INTERPRET"
    return kernels


def _inputs(batch, grid_h, grid_w, dim, features, readout, resample, dtype, device="cpu", start_index=1, seed=0):
    """tokens, the stage's 6 parameters (None where absent) and an output gradient, all random (never zeros),
    scaled like trained weights so activations stay O(1)."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, scale=1.0: (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)  # noqa: E731
    tokens = rnd(batch, start_index + grid_h * grid_w, dim)
    rw = rnd(dim, 2 * dim, scale=(2 * dim) ** -0.5) if readout == "project" else None
    rb = rnd(dim, scale=0.1) if readout == "project" else None
    pw, pb = rnd(features, dim, 1, 1, scale=dim ** -0.5), rnd(features, scale=0.1)
    if resample in ("up4", "up2"):
        s = 4 if resample == "up4" else 2
        sw, sb = rnd(features, features, s, s, scale=features ** -0.5), rnd(features, scale=0.1)
    elif resample == "down2":
        sw, sb = rnd(features, features, 3, 3, scale=(9 * features) ** -0.5), rnd(features, scale=0.1)
    else:
        sw = sb = None
    params = [rw, rb, pw, pb, sw, sb]
    shape = output_shape(tokens, pw, sw, grid_h, grid_w, resample)
    grad = rnd(*shape).contiguous(memory_format=torch.channels_last)
    return tokens, params, grad


def _op_fwd_bwd(tokens, params, grad, grid_h, grid_w, start_index, readout, resample):
    """Forward and every present gradient through the public op (autograd -> dpt_fast::reassemble_backward)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in [tokens, *params] if t is not None]
    it = iter(leaves)
    args = [next(it) if t is not None else None for t in [tokens, *params]]
    out = ops.reassemble(*args, grid_h, grid_w, start_index, readout, resample)
    grads = torch.autograd.grad(out, leaves, grad)
    return out, list(grads)


def _reference_fwd_bwd(tokens, params, grad, grid_h, grid_w, start_index, readout, resample, dtype=torch.float64):
    """The oracle: the reference forward and backward on the same (rounded) inputs, in `dtype`."""
    up = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    args = (up(tokens), *map(up, params), grid_h, grid_w, start_index, readout, resample)
    out = reference.reassemble(*args)
    grads = reference.reassemble_backward(grad.to(dtype), *args)
    present = [g for g, t in zip(grads, [tokens, *params]) if t is not None]
    return out, present


# fp32 dots are exact IEEE in the interpreter; fp16 rounds the read and the 1x1 output before the next GEMM
_TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _close(actual, expected, dtype, what=""):
    """Elementwise |a - e| <= tol * (|e| + max|e|): relative, with a floor at the tensor's own scale
    (weight gradients are sums over every token)."""
    tol = _TOL[dtype]
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=tol, atol=tol * max(scale, 1e-6),
                               msg=lambda m: f"{what}: {m}")


def _check(batch, grid_h, grid_w, dim, features, readout, resample, dtype, start_index=1, seed=0, device="cpu"):
    tokens, params, grad = _inputs(batch, grid_h, grid_w, dim, features, readout, resample, dtype, device,
                                   start_index, seed)
    meta = (grid_h, grid_w, start_index, readout, resample)
    dpt_fast.implementations_ran(reset=True)
    with dpt_fast.use_backend("fused"):
        out, grads = _op_fwd_bwd(tokens, params, grad, *meta)
    ran = dpt_fast.implementations_ran()
    assert ran[FWD] == {"triton": 1} and ran[BWD] == {"triton": 1}, ran
    ref_dtype = torch.float64 if device == "cpu" else torch.float32
    ref_out, ref_grads = _reference_fwd_bwd(tokens, params, grad, *meta, dtype=ref_dtype)
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert out.stride() == ref_out.stride() and out.is_contiguous(memory_format=torch.channels_last)
    _close(out, ref_out, dtype, "out")
    names = [n for n, t in zip(["tokens", "readout_weight", "readout_bias", "proj_weight", "proj_bias",
                                "resample_weight", "resample_bias"], [tokens, *params]) if t is not None]
    assert len(grads) == len(ref_grads) == len(names)
    for name, g, r in zip(names, grads, ref_grads):
        assert g.dtype == dtype and g.shape == r.shape, name
        _close(g, r, dtype, "d_" + name)


# --- CPU: the Triton interpreter -----------------------------------------------------------------

@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("resample", RESAMPLES)
@pytest.mark.parametrize("readout", READOUTS)
def test_op_fused_matches_reference(readout, resample, batch, dtype):
    # 7x13 patches: odd grid, M = 91 or 273 rows across 32-row tiles; D = 48, F = 40: partial K and N tiles
    _check(batch, 7, 13, 48, 40, readout, resample, dtype, seed=batch)


@interpreter
@pytest.mark.parametrize("readout,resample", [("project", "up4"), ("add", "none"), ("ignore", "down2")])
def test_two_prefix_tokens(readout, resample):
    """start_index 2 (a class token and one more prefix token): the second one gets no gradient."""
    _check(2, 5, 7, 40, 24, readout, resample, torch.float32, start_index=2, seed=4)


@interpreter
def test_one_patch_and_wide_features():
    """Degenerate grid (1x1) and F larger than D."""
    _check(2, 1, 1, 16, 72, "project", "up2", torch.float32, seed=5)
    _check(2, 1, 1, 16, 72, "add", "down2", torch.float32, seed=6)


@interpreter
def test_strided_tokens():
    """Tokens that are a slice of a wider tensor (storage offset, row stride > D), as a tap may be."""
    batch, gh, gw, dim, features = 2, 3, 5, 32, 24
    _, params, grad = _inputs(batch, gh, gw, dim, features, "project", "up4", torch.float32, seed=7)
    wide = torch.randn(batch, 1 + gh * gw, dim + 16, generator=torch.Generator().manual_seed(8))
    tokens = wide[..., 8:8 + dim]
    assert not tokens.is_contiguous()
    meta = (gh, gw, 1, "project", "up4")
    with dpt_fast.use_backend("fused"):
        out, grads = _op_fwd_bwd(tokens, params, grad, *meta)
    ref_out, ref_grads = _reference_fwd_bwd(tokens, params, grad, *meta)
    _close(out, ref_out, torch.float32, "out")
    for g, r in zip(grads, ref_grads):
        _close(g, r, torch.float32, "grad")


@interpreter
def test_kernel_backward_contract():
    """reassemble_backward returns 7 tensors like the reference: absent parameters get fresh empty tensors."""
    kernels = _kernels()
    tokens, params, grad = _inputs(2, 3, 4, 16, 8, "ignore", "none", torch.float32, seed=9)
    args = (tokens, *params, 3, 4, 1, "ignore", "none")
    assert kernels.supports(tokens, "ignore", "none")
    grads = kernels.reassemble_backward(grad, *args)
    ref = reference.reassemble_backward(grad, *args)
    assert len(grads) == len(ref) == 7
    absent = [grads[i] for i in (1, 2, 5, 6)]
    assert all(g.numel() == 0 and g.dtype == tokens.dtype for g in absent)
    assert len({id(g) for g in absent}) == 4
    for g, r in zip(grads, ref):
        assert g.shape == r.shape
        _close(g, r, torch.float32)


@interpreter
def test_unsupported_inputs_fall_back_to_reference():
    kernels = _kernels()
    for dtype in (torch.bfloat16, torch.float64):
        tokens, params, grad = _inputs(1, 3, 4, 16, 8, "project", "up2", dtype, seed=10)
        assert not kernels.supports(tokens, "project", "up2")
        dpt_fast.implementations_ran(reset=True)
        with dpt_fast.use_backend("fused"):
            out = ops.reassemble(tokens, *params, 3, 4, 1, "project", "up2")
        assert dpt_fast.implementations_ran()[FWD] == {"reference": 1}
        torch.testing.assert_close(out, reference.reassemble(tokens, *params, 3, 4, 1, "project", "up2"))


@interpreter
@pytest.mark.parametrize("readout,resample", [("project", "up4"), ("add", "down2"), ("ignore", "none")])
def test_opcheck_fused(readout, resample):
    tokens, params, _ = _inputs(2, 3, 5, 16, 8, readout, resample, torch.float32, seed=11)
    tokens.requires_grad_(True)
    params = [p.requires_grad_(True) if p is not None else None for p in params]
    dpt_fast.implementations_ran(reset=True)
    with dpt_fast.use_backend("fused"):
        torch.library.opcheck(reassemble_op, (tokens, *params, 3, 5, 1, readout, resample),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    assert "triton" in dpt_fast.implementations_ran()[FWD]


# --- GPU: compiled kernels -----------------------------------------------------------------------

# DPT-Large (D=1024, features [256, 512, 1024, 1024]) and DPT-Hybrid stages 3-4 (D=768, [768, 768])
_GPU_STAGES = [("up4", 1024, 256), ("up2", 1024, 512), ("none", 1024, 1024), ("down2", 1024, 1024),
               ("none", 768, 768), ("down2", 768, 768)]


@gpu
@pytest.mark.parametrize("readout", READOUTS)
@pytest.mark.parametrize("resample,dim,features", _GPU_STAGES)
def test_gpu_bf16_matches_reference(resample, dim, features, readout):
    # 384x384 input: a 24x24 grid; batch 2, so rows of one tile belong to two images
    _check(2, 24, 24, dim, features, readout, resample, torch.bfloat16, seed=12, device="cuda")


@gpu
def test_gpu_odd_grid_fp16():
    _check(3, 7, 13, 1024, 256, "project", "up4", torch.float16, seed=13, device="cuda")
    _check(1, 27, 41, 768, 768, "project", "down2", torch.float16, seed=14, device="cuda")


@gpu
def test_gpu_torch_compile_fullgraph():
    gh = gw = 24
    tokens, params, grad = _inputs(2, gh, gw, 1024, 256, "project", "up4", torch.bfloat16, "cuda", seed=15)
    conv = torch.randn(256, 256, 3, 3, device="cuda", dtype=torch.bfloat16) * 0.02

    def stage(t, *p):  # the stage followed by layer1_rn, as in the model
        x = ops.reassemble(t * 1.0, *p, gh, gw, 1, "project", "up4")
        return torch.nn.functional.conv2d(x, conv, padding=1)

    torch._dynamo.reset()
    compiled = torch.compile(stage, fullgraph=True)
    g = torch.randn(2, 256, 4 * gh, 4 * gw, device="cuda", dtype=torch.bfloat16)
    results = []
    with dpt_fast.use_backend("fused"):
        for fn in (stage, compiled):
            leaves = [tokens.clone().requires_grad_(True)] + [p.clone().requires_grad_(True) for p in params]
            dpt_fast.implementations_ran(reset=True)
            out = fn(*leaves)
            results.append((out, torch.autograd.grad(out, leaves, g)))
            assert dpt_fast.implementations_ran()[FWD] == {"triton": 1}
    (eager, g_eager), (comp, g_comp) = results
    torch.testing.assert_close(comp, eager, atol=2e-2, rtol=2e-2)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b, atol=2e-2 * b.abs().max().item(), rtol=2e-2)
