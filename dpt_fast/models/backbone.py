"""The ViT encoder of DPT: a timm VisionTransformer plus the four Reassemble_s stages.

Module names follow the original release so checkpoints load unchanged: the timm model is
`pretrained.model`, the stages are `pretrained.act_postprocess{1..4}`.

Attention runs through `dpt_fast::attention` by handing timm our Attention subclass through its
public `attn_layer` argument; the token taps are plain local variables of `forward` (no hooks, no
global state), so models and threads never share them.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass

import timm

# The oldest timm this code works with: VisionTransformer's `attn_layer` argument and Attention's
# `gate` / `is_causal` are used below. Keep pyproject.toml's `timm>=` bound equal to it.
TIMM_MIN_VERSION = "1.0.28"


def check_timm_version(version: str) -> None:
    """Raise an ImportError naming the required version when `version` is older than TIMM_MIN_VERSION."""
    def parts(text):
        return tuple(int(n) for n in re.findall(r"\d+", text.split("+")[0])[:3])
    if parts(version) < parts(TIMM_MIN_VERSION):
        raise ImportError(f"dpt_fast needs timm>={TIMM_MIN_VERSION}, but timm {version} is installed: "
                          f"pip install -U \"timm>={TIMM_MIN_VERSION}\"")


check_timm_version(getattr(timm, "__version__", "0"))

import torch  # noqa: E402 (after the version check: older timm fails on the imports below)
import torch.nn.functional as F  # noqa: E402
from timm.layers import Attention  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

from .. import ops, specs  # noqa: E402
from ..config_validation import check_backbone_name, validate_vit_kwargs  # noqa: E402
from .blocks import Reassemble  # noqa: E402


@dataclass(frozen=True)
class BackboneSpec:
    """What DPTBackbone builds: a timm ViT, its four taps, the Reassemble widths (0: set by `features`)
    and the resampling of each stage. `hybrid` None: decided from the built timm model (a ResNet stem
    in its patch embedding)."""
    timm_name: str
    hooks: tuple[int, int, int, int]
    reassemble_features: tuple[int, int, int, int]
    hybrid: bool | None = False
    resample: tuple[str, str, str, str] = specs.STAGE_RESAMPLE

    @classmethod
    def from_architecture(cls, arch: specs.ArchitectureSpec, hooks=None) -> "BackboneSpec":
        return cls(arch.encoder, tuple(arch.taps if hooks is None else hooks), tuple(arch.reassemble_widths),
                   arch.hybrid, tuple(arch.resample))


class _ReleasedBackbones(Mapping):
    """The backbones DPT knows by name (the original release's "vitb16_384", "vitl16_384",
    "vitb_rn50_384", and any `dpt_backbone` registered in dpt_fast.specs), read from the table on each
    lookup so that a registered entry is known at once."""

    def __getitem__(self, name) -> BackboneSpec:
        arch = specs.dpt_backbone(name)
        if arch is None:
            raise KeyError(name)
        return BackboneSpec.from_architecture(arch)

    def __iter__(self):
        return iter(specs.dpt_backbones())

    def __len__(self) -> int:
        return len(specs.dpt_backbones())

    def __repr__(self) -> str:
        return f"RELEASED_BACKBONES({dict(self)!r})"


RELEASED_BACKBONES: Mapping[str, BackboneSpec] = _ReleasedBackbones()

# Resampling of each Reassemble stage: to 1/4, 1/8, 1/16 and 1/32 of the input (dpt_fast.specs).
STAGE_RESAMPLE = specs.STAGE_RESAMPLE


class DPTAttention(Attention):
    """timm's Attention with the core replaced by `dpt_fast::attention` (same parameters and keys).

    Anything the operator does not cover (masks, qk-norm, gating, attention dropout in training)
    goes through timm's own forward.
    """

    def _operator_covers(self, attn_mask, is_causal) -> bool:
        return (attn_mask is None and not is_causal and self.gate is None
                and isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity)
                and not (self.training and self.attn_drop.p > 0))

    def forward(self, x, attn_mask=None, is_causal=False):
        if not self._operator_covers(attn_mask, is_causal):
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        x = ops.attention(self.qkv(x), self.num_heads, self.scale)
        return self.proj_drop(self.proj(self.norm(x)))


def resolve_backbone(backbone: str, hooks=None) -> BackboneSpec:
    """A released DPT backbone name, or any timm ViT name together with four `hooks`."""
    arch = specs.dpt_backbone(backbone)
    if arch is not None:
        return BackboneSpec.from_architecture(arch, hooks)
    if hooks is None:
        raise ValueError(f"backbone {backbone!r} is not one of the released {sorted(RELEASED_BACKBONES)}: "
                         "pass hooks=[four block indices] to use it")
    check_backbone_name(backbone)
    return BackboneSpec(backbone, tuple(hooks), (0, 0, 0, 0), hybrid=None)


class DPTBackbone(nn.Module):
    """Encoder: image -> four feature maps at 1/4, 1/8, 1/16 and 1/32 of the input."""

    def __init__(self, spec: BackboneSpec, reassemble_features, readout: str = "project",
                 layer_norm_eps: float | None = None, vit_kwargs: dict | None = None):
        super().__init__()
        if len(spec.hooks) != 4:
            raise ValueError(f"hooks must be four block indices, got {list(spec.hooks)}")
        # vit_kwargs go to timm's VisionTransformer: only the architecture arguments of the allow-list
        # (never checkpoint_path, pretrained_cfg, ... which make timm read files).
        timm_kwargs = {**validate_vit_kwargs(vit_kwargs), "pretrained": False, "attn_layer": DPTAttention}
        if layer_norm_eps is not None:
            timm_kwargs["norm_layer"] = functools.partial(nn.LayerNorm, eps=layer_norm_eps)
        self.model = timm.create_model(spec.timm_name, **timm_kwargs)
        depth = len(self.model.blocks)
        if max(spec.hooks) >= depth:
            raise ValueError(f"hooks {list(spec.hooks)} reach past the {depth} blocks of {spec.timm_name}")
        self.hooks = tuple(spec.hooks)
        # A hybrid ViT's patch embedding runs a ResNet first (timm's HybridEmbed holds it as `backbone`).
        self.hybrid = spec.hybrid if spec.hybrid is not None else hasattr(self.model.patch_embed, "backbone")
        self.start_index = self.model.num_prefix_tokens
        if readout != "ignore" and self.start_index == 0:
            raise ValueError(f"readout={readout!r} needs a class token, and {spec.timm_name} has none: "
                             "use readout='ignore'")
        self.patch_size = self.model.patch_embed.img_size[0] // self.model.patch_embed.grid_size[0]
        self.grad_checkpointing = False
        dim = self.model.embed_dim
        first_stage = 2 if self.hybrid else 0  # hybrid: stages 1-2 are the ResNet maps, unchanged
        for i in range(first_stage, 4):
            stage = Reassemble(dim, reassemble_features[i], readout, spec.resample[i], self.start_index)
            self.add_module(f"act_postprocess{i + 1}", stage)

    def _position_embedding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """The 2-D grid of position embeddings resized to this input (bilinear, align_corners=False)."""
        pos = self.model.pos_embed
        n_prefix = 0 if self.model.no_embed_class else self.start_index
        prefix, grid = pos[:, :n_prefix], pos[:, n_prefix:]
        old_h, old_w = self.model.patch_embed.grid_size
        # exporting: always resize (bilinear to the same size is exactly the identity), so that a symbolic
        # grid leaves no guard that fixes the program to grids other than the checkpoint's
        if torch.compiler.is_exporting() or (old_h, old_w) != (grid_h, grid_w):
            grid = grid.reshape(1, old_h, old_w, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bilinear", align_corners=False)
            grid = grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
        return torch.cat((prefix, grid), dim=1)

    def _embed(self, x: torch.Tensor):
        """Patch embedding (+ the ResNet stages for the hybrid), prefix tokens and positions."""
        vit = self.model
        resnet_maps = []
        if self.hybrid:
            resnet = vit.patch_embed.backbone
            x = resnet.stem(x)
            for stage in resnet.stages:
                x = stage(x)
                resnet_maps.append(x)
            x = resnet.norm(x)
        else:
            x = vit.patch_embed.proj(x)
        grid_h, grid_w = x.shape[-2:]
        if self.hybrid:
            x = vit.patch_embed.proj(x)
        tokens = x.flatten(2).transpose(1, 2)
        if not self.hybrid:
            tokens = vit.patch_embed.norm(tokens)
        pos = self._position_embedding(grid_h, grid_w).to(tokens.dtype)
        prefix = [t.expand(tokens.shape[0], -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
        if vit.no_embed_class:
            tokens = torch.cat(prefix + [tokens + pos], dim=1)
        else:
            tokens = torch.cat(prefix + [tokens], dim=1) + pos
        tokens = vit.norm_pre(vit.patch_drop(vit.pos_drop(tokens)))
        return tokens, grid_h, grid_w, resnet_maps

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        tokens, grid_h, grid_w, resnet_maps = self._embed(x)
        taps = {}
        for index, block in enumerate(self.model.blocks[: max(self.hooks) + 1]):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, use_reentrant=False)
            else:
                tokens = block(tokens)
            if index in self.hooks:
                taps[index] = tokens
        features = []
        for i, hook in enumerate(self.hooks):
            if self.hybrid and i < 2:
                features.append(resnet_maps[hook])
            else:
                stage = getattr(self, f"act_postprocess{i + 1}")
                features.append(stage(taps[hook], grid_h, grid_w))
        return features
