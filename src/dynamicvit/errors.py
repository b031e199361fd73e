"""Exceptions raised at the library boundary.

Every error a user can cause (a bad setting, a missing file, a corrupt checkpoint) is one of these,
with a message that names the problem and the fix. The CLI prints the message and exits non-zero.
"""


class DynamicViTError(Exception):
    """Base class of all errors the library raises on purpose."""


class ConfigError(DynamicViTError, ValueError):
    """A setting is out of range or inconsistent with the model (keep ratio, prune locations, ...)."""


class UnsupportedModelError(DynamicViTError, ValueError):
    """The timm model cannot be sparsified (unknown name, or not a plain ViT-style architecture)."""


class CheckpointError(DynamicViTError):
    """A checkpoint is missing, unreadable, or does not match the model."""


class DataError(DynamicViTError):
    """A dataset or an input image is missing or unreadable."""


class OutputError(DynamicViTError, OSError):
    """An output file or folder cannot be written (not a folder, no permission, disk full)."""


class TrainingStopped(DynamicViTError):
    """Training stopped on SIGINT or SIGTERM after writing a resumable checkpoint.

    Attributes:
        signum: the signal that asked for the stop.
        checkpoint: the checkpoint written before stopping (`--resume` continues from it).
    """

    def __init__(self, message: str, signum: int, checkpoint=None):
        super().__init__(message)
        self.signum = signum
        self.checkpoint = checkpoint
