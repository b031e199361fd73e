"""`dynamicvit info`: build a DynamicViT and print where it prunes and how many tokens each stage keeps."""
from __future__ import annotations

import argparse

from ._common import int_list, model_kwargs, positive_int

HELP = "Build a DynamicViT and print its stages and token counts."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="deit_small_patch16_224", help="timm model name")
    parser.add_argument("--keep-ratio", type=float, default=0.7, help="rho: stage s keeps int(N * rho^s) tokens")
    parser.add_argument("--prune-locs", type=int_list, default=None, help="comma-separated block indices, e.g. 3,6,9")
    parser.add_argument("--img-size", type=positive_int, default=None, help="input resolution (default: the model's)")
    parser.add_argument("--model-kwargs", "--timm-kwargs", type=model_kwargs, default={}, metavar="KWARGS",
                        help="extra timm.create_model arguments, a JSON object or key=value pairs (patch_size=8,depth=6)")


def run(args: argparse.Namespace) -> int:
    from ..factory import create_model

    kwargs = {**args.model_kwargs, **({"img_size": args.img_size} if args.img_size is not None else {})}
    model = create_model(args.model, keep_ratio=args.keep_ratio, prune_locs=args.prune_locs, **kwargs)
    N, P = model.num_patches, model.num_prefix_tokens
    print(f"DynamicViT on {args.model}: {len(model.backbone.blocks)} blocks, grid {model.grid_size[0]}x{model.grid_size[1]} "
          f"= {N} patch tokens + {P} prefix token(s), keep ratio {model.keep_ratio}")
    print(f"{'stage':>5} {'before block':>12} {'patch tokens kept':>18} {'tokens in sequence':>19}")
    print(f"{0:>5} {'-':>12} {N:>18} {N + P:>19}")
    for s, (loc, k) in enumerate(zip(model.prune_locs, model.keep_counts()), 1):
        print(f"{s:>5} {loc:>12} {k:>18} {k + P:>19}")
    return 0
