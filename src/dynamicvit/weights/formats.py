"""Checkpoint files: reading any supported format, checking the settings stored in it before anything
is built from them, and writing ours. Nothing here builds a model (that is `weights.build`).

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
How each layout maps onto a model's keys is `core.layouts`.

A load never succeeds partially: missing, unexpected or mis-shaped keys raise `CheckpointError`
listing them.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from ..core.base import SparseModel
from ..core.hosts.hf import ATTN_IMPLEMENTATIONS, SUPPORTED, HFHost, is_transformers_model
from ..core.layouts import load_foreign_state
from ..core.settings import BUDGETS
from ..errors import CheckpointError
from ..files import PathLike, atomic_write
from ..text import short_repr

_logger = logging.getLogger(__name__)

METADATA_KEY = "dynamicvit"
FORMAT_VERSION = 1
# The largest image side a file may ask for (settings' img_size, an ONNX file's input size): beyond any
# timm model's, and small enough that a crafted file cannot make a transform or a model allocate gigabytes.
MAX_IMAGE_SIDE = 4096
MAX_DEPTH = 1000  # blocks in a model (timm's deepest have about 100)


# -- settings -----------------------------------------------------------------------------------


def model_settings(model: nn.Module) -> dict:
    """What is needed to rebuild `model` (a sparse model or a dense timm model) before loading weights."""
    if isinstance(model, SparseModel):
        settings = model.settings()
        return {"format_version": FORMAT_VERSION, **settings, "timm_kwargs": architecture_kwargs(settings["timm_kwargs"])}
    if is_transformers_model(model):
        host = HFHost(model)
        return {"format_version": FORMAT_VERSION, "kind": "dense", "model_name": host.architecture, "timm_kwargs": {},
                **host.settings()}
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
        raise CheckpointError(f"{path} is a folder; pass the checkpoint file inside it (a transformers model folder: hf:{path})")
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
    only `ARCHITECTURE_KWARGS` with plain finite values (an image size of at most `MAX_IMAGE_SIDE`),
    the sparsity settings and the parts of `extra` that are used (class names, training dataset) must
    have their types. Whether the values build a model of the file's size is checked when it is built
    (`weights.build`). A transformers model ("hf:CLASS") is described by a `transformers` entry instead
    of a timm name (`check_transformers`).

    Raises:
        CheckpointError: naming the file and what is wrong with its settings.
    """
    import timm

    where = f"the settings stored in {path}"
    settings = _parse(raw, where)
    if settings.get("kind", "dynamicvit") not in KINDS:
        raise CheckpointError(f"{where} name an unknown kind {short_repr(settings.get('kind'))} (expected one of {KINDS})")
    version = settings.get("format_version", FORMAT_VERSION)
    if not is_int(version) or version > FORMAT_VERSION:
        raise CheckpointError(f"{where} have format version {short_repr(version)}; this dynamicvit reads up to "
                              f"{FORMAT_VERSION}, upgrade it")
    name = settings.get("model_name")
    if "transformers" in settings or (isinstance(name, str) and name.startswith("hf:")):
        check_transformers(settings, where)
    elif not isinstance(name, str) or ":" in name or not timm.is_model(name):
        raise CheckpointError(
            f"{where} name the model {short_repr(name)}, which is not a timm architecture here; to use the weights, "
            "name the architecture: dynamicvit.create_model(NAME, checkpoint_path=PATH)"
        )
    _check_kwargs(settings.get("timm_kwargs", {}), where)
    if settings.get("kind", "dynamicvit") == "dynamicvit":
        _check_sparsity(settings, where)
    _check_extra(settings.get("extra"), where)
    return settings


def _parse(raw: Any, where: str) -> dict:
    if isinstance(raw, (str, bytes)):
        try:
            raw = json.loads(raw)
        except (ValueError, RecursionError) as e:
            why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
            raise CheckpointError(
                f"{where} are not valid JSON ({why}); the file is damaged. To use its weights, name the architecture: "
                "dynamicvit.create_model(NAME, checkpoint_path=PATH)"
            ) from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where} are a {type(raw).__name__}, not a mapping; the file is damaged or not ours")
    return dict(raw)


def _check_kwargs(kwargs: Any, where: str) -> None:
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{where} hold timm_kwargs of type {type(kwargs).__name__}, not a mapping")
    refused = sorted(k for k in kwargs if k not in ARCHITECTURE_KWARGS)
    if refused:
        raise CheckpointError(
            f"{where} hold timm arguments that are not architecture settings: {short_repr(refused)}; refused, since "
            "they could make timm download weights or open files. Pass what you need yourself, e.g. load_model(path, **kwargs)"
        )
    odd = sorted(k for k, v in kwargs.items() if not _plain(v))
    if odd:
        raise CheckpointError(f"{where} hold timm arguments with values that are not finite numbers, strings or "
                              f"flat lists: {odd}")
    size = kwargs.get("img_size")
    sides = size if isinstance(size, list) and len(size) == 2 else [size]
    if size is not None and not all(is_int(v) and 1 <= v <= MAX_IMAGE_SIDE for v in sides):
        raise CheckpointError(f"{where} hold img_size {short_repr(size)}; expected a size (or [height, width]) of 1 "
                              f"to {MAX_IMAGE_SIDE} pixels")
    # Blocks are Python objects even on the meta device: their number is bounded before anything is built.
    depth = kwargs.get("depth", 0)
    depths = kwargs.get("depths") if isinstance(kwargs.get("depths"), list) else [0]
    if not all(is_int(d) and 0 <= d <= MAX_DEPTH for d in [depth, *depths]) or sum(depths) > MAX_DEPTH:
        raise CheckpointError(f"{where} hold depth {short_repr(depth)} / depths {short_repr(kwargs.get('depths'))}; "
                              f"expected at most {MAX_DEPTH} blocks")


def _check_sparsity(settings: dict, where: str) -> None:
    ratio, locs = settings.get("keep_ratio"), settings.get("prune_locs")
    if not is_number(ratio) or not 0 < ratio <= 1:
        raise CheckpointError(f"{where} hold keep_ratio {short_repr(ratio)}; expected a number in (0, 1]")
    if not isinstance(locs, list) or not all(is_int(i) for i in locs):
        raise CheckpointError(f"{where} hold prune_locs {short_repr(locs)}; expected a list of block indices")
    for key, ok, expected in (
        ("stage_ratios", lambda v: isinstance(v, list) and all(is_number(r) for r in v), "a list of numbers"),
        ("keep_ratio_range", lambda v: isinstance(v, list) and len(v) == 2 and all(is_number(r) for r in v),
         "[low, high]"),
        ("restart_streams", lambda v: isinstance(v, bool), "true or false"),
        ("fuse_dropped", lambda v: isinstance(v, bool), "true or false"),
        ("merge_dropped", lambda v: isinstance(v, bool), "true or false"),
        ("predictor_width", lambda v: is_int(v) and 4 <= v <= 65536 and v % 4 == 0, "a multiple of 4"),
    ):
        if settings.get(key) is not None and not ok(settings[key]):
            raise CheckpointError(f"{where} hold {key} {short_repr(settings[key])}; expected {expected}")
    if settings.get("fuse_dropped") and settings.get("merge_dropped"):
        raise CheckpointError(f"{where} set both fuse_dropped and merge_dropped, which exclude each other; "
                              "the file is damaged or not ours")
    _check_budget(settings, where)


def _check_extra(extra: Any, where: str) -> None:
    """The parts of `extra` that commands use; the rest is the writer's record and stays as it is."""
    if extra is None:
        return
    if not isinstance(extra, dict):
        raise CheckpointError(f"{where} hold extra {short_repr(extra)}; expected an object")
    names = extra.get("class_names")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise CheckpointError(f"{where} hold class_names {short_repr(names)}; expected a list of strings")
    config = extra.get("train_config")
    if config is not None and not isinstance(config, dict):
        raise CheckpointError(f"{where} hold train_config {short_repr(config)}; expected an object")
    dataset = (config or {}).get("dataset")
    if dataset is not None and not isinstance(dataset, str):
        raise CheckpointError(f"{where} hold train_config.dataset {short_repr(dataset)}; expected a name")


def is_int(value: Any) -> bool:
    """An int that is not a bool (JSON true would pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float that is not a bool (Python's JSON reads NaN and Infinity)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# config.json entries that make transformers run custom code or load other packages: never stored.
REFUSED_CONFIG_KEYS = frozenset({"auto_map", "quantization_config", "custom_pipelines", "trust_remote_code"})


def check_transformers(settings: dict, where: str) -> None:
    """Check the `transformers` entry of stored settings: a supported class (by name, never imported
    from elsewhere), its config as plain JSON with the class's model_type and nothing that runs custom
    code, the attention implementation, the run size and the image processor's settings."""
    block = settings.get("transformers")
    if not isinstance(block, dict):
        raise CheckpointError(f"{where} name a transformers model {settings.get('model_name')!r} but hold no "
                              "`transformers` entry describing it; the file is damaged")
    name, config = block.get("class"), block.get("config")
    if name not in SUPPORTED or settings.get("model_name") != f"hf:{name}":
        raise CheckpointError(f"{where} name the transformers class {name!r} (model {settings.get('model_name')!r}); "
                              f"supported: {', '.join(SUPPORTED)}")
    if not isinstance(config, dict) or not _plain_json(config):
        raise CheckpointError(f"{where} hold a transformers config that is not a JSON object of plain values")
    refused = sorted(REFUSED_CONFIG_KEYS & set(config))
    if refused:
        raise CheckpointError(f"{where} hold a transformers config with {refused}, which could run custom code; refused")
    if config.get("model_type") != SUPPORTED[name].model_type:
        raise CheckpointError(f"{where} hold a {name} config of model_type {config.get('model_type')!r}, not "
                              f"{SUPPORTED[name].model_type!r}")
    if block.get("attn_implementation") not in ATTN_IMPLEMENTATIONS:
        raise CheckpointError(f"{where} hold attn_implementation {block.get('attn_implementation')!r}; expected one of "
                              f"{ATTN_IMPLEMENTATIONS}")
    size = block.get("img_size")
    if size is not None and not (isinstance(size, list) and len(size) == 2
                                 and all(is_int(v) and 0 < v <= MAX_IMAGE_SIDE for v in size)):
        raise CheckpointError(f"{where} hold img_size {size!r}; expected [height, width]")
    processor = block.get("processor")
    if processor is not None and not (isinstance(processor, dict) and _plain_json(processor)):
        raise CheckpointError(f"{where} hold image-processor settings that are not a JSON object of plain values")
    if settings.get("timm_kwargs"):
        raise CheckpointError(f"{where} hold timm arguments for a transformers model; the file is damaged")


def _plain_json(value: Any, depth: int = 0) -> bool:
    """Numbers, strings, booleans, None, and lists / string-keyed objects of them (a few levels deep)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if depth > 4:
        return False
    if isinstance(value, list):
        return all(_plain_json(v, depth + 1) for v in value)
    return isinstance(value, dict) and all(isinstance(k, str) and _plain_json(v, depth + 1) for k, v in value.items())


def _check_budget(settings: dict, where: str) -> None:
    """The per-image budget's settings: budget, thresholds {keep ratio: [t_s per stage]}, min_keep."""
    budget = settings.get("budget", "fixed")
    if budget not in BUDGETS:
        raise CheckpointError(f"{where} hold budget {short_repr(budget)}; expected one of {', '.join(BUDGETS)}")
    table, least = settings.get("thresholds", {}), settings.get("min_keep", 1)
    if isinstance(least, bool) or not isinstance(least, int) or least < 1:
        raise CheckpointError(f"{where} hold min_keep {short_repr(least)}; expected a whole number of tokens, at least 1")
    if not isinstance(table, dict):
        raise CheckpointError(f"{where} hold thresholds of type {type(table).__name__}; expected {{keep ratio: [t_1, ...]}}")
    for ratio, values in table.items():
        try:
            ok = 0 < float(ratio) <= 1 and isinstance(values, list) and len(values) == len(settings["prune_locs"])
        except ValueError:
            ok = False
        if not ok or not all(isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t < 1 for t in values):
            raise CheckpointError(
                f"{where} hold thresholds {short_repr(ratio)}: {short_repr(values)}; expected a keep ratio in (0, 1] with one threshold in "
                f"(0, 1) per stage ({len(settings['prune_locs'])}); recalibrate with `dynamicvit calibrate`"
            )
    if budget == "per-image" and not any(abs(float(r) - settings["keep_ratio"]) < 1e-9 for r in table):
        raise CheckpointError(
            f"{where} ask for the per-image budget at keep ratio {settings['keep_ratio']} but hold no thresholds for it; "
            "recalibrate with `dynamicvit calibrate`"
        )


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, str)) or is_number(value):
        return True
    return isinstance(value, (list, tuple)) and all(v is None or isinstance(v, (bool, int, str)) or is_number(v) for v in value)


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


def load_weights(model: nn.Module, path: PathLike, checkpoint: Optional[tuple[dict, Optional[dict]]] = None) -> Optional[dict]:
    """Load any supported checkpoint into a sparse model; returns our settings if the file had them.

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
