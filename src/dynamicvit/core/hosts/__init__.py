"""Host families: how DynamicViT attaches to each kind of backbone.

`DynamicViT` (`core.vit`) holds the method: where the stages are, how tokens are scored, kept and
masked. A `Host` (base.py) says only how one family of backbones differs: how images become tokens,
how block i runs with masked attention, how logits come out of the final tokens, what token
distillation compares, and how foreign checkpoints map onto the backbone.

`host_for(model)` picks the family of a timm model (or of a Hugging Face transformers model, `hf.py`);
families are tried in `FAMILIES` order.

Hierarchical backbones (ConvNeXt, Swin) keep their 2-D maps and are sparsified by `DynamicSpatial`
(`core.spatial`) through a `SpatialHost` (`spatial_base.py`); `spatial_host_for(model)` picks theirs.
"""
from __future__ import annotations

from typing import Union

import torch.nn as nn

from ...errors import UnsupportedModelError
from .base import Host
from .convnext import ConvNeXtHost
from .hf import HFHost
from .lvvit import LVViTHost
from .spatial_base import SpatialHost
from .swin import SwinHost
from .vit import ViTHost

FAMILIES: tuple[type[Host], ...] = (ViTHost, LVViTHost, HFHost)  # token sequences: `DynamicViT`
SPATIAL_FAMILIES: tuple[type[SpatialHost], ...] = (ConvNeXtHost, SwinHost)  # 2-D maps: `DynamicSpatial`


def _find(model: nn.Module, families):
    inner = getattr(model, "backbone", model)
    for family in families:
        if family.accepts(inner):
            return family(inner)
    return None


def host_for(model: nn.Module) -> Host:
    """The token `Host` of a dense backbone (or of a DynamicViT's backbone); a clear error when none fits."""
    host = _find(model, FAMILIES)
    if host is not None:
        return host
    inner = getattr(model, "backbone", model)
    if is_spatial(inner):
        raise UnsupportedModelError(
            f"{type(inner).__name__} is a hierarchical backbone: sparsify it with dynamicvit.create_model / "
            "sparsify (a DynamicSpatial), not DynamicViT"
        )
    names = ", ".join(f.family for f in FAMILIES + SPATIAL_FAMILIES)
    raise UnsupportedModelError(
        f"{type(inner).__name__} is not a supported backbone (supported families: {names}); DynamicViT "
        "supports ViT-style timm models such as deit_small_patch16_224, deit_base_patch16_224, vit_tiny_patch16_224, "
        "LV-ViT (lvvit_s, lvvit_m), ConvNeXt (convnext_tiny, ...), Swin (swin_tiny_patch4_window7_224, ...) and "
        "transformers' ViT, DeiT, DINOv2 and CLIP vision models"
    )


def is_spatial(model: nn.Module) -> bool:
    """True when `model` (or a DynamicSpatial's backbone) is of a hierarchical family."""
    inner = getattr(model, "backbone", model)
    return any(family.accepts(inner) for family in SPATIAL_FAMILIES)


def spatial_host_for(model: nn.Module) -> SpatialHost:
    """The `SpatialHost` of a hierarchical backbone; a clear error when none fits."""
    host = _find(model, SPATIAL_FAMILIES)
    if host is None:
        names = ", ".join(f.family for f in SPATIAL_FAMILIES)
        raise UnsupportedModelError(
            f"{type(getattr(model, 'backbone', model)).__name__} is not a supported hierarchical backbone "
            f"(supported families: {names}); e.g. convnext_tiny, swin_tiny_patch4_window7_224"
        )
    return host


def any_host(model: nn.Module) -> Union[Host, SpatialHost]:
    """The host of any supported family (token or hierarchical), e.g. for its geometry (in_chans, img_size)."""
    return spatial_host_for(model) if is_spatial(model) else host_for(model)


__all__ = [
    "FAMILIES",
    "LVViTHost",
    "SPATIAL_FAMILIES",
    "ConvNeXtHost",
    "HFHost",
    "Host",
    "SpatialHost",
    "SwinHost",
    "ViTHost",
    "any_host",
    "host_for",
    "is_spatial",
    "spatial_host_for",
]
