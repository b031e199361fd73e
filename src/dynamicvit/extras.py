"""Optional parts of the package and the one-line hint that names the extra to install.

The core install (torch, timm, safetensors, numpy, pillow) builds, trains, evaluates and times models.
ONNX export and ONNX Runtime, TensorBoard logs, plots and Hugging Face models each need an extra:
`pip install 'dynamicvit[onnx]'` (or `[tensorboard]`, `[plots]`, `[hf]`; `[all]` for everything).
"""
from __future__ import annotations

import importlib
from types import ModuleType

from .errors import DynamicViTError

# module -> the extra that installs it
EXTRAS = {
    "onnx": "onnx",
    "onnxscript": "onnx",
    "onnxruntime": "onnx",
    "onnxruntime.quantization": "onnx",
    "torch.utils.tensorboard": "tensorboard",
    "matplotlib": "plots",
    "matplotlib.pyplot": "plots",
    "transformers": "hf",
}


class MissingExtraError(DynamicViTError, ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def require(module: str, what: str) -> ModuleType:
    """Import `module` (a key of `EXTRAS`), or raise `MissingExtraError`: "`what` needs ... pip install ...".

    Args:
        what: what the caller wanted to do, e.g. "ONNX export".
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        extra = EXTRAS[module]
        raise MissingExtraError(
            f"{what} needs the optional package {module.split('.')[0]!r} ({type(e).__name__}: {e}); install it with "
            f"pip install 'dynamicvit[{extra}]' (or run bash scripts/setup.sh, which installs every extra)"
        ) from None
