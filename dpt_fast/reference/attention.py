"""Reference multi-head self-attention on the packed qkv projection output.

qkv is [B, N, 3*H*D] exactly as timm's (and the original DPT's) qkv Linear writes it, i.e. it views
as [B, N, 3, H, D]. The result is [B, N, H*D], heads merged, ready for the output projection.

Math is done in float32 for float32/16-bit inputs (float64 stays float64), one block of queries at a time so that memory stays
O(block * N) instead of O(N^2) (a 4K frame has 32401 tokens).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Queries per block: bounds the [B, H, block, N] score tensor.
_SCORE_ELEMENTS = 1 << 26


def _split_heads(qkv: torch.Tensor, num_heads: int):
    batch, tokens, width = qkv.shape
    head_dim = width // (3 * num_heads)
    q, k, v = qkv.view(batch, tokens, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    acc = accumulation_dtype(qkv.dtype)
    return q.to(acc), k.to(acc), v.to(acc)  # each [B, H, N, D]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the math and of the log-sum-exp: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _query_blocks(qkv: torch.Tensor, num_heads: int):
    batch, tokens, _ = qkv.shape
    step = max(1, _SCORE_ELEMENTS // max(1, batch * num_heads * tokens))
    return [(i, min(i + step, tokens)) for i in range(0, tokens, step)]


def attention(qkv: torch.Tensor, num_heads: int, scale: float):
    """softmax(q k^T * scale) v per head. Returns (out [B, N, H*D] in qkv.dtype, lse [B, H, N] in the accumulation dtype)."""
    batch, tokens, width = qkv.shape
    q, k, v = _split_heads(qkv, num_heads)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:-1], dtype=q.dtype, device=qkv.device)
    for lo, hi in _query_blocks(qkv, num_heads):
        scores = q[:, :, lo:hi] @ k.transpose(-1, -2) * scale
        lse[:, :, lo:hi] = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - lse[:, :, lo:hi, None])
        out[:, :, lo:hi] = probs @ v
    out = out.transpose(1, 2).reshape(batch, tokens, width // 3).to(qkv.dtype)
    return out, lse


def attention_plain(qkv: torch.Tensor, num_heads: int, scale: float, form: str = "matmul") -> torch.Tensor:
    """`attention`'s output as straight-line PyTorch, for tracing tools (the "inline" backend).

    No query blocks (their count would be a Python int taken from the token count), no log-sum-exp.
    form "matmul": softmax(q k^T * scale) v in the accumulation dtype, the reference's math;
    "sdpa": F.scaled_dot_product_attention in qkv's dtype (what torch.compile fuses best).
    """
    batch, tokens, width = qkv.shape
    head_dim = width // (3 * num_heads)
    q, k, v = qkv.unflatten(-1, (3, num_heads, head_dim)).permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, N, D]
    if form == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    else:
        acc = accumulation_dtype(qkv.dtype)
        q, k, v = q.to(acc), k.to(acc), v.to(acc)
        out = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1) @ v
    return out.transpose(1, 2).flatten(2).to(qkv.dtype)


def attention_backward(grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                       num_heads: int, scale: float) -> torch.Tensor:
    """Gradient of `attention` with respect to the packed qkv, as the FlashAttention backward defines it:
    P = exp(S - lse), dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = dS K scale, dK = dS^T Q scale.
    """
    batch, tokens, width = qkv.shape
    head_dim = width // (3 * num_heads)
    q, k, v = _split_heads(qkv, num_heads)
    d_o = grad_out.to(q.dtype).view(batch, tokens, num_heads, head_dim).transpose(1, 2)
    o = out.to(q.dtype).view(batch, tokens, num_heads, head_dim).transpose(1, 2)
    delta = (d_o * o).sum(-1)  # [B, H, N]
    dq = torch.zeros_like(q)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    for lo, hi in _query_blocks(qkv, num_heads):
        probs = torch.exp(q[:, :, lo:hi] @ k.transpose(-1, -2) * scale - lse[:, :, lo:hi, None])
        dv += probs.transpose(-1, -2) @ d_o[:, :, lo:hi]
        d_scores = probs * (d_o[:, :, lo:hi] @ v.transpose(-1, -2) - delta[:, :, lo:hi, None])
        dq[:, :, lo:hi] = d_scores @ k * scale
        dk += d_scores.transpose(-1, -2) @ q[:, :, lo:hi] * scale
    dqkv = torch.stack((dq, dk, dv), dim=0).permute(1, 3, 0, 2, 4)  # [B, N, 3, H, D]
    return dqkv.reshape(batch, tokens, width).to(qkv.dtype)
