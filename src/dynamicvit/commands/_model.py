"""The model arguments of `dynamicvit flops`, `bench` and `export`, and the model they describe."""
from __future__ import annotations

import argparse
import logging
from typing import Optional

from ._common import int_list, model_kwargs, positive_int

_logger = logging.getLogger(__name__)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --checkpoint, --img-size, --prune-locs, --model-kwargs."""
    parser.add_argument("--model", default=None,
                        help=f"timm model name, or hf:DIR for a transformers model folder (default: the checkpoint's, "
                        f"else {DEFAULT_MODEL})")
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
    from ..weights.build import create_backbone, create_model, load

    kwargs = timm_kwargs_from_args(args)
    locs = args.prune_locs
    name = model_name(args)
    if args.checkpoint:
        # A file's settings win (an explicit --model / --prune-locs that contradicts them is an error);
        # plain dense weights get fresh prediction modules.
        model = load(args.checkpoint, args.model and name, keep_ratio=keep_ratio, prune_locs=locs, overrides=kwargs, sparse=True)
        _logger.info("loaded %s from %s", getattr(model, "model_name", None) or type(model).__name__, args.checkpoint)
        return model
    if keep_ratio == 1.0:
        return create_backbone(name, **kwargs)  # any timm model, ViT or not
    return create_model(name, keep_ratio=keep_ratio, prune_locs=locs, **kwargs)


def at_keep_ratio(base, keep_ratio: float, budget: Optional[str] = None):
    """The dense timm model for keep ratio 1.0, else a sparse model at `keep_ratio` sharing `base`'s weights
    (under `budget`, see `check_budget`; None: the model's own)."""
    from ..core.base import SparseModel, backbone_of
    from ..core.vit import DynamicViT
    from ..weights.build import sparsify

    check_budget(base, budget)
    if keep_ratio >= 1.0 and budget != "per-image":
        return backbone_of(base)
    if not isinstance(base, SparseModel):
        _logger.warning("the checkpoint holds a dense model: its prediction modules are untrained (random)")
        return sparsify(base, keep_ratio)
    return base.at_keep_ratio(keep_ratio, budget) if isinstance(base, DynamicViT) else base.at_keep_ratio(keep_ratio)


BUDGET_HELP = ("fixed: every image keeps int(N * rho^s) tokens at stage s; per-image: each image keeps the tokens "
               "scored above thresholds that `dynamicvit calibrate` chose, as many as it needs (default: the checkpoint's)")


def add_budget_argument(parser: argparse.ArgumentParser) -> None:
    from ..core.settings import BUDGETS

    parser.add_argument("--budget", choices=BUDGETS, default=None, help=BUDGET_HELP)


def check_budget(model, budget: Optional[str]) -> None:
    """A clear error when `--budget per-image` is asked of a model that has no per-image budget."""
    from ..core.vit import DynamicViT
    from ..errors import ConfigError

    if budget == "per-image" and not isinstance(model, DynamicViT):
        raise ConfigError(
            f"--budget per-image is for token models (ViT, DeiT, LV-ViT); {type(model).__name__} "
            f"({getattr(model, 'family', 'dense')}) keeps its maps at the fixed budget: drop --budget"
        )


def set_budget(model, keep_ratio: Optional[float], budget: Optional[str]) -> None:
    """`model.set_keep_ratio(keep_ratio, budget)` for the command line (either may be None: unchanged;
    models without a per-image budget take "fixed" as what they have)."""
    from ..core.vit import DynamicViT

    check_budget(model, budget)
    if budget is not None and isinstance(model, DynamicViT):
        model.set_keep_ratio(model.keep_ratio if keep_ratio is None else keep_ratio, budget=budget)
    elif keep_ratio is not None:
        model.set_keep_ratio(keep_ratio)
