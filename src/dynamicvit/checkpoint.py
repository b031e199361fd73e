"""Reading and writing weights.

Formats understood when loading:
- ours: a `.safetensors` file whose metadata holds the settings needed to rebuild the model
  (`save_model` / `load_model`), or a torch file `{'model': state_dict, 'dynamicvit': settings, ...}`
  as written by the training loop;
- the reference DynamicViT checkpoints: `{'model': state_dict}` with `score_predictor.{s}.*` keys;
- plain timm / DeiT weights (a state dict, or `{'model': ...}` / `{'state_dict': ...}`): the
  backbone is loaded and the prediction modules keep their fresh initialization.

A load never succeeds partially: missing, unexpected or mis-shaped keys raise `CheckpointError`
listing them.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from .errors import CheckpointError

_logger = logging.getLogger(__name__)

METADATA_KEY = "dynamicvit"
FORMAT_VERSION = 1
PathLike = Union[str, os.PathLike]


# -- settings -----------------------------------------------------------------------------------


def model_settings(model: nn.Module) -> dict:
    """What is needed to rebuild `model` (a DynamicViT or a dense timm ViT) before loading weights."""
    from .model import DynamicViT

    if isinstance(model, DynamicViT):
        return {
            "format_version": FORMAT_VERSION,
            "kind": "dynamicvit",
            "model_name": model.model_name,
            "timm_kwargs": model.timm_kwargs,
            "keep_ratio": model.keep_ratio,
            "prune_locs": list(model.prune_locs),
            # Written only when set, so the settings of a model without them read as before.
            **({"fuse_dropped": True} if model.fuse_dropped else {}),
            **({"keep_ratio_range": list(model.keep_ratio_range)} if model.keep_ratio_range else {}),
        }
    name = getattr(model, "pretrained_cfg", {}).get("architecture")
    if name is None:
        raise CheckpointError(f"cannot tell which timm architecture {type(model).__name__} is; save its state_dict instead")
    return {
        "format_version": FORMAT_VERSION,
        "kind": "dense",
        "model_name": name,
        "timm_kwargs": dict(getattr(model, "dynamicvit_timm_kwargs", getattr(model, "_model_args", {}))),
    }


# -- writing ------------------------------------------------------------------------------------


def atomic_write(path: PathLike, write_fn) -> None:
    """Call `write_fn(tmp_path)`, then move the file into place: a crash never leaves a half-written `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        # mkstemp creates the file 0600; give it the mode a plain open() would (or the old file's).
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_model(model: nn.Module, path: PathLike, overwrite: bool = False, extra: Optional[dict] = None) -> Path:
    """Save weights and settings as one `.safetensors` file that `load_model` rebuilds.

    Args:
        model: a DynamicViT or a dense timm ViT.
        path: destination file.
        overwrite: replace an existing file; otherwise an existing file is an error.
        extra: JSON-serializable information stored with the settings (e.g. training settings).
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path} already exists; choose another path or pass overwrite=True")
    settings = model_settings(model)
    if extra:
        settings["extra"] = extra
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={METADATA_KEY: json.dumps(settings)}))
    return path


# -- reading ------------------------------------------------------------------------------------


def read_checkpoint(path: PathLike) -> tuple[dict[str, torch.Tensor], Optional[dict]]:
    """Read a checkpoint file of any supported format: (state_dict, our settings or None)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: check the path (a .safetensors, .pth or .pt file)")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; pass the checkpoint file inside it")
    with open(path, "rb") as f:
        head = f.read(16)
    if _looks_like_safetensors(head):
        return _read_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means the file is not a readable checkpoint
        raise CheckpointError(
            f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; "
            "the file is truncated, corrupt or not a PyTorch/safetensors checkpoint"
        ) from None
    return _unwrap(obj, path)


def read_settings(path: PathLike) -> Optional[dict]:
    """Our settings stored in a checkpoint, or None; reads only the header of a safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 - not (readable) safetensors: read_checkpoint says why, or reads torch files
        return read_checkpoint(path)[1]
    return json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else None


def _looks_like_safetensors(head: bytes) -> bool:
    # 8-byte little-endian header length followed by a JSON object.
    return len(head) >= 9 and head[8:9] == b"{"


def _read_safetensors(path: Path) -> tuple[dict, Optional[dict]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(
            f"cannot read safetensors checkpoint {path}: {e}; the file is truncated or corrupt"
        ) from None
    settings = json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else None
    return state, settings


def _unwrap(obj: Any, path: Path) -> tuple[dict, Optional[dict]]:
    settings = None
    if isinstance(obj, dict) and METADATA_KEY in obj and isinstance(obj[METADATA_KEY], dict):
        settings = obj[METADATA_KEY]
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{path} holds no state dict (expected tensors by name, or a dict with a 'model' entry)"
        )
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}
    return state, settings


# -- loading into a model -----------------------------------------------------------------------


def is_reference_format(state: dict) -> bool:
    return any(k.startswith("score_predictor.") for k in state)


def is_own_format(state: dict) -> bool:
    return any(k.startswith("backbone.") for k in state)


def to_own_keys(state: dict, backbone: nn.Module) -> tuple[dict, bool]:
    """Map any supported layout onto DynamicViT's keys: (state, has_predictors)."""
    if is_own_format(state):
        # Resize the position embedding etc. when the model is built for another image size.
        dense = filter_dense_state({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}, backbone)
        rest = {k: v for k, v in state.items() if not k.startswith("backbone.")}
        return {**{"backbone." + k: v for k, v in dense.items()}, **rest}, any(k.startswith("predictors.") for k in rest)
    predictors = {
        "predictors." + k[len("score_predictor."):]: v for k, v in state.items() if k.startswith("score_predictor.")
    }
    dense = {k: v for k, v in state.items() if not k.startswith("score_predictor.")}
    dense = filter_dense_state(dense, backbone)
    return {**{"backbone." + k: v for k, v in dense.items()}, **predictors}, bool(predictors)


def filter_dense_state(state: dict, model: nn.Module) -> dict:
    """The host family's adaptation of dense weights (position embedding resize, foreign layouts)."""
    from .hosts import host_for

    return host_for(model).filter_state(state)


def load_state(model: nn.Module, state: dict, source: str, allow_missing_prefix: str = "", reset_head: bool = False) -> None:
    """Load `state` into `model` strictly, with one clear error listing every offending key.

    Args:
        allow_missing_prefix: keys under this prefix may be absent (kept as initialized).
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
        reset = {k for k in mismatched if k.split(".")[-2] in ("head", "head_dist")}
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
    model.load_state_dict(state, strict=False)


def _short(keys: list, n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")


def load_weights(model: nn.Module, path: PathLike) -> Optional[dict]:
    """Load any supported checkpoint into a DynamicViT; returns our settings if the file had them."""
    state, settings = read_checkpoint(path)
    state, has_predictors = to_own_keys(state, model.backbone)
    load_state(
        model,
        state,
        source=f"checkpoint {path}",
        allow_missing_prefix="" if has_predictors else "predictors.",
        reset_head=not has_predictors and settings is None,
    )
    if not has_predictors:
        _logger.info("loaded dense weights from %s; prediction modules are freshly initialized", path)
    return settings


def load_model(path: PathLike, keep_ratio: Optional[float] = None, **overrides) -> nn.Module:
    """Rebuild a model saved by `save_model` (or a training checkpoint) and load its weights.

    Returns a DynamicViT, or the dense timm model for a dense checkpoint.

    Args:
        keep_ratio: change the keep ratio of a DynamicViT (no retraining needed).
        overrides: timm keyword arguments that replace the stored ones.
    """
    import timm

    from .factory import create_model

    state, settings = read_checkpoint(path)
    if settings is None:
        raise CheckpointError(
            f"{path} holds weights without dynamicvit settings; use "
            "dynamicvit.create_model(NAME, checkpoint_path=PATH) and name the architecture"
        )
    kwargs = {**settings.get("timm_kwargs", {}), **overrides}
    if settings.get("kind") == "dense":
        model = timm.create_model(settings["model_name"], **kwargs)
        model.dynamicvit_timm_kwargs = kwargs
        load_state(model, filter_dense_state(state, model), source=f"checkpoint {path}")
        return model
    model = create_model(
        settings["model_name"],
        keep_ratio=settings["keep_ratio"],
        prune_locs=settings["prune_locs"],
        fuse_dropped=bool(settings.get("fuse_dropped", False)),
        **kwargs,
    )
    if settings.get("keep_ratio_range"):
        model.set_keep_ratio_range(settings["keep_ratio_range"])
    state, _ = to_own_keys(state, model.backbone)
    load_state(model, state, source=f"checkpoint {path}")
    if keep_ratio is not None:
        model.set_keep_ratio(keep_ratio)
    return model
