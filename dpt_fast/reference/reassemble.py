"""Reference Reassemble_s stage (DPT paper, section 3): tokens -> image-like feature map.

    tokens [B, P + Np, D]  (P prefix tokens: the class token and, for some models, more)
      -> Read: ignore   drop the prefix tokens
               add      t_i + t_0
               project  GELU(Linear_{2D->D}(cat(t_i, t_0)))
      -> Concatenate: [B, D, grid_h, grid_w]
      -> 1x1 conv D -> F (with bias)
      -> Resample: up4   ConvTranspose2d(F, F, k=4, s=4)
                   up2   ConvTranspose2d(F, F, k=2, s=2)
                   none  identity
                   down2 Conv2d(F, F, k=3, s=2, p=1)
    -> [B, F, H', W'] in channels_last memory format (what the next 3x3 conv wants).

The parameters are the original release's modules' parameters, unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

READOUTS = ("ignore", "add", "project")
RESAMPLES = ("up4", "up2", "none", "down2")


def _read(tokens, start_index, readout, readout_weight, readout_bias):
    patches = tokens[:, start_index:]
    if readout == "ignore":
        return patches
    if readout == "add":
        return patches + tokens[:, :1]
    if readout == "project":
        cls = tokens[:, :1].expand_as(patches)
        return F.gelu(F.linear(torch.cat((patches, cls), dim=-1), readout_weight, readout_bias))
    raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")


def _resample(x, resample, weight, bias):
    if resample == "up4":
        return F.conv_transpose2d(x, weight, bias, stride=4)
    if resample == "up2":
        return F.conv_transpose2d(x, weight, bias, stride=2)
    if resample == "none":
        return x
    if resample == "down2":
        return F.conv2d(x, weight, bias, stride=2, padding=1)
    raise ValueError(f"resample must be one of {RESAMPLES}, got {resample!r}")


def reassemble(tokens: torch.Tensor, readout_weight: torch.Tensor | None, readout_bias: torch.Tensor | None,
               proj_weight: torch.Tensor, proj_bias: torch.Tensor,
               resample_weight: torch.Tensor | None, resample_bias: torch.Tensor | None,
               grid_h: int, grid_w: int, start_index: int, readout: str, resample: str) -> torch.Tensor:
    x = reassemble_plain(tokens, readout_weight, readout_bias, proj_weight, proj_bias, resample_weight,
                         resample_bias, grid_h, grid_w, start_index, readout, resample)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    return out.copy_(x)


def reassemble_plain(tokens: torch.Tensor, readout_weight: torch.Tensor | None, readout_bias: torch.Tensor | None,
                     proj_weight: torch.Tensor, proj_bias: torch.Tensor,
                     resample_weight: torch.Tensor | None, resample_bias: torch.Tensor | None,
                     grid_h: int, grid_w: int, start_index: int, readout: str, resample: str) -> torch.Tensor:
    """`reassemble`'s math without its promise of a channels_last result (the "inline" backend's form:
    the layout copy would only be an extra node for tracing tools)."""
    x = _read(tokens, start_index, readout, readout_weight, readout_bias)
    x = x.transpose(1, 2).unflatten(-1, (grid_h, grid_w))  # [B, D, grid_h, grid_w]
    x = F.conv2d(x, proj_weight, proj_bias)
    return _resample(x, resample, resample_weight, resample_bias)


def _conv_backward(grad, inputs, weight, stride, padding, transposed):
    """(d_inputs, d_weight, d_bias) of a convolution, via aten's convolution backward."""
    bias_size = [weight.shape[1] if transposed else weight.shape[0]]
    return torch.ops.aten.convolution_backward(
        grad, inputs, weight, bias_size, [stride, stride], [padding, padding], [1, 1], transposed,
        [0, 0], 1, [True, True, True])


def reassemble_backward(grad_out: torch.Tensor, tokens: torch.Tensor,
                        readout_weight: torch.Tensor | None, readout_bias: torch.Tensor | None,
                        proj_weight: torch.Tensor, proj_bias: torch.Tensor,
                        resample_weight: torch.Tensor | None, resample_bias: torch.Tensor | None,
                        grid_h: int, grid_w: int, start_index: int, readout: str, resample: str
                        ) -> list[torch.Tensor]:
    """Gradients for [tokens, readout_weight, readout_bias, proj_weight, proj_bias, resample_weight,
    resample_bias]; an absent parameter gets an empty tensor.

    Written out stage by stage (an operator body runs below the autograd layer): recompute the
    forward's intermediates, then walk back through resample, 1x1 conv, concatenate and read.
    """
    batch, _, dim = tokens.shape
    patches = tokens[:, start_index:]
    if readout == "project":
        cat = torch.cat((patches, tokens[:, :1].expand_as(patches)), dim=-1)
        pre_gelu = F.linear(cat, readout_weight, readout_bias)
        read = F.gelu(pre_gelu)
    else:
        read = _read(tokens, start_index, readout, None, None)
    grid = read.transpose(1, 2).reshape(batch, dim, grid_h, grid_w)
    projected = F.conv2d(grid, proj_weight, proj_bias)

    d_resample_weight, d_resample_bias = tokens.new_empty(0), tokens.new_empty(0)  # absent: empty, never aliased
    if resample in ("up4", "up2"):
        stride = 4 if resample == "up4" else 2
        d_projected, d_resample_weight, d_resample_bias = _conv_backward(
            grad_out, projected, resample_weight, stride, 0, True)
    elif resample == "down2":
        d_projected, d_resample_weight, d_resample_bias = _conv_backward(
            grad_out, projected, resample_weight, 2, 1, False)
    else:
        d_projected = grad_out
    d_grid, d_proj_weight, d_proj_bias = _conv_backward(d_projected, grid, proj_weight, 1, 0, False)
    d_read = d_grid.reshape(batch, dim, grid_h * grid_w).transpose(1, 2)

    d_tokens = torch.zeros_like(tokens)
    d_readout_weight, d_readout_bias = tokens.new_empty(0), tokens.new_empty(0)
    if readout == "ignore":
        d_tokens[:, start_index:] = d_read
    elif readout == "add":
        d_tokens[:, start_index:] = d_read
        d_tokens[:, 0] = d_read.sum(1)
    else:
        d_pre = torch.ops.aten.gelu_backward(d_read, pre_gelu)
        d_readout_weight = d_pre.flatten(0, 1).T @ cat.flatten(0, 1)
        d_readout_bias = d_pre.sum((0, 1))
        d_cat = d_pre @ readout_weight
        d_tokens[:, start_index:] = d_cat[..., :dim]
        d_tokens[:, 0] = d_cat[..., dim:].sum(1)
    return [d_tokens, d_readout_weight, d_readout_bias, d_proj_weight, d_proj_bias,
            d_resample_weight, d_resample_bias]
