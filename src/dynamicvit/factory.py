"""Building DynamicViTs: from a timm name, from a model the user has, or through timm's registry."""
from __future__ import annotations

import difflib
import os
from typing import Optional, Sequence, Union

import torch.nn as nn

from .errors import CheckpointError, UnsupportedModelError
from .model import DynamicViT

# Architectures registered with timm as `dynamicvit_<name>` on `import dynamicvit`.
REGISTERED = (
    "deit_tiny_patch16_224",
    "deit_small_patch16_224",
    "deit_base_patch16_224",
    "deit_tiny_distilled_patch16_224",
    "deit_small_distilled_patch16_224",
    "deit_base_distilled_patch16_224",
    "deit3_small_patch16_224",
    "deit3_base_patch16_224",
    "vit_tiny_patch16_224",
    "vit_small_patch16_224",
    "vit_base_patch16_224",
)
PREFIX = "dynamicvit_"


def create_model(
    name: str,
    pretrained: bool = False,
    checkpoint_path: Optional[Union[str, os.PathLike]] = None,
    keep_ratio: float = 0.7,
    prune_locs: Optional[Sequence[int]] = None,
    fuse_dropped: bool = False,
    **timm_kwargs,
) -> DynamicViT:
    """Build the timm model `name` and add DynamicViT prediction modules.

    Args:
        name: a timm ViT name, e.g. `deit_small_patch16_224` (a `dynamicvit_` prefix is accepted).
        pretrained: load timm's pretrained weights (downloads from the hub).
        checkpoint_path: a local file: timm/DeiT weights, a reference DynamicViT checkpoint, or ours.
        keep_ratio: rho; stage s keeps int(N * rho ** s) patch tokens.
        prune_locs: blocks before which to prune; default three evenly spaced stages.
        fuse_dropped: fold each stage's dropped tokens into one extra token instead of discarding them.
        timm_kwargs: passed to `timm.create_model` (img_size, num_classes, drop_path_rate, ...).
    """
    from .checkpoint import load_weights

    name = name[len(PREFIX):] if name.startswith(PREFIX) else name
    backbone = create_backbone(name, pretrained=pretrained and checkpoint_path is None, **timm_kwargs)
    model = DynamicViT(backbone, keep_ratio, prune_locs, model_name=name, timm_kwargs=timm_kwargs, fuse_dropped=fuse_dropped)
    if checkpoint_path is not None:
        load_weights(model, checkpoint_path)
    return model


def create_backbone(name: str, pretrained: bool = False, **timm_kwargs) -> nn.Module:
    """`timm.create_model` with clear errors for unknown names and failed downloads."""
    import timm

    if not timm.is_model(name):
        candidates = timm.list_models("*vit*") + timm.list_models("deit*")
        close = difflib.get_close_matches(name, candidates, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models('deit*')"
        raise UnsupportedModelError(f"unknown timm model {name!r}{hint}")
    if not pretrained:
        model = timm.create_model(name, **timm_kwargs)
    else:
        try:
            model = timm.create_model(name, pretrained=True, **timm_kwargs)
        except Exception as e:  # noqa: BLE001 - hub, network and cache errors come in many types
            raise CheckpointError(
                f"could not get pretrained weights for {name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
                "Without internet access, download the weights elsewhere and pass the local file: "
                f"create_model({name!r}, checkpoint_path='weights.pth') or --checkpoint weights.pth"
            ) from None
    model.dynamicvit_timm_kwargs = dict(timm_kwargs)
    return model


def sparsify(
    model: nn.Module, keep_ratio: float = 0.7, prune_locs: Optional[Sequence[int]] = None, fuse_dropped: bool = False
) -> DynamicViT:
    """Wrap a timm ViT the user already has (weights shared, not copied) as a DynamicViT."""
    kwargs = getattr(model, "dynamicvit_timm_kwargs", None)
    if kwargs is None:
        kwargs = {k: v for k, v in getattr(model, "_model_args", {}).items() if k != "pretrained_cfg_overlay"}
    return DynamicViT(model, keep_ratio, prune_locs, timm_kwargs=kwargs, fuse_dropped=fuse_dropped)


def _register() -> None:
    from timm.models import register_model

    for base in REGISTERED:
        def entrypoint(pretrained: bool = False, _base: str = base, **kwargs) -> DynamicViT:
            for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
                if kwargs.get(key) is None:
                    kwargs.pop(key, None)
            return create_model(_base, pretrained=pretrained, **kwargs)

        entrypoint.__name__ = entrypoint.__qualname__ = PREFIX + base
        entrypoint.__doc__ = f"DynamicViT on timm's {base} (keep_ratio, prune_locs and timm kwargs accepted)."
        entrypoint.__module__ = __name__
        register_model(entrypoint)
