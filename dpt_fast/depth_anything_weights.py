"""Reading Depth Anything weights: the original release's files and transformers' folders.

- **original** -- a `.pth`/`.pt` (or `.safetensors`) holding the release's state dict: `pretrained.*`
  (the DINOv2 ViT) and `depth_head.*`. Read with `torch.load(weights_only=True)` (or safetensors),
  never unpickling objects. The architecture comes from the keys and shapes (width, depth, Reassemble
  and fusion widths, readout projections). What the keys cannot tell:
  * V1 or V2 (same keys, different taps) -> the file name (`depth_anything_v2_*` is V2,
    `depth_anything_vit{s,b,l}14*` is V1), else `version=` (1 or 2), else V2 with a warning;
  * relative or metric (ReLU and sigmoid have no parameters) -> the file name (`..._metric_hypersim_...`:
    max_depth 20, `..._metric_vkitti_...`: 80), or `max_depth=` (which makes the model metric);
  * the taps of an encoder that is none of the released sizes -> `taps=` (four 0-based block indices).
  Those models resize position embeddings with the original rule ("bicubic_offset").
- **huggingface** -- a `save_pretrained` folder of `DepthAnythingForDepthEstimation` (config.json with
  "model_type": "depth_anything" and model.safetensors / pytorch_model.bin). Every config field read is
  checked for type and range. Its weights are renamed to the original layout, and the model keeps
  transformers' position-embedding rule ("bicubic_size"), so it reproduces transformers' numbers.

Any other keyword given to `load_model` is a DepthAnythingModel argument that overrides the inferred one.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from . import specs
from .hf_convert import ConfigFields
from .checkpoints import (CONFIG_NAME, CheckpointError, fit_state_dict, load_safetensors, read_hf_state_dict,
                          read_json, torch_load_weights_only, unwrap_state_dict)

__all__ = ["recognizes", "load", "infer_config", "hf_config_to_model_config", "hf_state_dict_to_original"]

HF_MODEL_TYPE = "depth_anything"
ORIGINAL_PREFIXES = ("pretrained.", "depth_head.")


# ------------------------------------------------------------------------------------- detection

def _is_training_checkpoint(obj) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("format"), str) and obj["format"].startswith("dpt_fast.")


def _has_original_keys(keys) -> bool:
    keys = list(keys)
    return any(k.startswith("depth_head.") for k in keys) and any(k.startswith("pretrained.") for k in keys)


def _peek_file(path: Path):
    """The state dict of a checkpoint file if it reads safely and cheaply (memory-mapped), else None."""
    try:
        if path.suffix == ".safetensors":  # the key names alone, no tensor read
            from safetensors import safe_open
            with safe_open(str(path), framework="pt") as f:
                return {key: torch.empty(0) for key in f.keys()}
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not ours to judge: the DPT reader gives the error for unreadable files
        return None
    if _is_training_checkpoint(obj):
        return None  # dpt_fast's training checkpoints record their model config: the general reader
    try:
        return unwrap_state_dict(obj)
    except CheckpointError:
        return None


def _folder_of(p: Path) -> Path:
    """A transformers folder's config.json or weights file stands for the folder."""
    if p.is_file() and (p.name == CONFIG_NAME or (p.suffix in (".safetensors", ".bin")
                                                  and _is_hf_folder(p.parent))):
        return p.parent
    return p


def _is_hf_folder(p: Path) -> bool:
    cfg_path = p / CONFIG_NAME
    if not cfg_path.is_file():
        return False
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(cfg, dict) and cfg.get("model_type") == HF_MODEL_TYPE


def recognizes(path) -> bool:
    """True when `path` is a Depth Anything checkpoint this module reads: a transformers folder (or a
    file in it) with "model_type": "depth_anything", or a file with `pretrained.*` + `depth_head.*` keys."""
    p = _folder_of(Path(os.fspath(path)).expanduser())
    if p.is_dir():
        return _is_hf_folder(p)
    if not p.is_file():
        return False
    state = _peek_file(p)
    return state is not None and (_has_original_keys(state) or _is_video_release(state))


def _is_video_release(keys) -> bool:
    """Video Depth Anything's release layout: `pretrained.*` and the decoder `head.*` with motion modules."""
    keys = list(keys)
    return any(k.startswith("head.motion_modules.") for k in keys) and any(k.startswith("pretrained.") for k in keys)


# ------------------------------------------------------------------------------ original layout

# Only SwiGLU (giant) blocks are named differently by timm: DINOv2's packed w12/w3 are timm's fc1/fc2.
_ORIGINAL_TO_TIMM = ((".mlp.w12.", ".mlp.fc1."), (".mlp.w3.", ".mlp.fc2."))


def original_state_dict_to_model(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        for old, new in _ORIGINAL_TO_TIMM:
            if key.startswith("pretrained.blocks.") and old in key:
                key = key.replace(old, new)
        out[key] = value
    return out


def _count(keys, prefix: str) -> int:
    found = {k[len(prefix):].split(".", 1)[0] for k in keys if k.startswith(prefix)}
    return len([f for f in found if f.isdigit()])


def _shape(state: dict, key: str, source) -> tuple:
    if key not in state:
        raise CheckpointError(f"{source}: not a complete Depth Anything checkpoint: no {key!r}")
    return tuple(state[key].shape)


def _file_version(name: str) -> int | None:
    name = name.lower()
    if "depth_anything_v2" in name or "depth-anything-v2" in name:
        return 2
    if re.search(r"depth_anything_vit[sblg]14", name):
        return 1
    return None


def _file_max_depth(name: str) -> float | None:
    name = name.lower()
    for dataset, max_depth in specs.METRIC_DATASETS.items():
        if "metric" in name and dataset in name:
            return max_depth
    return None


def _dinov2_size(dim: int, depth: int) -> str | None:
    """The released DINOv2 size (small, base, large, giant) with this width and depth, or None."""
    return next((s for s, (_, d, n, *_rest) in specs.DINOV2_ENCODERS.items() if (d, n) == (dim, depth)), None)


def _dinov2_kwargs(state: dict, dim: int, depth: int) -> dict:
    """timm ViT arguments of a DINOv2 encoder of none of the released sizes, from its weights."""
    # DINOv2 heads are 64 wide at every size
    vit_kwargs = {"embed_dim": dim, "depth": depth, "num_heads": max(1, dim // 64)}
    hidden = state.get("pretrained.blocks.0.mlp.fc1.weight")
    if hidden is not None and hidden.shape[0] != 4 * dim:
        vit_kwargs["mlp_ratio"] = hidden.shape[0] / dim
    return vit_kwargs


def _checked_taps(taps, source) -> list[int]:
    if (not isinstance(taps, (list, tuple)) or len(taps) != 4
            or not all(isinstance(t, int) and not isinstance(t, bool) for t in taps)):
        raise CheckpointError(f"{source}: taps must be four block indices (ints), got {taps!r}")
    return list(taps)


def infer_config(state: dict, filename: str | None = None, overrides: dict | None = None, source=None) -> dict:
    """The DepthAnythingModel config (for dpt_fast.build_model) of an original-layout state dict."""
    overrides = dict(overrides or {})
    source = source or filename or "state dict"
    keys = list(state)
    if not _has_original_keys(keys):
        raise CheckpointError(f"{source} is not a Depth Anything checkpoint in the original layout (no "
                              f"pretrained.* and depth_head.* keys; first keys: {keys[:5]})")
    name = Path(filename).name if filename else ""
    dim, _, patch, _ = _shape(state, "pretrained.patch_embed.proj.weight", source)
    depth = _count(keys, "pretrained.blocks.")
    positions = _shape(state, "pretrained.pos_embed", source)[1] - 1
    side = round(positions ** 0.5)
    if side * side != positions:
        raise CheckpointError(f"{source}: {positions} patch position embeddings are not a square grid")

    version = overrides.pop("version", None)
    if version is None:
        version = _file_version(name)
    if version is None:
        version = 2
        if "taps" not in overrides and "arch" not in overrides:
            warnings.warn(f"{source}: the file name does not tell Depth Anything V1 from V2 (same keys, "
                          "different taps): assuming V2; pass version=1 to load_model for a V1 model",
                          stacklevel=4)
    if version not in (1, 2):
        raise CheckpointError(f"{source}: version must be 1 or 2, got {version!r}")

    max_depth = overrides.pop("max_depth", None)
    if max_depth is None:
        max_depth = _file_max_depth(name)
    metric = overrides.pop("metric", max_depth is not None)
    if metric and max_depth is None:
        raise CheckpointError(f"{source}: a metric model needs max_depth= (20 for Hypersim, 80 for Virtual KITTI)")

    size = _dinov2_size(dim, depth)
    arch = overrides.pop("arch", None)
    vit_kwargs = overrides.pop("vit_kwargs", None)
    if arch is None:
        if size is None or (version == 1 and size == "giant"):
            arch = "da2-small"  # any Depth Anything entry: the encoder comes from vit_kwargs below
            if vit_kwargs is None:
                vit_kwargs = _dinov2_kwargs(state, dim, depth)
            if "taps" not in overrides:
                raise CheckpointError(
                    f"{source}: a DINOv2 encoder with width {dim} and {depth} blocks is none of the released "
                    "sizes (small, base, large, giant), so its taps cannot be inferred: pass taps=[four 0-based "
                    "block indices] to load_model")
        else:
            arch = specs.depth_anything(version, size).name
    spec = specs.get(arch)
    config = {"model_class": "DepthAnythingModel", "arch": arch,
              "taps": _checked_taps(overrides.pop("taps", list(spec.taps)), source),
              "features": _shape(state, "depth_head.scratch.layer1_rn.weight", source)[0],
              "out_channels": [_shape(state, f"depth_head.projects.{i}.weight", source)[0] for i in range(4)],
              "use_clstoken": "depth_head.readout_projects.0.0.weight" in state,
              "metric": bool(metric), "max_depth": float(max_depth) if max_depth is not None else None,
              "head_hidden": _shape(state, "depth_head.scratch.output_conv2.0.weight", source)[0],
              "pos_embed_rule": "bicubic_offset"}
    extra = {}
    if patch != 14:
        extra["patch_size"] = patch
    if side * patch != 518:
        extra["img_size"] = side * patch
    vit_kwargs = {**(vit_kwargs or {}), **extra}
    if vit_kwargs:
        config["vit_kwargs"] = vit_kwargs
    config.update(overrides)
    return config


# ------------------------------------------------------------------------------ transformers layout

# An upper bound for the widths and sizes of a config.json: far above any DINOv2, it only keeps a file from
# asking for terabytes.
_LARGE = 1 << 20


class _DINOv2(NamedTuple):
    """The DINOv2 encoder that a backbone_config describes; `stages` are its tapped layers, 1-based."""
    dim: int
    depth: int
    heads: int
    mlp_ratio: float
    eps: float
    image_size: int
    patch: int
    swiglu: bool
    stages: list[int]


def _tapped_stages(bb: ConfigFields, depth: int, where: str) -> list[int]:
    """The four layers (1-based) that backbone_config taps: out_indices, else out_features ("stageN")."""
    if "out_indices" in bb.cfg:
        return bb.ints("out_indices", None, 4, 1, depth)
    names = bb.cfg.get("out_features")
    if (not isinstance(names, list) or len(names) != 4
            or not all(isinstance(n, str) and re.fullmatch(r"stage\d+", n) for n in names)):
        raise CheckpointError(f"{where}: backbone_config needs out_indices (four stages), got {names!r}")
    stages = [int(n[5:]) for n in names]
    if not all(1 <= s <= depth for s in stages):
        raise CheckpointError(f"{where}: out_features {names} reach past the {depth} layers")
    return stages


def _dinov2_encoder(backbone_cfg: dict, where: str) -> _DINOv2:
    """backbone_config, checked to be a DINOv2 that Depth Anything's timm ViT computes exactly."""
    bb = ConfigFields(backbone_cfg, f"{where}: backbone_config.", CheckpointError)
    bb.choice("model_type", None, ("dinov2",))
    dim = bb.int("hidden_size", 768, 1, _LARGE)
    depth = bb.int("num_hidden_layers", 12, 1, 256)
    heads = bb.int("num_attention_heads", 12, 1, dim)
    if dim % heads:
        raise CheckpointError(f"{where}: hidden_size {dim} is not a multiple of num_attention_heads {heads}")
    mlp_ratio = float(bb.number("mlp_ratio", 4, 0.0, 1e9, lo_open=True))
    eps = float(bb.number("layer_norm_eps", 1e-6, 0.0, 1.0, lo_open=True))
    image_size = bb.square("image_size", 224, 1, 8192)
    patch = bb.square("patch_size", 14, 1, 8192)
    if image_size % patch:
        raise CheckpointError(f"{where}: backbone image_size {image_size} is not a multiple of patch_size {patch}")
    bb.choice("hidden_act", "gelu", ("gelu",))
    if not bb.bool("qkv_bias", True):
        raise CheckpointError(f"{where}: qkv_bias false is not supported (DINOv2 has qkv biases)")
    swiglu = bb.bool("use_swiglu_ffn", False)
    if not bb.bool("apply_layernorm", True):
        raise CheckpointError(f"{where}: apply_layernorm false is not supported (Depth Anything norms its taps)")
    if bb.int("num_register_tokens", 0, 0, _LARGE) != 0:
        raise CheckpointError(f"{where}: register tokens are not supported")
    stages = _tapped_stages(bb, depth, where)
    return _DINOv2(dim, depth, heads, mlp_ratio, eps, image_size, patch, swiglu, stages)


def _entry_and_vit_kwargs(encoder: _DINOv2, taps: list[int], where: str) -> tuple[str, dict]:
    """The Depth Anything entry of dpt_fast.specs for this encoder and taps, and the timm ViT arguments in
    which the encoder differs from the entry's. V1 and V2 differ in their taps only; an encoder of none of
    the released sizes gets any entry, its dimensions all in the arguments."""
    size = _dinov2_size(encoder.dim, encoder.depth)
    arch = "da2-small"
    if size is not None:
        arch = specs.depth_anything(2, size).name
        if size != "giant" and taps == list(specs.depth_anything(1, size).taps):
            arch = specs.depth_anything(1, size).name
    vit_kwargs = {}
    if size is None:
        vit_kwargs.update(embed_dim=encoder.dim, depth=encoder.depth, num_heads=encoder.heads)
    spec = specs.get(arch)
    if encoder.heads != spec.num_heads and size is not None:
        vit_kwargs["num_heads"] = encoder.heads
    if encoder.mlp_ratio != 4.0 and not encoder.swiglu:
        vit_kwargs["mlp_ratio"] = encoder.mlp_ratio
    if encoder.swiglu != (size == "giant"):
        raise CheckpointError(f"{where}: use_swiglu_ffn={encoder.swiglu} with hidden_size {encoder.dim}: SwiGLU "
                              "is supported for the giant encoder only")
    if encoder.image_size != 518:
        vit_kwargs["img_size"] = encoder.image_size
    if encoder.patch != 14:
        vit_kwargs["patch_size"] = encoder.patch
    return arch, vit_kwargs


def hf_config_to_model_config(cfg: dict, where: str = CONFIG_NAME) -> dict:
    """transformers' DepthAnythingConfig (a config.json dict) -> a DepthAnythingModel config."""
    top = ConfigFields(cfg, f"{where}: ", CheckpointError)
    backbone_cfg = cfg.get("backbone_config")
    if not isinstance(backbone_cfg, dict):
        raise CheckpointError(f"{where}: no backbone_config object (a Depth Anything config names its DINOv2 "
                              "encoder there; timm or named backbones are not supported)")
    if cfg.get("backbone") not in (None, ""):
        raise CheckpointError(f"{where}: backbone={cfg['backbone']!r}: only backbone_config (DINOv2) is supported")
    encoder = _dinov2_encoder(backbone_cfg, where)
    dim, patch = encoder.dim, encoder.patch

    if top.int("patch_size", patch, 1, _LARGE) != patch:
        raise CheckpointError(f"{where}: patch_size {cfg['patch_size']} differs from the backbone's {patch}")
    if top.int("reassemble_hidden_size", 384, 1, _LARGE) != dim:
        raise CheckpointError(f"{where}: reassemble_hidden_size {cfg.get('reassemble_hidden_size', 384)} "
                              f"differs from the backbone's hidden_size {dim}")
    factors = cfg.get("reassemble_factors", [4, 2, 1, 0.5])
    if not isinstance(factors, list) or factors != [4, 2, 1, 0.5]:
        raise CheckpointError(f"{where}: reassemble_factors must be [4, 2, 1, 0.5], got {factors!r}")
    widths = top.ints("neck_hidden_sizes", [48, 96, 192, 384], 4, 1, _LARGE)
    features = top.int("fusion_hidden_size", 64, 1, _LARGE)
    if features % 2:
        raise CheckpointError(f"{where}: fusion_hidden_size must be even, got {features}")
    top.choice("head_in_index", -1, (-1, 3))
    head_hidden = top.int("head_hidden_size", 32, 1, _LARGE)
    kind = top.choice("depth_estimation_type", "relative", ("relative", "metric"))
    max_depth = 1.0 if cfg.get("max_depth") is None else float(top.number("max_depth", None, 0.0, 1e9, lo_open=True))

    taps = [s - 1 for s in encoder.stages]
    arch, vit_kwargs = _entry_and_vit_kwargs(encoder, taps, where)
    config = {"model_class": "DepthAnythingModel", "arch": arch, "taps": taps,
              "features": features, "out_channels": widths, "use_clstoken": False, "metric": kind == "metric",
              "max_depth": max_depth, "head_hidden": head_hidden, "pos_embed_rule": "bicubic_size",
              "layer_norm_eps": encoder.eps}
    if vit_kwargs:
        config["vit_kwargs"] = vit_kwargs
    return config


_HF_BLOCK = (  # transformers' Dinov2Layer names -> the original's block names (q/k/v handled apart)
    ("norm1.", "norm1."), ("norm2.", "norm2."), ("attention.output.dense.", "attn.proj."),
    ("attention.o_proj.", "attn.proj."),
    ("layer_scale1.lambda1", "ls1.gamma"), ("layer_scale2.lambda1", "ls2.gamma"),
    ("mlp.fc1.", "mlp.fc1."), ("mlp.fc2.", "mlp.fc2."),
    ("mlp.weights_in.", "mlp.w12."), ("mlp.weights_out.", "mlp.w3."), ("mlp.down_proj.", "mlp.w3."),
)
_HF_TOP = (
    ("backbone.embeddings.cls_token", "pretrained.cls_token"),
    ("backbone.embeddings.mask_token", "pretrained.mask_token"),
    ("backbone.embeddings.position_embeddings", "pretrained.pos_embed"),
    ("backbone.embeddings.patch_embeddings.projection.", "pretrained.patch_embed.proj."),
    ("backbone.layernorm.", "pretrained.norm."),
    ("head.conv1.", "depth_head.scratch.output_conv1."),
    ("head.conv2.", "depth_head.scratch.output_conv2.0."),
    ("head.conv3.", "depth_head.scratch.output_conv2.2."),
)
_HF_FUSION = (("projection.", "out_conv."), ("residual_layer1.convolution1.", "resConfUnit1.conv1."),
              ("residual_layer1.convolution2.", "resConfUnit1.conv2."),
              ("residual_layer2.convolution1.", "resConfUnit2.conv1."),
              ("residual_layer2.convolution2.", "resConfUnit2.conv2."))


def _rename(key: str) -> str | None:
    """One transformers key -> its original-layout name (None: not a key this mapping knows)."""
    for old, new in _HF_TOP:
        if key.startswith(old):
            return new + key[len(old):]
    m = re.fullmatch(r"backbone\.encoder\.layer\.(\d+)\.(.+)", key)
    if m:
        for old, new in _HF_BLOCK:
            if m[2].startswith(old):
                return f"pretrained.blocks.{m[1]}.{new}{m[2][len(old):]}"
        return None
    m = re.fullmatch(r"neck\.reassemble_stage\.layers\.(\d)\.(projection|resize)\.(weight|bias)", key)
    if m:
        return f"depth_head.{'projects' if m[2] == 'projection' else 'resize_layers'}.{m[1]}.{m[3]}"
    m = re.fullmatch(r"neck\.convs\.(\d)\.weight", key)
    if m:
        return f"depth_head.scratch.layer{int(m[1]) + 1}_rn.weight"
    m = re.fullmatch(r"neck\.fusion_stage\.layers\.(\d)\.(.+)", key)
    if m:  # transformers runs its fusion layers from the deepest map: its layer j is refinenet 4 - j
        for old, new in _HF_FUSION:
            if m[2].startswith(old):
                return f"depth_head.scratch.refinenet{4 - int(m[1])}.{new}{m[2][len(old):]}"
    return None


def hf_state_dict_to_original(state: dict) -> tuple[dict, list[str]]:
    """transformers' DepthAnythingForDepthEstimation state dict -> (original-layout state dict, the keys
    no rule maps). Split query/key/value are packed into qkv; split SwiGLU gate/up into w12."""
    out, unknown, parts = {}, [], {}
    for key, value in state.items():
        m = re.fullmatch(r"backbone\.encoder\.layer\.(\d+)\.(attention\.attention\.(query|key|value)|"
                         r"attention\.(q|k|v)_proj|mlp\.(gate_proj|up_proj))\.(weight|bias)", key)
        if m:  # saved files name q/k/v query/key/value; transformers 5 modules name them q/k/v_proj
            piece = m[3] or {"q": "query", "k": "key", "v": "value"}.get(m[4]) or m[5]
            packed = "mlp.w12" if m[5] else "attn.qkv"
            parts.setdefault((m[1], packed, m[6]), {})[piece] = value
            continue
        new = _rename(key)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    for (block, packed, kind), pieces in parts.items():
        order = ("query", "key", "value") if packed == "attn.qkv" else ("gate_proj", "up_proj")
        missing = [p for p in order if p not in pieces]
        if missing:
            raise CheckpointError(f"layer {block}: {packed} pieces {missing} are missing")
        out[f"pretrained.blocks.{block}.{packed}.{kind}"] = torch.cat([pieces[p] for p in order], dim=0)
    return out, unknown


# ---------------------------------------------------------------------------------------- loading

def _read(path, overrides: dict) -> tuple[Path, dict, dict]:
    """(resolved path, model config, state dict in the model's layout)."""
    p = _folder_of(Path(os.fspath(path)).expanduser())
    if p.is_dir():
        cfg = read_json(p / CONFIG_NAME)
        config = {**hf_config_to_model_config(cfg, str(p / CONFIG_NAME))}
        for key in ("version", "arch"):
            if key in overrides:
                raise CheckpointError(f"{p}: {key}= does not apply to a transformers folder (its config.json "
                                      "describes the model)")
        config.update(overrides)
        raw = read_hf_state_dict(p)
        state, unknown = hf_state_dict_to_original(raw)
        for key in unknown:  # reported as unexpected keys, under their transformers names
            state[key] = raw[key]
        return p, config, original_state_dict_to_model(state)
    obj = load_safetensors(p) if p.suffix == ".safetensors" else torch_load_weights_only(p)
    state = unwrap_state_dict(obj, p)
    config = infer_config(state, filename=p.name, overrides=overrides, source=p)
    return p, config, original_state_dict_to_model(state)


def load(path, device=None, dtype=None, **overrides) -> nn.Module:
    """A DepthAnythingModel in eval mode from an original release file or a transformers folder (see the
    module docstring). `overrides`: DepthAnythingModel arguments (and `version=` for original files).
    Video Depth Anything release files (`video_depth_anything_vits.pth`, ...) load as
    dpt_fast.models.video_depth_anything.load_video_depth_anything does."""
    from .models import build_model
    p = Path(os.fspath(path)).expanduser()
    if p.is_file() and not _folder_of(p).is_dir() and _is_video_release(_peek_file(p) or {}):
        from .models.video_depth_anything import load_video_depth_anything
        return load_video_depth_anything(p, device=device, dtype=dtype, **overrides)
    root, config, state = _read(path, overrides)
    try:
        with torch.device("meta"):
            model = build_model(config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{root}: cannot build DepthAnythingModel from {config}: {e}") from None
    fmt = "Depth Anything original-release" if root.is_file() else "Depth Anything transformers"
    state = fit_state_dict(model, state, fmt=fmt, source=root, config=config, fill_keys=("pretrained.mask_token",))
    model.to_empty(device=device if device is not None else "cpu")
    model.load_state_dict(state, strict=True)
    if dtype is not None:
        model.to(dtype)
    return model.eval()
