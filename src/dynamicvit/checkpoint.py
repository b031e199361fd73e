"""Reading and writing weights.

Formats understood when loading:
- ours: a `.safetensors` file whose metadata holds the settings needed to rebuild the model
  (`save_model` / `load_model`), or a torch file `{'model': state_dict, 'dynamicvit': settings, ...}`
  as written by the training loop;
- the reference DynamicViT checkpoints: `{'model': state_dict}` with `score_predictor.{s}.*` keys;
- the authors' DynamicCNN / DynamicSwin checkpoints (ConvNeXt, Swin; see `SpatialHost.split_reference`);
- plain timm / DeiT weights (a state dict, or `{'model': ...}` / `{'state_dict': ...}`): the
  backbone is loaded and the prediction modules keep their fresh initialization;
- LV-ViT: the original release (e.g. lvvit_s-26M-224-83.3.pth.tar, a state dict or a wrapper as above)
  and the reference DynamicViT-LV-ViT checkpoints (`{'model': ...}` with `score_predictor.{s}.*`).
Each host family adapts its dense weights (`Host.filter_state`: position embedding resize, ...).

A load never succeeds partially: missing, unexpected or mis-shaped keys raise `CheckpointError`
listing them.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn as nn

from .errors import CheckpointError, OutputError

_logger = logging.getLogger(__name__)

METADATA_KEY = "dynamicvit"
FORMAT_VERSION = 1
PathLike = Union[str, os.PathLike]


# -- settings -----------------------------------------------------------------------------------


def model_settings(model: nn.Module) -> dict:
    """What is needed to rebuild `model` (a DynamicViT or a dense timm ViT) before loading weights."""
    from .model import DynamicViT
    from .spatial import DynamicSpatial

    if isinstance(model, DynamicSpatial):
        return {"format_version": FORMAT_VERSION, **model.settings()}
    if isinstance(model, DynamicViT):
        return {
            "format_version": FORMAT_VERSION,
            "kind": "dynamicvit",
            "model_name": model.model_name,
            "timm_kwargs": architecture_kwargs(model.timm_kwargs),
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
        "timm_kwargs": architecture_kwargs(getattr(model, "dynamicvit_timm_kwargs", getattr(model, "_model_args", {}))),
    }


def architecture_kwargs(kwargs: dict) -> dict:
    """The timm arguments worth storing: those that shape the architecture (see `ARCHITECTURE_KWARGS`)."""
    dropped = sorted(k for k in kwargs if k not in ARCHITECTURE_KWARGS)
    if dropped:
        _logger.debug("not stored with the weights (not architecture settings): %s", dropped)
    return {k: v for k, v in kwargs.items() if k in ARCHITECTURE_KWARGS}


# -- writing ------------------------------------------------------------------------------------


def atomic_write(path: PathLike, write_fn) -> None:
    """Call `write_fn(tmp_path)`, then move the file into place: a crash never leaves a half-written `path`.

    Raises:
        OutputError: the folder or the file cannot be written (a file in the way, no permission, disk
            full); `path` is then as it was before the call.
    """
    from .outputs import describe_os_error, temp_name_prefix

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temp_name_prefix(path.name), suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {describe_os_error(e)}; choose a writable folder") from None
    try:
        write_fn(tmp)
        # mkstemp creates the file 0600; give it the mode a plain open() would (or the old file's).
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(_write_failed(path, describe_os_error(e))) from None
    except RuntimeError as e:  # torch.save's zip writer reports a full disk as "file write failed"
        if "write" not in str(e):
            raise
        raise OutputError(_write_failed(path, f"the writer failed ({str(e).splitlines()[-1].strip()}), is the disk full?")) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_failed(path: Path, why: str) -> str:
    kept = "the previous file is intact" if path.exists() else "nothing was written"
    return f"cannot write {path}: {why}; {kept}. Free some space or choose another folder"


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


def read_checkpoint(path: PathLike, bad_settings: str = "raise") -> tuple[dict[str, torch.Tensor], Optional[dict]]:
    """Read a checkpoint file of any supported format: (state_dict, our settings or None).

    Args:
        bad_settings: what to do when the stored settings are unreadable or not allowed (see
            `check_settings`): "raise" a `CheckpointError`, or "ignore" them with a warning (for callers
            that name the architecture themselves and need only the weights).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: check the path (a .safetensors, .pth or .pt file)")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; pass the checkpoint file inside it")
    with open(path, "rb") as f:
        head = f.read(16)
    if _looks_like_safetensors(head):
        state, raw = _read_safetensors(path)
        return state, _settings_or_none(raw, path, bad_settings)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means the file is not a readable checkpoint
        raise CheckpointError(
            f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; "
            "the file is truncated, corrupt or not a PyTorch/safetensors checkpoint"
        ) from None
    state, raw = _unwrap(obj, path)
    return state, _settings_or_none(raw, path, bad_settings)


def read_settings(path: PathLike) -> Optional[dict]:
    """Our settings stored in a checkpoint (checked, see `check_settings`), or None; reads only the
    header of a safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 - not (readable) safetensors: read_checkpoint says why, or reads torch files
        return read_checkpoint(path)[1]
    return check_settings(meta[METADATA_KEY], path) if METADATA_KEY in meta else None


# timm.create_model arguments that describe an architecture: the only ones a checkpoint may set. Anything
# else (pretrained, pretrained_cfg, pretrained_cfg_overlay, checkpoint_path, cache_dir, ...) could make
# timm download weights or open another file, so a checkpoint that stores it is refused.
ARCHITECTURE_KWARGS = frozenset({
    "img_size", "patch_size", "in_chans", "num_classes", "global_pool", "embed_dim", "depth", "num_heads",
    "mlp_ratio", "qkv_bias", "qk_norm", "scale_attn_norm", "scale_mlp_norm", "proj_bias", "init_values",
    "class_token", "pos_embed", "no_embed_class", "reg_tokens", "pre_norm", "final_norm", "fc_norm",
    "pool_include_prefix", "dynamic_img_size", "dynamic_img_pad", "drop_rate", "pos_drop_rate", "patch_drop_rate",
    "proj_drop_rate", "attn_drop_rate", "drop_path_rate", "weight_init", "fix_init", "norm_layer", "act_layer",
    # LV-ViT
    "skip_lam",
    # ConvNeXt and Swin
    "depths", "dims", "kernel_sizes", "ls_init_value", "stem_type", "conv_mlp", "conv_bias", "use_grn",
    "head_norm_first", "head_hidden_size", "window_size", "strict_img_size", "head_dim", "always_partition",
})
KINDS = ("dynamicvit", "dense")


def check_settings(raw: Any, path: PathLike) -> dict:
    """Parse and check the settings stored in a checkpoint before anything is built from them.

    The model name must be a timm architecture (no hub or local-folder source), `timm_kwargs` may hold
    only `ARCHITECTURE_KWARGS` with plain values, and the sparsity settings must have their types.

    Raises:
        CheckpointError: naming the file and what is wrong with its settings.
    """
    import timm

    where = f"the settings stored in {path}"
    if isinstance(raw, (str, bytes)):
        try:
            raw = json.loads(raw)
        except ValueError as e:
            raise CheckpointError(
                f"{where} are not valid JSON ({e}); the file is damaged. To use its weights, name the architecture: "
                "dynamicvit.create_model(NAME, checkpoint_path=PATH)"
            ) from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where} are a {type(raw).__name__}, not a mapping; the file is damaged or not ours")
    settings = dict(raw)
    if settings.get("kind", "dynamicvit") not in KINDS:
        raise CheckpointError(f"{where} name an unknown kind {settings.get('kind')!r} (expected one of {KINDS})")
    version = settings.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
        raise CheckpointError(f"{where} have format version {version!r}; this dynamicvit reads up to {FORMAT_VERSION}, "
                              "upgrade it")
    name = settings.get("model_name")
    if not isinstance(name, str) or ":" in name or not timm.is_model(name):
        raise CheckpointError(
            f"{where} name the model {name!r}, which is not a timm architecture here; to use the weights, name the "
            "architecture: dynamicvit.create_model(NAME, checkpoint_path=PATH)"
        )
    kwargs = settings.get("timm_kwargs", {})
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{where} hold timm_kwargs of type {type(kwargs).__name__}, not a mapping")
    refused = sorted(k for k in kwargs if k not in ARCHITECTURE_KWARGS)
    if refused:
        raise CheckpointError(
            f"{where} hold timm arguments that are not architecture settings: {refused}; refused, since they could "
            "make timm download weights or open files. Pass what you need yourself, e.g. load_model(path, **kwargs)"
        )
    odd = sorted(k for k, v in kwargs.items() if not _plain(v))
    if odd:
        raise CheckpointError(f"{where} hold timm arguments with values that are not numbers, strings or lists: {odd}")
    if settings.get("kind", "dynamicvit") == "dynamicvit":
        ratio, locs = settings.get("keep_ratio"), settings.get("prune_locs")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
            raise CheckpointError(f"{where} hold keep_ratio {ratio!r}; expected a number")
        if not isinstance(locs, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in locs):
            raise CheckpointError(f"{where} hold prune_locs {locs!r}; expected a list of block indices")
    return settings


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, (list, tuple)) and all(v is None or isinstance(v, (bool, int, float, str)) for v in value)


def _settings_or_none(raw: Any, path: PathLike, bad_settings: str) -> Optional[dict]:
    if raw is None:
        return None
    try:
        return check_settings(raw, path)
    except CheckpointError as e:
        if bad_settings == "raise":
            raise
        _logger.warning("ignoring the settings stored in %s (%s); loading its weights only", path, str(e).split("; ")[0])
        return None


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
    return state, meta.get(METADATA_KEY)


def _unwrap(obj: Any, path: Path) -> tuple[dict, Optional[dict]]:
    settings = obj.get(METADATA_KEY) if isinstance(obj, dict) else None
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
    """The authors' checkpoints: `score_predictor.*` (DynamicViT, DynamicCNN), `layers.2.score_predictor.*` (DynamicSwin)."""
    return any(k.startswith("score_predictor.") or ".score_predictor." in k for k in state)


def is_own_format(state: dict) -> bool:
    return any(k.startswith("backbone.") for k in state)


def has_predictor_weights(state: dict) -> bool:
    """Weights of prediction modules in any layout: the authors' (`score_predictor`) or ours (`predictors.`)."""
    return is_reference_format(state) or any(k.startswith("predictors.") for k in state)


def to_own_keys(state: dict, backbone: nn.Module) -> tuple[dict, bool]:
    """Map any supported layout onto DynamicViT's (or DynamicSpatial's) keys: (state, has_predictors)."""
    from .hosts import is_spatial, spatial_host_for

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
    from .hosts import host_for, is_spatial, spatial_host_for

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


def load_weights(model: nn.Module, path: PathLike, checkpoint: Optional[tuple[dict, Optional[dict]]] = None) -> Optional[dict]:
    """Load any supported checkpoint into a DynamicViT; returns our settings if the file had them.

    Args:
        checkpoint: `read_checkpoint(path)`'s result when the caller has read the file already.

    Raises:
        CheckpointError: the weights do not fit, hold NaN/Inf, or the file's settings say it is another
            architecture or prunes before other blocks than `model` (its predictors would sit in the
            wrong places: a silently wrong model).
    """
    state, settings = checkpoint if checkpoint is not None else read_checkpoint(path)
    if settings is not None:
        check_settings_match(model, settings, path)
    load_foreign_state(model, state, f"checkpoint {path}", reset_head=settings is None)
    return settings


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


def check_settings_match(model: nn.Module, settings: dict, path: PathLike) -> None:
    """Raise `CheckpointError` when a checkpoint's settings describe another model than `model`."""
    settings_win(settings, path, getattr(model, "model_name", None), getattr(model, "prune_locs", None))


# timm arguments that may differ from a checkpoint's: the weights adapt (img_size: the position
# embedding is resized) or do not depend on them (regularization).
ADJUSTABLE_KWARGS = frozenset({"img_size", "drop_rate", "pos_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate"})


def settings_win(
    settings: dict,
    path: PathLike,
    name: Optional[str] = None,
    prune_locs: Optional[Sequence[int]] = None,
    timm_kwargs: Optional[dict] = None,
) -> tuple[Optional[tuple[int, ...]], dict]:
    """The checkpoint's own settings, checked against what a caller asked for explicitly.

    Args:
        settings: the checkpoint's settings (`check_settings`).
        name, prune_locs, timm_kwargs: the caller's explicit choices (None: not given).

    Returns:
        (prune_locs, timm_kwargs) to build the model with: the checkpoint's, with the explicit timm
        arguments that may change (`ADJUSTABLE_KWARGS`) on top.

    Raises:
        CheckpointError: an explicit choice contradicts the checkpoint; the message names both values.
    """
    timm_kwargs = dict(timm_kwargs or {})
    if name is not None and settings["model_name"] != name:
        raise CheckpointError(
            f"{path} holds a {settings['model_name']}, not a {name}; ask for {settings['model_name']} "
            "(or leave the name out: dynamicvit.load_model(path) reads it from the file)"
        )
    stored = settings.get("timm_kwargs", {})
    clashes = [k for k, v in timm_kwargs.items() if k in stored and v != stored[k] and k not in ADJUSTABLE_KWARGS]
    if clashes:
        raise CheckpointError(
            f"{path} was saved with " + ", ".join(f"{k}={stored[k]!r}" for k in clashes) + " but "
            + ", ".join(f"{k}={timm_kwargs[k]!r}" for k in clashes) + " was asked for; drop the argument(s) "
            "(the checkpoint's settings are used)"
        )
    if settings.get("kind", "dynamicvit") == "dynamicvit":
        stored_locs = tuple(settings["prune_locs"])
        if prune_locs is not None and tuple(prune_locs) != stored_locs:
            raise CheckpointError(
                f"{path} was trained to prune before blocks {list(stored_locs)}, but prune_locs={list(prune_locs)} "
                "was asked for; drop prune_locs (the checkpoint's are used)"
            )
        prune_locs = stored_locs
    return prune_locs, {**stored, **timm_kwargs}
