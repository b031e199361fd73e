"""`dynamicvit flops`: multiply-accumulates (GMACs) and parameters of one image, per stage and in total."""
from __future__ import annotations

import argparse
import logging

from ._common import int_list, json_text, model_kwargs, positive_int

HELP = "Count multiply-accumulates (GMACs) and parameters, per stage and in total."

_logger = logging.getLogger(__name__)


# -- model arguments shared with `dynamicvit bench` ---------------------------------------------------


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --checkpoint, --img-size, --prune-locs, --model-kwargs."""
    parser.add_argument("--model", default=None,
                        help=f"timm ViT name (default: the checkpoint's, else {DEFAULT_MODEL})")
    parser.add_argument(
        "--checkpoint", default=None, metavar="PATH",
        help="weights to load: a file saved by dynamicvit (its settings are used), a training checkpoint, "
        "or timm/DeiT/reference DynamicViT weights for --model",
    )
    parser.add_argument("--img-size", type=positive_int, default=None, help="input resolution (default: the model's)")
    parser.add_argument("--prune-locs", type=int_list, default=None, help="comma-separated block indices, e.g. 3,6,9 (default: three even stages)")
    parser.add_argument(
        "--model-kwargs", "--timm-kwargs", type=model_kwargs, default={}, metavar="KWARGS",
        help="extra timm.create_model arguments, as a JSON object ('{\"patch_size\": 8}') or "
        "comma-separated key=value pairs (patch_size=8,embed_dim=192)",
    )


DEFAULT_MODEL = "deit_small_patch16_224"


def model_name(args: argparse.Namespace) -> str:
    """--model, else the default architecture."""
    return (args.model or DEFAULT_MODEL).removeprefix("dynamicvit_")


def timm_kwargs_from_args(args: argparse.Namespace) -> dict:
    kwargs = dict(args.model_kwargs)
    if args.img_size is not None:
        kwargs["img_size"] = args.img_size
    return kwargs


def build_base_model(args: argparse.Namespace, keep_ratio: float = 0.7):
    """The model the command works on: a DynamicViT, or a dense timm model from a dense checkpoint."""
    from ..checkpoint import load_model, read_settings, settings_win
    from ..factory import create_backbone, create_model

    kwargs = timm_kwargs_from_args(args)
    locs = args.prune_locs
    name = model_name(args)
    if keep_ratio == 1.0 and not args.checkpoint:
        return create_backbone(name, **kwargs)  # any timm model, ViT or not
    if args.checkpoint:
        settings = read_settings(args.checkpoint)
        if settings is not None:
            # The checkpoint's settings win; an explicit --model / --prune-locs that contradicts them is an error.
            settings_win(settings, args.checkpoint, args.model and name, locs)
            model = load_model(args.checkpoint, **kwargs)
            _logger.info("loaded %s (%s) from %s", settings.get("model_name"), settings.get("kind", "dynamicvit"), args.checkpoint)
            return model
        return create_model(name, checkpoint_path=args.checkpoint, keep_ratio=keep_ratio, prune_locs=locs, **kwargs)
    return create_model(name, keep_ratio=keep_ratio, prune_locs=locs, **kwargs)


def at_keep_ratio(base, keep_ratio: float):
    """The dense timm model for keep ratio 1.0, else a DynamicViT at `keep_ratio` sharing `base`'s weights."""
    from ..bench import with_keep_ratio
    from ..spatial import SPARSE_MODELS

    if keep_ratio >= 1.0:
        return base.backbone if isinstance(base, SPARSE_MODELS) else base
    if not isinstance(base, SPARSE_MODELS):
        _logger.warning("the checkpoint holds a dense model: its prediction modules are untrained (random)")
    return with_keep_ratio(base, keep_ratio)


# -- the command --------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "--keep-ratio", type=float, default=0.7,
        help="rho: stage s keeps int(N * rho^s) tokens; 1.0 counts the plain (dense) timm model (default: %(default)s)",
    )
    parser.add_argument("--dense", action="store_true", help="count the plain timm model (same as --keep-ratio 1.0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def run(args: argparse.Namespace) -> int:
    from ..flops import count_macs
    from ..model import DynamicViT
    from ..spatial import SPARSE_MODELS, DynamicSpatial

    keep_ratio = 1.0 if args.dense else args.keep_ratio
    base = build_base_model(args, keep_ratio=keep_ratio)
    model = at_keep_ratio(base, keep_ratio)
    report = count_macs(model)
    name = base.model_name if isinstance(base, SPARSE_MODELS) else model_name(args)
    if args.json:
        print(json_text({"model": name, "dense": not isinstance(model, SPARSE_MODELS), **report.to_dict()}))
        return 0
    C, H, W = report.input_size
    if isinstance(model, DynamicSpatial):
        what = (f"DynamicSpatial on {name}, stage ratios {list(model.stage_ratios)} before stage-3 blocks "
                f"{list(model.prune_locs)}, positions on the full path {list(model.keep_counts())} of {model.num_patches}")
    elif isinstance(model, DynamicViT):
        what = (f"DynamicViT on {name}, keep ratio {model.keep_ratio}, prune before blocks "
                f"{list(model.prune_locs)}, patch tokens kept {list(model.keep_counts())}")
    else:
        what = f"{name} (dense)"
    print(f"{what}; one {C}x{H}x{W} image")
    print(report.format_table())
    return 0
