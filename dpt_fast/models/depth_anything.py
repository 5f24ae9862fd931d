"""Depth Anything V1 / V2 (Yang et al., 2024): a DINOv2 ViT encoder under a DPT decoder.

Module names are the original release's (`pretrained.*` is the DINOv2 ViT, `depth_head.*` the decoder),
so its checkpoints load with `load_state_dict(strict=True)` and the state dict maps back to exactly
its keys. The encoder is timm's DINOv2 ViT (LayerScale, patch 14, no register tokens) built without
pretrained weights; attention runs through `dpt_fast::attention`, the four Reassemble stages through
`dpt_fast::reassemble` and the residual conv units through `dpt_fast::residual_conv_unit`.

What differs from the 2021 DPT (each detail changes the numbers):
- the four taps pass through the encoder's final LayerNorm; the class token is ignored, or, with
  `use_clstoken`, read out by DPT's project+GELU (`depth_head.readout_projects`);
- each fusion block upsamples to the next map's exact size (a 37-patch grid becomes 19 after the
  stride-2 conv, so x2 would be wrong); the last one doubles;
- the head upsamples to 14 x the patch grid between its two convolutions; the output is ReLU'd
  (relative disparity) or sigmoid x max_depth (metric depth in metres);
- position embeddings are resized with the rule the weights were trained or converted with
  (`pos_embed_rule`, see dpt_fast.specs): the original release's bicubic with a +0.1 offset on the
  scale factor, or transformers' bicubic to the target size. The rule travels with the weights.
"""
from __future__ import annotations

import functools

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import ops, specs
from ..config_validation import validate_vit_kwargs
from ..transforms import nearest_multiple
from .backbone import DPTAttention
from .blocks import FeatureFusionBlock
from .heads import DEPTH_HEAD_INITIAL_BIAS

# The +0.1 the original DINOv2 adds to the target grid before dividing by the trained grid.
POS_EMBED_OFFSET = 0.1


def resize_position_grid(grid: torch.Tensor, grid_h: int, grid_w: int, rule: str) -> torch.Tensor:
    """Position embeddings of a square patch grid [1, D, M, M] resized to [1, D, grid_h, grid_w] in fp32.

    "bicubic_offset": the original DINOv2 / Depth Anything rule: bicubic with
    scale_factor = ((grid_h + 0.1) / M, (grid_w + 0.1) / M), antialias off (the scale factor, not
    the size, sets the sampling positions, hence different numbers from "bicubic_size").
    "bicubic_size": transformers' rule, bicubic with size=(grid_h, grid_w).
    """
    side = grid.shape[-1]
    grid = grid.float()
    if rule == "bicubic_offset" and torch.compiler.is_exporting():  # symbolic grid: the same resize as matrices
        out = _bicubic_matrix(grid_h, side, grid) @ grid @ _bicubic_matrix(grid_w, side, grid).T
    elif rule == "bicubic_offset":
        scale = ((grid_h + POS_EMBED_OFFSET) / side, (grid_w + POS_EMBED_OFFSET) / side)
        out = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=False)
    elif rule == "bicubic_size":
        out = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
    else:
        raise ValueError(f"pos_embed_rule must be 'bicubic_offset' or 'bicubic_size', got {rule!r}")
    if tuple(out.shape[-2:]) != (grid_h, grid_w):  # cannot happen for grids the model runs; guard the rule
        raise RuntimeError(f"position grid resized to {tuple(out.shape[-2:])}, expected {(grid_h, grid_w)}")
    return out


def _bicubic_matrix(size, side: int, like: torch.Tensor) -> torch.Tensor:
    """[size, side]: the "bicubic_offset" resize along one axis as a matrix, computed from `size` as a
    tensor value. F.interpolate with a scale factor would turn a symbolic size into a Python float and
    fix it to the traced value; this is what torch.export and ONNX keep symbolic. Same sampling as
    F.interpolate(mode="bicubic", align_corners=False, scale_factor=(size + 0.1) / side): source
    coordinate (i + 0.5) / scale - 0.5, cubic convolution with a = -0.75, borders clamped."""
    dst = torch.arange(size, device=like.device, dtype=torch.float64)
    inverse_scale = (side / (torch.scalar_tensor(size, dtype=torch.float64, device=like.device) + POS_EMBED_OFFSET))
    src = inverse_scale.float() * (dst.float() + 0.5) - 0.5
    floor = src.floor()
    t = (src - floor)[:, None]
    a = -0.75
    near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # noqa: E731  |x| <= 1
    far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # noqa: E731  1 < |x| < 2
    weights = torch.cat((far(t + 1), near(t), near(1 - t), far(2 - t)), dim=1)  # taps floor-1 .. floor+2
    taps = (floor.long()[:, None] + torch.arange(-1, 3, device=like.device)).clamp(0, side - 1)
    columns = torch.arange(side, device=like.device)
    return ((taps[:, :, None] == columns).to(weights.dtype) * weights[:, :, None]).sum(1).to(like.dtype)


class DepthAnythingScratch(nn.Module):
    """`depth_head.scratch`: `layerN_rn` (3x3 to the fusion width, no bias), `refinenetN` fusion blocks,
    `output_conv1` (3x3 F -> F/2) and `output_conv2` (3x3 F/2 -> hidden, ReLU, 1x1 -> 1, activation)."""

    def __init__(self, in_widths, features: int, head_hidden: int, metric: bool):
        super().__init__()
        for i, width in enumerate(in_widths):
            self.add_module(f"layer{i + 1}_rn", nn.Conv2d(width, features, 3, padding=1, bias=False))
        for i in range(4):
            self.add_module(f"refinenet{i + 1}", FeatureFusionBlock(features, use_bn=False))
        self.output_conv1 = nn.Conv2d(features, features // 2, 3, padding=1)
        self.output_conv2 = nn.Sequential(
            nn.Conv2d(features // 2, head_hidden, 3, padding=1),
            nn.ReLU(True),
            nn.Conv2d(head_hidden, 1, 1),
            nn.Sigmoid() if metric else nn.ReLU(True),
            nn.Identity(),
        )
        # A fresh head must not start dead (see heads.DEPTH_HEAD_INITIAL_BIAS): a relative head's final
        # ReLU starts in its linear part; a metric head's sigmoid starts at its steepest point (half of
        # max_depth everywhere) whatever the seed. Loading weights replaces both.
        last = self.output_conv2[2]
        nn.init.constant_(last.bias, 0.0 if metric else DEPTH_HEAD_INITIAL_BIAS)


class DepthAnythingHead(nn.Module):
    """`depth_head`: Reassemble (projects + resize_layers [+ readout_projects]) -> fusion -> head."""

    def __init__(self, dim: int, widths, features: int, use_clstoken: bool, head_hidden: int, metric: bool,
                 patch_size: int):
        super().__init__()
        self.use_clstoken = use_clstoken
        self.patch_size = patch_size
        self.projects = nn.ModuleList(nn.Conv2d(dim, w, kernel_size=1) for w in widths)
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(widths[0], widths[0], kernel_size=4, stride=4),
            nn.ConvTranspose2d(widths[1], widths[1], kernel_size=2, stride=2),
            nn.Identity(),
            nn.Conv2d(widths[3], widths[3], kernel_size=3, stride=2, padding=1),
        ])
        if use_clstoken:
            self.readout_projects = nn.ModuleList(
                nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU()) for _ in range(4))
        self.scratch = DepthAnythingScratch(widths, features, head_hidden, metric)

    def reassemble(self, taps: list[torch.Tensor], grid_h: int, grid_w: int) -> list[torch.Tensor]:
        """Normed taps [B, 1 + grid_h*grid_w, D] -> four maps at 4x, 2x, 1x and 1/2x the patch grid."""
        maps = []
        for i, tokens in enumerate(taps):
            readout = self.readout_projects[i][0] if self.use_clstoken else None
            resample = self.resize_layers[i]
            has_weights = not isinstance(resample, nn.Identity)
            maps.append(ops.reassemble(
                tokens, None if readout is None else readout.weight, None if readout is None else readout.bias,
                self.projects[i].weight, self.projects[i].bias,
                resample.weight if has_weights else None, resample.bias if has_weights else None,
                grid_h, grid_w, 1, "project" if self.use_clstoken else "ignore", specs.STAGE_RESAMPLE[i]))
        return maps

    def forward(self, maps: list[torch.Tensor], grid_h: int, grid_w: int) -> torch.Tensor:
        """Four Reassemble maps -> the head's output before max_depth scaling, [B, 1, 14 grid_h, 14 grid_w]."""
        s = self.scratch
        rn = [getattr(s, f"layer{i + 1}_rn")(x) for i, x in enumerate(maps)]
        path = s.refinenet4(rn[3], size=rn[2].shape[2:])
        path = s.refinenet3(path, rn[2], size=rn[1].shape[2:])
        path = s.refinenet2(path, rn[1], size=rn[0].shape[2:])
        path = s.refinenet1(path, rn[0])
        out = s.output_conv1(path)
        out = F.interpolate(out, size=(grid_h * self.patch_size, grid_w * self.patch_size), mode="bilinear",
                            align_corners=True)
        return s.output_conv2(out)


class DepthAnythingModel(nn.Module):
    """Depth Anything V1/V2: image [B, 3, H, W] (ImageNet-normalised, see dpt_fast.transforms.
    depth_anything_preprocess) -> [B, H, W]: relative disparity (affine-invariant, larger is nearer) or,
    for metric models, depth in metres.

    `arch` names an entry of dpt_fast.specs (e.g. "da2-small", "da1-large", "da2-metric-hypersim-large");
    the other arguments override its facts: `taps` (0-based blocks), `features` (fusion width),
    `out_channels` (Reassemble widths), `use_clstoken`, `metric` + `max_depth`, `head_hidden`,
    `pos_embed_rule` ("bicubic_offset": the original release's, "bicubic_size": transformers'),
    `layer_norm_eps` and `vit_kwargs` (given to timm's VisionTransformer, e.g. a tiny embed_dim/depth).

    Input sizes: H and W multiples of 14 run as they are (518 x 518 is the trained size). Other sizes
    are resized (bilinear) to the nearest multiples of 14 and the prediction is resized back, so the
    output always has the input's size; resizing rather than padding, because these models read padded
    borders as near.
    """

    # Parameters whose names start with this are the encoder (the DINOv2 ViT); training gives them
    # their own, lower learning rate (dpt_fast.train.param_groups).
    encoder_prefix = "pretrained."

    def __init__(self, arch: str = "da2-small", taps=None, features: int | None = None, out_channels=None,
                 use_clstoken: bool = False, metric: bool | None = None, max_depth: float | None = None,
                 head_hidden: int | None = None, pos_embed_rule: str | None = None,
                 layer_norm_eps: float | None = None, vit_kwargs: dict | None = None, channels_last: bool = True):
        super().__init__()
        spec = specs.get(arch)
        if spec.family != "depth_anything":
            raise ValueError(f"{arch!r} is not a Depth Anything architecture (use DPTDepthModel for DPT)")
        taps = tuple(int(t) for t in (spec.taps if taps is None else taps))
        features = int(spec.features if features is None else features)
        widths = [int(w) for w in (spec.reassemble_widths if out_channels is None else out_channels)]
        metric = (spec.head == "metric") if metric is None else bool(metric)
        max_depth = float(max_depth if max_depth is not None else spec.max_depth if metric else 1.0)
        head_hidden = int(spec.head_hidden if head_hidden is None else head_hidden)
        pos_embed_rule = pos_embed_rule or spec.pos_embed_rule
        if len(taps) != 4 or len(widths) != 4:
            raise ValueError(f"taps and out_channels need four entries each, got {list(taps)} and {widths}")
        if pos_embed_rule not in ("bicubic_offset", "bicubic_size"):
            raise ValueError(f"pos_embed_rule must be 'bicubic_offset' or 'bicubic_size', got {pos_embed_rule!r}")
        if not max_depth > 0:
            raise ValueError(f"max_depth must be positive, got {max_depth}")

        timm_kwargs = {"img_size": 518, **validate_vit_kwargs(vit_kwargs), "pretrained": False, "num_classes": 0,
                       "attn_layer": DPTAttention}
        if layer_norm_eps is not None:
            timm_kwargs["norm_layer"] = functools.partial(nn.LayerNorm, eps=layer_norm_eps)
        self.pretrained = timm.create_model(spec.encoder, **timm_kwargs)
        vit = self.pretrained
        if vit.num_prefix_tokens != 1 or vit.no_embed_class:
            raise ValueError(f"{spec.encoder}: expected one class token with its own position embedding "
                             "(DINOv2 without register tokens)")
        depth = len(vit.blocks)
        if max(taps) >= depth or min(taps) < 0 or list(taps) != sorted(set(taps)):
            raise ValueError(f"taps {list(taps)} must be four increasing block indices below the encoder's "
                             f"{depth} blocks")
        # The original DINOv2 keeps a (training-only) mask token; a buffer keeps its key in the state dict.
        self.pretrained.register_buffer("mask_token", torch.zeros(1, vit.embed_dim))
        self.patch_size = vit.patch_embed.patch_size[0]
        self.depth_head = DepthAnythingHead(vit.embed_dim, widths, features, use_clstoken, head_hidden, metric,
                                            self.patch_size)
        self.taps, self.metric, self.max_depth = taps, metric, max_depth
        self.pos_embed_rule = pos_embed_rule
        self.channels_last = channels_last
        self.preprocessing = spec.preprocessing  # what the input should look like (dpt_fast.specs)
        self.config = {"model_class": "DepthAnythingModel", "arch": arch, "taps": list(taps), "features": features,
                       "out_channels": widths, "use_clstoken": bool(use_clstoken), "metric": metric,
                       "max_depth": max_depth, "head_hidden": head_hidden, "pos_embed_rule": pos_embed_rule,
                       "layer_norm_eps": layer_norm_eps, "vit_kwargs": dict(vit_kwargs or {}),
                       "channels_last": channels_last}

    @property
    def output_kind(self) -> str:
        """"metric_depth" (metres) or "relative_disparity" (affine-invariant, larger is nearer)."""
        return "metric_depth" if self.metric else "relative_disparity"

    # ---------------------------------------------------------------------------------- encoder

    def position_embedding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """[1, 1 + grid_h*grid_w, D]: the class position and the patch grid resized by `pos_embed_rule`
        (unchanged when the grid is the trained square one)."""
        pos = self.pretrained.pos_embed
        side = round((pos.shape[1] - 1) ** 0.5)
        exporting = torch.compiler.is_exporting()
        if not exporting and (grid_h, grid_w) == (side, side):
            return pos
        grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        resized = resize_position_grid(grid, grid_h, grid_w, self.pos_embed_rule)
        if exporting:  # symbolic grid: keep both cases in the graph, chosen by value (nearest = identity there)
            trained = (torch.scalar_tensor(grid_h) == side) & (torch.scalar_tensor(grid_w) == side)
            resized = torch.where(trained, F.interpolate(grid.float(), size=(grid_h, grid_w), mode="nearest"), resized)
        grid = resized
        grid = grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1).to(pos.dtype)
        return torch.cat((pos[:, :1], grid), dim=1)

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], int, int]:
        """Image (H, W multiples of 14) -> (the four normed taps [B, 1 + N, D], grid_h, grid_w)."""
        vit = self.pretrained
        patches = vit.patch_embed.proj(x)
        grid_h, grid_w = patches.shape[-2:]
        tokens = vit.patch_embed.norm(patches.flatten(2).transpose(1, 2))
        tokens = torch.cat((vit.cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1)
        tokens = tokens + self.position_embedding(grid_h, grid_w).to(tokens.dtype)
        tokens = vit.norm_pre(vit.patch_drop(vit.pos_drop(tokens)))
        taps = []
        for index, block in enumerate(vit.blocks[: max(self.taps) + 1]):
            if vit.grad_checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, use_reentrant=False)
            else:
                tokens = block(tokens)
            if index in self.taps:
                taps.append(vit.norm(tokens))
        return taps, grid_h, grid_w

    # ---------------------------------------------------------------------------------- model

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ValueError that says what was expected when `x` cannot be a batch of images."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"expected an image tensor [B, 3, H, W], got {shape}")
        if not x.is_floating_point():
            raise ValueError(f"expected a floating-point image tensor (normalised, see "
                             f"dpt_fast.transforms.depth_anything_preprocess), got {x.dtype}")
        if x.numel() == 0:
            raise ValueError(f"expected a non-empty batch, got shape {tuple(x.shape)}")
        device = self.pretrained.cls_token.device
        if x.device != device:
            raise ValueError(f"input is on {x.device} but the model is on {device}: move one of them")

    def forward_raw(self, x: torch.Tensor) -> torch.Tensor:
        """Image with H, W multiples of 14 -> [B, H, W] (the original's forward)."""
        taps, grid_h, grid_w = self.encode(x)
        maps = self.depth_head.reassemble(taps, grid_h, grid_w)
        if self.channels_last:
            maps = [m.contiguous(memory_format=torch.channels_last) for m in maps]
        out = self.depth_head(maps, grid_h, grid_w).squeeze(1)
        # metric: sigmoid x max_depth; a relative head has max_depth 1 (transformers' configs may scale it)
        return out * self.max_depth if self.metric or self.max_depth != 1.0 else out

    def prepare_input(self, x: torch.Tensor):
        """`x` in the weights' dtype (unless autocast decides) and the size it runs at: each side rounded to
        the nearest multiple of the patch (these models read padded borders as near, so they resize)."""
        param = self.pretrained.cls_token
        if x.dtype != param.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(param.dtype)
        height, width = x.shape[-2:]
        return x, (nearest_multiple(height, self.patch_size), nearest_multiple(width, self.patch_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x, (run_h, run_w) = self.prepare_input(x)
        height, width = x.shape[-2:]
        if (run_h, run_w) == (height, width):
            return self.forward_raw(x)
        x = F.interpolate(x, size=(run_h, run_w), mode="bilinear", align_corners=False)
        out = self.forward_raw(x)
        return F.interpolate(out.unsqueeze(1), size=(height, width), mode="bilinear", align_corners=False).squeeze(1)
