"""`dynamicvit flops`: multiply-accumulates (GMACs) and parameters of one image, per stage and in total."""
from __future__ import annotations

import argparse

from ._common import json_text
from ._model import add_model_arguments, at_keep_ratio, build_base_model, model_name

HELP = "Count multiply-accumulates (GMACs) and parameters, per stage and in total."


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
    from ..core.base import SparseModel
    from ..core.spatial import DynamicSpatial
    from ..core.vit import DynamicViT
    from ..runtime.flops import count_macs

    keep_ratio = 1.0 if args.dense else args.keep_ratio
    base = build_base_model(args, keep_ratio=keep_ratio)
    model = at_keep_ratio(base, keep_ratio)
    report = count_macs(model)
    name = base.model_name if isinstance(base, SparseModel) else model_name(args)
    if args.json:
        print(json_text({"model": name, "dense": not isinstance(model, SparseModel), **report.to_dict()}))
        return 0
    C, H, W = report.input_size
    if isinstance(model, DynamicSpatial):
        what = (f"DynamicSpatial on {name}, stage ratios {list(model.stage_ratios)} before stage-3 blocks "
                f"{list(model.prune_locs)}, positions on the full path {list(model.keep_counts())} of {model.num_patches}")
    elif isinstance(model, DynamicViT):
        what = (f"DynamicViT on {name}, keep ratio {model.keep_ratio}, prune before blocks "
                f"{list(model.prune_locs)}, patch tokens kept {list(model.keep_counts())}"
                + (", dropped ones fused" if model.fuse_dropped else ", dropped ones merged" if model.merge_dropped else ""))
    else:
        what = f"{name} (dense)"
    print(f"{what}; one {C}x{H}x{W} image")
    print(report.format_table())
    return 0
