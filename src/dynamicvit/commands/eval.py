"""`dynamicvit eval`: top-1/top-5 of a model on a dataset at one or more keep ratios, plus its MACs.

A DynamicViT is evaluated on its inference path (tokens removed), so the MACs printed are the ones
the accuracy was measured at. The keep ratio can be changed without retraining. Under the per-image
budget (--budget per-image) the MACs are the mean over the images evaluated, from each image's counts.
"""
from __future__ import annotations

import argparse
import logging

from ..errors import ConfigError
from ._common import float_list, json_text, model_kwargs, non_negative_int, positive_int
from ._model import add_budget_argument, check_budget, set_budget

_logger = logging.getLogger(__name__)

HELP = "Top-1/top-5 of a model on a dataset at a chosen keep ratio, plus its MACs."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="model file (model.safetensors or last.pth from `dynamicvit train`, "
                        "or plain weights with --model)")
    parser.add_argument("--model", default=None, help="timm name, needed only for plain weights without settings")
    parser.add_argument("--model-kwargs", "--timm-kwargs", dest="timm_kwargs", type=model_kwargs, default={}, metavar="KWARGS",
                        help="timm.create_model arguments for plain weights, e.g. '{\"embed_dim\": 64, \"depth\": 6}'")
    parser.add_argument("--dataset", default="fashion-mnist", help="'fashion-mnist' or an ImageFolder root with a val/ folder")
    parser.add_argument("--data-dir", "--data", default=None, help="Fashion-MNIST: folder holding the IDX files")
    parser.add_argument("--download", action="store_true", help="download Fashion-MNIST when missing")
    parser.add_argument("--keep-ratio", type=float_list, default=None,
                        help="keep ratio(s) to evaluate at, e.g. 0.7 or 0.5,0.7,0.9 (default: the model's)")
    add_budget_argument(parser)
    parser.add_argument("--crop-pct", type=float, default=None,
                        help="ImageFolder: resize to size / crop-pct and center crop (default: the model's pretrained "
                        "config; the paper's recipes evaluate at 0.875); 384 px and up: the image is warped whole")
    parser.add_argument("--batch-size", type=positive_int, default=256)
    parser.add_argument("--subset", type=positive_int, default=None, help="evaluate on a fixed random subset of this many images")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--amp", default="auto", choices=("auto", "none", "bf16", "fp16"), help="mixed precision")
    parser.add_argument("--num-workers", type=non_negative_int, default=2, help="data loader processes (0: in this process)")
    parser.add_argument("--bad-images", choices=("skip", "abort"), default="skip",
                        help="unreadable images: skip (each reported by path, counted) or abort (all read first)")
    parser.add_argument("--compile", action="store_true", help="run the model through torch.compile (dynamicvit.compile)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..core.base import SparseModel
    from ..core.budget import CountRecorder
    from ..core.hosts import any_host
    from ..data import bad_images_error, build_dataset, check_images, check_model_fits, resolve_dataset, square_img_size
    from ..runtime.device import resolve_device
    from ..weights.build import load

    info = resolve_dataset(args.dataset, args.data_dir)
    # A file's own settings win (the user's --timm-kwargs may adjust them); plain weights get the dataset's.
    model = load(args.checkpoint, args.model, overrides=args.timm_kwargs, plain_kwargs={
        "num_classes": info.num_classes, "in_chans": info.in_chans, "img_size": info.img_size, **args.timm_kwargs})
    check_model_fits(model, info)
    check_budget(model, args.budget)
    is_dynamic = isinstance(model, SparseModel)
    ratios = args.keep_ratio or [model.keep_ratio if is_dynamic else 1.0]
    if not is_dynamic and args.keep_ratio:
        print("note: a dense model keeps every token; --keep-ratio is ignored")
        ratios = [1.0]
    img_size = square_img_size(model)
    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:
        raise ConfigError(f"--crop-pct must be in (0, 1], got {args.crop_pct}")
    dataset = build_dataset(args.dataset, "val", img_size=img_size, data_dir=args.data_dir, download=args.download,
                            subset=args.subset, pretrained_cfg=model.pretrained_cfg, crop_pct=args.crop_pct)
    if args.bad_images == "abort" and (bad := check_images(dataset, "evaluation")):
        raise bad_images_error(bad, len(bad))
    loader = torch.utils.data.DataLoader(dataset, args.batch_size, shuffle=False, num_workers=args.num_workers)
    device = resolve_device(args.device)
    in_chans = any_host(model).in_chans

    rows = []
    for ratio in ratios:
        if is_dynamic:
            set_budget(model, ratio, args.budget)
        per_image = getattr(model, "budget", "fixed") == "per-image"
        macs = None if per_image else _count_macs(model, (in_chans, img_size, img_size))
        model.to(device)
        recorder = CountRecorder(model) if per_image else None
        runnable = model if recorder is None else recorder
        if args.compile:
            from ..runtime.deploy import compile as compile_model

            runnable = compile_model(runnable.eval())
        metrics = _evaluate_or_hint(args, runnable, loader, device)
        model.cpu()
        row = {
            "keep_ratio": ratio,
            "budget": getattr(model, "budget", "fixed") if is_dynamic else None,
            "keep_counts": list(model.keep_counts()) if is_dynamic else None,
            **metrics,
            "gmacs": macs.gmacs if macs is not None else None,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        }
        if per_image:
            row.update(_per_image_macs(model, recorder.counts()))
        rows.append(row)

    for r in rows:
        if r["unreadable"]:
            _logger.warning("keep ratio %g: %d unreadable image(s) skipped (named above)", r["keep_ratio"], r["unreadable"])
        if r["non_finite"]:
            _logger.warning("keep ratio %g: %d of %d images gave non-finite outputs (NaN or Inf), counted as wrong",
                            r["keep_ratio"], r["non_finite"], r["images"])
    if args.json:
        print(json_text({"checkpoint": str(args.checkpoint), "dataset": info.name, "results": rows}))
        return 0
    kind = f"{type(model).__name__} ({getattr(model, 'model_name', '')})" if is_dynamic else "dense model"
    print(f"{kind} on {info.name} val, {rows[0]['images']} images")
    print(f"{'keep ratio':>10} {'budget':>9} {'tokens kept':>17} {'top-1':>7} {'top-5':>7} {'loss':>7} {'GMACs':>8}")
    for r in rows:
        counts = r.get("mean_keep_counts") or r["keep_counts"]
        counts = "/".join(f"{c:g}" if isinstance(c, int) else f"{c:.1f}" for c in counts) if counts else "all"
        gmacs = f"{r['gmacs']:>8.4g}" if r["gmacs"] is not None else f"{'n/a':>8}"
        print(f"{r['keep_ratio']:>10.3f} {r['budget'] or 'dense':>9} {counts:>17} {r['top1']:>7.2f} {r['top5']:>7.2f} "
              f"{r['loss']:>7.4f} {gmacs}")
    if any(r.get("mean_keep_counts") for r in rows):
        print("per-image budget: tokens kept and GMACs are means over the images (each image keeps its own count)")
    if rows[0]["gmacs"] is None:
        print("MACs unavailable: dynamicvit.runtime.flops is not installed")
    return 0


# How CUDA, MPS and the CPU allocator say that an allocation failed.
OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "not enough memory")


def _evaluate_or_hint(args, model, loader, device) -> dict:
    """`evaluate`, with running out of memory (a batch too large for the device) turned into one line
    that says how to fix it."""
    from ..evaluate import evaluate

    try:
        return evaluate(model, loader, device, args.amp, progress=not args.json)
    except (MemoryError, RuntimeError) as e:  # torch's OutOfMemoryError is a RuntimeError
        text = str(e).strip()
        if not isinstance(e, MemoryError) and not any(words in text for words in OUT_OF_MEMORY):
            raise
        first = text.splitlines()[0][:200] if text else type(e).__name__
        raise ConfigError(f"out of memory evaluating batches of {args.batch_size} images on {device} ({first}); "
                          f"lower --batch-size, e.g. --batch-size {max(1, args.batch_size // 8)}") from None


def _per_image_macs(model, counts) -> dict:
    """The mean (and spread) of the MACs per image and of the kept counts, from each image's counts (M, S)."""
    from ..runtime.image_macs import PerImageMacs, macs_summary

    summary = macs_summary(PerImageMacs.of(model).per_image(counts))
    return {
        "gmacs": summary["mean_gmacs"],
        "gmacs_std": summary["std_gmacs"],
        "mean_keep_counts": counts.double().mean(0).tolist(),
    }


def _count_macs(model, input_size):
    try:
        from ..runtime.flops import count_macs
    except ImportError:
        return None
    return count_macs(model, input_size)
