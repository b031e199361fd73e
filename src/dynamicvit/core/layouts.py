"""State-dict layouts: how the weights of other releases map onto a sparse model's keys, and strict
loading with one error that lists every key that does not fit.

Layouts understood (see docs/checkpoints.md):
- ours: `backbone.*` + `predictors.*` (+ `fast_paths.*` for DynamicSpatial);
- the authors' DynamicViT checkpoints: timm backbone keys + `score_predictor.{s}.*`;
- the authors' DynamicCNN / DynamicSwin checkpoints (see `SpatialHost.split_reference`);
- dense weights of a host family (timm, DeiT, the original LV-ViT release): the backbone is loaded and
  the new parameters keep their initialization. Each family adapts them (`Host.filter_state`:
  position-embedding resize, foreign key names).

This is model knowledge (it needs the hosts), not file handling: reading files is `dynamicvit.weights`.
"""
from __future__ import annotations

import logging
from typing import Union

import torch
import torch.nn as nn

from ..errors import CheckpointError
from .hosts import host_for, is_spatial, spatial_host_for

_logger = logging.getLogger(__name__)


def is_reference_format(state: dict) -> bool:
    """The authors' checkpoints: `score_predictor.*` (DynamicViT, DynamicCNN), `layers.2.score_predictor.*` (DynamicSwin)."""
    return any(k.startswith("score_predictor.") or ".score_predictor." in k for k in state)


def is_own_format(state: dict) -> bool:
    return any(k.startswith("backbone.") for k in state)


def has_predictor_weights(state: dict) -> bool:
    """Weights of prediction modules in any layout: the authors' (`score_predictor`) or ours (`predictors.`)."""
    return is_reference_format(state) or any(k.startswith("predictors.") for k in state)


def to_own_keys(state: dict, backbone: nn.Module) -> tuple[dict, bool]:
    """Map any supported layout onto DynamicViT's (or DynamicSpatial's) keys: (state, has_predictors)."""
    if is_own_format(state):
        # Resize the position embedding etc. when the model is built for another image size.
        dense = filter_dense_state({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}, backbone)
        rest = {k: v for k, v in state.items() if not k.startswith("backbone.")}
        return {**{"backbone." + k: v for k, v in dense.items()}, **rest}, any(k.startswith("predictors.") for k in rest)
    if is_spatial(backbone):
        # The authors' predictor and fast-path keys come out first: timm's dense filters reject them.
        dense, new = spatial_host_for(backbone).split_reference(state)
        dense = filter_dense_state(dense, backbone)
        return {**{"backbone." + k: v for k, v in dense.items()}, **new}, bool(new)
    predictors = {
        "predictors." + k[len("score_predictor."):]: v for k, v in state.items() if k.startswith("score_predictor.")
    }
    dense = {k: v for k, v in state.items() if not k.startswith("score_predictor.")}
    dense = filter_dense_state(dense, backbone)
    return {**{"backbone." + k: v for k, v in dense.items()}, **predictors}, bool(predictors)


def filter_dense_state(state: dict, model: nn.Module) -> dict:
    """The host family's adaptation of dense weights (position embedding resize, foreign layouts)."""
    return (spatial_host_for(model) if is_spatial(model) else host_for(model)).filter_state(state)


def load_state(
    model: nn.Module, state: dict, source: str, allow_missing_prefix: Union[str, tuple[str, ...]] = "", reset_head: bool = False
) -> None:
    """Load `state` into `model` strictly, with one clear error listing every offending key.

    Args:
        allow_missing_prefix: keys under this prefix (or these prefixes) may be absent (kept as initialized).
        reset_head: a classifier head of the wrong shape is dropped and re-initialized (dense weights
            for another number of classes), as timm does for pretrained weights.
    """
    expected = model.state_dict()
    mismatched = {
        k: (tuple(v.shape), tuple(expected[k].shape))
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    }
    reset = set()
    if reset_head:
        reset = {k for k in mismatched
                 if k.split(".")[-2] in ("head", "head_dist", "aux_head") or k.split(".")[-3:-1] == ["head", "fc"]}
        if reset:
            _logger.warning("classifier head re-initialized (%s): the checkpoint has another number of classes", sorted(reset))
            mismatched = {k: v for k, v in mismatched.items() if k not in reset}
            state = {k: v for k, v in state.items() if k not in reset}
    allow = reset
    missing = [k for k in expected if k not in state and k not in allow and not (allow_missing_prefix and k.startswith(allow_missing_prefix))]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected or mismatched:
        lines = [f"{source} does not match the model:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_short(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_short(unexpected)}")
        for k, (got, want) in list(mismatched.items())[:10]:
            lines.append(f"  shape mismatch {k}: checkpoint {got} vs model {want}")
        lines.append("check that the model name and its settings (img_size, num_classes, ...) match the checkpoint")
        raise CheckpointError("\n".join(lines))
    check_finite(state, source)
    nn.Module.load_state_dict(model, state, strict=False)


def check_finite(state: dict, source: str) -> None:
    """Raise `CheckpointError` naming the tensors of `state` that hold NaN or Inf values."""
    bad = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(
            f"{source} holds non-finite values (NaN or Inf) in {len(bad)} tensor(s): {_short(bad)}; the weights are "
            "broken (e.g. a diverged run); use an earlier checkpoint"
        )


def _short(keys: list, n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")


def load_foreign_state(model: nn.Module, state: dict, source: str, reset_head: bool = True):
    """Load a state dict of any supported layout (ours, reference DynamicViT, timm/DeiT) into a DynamicViT.

    Without predictor weights the prediction modules keep their initialization; `reset_head` lets dense
    weights for another number of classes re-initialize the classifier head.

    Returns:
        torch's `_IncompatibleKeys` (always empty: anything missing or unexpected is an error).
    """
    from torch.nn.modules.module import _IncompatibleKeys

    state, has_predictors = to_own_keys(state, model.backbone)
    load_state(
        model,
        state,
        source=source,
        # New parameters (predictors; fast paths of DynamicSpatial) start fresh from dense weights.
        allow_missing_prefix="" if has_predictors else getattr(model, "new_parameter_prefixes", "predictors."),
        reset_head=not has_predictors and reset_head,
    )
    if not has_predictors:
        _logger.info("loaded dense weights from %s; prediction modules are freshly initialized", source)
    return _IncompatibleKeys([], [])
