"""The Triton fused Reassemble (dpt_fast.kernels.reassemble) against the reference operator.

Two groups:
- CPU tests through the Triton interpreter (fp32 and fp16; bf16 dots are wrong in the interpreter),
  run when tests/conftest.py turned the interpreter on (no CUDA). Every readout x resample, odd grids
  (7x13 patches), batch 1 and 3, widths that are not multiples of the block sizes, forward and every
  gradient through the public op on the fused backend, against the reference evaluated in float64.
  The split-K weight gradient of the ConvTranspose stages at forced split counts (bitwise repeatable), and
  the split-count heuristic as a pure function.
- One CPU test that compiles for sm_90 (no GPU needed) every kernel variant the launchers produce,
  recorded from their forward and backward on meta tensors at the product's shapes.
- Every autotune config of the GEMM, pinned (pinned_config), for a project/up4 forward (per-image readout
  bias, GELU read, 1x1 projection, ConvTranspose with the pixel-shuffle store) and the split-K weight
  gradient: the helper runs here through the interpreter (its one config), every config on the GPU. The
  DPT_FAST_AUTOTUNE switch itself is tested in test_attention_kernel.py (both kernel modules).
- GPU tests (marker gpu): compiled kernels, bf16 at DPT-Large/Hybrid widths, against the reference in
  float64, torch.compile(fullgraph=True), every autotune config. Skipped without CUDA or when interpreting.
"""
import os

import pytest
import torch

import triton
import triton.language as tl

import dpt_fast
from dpt_fast import ops, reference
from dpt_fast.kernels.reassemble import _reassemble_pix_offsets  # conftest has set TRITON_INTERPRET by now
from dpt_fast.ops.reassemble import output_shape, reassemble_op
from dpt_fast.reference.reassemble import READOUTS, RESAMPLES
from helpers import INTERPRETING, gpu, interpreter

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


_NAMES = ["tokens", "readout_weight", "readout_bias", "proj_weight", "proj_bias", "resample_weight", "resample_bias"]


def _check(batch, grid_h, grid_w, dim, features, readout, resample, dtype, start_index=1, seed=0, device="cpu"):
    tokens, params, grad = _inputs(batch, grid_h, grid_w, dim, features, readout, resample, dtype, device,
                                   start_index, seed)
    meta = (grid_h, grid_w, start_index, readout, resample)
    dpt_fast.implementations_ran(reset=True)
    with dpt_fast.use_backend("fused"):
        out, grads = _op_fwd_bwd(tokens, params, grad, *meta)
    ran = dpt_fast.implementations_ran()
    assert ran[FWD] == {"triton": 1} and ran[BWD] == {"triton": 1}, ran
    # float64 on the GPU too: a float32 oracle runs its convolutions in TF32 there (cuDNN's default), whose
    # 10-bit mantissa is no better than the fp16 kernels under test
    ref_out, ref_grads = _reference_fwd_bwd(tokens, params, grad, *meta, dtype=torch.float64)
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert out.stride() == ref_out.stride() and out.is_contiguous(memory_format=torch.channels_last)
    _close(out, ref_out, dtype, "out")
    names = [n for n, t in zip(_NAMES, [tokens, *params]) if t is not None]
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
    dpt_fast.implementations_ran(reset=True)
    with dpt_fast.use_backend("fused"):
        out, grads = _op_fwd_bwd(tokens, params, grad, *meta)
    ran = dpt_fast.implementations_ran()
    assert ran[FWD] == {"triton": 1} and ran[BWD] == {"triton": 1}, ran
    ref_out, ref_grads = _reference_fwd_bwd(tokens, params, grad, *meta)
    _close(out, ref_out, torch.float32, "out")
    for g, r in zip(grads, ref_grads):
        _close(g, r, torch.float32, "grad")


@interpreter
@pytest.mark.parametrize("resample", ["up4", "down2"])
def test_channels_last_weights(resample):
    """A model converted with .to(memory_format=torch.channels_last) hands the op channels_last conv
    weights: their gradients must have the strides the fake implementation promises (empty_like), or
    torch.compile's stride assertions fail, and the right values."""
    batch, gh, gw, dim, features = 2, 3, 5, 16, 8
    tokens, params, grad = _inputs(batch, gh, gw, dim, features, "project", resample, torch.float32, seed=16)
    params = [p.contiguous(memory_format=torch.channels_last) if p is not None and p.dim() == 4 else p
              for p in params]
    assert not params[4].is_contiguous()
    meta = (gh, gw, 1, "project", resample)
    dpt_fast.implementations_ran(reset=True)
    with dpt_fast.use_backend("fused"):
        out, grads = _op_fwd_bwd(tokens, params, grad, *meta)
        direct = torch.ops.dpt_fast.reassemble_backward(grad, tokens, *params, *meta, "fused")
    ran = dpt_fast.implementations_ran()
    assert ran[FWD] == {"triton": 1} and ran[BWD] == {"triton": 2}, ran
    ref_out, ref_grads = _reference_fwd_bwd(tokens, params, grad, *meta)
    _close(out, ref_out, torch.float32, "out")
    for t, g, d, r in zip([tokens, *params], grads, direct, ref_grads):
        assert d.stride() == torch.empty_like(t).stride()
        _close(g, r, torch.float32, "grad")


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("resample", ["up4", "up2"])
@pytest.mark.parametrize("readout", READOUTS)
def test_split_k_weight_gradient(readout, resample, dtype, monkeypatch):
    """The ConvTranspose weight gradient dWt = y^T g (K = every token) at forced split counts through the
    public op: 1 (the plain kernel), 3 and 4. K = 3 * 91 = 273 is 9 BLOCK_K (32) tiles, the last one partial:
    3 splits of 3 tiles; 4 splits of 3, 3, 3 and none (an empty split stores zeros). Every gradient against
    the float64 reference, and a second backward per split count bitwise equal to the first. One forward,
    the backward run again from its saved inputs (it recomputes the forward's intermediates)."""
    kernels = _kernels()
    batch, gh, gw, dim, features = 3, 7, 13, 40, 20   # dWt: M = 20, N = 320 (up4) or 80 (up2): partial tiles
    tokens, params, grad = _inputs(batch, gh, gw, dim, features, readout, resample, dtype, seed=21)
    meta = (gh, gw, 1, readout, resample)
    ref_out, ref_grads = _reference_fwd_bwd(tokens, params, grad, *meta)
    splits_seen = []
    plain_gemm = kernels._gemm

    def spy(*args, split_k=1, **kwargs):
        splits_seen.append((kwargs.get("b_pix", False), split_k))
        return plain_gemm(*args, split_k=split_k, **kwargs)

    monkeypatch.setattr(kernels, "_gemm", spy)
    leaves = [t.detach().clone().requires_grad_(True) for t in [tokens, *params] if t is not None]
    it = iter(leaves)
    args = [next(it) if t is not None else None for t in [tokens, *params]]
    with dpt_fast.use_backend("fused"):
        dpt_fast.implementations_ran(reset=True)
        out = ops.reassemble(*args, *meta)
        _close(out, ref_out, dtype, "out")
        for split in (1, 3, 4):
            monkeypatch.setattr(dpt_fast.env, "REASSEMBLE_SPLIT_K", str(split))  # DPT_FAST_REASSEMBLE_SPLIT_K
            runs = []
            for _ in range(1 if split == 1 else 2):
                splits_seen.clear()
                runs.append(torch.autograd.grad(out, leaves, grad, retain_graph=True))
                # the dWt GEMM (the only one gathering B through the pixel-shuffle) and nothing else splits
                assert sorted(set(splits_seen)) == [(False, 1), (True, split)], splits_seen
            names = [n for n, t in zip(_NAMES, [tokens, *params]) if t is not None]
            assert len(runs[0]) == len(ref_grads) == len(names)
            for name, g, r in zip(names, runs[0], ref_grads):
                assert g.dtype == dtype and g.shape == r.shape, name
                _close(g, r, dtype, f"split {split}: d_{name}")
            if len(runs) == 2:
                for name, g0, g1 in zip(names, *runs):
                    assert torch.equal(g0, g1), f"split {split}: d_{name} differs between two backward runs"
    assert dpt_fast.implementations_ran()[BWD] == {"triton": 5}


def test_split_k_heuristic():
    """choose_split_k is a pure function of (M, N, K, SMs); the environment override wins."""
    kernels = _kernels()
    choose = kernels.choose_split_k
    # DPT-Large stage 1 dWt at 1536^2 batch 16 (M = F = 256, N = 16 F, K = 16 * 96^2 tokens): 64 tiles
    assert choose(256, 4096, 16 * 96 * 96, 132) == 4
    assert choose(512, 2048, 16 * 96 * 96, 132) == 4             # stage 2 (up2, F = 512)
    assert choose(96, 1536, 16 * 96 * 96, 132) == 22             # DPT-Base stage 1: 12 tiles
    assert choose(256, 4096, 240 * 136, 132) == 4                # 4K, batch 1
    assert choose(256, 4096, 2 * 576, 132) == 2                  # 384^2 batch 2: K caps it (576 per split)
    assert choose(256, 4096, 576, 132) == 1                      # 384^2 batch 1: short K
    assert choose(256, 4096, 511, 10**6) == 1
    assert choose(16 * 9216, 256, 4096, 132) == 1                # many output tiles (the dy GEMM)
    assert choose(64, 64, 10**9, 10**6) == (256 * 2**20) // (4 * 64 * 64)  # partial buffer capped at 256 MiB
    for m in (1, 20, 96, 256, 512, 1024):
        for n in (80, 1536, 4096, 16384):
            for k in (1, 511, 512, 5000, 147456):
                for sms in (1, 78, 132):
                    s = choose(m, n, k, sms)
                    tiles = -(-m // 128) * -(-n // 128)
                    assert s >= 1 and (s == 1 or (k // s >= 512 and s * tiles <= 2 * sms)), (m, n, k, sms, s)
    device = torch.device("cpu")
    for forced, expected in (("3", 3), ("1", 1), ("0", 1), (" 16 ", 16)):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(dpt_fast.env, "REASSEMBLE_SPLIT_K", forced)
            assert kernels._split_k(256, 4096, 100, device) == expected
    with pytest.MonkeyPatch.context() as mp:
        for bad in ("four", "70000"):  # not a number; over CUDA's grid limit
            mp.setattr(dpt_fast.env, "REASSEMBLE_SPLIT_K", bad)
            with pytest.raises(ValueError, match=kernels.SPLIT_K_ENV):
                kernels._split_k(256, 4096, 100, device)
        mp.setattr(dpt_fast.env, "REASSEMBLE_SPLIT_K", "")
        assert kernels._split_k(256, 4096, 16 * 96 * 96, device) == 4  # off-GPU: an H100's 132 SMs assumed


@triton.jit
def _pix_offsets_kernel(tok_ptr, col_ptr, out_ptr, pix_np, pix_gw, pix_feat, S: tl.constexpr):
    i = tl.arange(0, 4)
    tl.store(out_ptr + i, _reassemble_pix_offsets(tl.load(tok_ptr + i), tl.load(col_ptr + i), pix_np, pix_gw,
                                                  pix_feat, S))


@interpreter
def test_pixel_shuffle_offsets_are_int64():
    """The pixel-shuffle offsets of an image whose map passes 2^31 elements are computed in 64 bits."""
    _kernels()
    n_patch, gw, feat, s = 2**20, 1024, 256, 4  # one image's map: 2^32 elements
    tok = torch.tensor([0, 5, n_patch + 7, 3 * n_patch + 1029], dtype=torch.int32)
    col = torch.tensor([3, s * s * feat - 1, 2 * feat + 9, 7 * feat], dtype=torch.int32)
    out = torch.empty(4, dtype=torch.int64)
    _pix_offsets_kernel[(1,)](tok, col, out, n_patch, gw, feat, S=s)
    expected = []
    for t, c in zip(tok.tolist(), col.tolist()):
        img, rem, q = t // n_patch, t % n_patch, c // feat
        h, w = (rem // gw) * s + q // s, (rem % gw) * s + q % s
        expected.append(((img * n_patch * s * s) + h * gw * s + w) * feat + c % feat)
    assert out.tolist() == expected


@interpreter
def test_readout_needs_a_prefix_token():
    tokens, params, _ = _inputs(1, 2, 2, 8, 4, "add", "none", torch.float32, start_index=0, seed=17)
    with pytest.raises(ValueError, match="start_index"):
        ops.reassemble(tokens, *params, 2, 2, 0, "add", "none")
    out = ops.reassemble(tokens, *params, 2, 2, 0, "ignore", "none")  # no prefix token: ignore only
    torch.testing.assert_close(out, reference.reassemble(tokens, *params, 2, 2, 0, "ignore", "none"))


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
    # parameters in another dtype than the tokens: aten's dtype error from the reference, not a kernel crash
    tokens, params, _ = _inputs(1, 3, 4, 16, 8, "project", "up2", torch.float32, seed=10)
    params[2] = params[2].half()
    dpt_fast.implementations_ran(reset=True)
    with dpt_fast.use_backend("fused"), pytest.raises(RuntimeError):
        ops.reassemble(tokens, *params, 3, 4, 1, "project", "up2")
    assert dpt_fast.implementations_ran()[FWD] == {"reference": 1}


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


# --- CPU: ahead-of-time compilation for Hopper (no GPU needed) ----------------------------------------

_AOT_SCRIPT = r"""
import json
import sys

import torch
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import ASTSource

from dpt_fast.kernels import reassemble as K
from dpt_fast.reference.reassemble import READOUTS

assert not K._INTERPRET
tuner = K._reassemble_gemm
fn = tuner.fn
variants = {}   # every distinct (signature, constexprs, attributes) a launch of the launchers produces
stats = {"max_programs": 0, "launches": 0, "split_launches": 0, "max_split": 1}
scenario = ""


def specialise(bound):
    # what JITFunction.run does with a launch's arguments (the same native function): pointer dtypes,
    # ints equal to 1 become constexprs, 16-divisible ints and 16-byte aligned pointers get attributes
    sig, consts, attrs = {}, {}, {}
    for p in fn.params:
        if p.name not in bound:  # BLOCK_*, GROUP_M: from the autotune config
            continue
        v = bound[p.name]
        if p.is_constexpr:
            sig[p.name], consts[p.name] = "constexpr", v
            continue
        ty, key = native_specialize_impl(CUDABackend, v, False, True, True)
        sig[p.name] = ty
        if ty == "constexpr":
            consts[p.name] = key
        elif isinstance(key, str) and key:
            attrs[p.name] = CUDABackend.parse_attr(key)
    return sig, consts, attrs


class Recorder:  # stands in for the autotuned kernel: records launches instead of running them
    configs, cache, arg_names, keys = K._FULL_CONFIGS, {}, fn.arg_names, K._reassemble_gemm.keys

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            bound = dict(zip(fn.arg_names, args), **kwargs)
            split = bound["split_k"]
            for cfg in K._FULL_CONFIGS:
                programs = grid(cfg.kwargs)  # (output tiles, split_k)
                assert len(programs) == 2 and programs[0] < 2**31 and programs[1] == split < 65536, programs
                stats["max_programs"] = max(stats["max_programs"], programs[0] * programs[1])
            stats["launches"] += 1
            if split > 1:  # the fp32 partial-sum variant: plain epilogue into a [split, M, N] buffer
                stats["split_launches"] += 1
                stats["max_split"] = max(stats["max_split"], split)
                assert bound["c_ptr"].dtype == torch.float32 and bound["stride_c_split"] == bound["M"] * bound["N"]
                assert not (bound["BIAS"] or bound["ACT"] or bound["STORE_PRE"] or bound["C_PIX"]), bound
            sig, consts, attrs = specialise(bound)
            key = json.dumps([sig, {k: repr(v) for k, v in consts.items()}, attrs], sort_keys=True)
            variants.setdefault(key, (sig, consts, attrs, scenario, split > 1))
        return launch


K._reassemble_gemm = Recorder()


def stage(batch, gh, gw, dim, features, readout, resample, dtype):
    # forward and backward of one stage on meta tensors: the launchers run, no kernel does
    global scenario
    scenario = f"{readout}/{resample} B{batch} {gh}x{gw} D{dim} F{features} {dtype}"
    e = lambda *s: torch.empty(*s, dtype=dtype, device="meta")  # noqa: E731
    tokens = e(batch, 1 + gh * gw, dim)
    rw, rb = (e(dim, 2 * dim), e(dim)) if readout == "project" else (None, None)
    k = {"up4": 4, "up2": 2, "down2": 3}.get(resample)
    sw, sb = (e(features, features, k, k), e(features)) if k else (None, None)
    args = (tokens, rw, rb, e(features, dim, 1, 1), e(features), sw, sb, gh, gw, 1, readout, resample)
    out = K.reassemble_forward(*args)
    K.reassemble_backward(torch.empty(out.shape, dtype=dtype, device="meta", memory_format=torch.channels_last),
                          *args)


# (resample, D, features): DPT-Large, DPT-Base and DPT-Hybrid stages
STAGES = [("up4", 1024, 256), ("up2", 1024, 512), ("none", 1024, 1024), ("down2", 1024, 1024),
          ("up4", 768, 96), ("up2", 768, 192), ("none", 768, 384), ("down2", 768, 768), ("none", 768, 768)]
# (batch, grid): 384^2 batch 1 and 2, 4K (3840x2176: 240x136 patches), 1536^2 batch 16, the GPU tests' odd grids
GRIDS = [(1, 24, 24), (2, 24, 24), (1, 136, 240), (16, 96, 96), (3, 7, 13), (1, 27, 41)]
for dtype in (torch.bfloat16, torch.float16):
    for batch, gh, gw in GRIDS:
        for resample, dim, features in STAGES:
            for readout in READOUTS:
                stage(batch, gh, gw, dim, features, readout, resample, dtype)

SMEM = 232448  # H100/H200: 227 KiB of shared memory per block
configs = K._FULL_CONFIGS if sys.argv[1:] == ["all"] else K._FULL_CONFIGS[:1]  # whatever DPT_FAST_AUTOTUNE says
result = {"stats": stats, "variants": len(variants), "compiled": []}
for sig, consts, attrs, where, split in variants.values():
    fits = []
    for cfg in configs:
        c = {**consts, **cfg.kwargs}
        src = ASTSource(fn=fn, signature={n: "constexpr" if n in c else sig[n] for n in fn.arg_names},
                        constexprs={(fn.arg_names.index(n),): v for n, v in c.items()},
                        attrs={(fn.arg_names.index(n),): a for n, a in attrs.items()})
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        ptx = compiled.asm["ptx"]
        fits.append(compiled.metadata.shared <= SMEM)
        result["compiled"].append({"where": where, "split": split, "config": str(cfg), "wgmma": "wgmma" in ptx,
                                   "cp_async": "cp.async" in ptx, "shared": compiled.metadata.shared})
    assert any(fits), f"no autotune config fits in shared memory: {where}"
print(json.dumps(result))
"""


def _aot_compile(*args):
    import json
    import subprocess
    import sys
    # the launchers' own split-K counts (the heuristic assumes 132 SMs on meta tensors), not a forced one
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DPT_FAST_REASSEMBLE_SPLIT_K")}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, *args], capture_output=True, text=True, env=env,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests run the compiled kernels themselves")
def test_kernels_compile_for_hopper_without_a_gpu():
    """Compile, for sm_90 (ptxas included), every kernel variant the launchers produce: each distinct
    specialisation (flags, pointer dtypes, ints specialised to 1, divisibility) of every launch of the
    forward and backward, every readout x resample, DPT-Large/Base/Hybrid widths, batch 1 to 16, 384^2
    to 4K grids, bf16 and fp16, with the first autotune config; the split-K variant of the weight-gradient
    GEMM included. Catches what the interpreter cannot see,
    and checks the GEMMs use wgmma with pipelined loads. By hand, `_aot_compile("all")` compiles every
    autotune config of every variant (minutes), and PYTHONPATH can point it at another Triton."""
    result = _aot_compile()
    assert result["variants"] >= 40 and result["stats"]["launches"] > 1000, result["stats"]
    assert len(result["compiled"]) == result["variants"]
    # split-K dWt launches (ConvTranspose stages from 384^2 batch 2 up; 22 splits for DPT-Base stage 1) compiled
    assert result["stats"]["split_launches"] > 50 and result["stats"]["max_split"] == 22, result["stats"]
    assert sum(r["split"] for r in result["compiled"]) >= 2, [r["where"] for r in result["compiled"] if r["split"]]
    for r in result["compiled"]:
        assert r["wgmma"] and r["cp_async"] and r["shared"] <= 227 * 1024, r


# --- every autotune config, pinned --------------------------------------------------------------

def _every_config(kernels, batch, grid_h, grid_w, dim, features, dtype, device, split_k, seed):
    """Each config of the GEMM's full list (whatever DPT_FAST_AUTOTUNE says), pinned: the autotuner runs it
    alone, no benchmarking. Per config, a project/up4 stage forward (4 GEMM variants: per-image readout
    bias, GELU read, 1x1 projection, ConvTranspose with the pixel-shuffle store) and the split-K ConvTranspose
    weight gradient dWt = y^T unshuffle(g) as reassemble_backward launches it (B gathered through the pixel
    shuffle, split_k fp32 partial slices). Returns ([(what, actual, expected float64)], skipped configs: those
    the device cannot run, OutOfResources, which the autotuner skips too; never the first)."""
    from triton.runtime.errors import OutOfResources
    from kernel_helpers import pinned_config
    tuner = kernels._reassemble_gemm
    s, meta = 4, (grid_h, grid_w, 1, "project", "up4")
    tokens, params, _ = _inputs(batch, grid_h, grid_w, dim, features, "project", "up4", dtype, device, seed=seed)
    ref_out = reference.reassemble(*(None if t is None else t.double() for t in (tokens, *params)), *meta)
    m, n = batch * grid_h * grid_w, s * s * features
    gen = torch.Generator().manual_seed(seed + 1)
    y = torch.randn(m, features, generator=gen).to(device, dtype)
    g = torch.randn(batch, features, grid_h * s, grid_w * s, generator=gen).to(device, dtype)
    g = g.contiguous(memory_format=torch.channels_last)
    # row (b, h, w), column (kh, kw, o) of the unshuffled g is g[b, o, h*s+kh, w*s+kw]
    g_rows = g.view(batch, features, grid_h, s, grid_w, s).permute(0, 2, 4, 3, 5, 1).reshape(m, n)
    ref_dwt = y.double().t() @ g_rows.double()

    def dwt():
        out = torch.empty(features, n, dtype=dtype, device=device)
        return kernels._gemm(y.t(), g, out, features, n, m, features, pix=(grid_h * grid_w, grid_w, features, s),
                             b_pix=True, split_k=split_k)

    results, skipped = [], []
    for cfg in kernels._FULL_CONFIGS:
        for what, call, expected in (("project/up4 forward", lambda: kernels.reassemble_forward(tokens, *params, *meta),
                                      ref_out), (f"split-K ({split_k}) dWt", dwt, ref_dwt)):
            with pinned_config(tuner, cfg):
                try:
                    actual = call()
                except OutOfResources as e:
                    assert cfg is not kernels._FULL_CONFIGS[0], f"{what}: the first config must fit: {e}"
                    skipped.append(f"{what} {cfg}: {e}")
                    continue
            assert tuner.best_config is cfg, f"{what}: the pinned config did not run"
            results.append((f"{what} {cfg}", actual, expected))
    return results, skipped


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_every_config_helper_under_the_interpreter(dtype):
    """The GPU test's every-config path with the interpreter's one config: pinning, the split-K call as the
    backward makes it (K = 182 tokens: 6 BLOCK_K tiles over 4 splits, the last one empty) and the independent
    references run before any GPU does; a perturbed result fails the check."""
    kernels = _kernels()
    results, skipped = _every_config(kernels, 2, 7, 13, 48, 40, dtype, "cpu", split_k=4, seed=22)
    assert skipped == [] and len(results) == 2 * len(kernels._FULL_CONFIGS) == 2
    for what, actual, expected in results:
        assert actual.dtype == dtype and actual.shape == expected.shape, what
        _close(actual, expected, dtype, what)
    what, actual, expected = results[1]
    bad = actual.clone()
    bad[3, 17] += 0.1 * expected.abs().max().item()
    with pytest.raises(AssertionError, match="split-K"):
        _close(bad, expected, dtype, what)


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
def test_gpu_4k_stage_matches_reference():
    """The largest grid the product runs: DPT-Large stage 1 at 3840x2176 (240x136 patches, M = 32640 rows,
    a 256 x 544 x 960 output), batch 1, bf16, forward and every gradient (the dWt GEMM reduces over all
    32640 tokens)."""
    _check(1, 136, 240, 1024, 256, "project", "up4", torch.bfloat16, seed=18, device="cuda")


@gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_tensors_on_a_device_that_is_not_the_current_one():
    """Triton launches on the current device: the operator must switch to the tensors' device."""
    with torch.cuda.device(0):
        _check(2, 7, 13, 1024, 256, "project", "up4", torch.bfloat16, seed=19, device="cuda:1")
        _check(1, 5, 6, 768, 768, "add", "down2", torch.float16, seed=20, device="cuda:1")


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


@gpu
def test_gpu_every_config_matches_reference():
    """Every config of the GEMM's full autotune list (the autotuner only ever benchmarks them; with
    DPT_FAST_AUTOTUNE=quick none but the first runs elsewhere), each pinned: a DPT-Large stage 1 forward
    (project/up4, D = 1024, F = 256, batch 2, odd 7x13 grid) and its split-K weight-gradient GEMM (4 splits,
    the last one empty for every BLOCK_K), bf16, against float64 references. 5 variants x 8 configs compiled,
    no benchmarking."""
    import warnings
    kernels = _kernels()
    results, skipped = _every_config(kernels, 2, 7, 13, 1024, 256, torch.bfloat16, "cuda", split_k=4, seed=23)
    for line in skipped:
        warnings.warn(f"config skipped (does not fit the device; the autotuner skips it too): {line}")
    assert results
    for what, actual, expected in results:
        assert torch.isfinite(actual).all(), what
        _close(actual, expected, torch.bfloat16, what)


def test_autotune_key_buckets_the_token_dimensions():
    """The GEMM's autotune key holds the token-sized dimensions bucketed (next power of two, at least 16), so
    a new batch or image size reuses a tuning instead of tuning 8 configs in the middle of inference:
    384^2 at batch 1 and a 27x37 grid share one, 384^2 at batch 16 and 518^2-sized 37x37 grids their own."""
    kernels = _kernels()
    bucket = kernels.token_bucket
    assert bucket(1) == bucket(16) == 16
    assert bucket(576) == bucket(27 * 37) == bucket(1024) == 1024 and bucket(27 * 41) == 2048
    assert bucket(16 * 576) == 16384 and bucket(37 * 37) == 2048 and bucket(1025) == 2048
    assert all(bucket(m) >= m and bucket(m) < 2 * max(m, 16) for m in range(1, 5000, 7))
    keys = kernels._reassemble_gemm.keys
    assert "M_BUCKET" in keys and "K_BUCKET" in keys and "M" not in keys and "K" not in keys, keys
