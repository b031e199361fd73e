"""DynamicViT: dynamic token sparsification for timm vision transformers (Rao et al., NeurIPS 2021),
and dynamic spatial sparsification for timm's ConvNeXt and Swin (the journal version, `DynamicSpatial`)."""
from .checkpoint import save_model
from .config import SparsityConfig
from .deploy import ExportError, compile, export_onnx
from .errors import CheckpointError, ConfigError, DataError, DynamicViTError, UnsupportedModelError
from .factory import create_model, load, load_model, sparsify, _register
from .model import DynamicViT, DynamicViTOutput, PrunedOutput
from .ops import PredictionModule
from .spatial import DynamicSpatial, SpatialConfig
from .speedups import fast_patch_embed, fused_masked_attention

__version__ = "0.1.0"

_register()

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DynamicSpatial",
    "DynamicViT",
    "DynamicViTError",
    "DynamicViTOutput",
    "ExportError",
    "PredictionModule",
    "PrunedOutput",
    "SparsityConfig",
    "SpatialConfig",
    "UnsupportedModelError",
    "compile",
    "create_model",
    "export_onnx",
    "fast_patch_embed",
    "fused_masked_attention",
    "load",
    "load_model",
    "save_model",
    "sparsify",
]
