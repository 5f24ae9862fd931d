"""One table of architecture facts: every model dpt_fast builds, as data.

This module imports nothing from dpt_fast, so any layer (models, weights, conversion, transforms,
predict, train, bench) can read it without an import circle. Adding a backbone means adding one entry.

Each `ArchitectureSpec` records what changes numbers: the encoder (a timm model name and its size),
the patch size and the multiple an input must have, the four tapped blocks (0-based), whether taps go
through the encoder's final norm, the readout of the class token, the Reassemble widths and the
resampling of each stage, the fusion width and how fusion blocks upsample, the head, and the
preprocessing the weights were trained with.

Names: "dpt-large", "dpt-hybrid", "dpt-base" (the 2021 DPT release); "da1-small/base/large" (Depth
Anything V1); "da2-small/base/large/giant" (Depth Anything V2, relative disparity); and
"da2-metric-{hypersim,vkitti}-{small,base,large}" (V2 metric depth in metres).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

# Position-embedding resize rules (what an encoder does when the patch grid differs from its own):
#   "bilinear"       -- bilinear to the new grid size, align_corners=False (the 2021 DPT release)
#   "bicubic_offset" -- bicubic with scale_factor ((grid + 0.1) / old_grid) per axis, antialias off,
#                       skipped when the input is square with the old grid (original DINOv2 / Depth Anything)
#   "bicubic_size"   -- bicubic to the new grid size (size=), align_corners=False, antialias off,
#                       skipped on the same condition (transformers' Dinov2)
POS_EMBED_RULES = ("bilinear", "bicubic_offset", "bicubic_size")

# Fusion block upsampling: "x2" (scale_factor 2) or "to_next" (to the next, larger map's exact size;
# the last block still doubles). Both bilinear with align_corners=True.
FUSION_UPSAMPLING = ("x2", "to_next")

# Resampling of the four Reassemble stages: ConvTranspose k=s=4, k=s=2, identity, 3x3 stride-2 conv.
STAGE_RESAMPLE = ("up4", "up2", "none", "down2")

# Preprocessing resize rules: "minimal" (scale as little as possible so both sides reach the target,
# each side rounded to the multiple) and "lower_bound" (keep the aspect ratio so that the shorter side
# is at least the target, each side rounded up to the multiple).
RESIZE_RULES = ("minimal", "lower_bound")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The output activation of each depth head type.
HEADS = ("dpt_depth", "dpt_segmentation", "relative", "metric")


@dataclass(frozen=True)
class Preprocessing:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    size: int            # default target (pixels)
    multiple: int        # each resized side is a multiple of this
    resize_rule: str     # one of RESIZE_RULES
    interpolation: str = "bicubic"


DPT_PREPROCESSING = Preprocessing((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 384, 32, "minimal")
DEPTH_ANYTHING_PREPROCESSING = Preprocessing(IMAGENET_MEAN, IMAGENET_STD, 518, 14, "lower_bound")
# DPT's segmentation models (ADE20K) run at 480 pixels, otherwise as DPT_PREPROCESSING.
DPT_SEGMENTATION_SIZE = 480


@dataclass(frozen=True)
class ArchitectureSpec:
    name: str
    family: str                       # "dpt" or "depth_anything"
    encoder: str                      # timm model name (created without pretrained weights)
    embed_dim: int
    depth: int                        # transformer blocks
    num_heads: int
    patch_size: int
    input_multiple: int               # what H and W must be multiples of
    taps: tuple[int, int, int, int]   # 0-based block indices (Hugging Face out_indices are these + 1)
    reassemble_widths: tuple[int, int, int, int]
    features: int                     # fusion width
    readout: str                      # "ignore", "add" or "project"
    taps_normed: bool                 # taps pass through the encoder's final norm
    pos_embed_rule: str               # one of POS_EMBED_RULES
    fusion_upsampling: str            # one of FUSION_UPSAMPLING
    head: str                         # one of HEADS
    preprocessing: Preprocessing
    resample: tuple[str, str, str, str] = STAGE_RESAMPLE
    version: int | None = None        # Depth Anything generation
    head_hidden: int = 32             # channels of the head's last 3x3 conv
    max_depth: float | None = None    # metric heads: sigmoid x max_depth (metres)
    hybrid: bool = False              # ResNet-50 stem feeding the first two stages (DPT-Hybrid)
    weights_public: bool = True
    release_files: tuple[str, ...] = field(default=())
    dpt_backbone: str | None = None   # the name DPT's `backbone=` argument knows it by (e.g. "vitl16_384")
    encoder_image_size: int = 384     # the encoder's own input size: its position grid is this / patch_size
    mlp_ratio: float = 4.0            # MLP hidden width / embed_dim
    hybrid_stage_widths: tuple[int, ...] = ()   # hybrid: channels of the two ResNet maps used as stages 1-2
    hybrid_resnet_depths: tuple[int, ...] = ()  # hybrid: blocks in each ResNet stage of the stem

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def train_size(self) -> int:
        return self.preprocessing.size

    @property
    def position_tokens(self) -> int:
        """Rows of the encoder's position embedding: the square patch grid plus the class token."""
        return (self.encoder_image_size // self.patch_size) ** 2 + 1

    @property
    def stage_widths(self) -> tuple[int, int, int, int]:
        """Channels of the four maps entering the decoder (the hybrid's first two are ResNet maps)."""
        widths = self.reassemble_widths
        if self.hybrid:
            return tuple(self.hybrid_stage_widths) + tuple(widths[len(self.hybrid_stage_widths):])
        return widths


def _dpt(name, backbone, encoder, dim, depth, heads, taps, widths, files=(), **hybrid):
    return ArchitectureSpec(name, "dpt", encoder, dim, depth, heads, 16, 32, taps, widths, 256, "project",
                            False, "bilinear", "x2", "dpt_depth", DPT_PREPROCESSING, hybrid=bool(hybrid),
                            release_files=files, dpt_backbone=backbone, **hybrid)


# Depth Anything encoders: DINOv2 ViTs, patch 14, head dim 64, LayerScale, no register tokens.
DINOV2_ENCODERS = {  # size -> (timm name, embed_dim, depth, heads, fusion width, Reassemble widths)
    "small": ("vit_small_patch14_dinov2", 384, 12, 6, 64, (48, 96, 192, 384)),
    "base": ("vit_base_patch14_dinov2", 768, 12, 12, 128, (96, 192, 384, 768)),
    "large": ("vit_large_patch14_dinov2", 1024, 24, 16, 256, (256, 512, 1024, 1024)),
    "giant": ("vit_giant_patch14_dinov2", 1536, 40, 24, 384, (1536, 1536, 1536, 1536)),
}
# The original code's short encoder names.
ENCODER_CODES = {"vits": "small", "vitb": "base", "vitl": "large", "vitg": "giant"}
_V2_TAPS = {"small": (2, 5, 8, 11), "base": (2, 5, 8, 11), "large": (4, 11, 17, 23), "giant": (9, 19, 29, 39)}
METRIC_DATASETS = {"hypersim": 20.0, "vkitti": 80.0}  # max_depth in metres


def _depth_anything(name, version, size, head="relative", max_depth=None, files=(), public=True):
    timm_name, dim, depth, heads, features, widths = DINOV2_ENCODERS[size]
    taps = _V2_TAPS[size] if version == 2 else tuple(range(depth - 4, depth))
    return ArchitectureSpec(name, "depth_anything", timm_name, dim, depth, heads, 14, 14, taps, widths, features,
                            "ignore", True, "bicubic_offset", "to_next", head, DEPTH_ANYTHING_PREPROCESSING,
                            version=version, max_depth=max_depth, weights_public=public, release_files=files,
                            encoder_image_size=518)


ARCHITECTURES: dict[str, ArchitectureSpec] = {}
for _spec in (
    _dpt("dpt-large", "vitl16_384", "vit_large_patch16_384", 1024, 24, 16, (5, 11, 17, 23), (256, 512, 1024, 1024),
         files=("dpt_large-midas-2f21e586.pt",)),
    _dpt("dpt-hybrid", "vitb_rn50_384", "vit_base_r50_s16_384", 768, 12, 12, (0, 1, 8, 11), (256, 512, 768, 768),
         files=("dpt_hybrid-midas-501f0c75.pt",), hybrid_stage_widths=(256, 512), hybrid_resnet_depths=(3, 4, 9)),
    _dpt("dpt-base", "vitb16_384", "vit_base_patch16_384", 768, 12, 12, (2, 5, 8, 11), (96, 192, 384, 768)),
):
    ARCHITECTURES[_spec.name] = _spec
for _code, _size in ENCODER_CODES.items():
    if _size != "giant":  # V1 has no giant
        ARCHITECTURES[f"da1-{_size}"] = _depth_anything(f"da1-{_size}", 1, _size,
                                                        files=(f"depth_anything_{_code}14.pth",))
    ARCHITECTURES[f"da2-{_size}"] = _depth_anything(
        f"da2-{_size}", 2, _size, files=() if _size == "giant" else (f"depth_anything_v2_{_code}.pth",),
        public=_size != "giant")
    if _size != "giant":
        for _dataset, _max_depth in METRIC_DATASETS.items():
            _name = f"da2-metric-{_dataset}-{_size}"
            ARCHITECTURES[_name] = _depth_anything(
                _name, 2, _size, head="metric", max_depth=_max_depth,
                files=(f"depth_anything_v2_metric_{_dataset}_{_code}.pth",))
del _spec, _code, _size


def get(name: str) -> ArchitectureSpec:
    """The spec called `name`; a ValueError listing the known names otherwise."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}") from None


def depth_anything(version: int, size: str, head: str = "relative", dataset: str | None = None) -> ArchitectureSpec:
    """The Depth Anything spec of a generation (1 or 2), an encoder size ("small"/"vits", ...) and a
    head ("relative" or "metric" with its training `dataset`: "hypersim" or "vkitti")."""
    size = ENCODER_CODES.get(size, size)
    if head == "metric":
        if dataset not in METRIC_DATASETS:
            raise ValueError(f"metric Depth Anything needs dataset one of {sorted(METRIC_DATASETS)}, got {dataset!r}")
        if version != 2:
            raise ValueError(f"metric heads exist for Depth Anything V2 only, got version={version!r}")
        return get(f"da2-metric-{dataset}-{size}")
    if head != "relative":
        raise ValueError(f"head must be 'relative' or 'metric', got {head!r}")
    return get(f"da{version}-{size}")


def find_by_release_file(filename: str) -> ArchitectureSpec | None:
    """The spec whose released checkpoint is called `filename` (basename), or None."""
    for spec in ARCHITECTURES.values():
        if filename in spec.release_files:
            return spec
    return None


def dpt_backbones() -> dict[str, ArchitectureSpec]:
    """The entries DPT's `backbone=` argument knows by name (`dpt_backbone`), read now, so that an
    entry added with `register` is known everywhere at once."""
    return {spec.dpt_backbone: spec for spec in ARCHITECTURES.values()
            if spec.family == "dpt" and spec.dpt_backbone}


def dpt_backbone(name) -> ArchitectureSpec | None:
    """The entry of DPT's backbone called `name` ("vitl16_384", ...), or None."""
    return dpt_backbones().get(name) if isinstance(name, str) else None


def register(spec: ArchitectureSpec) -> ArchitectureSpec:
    """Add an architecture to the table (a ValueError if its name is taken or a field is out of range).
    A "dpt" entry with a `dpt_backbone` name can then be built as DPTDepthModel(backbone=that name), and
    its original-layout checkpoints are recognised by load_model."""
    if spec.name in ARCHITECTURES:
        raise ValueError(f"architecture {spec.name!r} is already in the table")
    if spec.dpt_backbone is not None and dpt_backbone(spec.dpt_backbone) is not None:
        raise ValueError(f"the DPT backbone name {spec.dpt_backbone!r} is already taken")
    for value, allowed, what in ((spec.pos_embed_rule, POS_EMBED_RULES, "pos_embed_rule"),
                                 (spec.fusion_upsampling, FUSION_UPSAMPLING, "fusion_upsampling"),
                                 (spec.head, HEADS, "head"), (spec.preprocessing.resize_rule, RESIZE_RULES,
                                                              "preprocessing.resize_rule")):
        if value not in allowed:
            raise ValueError(f"{what}={value!r}: must be one of {allowed}")
    if any(r not in STAGE_RESAMPLE for r in spec.resample) or len(spec.resample) != 4:
        raise ValueError(f"resample={spec.resample!r}: four of {STAGE_RESAMPLE}")
    if len(spec.taps) != 4 or max(spec.taps) >= spec.depth or len(spec.reassemble_widths) != 4:
        raise ValueError(f"taps {spec.taps} and reassemble_widths {spec.reassemble_widths}: four each, "
                         f"taps below depth={spec.depth}")
    ARCHITECTURES[spec.name] = spec
    return spec


def with_overrides(spec: ArchitectureSpec, **changes) -> ArchitectureSpec:
    """A copy of `spec` with some fields changed (e.g. taps of a fine-tune)."""
    return replace(spec, **changes)
