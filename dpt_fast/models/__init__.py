"""DPT models: the encoder (backbone.py), decoder blocks (blocks.py), heads (heads.py), models (dpt.py)."""
from .backbone import RELEASED_BACKBONES, DPTAttention, DPTBackbone
from .depth_anything import DepthAnythingModel
from .dpt import DPT, DPTDepthModel, DPTSegmentationModel

MODEL_CLASSES = {"DPTDepthModel": DPTDepthModel, "DPTSegmentationModel": DPTSegmentationModel,
                 "DepthAnythingModel": DepthAnythingModel}


def build_model(config: dict):
    """Rebuild a model from its `model.config` dict (as saved by dpt_fast.save_model). Such a dict may
    come from a file, so it passes dpt_fast.config_validation's allow-list first (a ConfigError, a
    ValueError, names any key or value that is not allowed)."""
    from ..config_validation import validate_model_config
    config = validate_model_config(config)
    name = config.pop("model_class")
    if name not in MODEL_CLASSES:
        raise ValueError(f"config['model_class'] must be one of {sorted(MODEL_CLASSES)}, got {name!r}")
    return MODEL_CLASSES[name](**config)


__all__ = ["DPT", "DPTDepthModel", "DPTSegmentationModel", "DepthAnythingModel", "DPTBackbone", "DPTAttention",
           "RELEASED_BACKBONES", "MODEL_CLASSES", "build_model"]
