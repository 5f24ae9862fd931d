"""Triton kernels for `dpt_fast::reassemble` (one Reassemble_s stage), forward and backward.

Everything is one GEMM kernel, `_reassemble_gemm`, specialised by constexpr flags into the stage's
pieces, each of which fuses the data movement around it (tokens [B, P+Np, D], M = B*Np patch rows,
F = features, s = resample scale):

forward
  1. project only: bias_img[b] = t_0 W2^T + b_r   ([B, D], fp32). cat(t_i, t_0) W^T = t_i W1^T + t_0 W2^T,
     so the readout token's half of the 2D-wide Linear is a per-image bias: half the readout FLOPs of
     the original, and the [M, 2D] concatenation never exists.
  2. project only: r = GELU(x W1^T + bias_img[b(m)]) -> [M, D]. x is read straight from the token
     tensor (strided, prefix rows skipped, no copy); bias gather and exact-erf GELU in the epilogue.
  3. y = read(x) Wp^T + b_p -> [M, F] (the 1x1 conv). For ignore/add the read is the A-operand
     prologue (x, or x + t_0 of the row's image), so these readouts read the tokens exactly once.
     For resample none, y is stored straight into the channels_last output ([B, gh, gw, F] in memory
     is [M, F] row-major): no transpose/unflatten copy, no layout copy.
  4. up4/up2: ConvTranspose2d with kernel = stride s is z = y Wt + b_t with Wt [F, s*s*F] in
     (kh, kw, o) column order, and the pixel-shuffle lives in the store: column (kh, kw, o) of row
     (b, h, w) goes to out[b, o, h*s+kh, w*s+kw] of the channels_last output, so each row writes s*s
     runs of F contiguous channels. Wt is a weight permute-copy (F*F*s*s elements, small).
     down2 (Conv2d 3x3 stride 2 pad 1) stays an aten conv2d (cuDNN on GPU) applied to y viewed as a
     channels_last [B, F, gh, gw] map; a Triton implicit-GEMM version was not written: cuDNN is a
     strong baseline for this small conv, and one would only be worth it once measured to beat it.

Why r and y are materialised instead of chaining the GEMMs in registers: chaining step 2 into step 3
needs, per row tile, the full [BLOCK_M, D] GELU output (D = 768..1024) as the K operand of the 1x1
conv; holding it is impractical, and recomputing readout chunks per F tile multiplies the largest
GEMM of the stage by F/BLOCK_N (4x at F=1024). Chaining 3 into 4 needs [BLOCK_M, F] held (F = 256..512)
and re-looped over s*s*F output columns; possible at F=256 but register-bound at F=512. Folding the
1x1 conv into the ConvT weights instead costs D*s*s*F MACs per token against D*F + s*s*F*F: 3.1x the
resample+projection FLOPs for DPT-Large stage 1 (D=1024, F=256, s=4), 1.3x for stage 2. The
intermediates are small next to the stage output (r: M*D, y: M*F, output: M*s*s*F elements) and
mostly stay in L2 (50 MB on H100), so the separate, well-pipelined GEMMs were chosen. Unmeasured:
whether a register-chained 3+4 for F=256 pays off.

backward (recompute, then walk back; gradients as dpt_fast.reference.reassemble_backward)
  - recompute r (step 2, also storing the pre-GELU activation) and y (step 3) with the kernels above;
  - up4/up2: dy = unshuffle(g) Wt^T with the pixel-shuffle as a gather in the A loads, and
    dWt = y^T unshuffle(g) with the gather in the B loads (K = M): no copy of grad_out. dWt has few
    output tiles (features x s*s*features: 64 tiles of 128x128 for DPT-Large stages 1-2) and K = every
    token of the batch, so it runs split-K (see _split_k): each of split_k programs per tile reduces a
    contiguous, BLOCK_K-aligned range of K into its own fp32 slice of a [split_k, M, N] buffer, summed
    over the split axis in fixed order afterwards (deterministic, no atomics). The count is a fixed
    heuristic (choose_split_k; unmeasured on a GPU); DPT_FAST_REASSEMBLE_SPLIT_K=<int> forces one (1: off);
    down2: aten convolution_backward (cuDNN);
  - project: d_pre = (dy Wp) * GELU'(pre) in one GEMM (GELU backward in the epilogue);
    d_x = d_pre W1 (or dy Wp for ignore/add) stored straight into d_tokens[:, P:] (strided store);
  - weight gradients with a token-sized reduction of plain operands (dWp, dW1) and the bias sums are
    torch (cuBLAS) calls, as is the [B, D] x [D, D] readout-token term.

Autotuned on GPU (key: M and K bucketed by token_bucket -- next power of two, at least 16 -- so a new batch or
image size reuses a tuning; N, split_k and the mode flags); one fixed config under TRITON_INTERPRET=1, where
multi-config autotune cannot run. DPT_FAST_AUTOTUNE=quick in the environment (read once, at import; default
full; see dpt_fast.kernels) gives the GEMM only the first config of _FULL_CONFIGS (which stays whole for the
tests that run each config): one compile per variant, no benchmarking; any other value than full or quick
raises at import. fp32 (interpreter only) uses input_precision="ieee".
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import env
from . import autotune_configs, autotune_mode, launch

_INTERPRET = env.TRITON_INTERPRET
_AUTOTUNE = autotune_mode()  # DPT_FAST_AUTOTUNE, once: "full" or "quick"
_SCALES = {"up4": 4, "up2": 2}


def supports(tokens: torch.Tensor, readout: str, resample: str) -> bool:
    """fp16/bf16 CUDA tensors on sm_80+; under TRITON_INTERPRET=1 also fp32/fp16 CPU tensors (bf16 dots are
    wrong in the interpreter)."""
    if tokens.dim() != 3:
        return False
    if tokens.is_cuda:  # (never interpreted: the interpreter's bf16 dots are wrong)
        return (not _INTERPRET and tokens.dtype in (torch.float16, torch.bfloat16)
                and torch.cuda.get_device_capability(tokens.device) >= (8, 0))
    return _INTERPRET and tokens.device.type == "cpu" and tokens.dtype in (torch.float32, torch.float16)


# --- the kernel ---------------------------------------------------------------------------------

def _configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4,
                              num_stages=1)]
    shapes = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 256, 64, 8, 3), (128, 64, 64, 4, 4),
              (64, 128, 64, 4, 4), (128, 128, 32, 4, 4), (64, 64, 64, 4, 4), (64, 64, 32, 4, 5)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w,
                          num_stages=s) for bm, bn, bk, w, s in shapes]


# every config of the GEMM (the first is the primary pick, the only one with DPT_FAST_AUTOTUNE=quick) and
# what the autotuner gets
_FULL_CONFIGS = _configs()
_CONFIGS = autotune_configs(_FULL_CONFIGS, _AUTOTUNE)


@triton.jit
def _reassemble_pix_offsets(tok, col, pix_np, pix_gw, pix_feat, S: tl.constexpr):
    """Element offsets in a channels_last [B, F, gh*S, gw*S] map of (token row, column (kh, kw, o)).
    tok and col broadcast against each other."""
    img = tok // pix_np
    rem = tok % pix_np
    q = col // pix_feat
    pixel = ((rem // pix_gw) * S + q // S) * (pix_gw * S) + (rem % pix_gw) * S + q % S
    # int64 from the first factor on: one image's map may exceed 2^31 elements
    return img.to(tl.int64) * pix_np * (S * S) * pix_feat + pixel.to(tl.int64) * pix_feat + col % pix_feat


@triton.jit
def _reassemble_gelu_grad(x):
    return 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)


def _tune_bench(kernel_call, quantiles):
    # short timings: a new (M, N, K) is tuned on first use, inside the caller's forward or backward
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


def token_bucket(rows: int) -> int:
    """The autotune key for a GEMM dimension that grows with the tokens of the batch (M of the forward and
    input-gradient GEMMs: batch x patches; K of the weight-gradient GEMM): the next power of two, at least
    16. So every batch size and image size whose token rows fall in (2^(k-1), 2^k] shares one tuning (384^2
    at batch 1: 576 rows -> 1024; batch 16: 9216 -> 16384; 518^2-sized 37x37 grids: 1369 -> 2048) instead of
    tuning 8 configs again in the middle of inference for each new size."""
    return max(16, triton.next_power_of_2(rows))


# key: M and K bucketed (M_BUCKET, K_BUCKET: arguments the kernel does not read; token-sized in M for the
# forward and input-gradient GEMMs, in K for the weight gradient), N exact, the split and the variant flags
@triton.autotune(configs=_CONFIGS, key=["M_BUCKET", "N", "K_BUCKET", "split_k", "A_CLS", "A_PIX", "B_PIX", "C_PIX",
                                          "BIAS", "ACT", "STORE_PRE"], do_bench=_tune_bench)
@triton.jit
def _reassemble_gemm(
    a_ptr, cls_ptr, b_ptr, bias_ptr, aux_ptr, c_ptr,
    M, N, K, M_BUCKET, K_BUCKET,                   # M_BUCKET, K_BUCKET: autotune key only (token_bucket)
    split_k, stride_c_split,                        # split-K: program_id(1) reduces the split's range of K
    rows_per_img,                                   # A/C rows (and bias_img rows) are grouped per image
    stride_a_img, stride_a_row, stride_ak,
    stride_bk, stride_bn,
    stride_bias_img, bias_period,
    stride_c_img, stride_c_row, stride_cn,
    stride_aux,
    pix_np, pix_gw, pix_feat,                       # pixel-shuffle geometry (A_PIX / B_PIX / C_PIX)
    A_CLS: tl.constexpr,      # A = A + row of cls_ptr of the row's image (readout "add")
    A_PIX: tl.constexpr,      # A[m, k] gathered from a channels_last map: token m, column k = (kh, kw, o)
    B_PIX: tl.constexpr,      # B[k, n] gathered likewise: token k, column n
    C_PIX: tl.constexpr,      # C[m, n] scattered likewise (ConvTranspose pixel-shuffle store)
    PIX_S: tl.constexpr,
    BIAS: tl.constexpr,       # 0: none, 1: bias[n % bias_period], 2: fp32 bias[img(m), n]
    ACT: tl.constexpr,        # 0: none, 1: GELU, 2: multiply by GELU'(aux[m, n])
    STORE_PRE: tl.constexpr,  # store the pre-activation to aux[m, n]
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    img_m = offs_m // rows_per_img
    if A_PIX:
        a_rows = offs_m[:, None]
    else:
        a_rows = img_m.to(tl.int64) * stride_a_img + (offs_m % rows_per_img).to(tl.int64) * stride_a_row
    cls_rows = img_m.to(tl.int64) * stride_a_img

    # this split's K range: whole BLOCK_K tiles, the last split possibly shorter (or empty: it stores zeros)
    k_span = tl.cdiv(tl.cdiv(K, BLOCK_K), split_k) * BLOCK_K
    k_lo = pid_k * k_span
    k_hi = tl.minimum(K, k_lo + k_span)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + offs_k
        mask_k = k < K
        a_mask = mask_m[:, None] & mask_k[None, :]
        if A_PIX:
            a = tl.load(a_ptr + _reassemble_pix_offsets(a_rows, k[None, :], pix_np, pix_gw, pix_feat, PIX_S),
                        mask=a_mask, other=0.0)
        else:
            # int64 product: K may be the token count (dWt = y^T g reads y^T with stride_ak = F)
            a = tl.load(a_ptr + a_rows[:, None] + k[None, :].to(tl.int64) * stride_ak, mask=a_mask, other=0.0)
        if A_CLS:
            a += tl.load(cls_ptr + cls_rows[:, None] + k[None, :].to(tl.int64) * stride_ak, mask=a_mask, other=0.0)
        b_mask = mask_k[:, None] & mask_n[None, :]
        if B_PIX:
            b = tl.load(b_ptr + _reassemble_pix_offsets(k[:, None], offs_n[None, :], pix_np, pix_gw, pix_feat,
                                                        PIX_S), mask=b_mask, other=0.0)
        else:
            b = tl.load(b_ptr + k[:, None] * stride_bk + offs_n[None, :] * stride_bn, mask=b_mask, other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)

    mask = mask_m[:, None] & mask_n[None, :]
    if BIAS == 1:
        acc += tl.load(bias_ptr + offs_n % bias_period, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    elif BIAS == 2:
        acc += tl.load(bias_ptr + img_m[:, None].to(tl.int64) * stride_bias_img + offs_n[None, :], mask=mask,
                       other=0.0).to(tl.float32)
    aux_offs = offs_m[:, None].to(tl.int64) * stride_aux + offs_n[None, :]
    if STORE_PRE:
        tl.store(aux_ptr + aux_offs, acc.to(aux_ptr.dtype.element_ty), mask=mask)
    if ACT == 1:
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    elif ACT == 2:
        acc *= _reassemble_gelu_grad(tl.load(aux_ptr + aux_offs, mask=mask, other=0.0).to(tl.float32))

    if C_PIX:
        c_offs = _reassemble_pix_offsets(offs_m[:, None], offs_n[None, :], pix_np, pix_gw, pix_feat, PIX_S)
    else:
        c_rows = img_m.to(tl.int64) * stride_c_img + (offs_m % rows_per_img).to(tl.int64) * stride_c_row
        c_offs = c_rows[:, None] + offs_n[None, :] * stride_cn
    c_offs += pid_k.to(tl.int64) * stride_c_split  # split-K: this split's slice of the fp32 partials (else 0)
    tl.store(c_ptr + c_offs, acc.to(c_ptr.dtype.element_ty), mask=mask)


# --- launcher -----------------------------------------------------------------------------------

def _rows(t: torch.Tensor, rows_per_img: int) -> tuple[int, int]:
    """(image stride, row stride) of a [M, N] matrix or a [B, rows, N] tensor."""
    if t.dim() == 3:
        return t.stride(0), t.stride(1)
    return rows_per_img * t.stride(0), t.stride(0)


SPLIT_K_ENV = "DPT_FAST_REASSEMBLE_SPLIT_K"
_SPLIT_WAVES = 2                      # aim for this many waves of programs over the SMs
_SPLIT_TILE = 128                     # ... counting output tiles as 128x128 (the autotuner may pick others)
_SPLIT_MIN_K = 512                    # K per split at least 8 x BLOCK_K (64): the pipeline stays long
_SPLIT_MAX_BYTES = 256 * 2**20        # fp32 partial buffer [split_k, M, N] at most 256 MiB
_INTERPRETER_SMS = 132                # SM count assumed off-GPU (interpreter, meta tensors): an H100


def choose_split_k(M: int, N: int, K: int, sms: int) -> int:
    """Split-K count for an M x N x K GEMM on `sms` SMs: enough splits of the ~cdiv(M,128)*cdiv(N,128)
    output tiles for about _SPLIT_WAVES waves of programs, but no split with under _SPLIT_MIN_K of K and
    no partial buffer over _SPLIT_MAX_BYTES. Fixed, not autotuned: the buffer's size depends on it.
    1 for small K or many tiles (then split-K only costs the extra reduction)."""
    tiles = triton.cdiv(M, _SPLIT_TILE) * triton.cdiv(N, _SPLIT_TILE)
    want = (_SPLIT_WAVES * sms) // tiles
    return max(1, min(want, K // _SPLIT_MIN_K, _SPLIT_MAX_BYTES // (4 * M * N)))


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:  # once per device: no runtime call per launch
    if _INTERPRET or device.type != "cuda":
        return _INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split_k(M: int, N: int, K: int, device: torch.device) -> int:
    """choose_split_k on the tensors' device, unless DPT_FAST_REASSEMBLE_SPLIT_K=<int> forces a count
    (1 or 0 disables split-K; dpt_fast.env.REASSEMBLE_SPLIT_K, looked up per call so that a benchmark can
    compare counts in one process)."""
    forced = env.reassemble_split_k()
    return forced if forced is not None else choose_split_k(M, N, K, _sm_count(device))


def _gemm(a, b, c, M, N, K, rows_per_img, *, b_strides=None, cls=None, bias=None, bias_period=None,
          bias_img=None, act=0, aux=None, store_pre=False, pix=None, a_pix=False, b_pix=False,
          c_pix=False, split_k=1):
    """c = act(a @ b + bias). a: [M, K] or [B, rows, K] (a view; its strides are used), b: [K, N] given
    as a tensor plus (stride_k, stride_n), c: [M, N] or [B, rows, N]. pix = (np, gw, feat, s) for the
    pixel-shuffle gathers/scatters, where the flagged operand is a channels_last map instead.
    split_k > 1 (plain c = a @ b into a row-major [M, N] c only): the kernel writes fp32 partial products
    of split_k contiguous K ranges, summed here in a fixed order."""
    out, stride_c_split = c, 0
    if split_k > 1:
        assert (cls is None and bias is None and bias_img is None and act == 0 and not store_pre and not c_pix
                and c.shape == (M, N) and c.stride() == (N, 1)), "split-K: plain a @ b into a row-major c only"
        partial = torch.empty(split_k, M, N, dtype=torch.float32, device=c.device)
        c, stride_c_split = partial[0], M * N  # the kernel adds pid_k * M * N
    a_img, a_row = (0, 0) if a_pix else _rows(a, rows_per_img)
    c_img, c_row = (0, 0) if c_pix else _rows(c, rows_per_img)
    stride_ak = 1 if a_pix else a.stride(-1)
    stride_cn = 1 if c_pix else c.stride(-1)
    stride_bk, stride_bn = (0, 0) if b_pix else b_strides
    pix_np, pix_gw, pix_feat, pix_s = pix if pix is not None else (1, 1, 1, 1)
    if bias is not None:
        bias = bias.contiguous()  # read as bias[n % bias_period]: unit stride
    bias_mode, bias_t = (1, bias) if bias is not None else ((2, bias_img) if bias_img is not None else (0, c))
    aux = c if aux is None else aux
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), split_k)  # noqa: E731
    launch(
        _reassemble_gemm, grid,
        a, a if cls is None else cls, b, bias_t, aux, c,
        M, N, K, token_bucket(M), token_bucket(K), split_k, stride_c_split, rows_per_img,
        a_img, a_row, stride_ak,
        stride_bk, stride_bn,
        bias_img.stride(0) if bias_img is not None else 0, bias_period or N,
        c_img, c_row, stride_cn,
        aux.stride(0),
        pix_np, pix_gw, pix_feat,
        A_CLS=cls is not None, A_PIX=a_pix, B_PIX=b_pix, C_PIX=c_pix, PIX_S=pix_s,
        BIAS=bias_mode, ACT=act, STORE_PRE=store_pre, IEEE=a.dtype == torch.float32,
    )
    if split_k > 1:  # sum of the splits in index order: deterministic (no atomics)
        return torch.sum(partial, 0, out=out) if out.dtype == torch.float32 else out.copy_(partial.sum(0))
    return out


def _t(w: torch.Tensor) -> tuple[int, int]:
    """(stride_k, stride_n) of w^T for a weight w [N, K, ...]: B[k, n] = w[n, k]."""
    return w.stride(1), w.stride(0)


def _convt_matrix(weight: torch.Tensor, s: int) -> torch.Tensor:
    """ConvTranspose2d weight [F_in, F_out, s, s] -> [F_in, s*s*F_out] in (kh, kw, o) column order."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], s * s * weight.shape[1])


def _read(tokens, readout_weight, readout_bias, start_index, pre=None):
    """Steps 1-2 (readout project): r = GELU(x W1^T + bias_img) as [M, D]; the pre-activation goes to
    `pre` when given (backward)."""
    batch, _, dim = tokens.shape
    patches = tokens[:, start_index:]
    m = batch * patches.shape[1]
    w_tok, w_cls = readout_weight[:, :dim], readout_weight[:, dim:]
    bias_img = torch.empty(batch, 1, dim, dtype=torch.float32, device=tokens.device)
    _gemm(tokens[:, :1], w_cls, bias_img, batch, dim, dim, 1, b_strides=_t(w_cls), bias=readout_bias)
    read = torch.empty(m, dim, dtype=tokens.dtype, device=tokens.device)
    _gemm(patches, w_tok, read, m, dim, dim, patches.shape[1], b_strides=_t(w_tok),
          bias_img=bias_img.view(batch, dim), act=1, aux=pre, store_pre=pre is not None)
    return read


def _project(tokens, read, proj_weight, proj_bias, start_index, readout, out=None):
    """Step 3: the 1x1 conv of the read tokens (`read`, or the tokens themselves for ignore/add, read in
    the A prologue) into `out` ([B, Np, F] view) or a new [M, F] matrix."""
    batch, _, dim = tokens.shape
    n_patch = tokens.shape[1] - start_index
    features = proj_weight.shape[0]
    if out is None:
        out = torch.empty(batch * n_patch, features, dtype=tokens.dtype, device=tokens.device)
    a = tokens[:, start_index:] if read is None else read
    cls = tokens[:, :1] if readout == "add" else None
    _gemm(a, proj_weight, out, batch * n_patch, features, dim, n_patch, b_strides=_t(proj_weight), cls=cls,
          bias=proj_bias)
    return out


def reassemble_forward(tokens, readout_weight, readout_bias, proj_weight, proj_bias, resample_weight,
                       resample_bias, grid_h, grid_w, start_index, readout, resample):
    batch, _, dim = tokens.shape
    features = proj_weight.shape[0]
    n_patch = grid_h * grid_w
    cl = torch.channels_last
    read = _read(tokens, readout_weight, readout_bias, start_index) if readout == "project" else None
    if resample == "none":
        out = torch.empty(batch, features, grid_h, grid_w, dtype=tokens.dtype, device=tokens.device,
                          memory_format=cl)
        _project(tokens, read, proj_weight, proj_bias, start_index, readout,
                 out=out.permute(0, 2, 3, 1).view(batch, n_patch, features))
        return out
    y = _project(tokens, read, proj_weight, proj_bias, start_index, readout)
    if resample == "down2":
        y_map = y.view(batch, grid_h, grid_w, features).permute(0, 3, 1, 2)
        conv = torch.nn.functional.conv2d(y_map, resample_weight, resample_bias, stride=2, padding=1)
        out = torch.empty(conv.shape, dtype=conv.dtype, device=conv.device, memory_format=cl)
        return conv if conv.stride() == out.stride() else out.copy_(conv)  # the reference's exact strides
    s = _SCALES[resample]
    out_features = resample_weight.shape[1]
    out = torch.empty(batch, out_features, grid_h * s, grid_w * s, dtype=tokens.dtype, device=tokens.device,
                      memory_format=cl)
    wt = _convt_matrix(resample_weight, s)
    _gemm(y, wt, out, batch * n_patch, s * s * out_features, features, n_patch, b_strides=wt.stride(),
          bias=resample_bias, bias_period=out_features, pix=(n_patch, grid_w, out_features, s), c_pix=True)
    return out


def reassemble_backward(grad_out, tokens, readout_weight, readout_bias, proj_weight, proj_bias, resample_weight,
                        resample_bias, grid_h, grid_w, start_index, readout, resample):
    batch, _, dim = tokens.shape
    features = proj_weight.shape[0]
    n_patch = grid_h * grid_w
    m = batch * n_patch
    new = tokens.new_empty

    # recompute the forward's intermediates
    pre = new(m, dim) if readout == "project" else None
    read = _read(tokens, readout_weight, readout_bias, start_index, pre=pre) if readout == "project" else None
    y = _project(tokens, read, proj_weight, proj_bias, start_index, readout) if resample != "none" else None

    # resample
    d_resample_weight, d_resample_bias = new(0), new(0)  # absent: a fresh empty tensor each, never aliased
    if resample in _SCALES:
        s = _SCALES[resample]
        out_features = resample_weight.shape[1]
        n = s * s * out_features
        g = grad_out.contiguous(memory_format=torch.channels_last)
        pix = (n_patch, grid_w, out_features, s)
        wt = _convt_matrix(resample_weight, s)
        dy = new(m, features)
        _gemm(g, wt, dy, m, features, n, n_patch, b_strides=(wt.stride(1), wt.stride(0)), pix=pix, a_pix=True)
        dwt = new(features, n)  # few output tiles, K = every token: split-K
        _gemm(y.t(), g, dwt, features, n, m, features, pix=pix, b_pix=True,
              split_k=_split_k(features, n, m, tokens.device))
        d_resample_weight = dwt.view(features, s, s, out_features).permute(0, 3, 1, 2).contiguous()
        d_resample_bias = g.sum((0, 2, 3))
    elif resample == "down2":
        y_map = y.view(batch, grid_h, grid_w, features).permute(0, 3, 1, 2)
        d_map, d_resample_weight, d_resample_bias = torch.ops.aten.convolution_backward(
            grad_out, y_map, resample_weight, [resample_weight.shape[0]], [2, 2], [1, 1], [1, 1], False,
            [0, 0], 1, [True, True, True])
        dy = d_map.permute(0, 2, 3, 1).reshape(m, features)
    else:
        dy = grad_out.permute(0, 2, 3, 1).reshape(m, features)

    # 1x1 conv
    patches = tokens[:, start_index:]
    if read is None:
        read = (patches + tokens[:, :1] if readout == "add" else patches).reshape(m, dim)
    d_proj_weight = (dy.t() @ read).view(proj_weight.shape)
    d_proj_bias = dy.sum(0)

    # read
    d_tokens = torch.empty_like(tokens)
    d_tokens[:, :start_index].zero_()  # extra prefix tokens get no gradient
    d_patches = d_tokens[:, start_index:]
    wp = proj_weight.view(features, dim)
    d_readout_weight, d_readout_bias = new(0), new(0)
    if readout == "project":
        d_pre = new(m, dim)
        _gemm(dy, wp, d_pre, m, dim, features, n_patch, b_strides=wp.stride(), act=2, aux=pre)
        w_tok, w_cls = readout_weight[:, :dim], readout_weight[:, dim:]
        _gemm(d_pre, w_tok, d_patches, m, dim, dim, n_patch, b_strides=w_tok.stride())
        d_pre_img = d_pre.view(batch, n_patch, dim).sum(1, dtype=torch.float32)  # [B, D]: the t_0 half
        d_readout_weight = torch.cat((d_pre.t() @ patches.reshape(m, dim),
                                      (d_pre_img.t() @ tokens[:, 0].float()).to(tokens.dtype)), dim=1)
        d_readout_bias = d_pre.sum(0)
        d_tokens[:, 0] = (d_pre_img @ w_cls.float()).to(tokens.dtype)
    else:
        _gemm(dy, wp, d_patches, m, dim, features, n_patch, b_strides=wp.stride())
        if readout == "add":
            d_tokens[:, 0] = d_patches.sum(1)
    return [d_tokens, d_readout_weight, d_readout_bias, d_proj_weight, d_proj_bias,
            d_resample_weight, d_resample_bias]
