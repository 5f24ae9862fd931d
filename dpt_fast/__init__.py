"""dpt_fast: the Dense Prediction Transformer (Ranftl et al., 2021) with fused kernels.

The public names are imported on first use (PEP 562): `import dpt_fast` costs nothing, so that
`dpt-fast --help` answers at once; `dpt_fast.DPTDepthModel` or `from dpt_fast import load_model` imports
PyTorch, timm and the model code then (and registers the `torch.ops.dpt_fast` operators).
"""
from __future__ import annotations

import importlib
import importlib.util

__version__ = "0.1.0"

# public name -> the submodule that defines it
_LAZY = {
    "DPTDepthModel": "models", "DPTSegmentationModel": "models", "DepthAnythingModel": "models",
    "build_model": "models",
    "load_model": "weights", "save_model": "weights",
    "get_backend": "backend", "set_backend": "backend", "use_backend": "backend",
    "implementations_ran": "backend",
}

__all__ = ["DPTDepthModel", "DPTSegmentationModel", "DepthAnythingModel", "build_model", "load_model",
           "save_model", "get_backend", "set_backend", "use_backend", "implementations_ran", "ops", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)  # dpt_fast.ops, dpt_fast.backend, ...
    else:
        raise AttributeError(f"module 'dpt_fast' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
