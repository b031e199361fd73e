"""Hugging Face transformers models: from local folders, from the settings stored in our checkpoints, and
back into folders that transformers and dynamicvit both read.

- `build_backbone("hf:DIR")`: the dense model of a folder written by `save_pretrained` (config.json,
  weights, preprocessor_config.json), with transformers' own loader, local files only, no remote code.
  A hub name is not fetched: the error says to download it and pass the folder.
- `rebuild_backbone(settings["transformers"])`: the same class from the config JSON a checkpoint stores
  (`HFHost.settings`); nothing is opened or downloaded, and no class outside `SUPPORTED` is built.
- `save_pretrained(model, DIR)` / `load_folder("hf:DIR")`: a sparse model as a transformers folder
  (config.json, model.safetensors of the backbone, preprocessor_config.json) plus `dynamicvit.safetensors`
  (the prediction modules, with the sparsity settings): `AutoModel.from_pretrained(DIR)` still gives
  the dense model, dynamicvit the sparse one.

timm-style arguments map onto the config where there is a counterpart (`CONFIG_KWARGS`; regularization
without one is ignored with a warning, anything else is an error); `num_classes`
re-initializes a classifier of another size, `img_size` sets the size the model runs at (its position
table interpolated by the model's own code). By default a model runs at the size its image processor
makes (`_processor_size`), else at config.image_size.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from ..core.hosts.hf import ATTN_IMPLEMENTATIONS, MIN_TRANSFORMERS, SUPPORTED, HFHost, is_transformers_model
from ..core.layouts import load_state
from ..core.settings import DEFAULT_KEEP_RATIO
from ..core.vit import DynamicViT
from ..errors import CheckpointError, ConfigError, OutputError
from ..extras import require
from ..files import PathLike, atomic_write, describe_os_error
from .formats import METADATA_KEY, model_settings, read_checkpoint, settings_win

_logger = logging.getLogger(__name__)

PREFIX = "hf:"
PREDICTORS_FILE = "dynamicvit.safetensors"
PROCESSOR_FILE = "preprocessor_config.json"
# timm arguments -> the config fields that mean the same (the first one the config has is set).
CONFIG_KWARGS = {
    "drop_rate": ("hidden_dropout_prob",),
    "attn_drop_rate": ("attention_probs_dropout_prob", "attention_dropout"),
    "drop_path_rate": ("drop_path_rate",),
}


def is_hf_spec(spec: Any) -> bool:
    """True for "hf:DIR" (a transformers model folder named on the command line or in `create_model`)."""
    return isinstance(spec, (str, os.PathLike)) and str(spec).startswith(PREFIX)


def require_transformers():
    """The transformers module, or a one-line error naming the extra (missing) or the version (too old)."""
    transformers = require("transformers", "transformers models (hf:...)")
    from packaging.version import Version

    if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
        raise ConfigError(
            f"transformers {transformers.__version__} is older than {MIN_TRANSFORMERS}, whose layer layout dynamicvit "
            f"follows; upgrade it: pip install -U 'transformers>={MIN_TRANSFORMERS}'"
        )
    return transformers


def has_predictors(spec: PathLike) -> bool:
    """True when the transformers folder holds prediction modules saved by `save_pretrained`."""
    return (hf_folder(spec) / PREDICTORS_FILE).is_file()


def hf_folder(spec: PathLike) -> Path:
    """The local folder "hf:DIR" names; a hub name or a folder without config.json is an error."""
    text = str(spec)[len(PREFIX):] if is_hf_spec(spec) else str(spec)
    path = Path(text).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_dir():
        raise CheckpointError(f"{path} has no config.json; pass a folder written by a transformers model's save_pretrained")
    raise CheckpointError(
        f"hf:{text} is not a local folder; dynamicvit reads transformers models from a directory written by "
        f"save_pretrained: download it where the network allows (hf download {text} --local-dir DIR) and pass hf:DIR"
    )


# -- building -------------------------------------------------------------------------------------


def build_backbone(spec: PathLike, **kwargs) -> nn.Module:
    """The dense transformers model of a local folder ("hf:DIR"), float32.

    Args:
        kwargs: `num_classes`, `in_chans`, `img_size`, `attn_implementation` and the regularization
            arguments of `CONFIG_KWARGS`; anything else is an error (the architecture is config.json's).
    """
    folder = hf_folder(spec)
    config = _read_json(folder / "config.json", "config.json")
    name = _class_of(config, folder)
    img_size, args = _load_args(name, config, kwargs)
    transformers = require_transformers()
    cls = getattr(transformers, name)
    try:
        with _quiet(transformers):
            model = cls.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False, dtype=torch.float32,
                                        **args)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad folder
        raise CheckpointError(f"transformers could not load {folder}: {type(e).__name__}: {_first_line(e)}") from None
    path = folder / PROCESSOR_FILE
    processor = _read_json(path, PROCESSOR_FILE) if path.is_file() else None
    _attach(model, img_size or _processor_size(processor), processor)
    return model


def rebuild_backbone(stored: dict, overrides: Optional[dict] = None) -> nn.Module:
    """The transformers model a checkpoint's settings describe (`settings["transformers"]`, already
    checked by `check_settings`), with fresh weights; nothing is opened or downloaded.

    Args:
        overrides: `attn_implementation`, `img_size` and the regularization arguments of `CONFIG_KWARGS`.
    """
    name = stored["class"]
    overrides = dict(overrides or {})
    if overrides.get("num_classes") not in (None, _num_labels(name, stored["config"])):
        raise CheckpointError(
            f"the checkpoint holds a {name} for {_num_labels(name, stored['config'])} classes, not "
            f"{overrides['num_classes']}; drop num_classes (the checkpoint's is used)"
        )
    overrides.pop("num_classes", None)
    img_size, args = _load_args(name, stored["config"], {"attn_implementation": stored["attn_implementation"],
                                                          "img_size": stored.get("img_size"), **overrides})
    cls = getattr(require_transformers(), name)
    config = cls.config_class.from_dict(dict(stored["config"]))
    impl = args.pop("attn_implementation", None)
    for key, value in args.items():
        setattr(config, key, value)
    model = cls._from_config(config, attn_implementation=impl, dtype=torch.float32)
    _attach(model, img_size, stored.get("processor"))
    return model


def load_folder(
    spec: PathLike,
    keep_ratio: Optional[float] = None,
    prune_locs: Optional[Sequence[int]] = None,
    sparse: bool = False,
    fuse_dropped: Optional[bool] = None,
    **kwargs,
) -> nn.Module:
    """The model of a transformers folder: a DynamicViT when it holds our prediction modules
    (`save_pretrained`) or `sparse` is asked for (fresh prediction modules), else the dense model.

    Args:
        keep_ratio, prune_locs, fuse_dropped: for fresh prediction modules; a folder's own settings win
            (a keep ratio may differ; other contradicting choices are an error naming both).
        kwargs: see `build_backbone`.
    """
    folder = hf_folder(spec)
    stored = folder / PREDICTORS_FILE
    if not stored.is_file():
        backbone = build_backbone(folder, **kwargs)
        if not sparse and keep_ratio is None:
            return backbone
        _logger.info("%s holds no %s: fresh (untrained) prediction modules", folder, PREDICTORS_FILE)
        keep_ratio = DEFAULT_KEEP_RATIO if keep_ratio is None else keep_ratio
        return DynamicViT(backbone, keep_ratio, prune_locs, fuse_dropped=bool(fuse_dropped))
    state, settings = read_checkpoint(stored)
    if settings is None or settings.get("kind") != "dynamicvit" or "transformers" not in settings:
        raise CheckpointError(f"{stored} holds no dynamicvit settings of a transformers model; remove it or save the folder again")
    kwargs.setdefault("img_size", settings["transformers"].get("img_size"))
    backbone = build_backbone(folder, **kwargs)
    prune_locs, _ = settings_win(settings, stored, HFHost(backbone).architecture, prune_locs)
    if fuse_dropped is not None and bool(fuse_dropped) != bool(settings.get("fuse_dropped", False)):
        raise CheckpointError(f"{folder} was saved with fuse_dropped={settings.get('fuse_dropped', False)}; drop the argument")
    model = DynamicViT(backbone, settings["keep_ratio"] if keep_ratio is None else keep_ratio, prune_locs,
                       fuse_dropped=bool(settings.get("fuse_dropped", False)),
                       keep_ratio_range=settings.get("keep_ratio_range"),
                       predictor_width=settings.get("predictor_width"))
    load_state(model, state, source=f"the prediction modules in {stored}", allow_missing_prefix="backbone.")
    return model


# -- saving ---------------------------------------------------------------------------------------


def save_pretrained(model: nn.Module, folder: PathLike, overwrite: bool = False) -> Path:
    """Write a transformers model, sparse or dense, as a folder both transformers and dynamicvit read.

    The folder gets config.json and model.safetensors (the backbone, by transformers' own
    `save_pretrained`), preprocessor_config.json when the model has an image processor, and for a
    DynamicViT `dynamicvit.safetensors` (prediction modules and sparsity settings).
    `dynamicvit.load("hf:DIR")` or `create_model("hf:DIR")` rebuild it.

    Args:
        model: a DynamicViT on a transformers backbone, or a dense transformers model.
        folder: the destination; a folder that exists and is not empty is an error unless `overwrite`
            (then only the files named above are replaced; the rest of the folder is left alone).
    """
    backbone = model.backbone if isinstance(model, DynamicViT) else model
    if not is_transformers_model(backbone):
        raise ConfigError(f"save_pretrained writes transformers models; save a {type(backbone).__name__} with dynamicvit.save_model")
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())) and not overwrite:
        raise CheckpointError(f"{folder} exists and is not empty; choose another folder or pass overwrite=True")
    settings = model_settings(model)  # checks that the model is one the host supports
    processor = settings["transformers"].get("processor")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    except OSError as e:
        raise OutputError(f"cannot write {folder}: {describe_os_error(e)}; choose a writable folder") from None
    try:
        with _quiet(require_transformers()):
            backbone.save_pretrained(str(staging), safe_serialization=True)
        if processor:
            (staging / PROCESSOR_FILE).write_text(json.dumps(processor, indent=2) + "\n")
        for path in staging.iterdir():
            os.replace(path, folder / path.name)
    except OSError as e:
        raise OutputError(f"cannot write {folder}: {describe_os_error(e)}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    stored = folder / PREDICTORS_FILE
    if isinstance(model, DynamicViT):
        _save_predictors(model, settings, stored)
    elif stored.exists():
        stored.unlink()  # ours, from an earlier sparse model: the folder now holds a dense one
    return folder


def _save_predictors(model: DynamicViT, settings: dict, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={METADATA_KEY: json.dumps(settings)}))


# -- helpers --------------------------------------------------------------------------------------


def _class_of(config: dict, folder: Path) -> str:
    """The supported class config.json names; custom code (auto_map) is never run."""
    if config.get("auto_map"):
        raise CheckpointError(f"{folder} uses custom model code (auto_map), which dynamicvit does not run")
    names = config.get("architectures") or []
    name = next((n for n in names if n in SUPPORTED), None)
    if name is None:
        raise CheckpointError(
            f"{folder} holds a {names[0] if names else 'model without an architectures entry'}; dynamicvit prunes "
            f"{', '.join(SUPPORTED)}"
        )
    if config.get("model_type") != SUPPORTED[name].model_type:
        raise CheckpointError(f"{folder}'s config.json has model_type {config.get('model_type')!r}, not the "
                              f"{SUPPORTED[name].model_type!r} of a {name}")
    return name


def _load_args(name: str, config: dict, kwargs: dict) -> tuple[Optional[list[int]], dict]:
    """(run size or None, keyword arguments for from_pretrained / the config) from timm-style `kwargs`."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    arch = SUPPORTED[name]
    args: dict[str, Any] = {}
    classes = kwargs.pop("num_classes", None)
    if classes is not None and classes != _num_labels(name, config):
        if not arch.classifier:
            raise ConfigError(
                f"a {name} has no classifier, so it cannot predict {classes} classes; use a ...ForImageClassification model"
            )
        _logger.warning("%s: classifier re-initialized for %d classes (the folder's has %d)", name, classes,
                        _num_labels(name, config))
        args.update(num_labels=int(classes), ignore_mismatched_sizes=True)
    chans = kwargs.pop("in_chans", None)
    if chans is not None and chans != config.get("num_channels", 3):
        raise ConfigError(f"the {name} takes {config.get('num_channels', 3)}-channel images, not {chans}; convert the images")
    impl = kwargs.pop("attn_implementation", None)
    if impl is not None:
        if impl not in ATTN_IMPLEMENTATIONS:
            raise ConfigError(f"attn_implementation={impl!r} is not supported; use one of {ATTN_IMPLEMENTATIONS}")
        args["attn_implementation"] = impl
    size = kwargs.pop("img_size", None)
    size = None if size is None else ([int(size)] * 2 if isinstance(size, (int, float)) else [int(v) for v in size])
    for key, candidates in CONFIG_KWARGS.items():
        value = kwargs.pop(key, None)
        field = next((c for c in candidates if c in config), None)
        if field is not None and value is not None:
            args[field] = value
        elif value:  # regularization the model does not have (a recipe's drop path on ViT): nothing to set
            _logger.warning("a %s has no counterpart of %s; %s=%s is ignored", name, key, key, value)
    if kwargs:
        raise ConfigError(
            f"transformers models take their architecture from config.json; {sorted(kwargs)} cannot be applied (edit "
            f"config.json; supported: num_classes, in_chans, img_size, attn_implementation, {', '.join(CONFIG_KWARGS)})"
        )
    return size, args


def _processor_size(processor: Optional[dict]) -> Optional[list[int]]:
    """The size of the images an image processor makes (its crop, else its fixed resize), or None.

    DINOv2's releases, for one, hold a 518 px position table but crop 224 px images: the model runs at
    224 px with the table interpolated, and so does dynamicvit.
    """
    if not processor:
        return None
    size = processor.get("crop_size") if processor.get("do_center_crop") else processor.get("size")
    if isinstance(size, dict) and "height" in size and "width" in size:
        return [int(size["height"]), int(size["width"])]
    return [int(size)] * 2 if isinstance(size, int) and processor.get("do_center_crop") else None


def _num_labels(name: str, config: dict) -> int:
    if not SUPPORTED[name].classifier:
        return 0
    labels = config.get("id2label")
    return int(config.get("num_labels") or (len(labels) if labels else 2))


def _attach(model: nn.Module, img_size: Optional[list[int]], processor: Optional[dict]) -> None:
    """Record the run size and image processor on the model (read by `HFHost`) and check it is supported."""
    model.dynamicvit_hf = {"img_size": img_size, "processor": processor}
    host = HFHost(model)  # raises for a class, layout or size the host cannot follow
    model.pretrained_cfg = host.pretrained_cfg  # what the data module reads from a dense model


@contextmanager
def _quiet(transformers):
    """transformers' progress bars off while it loads or saves (the command line owns the terminal)."""
    bars = transformers.utils.logging
    was_on = bars.is_progress_bar_enabled()
    bars.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            bars.enable_progress_bar()


def _read_json(path: Path, what: str) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {_first_line(e)}; the {what} is damaged") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a {type(value).__name__}, not a JSON object; the {what} is damaged")
    return value


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else ""
