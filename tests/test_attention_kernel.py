"""The Triton fused attention (dpt_fast.kernels.attention) against the reference operator.

The groups:
- CPU tests through the Triton interpreter (fp32 and fp16; bf16 dots are wrong in the interpreter).
  tests/conftest.py turns the interpreter on when CUDA is unavailable; these tests skip unless it is on
  (on a CUDA machine: `TRITON_INTERPRET=1 pytest tests/test_attention_kernel.py -m "not gpu"`).
- The TMA (tensor descriptor) twins of the forward, dK/dV and dQ kernels, run through the interpreter by
  asking for them (tma=True): against the reference, inside each image's rows, misaligned inputs falling
  back to the pointer kernels.
- CPU tests that compile every config of every kernel for sm_90a ahead of time (no GPU needed; subprocesses,
  tests/hopper_aot.py): wgmma, cp.async / TMA, no register spill (ptxas -v), shared memory within budget.
- Autotuning: the key (dtype, bucketed N and batch x heads), the per-head-dim lists, no tuning inside
  CUDA-graph capture (kernels.launch), the DPT_FAST_AUTOTUNE switch (full: whole lists, quick: the first
  config of each, a bad value fails at import; both kernel modules, in a subprocess without the
  interpreter), and the helper that runs each config of the full lists pinned (tests/kernel_helpers.py)
  against the reference, run here through the interpreter (whose list is one config) and on the GPU for
  every config, pointer and TMA kernels.
- GPU tests (marker gpu): compiled kernels, bf16/fp16, N = 577, 1370, 2305, 9217, gradients, large-magnitude
  inputs, determinism, strided input, torch.compile(fullgraph=True), TMA vs pointer kernels on sm_90+,
  every config of every kernel (bf16, N = 577).
  Skipped without CUDA or when the kernels are interpreted.
"""
import os

import pytest
import torch

import dpt_fast
from dpt_fast import ops, reference
from dpt_fast.ops.attention import attention_op
from helpers import INTERPRETING, gpu, interpreter

FWD = "dpt_fast::attention"
BWD = "dpt_fast::attention_backward"


def _kernels():
    from dpt_fast.kernels import attention as kernels
    assert kernels._INTERPRET == INTERPRETING, "dpt_fast.kernels.attention was imported under another TRITON_INTERPRET"
    return kernels


def _qkv(batch, tokens, heads, head_dim, dtype, device="cpu", magnitude=1.0, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    qkv = torch.randn(batch, tokens, 3 * heads * head_dim, generator=gen) * magnitude
    grad = torch.randn(batch, tokens, heads * head_dim, generator=gen)
    return qkv.to(device=device, dtype=dtype), grad.to(device=device, dtype=dtype)


def _reference_fwd_bwd(qkv, grad, heads, scale, dtype=torch.float64):
    """The oracle: the reference operator on the same (rounded) inputs, in `dtype`."""
    x = qkv.detach().to(dtype)
    out, lse = reference.attention(x, heads, scale)
    dqkv = reference.attention_backward(grad.to(dtype), x, out, lse, heads, scale)
    return out, lse, dqkv


def _op_fwd_bwd(qkv, grad, heads, scale=None):
    x = qkv.detach().clone().requires_grad_(True)
    out = ops.attention(x, heads, scale)
    (dqkv,) = torch.autograd.grad(out, x, grad)
    return out, dqkv


def _assert_triton_ran(calls=1):
    """Forward and backward both ran the Triton kernels (a silent fallback to the reference fails here)."""
    ran = dpt_fast.implementations_ran(reset=True)
    assert ran.get(FWD) == {"triton": calls} and ran.get(BWD) == {"triton": calls}, ran


# what kernel_launches() reports after one forward and one backward launcher call
_TMA_RAN = {"_attention_fwd_tma": 1, "_attention_bwd_dkdv_tma": 1, "_attention_bwd_dq_tma": 1}
_POINTER_RAN = {"_attention_fwd": 1, "_attention_bwd_dkdv": 1, "_attention_bwd_dq": 1}


def _launched(kernels, expected):
    ran = kernels.kernel_launches(reset=True)
    assert ran == expected, ran


# fp32 runs with exact (IEEE) dots in the interpreter; fp16 rounds P and dS to fp16 before their matmuls
_TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float16: dict(atol=3e-3, rtol=3e-3)}


def _close(actual, expected, dtype, scale_by=1.0):
    tol = _TOL[dtype]
    torch.testing.assert_close(actual.to(expected.dtype), expected, atol=tol["atol"] * scale_by,
                               rtol=tol["rtol"] * scale_by)


# --- CPU: the Triton interpreter -----------------------------------------------------------------

_CASES = [  # (batch, tokens, heads, head_dim)
    (2, 1, 2, 64), (2, 17, 2, 64), (2, 77, 2, 64), (2, 129, 2, 64), (2, 197, 2, 64), (2, 300, 2, 64),
    (1, 77, 2, 128),
]


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("batch,tokens,heads,head_dim", _CASES)
def test_op_fused_matches_reference(dtype, batch, tokens, heads, head_dim):
    qkv, grad = _qkv(batch, tokens, heads, head_dim, dtype, seed=tokens + head_dim)
    dpt_fast.implementations_ran(reset=True)
    with dpt_fast.use_backend("fused"):
        out, dqkv = _op_fwd_bwd(qkv, grad, heads)
    ran = dpt_fast.implementations_ran()
    assert ran[FWD] == {"triton": 1} and ran[BWD] == {"triton": 1}, ran
    assert out.dtype == dtype and out.shape == (batch, tokens, heads * head_dim) and out.is_contiguous()
    assert dqkv.dtype == dtype and dqkv.shape == qkv.shape and dqkv.is_contiguous()
    ref_out, _, ref_dqkv = _reference_fwd_bwd(qkv, grad, heads, head_dim ** -0.5)
    _close(out, ref_out, dtype)
    _close(dqkv, ref_dqkv, dtype, scale_by=2.0)


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("tokens,head_dim,scale", [(1, 64, 0.125), (70, 64, 0.3), (129, 128, 0.05)])
def test_kernel_functions_match_reference(dtype, tokens, head_dim, scale):
    kernels = _kernels()
    heads = 2
    qkv, grad = _qkv(2, tokens, heads, head_dim, dtype, seed=3 * tokens)
    assert kernels.supports(qkv, heads)
    out, lse = kernels.attention_forward(qkv, heads, scale)
    ref_out, ref_lse = reference.attention(qkv, heads, scale)  # the reference's own dtypes
    assert out.dtype == ref_out.dtype and out.shape == ref_out.shape
    assert lse.dtype == ref_lse.dtype == torch.float32 and lse.shape == ref_lse.shape == (2, heads, tokens)
    _close(out, ref_out.to(torch.float64), dtype)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)  # lse is in natural-log units
    # the backward from the reference's out/lse and from ours agree with the reference backward
    ref_dqkv = reference.attention_backward(grad, qkv, ref_out, ref_lse, heads, scale).to(torch.float64)
    for o, l in ((ref_out, ref_lse), (out, lse)):
        dqkv = kernels.attention_backward(grad, qkv, o, l, heads, scale)
        assert dqkv.dtype == dtype and dqkv.shape == qkv.shape and dqkv.is_contiguous()
        _close(dqkv, ref_dqkv, dtype, scale_by=2.0)


@interpreter
@pytest.mark.parametrize("layout", ["slice", "batch_major_storage", "last_dim_stride"])
def test_strided_input(layout):
    batch, tokens, heads, head_dim = 2, 40, 2, 64
    width = 3 * heads * head_dim
    gen = torch.Generator().manual_seed(7)
    if layout == "slice":  # a slice of a wider tensor: storage offset, token stride > width
        qkv = torch.randn(batch, tokens, width + 96, generator=gen)[:, :, 32:32 + width]
    elif layout == "batch_major_storage":  # [N, B, C] storage viewed as [B, N, C]
        qkv = torch.randn(tokens, batch, width, generator=gen).transpose(0, 1)
    else:  # last-dimension stride 2 (copied once by the launcher)
        qkv = torch.randn(batch, tokens, width, 2, generator=gen)[..., 1]
    assert not qkv.is_contiguous()
    grad = torch.randn(batch, tokens, heads * head_dim, generator=gen)
    dpt_fast.implementations_ran(reset=True)
    with dpt_fast.use_backend("fused"):
        out, dqkv = _op_fwd_bwd(qkv, grad, heads)
    _assert_triton_ran()
    ref_out, _, ref_dqkv = _reference_fwd_bwd(qkv.contiguous(), grad, heads, head_dim ** -0.5)
    _close(out, ref_out, torch.float32)
    _close(dqkv, ref_dqkv, torch.float32, scale_by=2.0)


@interpreter
def test_large_magnitude_inputs_stay_finite():
    heads, head_dim = 2, 64
    qkv, grad = _qkv(1, 70, heads, head_dim, torch.float32, magnitude=30.0, seed=11)
    dpt_fast.implementations_ran(reset=True)
    with dpt_fast.use_backend("fused"):
        out, dqkv = _op_fwd_bwd(qkv, grad, heads)
    _assert_triton_ran()
    assert torch.isfinite(out).all() and torch.isfinite(dqkv).all()
    ref_out, _, ref_dqkv = _reference_fwd_bwd(qkv, grad, heads, head_dim ** -0.5)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-3, rtol=1e-4)
    # scores reach ~1e4 here: float32 rounding of the exponent argument bounds the agreement
    torch.testing.assert_close(dqkv.double(), ref_dqkv, atol=1e-2 * ref_dqkv.abs().max().item(), rtol=1e-2)


@interpreter
@pytest.mark.parametrize("tokens", [17, 64, 100])
# padded key rows of the last dK/dV block overflow and are discarded (never stored): numpy warns about them
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2", "ignore:invalid value encountered in matmul")
def test_very_negative_scores(tokens):
    """Every score about -200 (q = +5, k = -5): exp(-lse) overflows float32, so padded key columns
    must be masked out of P, never multiplied by zero-filled K (inf * 0 = NaN)."""
    heads, head_dim = 1, 64
    qkv = torch.empty(1, tokens, 3 * heads * head_dim)
    qkv[..., :head_dim] = 5.0
    qkv[..., head_dim:2 * head_dim] = -5.0 + 0.01 * torch.randn(1, tokens, head_dim)
    qkv[..., 2 * head_dim:] = torch.randn(1, tokens, head_dim)
    grad = torch.randn(1, tokens, head_dim)
    dpt_fast.implementations_ran(reset=True)
    with dpt_fast.use_backend("fused"):
        out, dqkv = _op_fwd_bwd(qkv, grad, heads)
    _assert_triton_ran()
    ref_out, _, ref_dqkv = _reference_fwd_bwd(qkv, grad, heads, head_dim ** -0.5)
    assert torch.isfinite(out).all() and torch.isfinite(dqkv).all()
    torch.testing.assert_close(out.double(), ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dqkv.double(), ref_dqkv, atol=1e-3, rtol=1e-3)
    # the TMA kernels: their key rows past N are zero-filled by the descriptor, the same hazard
    kernels = _kernels()
    kernels.kernel_launches(reset=True)
    out, lse = kernels.attention_forward(qkv, heads, head_dim ** -0.5, tma=True)
    dqkv = kernels.attention_backward(grad, qkv, out, lse, heads, head_dim ** -0.5, tma=True)
    _launched(kernels, _TMA_RAN)
    assert torch.isfinite(out).all() and torch.isfinite(dqkv).all()
    torch.testing.assert_close(out.double(), ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dqkv.double(), ref_dqkv, atol=1e-3, rtol=1e-3)


@interpreter
def _assert_deterministic(qkv, grad, heads):
    """Two fused forward+backward runs give bitwise equal out and dqkv (the backward has no atomics)."""
    dpt_fast.implementations_ran(reset=True)
    with dpt_fast.use_backend("fused"):
        first = _op_fwd_bwd(qkv, grad, heads)
        second = _op_fwd_bwd(qkv, grad, heads)
    _assert_triton_ran(calls=2)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_deterministic():
    _assert_deterministic(*_qkv(1, 77, 2, 64, torch.float16, seed=5), 2)


@interpreter
def test_unsupported_inputs_fall_back_to_reference():
    kernels = _kernels()
    cases = [
        (torch.randn(1, 9, 3 * 2 * 32), 2),  # head dim 32
        (torch.randn(1, 9, 3 * 1 * 80), 1),  # head dim 80
        (torch.randn(1, 9, 3 * 2 * 64, dtype=torch.float64), 2),  # float64
        (torch.randn(1, 9, 3 * 2 * 64, dtype=torch.bfloat16), 2),  # bf16: interpreter dots are wrong
    ]
    for qkv, heads in cases:
        assert not kernels.supports(qkv, heads)
        dpt_fast.implementations_ran(reset=True)
        with dpt_fast.use_backend("fused"):
            out = ops.attention(qkv, heads)
        assert dpt_fast.implementations_ran()[FWD] == {"reference": 1}
        torch.testing.assert_close(out, reference.attention(qkv, heads, (qkv.shape[-1] // (3 * heads)) ** -0.5)[0])
    assert kernels.supports(torch.randn(1, 9, 3 * 2 * 64), 2)
    assert not kernels.supports(torch.randn(1, 0, 3 * 2 * 64), 2)


@interpreter
def test_supports_refuses_rows_beyond_int32_offsets():
    """In-image offsets are int32: the largest image whose N * row stride fits is served, one token more
    is not (expanded views: no memory). A 4K frame of DPT-Large (N = 32401, H*D = 1024) is far inside."""
    kernels = _kernels()
    width = 3 * 16 * 64
    limit = (2**31 - 1) // width
    row = torch.randn(1, 1, width)
    assert kernels.supports(row.expand(1, 32401, width), 16)
    assert kernels.supports(row.expand(2, limit, width), 16)
    assert not kernels.supports(row.expand(1, limit + 1, width), 16)


@interpreter
def test_opcheck_fused():
    qkv = torch.randn(2, 13, 3 * 2 * 64, requires_grad=True)
    dpt_fast.implementations_ran(reset=True)
    with dpt_fast.use_backend("fused"):
        torch.library.opcheck(attention_op, (qkv, 2, 0.125))
    ran = dpt_fast.implementations_ran()
    assert set(ran[FWD]) == {"triton"} and set(ran[BWD]) == {"triton"}, ran


# --- CPU: the TMA (tensor descriptor) kernels through the interpreter --------------------------------
# The launchers pick them on sm_90+ GPUs only; tma=True asks for them here (the interpreter emulates the
# descriptors, their bounds and 16-byte alignment rules included).

_TMA_CASES = [  # (batch, tokens, head_dim)
    (1, 1, 64), (3, 17, 64), (1, 77, 64), (3, 129, 64), (1, 197, 64), (3, 300, 64), (3, 77, 128), (1, 129, 128),
]
@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("batch,tokens,head_dim", _TMA_CASES)
def test_tma_kernels_match_reference(dtype, batch, tokens, head_dim):
    kernels = _kernels()
    heads, scale = 2, head_dim ** -0.5
    qkv, grad = _qkv(batch, tokens, heads, head_dim, dtype, seed=5 * tokens + batch)
    out = torch.empty(batch, tokens, heads * head_dim, dtype=dtype)
    assert kernels.use_tma(qkv, out, tma=True) and not kernels.use_tma(qkv, out)  # auto: sm_90+ GPUs only
    kernels.kernel_launches(reset=True)
    out, lse = kernels.attention_forward(qkv, heads, scale, tma=True)
    dqkv = kernels.attention_backward(grad, qkv, out, lse, heads, scale, tma=True)
    _launched(kernels, _TMA_RAN)
    ref_out, ref_lse, ref_dqkv = _reference_fwd_bwd(qkv, grad, heads, scale)
    assert out.dtype == dtype and out.shape == ref_out.shape and lse.shape == (batch, heads, tokens)
    assert dqkv.dtype == dtype and dqkv.shape == qkv.shape and dqkv.is_contiguous()
    _close(out, ref_out, dtype)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
    _close(dqkv, ref_dqkv, dtype, scale_by=2.0)


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_tma_kernels_stay_inside_each_image(dtype):
    """Every [B, N, C] operand is the first N rows of a taller per-image buffer whose rows after N hold NaN
    (inputs) or a sentinel (outputs). The 3-D descriptors' N bound must zero-fill the reads there and drop
    the writes (a descriptor over the flattened rows would read the NaNs and overwrite the sentinels)."""
    kernels = _kernels()
    batch, tokens, pad, heads, head_dim = 3, 70, 58, 2, 64
    scale = head_dim ** -0.5
    qkv_rows, grad_rows = _qkv(batch, tokens + pad, heads, head_dim, dtype, seed=21)
    qkv_rows[:, tokens:] = float("nan")
    grad_rows[:, tokens:] = float("nan")
    qkv, grad = qkv_rows[:, :tokens], grad_rows[:, :tokens]
    out_rows = torch.full((batch, tokens + pad, heads * head_dim), 1234.0, dtype=dtype)
    dqkv_rows = torch.full((batch, tokens + pad, 3 * heads * head_dim), -4321.0, dtype=dtype)
    out, dqkv = out_rows[:, :tokens], dqkv_rows[:, :tokens]
    lse = torch.empty(batch, heads, tokens)
    kernels.kernel_launches(reset=True)
    kernels._forward_into(qkv, out, lse, heads, scale, tma=True)
    kernels._backward_into(grad, qkv, out, lse, dqkv, heads, scale, tma=True)
    _launched(kernels, _TMA_RAN)
    assert (out_rows[:, tokens:] == 1234.0).all() and (dqkv_rows[:, tokens:] == -4321.0).all()
    ref_out, ref_lse, ref_dqkv = _reference_fwd_bwd(qkv, grad, heads, scale)
    _close(out, ref_out, dtype)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
    _close(dqkv, ref_dqkv, dtype, scale_by=2.0)


@interpreter
@pytest.mark.parametrize("layout,fwd_tma,bwd_tma", [
    ("base_off_by_4_bytes", False, False),  # fp32 slice one element in: base not 16-byte aligned
    ("row_stride_not_16_bytes", False, False),  # token stride (width + 1) * 4 bytes
    ("grad_off_by_2_bytes", True, False),  # aligned fp16 qkv, grad_out a slice one element in
    ("slice_16_bytes_in", True, True),  # fp16 slice 8 elements in, token stride a multiple of 16 bytes: TMA
    ("batch_major_interleaved", False, False),  # [N, B, C] storage viewed as [B, N, C]: aligned, not nested
    ("batch_1_odd_batch_stride", True, True),  # [N, 1, C] storage viewed as [1, N, C]: batch stride unused
])
def test_tma_misaligned_input_takes_pointer_kernels(layout, fwd_tma, bwd_tma):
    kernels = _kernels()
    batch, tokens, heads, head_dim = 2, 45, 2, 64
    width, scale = 3 * heads * head_dim, 0.1
    gen = torch.Generator().manual_seed(17)
    grad = torch.randn(batch, tokens, width // 3, generator=gen)
    if layout == "base_off_by_4_bytes":
        qkv = torch.randn(batch, tokens, width + 1, generator=gen)[:, :, 1:]
    elif layout == "row_stride_not_16_bytes":
        qkv = torch.randn(batch, tokens, width + 1, generator=gen)[:, :, :width]
    elif layout == "grad_off_by_2_bytes":
        qkv = torch.randn(batch, tokens, width, generator=gen).half()
        grad = torch.randn(batch, tokens, width // 3 + 1, generator=gen).half()[:, :, 1:]
    elif layout == "slice_16_bytes_in":
        qkv = torch.randn(batch, tokens, width + 8, generator=gen).half()[:, :, 8:]
    elif layout == "batch_major_interleaved":
        qkv = torch.randn(tokens, batch, width, generator=gen).transpose(0, 1)
    else:
        qkv = torch.randn(tokens, 1, width, generator=gen).transpose(0, 1)
        grad = grad[:1]
    grad = grad.to(qkv.dtype)
    kernels.kernel_launches(reset=True)
    out, lse = kernels.attention_forward(qkv, heads, scale, tma=True)
    dqkv = kernels.attention_backward(grad, qkv, out, lse, heads, scale, tma=True)
    ran = kernels.kernel_launches(reset=True)
    assert ran == {"_attention_fwd_tma" if fwd_tma else "_attention_fwd": 1,
                   "_attention_bwd_dkdv_tma" if bwd_tma else "_attention_bwd_dkdv": 1,
                   "_attention_bwd_dq_tma" if bwd_tma else "_attention_bwd_dq": 1}, ran
    ref_out, ref_lse, ref_dqkv = _reference_fwd_bwd(qkv, grad, heads, scale)
    _close(out, ref_out, qkv.dtype)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
    _close(dqkv, ref_dqkv, qkv.dtype, scale_by=2.0)


# --- CPU: ahead-of-time compilation for Hopper (no GPU needed) ----------------------------------------

_POINTER_KERNELS = ("_attention_fwd", "_attention_bwd_dkdv", "_attention_bwd_dq")
_TMA_KERNELS = ("_attention_fwd_tma", "_attention_bwd_dkdv_tma", "_attention_bwd_dq_tma")
_SM90_SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90


def _compile_for_hopper(jobs, workers=1):
    """Compile [(kernel name, head dim, config index)] for sm_90a in a subprocess without the interpreter
    (tests/hopper_aot.py); {name/D/index: facts}."""
    import json
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    script = os.path.join(os.path.dirname(__file__), "hopper_aot.py")
    proc = subprocess.run([sys.executable, script, json.dumps(jobs), "--jobs", str(workers)], capture_output=True,
                          text=True, env=env, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _compiled_config_lists():
    """{kernel name: {head dim: number of configs}} of the full lists, as a compiled (not interpreted) import
    of the kernels sees them."""
    import json
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DPT_FAST_AUTOTUNE")}
    code = ("import json; from dpt_fast.kernels import attention as K; "
            "print(json.dumps({n: {d: len(c) for d, c in by_d.items()} for n, by_d in K._FULL_CONFIGS.items()}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {n: {int(d): k for d, k in by_d.items()} for n, by_d in json.loads(proc.stdout).items()}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU test (ahead-of-time compilation)")
def test_kernels_compile_for_hopper_without_a_gpu():
    """Every config of every head dim's list (64 and 128) of the forward, dK/dV and dQ kernels, pointer and
    TMA, plus the delta preprocess, compiled for sm_90a with ptxas: catches errors the interpreter cannot see;
    the matmuls use wgmma, the pointer kernels' loads are pipelined (cp.async), the TMA kernels move their
    tiles with the tensor copy engine (cp.async.bulk.tensor; at D = 128 a 256-byte row is wider than one
    128-byte swizzled TMA box); `ptxas -v` reports no register spill (a spilling config is slow, and would
    be a poor pick or, first in its list, the only one with DPT_FAST_AUTOTUNE=quick); shared memory stays
    within the lists' 200 KiB budget, well under sm_90's 227 KiB. About 80 compiles in two processes
    (1-2 s each on an idle core). Register allocation depends on the Triton version and its ptxas: with
    PYTHONPATH pointing at another Triton (an unpacked wheel) the subprocesses check that one."""
    lists = _compiled_config_lists()
    assert sorted(lists) == sorted(_POINTER_KERNELS + _TMA_KERNELS)
    assert all(sorted(by_d) == [64, 128] for by_d in lists.values()), lists
    jobs = [(name, d, i) for name, by_d in lists.items() for d, n in by_d.items() for i in range(n)]
    jobs.append(("_attention_bwd_preprocess", 64, 0))
    result = _compile_for_hopper(jobs, workers=2)
    assert len(result) == len(jobs)
    for key, facts in result.items():
        name = key.split("/")[0]
        if name in _POINTER_KERNELS:
            assert facts["wgmma"] and facts["cp_async"] and not facts["tma"], (key, facts)
        elif name in _TMA_KERNELS:
            assert facts["wgmma"] and facts["tma"], (key, facts)
    spilled = {k: (f["config"], f["spill_bytes"]) for k, f in result.items() if f["spill_bytes"]}
    assert not spilled, f"configs that spill registers on sm_90a: {spilled}"
    large = {k: (f["config"], f["shared"]) for k, f in result.items() if f["shared"] > 200 * 1024}
    assert not large, f"configs over the 200 KiB shared-memory budget: {large}"
    assert all(0 < f["shared"] < _SM90_SHARED_LIMIT and f["registers"] <= 255 for f in result.values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU test (ahead-of-time compilation)")
def test_hopper_compile_reports_spills():
    """The spill check can fail: a forward config that is not in the D = 128 list because it spills there
    (128x64 tiles on 4 warps: the 128x128 fp32 accumulator alone is 128 registers a thread) is reported
    with its spill bytes, the same shape at D = 64 without."""
    result = _compile_for_hopper([("_attention_fwd", 128, [128, 64, 4, 3]), ("_attention_fwd", 64, [128, 64, 4, 3])])
    assert result["_attention_fwd/128/128-64-4-3"]["spill_bytes"] > 0, result
    assert result["_attention_fwd/64/128-64-4-3"]["spill_bytes"] == 0, result


# --- every autotune config, pinned; the DPT_FAST_AUTOTUNE switch ------------------------------------

_MODES_SCRIPT = r"""
import importlib, json, os
from triton.runtime.autotuner import Autotuner
from dpt_fast import env
from dpt_fast.kernels import attention, reassemble
assert not attention._INTERPRET and not reassemble._INTERPRET

def facts(cfg):
    return [sorted(cfg.kwargs.items()), cfg.num_warps, cfg.num_stages, cfg.pre_hook is not None]

result = {}
for mode in ("", "full", " Quick ", "quick", "fast"):
    os.environ["DPT_FAST_AUTOTUNE"] = mode
    try:
        for module in (env, attention, reassemble):  # env reads the switch once; the kernels apply it
            importlib.reload(module)
    except ValueError as e:
        result[mode] = str(e)
        continue
    tuned = {f"{m.__name__}.{n}": k for m in (attention, reassemble) for n, k in vars(m).items()
             if isinstance(k, Autotuner)}
    # per kernel: (every config of every head dim, the first of each), each config once, in order
    lists = {f"attention.{n}": list(c.values()) for n, c in attention._FULL_CONFIGS.items()}
    lists["reassemble._reassemble_gemm"] = [reassemble._FULL_CONFIGS]
    lists = {f"dpt_fast.kernels.{n}": (attention._union(c), attention._union(l[:1] for l in c))
             for n, c in lists.items()}
    assert sorted(tuned) == sorted(lists), (sorted(tuned), sorted(lists))
    result[mode] = {n: [[facts(c) for c in k.configs], [facts(c) for c in lists[n][0]],
                        [facts(c) for c in lists[n][1]]] for n, k in tuned.items()}
print(json.dumps(result))
"""


def test_autotune_switch_quick_full_and_bad_value():
    """DPT_FAST_AUTOTUNE, read at import of each kernel module (a subprocess without the interpreter, whose
    config list is a single fixed one, reloading both modules per value): unset/full give every autotuned
    kernel its whole lists (the attention kernels: every head dim's), quick (any case) the first config of
    each list only (the TMA twins with their block-shape pre-hook), another value fails the import naming
    the accepted values."""
    import json
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DPT_FAST_AUTOTUNE")}
    proc = subprocess.run([sys.executable, "-c", _MODES_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "DPT_FAST_AUTOTUNE='fast'" in result["fast"] and "full, quick" in result["fast"], result["fast"]
    assert len(result[""]) == 7  # 6 attention kernels and the reassemble GEMM
    for name, (tuned, full, firsts) in result[""].items():
        assert len(full) >= 6 and tuned == full, name  # default: the whole lists (every head dim's)
        assert result["full"][name] == [full, full, firsts], name
        assert all(cfg[3] == name.endswith("_tma") for cfg in full), name  # the TMA twins carry the pre-hook
        assert 1 <= len(firsts) <= 2 and firsts[0] == full[0], name  # the first of each head dim's list
        for mode in (" Quick ", "quick"):
            assert result[mode][name] == [firsts, full, firsts], (mode, name)


def test_autotune_mode_and_configs(monkeypatch):
    from dpt_fast import env
    from dpt_fast import kernels as package
    for value, expected in (("", "full"), ("full", "full"), ("quick", "quick"), (" QUICK\n", "quick")):
        assert package.autotune_mode(value) == expected, value
        monkeypatch.setattr(env, "AUTOTUNE", value)  # the value dpt_fast.env read at import
        assert package.autotune_mode() == expected, value
    monkeypatch.setattr(env, "AUTOTUNE", "none")
    with pytest.raises(ValueError, match="DPT_FAST_AUTOTUNE='none': expected one of full, quick"):
        package.autotune_mode()
    configs = ["a", "b", "c"]
    assert package.autotune_configs(configs, "full") == configs and package.autotune_configs(configs, "quick") == ["a"]
    with pytest.raises(ValueError, match="full, quick"):
        package.autotune_configs(configs, "Quick")
    from kernel_helpers import pinned_config
    kernel = type("Tuned", (), {"configs": configs})()
    with pinned_config(kernel, "b") as pinned:
        assert pinned == "b" and kernel.configs == ["b"]
    assert kernel.configs is configs


def test_autotune_key_tells_dtype_batch_heads_and_buckets():
    """The attention autotune key (a pure function of the launch): fp16 and bf16 never share a tuning (the
    TMA kernels' descriptors carry no dtype), batch x heads is bucketed (a tuning found at batch 1 is not
    reused at batch 16), N by the next power of two; every kernel's autotuner keys on exactly these."""
    kernels = _kernels()
    key = kernels.autotune_key
    assert key(577, 16, 64, torch.bfloat16) == (1024, 16, 64, 1)
    assert key(577, 16, 64, torch.float16) != key(577, 16, 64, torch.bfloat16)
    assert key(577, 16, 64, torch.bfloat16) != key(577, 16 * 16, 64, torch.bfloat16)  # batch 1 vs 16, 16 heads
    assert key(1025, 16, 64, torch.float16)[0] == key(2048, 16, 64, torch.float16)[0] == 2048
    assert key(9217, 24, 64, torch.float16)[1] == key(9217, 32, 64, torch.float16)[1] == 32
    assert key(9217, 4096, 64, torch.float16)[1] == key(9217, 100000, 64, torch.float16)[1] == 512  # capped
    assert key(577, 16, 128, torch.float16)[2] == 128
    from triton.runtime.autotuner import Autotuner
    tuned = [k for k in vars(kernels).values() if isinstance(k, Autotuner)]
    assert len(tuned) == 6 and all(k.keys == ["N_BUCKET", "BH_BUCKET", "HEAD_DIM", "DTYPE_ID"] for k in tuned)


class _FakeTuned:
    """Stands in for an @triton.autotune'd kernel in the launch tests: records how it was launched."""

    def __init__(self, configs, cache=()):
        import triton
        self.configs = [triton.Config({"BLOCK_M": m}, num_warps=4) for m in configs]
        self.arg_names, self.keys, self.cache, self.calls = ["X", "N_KEY", "HEAD_DIM"], ["N_KEY"], dict(cache), []
        self.early_config_prune, self.fn = None, self

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.calls.append(("tuned" if "BLOCK_M" not in kwargs else "direct", args, kwargs))
        return run


def test_launch_never_tunes_inside_graph_capture(monkeypatch):
    """Autotuning inside CUDA-graph capture would benchmark (and synchronise) inside the capture: there an
    untuned key runs the first config directly (nothing stored, so it is tuned later outside capture), a key
    tuned before keeps going through the autotuner (its cached pick); outside capture the autotuner runs.
    A lone candidate (DPT_FAST_AUTOTUNE=quick) is launched directly everywhere: never benchmarked."""
    import dpt_fast.kernels as package
    assert package.pinned_during_capture(True, 3, tuned=False)
    assert not package.pinned_during_capture(True, 3, tuned=True)
    assert not package.pinned_during_capture(False, 3, tuned=False)
    assert not package.pinned_during_capture(True, 1, tuned=False)
    x = torch.zeros(4, dtype=torch.float16)
    kernel = _FakeTuned([64, 128])
    assert package.tuning_key(kernel, (x, 1024), {"HEAD_DIM": 64}) == (1024, "torch.float16")
    for capturing, cache, expected in ((False, {}, "tuned"), (True, {}, "direct"),
                                       (True, {(1024, "torch.float16"): None}, "tuned"),
                                       (True, {(2048, "torch.float16"): None}, "direct")):
        monkeypatch.setattr(package, "_capturing", lambda c=capturing: c)
        kernel = _FakeTuned([64, 128], cache)
        package.launch(kernel, (1,), x, 1024, HEAD_DIM=64)
        assert [c[0] for c in kernel.calls] == [expected], (capturing, cache)
        if expected == "direct":
            assert kernel.calls[0][2]["BLOCK_M"] == 64 and kernel.best_config is kernel.configs[0]
            assert kernel.cache == cache  # nothing stored: tuned later, outside capture
    monkeypatch.setattr(package, "_capturing", lambda: False)
    single = _FakeTuned([32])
    package.launch(single, (1,), x, 1024, HEAD_DIM=64)
    assert [c[0] for c in single.calls] == ["direct"] and single.calls[0][2]["BLOCK_M"] == 32


def test_head_dim_lists_narrow_each_launch():
    """Each kernel's autotuner holds every head dim's configs and narrows a launch to its head dim's list
    (the first of which is the DPT_FAST_AUTOTUNE=quick pick), so a config that spills at D = 128 is never
    tried there; pinning one config (a test) bypasses the narrowing."""
    import dpt_fast.kernels as package
    kernels = _kernels()
    for name, by_head_dim in kernels._FULL_CONFIGS.items():
        kernel = getattr(kernels, name)
        for head_dim, configs in by_head_dim.items():
            held = {kernels._shape(c) for c in kernel.configs}  # every config, or the firsts with quick
            picked = package.candidate_configs(kernel, (), {"HEAD_DIM": head_dim})
            assert [kernels._shape(c) for c in picked] == [kernels._shape(c) for c in configs
                                                           if kernels._shape(c) in held], name
            assert kernels._shape(picked[0]) == kernels._shape(configs[0]), name
    # the compiled import's lists (the interpreter's are one config): in a subprocess without the interpreter
    import subprocess
    import sys
    code = """
from dpt_fast.kernels import attention as K, candidate_configs
for name, by_head_dim in K._FULL_CONFIGS.items():
    kernel = getattr(K, name)
    assert len(kernel.configs) > max(len(c) for c in by_head_dim.values()), name
    for d, configs in by_head_dim.items():
        picked = candidate_configs(kernel, (), {"HEAD_DIM": d})
        assert [K._shape(c) for c in picked] == [K._shape(c) for c in configs], (name, d)
        assert (name.endswith("_tma")) == all(c.pre_hook is not None for c in picked), name
d64, d128 = ([K._shape(c) for c in K._FULL_CONFIGS["_attention_fwd"][d]] for d in (64, 128))
assert (128, 64, 4, 3) in d64 and (128, 64, 4, 3) not in d128
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DPT_FAST_AUTOTUNE")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def _every_config(kernels, qkv, grad, heads, scale, tma, ref, check):
    """Each config of the full list of the forward, dK/dV and dQ kernels (TMA twins with tma=True), pinned
    (the autotuner runs it alone, no benchmarking, whatever DPT_FAST_AUTOTUNE says), through the launchers:
    the forward against ref = (out, lse, dqkv) of the reference, the backward (from the reference's out and
    lse) one kernel's config at a time, the other kernel at its first config. check(part, actual, expected,
    what) with part in out, lse, dq, dk, dv. Returns the configs the device could not run (OutOfResources:
    the autotuner skips those too); never the first (the quick pick)."""
    from triton.runtime.errors import OutOfResources
    from kernel_helpers import pinned_config
    suffix = "_tma" if tma else ""
    names = ("_attention_fwd" + suffix, "_attention_bwd_dkdv" + suffix, "_attention_bwd_dq" + suffix)
    fwd, dkdv, dq = (getattr(kernels, n) for n in names)
    width = qkv.shape[-1] // 3
    head_dim = width // heads
    fwd_cfgs, dkdv_cfgs, dq_cfgs = (kernels._FULL_CONFIGS[n][head_dim] for n in names)
    ref_out, ref_lse, ref_dqkv = ref
    skipped = []

    def run(name, cfg, call):
        try:
            return call()
        except OutOfResources as e:
            assert cfg is not kernels._FULL_CONFIGS[name][head_dim][0], f"{name} {cfg}: the first config must fit: {e}"
            skipped.append(f"{name} {cfg}: {e}")
            return None

    for cfg in fwd_cfgs:
        kernels.kernel_launches(reset=True)
        with pinned_config(fwd, cfg):
            result = run(names[0], cfg, lambda: kernels.attention_forward(qkv, heads, scale, tma=tma))
        if result is None:
            continue
        assert fwd.best_config is cfg, f"{names[0]}: the pinned config did not run"
        _launched(kernels, {names[0]: 1})
        check("out", result[0], ref_out, f"{names[0]} {cfg}")
        check("lse", result[1], ref_lse, f"{names[0]} {cfg}")

    out_in, lse_in = ref_out.to(qkv.dtype), ref_lse.to(torch.float32)
    runs = [(cfg, dq_cfgs[0], 1) for cfg in dkdv_cfgs] + [(dkdv_cfgs[0], cfg, 2) for cfg in dq_cfgs[1:]]
    for dkdv_cfg, dq_cfg, which in runs:
        kernels.kernel_launches(reset=True)
        with pinned_config(dkdv, dkdv_cfg), pinned_config(dq, dq_cfg):
            dqkv = run(names[which], (dkdv_cfg, dq_cfg)[which - 1],
                       lambda: kernels.attention_backward(grad, qkv, out_in, lse_in, heads, scale, tma=tma))
        if dqkv is None:
            continue
        assert dkdv.best_config is dkdv_cfg and dq.best_config is dq_cfg, "the pinned configs did not run"
        _launched(kernels, {names[1]: 1, names[2]: 1})
        for j, part in enumerate(("dq", "dk", "dv")):
            cfg = dq_cfg if part == "dq" else dkdv_cfg
            if part == "dq" or which == 1:  # the kernel whose configs this run enumerates (and dq at the start)
                check(part, dqkv[..., j * width:(j + 1) * width], ref_dqkv[..., j * width:(j + 1) * width],
                      f"{names[2] if part == 'dq' else names[1]} {cfg}")
    return skipped


@interpreter
@pytest.mark.parametrize("tma", [False, True], ids=["pointer", "tma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_every_config_helper_under_the_interpreter(dtype, tma):
    """The GPU test's every-config path with the interpreter's one config (its only list here): the pinning,
    the launch counts and the checks run before any GPU does. A check that never fails would show up in the
    corrupted-reference case (the last assertion)."""
    kernels = _kernels()
    heads, head_dim, tokens = 2, 64, 77
    scale = head_dim ** -0.5
    qkv, grad = _qkv(2, tokens, heads, head_dim, dtype, seed=31)
    ref = _reference_fwd_bwd(qkv, grad, heads, scale)
    checked = []

    def check(part, actual, expected, what):
        checked.append((part, what))
        if part == "lse":
            torch.testing.assert_close(actual.double(), expected, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")
        else:
            _close(actual, expected, dtype, scale_by=1.0 if part == "out" else 2.0)

    assert _every_config(kernels, qkv, grad, heads, scale, tma, ref, check) == []
    suffix = "_tma" if tma else ""
    assert [p for p, _ in checked] == ["out", "lse", "dq", "dk", "dv"], checked
    assert all(what.startswith("_attention_") and (suffix == "" or "_tma " in what) for _, what in checked), checked
    bad = (ref[0], ref[1], ref[2].clone())
    bad[2][0, 5, 3 * heads * head_dim - 1] += 1.0  # one dV element off: the check must catch it
    with pytest.raises(AssertionError):
        _every_config(kernels, qkv, grad, heads, scale, tma, bad, check)


# --- GPU: compiled kernels -----------------------------------------------------------------------

def _sdpa_fwd_bwd(qkv, grad, heads, scale):
    """PyTorch SDPA in the input dtype: the low-precision baseline whose error ours is compared with."""
    b, n, c = qkv.shape
    x = qkv.detach().clone().requires_grad_(True)
    q, k, v = x.view(b, n, 3, heads, c // (3 * heads)).permute(2, 0, 3, 1, 4)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).reshape(b, n, c // 3)
    (dqkv,) = torch.autograd.grad(out, x, grad)
    return out, dqkv


def _max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("batch,tokens,heads,head_dim", [(2, 577, 4, 64), (1, 577, 2, 128), (2, 1370, 4, 64),
                                                         (2, 2305, 4, 64), (1, 9217, 2, 64)])
@pytest.mark.parametrize("magnitude", [1.0, 30.0], ids=["randn", "randn_x30"])
def test_gpu_matches_reference(dtype, batch, tokens, heads, head_dim, magnitude):
    qkv, grad = _qkv(batch, tokens, heads, head_dim, dtype, device="cuda", magnitude=magnitude, seed=tokens)
    scale = head_dim ** -0.5
    dpt_fast.implementations_ran(reset=True)
    with dpt_fast.use_backend("fused"):
        out, dqkv = _op_fwd_bwd(qkv, grad, heads)
    ran = dpt_fast.implementations_ran()
    assert ran[FWD] == {"triton": 1} and ran[BWD] == {"triton": 1}, ran
    assert torch.isfinite(out).all() and torch.isfinite(dqkv).all()
    ref_out, _, ref_dqkv = _reference_fwd_bwd(qkv, grad, heads, scale, dtype=torch.float32)
    base_out, base_dqkv = _sdpa_fwd_bwd(qkv, grad, heads, scale)
    # FlashAttention's test rule: our error against the fp32 oracle within 2x that of PyTorch's own
    # attention in the same low precision (plus a small floor for rounding of near-zero baselines)
    assert _max_err(out, ref_out) <= 2 * _max_err(base_out, ref_out) + 1e-3 * ref_out.abs().max().item()
    if magnitude == 1.0:  # at x30 the softmax is near one-hot and gradients huge: finiteness is the check
        assert _max_err(dqkv, ref_dqkv) <= 2 * _max_err(base_dqkv, ref_dqkv) + 1e-3 * ref_dqkv.abs().max().item()


@gpu
@pytest.mark.parametrize("tokens", [577, 2305])
def test_gpu_deterministic(tokens):
    _assert_deterministic(*_qkv(2, tokens, 4, 64, torch.bfloat16, device="cuda", seed=1), 4)


@gpu
def test_gpu_strided_input():
    heads, head_dim, tokens = 4, 64, 577
    width = 3 * heads * head_dim
    big = torch.randn(2, tokens, width + 64, device="cuda", dtype=torch.bfloat16)
    qkv = big[:, :, 64:]
    grad = torch.randn(2, tokens, heads * head_dim, device="cuda", dtype=torch.bfloat16)
    dpt_fast.implementations_ran(reset=True)
    with dpt_fast.use_backend("fused"):
        out, dqkv = _op_fwd_bwd(qkv, grad, heads)
        out_c, dqkv_c = _op_fwd_bwd(qkv.contiguous(), grad, heads)
    _assert_triton_ran(calls=2)
    torch.testing.assert_close(out, out_c, atol=0, rtol=0)
    torch.testing.assert_close(dqkv, dqkv_c, atol=0, rtol=0)


@gpu
def test_gpu_torch_compile_fullgraph():
    heads, head_dim = 4, 64
    qkv, grad = _qkv(2, 577, heads, head_dim, torch.bfloat16, device="cuda", seed=2)
    weight = torch.randn(heads * head_dim, heads * head_dim, device="cuda", dtype=torch.bfloat16) * 0.05

    def block(x):
        return ops.attention(x * 1.0, heads) @ weight

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    with dpt_fast.use_backend("fused"):
        x1 = qkv.clone().requires_grad_(True)
        eager = block(x1)
        (g_eager,) = torch.autograd.grad(eager, x1, grad @ weight.T)
        dpt_fast.implementations_ran(reset=True)
        x2 = qkv.clone().requires_grad_(True)
        out = compiled(x2)
        (g_compiled,) = torch.autograd.grad(out, x2, grad @ weight.T)
    assert dpt_fast.implementations_ran()[FWD] == {"triton": 1}
    torch.testing.assert_close(out, eager, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(g_compiled, g_eager, atol=2e-2, rtol=2e-2)


def _hopper():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


@gpu
@pytest.mark.skipif(not _hopper(), reason="TMA kernels: sm_90+")
@pytest.mark.parametrize("tokens,head_dim", [(577, 64), (2305, 64), (577, 128), (1, 64), (129, 64)])
def test_gpu_tma_and_pointer_kernels_agree(tokens, head_dim, monkeypatch):
    """On Hopper the launchers choose the TMA kernels by themselves; DPT_FAST_ATTENTION_TMA=0 forces the
    pointer kernels; both agree with the fp32 reference as closely as PyTorch's own attention does."""
    kernels = _kernels()
    heads, scale = 4, head_dim ** -0.5
    qkv, grad = _qkv(3, tokens, heads, head_dim, torch.bfloat16, device="cuda", seed=tokens)
    ref_out, ref_lse, ref_dqkv = _reference_fwd_bwd(qkv, grad, heads, scale, dtype=torch.float32)
    base_out, base_dqkv = _sdpa_fwd_bwd(qkv, grad, heads, scale)
    out_bound = 2 * _max_err(base_out, ref_out) + 1e-3 * ref_out.abs().max().item()
    dqkv_bound = 2 * _max_err(base_dqkv, ref_dqkv) + 1e-3 * ref_dqkv.abs().max().item()
    for env, expected in ((None, _TMA_RAN), ("0", _POINTER_RAN)):
        if env is not None:
            monkeypatch.setattr(dpt_fast.env, "ATTENTION_TMA", env)  # DPT_FAST_ATTENTION_TMA as read
        kernels.kernel_launches(reset=True)
        out, lse = kernels.attention_forward(qkv, heads, scale)
        dqkv = kernels.attention_backward(grad, qkv, out, lse, heads, scale)
        _launched(kernels, expected)
        assert _max_err(out, ref_out) <= out_bound and _max_err(dqkv, ref_dqkv) <= dqkv_bound, env
        torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-3)


@gpu
@pytest.mark.skipif(not _hopper(), reason="TMA kernels: sm_90+")
def test_gpu_tma_misaligned_slice_takes_pointer_kernels():
    kernels = _kernels()
    heads, head_dim, tokens = 4, 64, 577
    width = 3 * heads * head_dim
    gen = torch.Generator().manual_seed(23)  # fixed data: the tolerances below decide pass/fail
    qkv = torch.randn(2, tokens, width + 1, generator=gen).to("cuda", torch.bfloat16)[:, :, 1:]  # base 2 bytes in
    grad = torch.randn(2, tokens, width // 3, generator=gen).to("cuda", torch.bfloat16)
    ref_out, _, ref_dqkv = _reference_fwd_bwd(qkv, grad, heads, head_dim ** -0.5, dtype=torch.float32)
    for x, expected in ((qkv, _POINTER_RAN), (qkv.contiguous(), _TMA_RAN)):
        kernels.kernel_launches(reset=True)
        out, lse = kernels.attention_forward(x, heads, head_dim ** -0.5)
        dqkv = kernels.attention_backward(grad, x, out, lse, heads, head_dim ** -0.5)
        _launched(kernels, expected)
        assert _max_err(out, ref_out) < 2e-2 and _max_err(dqkv, ref_dqkv) < 5e-2 * ref_dqkv.abs().max().item()


@gpu
@pytest.mark.parametrize("tma", [False, True], ids=["pointer", "tma"])
def test_gpu_every_config_matches_reference(tma):
    """Every config of the full autotune lists (the autotuner only ever benchmarks them; with
    DPT_FAST_AUTOTUNE=quick none but the first runs elsewhere), each pinned: forward, dK/dV and dQ kernels,
    bf16, N = 577 (a partial last block for every block size), head dim 64 (DPT's), against the fp32
    reference within FlashAttention's rule (2x PyTorch SDPA's own bf16 error plus a small floor). About 22
    compiles per kernel family, no benchmarking."""
    if tma and not _hopper():
        pytest.skip("TMA kernels: sm_90+")
    import warnings
    kernels = _kernels()
    batch, tokens, heads, head_dim = 2, 577, 4, 64
    scale = head_dim ** -0.5
    qkv, grad = _qkv(batch, tokens, heads, head_dim, torch.bfloat16, device="cuda", seed=41)
    ref = _reference_fwd_bwd(qkv, grad, heads, scale, dtype=torch.float32)
    base_out, base_dqkv = _sdpa_fwd_bwd(qkv, grad, heads, scale)
    width = heads * head_dim
    bounds = {"out": 2 * _max_err(base_out, ref[0]) + 1e-3 * ref[0].abs().max().item()}
    for j, part in enumerate(("dq", "dk", "dv")):
        r, b = ref[2][..., j * width:(j + 1) * width], base_dqkv[..., j * width:(j + 1) * width]
        bounds[part] = 2 * _max_err(b, r) + 1e-3 * r.abs().max().item()
    checked = []

    def check(part, actual, expected, what):
        checked.append(part)
        assert torch.isfinite(actual).all(), what
        if part == "lse":
            torch.testing.assert_close(actual, expected, atol=1e-3, rtol=1e-3, msg=lambda m: f"{what}: {m}")
        else:
            err = _max_err(actual, expected)
            assert err <= bounds[part], f"{what}: {part} max error {err:.3g} > {bounds[part]:.3g}"

    skipped = _every_config(kernels, qkv, grad, heads, scale, tma, ref, check)
    for line in skipped:
        warnings.warn(f"config skipped (does not fit the device; the autotuner skips it too): {line}")
    assert {"out", "lse", "dq", "dk", "dv"} <= set(checked), checked


@gpu
def test_gpu_cuda_graph_capture_never_autotunes():
    """Inside CUDA-graph capture a key with no tuning runs the first config of its head dim's list (no
    benchmarking inside the capture, nothing stored: a later launch outside capture tunes it), and the
    replayed graph computes what an eager call does. The first config is compiled beforehand by a launch at
    another N bucket (loading a module inside a capture is not allowed)."""
    kernels = _kernels()
    heads, head_dim = 4, 64
    scale = head_dim ** -0.5
    warm, _ = _qkv(2, 300, heads, head_dim, torch.bfloat16, device="cuda", seed=5)  # N bucket 512
    kernels.attention_forward(warm, heads, scale)
    qkv, _ = _qkv(2, 1370, heads, head_dim, torch.bfloat16, device="cuda", seed=6)  # N bucket 2048: untuned
    fwd = kernels._attention_fwd_tma if kernels.use_tma(qkv, qkv[..., :heads * head_dim]) else kernels._attention_fwd
    cached = dict(fwd.cache)
    static_out = torch.empty(2, 1370, heads * head_dim, dtype=torch.bfloat16, device="cuda")
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        out, _ = kernels.attention_forward(qkv, heads, scale)
        static_out.copy_(out)
    assert fwd.cache == cached  # nothing tuned inside the capture
    first = kernels._FULL_CONFIGS[fwd.fn.__name__][head_dim][0]
    assert kernels._shape(fwd.best_config) == kernels._shape(first)
    graph.replay()
    torch.cuda.synchronize()
    eager, _ = kernels.attention_forward(qkv, heads, scale)  # outside capture: tunes (full) or first (quick)
    ref_out, _, _ = _reference_fwd_bwd(qkv, torch.zeros_like(eager), heads, scale, dtype=torch.float32)
    assert _max_err(static_out, ref_out) <= 2 * _max_err(eager, ref_out) + 1e-2
