"""`dynamicvit calibrate`: thresholds for the per-image budget, written into a new checkpoint.

For each keep ratio, stage s gets the threshold on p(keep) at which the images of the sample keep,
on average, the fixed budget's int(N * rho^s) tokens: the mean MACs per image stay the fixed budget's,
while each image keeps as many tokens as its scores earn. The output checkpoint holds the thresholds
of every ratio calibrated and uses the per-image budget (`dynamicvit eval --checkpoint OUT --budget
per-image`; `--budget fixed` still gives the fixed one).
"""
from __future__ import annotations

import argparse
import logging

from ._common import float_list, json_text, model_kwargs, non_negative_int, positive_int

_logger = logging.getLogger(__name__)

HELP = "Calibrate per-image budget thresholds on a dataset and write them into a checkpoint."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--checkpoint", required=True, help="a trained DynamicViT (model.safetensors or last.pth from `dynamicvit train`, "
        "or plain weights with --model)")
    add("--model", default=None, help="timm name, needed only for plain weights without settings")
    add("--model-kwargs", "--timm-kwargs", dest="timm_kwargs", type=model_kwargs, default={}, metavar="KWARGS",
        help="timm.create_model arguments for plain weights")
    add("--dataset", default="fashion-mnist", help="'fashion-mnist' or an ImageFolder root with a val/ folder")
    add("--data-dir", "--data", default=None, help="Fashion-MNIST: folder holding the IDX files")
    add("--download", action="store_true", help="download Fashion-MNIST when missing")
    add("--keep-ratio", type=float_list, required=True, help="keep ratio(s) to calibrate, e.g. 0.5 or 0.5,0.7,0.9")
    add("--min-keep", type=positive_int, default=None,
        help="the fewest patch tokens an image keeps at any stage (default: the checkpoint's, else 1)")
    add("--subset", type=positive_int, default=2000,
        help="calibrate on a fixed random subset of this many validation images (default: %(default)s)")
    add("--output", required=True, metavar="FILE", help="the calibrated checkpoint to write (.safetensors)")
    add("--overwrite", action="store_true", help="replace an existing --output (never the input checkpoint)")
    add("--batch-size", type=positive_int, default=256)
    add("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    add("--num-workers", type=non_negative_int, default=2, help="data loader processes (0: in this process)")
    add("--json", action="store_true", help="print the thresholds and what they keep as JSON")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from ..core.budget import calibrate_thresholds
    from ..core.vit import DynamicViT
    from ..data import build_dataset, check_model_fits, resolve_dataset, square_img_size
    from ..errors import ConfigError
    from ..files import check_output_file
    from ..runtime.device import resolve_device
    from ..weights.build import load
    from ..weights.formats import read_checkpoint, save_model

    out = Path(args.output)
    if out.suffix != ".safetensors":
        raise ConfigError(f"--output {out}: name the file *.safetensors")
    if out.resolve() == Path(args.checkpoint).resolve():
        raise ConfigError("--output is the input checkpoint; write the calibrated model to another file")
    if out.exists() and not args.overwrite:
        raise ConfigError(f"{out} already exists; choose another --output or pass --overwrite")
    check_output_file(out, "--output")
    info = resolve_dataset(args.dataset, args.data_dir)
    checkpoint = read_checkpoint(args.checkpoint)
    model = load(args.checkpoint, args.model, overrides=args.timm_kwargs, checkpoint=checkpoint, plain_kwargs={
        "num_classes": info.num_classes, "in_chans": info.in_chans, "img_size": info.img_size, **args.timm_kwargs})
    if not isinstance(model, DynamicViT):
        raise ConfigError(
            f"{args.checkpoint} holds a {type(model).__name__}, not a DynamicViT (ViT, DeiT, LV-ViT) with trained "
            "prediction modules; per-image budgets are calibrated on those"
        )
    check_model_fits(model, info)
    dataset = build_dataset(args.dataset, "val", img_size=square_img_size(model), data_dir=args.data_dir,
                            download=args.download, subset=args.subset, pretrained_cfg=model.pretrained_cfg)
    loader = torch.utils.data.DataLoader(dataset, args.batch_size, shuffle=False, num_workers=args.num_workers)
    model.to(resolve_device(args.device))
    results = calibrate_thresholds(model, loader, args.keep_ratio, min_keep=args.min_keep, progress=not args.json)
    model.cpu()
    ratio = model.keep_ratio if model.config.thresholds_at(model.keep_ratio) else args.keep_ratio[0]
    model.set_keep_ratio(ratio, budget="per-image")
    extra = dict((checkpoint[1] or {}).get("extra") or {})
    extra["calibration"] = {"dataset": info.name, "images": results[0].images, "source": str(args.checkpoint)}
    save_model(model, out, overwrite=args.overwrite, extra=extra)
    if args.json:
        print(json_text({"output": str(out), "keep_ratio": ratio, "min_keep": model.config.min_keep,
                         "calibration": [r.to_dict() for r in results]}))
        return 0
    print(f"calibrated on {results[0].images} {info.name} images; per-image budget, min_keep {model.config.min_keep}")
    print(f"{'keep ratio':>10} {'stage':>5} {'threshold':>10} {'target':>7} {'mean':>7} {'min':>5} {'max':>5} {'raised':>7}")
    for r in results:
        for s, t in enumerate(r.thresholds):
            print(f"{r.keep_ratio:>10g} {s + 1:>5} {t:>10.4f} {r.target_counts[s]:>7} {r.mean_counts[s]:>7.2f} "
                  f"{r.min_counts[s]:>5} {r.max_counts[s]:>5} {r.clamped[s]:>7.1%}")
    print(f"wrote {out} (keep ratio {ratio:g}, per-image budget)")
    return 0
