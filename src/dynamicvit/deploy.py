"""`dynamicvit.deploy`: ONNX export, ONNX Runtime and torch.compile, kept importable under this name
(they live in `dynamicvit.runtime.deploy`; the evaluation preprocessing in `dynamicvit.data`)."""
from .data import eval_transform as image_transform  # noqa: F401
from .data import preprocessing_config  # noqa: F401
from .evaluate import onnx_accuracy  # noqa: F401
from .runtime.deploy import *  # noqa: F401,F403
from .runtime.deploy import __all__ as _deploy_all

__all__ = [*_deploy_all, "image_transform", "onnx_accuracy", "preprocessing_config"]
