"""transformers DeiT-S and timm DeiT-S: the speed-up of DynamicViT at keep ratio 0.7 on each, timed together.

Four models timed in one process with interleaved repetitions (`dynamicvit.runtime.bench.compare_throughput`),
per batch size: transformers' ViTForImageClassification with the configuration of
facebook/deit-small-patch16-224 (random weights, `--attn` sdpa by default), DynamicViT on it, timm's
deit_small_patch16_224 and DynamicViT on it. fp32, random weights (the tokens kept per stage are fixed by the
keep ratio, so speed does not depend on them). The target: the transformers model gains at least as much
as the timm model on the same run. Prints a Markdown table; --json writes the rows.

    python benchmarks/hf_speed.py --threads 2                      # batch 32 and 1, 224 px, CPU
    python benchmarks/hf_speed.py --threads 2 --json hf_speed.json
    python benchmarks/hf_speed.py --tiny --repeats 1 --warmup 0    # a dry run at tiny sizes: plumbing, not speed
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
import torch.nn as nn

# facebook/deit-small-patch16-224 (a ViTForImageClassification), and a tiny one of the same shape for dry runs.
DEIT_SMALL = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, image_size=224,
                  patch_size=16, num_labels=1000, qkv_bias=True, layer_norm_eps=1e-12, hidden_act="gelu")
TINY = dict(DEIT_SMALL, hidden_size=48, num_hidden_layers=4, num_attention_heads=3, intermediate_size=192, image_size=64)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keep-ratio", type=float, default=0.7)
    p.add_argument("--batch-sizes", default="32,1")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"), help="transformers' attention implementation")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="tiny models (a dry run of the script)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON")
    return p.parse_args(argv)


def build_models(keep_ratio: float, attn: str, tiny: bool) -> dict[tuple[str, float], nn.Module]:
    """(library, keep ratio) -> model: dense and DynamicViT of transformers and of timm, random weights."""
    import transformers

    import dynamicvit

    shape = TINY if tiny else DEIT_SMALL
    torch.manual_seed(0)
    config = transformers.ViTConfig(**shape)
    hf_dense = transformers.ViTForImageClassification._from_config(config, attn_implementation=attn).eval()
    timm_args = {} if not tiny else dict(embed_dim=shape["hidden_size"], depth=shape["num_hidden_layers"],
                                         num_heads=shape["num_attention_heads"], img_size=shape["image_size"])
    timm_sparse = dynamicvit.create_model("deit_small_patch16_224", keep_ratio=keep_ratio, **timm_args).eval()
    return {
        ("transformers", 1.0): hf_dense,
        ("transformers", keep_ratio): dynamicvit.sparsify(hf_dense, keep_ratio).eval(),
        ("timm", 1.0): timm_sparse.backbone,
        ("timm", keep_ratio): timm_sparse,
    }


def table(rows: list[dict]) -> str:
    """One line per model and batch size, then whether the transformers speed-up reached timm's."""
    r0 = rows[0]
    lines = [
        f"DeiT-S{' (tiny)' if r0['tiny'] else ''}, {r0['img_size']} px, fp32, {r0['device']}, {r0['threads']} threads, "
        f"transformers attention {r0['attn']}; median of {r0['repeats']} interleaved repetitions; torch {r0['torch']}, "
        f"transformers {r0['transformers']}",
        "",
        "| library | keep ratio | GMACs | batch | images/s | ms / batch | speed-up vs its dense model |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['library']} | {r['keep_ratio']:g} | {r['gmacs']:.3f} | {r['batch_size']} | "
                     f"{r['images_per_s']:.1f} | {r['latency_ms']:.1f} | {r['speedup']:.2f}x |")
    lines.append("")
    for bs in sorted({r["batch_size"] for r in rows}, reverse=True):
        gain = {r["library"]: r["speedup"] for r in rows if r["batch_size"] == bs and r["keep_ratio"] < 1.0}
        verdict = "met" if gain["transformers"] >= gain["timm"] else "not met"
        lines.append(f"batch {bs}: transformers {gain['transformers']:.2f}x, timm {gain['timm']:.2f}x: target {verdict}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    import transformers

    from dynamicvit.runtime.bench import compare_throughput
    from dynamicvit.runtime.device import device_name
    from dynamicvit.runtime.flops import count_macs, default_input_size

    models = build_models(args.keep_ratio, args.attn, args.tiny)
    size = default_input_size(models[("timm", 1.0)])
    gmacs = {key: count_macs(m).gmacs for key, m in models.items()}
    settings = dict(device=device_name(torch.device(args.device)), threads=args.threads or torch.get_num_threads(),
                    attn=args.attn, repeats=args.repeats, img_size=size[-1], tiny=args.tiny, torch=torch.__version__,
                    transformers=transformers.__version__)
    rows = []
    for bs in [int(b) for b in args.batch_sizes.split(",") if b]:
        named = {f"{lib} {ratio:g}": m for (lib, ratio), m in models.items()}
        results = compare_throughput(named, size, bs, device=args.device, repeats=args.repeats, warmup=args.warmup,
                                     threads=args.threads, measure_memory=False, progress=True)
        for lib, ratio in models:
            res, dense = results[f"{lib} {ratio:g}"], results[f"{lib} 1"]
            rows.append(dict(library=lib, keep_ratio=ratio, batch_size=bs, gmacs=gmacs[(lib, ratio)],
                             images_per_s=res.images_per_s, latency_ms=res.latency_ms,
                             speedup=res.images_per_s / dense.images_per_s, times_ms=res.times_ms, **settings))
    print(table(rows), end="")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
