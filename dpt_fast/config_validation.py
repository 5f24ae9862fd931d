"""The allow-list for model configs read from files: every key, its type and its range.

A model config names a model class and its constructor arguments (`model.config`, as
`dpt_fast.save_model` writes it to config.json and `dpt_fast.train` records it in checkpoint.pt).
Such a file may come from anyone, and its values reach timm's `create_model` and the constructors,
so `validate_model_config` checks every value before anything is built:

- only the keys listed in `MODEL_CONFIG_FIELDS` for that `model_class` (an unknown key is refused,
  with the allowed ones named -- a constructor argument such as `path` is not something a file
  may set);
- each value has its type (`True` is not an int, `"1"` is not a number, NaN is not a scale) and lies
  in a range (widths, depths and class counts with upper bounds far above any released model, so a
  config cannot ask for terabytes);
- `backbone` is a released DPT name or a timm Vision Transformer listed by `timm.list_models`
  (never a `hf-hub:` reference or a pretrained tag, which would make timm download);
- `vit_kwargs` (the ViT dimensions of a converted Hugging Face model) may hold only the keys of
  `VIT_KWARGS`: architecture sizes and dropout rates. timm also accepts loading arguments
  (`checkpoint_path`, `pretrained_cfg`, `pretrained_cfg_overlay`, `cache_dir`, ...) that read other
  files; none of them is listed. `DPTBackbone` and `DepthAnythingModel` apply the same list to every
  model they build, whoever calls them.

Keys not validated here cannot reach a model: the validator returns a new dict with only the listed
keys. `dpt_fast.weights` validates every config it reads, and `dpt_fast.models.build_model` (which
rebuilds a model from a recorded config, e.g. a training checkpoint's) validates what it is given.
Code that adds a model class registers its fields with `register_model_config`.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

from . import specs

__all__ = ["ConfigError", "validate_model_config", "validate_vit_kwargs", "register_model_config",
           "MODEL_CONFIG_FIELDS", "VIT_KWARGS", "MAX_WIDTH", "MAX_DEPTH", "MAX_HEADS", "MAX_CLASSES",
           "MAX_IMAGE_SIZE"]

# Upper bounds: several times the largest ViT in timm (ViT-22B: width 6144, 48 blocks, 48 heads).
MAX_WIDTH = 8192        # channels of any layer (embed_dim, Reassemble and fusion widths)
MAX_DEPTH = 128         # transformer blocks
MAX_HEADS = 256         # attention heads
MAX_MLP_RATIO = 16.0    # MLP hidden width / embed_dim
MAX_IMAGE_SIZE = 8192   # the ViT's position-embedding grid, in pixels
MAX_CLASSES = 65536     # segmentation classes
MAX_NAME_LENGTH = 200   # a backbone name


class ConfigError(ValueError):
    """A model config value that is not allowed; the message names the key and what is allowed."""


Validator = Callable[[str, Any], Any]


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def integer(lo: int, hi: int) -> Validator:
    def check(name, value):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {_type_name(value)} {value!r}")
        if not lo <= value <= hi:
            raise ConfigError(f"{name}={value} is out of range: it must lie in [{lo}, {hi}]")
        return value
    return check


def number(lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False) -> Validator:
    """A finite int or float in [lo, hi] (or (lo, hi] with lo_open)."""
    def check(name, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {_type_name(value)} {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{name}={value!r}: must be a finite number")
        if value < lo or value > hi or (lo_open and value == lo):
            left = "(" if lo_open else "["
            raise ConfigError(f"{name}={value!r} is out of range: it must lie in {left}{lo}, {hi}]")
        return value
    return check


def boolean(name, value):
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {_type_name(value)} {value!r}")
    return value


def choice(*allowed) -> Validator:
    def check(name, value):
        if not isinstance(value, str) or value not in allowed:
            raise ConfigError(f"{name}={value!r}: must be one of {list(allowed)}")
        return value
    return check


def optional(inner: Validator) -> Validator:
    def check(name, value):
        return None if value is None else inner(name, value)
    return check


def int_list(length: int, item: Validator, *, distinct: bool = False, what: str = "integers") -> Validator:
    """A list of `length` values, each checked by `item` (`what` names them in the error)."""
    def check(name, value):
        if not isinstance(value, (list, tuple)) or len(value) != length:
            raise ConfigError(f"{name} must be a list of {length} {what}, got {_type_name(value)} {value!r}")
        out = [item(f"{name}[{i}]", v) for i, v in enumerate(value)]
        if distinct and len(set(out)) != len(out):
            raise ConfigError(f"{name}={out}: the entries must be distinct")
        return out
    return check


def one_of(*validators: Validator, what: str) -> Validator:
    """The first validator that accepts the value; else an error saying `what` was expected."""
    def check(name, value):
        for validator in validators:
            try:
                return validator(name, value)
            except ConfigError:
                pass
        raise ConfigError(f"{name} must be {what}, got {_type_name(value)} {value!r}")
    return check


width = integer(1, MAX_WIDTH)


# timm modules whose models are the VisionTransformer that dpt_fast.models.DPTBackbone drives.
_VIT_MODULES = ("vision_transformer", "vision_transformer_hybrid")


@functools.lru_cache(maxsize=1)
def _timm_vit_names() -> frozenset:
    import timm  # late: importing timm is slow and most validations never need it
    return frozenset(timm.list_models(module=list(_VIT_MODULES)))


def check_backbone_name(backbone: str) -> None:
    """Raise a ValueError unless `backbone` is a DPT backbone of dpt_fast.specs or a timm Vision
    Transformer registered under exactly this name (no `hf-hub:` reference or pretrained tag: timm would
    fetch it)."""
    if specs.dpt_backbone(backbone) is not None:
        return
    if not isinstance(backbone, str) or backbone not in _timm_vit_names():
        raise ValueError(f"unknown backbone {backbone!r}: use {sorted(specs.dpt_backbones())} or the name of a "
                         f"timm Vision Transformer (timm.list_models(module={list(_VIT_MODULES)}))")


def backbone_name(name, value):
    if not isinstance(value, str) or not value or len(value) > MAX_NAME_LENGTH:
        raise ConfigError(f"{name} must be a backbone name, got {_type_name(value)} {value!r}")
    try:
        check_backbone_name(value)
    except ValueError as e:
        raise ConfigError(f"{name}: {e}") from None
    return value


# timm VisionTransformer arguments a config may set: sizes of the architecture and training-only
# dropout rates. Nothing that names a file, a URL or a pretrained configuration.
VIT_KWARGS: dict[str, Validator] = {
    "embed_dim": width,
    "depth": integer(1, MAX_DEPTH),
    "num_heads": integer(1, MAX_HEADS),
    "mlp_ratio": number(0.0, MAX_MLP_RATIO, lo_open=True),
    "patch_size": integer(1, 64),
    "img_size": one_of(integer(16, MAX_IMAGE_SIZE), int_list(2, integer(16, MAX_IMAGE_SIZE)),
                       what=f"an integer or a list of two integers in [16, {MAX_IMAGE_SIZE}]"),
    "qkv_bias": boolean,
    "drop_rate": number(0.0, 1.0),
    "attn_drop_rate": number(0.0, 1.0),
    "proj_drop_rate": number(0.0, 1.0),
    "drop_path_rate": number(0.0, 1.0),
}


def _check_keys(name: str, data: dict, allowed) -> None:
    for key in data:
        if key not in allowed:
            raise ConfigError(f"{name}: key {key!r} is not allowed (allowed: {', '.join(sorted(allowed))})")


def validate_vit_kwargs(value, name: str = "vit_kwargs") -> dict:
    """`value` as a dict of allowed timm VisionTransformer arguments (see `VIT_KWARGS`), or a ConfigError."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must be an object of ViT dimensions, got {_type_name(value)} {value!r}")
    _check_keys(name, value, VIT_KWARGS)
    out = {key: VIT_KWARGS[key](f"{name}.{key}", v) for key, v in value.items()}
    if "embed_dim" in out and "num_heads" in out and out["embed_dim"] % out["num_heads"]:
        raise ConfigError(f"{name}: embed_dim={out['embed_dim']} is not a multiple of num_heads={out['num_heads']}")
    return out


def _vit_kwargs_field(name, value):
    return validate_vit_kwargs(value, name)


_DPT_FIELDS: dict[str, Validator] = {
    "backbone": backbone_name,
    "readout": choice("ignore", "add", "project"),
    "features": one_of(width, int_list(4, width), what=f"an integer or a list of four integers in [1, {MAX_WIDTH}]"),
    "fusion_features": optional(width),
    "use_bn": boolean,
    "hooks": optional(int_list(4, integer(0, MAX_DEPTH - 1), distinct=True)),
    "layer_norm_eps": optional(number(0.0, 1.0, lo_open=True)),
    "vit_kwargs": _vit_kwargs_field,
    "channels_last": boolean,
}

def depth_anything_arch(name, value):
    spec = specs.ARCHITECTURES.get(value) if isinstance(value, str) else None
    if spec is None or spec.family != "depth_anything":
        known = [n for n, s in specs.ARCHITECTURES.items() if s.family == "depth_anything"]
        raise ConfigError(f"{name}={value!r}: must be a Depth Anything architecture ({', '.join(known)})")
    return value


_DEPTH_ANYTHING_FIELDS: dict[str, Validator] = {
    "arch": depth_anything_arch,
    "taps": optional(int_list(4, integer(0, MAX_DEPTH - 1))),
    "features": optional(width),
    "out_channels": optional(int_list(4, width)),
    "use_clstoken": boolean,
    "metric": optional(boolean),
    "max_depth": optional(number(0.0, 1e6, lo_open=True)),
    "head_hidden": optional(width),
    "pos_embed_rule": optional(choice("bicubic_offset", "bicubic_size")),
    "layer_norm_eps": optional(number(0.0, 1.0, lo_open=True)),
    "vit_kwargs": _vit_kwargs_field,
    "channels_last": boolean,
}

# model_class -> {key: validator}: every key a config of that class may hold.
MODEL_CONFIG_FIELDS: dict[str, dict[str, Validator]] = {
    "DPTDepthModel": {**_DPT_FIELDS, "non_negative": boolean, "scale": number(), "shift": number(),
                      "invert": boolean},
    "DPTSegmentationModel": {**_DPT_FIELDS, "num_classes": integer(1, MAX_CLASSES)},
    "DepthAnythingModel": _DEPTH_ANYTHING_FIELDS,
}
# model_class -> keys a config of that class must hold (the constructor has no default for them).
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {"DPTSegmentationModel": ("num_classes",)}


def register_model_config(model_class: str, fields: dict[str, Validator], required=()) -> None:
    """Allow configs of another model class: `fields` maps each allowed key to a validator
    (a function (name, value) -> value that raises ConfigError)."""
    MODEL_CONFIG_FIELDS[model_class] = dict(fields)
    REQUIRED_FIELDS[model_class] = tuple(required)


def validate_model_config(config) -> dict:
    """A model config read from a file, checked against the allow-list; returns a new dict holding
    exactly the validated keys. Raises ConfigError naming the first key that is not allowed."""
    if not isinstance(config, dict):
        raise ConfigError(f"the model config must be an object, got {_type_name(config)}")
    model_class = config.get("model_class")
    if not isinstance(model_class, str) or model_class not in MODEL_CONFIG_FIELDS:
        raise ConfigError(f"model_class={model_class!r}: must be one of {sorted(MODEL_CONFIG_FIELDS)}")
    fields = MODEL_CONFIG_FIELDS[model_class]
    _check_keys("config", {k: v for k, v in config.items() if k != "model_class"}, fields)
    missing = [key for key in REQUIRED_FIELDS.get(model_class, ()) if key not in config]
    if missing:
        raise ConfigError(f"a {model_class} config needs {', '.join(missing)}")
    out = {"model_class": model_class}
    for key, value in config.items():
        if key != "model_class":
            out[key] = fields[key](key, value)
    if out.get("backbone") is not None and out.get("hooks") is None:
        if specs.dpt_backbone(out["backbone"]) is None:
            raise ConfigError(f"backbone {out['backbone']!r} is not a released DPT backbone, so the config must "
                              "give its hooks (four block indices)")
    depth = out.get("vit_kwargs", {}).get("depth")
    if depth is not None and out.get("hooks") is not None and max(out["hooks"]) >= depth:
        raise ConfigError(f"hooks={out['hooks']} reach past vit_kwargs.depth={depth}")
    return out
