"""Host families: how DynamicViT attaches to each kind of backbone.

`DynamicViT` (model.py) holds the method: where the stages are, how tokens are scored, kept and
masked. A `Host` (base.py) says only how one family of backbones differs: how images become tokens,
how block i runs with masked attention, how logits come out of the final tokens, what token
distillation compares, and how foreign checkpoints map onto the backbone.

`host_for(model)` picks the family of a timm model; families are tried in `FAMILIES` order.
"""
from __future__ import annotations

import torch.nn as nn

from ..errors import UnsupportedModelError
from .base import Host
from .lvvit import LVViTHost
from .vit import ViTHost

FAMILIES: tuple[type[Host], ...] = (ViTHost, LVViTHost)


def host_for(model: nn.Module) -> Host:
    """The `Host` of a dense backbone (or of a DynamicViT's backbone); a clear error when none fits."""
    inner = getattr(model, "backbone", model)
    for family in FAMILIES:
        if family.accepts(inner):
            return family(inner)
    names = ", ".join(f.family for f in FAMILIES)
    raise UnsupportedModelError(
        f"{type(inner).__name__} is not a supported backbone (supported families: {names}); DynamicViT "
        "supports ViT-style timm models such as deit_small_patch16_224, deit_base_patch16_224, vit_tiny_patch16_224, "
        "and LV-ViT (lvvit_s, lvvit_m)"
    )


__all__ = ["FAMILIES", "Host", "LVViTHost", "ViTHost", "host_for"]
