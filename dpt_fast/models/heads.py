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


# Initial bias of the depth head's last convolution. The original DPT and Depth Anything keep PyTorch's
# default initialisation there (bias uniform in +-1/sqrt(32) = +-0.18) and always start from a
# pretrained encoder. With a fresh encoder the signal reaching that convolution is about 1e-2
# (|w.x| < 0.05 measured on tiny to base ViTs at init), so the bias's sign decides: for about half
# the seeds every pixel of the final ReLU's input is negative, the output is 0 everywhere and no
# gradient ever flows. A positive bias above that signal starts every pixel in the ReLU's linear
# part; the scale-and-shift-invariant losses do not see a constant offset, and 0.1 stays small
# enough for bfloat16 to resolve the initial variations (its spacing there is 2^-11).
DEPTH_HEAD_INITIAL_BIAS = 0.1


def depth_head(features: int, non_negative: bool = True) -> nn.Sequential:
    """The depth head (keys `scratch.output_conv.{0,2,4}`); a fresh head outputs about
    DEPTH_HEAD_INITIAL_BIAS everywhere, so that training starts with gradients at every pixel.
    Loading weights replaces this initialisation."""
    head = nn.Sequential(
        nn.Conv2d(features, features // 2, kernel_size=3, padding=1),
        Interpolate(2),
        nn.Conv2d(features // 2, 32, kernel_size=3, padding=1),
        nn.ReLU(True),
        nn.Conv2d(32, 1, kernel_size=1),
        nn.ReLU(True) if non_negative else nn.Identity(),
        nn.Identity(),
    )
    nn.init.constant_(head[4].bias, DEPTH_HEAD_INITIAL_BIAS)
    return head


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
