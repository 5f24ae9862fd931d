"""Hugging Face transformers' DPT -> dpt_fast: config -> constructor arguments, state dict -> original keys.

transformers ports DPT as `DPTForDepthEstimation` and `DPTForSemanticSegmentation` (hub: Intel/dpt-large,
Intel/dpt-hybrid-midas, Intel/dpt-large-ade) with renamed keys (ARCHITECTURE.md §3). This module maps a
checkpoint of theirs onto the original release's layout, which is dpt_fast's, and refuses -- with the
field named -- any config setting that would change the numbers and that dpt_fast cannot reproduce.

Every field read is type- and range-checked before use (upper bounds from dpt_fast.config_validation):
a null, a string or a zero where a size belongs is an HFConversionError naming the field.

Config fields and what they become:

- hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, patch_size, image_size:
  the timm ViT with exactly these dimensions where one exists (`HF_VIT_TABLE`; the released DPT names
  `vitb16_384` / `vitl16_384` where they match), else timm's ViT class with these dimensions passed as
  `vit_kwargs`. The position-embedding grid is image_size/patch_size.
- is_hybrid + backbone_config (BiT): the hybrid `vitb_rn50_384` (timm `vit_base_r50_s16_384`). BiT's
  keys are mapped onto timm's ResNetV2 (`bit.embedder.convolution` -> `stem.conv`,
  `bit.encoder.stages.S.layers.L` -> `stages.S.blocks.L`, the rest unchanged). The layers compute the
  same thing: weight-standardised convs with eps 1e-8 (HF `WeightStandardizedConv2d(eps=1e-8)`, timm
  `StdConv2dSame(eps=1e-8)`), GroupNorm(32 groups, eps 1e-5), TF-"SAME" padding (static where stride 1,
  dynamic otherwise, identical split). One formal difference: the stem max-pool pads with 0 in HF and
  with -inf in timm; it follows a ReLU, so the maxima are equal.
- layer_norm_eps -> `layer_norm_eps` (HF's default 1e-12 differs from timm's 1e-6: always passed).
- backbone_out_indices -> `hooks`. HF keeps the hidden states whose index is in the list, in
  ascending order, so the hooks are the sorted indices; for the hybrid HF always taps BiT stage1 and
  stage2 and the ViT at indices[2:], i.e. hooks = [0, 1] + sorted(indices[2:]).
- neck_hidden_sizes (Reassemble widths) -> `features` (a list of four); fusion_hidden_size -> `fusion_features`.
- readout_type -> `readout`; use_batch_norm_in_fusion_residual -> `use_bn`.
- use_bias_in_fusion_residual: must be unset or `not use_batch_norm_in_fusion_residual` (the original).
- reassemble_factors: must be [4, 2, 1, 0.5] (hybrid: the last two 1, 0.5) -- the original's resampling.
- num_labels (len(id2label)) -> `num_classes` of the segmentation model.
- add_projection (an extra conv+ReLU before the depth head), hidden_act other than "gelu",
  qkv_bias=False, head_in_index other than the last map, a non-BiT `backbone_config` (DINOv2, BEiT,
  Swin DPT variants): not the original architecture, refused with a clear error.
- Fields that do not change inference outputs: dropout probabilities, semantic_classifier_dropout,
  auxiliary_loss_weight, semantic_loss_ignore_index, pooler_* (the task models have no pooler),
  initializer_range, dtype / torch_dtype (load_model's `dtype` decides).

timm's classifier (`pretrained.model.head.*`) is not used by DPT and HF checkpoints do not carry it;
`hf_state_dict_to_original` leaves it out and `dpt_fast.weights` fills it with zeros.
"""
from __future__ import annotations

import re

import torch

from . import specs
from .config_validation import (MAX_CLASSES, MAX_DEPTH, MAX_HEADS, MAX_IMAGE_SIZE, MAX_MLP_RATIO, MAX_WIDTH,
                                ConfigError, boolean, int_list, integer, number, one_of, optional)

__all__ = ["HFConversionError", "HF_VIT_TABLE", "is_hf_dpt_config", "hf_model_class",
           "hf_config_to_model_config", "hf_state_dict_to_original", "hf_key_to_original",
           "HF_FILLED_KEYS", "hf_dpt_config", "ConfigFields"]


class HFConversionError(ValueError):
    """A Hugging Face DPT config or checkpoint that dpt_fast cannot reproduce exactly."""


def _hf_dims(arch: specs.ArchitectureSpec) -> tuple[int, int, int, int, int, int]:
    """(hidden, layers, heads, intermediate, patch, image) of an entry of dpt_fast.specs, as DPTConfig says them."""
    return (arch.embed_dim, arch.depth, arch.num_heads, int(arch.embed_dim * arch.mlp_ratio), arch.patch_size,
            arch.encoder_image_size)


# timm ViTs with a class token, position embeddings over (cls + grid), LayerNorm pre-norm blocks,
# qkv bias, GELU MLP, no pre-norm -- HF's DPTViT exactly. Patch 16 only: DPT's stages sit at
# 1/4 .. 1/32 of the input. (hidden, layers, heads, intermediate, patch, image) -> backbone name; the
# DPT backbones of dpt_fast.specs (the released vitb16_384 and vitl16_384) by their own names.
HF_VIT_TABLE = {
    (192, 12, 3, 768, 16, 224): "vit_tiny_patch16_224",
    (192, 12, 3, 768, 16, 384): "vit_tiny_patch16_384",
    (384, 12, 6, 1536, 16, 224): "vit_small_patch16_224",
    (384, 12, 6, 1536, 16, 384): "vit_small_patch16_384",
    (768, 12, 12, 3072, 16, 224): "vit_base_patch16_224",
    (1024, 24, 16, 4096, 16, 224): "vit_large_patch16_224",
    **{_hf_dims(arch): name for name, arch in specs.dpt_backbones().items() if not arch.hybrid},
}



def _vit_backbone(dims) -> str | None:
    """The backbone name for HF ViT dimensions: a DPT backbone of dpt_fast.specs (read now, so that a
    registered entry counts) or a timm ViT of HF_VIT_TABLE."""
    for name, arch in specs.dpt_backbones().items():
        if not arch.hybrid and _hf_dims(arch) == tuple(dims):
            return name
    return HF_VIT_TABLE.get(tuple(dims))


def hf_dpt_config(arch: specs.ArchitectureSpec) -> dict:
    """transformers DPTConfig arguments of a DPT entry of dpt_fast.specs: the inverse of
    `hf_config_to_model_config`, for building transformers' model of the same architecture (benchmarks,
    tests). A hybrid's first two `backbone_out_indices` are placeholders: transformers taps BiT stages 1-2."""
    if arch.family != "dpt":
        raise ValueError(f"{arch.name} is not a DPT architecture (family {arch.family!r})")
    hidden, layers, heads, intermediate, patch, image = _hf_dims(arch)
    config = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=intermediate, patch_size=patch, image_size=image, readout_type=arch.readout,
                  backbone_out_indices=list(arch.taps), neck_hidden_sizes=list(arch.reassemble_widths),
                  fusion_hidden_size=arch.features, layer_norm_eps=1e-6)
    if arch.hybrid:
        grid = image // patch
        config.update(is_hybrid=True, backbone_out_indices=[2, 5] + list(arch.taps[2:]),
                      backbone_featmap_shape=[1, 1024, grid, grid], neck_ignore_stages=[0, 1])
    return config


# The BiT of DPT-Hybrid (ResNet-50 stem + 3 stages), as transformers' DPTConfig builds it.
_HYBRID = specs.dpt_backbone("vitb_rn50_384")
# DPTConfig's names of the ViT dimensions, in _hf_dims's order.
_VIT_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size",
               "image_size")
_HYBRID_VIT = dict(zip(_VIT_FIELDS, _hf_dims(_HYBRID)))
_HYBRID_BIT = {"layer_type": "bottleneck", "depths": list(_HYBRID.hybrid_resnet_depths), "embedding_size": 64,
               "num_groups": 32, "hidden_act": "relu", "width_factor": 1, "num_channels": 3, "output_stride": 32}

# Keys the original layout has and HF checkpoints lack; they do not affect DPT's outputs.
HF_FILLED_KEYS = ("pretrained.model.head.weight", "pretrained.model.head.bias")


def is_hf_dpt_config(cfg: dict) -> bool:
    return isinstance(cfg, dict) and cfg.get("model_type") == "dpt"


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise HFConversionError(message)


class ConfigFields:
    """Typed reads of a config.json object's fields (nothing in it is executed): each value is checked
    (type, range) before it is used, so a null, a string or a zero where a size belongs raises `error`
    (an HFConversionError unless told) with a message naming the field; `prefix` is written before each
    field's name (e.g. "config.json: backbone_config.")."""

    def __init__(self, cfg: dict, prefix: str = "", error: type[Exception] = HFConversionError):
        self.cfg, self.prefix, self.error = cfg, prefix, error

    def _fail(self, message: str):
        raise self.error(message)

    def _get(self, name, default, validator):
        value = self.cfg.get(name, default)
        try:
            return validator(self.prefix + name, value)
        except ConfigError as e:
            raise self.error(str(e)) from None

    def int(self, name, default, lo, hi):
        return self._get(name, default, integer(lo, hi))

    def bool(self, name, default):
        return self._get(name, default, boolean)

    def optional_bool(self, name):
        return self._get(name, None, optional(boolean))

    def number(self, name, default, lo, hi, lo_open=False):
        return self._get(name, default, number(lo, hi, lo_open=lo_open))

    def square(self, name, default, lo, hi):
        """An int, or a list of two equal ints (HF allows [h, w]; dpt_fast needs square)."""
        value = self._get(name, default, one_of(integer(lo, hi), int_list(2, integer(lo, hi)),
                                                 what=f"an integer or a pair of integers in [{lo}, {hi}]"))
        if isinstance(value, list) and value[0] != value[1]:
            self._fail(f"{self.prefix}{name}={value}: only square sizes are supported")
        return value[0] if isinstance(value, list) else value

    def ints(self, name, default, length, lo, hi, distinct=False):
        return self._get(name, default, int_list(length, integer(lo, hi), distinct=distinct))

    def choice(self, name, default, allowed):
        """One of the values `allowed` (of any JSON type)."""
        value = self.cfg.get(name, default)
        if isinstance(value, bool) or value not in allowed:
            self._fail(f"{self.prefix}{name}={value!r}: must be one of {list(allowed)}")
        return value

    def list(self, name, default):
        value = self.cfg.get(name, default)
        if not isinstance(value, (list, tuple)):
            self._fail(f"{self.prefix}{name} must be a list, got {value!r}")
        return list(value)

    def object(self, name):
        value = self.cfg.get(name)
        if value is not None and not isinstance(value, dict):
            self._fail(f"{self.prefix}{name} must be an object or null, got {type(value).__name__}")
        return value


def hf_model_class(cfg: dict, state_dict_keys=None) -> str:
    """"DPTDepthModel" or "DPTSegmentationModel" from config['architectures'] (or the keys)."""
    archs = cfg.get("architectures") or []
    _check(isinstance(archs, list) and all(isinstance(a, str) for a in archs),
           f"architectures must be a list of class names, got {archs!r}")
    if "DPTForDepthEstimation" in archs:
        return "DPTDepthModel"
    if "DPTForSemanticSegmentation" in archs:
        return "DPTSegmentationModel"
    if archs:
        raise HFConversionError(f"config architectures={archs}: dpt_fast loads DPTForDepthEstimation and "
                                "DPTForSemanticSegmentation (a bare DPTModel has no head)")
    if state_dict_keys is not None:
        keys = set(state_dict_keys)
        if "head.head.1.running_mean" in keys or any(k.startswith("auxiliary_head.") for k in keys):
            return "DPTSegmentationModel"
        if "head.head.2.weight" in keys:
            return "DPTDepthModel"
    raise HFConversionError("cannot tell a depth from a segmentation checkpoint: config.json has no "
                            "'architectures' and the keys have no recognisable head")


def _refuse_other_architectures(f: ConfigFields, hybrid: bool, backbone_cfg: dict | None) -> None:
    """Refuse the settings of a DPT other than the original: a backbone_config that is not the hybrid's BiT,
    an activation other than exact GELU, no qkv bias, other than RGB input, a head that reads another map
    and add_projection."""
    get = f.cfg.get
    if not hybrid and (backbone_cfg is not None or get("backbone") is not None):
        kind = backbone_cfg.get("model_type") if isinstance(backbone_cfg, dict) else get("backbone")
        raise HFConversionError(f"DPT with a {kind!r} backbone (backbone_config; the DINOv2/BEiT/Swin DPT "
                                "variants) is not supported: dpt_fast loads DPT's ViT and ViT-hybrid")
    act = get("hidden_act", "gelu")
    _check(act == "gelu", f"hidden_act={act!r}: the original DPT (and timm's ViT) use exact GELU ('gelu')")
    _check(f.bool("qkv_bias", True), "qkv_bias=False: the released ViTs have a qkv bias")
    _check(f.int("num_channels", 3, 1, 4) == 3, f"num_channels={get('num_channels')}: DPT takes RGB (3)")
    _check(f.int("head_in_index", -1, -4, 3) in (-1, 3), f"head_in_index={get('head_in_index')}: DPT's heads "
                                                          "read the last fused map (-1)")
    _check(not f.bool("add_projection", False),
           "add_projection=True (an extra 3x3 conv + ReLU before the depth head) is not part of the "
           "original DPT and not supported by dpt_fast")


def _vit_dims(f: ConfigFields) -> tuple[int, int, int, int, int, int]:
    """The ViT's (hidden, layers, heads, intermediate, patch, image), each checked, as _hf_dims orders them."""
    hidden = f.int("hidden_size", 768, 1, MAX_WIDTH)
    heads = f.int("num_attention_heads", 12, 1, MAX_HEADS)
    _check(hidden % heads == 0, f"hidden_size={hidden} is not a multiple of num_attention_heads={heads}")
    dims = (hidden, f.int("num_hidden_layers", 12, 1, MAX_DEPTH), heads,
            f.int("intermediate_size", 3072, 1, int(MAX_WIDTH * MAX_MLP_RATIO)),
            f.square("patch_size", 16, 1, 64), f.square("image_size", 384, 16, MAX_IMAGE_SIZE))
    _check(dims[3] <= MAX_MLP_RATIO * hidden, f"intermediate_size={dims[3]} is over {MAX_MLP_RATIO:g} x "
                                              f"hidden_size={hidden}")
    return dims


def _check_hybrid(f: ConfigFields, dims, readout: str, factors: list[float], backbone_cfg: dict | None) -> None:
    """A DPT-hybrid config against dpt_fast's vitb_rn50_384: its ViT, readout and resampling, the ResNet
    stages it takes (neck_ignore_stages, backbone_featmap_shape) and the BiT of backbone_config."""
    get = f.cfg.get
    found = dict(zip(_VIT_FIELDS, dims))
    _check(found == _HYBRID_VIT, f"DPT-hybrid with ViT {found}: dpt_fast's hybrid is vitb_rn50_384 "
                                 f"({_HYBRID_VIT})")
    _check(readout == "project", f"readout_type={readout!r}: DPT-hybrid uses 'project'")
    _check(factors[2:] == [1.0, 0.5], f"reassemble_factors={factors}: the hybrid's ViT stages resample "
                                       "by 1 and 0.5")
    _check(f.list("neck_ignore_stages", [0, 1]) == [0, 1],
           f"neck_ignore_stages={get('neck_ignore_stages')}: the hybrid takes stages 1-2 from the ResNet")
    featmap = get("backbone_featmap_shape") or [1, 1024, 24, 24]
    _check(isinstance(featmap, list) and len(featmap) == 4 and featmap[1] == 1024,
           f"backbone_featmap_shape={featmap}: ResNet-50 stage 3 has 1024 channels")
    _check_bit(dict(backbone_cfg or {}))


def _check_bit(bit: dict) -> None:
    """A hybrid's backbone_config: the BiT ResNet-50 that timm's vit_base_r50_s16_384 computes exactly."""
    _check(bit.get("model_type", "bit") == "bit", f"hybrid backbone_config model_type="
                                                  f"{bit.get('model_type')!r}: only BiT is supported")
    for key, want in _HYBRID_BIT.items():
        if key in bit:
            have = list(bit[key]) if isinstance(bit[key], (list, tuple)) else bit[key]
            _check(have == want, f"backbone_config.{key}={have!r}: DPT-hybrid's ResNet-50 has {want!r}")
    if "hidden_sizes" in bit:
        sizes = bit["hidden_sizes"]
        _check(isinstance(sizes, list) and sizes[:3] == [256, 512, 1024],
               f"backbone_config.hidden_sizes={sizes}: ResNet-50 stages are 256, 512, 1024")
    padding = bit.get("global_padding", "same")
    _check(isinstance(padding, str) and padding.lower() == "same",
           f"backbone_config.global_padding={padding!r}: timm's vit_base_r50_s16_384 uses TF 'SAME' padding")
    _check(bit.get("embedding_dynamic_padding", True) is True,
           "backbone_config.embedding_dynamic_padding=False: timm's stem max-pool pads 'SAME'")
    outs = bit.get("out_features")
    _check(outs is None or outs == ["stage1", "stage2", "stage3"],
           f"backbone_config.out_features={outs}: DPT-hybrid reads stage1, stage2, stage3")


def _head_arguments(f: ConfigFields, model_class: str) -> dict:
    """The head's constructor arguments: the depth head's output mapping, or the segmentation head's classes
    (len(id2label), else num_labels)."""
    if model_class == "DPTDepthModel":
        # HF's depth head always ends with a ReLU; it never inverts.
        return dict(non_negative=True, scale=1.0, shift=0.0, invert=False)
    id2label = f.object("id2label")
    if id2label:
        _check(len(id2label) <= MAX_CLASSES, f"id2label has {len(id2label)} labels; at most {MAX_CLASSES}")
        num = len(id2label)
    else:
        num = f.int("num_labels", 2, 1, MAX_CLASSES)
    return {"num_classes": num}


def hf_config_to_model_config(cfg: dict, model_class: str | None = None) -> dict:
    """A transformers DPTConfig (as the dict in config.json) -> dpt_fast model config (for build_model).

    Every field used is type- and range-checked first (upper bounds from `dpt_fast.config_validation`),
    so a malformed config gives an HFConversionError naming the field, never a TypeError or an attempt
    to build a model of absurd size."""
    _check(isinstance(cfg, dict) and is_hf_dpt_config(cfg),
           f"not a Hugging Face DPT config (model_type={cfg.get('model_type') if isinstance(cfg, dict) else cfg!r})")
    model_class = model_class or hf_model_class(cfg)
    get = cfg.get
    f = ConfigFields(cfg)
    hybrid = f.bool("is_hybrid", False)
    backbone_cfg = f.object("backbone_config")
    _refuse_other_architectures(f, hybrid, backbone_cfg)
    readout = get("readout_type", "project")
    _check(readout in ("ignore", "add", "project"), f"readout_type={readout!r}: must be 'ignore', 'add' or 'project'")
    factors = [float(x) for x in f._get("reassemble_factors", [4, 2, 1, 0.5],
                                        int_list(4, number(0.0, 64.0, lo_open=True), what="numbers"))]
    use_bn = f.bool("use_batch_norm_in_fusion_residual", False)
    bias = f.optional_bool("use_bias_in_fusion_residual")
    _check(bias is None or bias == (not use_bn),
           f"use_bias_in_fusion_residual={bias} with use_batch_norm_in_fusion_residual={use_bn}: the original "
           "RCU has conv bias exactly when it has no batch norm")
    indices = f.ints("backbone_out_indices", None, 4, 0, MAX_DEPTH - 1, distinct=True)
    neck = f.ints("neck_hidden_sizes", [96, 192, 384, 768], 4, 1, MAX_WIDTH)
    fusion = f.int("fusion_hidden_size", 256, 1, MAX_WIDTH)
    dims = _vit_dims(f)
    layer_norm_eps = 1e-12 if get("layer_norm_eps") is None else f.number("layer_norm_eps", None, 0.0, 1.0,
                                                                            lo_open=True)

    vit_kwargs = None
    if hybrid:
        _check_hybrid(f, dims, readout, factors, backbone_cfg)
        backbone = _HYBRID.dpt_backbone
        hooks = [0, 1] + sorted(indices[2:])
        _check(max(hooks[2:]) < dims[1], f"backbone_out_indices={indices} reach past {dims[1]} layers")
    else:
        _check(factors == [4.0, 2.0, 1.0, 0.5], f"reassemble_factors={factors}: the original resamples by "
                                                "4, 2, 1, 0.5")
        backbone = _vit_backbone(dims)
        if backbone is None:  # any other size: timm's VisionTransformer with HF's dimensions
            hidden, layers, heads, inter, patch, image = dims
            _check(patch == 16, f"patch_size={patch}: DPT's stages sit at 1/4 .. 1/32 of the input (patch 16)")
            backbone = "vit_base_patch16_384"
            vit_kwargs = dict(embed_dim=hidden, depth=layers, num_heads=heads, mlp_ratio=inter / hidden,
                              img_size=image)
        hooks = sorted(indices)
        _check(hooks[-1] < dims[1], f"backbone_out_indices={indices} reach past {dims[1]} layers")

    config = {"model_class": model_class, "backbone": backbone, "readout": readout,
              "features": neck, "fusion_features": fusion, "use_bn": use_bn, "hooks": hooks,
              "layer_norm_eps": float(layer_norm_eps)}
    if vit_kwargs:
        config["vit_kwargs"] = vit_kwargs
    config.update(_head_arguments(f, model_class))
    return config


# --------------------------------------------------------------------------------------- state dict

_FIXED = {
    "dpt.embeddings.cls_token": "pretrained.model.cls_token",
    "dpt.embeddings.position_embeddings": "pretrained.model.pos_embed",
    "dpt.embeddings.patch_embeddings.projection.weight": "pretrained.model.patch_embed.proj.weight",
    "dpt.embeddings.patch_embeddings.projection.bias": "pretrained.model.patch_embed.proj.bias",
    "dpt.embeddings.projection.weight": "pretrained.model.patch_embed.proj.weight",   # hybrid 1x1 proj
    "dpt.embeddings.projection.bias": "pretrained.model.patch_embed.proj.bias",
    "dpt.layernorm.weight": "pretrained.model.norm.weight",
    "dpt.layernorm.bias": "pretrained.model.norm.bias",
}

_LAYER = {
    "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
}

_RULES = [
    (re.compile(r"^dpt\.embeddings\.backbone\.bit\.embedder\.convolution\.(.+)$"),
     lambda m: f"pretrained.model.patch_embed.backbone.stem.conv.{m[1]}"),
    (re.compile(r"^dpt\.embeddings\.backbone\.bit\.embedder\.norm\.(.+)$"),
     lambda m: f"pretrained.model.patch_embed.backbone.stem.norm.{m[1]}"),
    (re.compile(r"^dpt\.embeddings\.backbone\.bit\.encoder\.stages\.(\d+)\.layers\.(\d+)\.(.+)$"),
     lambda m: f"pretrained.model.patch_embed.backbone.stages.{m[1]}.blocks.{m[2]}.{m[3]}"),
    (re.compile(r"^dpt\.encoder\.layer\.(\d+)\.(attention\.output\.dense|intermediate\.dense|output\.dense|"
                r"layernorm_before|layernorm_after)\.(weight|bias)$"),
     lambda m: f"pretrained.model.blocks.{m[1]}.{_LAYER[m[2]]}.{m[3]}"),
    (re.compile(r"^neck\.reassemble_stage\.readout_projects\.(\d)\.0\.(weight|bias)$"),
     lambda m: f"pretrained.act_postprocess{int(m[1]) + 1}.0.project.0.{m[2]}"),
    (re.compile(r"^neck\.reassemble_stage\.layers\.(\d)\.projection\.(weight|bias)$"),
     lambda m: f"pretrained.act_postprocess{int(m[1]) + 1}.3.{m[2]}"),
    (re.compile(r"^neck\.reassemble_stage\.layers\.(\d)\.resize\.(weight|bias)$"),
     lambda m: f"pretrained.act_postprocess{int(m[1]) + 1}.4.{m[2]}"),
    (re.compile(r"^neck\.convs\.(\d)\.weight$"),
     lambda m: f"scratch.layer{int(m[1]) + 1}_rn.weight"),
    (re.compile(r"^neck\.fusion_stage\.layers\.(\d)\.residual_layer(\d)\.convolution(\d)\.(.+)$"),
     lambda m: f"scratch.refinenet{4 - int(m[1])}.resConfUnit{m[2]}.conv{m[3]}.{m[4]}"),
    (re.compile(r"^neck\.fusion_stage\.layers\.(\d)\.residual_layer(\d)\.batch_norm(\d)\.(.+)$"),
     lambda m: f"scratch.refinenet{4 - int(m[1])}.resConfUnit{m[2]}.bn{m[3]}.{m[4]}"),
    (re.compile(r"^neck\.fusion_stage\.layers\.(\d)\.projection\.(weight|bias)$"),
     lambda m: f"scratch.refinenet{4 - int(m[1])}.out_conv.{m[2]}"),
    (re.compile(r"^head\.head\.(\d+)\.(.+)$"), lambda m: f"scratch.output_conv.{m[1]}.{m[2]}"),
    (re.compile(r"^auxiliary_head\.head\.(\d+)\.(.+)$"), lambda m: f"auxlayer.{m[1]}.{m[2]}"),
]

_QKV = re.compile(r"^dpt\.encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$")


def hf_key_to_original(key: str) -> str | None:
    """The original-layout name of one HF DPT key (None for q/k/v, which are concatenated, and unknowns)."""
    if key in _FIXED:
        return _FIXED[key]
    for pattern, build in _RULES:
        m = pattern.match(key)
        if m:
            return build(m)
    return None


def hf_state_dict_to_original(state_dict: dict) -> tuple[dict, list[str]]:
    """HF DPTFor* state dict -> (original-layout state dict, HF keys that have no counterpart).

    query/key/value of each layer are concatenated (in that order, along the output dim) into timm's
    `attn.qkv`, which is how timm splits its packed projection. Tensors are not copied except for qkv.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        m = _QKV.match(key)
        if m:
            qkv.setdefault((int(m[1]), m[3]), {})[m[2]] = value
            continue
        new = hf_key_to_original(key)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    for (layer, kind), parts in sorted(qkv.items()):
        if set(parts) != {"query", "key", "value"}:
            missing = sorted({"query", "key", "value"} - set(parts))
            raise HFConversionError(f"layer {layer}: attention {kind} has {sorted(parts)} but not {missing}")
        out[f"pretrained.model.blocks.{layer}.attn.qkv.{kind}"] = torch.cat(
            [parts["query"], parts["key"], parts["value"]], dim=0)
    return out, unknown
