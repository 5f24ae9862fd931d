"""Reading checkpoints: which format a path holds, its state dict in the original release's layout,
and the model config it describes -- everything short of building a model.

This module sits below the models (it imports dpt_fast.specs, the converters and torch, never
dpt_fast.models), so a model's `path=` argument loads through it without an import running back up;
dpt_fast.weights builds models on top of it (`load_model`, `save_model`). The formats and the safety
rules for files from strangers are described in dpt_fast.weights.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from . import hf_convert, specs
from .config_validation import ConfigError, validate_model_config
from .hf_convert import HFConversionError

__all__ = ["detect_format", "read_state_dict", "unwrap_state_dict", "infer_original_config",
           "released_file_settings", "load_state_dict_into", "fit_state_dict", "read_checkpoint",
           "describe_config", "CheckpointError", "RELEASED_FILES", "FORMAT", "FORMAT_VERSION", "CONFIG_NAME",
           "WEIGHTS_NAME", "read_json", "load_safetensors", "torch_load_weights_only", "read_hf_state_dict",
           "confined_file"]

FORMAT = "dpt_fast"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

FORMAT_LABELS = {"original": "original-release state dict", "huggingface": "Hugging Face DPT",
                 FORMAT: "dpt_fast"}

# The released checkpoints (ARCHITECTURE.md §3) and what their names tell beyond the keys.
RELEASED_FILES = {
    "dpt_large-midas-2f21e586.pt": {},
    "dpt_hybrid-midas-501f0c75.pt": {},
    "dpt_large-ade20k-b12dca68.pt": {},
    "dpt_hybrid-ade20k-53898607.pt": {},
    "dpt_hybrid_kitti-cb926ef4.pt": {"scale": 0.00006016, "shift": 0.00579, "invert": True},
    "dpt_hybrid_nyu-2ce69ec7.pt": {"scale": 0.000305, "shift": 0.1378, "invert": True},
}



def _known_backbone(embed: int, depth: int, patch: int, tokens: int, hybrid: bool, resnet_depths=()):
    """The DPT backbone name (dpt_fast.specs) whose encoder has these dimensions, or None. A hybrid's
    `patch` is that of its 1x1 projection over the ResNet map: its ResNet stages tell it instead."""
    for name, arch in specs.dpt_backbones().items():
        if arch.hybrid != hybrid or (arch.embed_dim, arch.depth, arch.position_tokens) != (embed, depth, tokens):
            continue
        if (tuple(arch.hybrid_resnet_depths) == tuple(resnet_depths)) if hybrid else arch.patch_size == patch:
            return name
    return None


def released_file_settings(filename) -> dict:
    """What a released file's name tells beyond its keys (KITTI/NYU: scale, shift, invert). Matches the
    released name, or the same name without its hash suffix (e.g. dpt_hybrid_kitti.pt)."""
    if not filename:
        return {}
    name = Path(filename).name
    if name in RELEASED_FILES:
        return dict(RELEASED_FILES[name])
    stem = name.split("-")[0].split(".")[0]
    for released, settings in RELEASED_FILES.items():
        if settings and released.split("-")[0] == stem:
            return dict(settings)
    return {}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says why."""


# ------------------------------------------------------------------------------------ detection

def read_json(path: Path) -> dict:
    """The JSON object in the file at `path`, else a CheckpointError naming the file and what is wrong."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read it as JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def detect_format(path) -> tuple[str, Path, dict | None]:
    """(format, resolved path, parsed config.json or None). Format is "original", "huggingface" or
    "dpt_fast": a directory with a config.json carrying dpt_fast's marker or "model_type": "dpt", or a
    file (an original-release checkpoint). A config.json or model.safetensors inside such a directory
    stands for the directory."""
    p = Path(os.fspath(path)).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"no such file or directory: '{p}' (expected an original-release .pt file, a "
                                "Hugging Face DPT directory or a directory written by dpt_fast.save_model)")
    if p.is_file() and (p.name == CONFIG_NAME or (p.suffix == ".safetensors" and (p.parent / CONFIG_NAME).is_file())):
        cfg = read_json(p.parent / CONFIG_NAME)
        if cfg.get("format") == FORMAT or hf_convert.is_hf_dpt_config(cfg):
            p = p.parent
    if p.is_dir():
        cfg_path = p / CONFIG_NAME
        if not cfg_path.is_file():
            raise CheckpointError(f"{p} is a directory without {CONFIG_NAME}: expected a Hugging Face DPT "
                                  "directory or one written by dpt_fast.save_model (or pass the .pt file itself)")
        cfg = read_json(cfg_path)
        if cfg.get("format") == FORMAT:
            return FORMAT, p, cfg
        if hf_convert.is_hf_dpt_config(cfg):
            return "huggingface", p, cfg
        raise CheckpointError(f"{cfg_path} is neither dpt_fast's (\"format\": \"{FORMAT}\") nor a Hugging Face "
                              f"DPT config (\"model_type\": \"dpt\"; this one has model_type="
                              f"{cfg.get('model_type')!r})")
    if not p.is_file():  # a FIFO or a device would block or never end
        raise CheckpointError(f"{p} is not a regular file (expected a checkpoint file or a model directory)")
    return "original", p, None


# ------------------------------------------------------------------------------ reading state dicts

def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def _weights_only_reason(error: BaseException) -> str:
    """The useful line of torch's long weights_only message (e.g. 'Unsupported operand 0')."""
    for line in str(error).splitlines():
        if line.strip().startswith("Unsupported"):
            return line.strip()
    return _first_line(error)


def load_safetensors(path: Path, device="cpu") -> dict:
    """The tensors of a .safetensors file on `device`, else a CheckpointError (corrupt or another format)."""
    from safetensors.torch import load_file
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises SafetensorError / OSError / ValueError
        raise CheckpointError(f"{path} is corrupt or not a safetensors file ({_first_line(e)})") from None


def torch_load_weights_only(path: Path):
    """The object of a PyTorch file, read with torch.load(weights_only=True) onto the CPU (nothing in it
    is executed), else a CheckpointError: refused pickled objects, or a corrupt file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if "Unsupported global" in str(e) or found:
            what = f" ({found[1]})" if found else ""
            raise CheckpointError(
                f"{path}: refused to load: the file holds pickled Python objects{what} other than tensors and "
                "plain containers, and dpt_fast only reads checkpoints with torch.load(weights_only=True) "
                "(unpickling arbitrary objects can run code). Re-save the state dict alone: "
                "torch.save(model.state_dict(), path)") from None
        raise CheckpointError(f"{path} is corrupt or not a PyTorch checkpoint ({_weights_only_reason(e)})") from None
    except Exception as e:  # RuntimeError (bad zip), EOFError (truncated), ValueError, ...
        raise CheckpointError(f"{path} is corrupt or not a PyTorch checkpoint ({_first_line(e)})") from None


def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap_state_dict(obj, source="checkpoint") -> dict:
    """The state dict inside a checkpoint object: unwraps {"model": ...}, {"state_dict": ...}
    (and "model_state_dict"), strips the "module." prefix of DataParallel / DDP and the "_orig_mod."
    prefix of a torch.compile'd model."""
    for _ in range(3):
        if not isinstance(obj, dict) or _is_tensor_dict(obj):
            break
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        else:
            break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{source} does not hold a state dict (got {type(obj).__name__}"
                              f"{' (empty)' if isinstance(obj, dict) else ''})")
    others = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if others:
        raise CheckpointError(f"{source} is not a state dict: entries that are not tensors: {others[:5]} "
                              "(expected a state dict, or one wrapped as {'model': ...} or {'state_dict': ...})")
    for prefix in ("module.", "_orig_mod.", "module."):  # DataParallel/DDP, torch.compile, in either order
        if all(isinstance(k, str) and k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return dict(obj)


def read_state_dict(path) -> dict:
    """An original-format checkpoint file -> its state dict (safe: weights_only / safetensors)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return unwrap_state_dict(load_safetensors(path), path)
    return unwrap_state_dict(torch_load_weights_only(path), path)


def _allowed_roots(root: Path) -> list[Path]:
    """Where the files of the model folder `root` may really lie: in it, and for a snapshot of
    huggingface_hub's cache (<repo>/snapshots/<revision>/, whose files are links to ../../blobs/<hash>)
    in that repository's blobs folder."""
    real = root.resolve()
    roots = [real]
    if real.parent.name == "snapshots":
        roots.append(real.parent.parent / "blobs")
    return roots


def confined_file(root: Path, path: Path, source) -> Path:
    """`path`, once checked to be a regular file that really lies inside the model folder `root`
    (links followed), else a CheckpointError: a folder from a stranger may not make the loader read
    other files of this machine, nor block on a FIFO or a device."""
    try:
        real, allowed_roots = path.resolve(), _allowed_roots(root)
    except (OSError, RuntimeError) as e:  # a link loop
        raise CheckpointError(f"{source}: {path.name} cannot be resolved ({_first_line(e)})") from None
    if not any(real.is_relative_to(allowed) for allowed in allowed_roots):
        raise CheckpointError(f"{source}: {path.name} leads outside the model folder (to {real}); every file "
                              f"of a model folder must lie inside it: copy the file into {root}")
    if not real.is_file():
        raise CheckpointError(f"{source}: {path.name} is missing or not a regular file")
    return path


def _shard_path(root: Path, name, index_path: Path) -> Path:
    """The file a sharded index names: a plain relative name inside the folder (no '..', no absolute
    path, no drive, no backslash), confined like every other file of the folder."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        raise CheckpointError(f"{index_path}: shard name {name!r} is not a file name")
    parts = name.split("/")
    if name.startswith("/") or ":" in parts[0] or any(part in ("", ".", "..") for part in parts):
        raise CheckpointError(f"{index_path} names the shard {name!r}, which is not a plain path inside the "
                              f"model folder {root}: shards must be files inside it")
    path = root.joinpath(*parts)
    if not path.exists() and not path.is_symlink():
        raise CheckpointError(f"{index_path} names the shard {name}, which is missing")
    return confined_file(root, path, index_path)


def read_hf_state_dict(root: Path) -> dict:
    """The raw (HF-keyed) state dict of a Hugging Face model directory, sharded or not."""
    for index_name, loader in (("model.safetensors.index.json", load_safetensors),
                               ("pytorch_model.bin.index.json", torch_load_weights_only)):
        index_path = root / index_name
        if index_path.is_file() or index_path.is_symlink():
            weight_map = read_json(confined_file(root, index_path, root)).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_path}: \"weight_map\" must be an object mapping tensor names "
                                      "to shard files")
            shards = {_shard_path(root, name, index_path) for name in weight_map.values()}
            state = {}
            for shard in sorted(shards):
                part = unwrap_state_dict(loader(shard), shard)
                twice = next((key for key in part if key in state), None)
                if twice is not None:
                    raise CheckpointError(f"{index_path}: the tensor {twice} is in more than one shard")
                state.update(part)
            return state
    for name, loader in (("model.safetensors", load_safetensors), ("pytorch_model.bin", torch_load_weights_only)):
        path = root / name
        if path.exists() or path.is_symlink():
            return unwrap_state_dict(loader(confined_file(root, path, root)), path)
    raise CheckpointError(f"{root}: a Hugging Face DPT config but no weights (model.safetensors, "
                          "pytorch_model.bin or a sharded index)")


# --------------------------------------------------------------------- inferring the original config

def _count_indexed(keys, prefix: str) -> list[int]:
    out = set()
    for k in keys:
        if k.startswith(prefix):
            head = k[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                out.add(int(head))
    return sorted(out)


def _shape(sd: dict, key: str, source) -> tuple:
    if key not in sd:
        raise CheckpointError(f"{source}: not a complete DPT checkpoint in the original layout: no {key!r}")
    return tuple(sd[key].shape)


_VIT = "pretrained.model."  # the timm ViT's keys in the original layout


def _released_backbone(keys: list[str], embed: int, depth: int, patch: int, tokens: int, hybrid: bool,
                       source) -> str:
    """The released DPT backbone whose encoder has these dimensions (a hybrid: and these ResNet stages); an
    encoder of none of them is a CheckpointError that asks for backbone= and hooks=."""
    if hybrid:
        stages = _count_indexed(keys, _VIT + "patch_embed.backbone.stages.")
        blocks = [len(_count_indexed(keys, f"{_VIT}patch_embed.backbone.stages.{s}.blocks.")) for s in stages]
        backbone = _known_backbone(embed, depth, patch, tokens, True, blocks)
        if backbone is None:
            known = {name: (a.embed_dim, a.depth, a.position_tokens, list(a.hybrid_resnet_depths))
                     for name, a in specs.dpt_backbones().items() if a.hybrid}
            raise CheckpointError(
                f"{source}: a ViT-hybrid with embed_dim={embed}, depth={depth}, {tokens} position tokens and ResNet "
                f"stages of {blocks} blocks is not a released DPT hybrid ({known}); pass "
                "backbone='<timm hybrid ViT name>' and hooks=[...] to load_model")
        return backbone
    backbone = _known_backbone(embed, depth, patch, tokens, False)
    if backbone is None:
        raise CheckpointError(
            f"{source}: a ViT with embed_dim={embed}, depth={depth}, patch {patch} and {tokens} position "
            f"tokens is not one of the released DPT backbones ({', '.join(specs.dpt_backbones())}), and the "
            "original format does not record a timm model name or hooks, so they cannot be inferred from the "
            "keys: pass backbone='<timm ViT name>' and hooks=[four block indices] to load_model "
            "(dpt_fast's own format, written by dpt_fast.save_model, records both)")
    return backbone


def infer_original_config(state_dict: dict, filename: str | None = None, overrides: dict | None = None,
                          source=None) -> dict:
    """The model config (for `dpt_fast.build_model`) of an original-layout state dict.

    `overrides` (constructor arguments) win over what is inferred; `backbone` (+ `hooks`) there is
    how a state dict of a non-released timm ViT gets loaded.
    """
    overrides = dict(overrides or {})
    source = source or filename or "state dict"
    keys = list(state_dict)
    if not any(k.startswith("pretrained.") for k in keys) or not any(k.startswith("scratch.") for k in keys):
        if any(k.startswith(("dpt.", "neck.", "head.head.")) for k in keys):
            raise CheckpointError(f"{source} holds Hugging Face DPT keys (dpt.*, neck.*): load the model "
                                  f"directory, whose {CONFIG_NAME} describes the architecture")
        raise CheckpointError(f"{source} is not a DPT checkpoint in the original layout (no pretrained.* and "
                              f"scratch.* keys; first keys: {keys[:5]})")
    sd = state_dict

    # Head: depth (output_conv 0, 2, 4 -> 1 channel) or segmentation (0 conv, 1 BN, 4 conv; auxlayer).
    last = _shape(sd, "scratch.output_conv.4.weight", source)
    segmentation = "scratch.output_conv.1.running_mean" in sd or any(k.startswith("auxlayer.") for k in keys)
    if not segmentation and ("scratch.output_conv.2.weight" not in sd or last[0] != 1):
        raise CheckpointError(f"{source}: scratch.output_conv is neither DPT's depth head (conv 0, 2, 4 -> 1 "
                              f"channel) nor its segmentation head (conv 0, BN 1, conv 4 + auxlayer)")

    # Backbone: the one overrides name, else the released one with the encoder's dimensions (read either way:
    # a state dict without them is not a complete checkpoint).
    hybrid = any(k.startswith(_VIT + "patch_embed.backbone.") for k in keys)
    embed = _shape(sd, _VIT + "patch_embed.proj.weight", source)[0]
    depth = len(_count_indexed(keys, _VIT + "blocks."))
    patch = _shape(sd, _VIT + "patch_embed.proj.weight", source)[-1]
    tokens = _shape(sd, _VIT + "pos_embed", source)[1]
    if "backbone" in overrides:
        backbone = overrides["backbone"]
    else:
        backbone = _released_backbone(keys, embed, depth, patch, tokens, hybrid, source)

    # Widths: Reassemble outputs (inputs of layerN_rn) and the fusion width (their outputs).
    rn = [_shape(sd, f"scratch.layer{i}_rn.weight", source) for i in range(1, 5)]
    fusion = rn[0][0]
    widths = [s[1] for s in rn]
    arch = specs.dpt_backbone(backbone)
    # what features=<int> means: the entry's widths (a hybrid's first two are its ResNet maps'), else
    # the fusion width for every stage of any other timm ViT
    implied_widths = list(arch.stage_widths) if arch is not None else [fusion] * 4
    width_args = {"features": fusion} if widths == implied_widths else {"features": widths,
                                                                        "fusion_features": fusion}

    readout = "project" if any(k.startswith("pretrained.act_postprocess") and ".0.project.0." in k
                               for k in keys) else "ignore"
    if readout == "ignore" and "readout" not in overrides:
        warnings.warn(f"{source}: no readout projection in the checkpoint; readout 'add' and 'ignore' have the "
                      "same (no) parameters and cannot be told apart: assuming 'ignore' (pass readout='add' to "
                      "load_model if the model was trained with it)", stacklevel=3)

    config = {"backbone": backbone, "readout": readout, **width_args,
              "use_bn": "scratch.refinenet1.resConfUnit1.bn1.weight" in sd}
    if segmentation:
        config.update(model_class="DPTSegmentationModel", num_classes=last[0])
    else:
        config.update(model_class="DPTDepthModel", non_negative=True, scale=1.0, shift=0.0, invert=False)
        config.update(released_file_settings(filename))
    config.update(overrides)
    return config


# ------------------------------------------------------------------------- fitting a model's keys

def describe_config(config: dict) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in config.items() if k != "model_class")
    return f"{config.get('model_class', '?')}({args})"


def _validated(config, source) -> dict:
    """A model config read from a file, through the allow-list of dpt_fast.config_validation."""
    try:
        return validate_model_config(config)
    except ConfigError as e:
        raise CheckpointError(f"{source}: refused model config: {e}") from None


def _numel_text(count: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= size:
            return f"{count / size:.3g}{unit}"
    return str(count)


def fit_state_dict(model: nn.Module, state_dict: dict, *, fmt: str, source, config: dict,
         fill_keys=(), fill_prefixes=()) -> dict:
    """Check `state_dict` against the model's keys and shapes; fill the keys a format cannot carry
    (BatchNorm's num_batches_tracked, and `fill_keys`/`fill_prefixes`); raise a CheckpointError that
    names the format, the model and the first missing / unexpected / mismatched keys."""
    own = model.state_dict()
    state = dict(state_dict)
    missing = [k for k in own if k not in state]
    for k in list(missing):
        if k.endswith("num_batches_tracked") or k in fill_keys or any(k.startswith(p) for p in fill_prefixes):
            ref = own[k]
            state[k] = torch.zeros(ref.shape, dtype=ref.dtype) if ref.is_meta else ref.detach().clone()
            missing.remove(k)
    unexpected = [k for k in state if k not in own]
    mismatched = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in own
                  if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) (first: {', '.join(missing[:5])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) (first: {', '.join(unexpected[:5])})")
        if mismatched:
            shown = "; ".join(f"{k}: file {list(a)} vs model {list(b)}" for k, a, b in mismatched[:5])
            parts.append(f"{len(mismatched)} shape mismatch(es) ({shown})")
        model_size = sum(t.numel() for t in own.values())
        file_size = sum(t.numel() for t in state_dict.values())
        raise CheckpointError(f"{source}: the {FORMAT_LABELS.get(fmt, fmt)} checkpoint does not fit the model "
                              f"{describe_config(config)} (the model has {_numel_text(model_size)} values, the "
                              f"file {_numel_text(file_size)}): " + "; ".join(parts))
    return state


def read_checkpoint(path, overrides: dict, infer: bool = True) -> tuple[str, Path, dict | None, dict, dict]:
    """(format, path, model config, state dict in the model's layout, fill rules) of any format.
    With infer=False (loading into a given model) the model config is not worked out: None."""
    fmt, root, meta = detect_format(path)
    fill = {"fill_keys": (), "fill_prefixes": ()}
    if fmt == FORMAT:
        version = meta.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointError(f"{root}: dpt_fast format version {version!r}; this dpt_fast reads up to "
                                  f"{FORMAT_VERSION} (upgrade dpt_fast)")
        config = meta.get("config")
        if not isinstance(config, dict) or "model_class" not in config:
            raise CheckpointError(f"{root / CONFIG_NAME}: no model config (\"config\" with \"model_class\")")
        config = {**_validated(config, root / CONFIG_NAME), **overrides}
        weights = root / WEIGHTS_NAME
        if not weights.exists() and not weights.is_symlink():
            raise CheckpointError(f"{root}: {WEIGHTS_NAME} is missing")
        state = load_safetensors(confined_file(root, weights, root))
    elif fmt == "huggingface":
        try:
            # Check the config before reading weights; the keys decide the head only without 'architectures'.
            raw = None if meta.get("architectures") or not infer else read_hf_state_dict(root)
            if infer:
                model_class = hf_convert.hf_model_class(meta, None if raw is None else raw.keys())
                config = {**_validated(hf_convert.hf_config_to_model_config(meta, model_class),
                                       root / CONFIG_NAME), **overrides}
            else:
                config = None
            raw = read_hf_state_dict(root) if raw is None else raw
            state, unknown = hf_convert.hf_state_dict_to_original(raw)
        except HFConversionError as e:
            raise CheckpointError(f"{root}: Hugging Face DPT: {e}") from None
        for key in unknown:  # reported as unexpected, under their HF names
            state[key] = raw[key]
        fill["fill_keys"] = hf_convert.HF_FILLED_KEYS
        if meta.get("use_auxiliary_head") is False:
            fill["fill_prefixes"] = ("auxlayer.",)  # training-only head: the model's own init
    else:
        obj = load_safetensors(root) if root.suffix == ".safetensors" else torch_load_weights_only(root)
        state = unwrap_state_dict(obj, root)
        recorded = _training_checkpoint_config(obj)
        if not infer:
            config = None
        elif recorded is not None:  # dpt_fast.train's checkpoint.pt records the model's config
            config = {**_validated(recorded, root), **overrides}
        else:
            config = infer_original_config(state, filename=root.name, overrides=overrides, source=root)
    return fmt, root, config, state, fill


def _training_checkpoint_config(obj) -> dict | None:
    """The model config recorded in a checkpoint written by dpt_fast.train (None for other files)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("format"), str):
        return None
    config = obj.get("config")
    if obj["format"].startswith("dpt_fast.train/") and isinstance(config, dict) and "model_class" in config:
        return dict(config)
    return None


def load_state_dict_into(model: nn.Module, path) -> None:
    """Load the checkpoint at `path` (any format) into an existing model, strictly, with a clear
    error when it does not fit. This is what `DPTDepthModel(path=...)` calls."""
    config = getattr(model, "config", {}) or {}
    fmt, root, _, state, fill = read_checkpoint(path, {}, infer=False)
    state = fit_state_dict(model, state, fmt=fmt, source=root, config=config, **fill)
    model.load_state_dict(state, strict=True)

