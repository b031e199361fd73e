"""`dynamicvit flops`: multiply-accumulates (GMACs) and parameters of one image, per stage and in total.

Under the per-image budget (--budget per-image) an image's MACs follow its kept counts: with --dataset
the command reports the mean, the spread and a histogram of the MACs per image over the dataset.
"""
from __future__ import annotations

import argparse

from ._common import json_text, non_negative_int, positive_int
from ._model import add_budget_argument, add_model_arguments, at_keep_ratio, build_base_model, model_name

HELP = "Count multiply-accumulates (GMACs) and parameters, per stage and in total."


# -- the command --------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "--keep-ratio", type=float, default=0.7,
        help="rho: stage s keeps int(N * rho^s) tokens; 1.0 counts the plain (dense) timm model (default: %(default)s)",
    )
    parser.add_argument("--dense", action="store_true", help="count the plain timm model (same as --keep-ratio 1.0)")
    add_budget_argument(parser)
    parser.add_argument("--dataset", default=None,
                        help="MACs per image over this dataset's validation images ('fashion-mnist' or an ImageFolder "
                        "root): needed for --budget per-image, where every image costs what its kept tokens cost")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST: folder holding the IDX files")
    parser.add_argument("--subset", type=positive_int, default=None, help="--dataset: a fixed random subset of this many images")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="--dataset: images per forward")
    parser.add_argument("--num-workers", type=non_negative_int, default=0, help="--dataset: data loader processes")
    parser.add_argument("--bins", type=positive_int, default=10, help="--dataset: histogram bins (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def run(args: argparse.Namespace) -> int:
    from ..core.base import SparseModel
    from ..core.spatial import DynamicSpatial
    from ..core.vit import DynamicViT
    from ..runtime.flops import count_macs

    keep_ratio = 1.0 if args.dense else args.keep_ratio
    base = build_base_model(args, keep_ratio=keep_ratio)
    model = at_keep_ratio(base, keep_ratio, args.budget)
    name = base.model_name if isinstance(base, SparseModel) else model_name(args)
    if args.dataset or getattr(model, "budget", "fixed") == "per-image":
        return _over_dataset(args, model, name)
    report = count_macs(model)
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


def _over_dataset(args: argparse.Namespace, model, name: str) -> int:
    """MACs per image over a dataset: the mean, the spread, a histogram and the kept counts per class."""
    import torch

    from ..core.budget import CountRecorder
    from ..data import build_dataset, drop_unreadable, resolve_dataset, square_img_size
    from ..errors import ConfigError, DataError
    from ..progress import progress_bar
    from ..runtime.flops import count_macs
    from ..runtime.image_macs import PerImageMacs, macs_summary

    if not args.dataset:
        raise ConfigError("under the per-image budget the MACs depend on each image: pass --dataset DATA to count them "
                          "over its images (or --budget fixed for the fixed budget's)")
    if not hasattr(model, "forward_pruned"):
        raise ConfigError("--dataset counts the MACs of a DynamicViT's images; this model is dense (every image costs the same)")
    dataset = build_dataset(args.dataset, "val", img_size=square_img_size(model), data_dir=args.data_dir,
                            subset=args.subset, pretrained_cfg=model.pretrained_cfg)
    loader = torch.utils.data.DataLoader(dataset, args.batch_size, shuffle=False, num_workers=args.num_workers)
    recorder, labels = CountRecorder(model.eval()), []
    with torch.inference_mode():
        for images, y in progress_bar(loader, desc="flops", enabled=not args.json):
            images, y, _ = drop_unreadable(images, y)
            if len(y):
                recorder(images)
                labels.append(y)
    if not labels:
        raise DataError(f"no readable images in {args.dataset}")
    counts, labels = recorder.counts(), torch.cat(labels)
    macs = PerImageMacs.of(model).per_image(counts)
    summary = macs_summary(macs, bins=args.bins)
    classes = resolve_dataset(args.dataset, args.data_dir).classes
    by_class = {
        (classes[c] if c < len(classes) else str(c)): {
            "images": int((labels == c).sum()),
            "mean_keep_counts": counts[labels == c].double().mean(0).tolist(),
            "mean_gmacs": float(macs[(labels == c).numpy()].mean()) / 1e9,
        }
        for c in sorted(set(labels.tolist()))
    }
    result = {"model": name, "keep_ratio": model.keep_ratio, "budget": model.budget, "dataset": args.dataset,
              "fixed_budget_gmacs": count_macs(model.at_keep_ratio(model.keep_ratio, budget="fixed")).gmacs,
              "mean_keep_counts": counts.double().mean(0).tolist(), **summary, "by_class": by_class}
    if args.json:
        print(json_text(result))
        return 0
    _print_over_dataset(result, name, args.dataset)
    return 0


def _print_over_dataset(result: dict, name: str, dataset: str) -> None:
    print(f"DynamicViT on {name}, keep ratio {result['keep_ratio']}, {result['budget']} budget; {result['images']} images "
          f"of {dataset}")
    print(f"GMACs per image: mean {result['mean_gmacs']:.5g}, std {result['std_gmacs']:.3g}, min {result['min_gmacs']:.5g}, "
          f"max {result['max_gmacs']:.5g} (fixed budget: {result['fixed_budget_gmacs']:.5g})")
    print("mean patch tokens kept per stage: " + " / ".join(f"{c:.2f}" for c in result["mean_keep_counts"]))
    hist = result["histogram"]
    top = max(hist["counts"]) or 1
    for n, lo, hi in zip(hist["counts"], hist["edges_gmacs"], hist["edges_gmacs"][1:]):
        print(f"{lo:>10.5g} - {hi:<10.5g} {n:>7} {'#' * round(40 * n / top)}")
    print(f"{'class':<24} {'images':>7} {'tokens kept (mean per stage)':>30} {'GMACs':>9}")
    for cls, row in result["by_class"].items():
        kept = " / ".join(f"{c:.1f}" for c in row["mean_keep_counts"])
        print(f"{cls[:24]:<24} {row['images']:>7} {kept:>30} {row['mean_gmacs']:>9.5g}")
