"""Where the dropped tokens go, and what it costs: DeiT-S with dropped tokens discarded ("plain"), folded
into one fused token ("fused") or merged into their most similar kept tokens ("merged"), at the same keep
ratios, timed together.

All models share one backbone and one set of prediction modules (random weights: with a fixed number of
tokens per stage the speed does not depend on them), so at one keep ratio they keep as many tokens per
stage (the same ones at the first stage; later, what each did with the dropped tokens changes the scores);
merging adds the similarity, the scatter of the dropped tokens and the size bias of proportional
attention. MACs are counted exactly (`dynamicvit.runtime.flops.count_macs`, the merge included). Timed
with the interleaved protocol of `dynamicvit.runtime.bench.compare_throughput`; the table gives each
model's speed relative to the fused one at the same keep ratio.

    python benchmarks/dropped_speed.py --threads 2                        # batch 32, keep ratios 0.7 and 0.5
    python benchmarks/dropped_speed.py --threads 2 --batch-sizes 32,1 --keep-ratios 0.7,0.5,0.4
    python benchmarks/dropped_speed.py --model vit_tiny_patch16_224 --model-kwargs img_size=64 --repeats 1 --warmup 0
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

VARIANTS = ("plain", "fused", "merged")


def parse_args(argv=None) -> argparse.Namespace:
    from dynamicvit.commands._common import float_list, int_list

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--model-kwargs", default="", help="timm kwargs as key=value pairs (for smoke runs at tiny sizes)")
    p.add_argument("--keep-ratios", type=float_list, default=[0.7, 0.5])
    p.add_argument("--batch-sizes", type=int_list, default=[32])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--output", default=None, metavar="FILE", help="also write the rows as JSON")
    return p.parse_args(argv)


def build_models(args) -> dict:
    """{(variant, keep ratio): model} sharing one backbone and one set of prediction modules."""
    import torch

    import dynamicvit
    from dynamicvit.commands._common import model_kwargs

    torch.manual_seed(0)
    base = dynamicvit.create_model(args.model, keep_ratio=min(args.keep_ratios), **model_kwargs(args.model_kwargs)).eval()
    models = {}
    for rho in args.keep_ratios:
        for variant in VARIANTS:
            m = dynamicvit.sparsify(base.backbone, keep_ratio=rho, prune_locs=base.prune_locs,
                                    fuse_dropped=variant == "fused", merge_dropped=variant == "merged").eval()
            m.predictors = base.predictors
            models[(variant, rho)] = m
    return models


def measure(args) -> list[dict]:
    from dynamicvit.runtime.bench import compare_throughput
    from dynamicvit.runtime.flops import count_macs, default_input_size

    models = build_models(args)
    macs = {key: count_macs(m).total for key, m in models.items()}
    shape = default_input_size(next(iter(models.values())))
    named = {f"{v} {rho:g}": m for (v, rho), m in models.items()}
    rows = []
    for bs in args.batch_sizes:
        res = compare_throughput(named, shape, bs, repeats=args.repeats, warmup=args.warmup, threads=args.threads,
                                 measure_memory=False, progress=True)
        for (v, rho) in models:
            r, ref = res[f"{v} {rho:g}"], res[f"fused {rho:g}"]
            rows.append({"variant": v, "keep_ratio": rho, "batch_size": bs, "macs": macs[(v, rho)],
                         "images_per_s": r.images_per_s, "latency_ms": r.latency_ms,
                         "vs_fused": r.images_per_s / ref.images_per_s})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| batch | keep ratio | variant | MACs (M) | images/s | ms / batch | speed vs fused |", "|" + "---|" * 7]
    for r in rows:
        lines.append(f"| {r['batch_size']} | {r['keep_ratio']:g} | {r['variant']} | {r['macs'] / 1e6:.1f} | "
                     f"{r['images_per_s']:.1f} | {r['latency_ms']:.1f} | {r['vs_fused']:.3f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import torch

    from dynamicvit.runtime.device import device_name

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = parse_args(argv)
    rows = measure(args)
    print(f"{args.model}, fp32, {args.threads} threads, {device_name('cpu')}, "
          f"torch {torch.__version__}; median of {args.repeats} interleaved repetitions")
    print(table(rows), end="")
    if args.output:
        from pathlib import Path

        from dynamicvit.files import atomic_write

        atomic_write(args.output, lambda tmp: Path(tmp).write_text(json.dumps(rows, indent=1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
