"""Weights I/O: `load_model` for the three checkpoint formats, `save_model` for dpt_fast's own.

Reading a file (format detection, state dicts, the config it describes) is dpt_fast.checkpoints, which
sits below the models; this module builds models on top of it, and its names are importable from here.

Formats, told apart by the path:

- **original** -- a file (`.pt`/`.pth`, or a `.safetensors` with no config.json beside it) holding the
  original release's state dict (isl-org/DPT), possibly wrapped as {"model": ..., "optimizer": ...} or
  {"state_dict": ...}, possibly with a DataParallel "module." prefix. Read with
  `torch.load(weights_only=True)` only. The architecture is inferred from the keys and shapes
  (`infer_original_config`); what the keys cannot tell:
  * the timm name and hooks of a ViT that is not one of the released backbones -> pass `backbone=` and
    `hooks=` to `load_model` (dpt_fast's own format records them);
  * readout 'add' versus 'ignore' (neither has parameters) -> 'ignore' is assumed, with a warning;
  * scale / shift / invert of the depth model -> taken from the released file names (KITTI, NYU),
    else 1 / 0 / False; `non_negative` -> True (every released depth model);
  * `layer_norm_eps` -> timm's 1e-6, which the original used.
  A training checkpoint of `dpt_fast.train` (OUT/checkpoint.pt) is read the same way, with the model
  config it records instead of an inferred one (a metric fine-tune keeps its scale/shift/invert).
- **huggingface** -- a directory whose config.json has "model_type": "dpt" (transformers'
  DPTForDepthEstimation / DPTForSemanticSegmentation) with model.safetensors (or a sharded index) or
  pytorch_model.bin (weights_only). Converted by `dpt_fast.hf_convert`.
- **dpt_fast** -- a directory written by `save_model`: config.json {"format": "dpt_fast",
  "format_version": 1, "config": model.config} and model.safetensors. Round-trips any model bit-exactly,
  dtypes included.

Any keyword given to `load_model` beyond device/dtype is a constructor argument that overrides what
was inferred or recorded (e.g. `backbone=`, `hooks=`, `scale=`).

Files from strangers: nothing in them is executed. Pickles are read with `weights_only=True`; every
model config read from a file (dpt_fast's config.json, a training checkpoint's recorded config, a
Hugging Face config.json after conversion) passes `dpt_fast.config_validation`'s allow-list before
anything is built; the model is first built on the meta device and checked against the file's
tensors (keys, shapes, total size), so memory is allocated only for a model the weights fit; every
file read from a model folder -- shards named by an index included -- must lie inside that folder
(or, for huggingface_hub's cache, in the same repository's blobs folder) and be a regular file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from . import fileio
from .checkpoints import (CONFIG_NAME, FORMAT, FORMAT_LABELS, FORMAT_VERSION, RELEASED_FILES,  # noqa: F401
                          WEIGHTS_NAME, CheckpointError, describe_config, detect_format, fit_state_dict,
                          infer_original_config, load_state_dict_into, read_checkpoint, read_state_dict,
                          released_file_settings, unwrap_state_dict)

__all__ = ["load_model", "save_model", "load_state_dict_into", "detect_format", "read_state_dict",
           "unwrap_state_dict", "infer_original_config", "released_file_settings", "CheckpointError", "RELEASED_FILES",
           "FORMAT", "FORMAT_VERSION"]


def _build(config: dict, on_meta: bool = True) -> nn.Module:
    """The model of `config`: on the meta device (no memory, no init) or on the CPU with its own init."""
    from .models import build_model
    config = dict(config)
    if "path" in config:
        raise CheckpointError("`path` is not a model argument here: load_model reads the weights itself")
    try:
        if on_meta:
            with torch.device("meta"):
                return build_model(config)
        return build_model(config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"cannot build {describe_config(config)}: {e}") from None


def _build_fitted(config: dict, state: dict, *, fmt: str, source, fill: dict) -> tuple[nn.Module, dict]:
    """(model, state dict to load) -- the model is built on the meta device first and the file's
    tensors checked against it (keys, shapes, sizes), so a config that does not describe the weights,
    however large the model it asks for, is refused before any memory is allocated. Only then, if some
    values must come from the model's own init (non-persistent buffers, `fill_prefixes`), is it
    built again on the CPU."""
    model = _build(config, on_meta=True)
    fitted = fit_state_dict(model, state, fmt=fmt, source=source, config=config, **fill)
    persistent = set(model.state_dict())
    if fill["fill_prefixes"] or not all(name in persistent for name, _ in model.named_buffers()):
        model = _build(config, on_meta=False)
        fitted = fit_state_dict(model, state, fmt=fmt, source=source, config=config, **fill)
    return model, fitted


def load_model(path, device=None, dtype=None, **model_kwargs) -> nn.Module:
    """A DPT model in eval mode from an original-release .pt, a Hugging Face DPT directory or a
    dpt_fast directory (see the module docstring). `device`/`dtype`: where and in which dtype to put
    it (default: CPU; float32, except dpt_fast's format, which keeps the saved dtypes).
    `model_kwargs` override constructor arguments inferred from or recorded in the checkpoint.
    Depth Anything release files and transformers folders are read by dpt_fast.depth_anything_weights."""
    from . import depth_anything_weights
    if depth_anything_weights.recognizes(path):
        return depth_anything_weights.load(path, device=device, dtype=dtype, **model_kwargs)
    fmt, root, config, state, fill = read_checkpoint(path, model_kwargs)
    model, state = _build_fitted(config, state, fmt=fmt, source=root, fill=fill)
    on_meta = any(t.is_meta for t in model.state_dict().values())
    if fmt == FORMAT and on_meta:
        model.load_state_dict(state, strict=True, assign=True)  # the file's tensors, dtypes as saved
        if device is not None:
            model.to(device)
    else:
        if on_meta:
            model.to_empty(device=device if device is not None else "cpu")
        elif device is not None:
            model.to(device)
        model.load_state_dict(state, strict=True)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


# ------------------------------------------------------------------------------------------ saving

def save_model(model: nn.Module, directory) -> Path:
    """Write `model` as dpt_fast's format: directory/config.json (model.config + format marker and
    version) and directory/model.safetensors (the state dict, dtypes as they are). Returns the
    directory. `load_model(directory)` rebuilds the model bit-exactly.

    Each file is replaced atomically (an interrupted save leaves the previous files or none, and no
    temporary file); both get the permissions of any new file (0666 less the umask)."""
    from safetensors.torch import save_file
    import dpt_fast

    config = getattr(model, "config", None)
    if not isinstance(config, dict) or "model_class" not in config:
        raise ValueError("save_model needs a dpt_fast model (DPTDepthModel / DPTSegmentationModel) whose "
                         ".config dict names its model_class")
    try:
        config_text = json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION,
                                  "dpt_fast_version": getattr(dpt_fast, "__version__", None),
                                  "config": config}, indent=2, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"model.config is not JSON-serialisable: {e}") from None
    directory = Path(os.fspath(directory)).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    # what an earlier save into `directory` left when its process was killed (its writer no longer runs)
    fileio.remove_stale_temporaries(directory, (WEIGHTS_NAME, CONFIG_NAME))
    tensors, seen = {}, set()
    for key, value in model.state_dict().items():
        value = value.detach().to("cpu").contiguous()
        ptr = value.untyped_storage().data_ptr()
        if value.numel() and ptr in seen:
            value = value.clone()  # safetensors refuses shared storage
        seen.add(ptr)
        tensors[key] = value
    # Weights first, config last: a directory is only recognised once it is complete.
    metadata = {"format": "pt", "dpt_fast_format_version": str(FORMAT_VERSION)}
    fileio.atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata=metadata),
                        durable=True)
    fileio.atomic_write_bytes(directory / CONFIG_NAME, (config_text + "\n").encode("utf-8"), durable=True)
    return directory
