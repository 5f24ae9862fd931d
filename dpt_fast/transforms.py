"""Preprocessing as the original release does it, as batched tensor code (CPU or GPU), and its inverse.

Original: keep the aspect ratio, scale as little as possible so that both sides reach the target
("minimal"), round each side to a multiple of 32, bicubic, then normalise with mean = std = 0.5.
Targets: 384 for depth, 480 for segmentation. The numbers are those of dpt_fast.specs' entries.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .specs import DEPTH_ANYTHING_PREPROCESSING, DPT_PREPROCESSING, DPT_SEGMENTATION_SIZE

DEPTH_SIZE = DPT_PREPROCESSING.size
SEGMENTATION_SIZE = DPT_SEGMENTATION_SIZE
MEAN, STD = DPT_PREPROCESSING.mean, DPT_PREPROCESSING.std  # per channel (R, G, B)


def nearest_multiple(x: float, multiple: int) -> int:
    """The multiple of `multiple` nearest to `x` (ties to even, as numpy's round), never 0: the side a
    model runs an input of side `x` at."""
    y = round(x / multiple) * multiple
    return y if y > 0 else math.ceil(x / multiple) * multiple


def target_size(height: int, width: int, size: int = DEPTH_SIZE, multiple: int = DPT_PREPROCESSING.multiple,
                keep_aspect_ratio: bool = True) -> tuple[int, int]:
    """The (height, width) the original's Resize(size, size, keep_aspect_ratio, multiple, "minimal") gives."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    scale_h, scale_w = size / height, size / width
    if keep_aspect_ratio:  # "minimal": the scale closest to 1 serves both sides
        if abs(1 - scale_w) < abs(1 - scale_h):
            scale_h = scale_w
        else:
            scale_w = scale_h
    return nearest_multiple(scale_h * height, multiple), nearest_multiple(scale_w * width, multiple)


def to_float_image(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] or float [0, 1] images, [3, H, W] or [B, 3, H, W] -> float32 [B, 3, H, W] in [0, 1]."""
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W] or [3, H, W], got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if not images.is_floating_point():
        raise ValueError(f"expected uint8 or floating-point images, got {images.dtype}")
    return images.float()


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """(x - mean) / std per channel of [B, 3, H, W] images."""
    mean = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def preprocess(images: torch.Tensor, size: int | tuple[int, int] | None = DEPTH_SIZE,
               multiple: int = DPT_PREPROCESSING.multiple,
               keep_aspect_ratio: bool = True) -> torch.Tensor:
    """Images -> the normalised network input. `size` None keeps the native resolution (rounded to the
    multiple); a (height, width) pair resizes to exactly that."""
    return _resize_and_normalize(images, size, multiple, DPT_PREPROCESSING,
                                 lambda h, w: target_size(h, w, size, multiple, keep_aspect_ratio))


def _resize_and_normalize(images, size, multiple: int, preprocessing, fit) -> torch.Tensor:
    """The steps every preprocessing shares: to float, resize (`size` None: the native size rounded to
    the multiple; an int: `fit(height, width)`; a pair: exactly it), normalise with the entry's mean/std."""
    x = to_float_image(images)
    height, width = x.shape[-2:]
    if size is None:
        out_size = (nearest_multiple(height, multiple), nearest_multiple(width, multiple))
    elif isinstance(size, int):
        out_size = fit(height, width)
    else:
        out_size = tuple(size)
    if out_size != (height, width):
        x = F.interpolate(x, size=out_size, mode=preprocessing.interpolation, align_corners=False)
    return normalize(x, preprocessing.mean, preprocessing.std)


def resize_prediction(prediction: torch.Tensor, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """Back to the input's (height, width): [B, H, W] depth or [B, C, H, W] logits, bicubic with
    align_corners=False as the original's depth and segmentation scripts both resize."""
    squeeze = prediction.dim() == 3
    x = prediction.unsqueeze(1) if squeeze else prediction
    x = F.interpolate(x.float(), size=tuple(size), mode=mode, align_corners=False)
    return x.squeeze(1) if squeeze else x


# The original numbers its output labels from 1 (ADE20K's ids, where 0 is "unlabelled"): class c -> c + 1.
LABEL_OFFSET = 1


def segmentation_labels(logits: torch.Tensor, size: tuple[int, int] | None = None,
                        offset: int = LABEL_OFFSET) -> torch.Tensor:
    """Logits [B, C, H', W'] -> int64 labels [B, H, W] as the original's segmentation script: the
    logits (not probabilities) resized bicubically to `size` (None: kept), argmax over classes, plus
    `offset` (1: ADE20K's ids, as the original; 0: the model's class indices)."""
    if size is not None and tuple(size) != tuple(logits.shape[-2:]):
        logits = resize_prediction(logits, size)
    return logits.argmax(1) + offset


def normalize_depth(depth: torch.Tensor, bits: int = 16) -> torch.Tensor:
    """Per-image min-max scaling to the integer range of `bits` (the original's write_depth)."""
    flat = depth.flatten(1).float()
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    span = high - low
    max_val = 2 ** bits - 1
    scaled = torch.where(span > torch.finfo(torch.float32).eps, max_val * (flat - low) / span.clamp_min(1e-30),
                         torch.zeros_like(flat))
    return scaled.floor().view_as(depth)  # the original truncates (astype("uint16"))


# ------------------------------------------------------------------------------ Depth Anything

DEPTH_ANYTHING_SIZE = DEPTH_ANYTHING_PREPROCESSING.size


def _lower_bound_multiple(x: float, minimum: int, multiple: int) -> int:
    """Nearest multiple of `multiple` (ties to even), rounded up instead when that falls below `minimum`."""
    y = round(x / multiple) * multiple
    return y if y >= minimum else math.ceil(x / multiple) * multiple


def depth_anything_target_size(height: int, width: int, size: int = DEPTH_ANYTHING_SIZE,
                               multiple: int = DEPTH_ANYTHING_PREPROCESSING.multiple,
                               rule: str = DEPTH_ANYTHING_PREPROCESSING.resize_rule) -> tuple[int, int]:
    """The (height, width) Depth Anything's preprocessing resizes an image to.

    "lower_bound" (the original release): keep the aspect ratio with the larger of the two scales, so the
    shorter side reaches `size`; each side rounded to the nearest multiple, never below `size`.
    "minimal" (transformers' DPTImageProcessor): the scale closest to 1, each side rounded to the nearest
    multiple."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if rule == "minimal":
        return target_size(height, width, size, multiple, keep_aspect_ratio=True)
    if rule != "lower_bound":
        raise ValueError(f"rule must be 'lower_bound' or 'minimal', got {rule!r}")
    scale = max(size / height, size / width)
    return (_lower_bound_multiple(scale * height, size, multiple),
            _lower_bound_multiple(scale * width, size, multiple))


def depth_anything_preprocess(images: torch.Tensor, size: int | tuple[int, int] | None = DEPTH_ANYTHING_SIZE,
                              multiple: int = DEPTH_ANYTHING_PREPROCESSING.multiple,
                              rule: str = DEPTH_ANYTHING_PREPROCESSING.resize_rule) -> torch.Tensor:
    """RGB images (uint8 [0, 255] or float [0, 1], [3, H, W] or [B, 3, H, W]) -> Depth Anything's input:
    resized (bicubic) by `depth_anything_target_size`, normalised with ImageNet's mean and std.
    `size` None keeps the native resolution rounded to the multiple; a (height, width) pair resizes to it.
    Resize the prediction back with `resize_prediction(..., mode="bilinear")` (the original's choice)."""
    return _resize_and_normalize(images, size, multiple, DEPTH_ANYTHING_PREPROCESSING,
                                 lambda h, w: depth_anything_target_size(h, w, size, multiple, rule))
