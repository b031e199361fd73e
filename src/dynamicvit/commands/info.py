"""`dynamicvit info`: build a DynamicViT and print where it prunes and how many tokens each stage keeps."""
from __future__ import annotations

import argparse

from ._common import int_list, model_kwargs, positive_int

HELP = "Build a DynamicViT and print its stages and token counts."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="deit_small_patch16_224", help="timm model name, or hf:DIR (a transformers model folder)")
    parser.add_argument("--keep-ratio", type=float, default=0.7, help="rho: stage s keeps int(N * rho^s) tokens")
    parser.add_argument("--prune-locs", type=int_list, default=None, help="comma-separated block indices, e.g. 3,6,9")
    parser.add_argument("--img-size", type=positive_int, default=None, help="input resolution (default: the model's)")
    parser.add_argument("--model-kwargs", "--timm-kwargs", type=model_kwargs, default={}, metavar="KWARGS",
                        help="extra timm.create_model arguments, a JSON object or key=value pairs (patch_size=8,depth=6)")


def run(args: argparse.Namespace) -> int:
    from ..core.spatial import DynamicSpatial
    from ..weights.build import create_model

    kwargs = {**args.model_kwargs, **({"img_size": args.img_size} if args.img_size is not None else {})}
    model = create_model(args.model, keep_ratio=args.keep_ratio, prune_locs=args.prune_locs, **kwargs)
    if isinstance(model, DynamicSpatial):
        return _spatial_info(args.model, model)
    N, P = model.num_patches, model.num_prefix_tokens
    print(f"DynamicViT on {args.model}: {model.host.depth} blocks, grid {model.grid_size[0]}x{model.grid_size[1]} "
          f"= {N} patch tokens + {P} prefix token(s), keep ratio {model.keep_ratio}")
    print(f"{'stage':>5} {'before block':>12} {'patch tokens kept':>18} {'tokens in sequence':>19}")
    print(f"{0:>5} {'-':>12} {N:>18} {N + P:>19}")
    for s, (loc, k) in enumerate(zip(model.prune_locs, model.keep_counts()), 1):
        print(f"{s:>5} {loc:>12} {k:>18} {k + P:>19}")
    return 0


def _spatial_info(name: str, model) -> int:
    """ConvNeXt / Swin: where the predictors sit in stage 3 and how many positions take the full path."""
    H, W = model.grid_size
    depth = model.host.depth
    print(f"DynamicSpatial on {name}: stage 3 has {depth} blocks on a {H}x{W} map = {model.num_patches} positions, "
          f"keep ratio {model.keep_ratio}; blocks {model.prune_locs[0]}..{depth - 1} are adaptive (FFN on kept "
          "positions, fast path on the rest); decisions are not hierarchical")
    print(f"{'predictor':>9} {'before block':>12} {'r_s':>6} {'positions on FFN':>17} {'on fast path':>13}")
    for s, (loc, r, k) in enumerate(zip(model.prune_locs, model.stage_ratios, model.keep_counts()), 1):
        print(f"{s:>9} {loc:>12} {r:>6.2f} {k:>17} {model.num_patches - k:>13}")
    return 0
