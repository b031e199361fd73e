"""DynamicViT: dynamic token sparsification for timm vision transformers (Rao et al., NeurIPS 2021)."""
from .checkpoint import load_model, save_model
from .config import SparsityConfig
from .deploy import ExportError, compile, export_onnx
from .errors import CheckpointError, ConfigError, DataError, DynamicViTError, UnsupportedModelError
from .factory import create_model, sparsify, _register
from .model import DynamicViT, DynamicViTOutput, PrunedOutput
from .ops import PredictionModule

__version__ = "0.1.0"

_register()

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DynamicViT",
    "DynamicViTError",
    "DynamicViTOutput",
    "ExportError",
    "PredictionModule",
    "PrunedOutput",
    "SparsityConfig",
    "UnsupportedModelError",
    "compile",
    "create_model",
    "export_onnx",
    "load_model",
    "save_model",
    "sparsify",
]
