"""DynamicViT: dynamic token sparsification for timm vision transformers (Rao et al., NeurIPS 2021)."""
from .checkpoint import load_model, save_model
from .config import SparsityConfig
from .errors import CheckpointError, ConfigError, DataError, DynamicViTError, UnsupportedModelError
from .factory import create_model, sparsify, _register
from .model import DynamicViT, DynamicViTOutput, PrunedOutput
from .ops import PredictionModule
from .speedups import fast_patch_embed, fused_masked_attention

__version__ = "0.1.0"

_register()

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DynamicViT",
    "DynamicViTError",
    "DynamicViTOutput",
    "PredictionModule",
    "PrunedOutput",
    "SparsityConfig",
    "UnsupportedModelError",
    "create_model",
    "fast_patch_embed",
    "fused_masked_attention",
    "load_model",
    "save_model",
    "sparsify",
]
