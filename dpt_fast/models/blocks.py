"""DPT's decoder building blocks: Reassemble_s, the residual conv unit and the fusion block.

Child modules carry the original release's names and indices (`0.project.0`, `3`, `4`, `resConfUnit1`,
`conv1`, `bn1`, `out_conv`), so checkpoint keys match; each forward calls one dpt_fast operator.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops


class ProjectReadout(nn.Module):
    """Readout 'project': GELU(Linear(cat(token, class token))). Key: `project.0`."""

    def __init__(self, dim: int):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU())


class Reassemble(nn.Module):
    """Reassemble_s: tokens -> read -> [B, D, h, w] -> 1x1 conv to `features` -> resample.

    Children are registered as "0" (readout projection), "3" (1x1 conv) and "4" (resampling), the
    indices of the original's nn.Sequential (1 and 2 were a transpose and an unflatten).
    """

    def __init__(self, dim: int, features: int, readout: str, resample: str, start_index: int = 1):
        super().__init__()
        self.readout, self.resample, self.start_index = readout, resample, start_index
        if readout == "project":
            self.add_module("0", ProjectReadout(dim))
        self.add_module("3", nn.Conv2d(dim, features, kernel_size=1))
        if resample == "up4":
            self.add_module("4", nn.ConvTranspose2d(features, features, kernel_size=4, stride=4))
        elif resample == "up2":
            self.add_module("4", nn.ConvTranspose2d(features, features, kernel_size=2, stride=2))
        elif resample == "down2":
            self.add_module("4", nn.Conv2d(features, features, kernel_size=3, stride=2, padding=1))

    def forward(self, tokens: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        modules = self._modules
        readout = modules["0"].project[0] if "0" in modules else None
        resample = modules.get("4")
        return ops.reassemble(
            tokens,
            None if readout is None else readout.weight, None if readout is None else readout.bias,
            modules["3"].weight, modules["3"].bias,
            None if resample is None else resample.weight, None if resample is None else resample.bias,
            grid_h, grid_w, self.start_index, self.readout, self.resample)


def fold_batch_norm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of conv followed by bn in eval mode, as one convolution."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return conv.weight * scale.view(-1, 1, 1, 1), bias


class ResidualConvUnit(nn.Module):
    """relu -> conv3x3 -> [BN] -> relu -> conv3x3 -> [BN] -> + input (`ResidualConvUnit_custom`)."""

    def __init__(self, features: int, use_bn: bool = False):
        super().__init__()
        self.use_bn = use_bn
        self.conv1 = nn.Conv2d(features, features, 3, padding=1, bias=not use_bn)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1, bias=not use_bn)
        if use_bn:
            self.bn1 = nn.BatchNorm2d(features)
            self.bn2 = nn.BatchNorm2d(features)

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """Returns RCU(x), or extra + RCU(x) when `extra` is given (the fusion block's add)."""
        if self.use_bn and self.training:
            # Batch statistics in training: the operator takes folded weights, so use the modules.
            out = self.bn1(self.conv1(F.relu(x)))
            out = self.bn2(self.conv2(F.relu(out))) + x
            return out if extra is None else extra + out
        if self.use_bn:
            (w1, b1), (w2, b2) = fold_batch_norm(self.conv1, self.bn1), fold_batch_norm(self.conv2, self.bn2)
        else:
            w1, b1, w2, b2 = self.conv1.weight, self.conv1.bias, self.conv2.weight, self.conv2.bias
        return ops.residual_conv_unit(x, w1, b1, w2, b2, extra)


class FeatureFusionBlock(nn.Module):
    """out = x (+ RCU1(skip)) -> RCU2 -> bilinear x2 (align_corners=True) -> 1x1 conv."""

    def __init__(self, features: int, use_bn: bool = False):
        super().__init__()
        self.resConfUnit1 = ResidualConvUnit(features, use_bn)
        self.resConfUnit2 = ResidualConvUnit(features, use_bn)
        self.out_conv = nn.Conv2d(features, features, kernel_size=1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None, size=None) -> torch.Tensor:
        """`size` (height, width): upsample to exactly that instead of x2 (Depth Anything's fusion
        blocks go to the next map's size, which is not twice this one's after a stride-2 conv)."""
        out = x if skip is None else self.resConfUnit1(skip, extra=x)
        out = self.resConfUnit2(out)
        if size is None:
            out = F.interpolate(out, scale_factor=2, mode="bilinear", align_corners=True)
        else:
            out = F.interpolate(out, size=tuple(size), mode="bilinear", align_corners=True)
        return self.out_conv(out)
