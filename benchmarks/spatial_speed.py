"""Speed of DynamicSpatial (ConvNeXt-T, Swin-T) against the dense timm models, with the MACs per stage.

The target: at keep ratio 0.7 on the CPU at batch 32, the dynamic model is faster than the
dense one by at least the MACs ratio minus 10% (speed-up >= dense MACs / dynamic MACs - 0.10).
All models of one backbone are timed in one process with interleaved repetitions
(`dynamicvit.runtime.bench.compare_throughput`); random weights (the positions per stage are fixed by the
keep ratio, so speed does not depend on them). Prints a Markdown table; --json writes the rows.

    python benchmarks/spatial_speed.py --threads 2                 # both -T models, 224 px, batch 32
    python benchmarks/spatial_speed.py --models convnext_tiny --keep-ratios 0.7,0.9
    # a quick check at tiny sizes:
    python benchmarks/spatial_speed.py --models convnext_tiny --img-size 96 --batch-size 4 --repeats 2 \\
        --prune-locs 1,2,3 --model-kwargs '{"depths": [1, 1, 4, 1], "dims": [16, 32, 64, 128]}'
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
import torch.nn as nn


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="convnext_tiny,swin_tiny_patch4_window7_224")
    p.add_argument("--keep-ratios", default="0.7")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--prune-locs", default=None, help="predictor locations in stage 3 (default: the authors' table)")
    p.add_argument("--model-kwargs", default="{}", help="extra timm kwargs as JSON (tiny checks)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON")
    return p.parse_args(argv)


class UpTo(nn.Module):
    """A backbone (dense timm or DynamicSpatial) cut after stage `last` (0-based); -1: the whole model."""

    def __init__(self, model: nn.Module, last: int):
        super().__init__()
        self.model, self.last = model, last

    def forward(self, x: torch.Tensor):
        if self.last < 0:
            return self.model(x)
        return self.model.forward_intermediates(x, indices=[self.last], stop_early=True, intermediates_only=True)[0]


def stage_gmacs(model: nn.Module, size: tuple) -> list[float]:
    """GMACs of one image: [stem + stage 1, stage 2, stage 3 (with predictors and fast paths), stage 4 + head]."""
    from dynamicvit.runtime.flops import count_macs

    cumulative = [count_macs(UpTo(model, i), size).total for i in (0, 1, 2, -1)]
    return [(b - a) / 1e9 for a, b in zip([0, *cumulative[:-1]], cumulative)]


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    import dynamicvit
    from dynamicvit.runtime.bench import compare_throughput
    from dynamicvit.runtime.device import device_name

    ratios = [float(r) for r in args.keep_ratios.split(",") if r]
    locs = [int(i) for i in args.prune_locs.split(",")] if args.prune_locs else None
    kwargs = {**json.loads(args.model_kwargs), "img_size": args.img_size}
    size = (3, args.img_size, args.img_size)
    rows = []
    for name in [n for n in args.models.split(",") if n]:
        torch.manual_seed(0)
        base = dynamicvit.create_model(name, keep_ratio=ratios[0], prune_locs=locs, **kwargs).eval()
        models = {"dense": base.backbone, **{f"{r}": base.at_keep_ratio(r) for r in ratios}}
        macs = {k: stage_gmacs(m, size) for k, m in models.items()}
        results = compare_throughput(
            models, size, args.batch_size, device=args.device, repeats=args.repeats, warmup=args.warmup,
            threads=args.threads, measure_memory=False, progress=True,
        )
        dense_rate, dense_macs = results["dense"].images_per_s, sum(macs["dense"])
        for key, res in results.items():
            total = sum(macs[key])
            speedup, macs_speedup = res.images_per_s / dense_rate, dense_macs / total
            rows.append(dict(
                model=name, keep_ratio=1.0 if key == "dense" else float(key), batch_size=args.batch_size,
                gmacs_per_stage=macs[key], gmacs=total, macs_speedup=macs_speedup, images_per_s=res.images_per_s,
                speedup=speedup, target_met=None if key == "dense" else speedup >= macs_speedup - 0.10,
                device=device_name(torch.device(args.device)), threads=args.threads or torch.get_num_threads(),
            ))
    print("| model | keep ratio | GMACs stem+stage 1 / 2 / 3 / 4+head | GMACs | MACs ratio | images/s | speed-up | target (>= MACs ratio - 0.10) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        per_stage = " / ".join(f"{g:.3f}" for g in r["gmacs_per_stage"])
        target = "-" if r["target_met"] is None else ("met" if r["target_met"] else "not met")
        print(f"| {r['model']} | {r['keep_ratio']} | {per_stage} | {r['gmacs']:.3f} | {r['macs_speedup']:.2f}x | "
              f"{r['images_per_s']:.1f} | {r['speedup']:.2f}x | {target} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
