"""`dynamicvit.train`: the training entry points, kept importable under this name (they live in
`dynamicvit.training`)."""
from .evaluate import evaluate  # noqa: F401
from .training.config import RECIPES, TrainConfig  # noqa: F401
from .training.loop import TrainResult, train  # noqa: F401

__all__ = ["RECIPES", "TrainConfig", "TrainResult", "evaluate", "train"]
