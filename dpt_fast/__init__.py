"""dpt_fast: the Dense Prediction Transformer (Ranftl et al., 2021) with fused kernels."""
from .backend import get_backend, implementations_ran, set_backend, use_backend
from . import ops
from .models import DepthAnythingModel, DPTDepthModel, DPTSegmentationModel, build_model
from .weights import load_model, save_model

__version__ = "0.1.0"

__all__ = ["DPTDepthModel", "DPTSegmentationModel", "DepthAnythingModel", "build_model", "load_model", "save_model", "get_backend", "set_backend",
           "use_backend", "implementations_ran", "ops", "__version__"]
