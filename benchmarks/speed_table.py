"""The DeiT-S speed table of docs/results.md: 224 px, fp32, 2 CPU threads, batch 32 and batch 1.

Dense timm DeiT-S against DynamicViT at keep ratios 0.9 / 0.8 / 0.7, all timed in one process with
interleaved repetitions (see `dynamicvit.runtime.bench`). Random weights: speed does not depend on them
(pass --checkpoint to time trained weights). Prints a Markdown table; --output DIR also writes the
full rows (JSON), the long-form table and a plot.

    python benchmarks/speed_table.py                 # about 2-4 minutes on a 2-core machine
    python benchmarks/speed_table.py --repeats 5     # quicker, noisier
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--checkpoint", default=None, help="weights to load (default: random)")
    p.add_argument("--keep-ratios", default="1.0,0.9,0.8,0.7")
    p.add_argument("--batch-sizes", default="32,1")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--output", default=None, metavar="DIR", help="also write speed.json, speed_long.md, speed.png")
    return p.parse_args(argv)


def table(rows: list[dict]) -> str:
    """One line per keep ratio: GMACs, then images/s and speed-up for each batch size."""
    from dynamicvit.runtime.bench import format_gmacs

    sizes = sorted({r["batch_size"] for r in rows}, reverse=True)
    ratios = sorted({r["keep_ratio"] for r in rows}, reverse=True)
    at = {(r["batch_size"], r["keep_ratio"]): r for r in rows}
    r0 = rows[0]
    head = ["keep ratio", "GMACs"]
    for bs in sizes:
        head += [f"batch {bs}: images/s", f"batch {bs}: ms / batch", "speed-up"]
    lines = [
        f"{r0['model']}, {r0['img_size'][0]} px, {r0['amp']}, {r0['device_name']}"
        + (f", {r0['threads']} threads" if r0["device"] == "cpu" else "")
        + f"; median of {r0['repeats']} interleaved repetitions; torch {r0['torch']}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for k in ratios:
        cells = ["1.0 (dense)" if k >= 1.0 else f"{k:g}", format_gmacs(at[(sizes[0], k)]["gmacs"])]
        for bs in sizes:
            r = at[(bs, k)]
            cells += [f"{r['images_per_s']:.1f}", f"{r['latency_ms']:.1f}", f"{r['speedup']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import dynamicvit
    from dynamicvit.runtime.bench import run_benchmark, save_json, save_markdown, save_plot

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    ratios = [float(s) for s in args.keep_ratios.split(",")]
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    base = dynamicvit.create_model(args.model, checkpoint_path=args.checkpoint, keep_ratio=min(ratios))
    rows = run_benchmark(
        base, ratios, sizes, device=args.device, repeats=args.repeats, warmup=args.warmup,
        amp=args.amp, threads=args.threads, model_name=args.model, progress=True,
    )
    print(table(rows), end="")
    if args.output:
        out = Path(args.output)
        save_json(rows, out / "speed.json")
        save_markdown(rows, out / "speed_long.md")
        save_plot(rows, out / "speed.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
