"""Speed of the per-image budget against the fixed budget at the same mean token count.

Targets: on the CPU (DeiT-S, 224 px, fp32, 2 threads) the per-image model runs at >= 0.95x the fixed
budget's images/s at batch 32 and 256, and is no slower at batch 1; on a GPU (bf16, batch 256,
varlen_attn) >= 0.95x. One row per attention kernel of the packed batch (`--kernels`), all timed in
one process with interleaved repetitions (`dynamicvit.runtime.bench.compare_throughput`).

Same mean token count: before each batch size the thresholds are calibrated on the very images that
are timed, so the per-image rows keep, on average, exactly the fixed budget's int(N * rho^s) tokens
per stage (the table shows the spread). At batch 1 one timed call runs every model over the whole
pool of `--pool` images, one image at a time, the pool the thresholds were calibrated on: each timed
repetition then holds exactly the fixed budget's mean token count, and the warmup has seen every
shape. (Timing a few images of the pool per repetition, and the median of those, compares the fixed
budget with whichever images the per-image model happened to draw.) The table reports per image.
Batch 1 adds a control row, "fixed, each image's counts": the fixed budget's path run on each image with
the counts the per-image budget gives that image (the same tokens, so the same logits). Against "fixed"
it measures what the varying shapes cost; against the per-image rows, what the per-image path adds.

Images: random (default), or a dataset's validation images (`--dataset`); weights: random, with
prediction modules scaled by `--predictor-std` so that images keep different counts, or a trained
`--checkpoint` (then pass `--dataset` too: random images say little about a trained model's spread).

    PYTHONPATH=src python benchmarks/per_image_speed.py --threads 2          # the CPU table, DeiT-S
    PYTHONPATH=src python benchmarks/per_image_speed.py --device cuda --amp bf16 --batch-sizes 256 \\
        --kernels varlen,padded                                              # the GPU row (benchmarks/gpu.sh)
    PYTHONPATH=src python benchmarks/per_image_speed.py --dry-run            # tiny model, 1 repeat: the plumbing

Prints a Markdown table; --json writes the rows.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
import torch.nn as nn

CPU_KERNELS = "loop,groups,blockdiag,padded"
SHAPES = "fixed, each image's counts"  # the batch-1 control row
DRY_RUN = dict(model="vit_tiny_patch16_224", img_size=32, batch_sizes="1,4", repeats=1, warmup=1, pool=4,
               model_kwargs='{"patch_size": 4, "embed_dim": 48, "depth": 6, "num_heads": 3}')


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--checkpoint", default=None, help="a trained DynamicViT (default: random weights)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--model-kwargs", default="{}", help="extra timm kwargs as JSON")
    p.add_argument("--keep-ratio", type=float, default=0.7)
    p.add_argument("--batch-sizes", default="1,32,256")
    p.add_argument("--kernels", default=None, help=f"packed attention kernels, one row each (default: {CPU_KERNELS} on "
                   "the CPU, varlen,padded on CUDA)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"))
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--pool", type=int, default=32, help="batch 1: images each timed call runs, one at a time")
    p.add_argument("--dataset", default=None, help="time on this dataset's validation images (default: random images)")
    p.add_argument("--predictor-std", type=float, default=0.1,
                   help="random weights: std of the prediction modules' weights (0: their fresh initialization)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON")
    p.add_argument("--dry-run", action="store_true", help="a tiny model, batch sizes 1 and 4, one repeat (where not given)")
    args = p.parse_args(argv)
    if args.dry_run:  # tiny settings where none were given
        for k, v in DRY_RUN.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    return args


class PoolPass(nn.Module):
    """Runs `model` on every image of `pool`, one at a time, at each call (the input only says the batch
    is one image); returns the last image's logits."""

    def __init__(self, model: nn.Module, pool: torch.Tensor):
        super().__init__()
        self.model, self.pool = model, pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(len(self.pool)):
            out = self.model(self.pool[i : i + 1])
        return out


class CountsPass(PoolPass):
    """`PoolPass` of a fixed-budget model that keeps, in each image, the counts `counts[i]` (S,) the
    per-image budget gives that image."""

    def __init__(self, model: nn.Module, pool: torch.Tensor, counts: torch.Tensor):
        super().__init__(model, pool)
        self.counts = [tuple(int(c) for c in row) for row in counts]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            for i, counts in enumerate(self.counts):
                self.model.keep_counts = lambda counts=counts: counts  # read once per forward, at its start
                out = self.model(self.pool[i : i + 1])
        finally:
            del self.model.keep_counts
        return out


def build_model(args):
    import dynamicvit

    kwargs = {**json.loads(args.model_kwargs), "img_size": args.img_size}
    if args.checkpoint:
        return dynamicvit.load(args.checkpoint).eval()
    torch.manual_seed(args.seed)
    model = dynamicvit.create_model(args.model, keep_ratio=args.keep_ratio, **kwargs).eval()
    if args.predictor_std > 0:
        with torch.no_grad():
            for p in model.predictors.parameters():
                p.normal_(0.0, args.predictor_std)
    return model


def images_for(args, model, n: int) -> torch.Tensor:
    """`n` images: a dataset's validation images, or random ones."""
    size = (model.in_chans, *model.img_size)
    if not args.dataset:
        return torch.randn(n, *size, generator=torch.Generator().manual_seed(args.seed + 1))
    from dynamicvit.data import build_dataset

    data = build_dataset(args.dataset, "val", img_size=model.img_size[0], subset=n, seed=args.seed,
                         pretrained_cfg=model.pretrained_cfg)
    return torch.stack([data[i][0] for i in range(len(data))])


def time_batch(args, base, kernels, bs: int, device) -> list[dict]:
    from dynamicvit.core.budget import calibrate_thresholds
    from dynamicvit.core.packed import set_packed_attention
    from dynamicvit.runtime.bench import compare_throughput
    from dynamicvit.runtime.image_macs import PerImageMacs

    pool = images_for(args, base, max(bs, args.pool if bs == 1 else bs))
    x = pool[:bs] if bs > 1 else pool[:1]
    calibrate_thresholds(base, [pool if bs == 1 else x], [args.keep_ratio])  # the timed images keep rho^s on average
    fixed = base.at_keep_ratio(args.keep_ratio, budget="fixed")
    models = {"fixed": fixed}
    for kernel in kernels:
        twin = base.at_keep_ratio(args.keep_ratio, budget="per-image")
        set_packed_attention(twin, kernel)
        models[f"per-image, {kernel}"] = twin
    with torch.inference_mode():
        counts = models[f"per-image, {kernels[0]}"].to(device).forward_pruned((pool if bs == 1 else x).to(device)).kept_counts.cpu()
    macs = PerImageMacs.of(fixed.cpu())
    timed = {k: PoolPass(m, pool.to(device)) if bs == 1 else m for k, m in models.items()}
    if bs == 1:
        timed[SHAPES] = CountsPass(base.at_keep_ratio(args.keep_ratio, budget="fixed"), pool.to(device), counts)
    per_call = len(pool) if bs == 1 else 1  # images one timed call runs, in batches of bs
    results = compare_throughput(timed, x.shape[1:], bs, device=device, repeats=args.repeats, warmup=args.warmup,
                                 amp_dtype=None if args.amp == "none" else args.amp, threads=args.threads,
                                 measure_memory=False, progress=True, images=x)
    base_rate = results["fixed"].images_per_s
    rows = []
    for name, res in results.items():
        per_image = name != "fixed"  # the control row keeps the per-image counts too
        c = counts.double() if per_image else torch.tensor(fixed.keep_counts(), dtype=torch.float64).expand_as(counts)
        rows.append(dict(
            batch_size=bs, model=name, images_per_s=res.images_per_s * per_call, latency_ms=res.latency_ms / per_call,
            speed_vs_fixed=res.images_per_s / base_rate, mean_counts=c.mean(0).tolist(),
            min_counts=c.min(0).values.int().tolist(), max_counts=c.max(0).values.int().tolist(),
            gmacs=float(macs.per_image(c.long()).mean()) / 1e9, times_ms=res.times_ms, images_per_call=per_call,
        ))
    return rows


def target(row: dict) -> str:
    if row["model"] in ("fixed", SHAPES):
        return "-"
    need = 1.0 if row["batch_size"] == 1 else 0.95
    return f"{'met' if row['speed_vs_fixed'] >= need else 'not met'} (>= {need:.2f}x)"


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from dynamicvit.runtime.device import device_name, resolve_device

    device = resolve_device(args.device)
    kernels = (args.kernels or ("varlen,padded" if device.type == "cuda" else CPU_KERNELS)).split(",")
    base = build_model(args)
    rows = []
    for bs in [int(b) for b in args.batch_sizes.split(",") if b]:
        rows += time_batch(args, base, kernels, bs, device)
    setup = (f"{base.model_name}, {args.img_size} px, keep ratio {args.keep_ratio}, {args.amp if args.amp != 'none' else 'fp32'}, "
             f"{device_name(device)}" + (f", {args.threads or torch.get_num_threads()} threads" if device.type == "cpu" else "")
             + f", median of {args.repeats} interleaved repetitions, {'dataset ' + args.dataset if args.dataset else 'random images'}"
             + f", torch {torch.__version__}")
    print(setup + "\n")
    print("| batch | model | images/s | latency (ms / batch) | vs fixed | tokens kept (mean; min-max) | GMACs (mean) | target |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        kept = " / ".join(f"{m:.1f}" for m in r["mean_counts"])
        spread = " / ".join(f"{a}-{b}" for a, b in zip(r["min_counts"], r["max_counts"]))
        print(f"| {r['batch_size']} | {r['model']} | {r['images_per_s']:.1f} | {r['latency_ms']:.2f} | "
              f"{r['speed_vs_fixed']:.3f}x | {kept}; {spread} | {r['gmacs']:.3f} | {target(r)} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"setup": setup, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
