"""Building DynamicViTs: from a timm name, from a model the user has, from a file, or through timm's registry.

`load` is the one way the commands build a model from any checkpoint `dynamicvit` reads; `load_model`
rebuilds a file that carries our settings.

ViT-style models become a `DynamicViT` (token pruning); hierarchical ones (ConvNeXt, Swin) a
`DynamicSpatial` (spatial sparsification of stage 3, `core.spatial`). "hf:DIR" names a Hugging Face
transformers model folder instead of a timm name (`weights.hf`).
"""
from __future__ import annotations

import difflib
import os
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..core.base import SparseModel
from ..core.hosts import is_spatial
from ..core.layouts import filter_dense_state, has_predictor_weights, load_state, to_own_keys
from ..core.settings import DEFAULT_KEEP_RATIO
from ..core.spatial import DynamicSpatial
from ..core.vit import DynamicViT
from ..errors import CheckpointError, ConfigError, UnsupportedModelError
from ..files import PathLike
from ..text import printable
from . import hf
from .formats import load_weights, read_checkpoint, settings_win

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
    "lvvit_s",
    "lvvit_m",
    "convnext_tiny",
    "convnext_small",
    "convnext_base",
    "swin_tiny_patch4_window7_224",
    "swin_small_patch4_window7_224",
    "swin_base_patch4_window7_224",
)
PREFIX = "dynamicvit_"


def create_model(
    name: str,
    pretrained: bool = False,
    checkpoint_path: Optional[Union[str, os.PathLike]] = None,
    keep_ratio: Optional[float] = None,
    prune_locs: Optional[Sequence[int]] = None,
    stage_ratios: Optional[Sequence[float]] = None,
    restart_streams: bool = True,
    fuse_dropped: Optional[bool] = None,
    merge_dropped: Optional[bool] = None,
    predictor_width: Optional[int] = None,
    **timm_kwargs,
) -> Union[DynamicViT, DynamicSpatial]:
    """Build the timm model `name` and add DynamicViT prediction modules.

    A checkpoint saved by dynamicvit carries its settings, and they win: its prune locations and timm
    arguments are used, and an argument given here that contradicts them is an error naming both
    values (only the keep ratio, image size and dropout rates may differ: they change nothing the
    weights depend on).

    Args:
        name: a timm ViT, LV-ViT, ConvNeXt or Swin name, e.g. `deit_small_patch16_224`, `lvvit_s`,
            `convnext_tiny`, `swin_tiny_patch4_window7_224` (a `dynamicvit_` prefix is accepted), or
            "hf:DIR", a local folder of a transformers ViT, DeiT, DINOv2 or CLIP vision model (written by
            its `save_pretrained`, or by `dynamicvit.save_pretrained` with trained prediction modules).
        pretrained: load timm's pretrained weights (downloads from the hub).
        checkpoint_path: a local file: timm/original weights, a reference DynamicViT / DynamicCNN /
            DynamicSwin checkpoint, or ours.
        keep_ratio: rho (default: the checkpoint's, else 0.7). ViTs: stage s keeps int(N * rho ** s) patch
            tokens. ConvNeXt/Swin: predictor s sends int(N * r_s) positions of the stage-3 map through the
            full FFN, r = (rho, rho - 0.2, ...).
        prune_locs: ViTs: blocks before which to prune (default: the checkpoint's, else three evenly spaced
            stages). ConvNeXt/Swin: block indices inside stage 3 (default: the authors' table, docs/spatial.md).
        stage_ratios: ConvNeXt/Swin only: explicit r_s per predictor instead of rho - 0.2 s.
        restart_streams: ConvNeXt/Swin only: see `SpatialConfig.restart_streams`.
        fuse_dropped: ViTs only: fold each stage's dropped tokens into one extra token instead of
            discarding them (default: the checkpoint's setting, else off).
        merge_dropped: ViTs only: add each dropped token into its most similar kept token (default:
            the checkpoint's setting, else off); excludes `fuse_dropped`.
        predictor_width: ViTs only: hidden width of the prediction modules, a multiple of 4 up to the
            model's width (default: the checkpoint's, else the model's width, the paper's layout).
        timm_kwargs: passed to `timm.create_model` (img_size, num_classes, drop_path_rate, ...).
    """
    if hf.is_hf_spec(name):
        if stage_ratios is not None or pretrained:
            raise ConfigError(f"{name}: a transformers folder brings its own weights; stage_ratios and pretrained do not apply")
        model = hf.load_folder(name, keep_ratio, prune_locs, sparse=True, fuse_dropped=fuse_dropped, **timm_kwargs)
        if checkpoint_path is not None:
            load_weights(model, checkpoint_path)
        return model
    name = name[len(PREFIX):] if name.startswith(PREFIX) else name
    checkpoint = None
    if checkpoint_path is not None:
        # Settings that cannot be used are ignored (with a warning): the caller named the architecture.
        checkpoint = read_checkpoint(checkpoint_path, bad_settings="ignore")
        settings = checkpoint[1]
        if settings is not None:
            prune_locs, timm_kwargs = settings_win(settings, checkpoint_path, name, prune_locs, timm_kwargs)
            if settings.get("kind") == "dynamicvit" and keep_ratio is None:
                keep_ratio = settings["keep_ratio"]
            fuse_dropped = _stored_flag(settings, "fuse_dropped", fuse_dropped, checkpoint_path)
            merge_dropped = _stored_flag(settings, "merge_dropped", merge_dropped, checkpoint_path)
            predictor_width = _stored_width(settings, predictor_width, checkpoint_path)
    keep_ratio = DEFAULT_KEEP_RATIO if keep_ratio is None else keep_ratio

    def build() -> Union[DynamicViT, DynamicSpatial]:
        backbone = create_backbone(name, pretrained=pretrained and checkpoint_path is None, **timm_kwargs)
        return _wrap(backbone, keep_ratio, prune_locs, stage_ratios, restart_streams, name, timm_kwargs,
                     bool(fuse_dropped), bool(merge_dropped), predictor_width)

    if checkpoint is None:
        return build()
    # timm arguments from the file's settings: built as they would be for `load_model`
    model = build() if checkpoint[1] is None else built_from_settings(checkpoint_path, checkpoint[0], build)
    load_weights(model, checkpoint_path, checkpoint)
    if checkpoint[1] is not None:
        apply_budget(model, checkpoint[1], keep_ratio)
    return model


def _stored_flag(settings: dict, name: str, asked: Optional[bool], path: PathLike) -> bool:
    """A checkpoint's setting `name` (False when absent); an explicit `asked` that contradicts it is an error."""
    stored = bool(settings.get(name, False))
    if asked is not None and bool(asked) != stored:
        raise CheckpointError(
            f"{path} was trained with {name}={stored}, but {name}={asked} was asked for; drop the argument "
            "(the checkpoint's setting is used)"
        )
    return stored


def _stored_width(settings: dict, asked: Optional[int], path: PathLike) -> Optional[int]:
    """A checkpoint's predictor width (None: the paper's layout); an explicit `asked` that differs is an error
    (the prediction modules' weights have that width)."""
    stored = settings.get("predictor_width")
    if asked is not None and asked != stored:
        raise CheckpointError(
            f"{path} holds prediction modules of width {stored or 'the model width'}, but predictor_width={asked} "
            "was asked for; drop the argument (the checkpoint's width is used)"
        )
    return stored


def apply_budget(model: nn.Module, settings: dict, keep_ratio: Optional[float] = None) -> None:
    """Give a DynamicViT the per-image thresholds and budget stored in its checkpoint's settings (the
    budget only at the stored keep ratio: another ratio asked for starts at the fixed budget)."""
    if not isinstance(model, DynamicViT) or not settings.get("thresholds"):
        return
    model.set_thresholds({float(r): t for r, t in settings["thresholds"].items()}, min_keep=settings.get("min_keep", 1))
    same = keep_ratio is None or abs(keep_ratio - settings["keep_ratio"]) < 1e-9
    if settings.get("budget", "fixed") != "fixed" and same:
        model.set_keep_ratio(model.keep_ratio, budget=settings["budget"])


def load_model(path: PathLike, keep_ratio: Optional[float] = None, **overrides) -> nn.Module:
    """Rebuild a model saved by `save_model` (or a training checkpoint) and load its weights.

    Returns a DynamicViT, or the dense timm model for a dense checkpoint. The stored settings are
    checked first (`check_settings`): nothing in a file can make timm download or open anything.

    Args:
        keep_ratio: change the keep ratio of a DynamicViT (no retraining needed).
        overrides: timm keyword arguments; only those that may change (image size, dropout rates)
            may differ from the stored ones (see `settings_win`).
    """
    model = _rebuild(path, *read_checkpoint(path), overrides)
    if keep_ratio is not None:
        model.set_keep_ratio(keep_ratio)
    return model


def _rebuild(path: PathLike, state: dict, settings: Optional[dict], overrides: dict) -> nn.Module:
    """`load_model` on a file already read: the model its settings describe, with its weights."""
    if settings is None:
        raise CheckpointError(
            f"{path} holds weights without dynamicvit settings; use "
            "dynamicvit.create_model(NAME, checkpoint_path=PATH) and name the architecture"
        )
    _, kwargs = settings_win(settings, path, timm_kwargs=overrides)
    if "transformers" in settings:
        return _rebuild_transformers(path, state, settings, kwargs)
    if settings.get("kind") == "dense":
        # ConvNeXt's img_size goes to its config
        model = built_from_settings(path, state, lambda: create_backbone(settings["model_name"], **kwargs))
        load_state(model, filter_dense_state(state, model), source=f"checkpoint {path}")
        return model

    def build() -> nn.Module:
        model = create_model(
            settings["model_name"],
            keep_ratio=settings["keep_ratio"],
            prune_locs=settings["prune_locs"],
            **{k: settings[k] for k in ("stage_ratios", "restart_streams") if k in settings},  # DynamicSpatial
            fuse_dropped=bool(settings.get("fuse_dropped", False)),
            merge_dropped=bool(settings.get("merge_dropped", False)),
            predictor_width=settings.get("predictor_width"),
            **kwargs,
        )
        if settings.get("keep_ratio_range"):
            model.set_keep_ratio_range(settings["keep_ratio_range"])
        apply_budget(model, settings)
        return model

    model = built_from_settings(path, state, build)
    state, _ = to_own_keys(state, model.backbone)
    load_state(model, state, source=f"checkpoint {path}")
    return model


def _rebuild_transformers(path: PathLike, state: dict, settings: dict, overrides: dict) -> nn.Module:
    """`_rebuild` of a transformers model: the class and config the settings hold (built on the meta device
    first, as timm models are), then the weights."""
    def build() -> nn.Module:
        backbone = hf.rebuild_backbone(settings["transformers"], overrides)
        if settings.get("kind") == "dense":
            return backbone
        return DynamicViT(backbone, settings["keep_ratio"], settings["prune_locs"],
                          fuse_dropped=bool(settings.get("fuse_dropped", False)),
                          keep_ratio_range=settings.get("keep_ratio_range"),
                          predictor_width=settings.get("predictor_width"))

    model = built_from_settings(path, state, build)
    load_state(model, state, source=f"checkpoint {path}")
    return model


def load(
    path: PathLike,
    model_name: Optional[str] = None,
    *,
    keep_ratio: Optional[float] = None,
    prune_locs: Optional[Sequence[int]] = None,
    overrides: Optional[dict] = None,
    plain_kwargs: Optional[dict] = None,
    sparse: bool = False,
    role: str = "checkpoint",
    checkpoint: Optional[tuple[dict, Optional[dict]]] = None,
) -> nn.Module:
    """The model any checkpoint `dynamicvit` reads holds: the one loader of eval, flops, bench, export,
    visualize and train's teacher.

    - A file with our settings is rebuilt from them (`load_model`); an explicit `model_name` or
      `prune_locs` that contradicts them is an error naming both.
    - "hf:DIR", a transformers model folder: the model it holds, sparse when the folder has our
      prediction modules or `sparse` is asked for (`weights.hf.load_folder`).
    - Plain weights carry no architecture: `model_name` is required. Weights with prediction modules
      (the authors' checkpoints, our state dicts) give a DynamicViT / DynamicSpatial; dense weights
      give the dense timm model, or with `sparse` one wrapped with fresh prediction modules (as
      `create_model(name, checkpoint_path=path)`; a head of another size is then re-initialized).

    Args:
        keep_ratio, prune_locs: for a model built from plain weights. A file with settings keeps its
            own keep ratio (change it with `model.set_keep_ratio`); `prune_locs` is checked against them.
        overrides: timm arguments applied over a file's stored settings (only adjustable ones may differ).
        plain_kwargs: timm arguments for plain weights (defaults to `overrides`).
        role: what the file is to the caller ("teacher", ...), for messages.
        checkpoint: `read_checkpoint(path)`'s result when the caller has read the file already (the
            file is read once either way).
    """
    overrides = dict(overrides or {})
    if hf.is_hf_spec(path):
        return hf.load_folder(path, keep_ratio, prune_locs, sparse=sparse, **overrides)
    plain_kwargs = dict(overrides if plain_kwargs is None else plain_kwargs)
    name = model_name[len(PREFIX):] if model_name and model_name.startswith(PREFIX) else model_name
    state, settings = checkpoint if checkpoint is not None else read_checkpoint(path)
    if settings is not None:
        settings_win(settings, path, name, prune_locs)
        return _rebuild(path, state, settings, overrides)
    if name is None:
        raise ConfigError(f"the {role} {path} holds plain weights without settings; name the architecture with --model")
    if sparse or has_predictor_weights(state):
        # create_model(name, checkpoint_path=path, ...) without reading the file again
        model = create_model(name, keep_ratio=keep_ratio, prune_locs=prune_locs, **plain_kwargs)
        load_weights(model, path, (state, None))
        return model
    model = create_backbone(name, **plain_kwargs)
    load_state(model, filter_dense_state(state, model), source=f"{role} {path}")
    return model


# How many more values than a file's tensors hold a model built from its settings may have (fresh modules,
# a position embedding resized on request) before the settings count as describing another model.
SIZE_SLACK = 2**24


def built_from_settings(path: PathLike, state: dict, build: Callable[[], nn.Module]) -> nn.Module:
    """`build()`, for a model whose settings come from the file `path` (holding the tensors `state`).

    It is built on the meta device first (shapes only, no memory): settings that describe a model far
    larger than the file's weights (an image size of 100000, a width of millions) are refused before
    anything is allocated. Whatever timm, torch or our own checks raise on the settings becomes one
    `CheckpointError` naming the file.
    """
    held = sum(t.numel() for t in state.values())
    try:
        with torch.device("meta"):
            shapes = build()
        needed = sum(p.numel() for p in shapes.parameters()) + sum(b.numel() for b in shapes.buffers())
        if needed > 2 * held + SIZE_SLACK:
            raise CheckpointError(
                f"the settings stored in {path} describe a model of {needed:,} values, but the file holds {held:,}; "
                "the settings are damaged. To use its weights, name the architecture: "
                "dynamicvit.create_model(NAME, checkpoint_path=PATH)"
            )
        return build()
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - timm and torch raise many types on values they cannot build
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise CheckpointError(
            f"the settings stored in {path} do not build a model ({type(e).__name__}: {printable(first)}); the "
            "file is damaged or written by a newer dynamicvit. To use its weights, name the architecture: "
            "dynamicvit.create_model(NAME, checkpoint_path=PATH)"
        ) from None


def create_backbone(name: str, pretrained: bool = False, **timm_kwargs) -> nn.Module:
    """`timm.create_model` with clear errors for unknown names and failed downloads; "hf:DIR" loads the
    transformers model of a local folder (with its own weights, whatever `pretrained` says)."""
    import timm

    if hf.is_hf_spec(name):
        return hf.build_backbone(name, **timm_kwargs)
    if not timm.is_model(name):
        candidates = timm.list_models("*vit*") + timm.list_models("deit*") + timm.list_models("convnext*") + timm.list_models("swin*")
        close = difflib.get_close_matches(name, candidates, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models('deit*')"
        raise UnsupportedModelError(f"unknown timm model {name!r}{hint}")
    args = _timm_args(name, timm_kwargs)
    if not pretrained:
        model = timm.create_model(name, **args)
    else:
        try:
            model = timm.create_model(name, pretrained=True, **args)
        except Exception as e:  # noqa: BLE001 - hub, network and cache errors come in many types
            raise CheckpointError(
                f"could not get pretrained weights for {name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
                "Without internet access, download the weights elsewhere and pass the local file: "
                f"create_model({name!r}, checkpoint_path='weights.pth') or --checkpoint weights.pth"
            ) from None
    model.dynamicvit_timm_kwargs = dict(timm_kwargs)
    return model


def _timm_args(name: str, timm_kwargs: dict) -> dict:
    """timm's ConvNeXt has no `img_size` argument (it takes any size): the size it is meant for goes
    into its pretrained config instead, which data transforms, keep counts and FLOPs read."""
    from timm.models import model_entrypoint

    if "img_size" not in timm_kwargs or not model_entrypoint(name).__module__.endswith(".convnext"):
        return timm_kwargs
    args = dict(timm_kwargs)
    size = args.pop("img_size")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    overlay = dict(args.pop("pretrained_cfg_overlay", None) or {})
    overlay["input_size"] = (args.get("in_chans", 3), h, w)
    return {**args, "pretrained_cfg_overlay": overlay}


def sparsify(
    model: nn.Module,
    keep_ratio: float = DEFAULT_KEEP_RATIO,
    prune_locs: Optional[Sequence[int]] = None,
    stage_ratios: Optional[Sequence[float]] = None,
    restart_streams: bool = True,
    fuse_dropped: bool = False,
    merge_dropped: bool = False,
    predictor_width: Optional[int] = None,
) -> Union[DynamicViT, DynamicSpatial]:
    """Wrap a timm ViT, ConvNeXt or Swin, or a transformers ViT, DeiT, DINOv2 or CLIP vision model, that the
    user already has (weights shared, not copied). A transformers model runs at its config.image_size."""
    kwargs = getattr(model, "dynamicvit_timm_kwargs", None)
    if kwargs is None:
        kwargs = {k: v for k, v in getattr(model, "_model_args", {}).items() if k != "pretrained_cfg_overlay"}
    return _wrap(model, keep_ratio, prune_locs, stage_ratios, restart_streams, None, kwargs, fuse_dropped, merge_dropped,
                 predictor_width)


def _wrap(backbone, keep_ratio, prune_locs, stage_ratios, restart_streams, name, timm_kwargs, fuse_dropped=False,
          merge_dropped=False, predictor_width=None):
    """DynamicSpatial for hierarchical backbones, DynamicViT otherwise."""
    if isinstance(backbone, SparseModel):
        raise ConfigError(
            f"the model is already a {type(backbone).__name__}; change how much it keeps with "
            "model.set_keep_ratio(...) instead of sparsifying it again"
        )
    if is_spatial(backbone):
        if fuse_dropped or merge_dropped:
            flag = "fuse_dropped" if fuse_dropped else "merge_dropped"
            raise ConfigError(f"{flag} applies to ViTs only: ConvNeXt and Swin keep every position of their maps")
        if predictor_width is not None:
            raise ConfigError("predictor_width applies to ViTs only: ConvNeXt and Swin keep the authors' prediction "
                              "modules; drop the argument")
        return DynamicSpatial(
            backbone, keep_ratio, prune_locs, stage_ratios, restart_streams, model_name=name, timm_kwargs=timm_kwargs
        )
    if stage_ratios is not None:
        raise ConfigError(
            "stage_ratios applies to ConvNeXt and Swin models only; ViTs keep int(N * keep_ratio ** s) tokens per stage"
        )
    return DynamicViT(backbone, keep_ratio, prune_locs, model_name=name, timm_kwargs=timm_kwargs,
                      fuse_dropped=fuse_dropped, merge_dropped=merge_dropped, predictor_width=predictor_width)


def register_with_timm() -> None:
    """Register every supported architecture with timm as `dynamicvit_<name>` (done on `import dynamicvit`)."""
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
