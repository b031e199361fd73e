"""`dynamicvit.losses`: the training objectives, kept importable under this name (they live in
`dynamicvit.core.losses`)."""
from .core.losses import *  # noqa: F401,F403
from .core.losses import __all__  # noqa: F401
