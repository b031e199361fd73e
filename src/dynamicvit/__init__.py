"""DynamicViT: dynamic token sparsification for timm vision transformers (Rao et al., NeurIPS 2021),
and dynamic spatial sparsification for timm's ConvNeXt and Swin (the journal version, `DynamicSpatial`).

Three ways to get a model: `create_model(name)` builds one from a timm name (or "hf:DIR", a Hugging Face
transformers model folder), `sparsify(model)` wraps a timm or transformers model you have, `load(path)`
opens any checkpoint file. `save_model` writes one that `load` rebuilds (`save_pretrained` a folder that
transformers reads too); `export_onnx`, `compile`, `fast_patch_embed` and `fused_masked_attention` make it
faster; `calibrate_thresholds` prepares the per-image budget (`model.set_keep_ratio(rho, budget="per-image")`).
"""
from .core.base import DynamicViTOutput, PrunedOutput, SparseModel
from .core.budget import calibrate_thresholds
from .core.ops import PredictionModule
from .core.settings import SparsityConfig, SpatialConfig
from .core.spatial import DynamicSpatial
from .core.vit import DynamicViT
from .errors import CheckpointError, ConfigError, DataError, DynamicViTError, UnsupportedModelError
from .runtime.deploy import ExportError, compile, export_onnx
from .runtime.speedups import fast_patch_embed, fused_masked_attention
from .training.config import TrainConfig
from .version import __version__
from .weights.build import create_model, load, load_model, register_with_timm, sparsify
from .weights.formats import save_model
from .weights.hf import save_pretrained
from . import losses  # noqa: E402,F401 - `dynamicvit.losses`, the training objectives

register_with_timm()

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
    "SparseModel",
    "SparsityConfig",
    "SpatialConfig",
    "TrainConfig",
    "UnsupportedModelError",
    "__version__",
    "calibrate_thresholds",
    "compile",
    "create_model",
    "export_onnx",
    "fast_patch_embed",
    "fused_masked_attention",
    "load",
    "load_model",
    "save_model",
    "save_pretrained",
    "sparsify",
]
