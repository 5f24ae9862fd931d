"""Prediction heads: the depth head (`scratch.output_conv`) and the segmentation head (+ `auxlayer`)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class Interpolate(nn.Module):
    """Bilinear x2 upsampling with align_corners=True, as a module so it can sit in a Sequential."""

    def __init__(self, scale_factor: float = 2.0):
        super().__init__()
        self.scale_factor = scale_factor

    def forward(self, x):
        return F.interpolate(x, scale_factor=self.scale_factor, mode="bilinear", align_corners=True)


def depth_head(features: int, non_negative: bool = True) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(features, features // 2, kernel_size=3, padding=1),
        Interpolate(2),
        nn.Conv2d(features // 2, 32, kernel_size=3, padding=1),
        nn.ReLU(True),
        nn.Conv2d(32, 1, kernel_size=1),
        nn.ReLU(True) if non_negative else nn.Identity(),
        nn.Identity(),
    )


def segmentation_head(features: int, num_classes: int, upsample: bool = True) -> nn.Sequential:
    layers = [
        nn.Conv2d(features, features, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(features),
        nn.ReLU(True),
        nn.Dropout(0.1, False),
        nn.Conv2d(features, num_classes, kernel_size=1),
    ]
    if upsample:
        layers.append(Interpolate(2))
    return nn.Sequential(*layers)
