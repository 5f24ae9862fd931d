"""Triton fused multi-head self-attention (FlashAttention-2 style), forward and backward.

Kernels (named after the operator, so a profile tells which ran):

    _attention_fwd              online softmax over key blocks; writes out [B, N, H*D] and lse [B, H, N]
    _attention_fwd_tma          the same with its tiles moved by TMA (Hopper), see "TMA" below
    _attention_bwd_preprocess   delta = rowsum(dO * O)                        [B, H, N] float32
    _attention_bwd_dkdv         one program per key block: dK, dV             -> packed dqkv
    _attention_bwd_dq           one program per query block: dQ               -> packed dqkv
    _attention_bwd_dkdv_tma, _attention_bwd_dq_tma   their TMA twins

Layout. q, k and v are read straight from the packed qkv projection output [B, N, 3*H*D] (it views as
[B, N, 3, H, D]) through its batch and token strides: no split, permute or contiguous copies. A slice
of a larger tensor is read in place; only a last-dimension stride other than 1 costs one .contiguous().
The output is written with heads merged, [B, N, H*D], ready for the output projection, and dq/dk/dv are
written straight into a contiguous packed gradient [B, N, 3*H*D]. Any N >= 1: the last query/key block
is handled by masking (full blocks run unmasked), never by padded copies. The backward is
deterministic (no atomics): dK/dV and dQ are computed by separate kernels.

Numerics. Scores are scaled by scale*log2(e) and exponentiated with exp2; the running max, sum and the
accumulator are float32; P and dS are cast to the input dtype before their matmuls (as FlashAttention
does). The log-sum-exp is stored in natural-log units, float32, so it equals the reference's lse.

Supported (see `supports`): head dim 64 or 128, float16 or bfloat16 CUDA tensors (sm_80+). Every other
case (float32 or float64 on CUDA, other head dims) is served by the reference operator: on the GPU the
fused path does not take float32 (a tf32 kernel would change the numbers silently).
Under TRITON_INTERPRET=1 the kernels run on CPU tensors through the interpreter for float32 and float16
(with exact IEEE float32 dots); bfloat16 is excluded there because the interpreter's bf16 tl.dot is wrong.

Tuning. On a GPU each kernel is autotuned over block sizes, warps and stages from a list per head dim
(_FWD_SHAPES, _DKDV_SHAPES, _DQ_SHAPES: every config compiles for sm_90a without register spills and within
200 KiB of shared memory), keyed on autotune_key: N and batch x heads bucketed to powers of two (so that
many image sizes share a few tunings), head dim and dtype. Under the interpreter one fixed small config is
used (the interpreter cannot autotune over several configs and ignores warps/stages). DPT_FAST_AUTOTUNE=quick
(dpt_fast.env) gives every kernel only the first config of each head dim's list: one compile per kernel
variant, no benchmarking. Launches go through dpt_fast.kernels.launch, which never autotunes inside
CUDA-graph capture (an untuned key runs its first config there).

TMA. On sm_90+ CUDA devices the launchers run the *_tma kernels (autotuned over the same configs as their
pointer twins), which read q/k/v/dO and write out/dQ/dK/dV tiles through host-side tensor descriptors
(triton.tools.tensor_descriptor.TensorDescriptor, triton >= 3.4): the tensor memory accelerator copies
whole tiles (cp.async.bulk.tensor) instead of every thread computing addresses. The descriptors are 3-D,
[B, N, C] with blocks [1, rows, HEAD_DIM] at column h*D (q), H*D + h*D (k), 2*H*D + h*D (v), so the
hardware zero-fills rows past N of an image on load and drops them on store: never the next image's rows
(a descriptor over the flattened [B*N, C] rows would overwrite them). Zero-filled keys score 0, not
-inf: the last key block still masks columns >= N explicitly (forward: score -inf; dQ: probability 0,
which also keeps inf * 0 out when exp(-lse) overflows). lse, delta and the lse store stay pointer
accesses; the delta preprocess kernel is shared. A block shape depends on the config, so an
autotune pre-hook sets it (_TMA_BLOCK_ROWS). TMA needs a 16-byte aligned base and 16-byte multiples for
every stride but the last (which must be 1): a tensor that is not (an odd slice of a larger one), or
that is not laid out as plain nested rows (expanded or interleaved views; see _tma_aligned), takes the
pointer kernels, as do pre-Hopper GPUs and triton versions without TensorDescriptor.
DPT_FAST_ATTENTION_TMA=0 (dpt_fast.env) forces the pointer kernels, to compare or to
isolate a problem; `kernel_launches()` tells which kernels the launchers ran. Under the interpreter the
TMA kernels run only when asked for (attention_forward/attention_backward(..., tma=True); the tests).
The backward takes TMA when qkv, grad_out and dqkv all allow it, independently of the forward.

Warp specialization: not used. Triton (3.6 to 3.9) warp-specializes these loops only for Blackwell; compiled
for sm_90 the flag either fails or changes nothing. Re-check when the Triton in use supports it on Hopper.
"""
from __future__ import annotations

import threading

import torch
import triton
import triton.language as tl

try:  # host-side TMA descriptors: triton >= 3.4 (sm_90a builds checked with triton 3.6 to 3.9)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton: pointer kernels only
    TensorDescriptor = None

from .. import env
from . import autotune_configs, autotune_mode, launch, on_device

_INTERPRET = env.TRITON_INTERPRET

HEAD_DIMS = (64, 128)
_LOG2E = 1.4426950408889634
_MAX_GRID_Y = 65535  # CUDA limit on grid dimension 1 (batch * heads lives there)
_INT32_MAX = 2**31 - 1
_AUTOTUNE = autotune_mode()  # DPT_FAST_AUTOTUNE, once: "full" or "quick"


# --- configs ------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per head dim, chosen around the Hopper sweet spots of the Triton
# fused-attention tutorial and kept only where every one compiles for sm_90a without a register spill and
# within _SMEM_BUDGET bytes of shared memory, for the pointer and the TMA kernel alike (the sm_90 compile test
# in tests/test_attention_kernel.py checks both with ptxas; run with triton 3.6.0 and 3.8.0 when these lists
# were chosen: dK/dV (64, 64, 8, 3) at D = 128 spills 16 bytes with 3.6's ptxas only, and is left out). A 128-row fp32 accumulator of D = 128 needs
# 8 warps; 4-warp configs with 128-row tiles spill there. The first of each list is the primary pick: the
# only one with DPT_FAST_AUTOTUNE=quick.
_SMEM_BUDGET = 200 * 1024  # of sm_90's 227 KiB per block: margin for the compiler's own buffers
_FWD_SHAPES = {
    64: [(128, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 4), (128, 128, 8, 3), (128, 128, 8, 2),
         (128, 32, 4, 4), (64, 64, 4, 3), (64, 128, 4, 3), (64, 32, 4, 4)],
    128: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3), (64, 64, 4, 4),
          (64, 32, 4, 4)],
}
# dK/dV: BLOCK_N keys per program, BLOCK_M queries per step.
_DKDV_SHAPES = {
    64: [(32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3), (16, 128, 4, 4), (32, 64, 8, 3)],
    128: [(32, 128, 8, 3), (32, 128, 8, 2), (16, 128, 8, 3), (32, 64, 4, 3), (16, 64, 4, 3)],
}
# dQ: BLOCK_M queries per program, BLOCK_N keys per step.
_DQ_SHAPES = {
    64: [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4), (128, 128, 8, 2), (128, 32, 8, 3)],
    128: [(128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4), (64, 64, 8, 3), (128, 32, 8, 2)],
}


def _configs(shapes_by_head_dim):
    """{head dim: [triton.Config]} from {head dim: [(BLOCK_M, BLOCK_N, warps, stages)]}; a shape listed under
    both head dims is one Config object. Under the interpreter: one fixed small config for every head dim (it
    cannot autotune over several configs and ignores warps/stages)."""
    if _INTERPRET:
        only = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1)
        return {d: [only] for d in shapes_by_head_dim}
    made = {}
    return {d: [made.setdefault(shape, triton.Config({"BLOCK_M": shape[0], "BLOCK_N": shape[1]},
                                                     num_warps=shape[2], num_stages=shape[3]))
                for shape in shapes] for d, shapes in shapes_by_head_dim.items()}


def _union(lists) -> list:
    """The configs of several lists, each once, in order of first appearance."""
    seen, out = set(), []
    for configs in lists:
        for c in configs:
            if id(c) not in seen:
                seen.add(id(c))
                out.append(c)
    return out


def _tuned_configs(by_head_dim: dict) -> list:
    """What an autotuner gets: every config of every head dim (DPT_FAST_AUTOTUNE=full) or the first of each
    (quick); `_configs_of_head_dim` narrows it to the launch's head dim."""
    return _union(autotune_configs(c, _AUTOTUNE) for c in by_head_dim.values())


_FULL_FWD_CONFIGS, _FULL_DKDV_CONFIGS, _FULL_DQ_CONFIGS = (_configs(s) for s in (_FWD_SHAPES, _DKDV_SHAPES,
                                                                                  _DQ_SHAPES))
_PREPROCESS_BLOCK = 64


def _shape(c) -> tuple:
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages


def _head_dim_pruner(by_head_dim: dict):
    """Autotune early_config_prune: of the configs the autotuner holds, those listed for the launch's
    HEAD_DIM, in that list's order (matched by shape); all of them if none is (a test pinning one)."""
    def prune(configs, named_args, **kwargs):
        head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
        held = {_shape(c): c for c in configs}
        return [held[_shape(c)] for c in by_head_dim.get(head_dim, ()) if _shape(c) in held] or list(configs)
    return {"early_config_prune": prune}


# Rows of the TMA block of every descriptor argument of the TMA kernels (the block is [1, rows, HEAD_DIM]
# over a [B, N, C] tensor); the autotune pre-hook and the sm_90 compile test both read this table.
_TMA_BLOCK_ROWS = {"desc_q": "BLOCK_M", "desc_o": "BLOCK_M", "desc_do": "BLOCK_M", "desc_dq": "BLOCK_M",
                   "desc_kv": "BLOCK_N", "desc_dkv": "BLOCK_N"}


def _set_tma_block_shapes(nargs):
    """Autotune pre-hook: the descriptors' block shapes follow the config being run."""
    head_dim = nargs["HEAD_DIM"]
    for name, rows in _TMA_BLOCK_ROWS.items():
        desc = nargs.get(name)
        if desc is not None:
            desc.block_shape = [1, nargs[rows], head_dim]


def _with_tma_hook(by_head_dim: dict) -> dict:
    """The same {head dim: configs} with the block-shape pre-hook on every config (one copy per shape)."""
    made = {}
    return {d: [made.setdefault(_shape(c), triton.Config(dict(c.kwargs), num_warps=c.num_warps,
                                                         num_stages=c.num_stages, pre_hook=_set_tma_block_shapes))
                for c in configs] for d, configs in by_head_dim.items()}


# Every autotuned kernel (by name) with its whole config lists per head dim, whatever DPT_FAST_AUTOTUNE says:
# the tests compile and run each config (the TMA twins' lists carry the block-shape pre-hook, as their
# autotuners' do).
_FULL_CONFIGS = {
    "_attention_fwd": _FULL_FWD_CONFIGS, "_attention_fwd_tma": _with_tma_hook(_FULL_FWD_CONFIGS),
    "_attention_bwd_dkdv": _FULL_DKDV_CONFIGS, "_attention_bwd_dkdv_tma": _with_tma_hook(_FULL_DKDV_CONFIGS),
    "_attention_bwd_dq": _FULL_DQ_CONFIGS, "_attention_bwd_dq_tma": _with_tma_hook(_FULL_DQ_CONFIGS),
}
# The autotune key: N and batch x heads bucketed (next powers of two; see _bucket and _bh_bucket), the head
# dim, and the input dtype as DTYPE_ID (the TMA kernels take descriptors, which carry no dtype, so the
# autotuner would otherwise reuse an fp16 tuning for bf16). N_BUCKET, BH_BUCKET and DTYPE_ID are arguments
# the kernels do not read.
_KEY = ["N_BUCKET", "BH_BUCKET", "HEAD_DIM", "DTYPE_ID"]


def _autotune(name: str):
    """@triton.autotune for kernel `name`: its configs for DPT_FAST_AUTOTUNE, narrowed per launch to those of
    the launch's head dim."""
    by_head_dim = _FULL_CONFIGS[name]
    return triton.autotune(configs=_tuned_configs(by_head_dim), key=_KEY,
                           prune_configs_by=_head_dim_pruner(by_head_dim))


# --- forward ------------------------------------------------------------------------------------

@triton.jit
def _attention_fwd_step(acc, l_i, m_i, q, k, v, key_valid, qk_scale, MASK: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    """One key block of the online softmax (shared by the pointer and the TMA kernels). With MASK, key
    columns where key_valid is False get score -inf: their K rows were read as zeros (score 0, not -inf)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # log2 units
    if MASK:
        s = tl.where(key_valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _attention_fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, start, stop, stride_n, N_CTX, qk_scale,
                         BLOCK_N: tl.constexpr, MASK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(start, stop, BLOCK_N):
        valid = (start_n + offs_n) < N_CTX
        if MASK:
            k = tl.load(k_ptrs + start_n * stride_n, mask=valid[:, None], other=0.0)
            v = tl.load(v_ptrs + start_n * stride_n, mask=valid[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs + start_n * stride_n)
            v = tl.load(v_ptrs + start_n * stride_n)
        acc, l_i, m_i = _attention_fwd_step(acc, l_i, m_i, q, k, v, valid, qk_scale, MASK, DOT_PRECISION)
    return acc, l_i, m_i


@_autotune("_attention_fwd")
@triton.jit
def _attention_fwd(QKV, Out, LSE, stride_qkv_b, stride_qkv_n, stride_out_b, stride_out_n, N_CTX, N_BUCKET,
                   BH_BUCKET, DTYPE_ID, num_heads, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1)
    off_b = pid_bh // num_heads
    off_h = pid_bh % num_heads
    width = num_heads * HEAD_DIM

    q_base = QKV + off_b.to(tl.int64) * stride_qkv_b + off_h * HEAD_DIM
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_valid = offs_m < N_CTX

    q = tl.load(q_base + offs_m[:, None] * stride_qkv_n + offs_d[None, :], mask=row_valid[:, None], other=0.0)
    k_ptrs = q_base + width + offs_n[:, None] * stride_qkv_n + offs_d[None, :]
    v_ptrs = q_base + 2 * width + offs_n[:, None] * stride_qkv_n + offs_d[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    full_stop = (N_CTX // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _attention_fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, 0, full_stop, stride_qkv_n, N_CTX,
                                         qk_scale, BLOCK_N, False, DOT_PRECISION)
    if full_stop < N_CTX:
        acc, l_i, m_i = _attention_fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, full_stop, N_CTX, stride_qkv_n,
                                             N_CTX, qk_scale, BLOCK_N, True, DOT_PRECISION)

    acc = acc / l_i[:, None]
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # natural-log units
    tl.store(LSE + pid_bh.to(tl.int64) * N_CTX + offs_m, lse, mask=row_valid)
    out_base = Out + off_b.to(tl.int64) * stride_out_b + off_h * HEAD_DIM
    tl.store(out_base + offs_m[:, None] * stride_out_n + offs_d[None, :], acc.to(Out.dtype.element_ty),
             mask=row_valid[:, None])


@triton.jit
def _attention_fwd_tma_inner(acc, l_i, m_i, q, desc_kv, off_b, k_col, v_col, start, stop, N_CTX, qk_scale,
                             HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
                             DOT_PRECISION: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(start, stop, BLOCK_N):
        # rows past N of this image come back as zeros (the descriptor's N bound), never the next image's
        k = desc_kv.load([off_b, start_n, k_col]).reshape(BLOCK_N, HEAD_DIM)
        v = desc_kv.load([off_b, start_n, v_col]).reshape(BLOCK_N, HEAD_DIM)
        valid = (start_n + offs_n) < N_CTX
        acc, l_i, m_i = _attention_fwd_step(acc, l_i, m_i, q, k, v, valid, qk_scale, MASK, DOT_PRECISION)
    return acc, l_i, m_i


@_autotune("_attention_fwd_tma")
@triton.jit
def _attention_fwd_tma(desc_q, desc_kv, desc_o, LSE, N_CTX, N_BUCKET, BH_BUCKET, DTYPE_ID, num_heads, qk_scale,
                       HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    """_attention_fwd with every q/k/v/out tile moved by the tensor memory accelerator (Hopper): 3-D
    descriptors [B, N, C] with blocks [1, rows, HEAD_DIM], so the hardware zero-fills rows past N on load
    and drops them on store."""
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1)
    off_b = pid_bh // num_heads
    off_h = pid_bh % num_heads
    q_col = off_h * HEAD_DIM
    width = num_heads * HEAD_DIM

    q = desc_q.load([off_b, start_m, q_col]).reshape(BLOCK_M, HEAD_DIM)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    full_stop = (N_CTX // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _attention_fwd_tma_inner(acc, l_i, m_i, q, desc_kv, off_b, width + q_col, 2 * width + q_col,
                                             0, full_stop, N_CTX, qk_scale, HEAD_DIM, BLOCK_N, False, DOT_PRECISION)
    if full_stop < N_CTX:
        acc, l_i, m_i = _attention_fwd_tma_inner(acc, l_i, m_i, q, desc_kv, off_b, width + q_col,
                                                 2 * width + q_col, full_stop, N_CTX, N_CTX, qk_scale, HEAD_DIM,
                                                 BLOCK_N, True, DOT_PRECISION)

    acc = acc / l_i[:, None]
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # natural-log units
    offs_m = start_m + tl.arange(0, BLOCK_M)
    tl.store(LSE + pid_bh.to(tl.int64) * N_CTX + offs_m, lse, mask=offs_m < N_CTX)
    desc_o.store([off_b, start_m, q_col], acc.to(desc_o.dtype).reshape(1, BLOCK_M, HEAD_DIM))


# --- backward -----------------------------------------------------------------------------------

@triton.jit
def _attention_bwd_preprocess(Out, DO, Delta, stride_out_b, stride_out_n, stride_do_b, stride_do_n, N_CTX,
                              num_heads, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    pid_bh = tl.program_id(1)
    off_b = pid_bh // num_heads
    off_h = pid_bh % num_heads
    offs_d = tl.arange(0, HEAD_DIM)
    valid = offs_m < N_CTX
    o = tl.load(Out + off_b.to(tl.int64) * stride_out_b + off_h * HEAD_DIM + offs_m[:, None] * stride_out_n
                + offs_d[None, :], mask=valid[:, None], other=0.0)
    do = tl.load(DO + off_b.to(tl.int64) * stride_do_b + off_h * HEAD_DIM + offs_m[:, None] * stride_do_n
                 + offs_d[None, :], mask=valid[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(Delta + pid_bh.to(tl.int64) * N_CTX + offs_m, delta, mask=valid)


@triton.jit
def _attention_bwd_dkdv_step(dk, dv, k, v, q, do, lse, delta, qk_scale, DOT_PRECISION: tl.constexpr):
    """One query block of dK/dV (shared by the pointer and the TMA kernels)."""
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
    p_t = tl.math.exp2(s_t * qk_scale - (lse * 1.4426950408889634)[None, :])
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attention_bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, start, stop, stride_qkv_n,
                              stride_do_n, N_CTX, qk_scale, BLOCK_M: tl.constexpr, MASK: tl.constexpr,
                              DOT_PRECISION: tl.constexpr):
    offs_m = tl.arange(0, BLOCK_M)
    for start_m in range(start, stop, BLOCK_M):
        if MASK:
            valid = (start_m + offs_m) < N_CTX
            q = tl.load(q_ptrs + start_m * stride_qkv_n, mask=valid[:, None], other=0.0)
            do = tl.load(do_ptrs + start_m * stride_do_n, mask=valid[:, None], other=0.0)
            # lse = +inf on padded query rows makes their probabilities exactly 0
            lse = tl.load(lse_ptrs + start_m, mask=valid, other=float("inf"))
            delta = tl.load(delta_ptrs + start_m, mask=valid, other=0.0)
        else:
            q = tl.load(q_ptrs + start_m * stride_qkv_n)
            do = tl.load(do_ptrs + start_m * stride_do_n)
            lse = tl.load(lse_ptrs + start_m)
            delta = tl.load(delta_ptrs + start_m)
        dk, dv = _attention_bwd_dkdv_step(dk, dv, k, v, q, do, lse, delta, qk_scale, DOT_PRECISION)
    return dk, dv


@_autotune("_attention_bwd_dkdv")
@triton.jit
def _attention_bwd_dkdv(QKV, DO, LSE, Delta, DQKV, stride_qkv_b, stride_qkv_n, stride_do_b, stride_do_n,
                        stride_dqkv_b, stride_dqkv_n, N_CTX, N_BUCKET, BH_BUCKET, DTYPE_ID, num_heads, scale,
                        qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    pid_bh = tl.program_id(1)
    off_b = pid_bh // num_heads
    off_h = pid_bh % num_heads
    width = num_heads * HEAD_DIM

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    key_valid = offs_n < N_CTX

    q_base = QKV + off_b.to(tl.int64) * stride_qkv_b + off_h * HEAD_DIM
    kv_offs = offs_n[:, None] * stride_qkv_n + offs_d[None, :]
    k = tl.load(q_base + width + kv_offs, mask=key_valid[:, None], other=0.0)
    v = tl.load(q_base + 2 * width + kv_offs, mask=key_valid[:, None], other=0.0)

    q_ptrs = q_base + offs_m[:, None] * stride_qkv_n + offs_d[None, :]
    do_ptrs = DO + off_b.to(tl.int64) * stride_do_b + off_h * HEAD_DIM + offs_m[:, None] * stride_do_n \
        + offs_d[None, :]
    lse_ptrs = LSE + pid_bh.to(tl.int64) * N_CTX + offs_m
    delta_ptrs = Delta + pid_bh.to(tl.int64) * N_CTX + offs_m

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    full_stop = (N_CTX // BLOCK_M) * BLOCK_M
    dk, dv = _attention_bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, 0, full_stop,
                                       stride_qkv_n, stride_do_n, N_CTX, qk_scale, BLOCK_M, False, DOT_PRECISION)
    if full_stop < N_CTX:
        dk, dv = _attention_bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, full_stop, N_CTX,
                                           stride_qkv_n, stride_do_n, N_CTX, qk_scale, BLOCK_M, True,
                                           DOT_PRECISION)
    dk = dk * scale

    d_base = DQKV + off_b.to(tl.int64) * stride_dqkv_b + off_h * HEAD_DIM + offs_n[:, None] * stride_dqkv_n \
        + offs_d[None, :]
    tl.store(d_base + width, dk.to(DQKV.dtype.element_ty), mask=key_valid[:, None])
    tl.store(d_base + 2 * width, dv.to(DQKV.dtype.element_ty), mask=key_valid[:, None])


@triton.jit
def _attention_bwd_dq_step(dq, q, do, lse2, delta, k, v, key_valid, qk_scale, MASK: tl.constexpr,
                           DOT_PRECISION: tl.constexpr):
    """One key block of dQ (shared by the pointer and the TMA kernels). With MASK, key columns where
    key_valid is False get probability 0 (their K/V rows were read as zeros)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    p = tl.math.exp2(s * qk_scale - lse2[:, None])
    if MASK:
        p = tl.where(key_valid[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)


@triton.jit
def _attention_bwd_dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, start, stop, stride_qkv_n, N_CTX, qk_scale,
                            BLOCK_N: tl.constexpr, MASK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(start, stop, BLOCK_N):
        valid = (start_n + offs_n) < N_CTX
        if MASK:
            k = tl.load(k_ptrs + start_n * stride_qkv_n, mask=valid[:, None], other=0.0)
            v = tl.load(v_ptrs + start_n * stride_qkv_n, mask=valid[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs + start_n * stride_qkv_n)
            v = tl.load(v_ptrs + start_n * stride_qkv_n)
        dq = _attention_bwd_dq_step(dq, q, do, lse2, delta, k, v, valid, qk_scale, MASK, DOT_PRECISION)
    return dq


@_autotune("_attention_bwd_dq")
@triton.jit
def _attention_bwd_dq(QKV, DO, LSE, Delta, DQKV, stride_qkv_b, stride_qkv_n, stride_do_b, stride_do_n,
                      stride_dqkv_b, stride_dqkv_n, N_CTX, N_BUCKET, BH_BUCKET, DTYPE_ID, num_heads, scale,
                      qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      DOT_PRECISION: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1)
    off_b = pid_bh // num_heads
    off_h = pid_bh % num_heads
    width = num_heads * HEAD_DIM

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_valid = offs_m < N_CTX

    q_base = QKV + off_b.to(tl.int64) * stride_qkv_b + off_h * HEAD_DIM
    q = tl.load(q_base + offs_m[:, None] * stride_qkv_n + offs_d[None, :], mask=row_valid[:, None], other=0.0)
    do = tl.load(DO + off_b.to(tl.int64) * stride_do_b + off_h * HEAD_DIM + offs_m[:, None] * stride_do_n
                 + offs_d[None, :], mask=row_valid[:, None], other=0.0)
    lse2 = tl.load(LSE + pid_bh.to(tl.int64) * N_CTX + offs_m, mask=row_valid, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + pid_bh.to(tl.int64) * N_CTX + offs_m, mask=row_valid, other=0.0)

    k_ptrs = q_base + width + offs_n[:, None] * stride_qkv_n + offs_d[None, :]
    v_ptrs = q_base + 2 * width + offs_n[:, None] * stride_qkv_n + offs_d[None, :]
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    full_stop = (N_CTX // BLOCK_N) * BLOCK_N
    dq = _attention_bwd_dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, 0, full_stop, stride_qkv_n, N_CTX,
                                 qk_scale, BLOCK_N, False, DOT_PRECISION)
    if full_stop < N_CTX:
        dq = _attention_bwd_dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, full_stop, N_CTX, stride_qkv_n,
                                     N_CTX, qk_scale, BLOCK_N, True, DOT_PRECISION)
    dq = dq * scale
    tl.store(DQKV + off_b.to(tl.int64) * stride_dqkv_b + off_h * HEAD_DIM + offs_m[:, None] * stride_dqkv_n
             + offs_d[None, :], dq.to(DQKV.dtype.element_ty), mask=row_valid[:, None])


# TMA twins of the two backward kernels: q/k/v/dO tiles loaded and dQ/dK/dV tiles stored through 3-D
# descriptors ([B, N, C], blocks [1, rows, HEAD_DIM]); lse and delta stay pointer loads.

@triton.jit
def _attention_bwd_dkdv_tma_inner(dk, dv, k, v, desc_q, desc_do, off_b, q_col, lse_ptrs, delta_ptrs, start, stop,
                                  N_CTX, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                                  MASK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs_m = tl.arange(0, BLOCK_M)
    for start_m in range(start, stop, BLOCK_M):
        # query rows past N come back as zeros; with lse = +inf there their probabilities are exactly 0
        q = desc_q.load([off_b, start_m, q_col]).reshape(BLOCK_M, HEAD_DIM)
        do = desc_do.load([off_b, start_m, q_col]).reshape(BLOCK_M, HEAD_DIM)
        if MASK:
            valid = (start_m + offs_m) < N_CTX
            lse = tl.load(lse_ptrs + start_m, mask=valid, other=float("inf"))
            delta = tl.load(delta_ptrs + start_m, mask=valid, other=0.0)
        else:
            lse = tl.load(lse_ptrs + start_m)
            delta = tl.load(delta_ptrs + start_m)
        dk, dv = _attention_bwd_dkdv_step(dk, dv, k, v, q, do, lse, delta, qk_scale, DOT_PRECISION)
    return dk, dv


@_autotune("_attention_bwd_dkdv_tma")
@triton.jit
def _attention_bwd_dkdv_tma(desc_q, desc_kv, desc_do, desc_dkv, LSE, Delta, N_CTX, N_BUCKET, BH_BUCKET, DTYPE_ID,
                            num_heads, scale, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            DOT_PRECISION: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    pid_bh = tl.program_id(1)
    off_b = pid_bh // num_heads
    off_h = pid_bh % num_heads
    q_col = off_h * HEAD_DIM
    width = num_heads * HEAD_DIM

    k = desc_kv.load([off_b, start_n, width + q_col]).reshape(BLOCK_N, HEAD_DIM)
    v = desc_kv.load([off_b, start_n, 2 * width + q_col]).reshape(BLOCK_N, HEAD_DIM)
    offs_m = tl.arange(0, BLOCK_M)
    lse_ptrs = LSE + pid_bh.to(tl.int64) * N_CTX + offs_m
    delta_ptrs = Delta + pid_bh.to(tl.int64) * N_CTX + offs_m

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    full_stop = (N_CTX // BLOCK_M) * BLOCK_M
    dk, dv = _attention_bwd_dkdv_tma_inner(dk, dv, k, v, desc_q, desc_do, off_b, q_col, lse_ptrs, delta_ptrs, 0,
                                           full_stop, N_CTX, qk_scale, HEAD_DIM, BLOCK_M, False, DOT_PRECISION)
    if full_stop < N_CTX:
        dk, dv = _attention_bwd_dkdv_tma_inner(dk, dv, k, v, desc_q, desc_do, off_b, q_col, lse_ptrs, delta_ptrs,
                                               full_stop, N_CTX, N_CTX, qk_scale, HEAD_DIM, BLOCK_M, True,
                                               DOT_PRECISION)
    dk = dk * scale
    # key rows past N (zero-filled keys: their values are discarded) are dropped by the descriptor's N bound
    desc_dkv.store([off_b, start_n, width + q_col], dk.to(desc_dkv.dtype).reshape(1, BLOCK_N, HEAD_DIM))
    desc_dkv.store([off_b, start_n, 2 * width + q_col], dv.to(desc_dkv.dtype).reshape(1, BLOCK_N, HEAD_DIM))


@triton.jit
def _attention_bwd_dq_tma_inner(dq, q, do, lse2, delta, desc_kv, off_b, k_col, v_col, start, stop, N_CTX, qk_scale,
                                HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
                                DOT_PRECISION: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(start, stop, BLOCK_N):
        k = desc_kv.load([off_b, start_n, k_col]).reshape(BLOCK_N, HEAD_DIM)
        v = desc_kv.load([off_b, start_n, v_col]).reshape(BLOCK_N, HEAD_DIM)
        valid = (start_n + offs_n) < N_CTX
        dq = _attention_bwd_dq_step(dq, q, do, lse2, delta, k, v, valid, qk_scale, MASK, DOT_PRECISION)
    return dq


@_autotune("_attention_bwd_dq_tma")
@triton.jit
def _attention_bwd_dq_tma(desc_q, desc_kv, desc_do, desc_dq, LSE, Delta, N_CTX, N_BUCKET, BH_BUCKET, DTYPE_ID,
                          num_heads, scale, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          DOT_PRECISION: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1)
    off_b = pid_bh // num_heads
    off_h = pid_bh % num_heads
    q_col = off_h * HEAD_DIM
    width = num_heads * HEAD_DIM

    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_valid = offs_m < N_CTX
    q = desc_q.load([off_b, start_m, q_col]).reshape(BLOCK_M, HEAD_DIM)
    do = desc_do.load([off_b, start_m, q_col]).reshape(BLOCK_M, HEAD_DIM)
    lse2 = tl.load(LSE + pid_bh.to(tl.int64) * N_CTX + offs_m, mask=row_valid, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + pid_bh.to(tl.int64) * N_CTX + offs_m, mask=row_valid, other=0.0)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    full_stop = (N_CTX // BLOCK_N) * BLOCK_N
    dq = _attention_bwd_dq_tma_inner(dq, q, do, lse2, delta, desc_kv, off_b, width + q_col, 2 * width + q_col, 0,
                                     full_stop, N_CTX, qk_scale, HEAD_DIM, BLOCK_N, False, DOT_PRECISION)
    if full_stop < N_CTX:
        dq = _attention_bwd_dq_tma_inner(dq, q, do, lse2, delta, desc_kv, off_b, width + q_col, 2 * width + q_col,
                                         full_stop, N_CTX, N_CTX, qk_scale, HEAD_DIM, BLOCK_N, True, DOT_PRECISION)
    dq = dq * scale
    desc_dq.store([off_b, start_m, q_col], dq.to(desc_dq.dtype).reshape(1, BLOCK_M, HEAD_DIM))


# --- launchers ----------------------------------------------------------------------------------

def _head_dim(qkv: torch.Tensor, num_heads: int) -> int | None:
    if qkv.dim() != 3 or num_heads < 1 or qkv.shape[-1] % (3 * num_heads) != 0:
        return None
    return qkv.shape[-1] // (3 * num_heads)


def supports(qkv: torch.Tensor, num_heads: int) -> bool:
    """Whether the Triton kernels serve this input (otherwise the reference operator does)."""
    head_dim = _head_dim(qkv, num_heads)
    if head_dim not in HEAD_DIMS or qkv.shape[0] < 1 or qkv.shape[1] < 1:
        return False
    if _INTERPRET:
        if qkv.device.type != "cpu" or qkv.dtype not in (torch.float32, torch.float16):
            return False
    else:
        if not qkv.is_cuda or qkv.dtype not in (torch.float16, torch.bfloat16):
            return False
        if torch.cuda.get_device_capability(qkv.device) < (8, 0):
            return False
    # in-batch offsets are int32 (the batch offset is int64): one image's rows must fit
    row_stride = qkv.stride(1) if qkv.stride(-1) == 1 else qkv.shape[-1]
    return qkv.shape[1] * max(row_stride, qkv.shape[-1]) <= _INT32_MAX


def _bucket(tokens: int) -> int:
    """The autotuning key for N: the next power of two, so that images of many sizes share a few tunings
    (N_BUCKET is an argument the kernels do not read)."""
    return triton.next_power_of_2(tokens)


_BH_BUCKET_MAX = 512  # from 512 (batch x heads) programs per query block up, every config fills an H100 alike
_DTYPE_IDS = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}


def _bh_bucket(batch_heads: int) -> int:
    """The autotuning key for batch x heads (the grid's second dimension): the next power of two, at most
    _BH_BUCKET_MAX, so that a tuning found at batch 1 is not reused at batch 16."""
    return min(triton.next_power_of_2(batch_heads), _BH_BUCKET_MAX)


def autotune_key(tokens: int, batch_heads: int, head_dim: int, dtype: torch.dtype) -> tuple:
    """(N_BUCKET, BH_BUCKET, HEAD_DIM, DTYPE_ID): the values of the kernels' autotune key for one launch.
    Two launches with the same key share one tuning."""
    return _bucket(tokens), _bh_bucket(batch_heads), head_dim, _DTYPE_IDS[dtype]


def _dot_precision(dtype: torch.dtype) -> str:
    # exact float32 dots under the interpreter; on the GPU only 16-bit inputs arrive (the default applies)
    return "ieee" if _INTERPRET else "tf32"


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _batch_chunks(batch: int, num_heads: int):
    step = max(1, _MAX_GRID_Y // num_heads)
    for lo in range(0, batch, step):
        yield lo, min(lo + step, batch)


def _descriptor_strides(t: torch.Tensor) -> list[int]:
    """t's strides for a descriptor, a size-1 dimension's (never used to address) made canonical."""
    batch, tokens, width = t.shape
    stride_b, stride_n, stride_c = t.stride()
    stride_n = width if tokens == 1 else stride_n
    stride_b = tokens * stride_n if batch == 1 else stride_b
    return [stride_b, stride_n, stride_c]


def _tma_aligned(t: torch.Tensor) -> bool:
    """Whether a [B, N, C] descriptor can address t: TMA needs a 16-byte aligned base, unit last stride and
    16-byte multiples for the other strides (head column offsets h*D*itemsize are 16-byte multiples for
    every supported D). Beyond that only the plain nested layout is taken (rows of C elements, images of N
    rows, neither overlapping: contiguous tensors and slices of wider or taller ones); other layouts
    (expanded, interleaved batch-major views) were never run through TMA on a GPU: pointer kernels."""
    if t.dim() != 3 or t.stride(-1) != 1 or t.data_ptr() % 16 != 0:
        return False
    stride_b, stride_n, _ = _descriptor_strides(t)
    size = t.element_size()
    return (stride_n >= t.shape[2] and stride_b >= t.shape[1] * stride_n
            and (stride_n * size) % 16 == 0 and (stride_b * size) % 16 == 0)


def use_tma(*tensors: torch.Tensor, tma: bool | None = None) -> bool:
    """Whether the launchers run the TMA kernels for these operands (the [B, N, C] tensors the kernel
    reads and writes through descriptors). tma=None: on sm_90+ CUDA devices unless DPT_FAST_ATTENTION_TMA=0
    (dpt_fast.env.ATTENTION_TMA, looked up per call); True: wherever the descriptors are possible (also under the
    interpreter); False: never. Tensors the descriptors cannot take (see _tma_aligned: e.g. an odd slice
    with a misaligned base or row stride) always take the pointer kernels."""
    if tma is None:
        first = tensors[0]
        tma = (not _INTERPRET and first.is_cuda and env.attention_tma()
               and torch.cuda.get_device_capability(first.device) >= (9, 0))
    return bool(tma) and TensorDescriptor is not None and all(_tma_aligned(t) for t in tensors)


def _descriptors(head_dim: int, *tensors: torch.Tensor):
    """One [B, N, C] descriptor per tensor (a new object each: the autotune pre-hook sets its block shape
    [1, rows, head_dim] for the config about to run)."""
    return tuple(TensorDescriptor(t, list(t.shape), _descriptor_strides(t), [1, 16, head_dim]) for t in tensors)


_launches: dict[str, int] = {}
_launches_lock = threading.Lock()


def _count(kernel) -> None:
    name = getattr(kernel, "fn", kernel).__name__
    with _launches_lock:
        _launches[name] = _launches.get(name, 0) + 1


def kernel_launches(reset: bool = False) -> dict[str, int]:
    """How many launcher calls ran each forward/dK-dV/dQ kernel (by kernel name) since the last reset: tells
    a test or a benchmark whether the TMA or the pointer kernels ran."""
    with _launches_lock:
        counts = dict(_launches)
        if reset:
            _launches.clear()
    return counts



def attention_forward(qkv: torch.Tensor, num_heads: int, scale: float, *, tma: bool | None = None):
    """out [B, N, H*D] in qkv.dtype, lse [B, H, N] float32 (natural log).

    tma: None chooses (see `use_tma`); True asks for the TMA kernel (the tests' hook: it also runs under
    the interpreter), still only where the tensors meet TMA's alignment; False: the pointer kernel."""
    head_dim = _head_dim(qkv, num_heads)
    assert head_dim in HEAD_DIMS, f"head dim {head_dim} not supported by the Triton attention"
    qkv = _last_dim_contiguous(qkv)
    batch, tokens, width = qkv.shape
    out = torch.empty((batch, tokens, width // 3), dtype=qkv.dtype, device=qkv.device)
    lse = torch.empty((batch, num_heads, tokens), dtype=torch.float32, device=qkv.device)
    _forward_into(qkv, out, lse, num_heads, scale, tma)
    return out, lse


def _forward_into(qkv, out, lse, num_heads, scale, tma):
    """The forward launches: qkv [B, N, 3*H*D] and out [B, N, H*D] (unit last strides), lse [B, H, N]
    contiguous float32."""
    batch, tokens, width = qkv.shape
    head_dim = width // (3 * num_heads)
    qk_scale = float(scale) * _LOG2E
    precision = _dot_precision(qkv.dtype)
    kernel = _attention_fwd_tma if use_tma(qkv, out, tma=tma) else _attention_fwd
    _count(kernel)
    with on_device(qkv):
        for lo, hi in _batch_chunks(batch, num_heads):
            q_c, o_c, l_c = qkv[lo:hi], out[lo:hi], lse[lo:hi]
            grid = lambda meta, n=(hi - lo) * num_heads: (triton.cdiv(tokens, meta["BLOCK_M"]), n)  # noqa: E731
            key = autotune_key(tokens, (hi - lo) * num_heads, head_dim, qkv.dtype)
            if kernel is _attention_fwd_tma:
                launch(_attention_fwd_tma, grid, *_descriptors(head_dim, q_c, q_c, o_c), l_c, tokens, key[0], key[1],
                       key[3], num_heads, qk_scale, HEAD_DIM=head_dim, DOT_PRECISION=precision)
            else:
                launch(_attention_fwd, grid, q_c, o_c, l_c, q_c.stride(0), q_c.stride(1), o_c.stride(0), o_c.stride(1),
                       tokens, key[0], key[1], key[3], num_heads, qk_scale, HEAD_DIM=head_dim,
                       DOT_PRECISION=precision)


def attention_backward(grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                       num_heads: int, scale: float, *, tma: bool | None = None) -> torch.Tensor:
    """dqkv [B, N, 3*H*D], contiguous, in qkv.dtype. tma: as for attention_forward (qkv, grad_out and dqkv
    must suit TMA for the *_tma kernels to run)."""
    head_dim = _head_dim(qkv, num_heads)
    assert head_dim in HEAD_DIMS, f"head dim {head_dim} not supported by the Triton attention"
    qkv = _last_dim_contiguous(qkv)
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    _backward_into(_last_dim_contiguous(grad_out.to(qkv.dtype)), qkv, _last_dim_contiguous(out.to(qkv.dtype)),
                   lse.to(torch.float32).contiguous(), dqkv, num_heads, scale, tma)
    return dqkv


def _backward_into(grad_out, qkv, out, lse, dqkv, num_heads, scale, tma):
    """The backward launches: grad_out/out [B, N, H*D], qkv and dqkv [B, N, 3*H*D] (unit last strides, in
    qkv.dtype), lse [B, H, N] contiguous float32."""
    batch, tokens, width = qkv.shape
    head_dim = width // (3 * num_heads)
    delta = torch.empty((batch, num_heads, tokens), dtype=torch.float32, device=qkv.device)
    qk_scale = float(scale) * _LOG2E
    precision = _dot_precision(qkv.dtype)
    tma = use_tma(qkv, grad_out, dqkv, tma=tma)
    dkdv_kernel, dq_kernel = (_attention_bwd_dkdv_tma, _attention_bwd_dq_tma) if tma else \
        (_attention_bwd_dkdv, _attention_bwd_dq)
    _count(dkdv_kernel)
    _count(dq_kernel)
    with on_device(qkv):
        for lo, hi in _batch_chunks(batch, num_heads):
            q_c, do_c, o_c, l_c, d_c, dq_c = qkv[lo:hi], grad_out[lo:hi], out[lo:hi], lse[lo:hi], delta[lo:hi], \
                dqkv[lo:hi]
            n_bh = (hi - lo) * num_heads
            _attention_bwd_preprocess[(triton.cdiv(tokens, _PREPROCESS_BLOCK), n_bh)](
                o_c, do_c, d_c, o_c.stride(0), o_c.stride(1), do_c.stride(0), do_c.stride(1), tokens, num_heads,
                HEAD_DIM=head_dim, BLOCK_M=_PREPROCESS_BLOCK)
            dkdv_grid = lambda meta, n=n_bh: (triton.cdiv(tokens, meta["BLOCK_N"]), n)  # noqa: E731
            dq_grid = lambda meta, n=n_bh: (triton.cdiv(tokens, meta["BLOCK_M"]), n)  # noqa: E731
            key = autotune_key(tokens, n_bh, head_dim, qkv.dtype)
            tail = (tokens, key[0], key[1], key[3], num_heads, float(scale), qk_scale)
            if tma:  # fresh descriptors per kernel (desc_q, desc_kv, desc_do, dqkv): its pre-hook sets their blocks
                launch(_attention_bwd_dkdv_tma, dkdv_grid, *_descriptors(head_dim, q_c, q_c, do_c, dq_c), l_c, d_c,
                       *tail, HEAD_DIM=head_dim, DOT_PRECISION=precision)
                launch(_attention_bwd_dq_tma, dq_grid, *_descriptors(head_dim, q_c, q_c, do_c, dq_c), l_c, d_c, *tail,
                       HEAD_DIM=head_dim, DOT_PRECISION=precision)
            else:
                args = (q_c, do_c, l_c, d_c, dq_c, q_c.stride(0), q_c.stride(1), do_c.stride(0), do_c.stride(1),
                        dq_c.stride(0), dq_c.stride(1), *tail)
                launch(_attention_bwd_dkdv, dkdv_grid, *args, HEAD_DIM=head_dim, DOT_PRECISION=precision)
                launch(_attention_bwd_dq, dq_grid, *args, HEAD_DIM=head_dim, DOT_PRECISION=precision)


__all__ = ["supports", "attention_forward", "attention_backward", "use_tma", "kernel_launches", "autotune_key",
           "HEAD_DIMS"]
