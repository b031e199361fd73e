"""Two timing questions about ONNX Runtime at batch 1, DeiT-S at keep ratio 0.7 against dense:

A / B: eager PyTorch and ONNX Runtime models timed together, with ONNX Runtime's worker threads spinning
after each run (its default) and without: spinning threads take the cores from the model timed next.
C: the graphs at opset 18 and 20 (ONNX's Gelu operator, which ONNX Runtime fuses with its bias),
without spinning, timed together.

Each group is timed in this one process with the interleaved protocol of
`dynamicvit.runtime.bench.compare_throughput` (random weights, perturbed so that no two are equal, as in
`batch1_profile.py`).

    python benchmarks/ort_settings.py --threads 2
    python benchmarks/ort_settings.py --model vit_tiny_patch16_224 --model-kwargs img_size=32 --repeats 1 --threads 1
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

_spec = importlib.util.spec_from_file_location("batch1_profile", Path(__file__).resolve().parent / "batch1_profile.py")
batch1_profile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(batch1_profile)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--model-kwargs", default="", help="timm kwargs as key=value pairs (for smoke runs at tiny sizes)")
    p.add_argument("--keep-ratio", type=float, default=0.7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    return p.parse_args(argv)


def groups(args, folder: Path) -> tuple[tuple[int, ...], dict]:
    """(input size, {group title: {name: model}}) as described in the module docstring; the dense and
    pruned models are batch1_profile's (the same perturbed random weights)."""
    from dynamicvit.runtime.deploy import OnnxModel, export_onnx
    from dynamicvit.runtime.flops import default_input_size

    pruned = batch1_profile.build_models(args)["pruned"]
    paths = {(tag, opset): export_onnx(m, folder / f"{tag}{opset}.onnx", opset=opset, verify=False).path
             for opset in (18, 20) for tag, m in (("dense", pruned.backbone), ("pruned", pruned))}

    def ort(tag, opset, spinning):
        return OnnxModel(paths[(tag, opset)], threads=args.threads, spinning=spinning)

    eager = {"eager dense": pruned.backbone, "eager pruned": pruned}
    return tuple(default_input_size(pruned)), {
        "A: eager and ONNX Runtime (opset 20), threads spinning": {
            **eager, "ort dense": ort("dense", 20, True), "ort pruned": ort("pruned", 20, True)},
        "B: eager and ONNX Runtime (opset 20), no spinning": {
            **eager, "ort dense": ort("dense", 20, False), "ort pruned": ort("pruned", 20, False)},
        "C: ONNX Runtime, opset 18 and 20, no spinning": {
            "ort18 dense": ort("dense", 18, False), "ort18 pruned": ort("pruned", 18, False),
            "ort20 dense": ort("dense", 20, False), "ort20 pruned": ort("pruned", 20, False)},
    }


def run(args) -> dict:
    """{group title: {name: ms per image}}, printed as it goes."""
    from dynamicvit.runtime.bench import compare_throughput

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        size, table = groups(args, Path(tmp))
        for title, models in table.items():
            res = compare_throughput(models, size, 1, repeats=args.repeats, warmup=args.warmup, threads=args.threads,
                                     measure_memory=False)
            ms = out[title] = {k: r.latency_ms for k, r in res.items()}
            names = list(ms)
            print(f"\n{title}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()))
            for dense, pruned in zip(names[0::2], names[1::2]):
                print(f"  {pruned} vs {dense}: {ms[dense] / ms[pruned]:.3f}x")
    return out


def main(argv=None) -> int:
    import torch

    from dynamicvit.runtime.device import device_name

    args = parse_args(argv)
    print(f"{args.model} at {args.keep_ratio} vs dense, batch 1, fp32, {args.threads} threads, {device_name('cpu')}, "
          f"torch {torch.__version__}; median of {args.repeats} interleaved repetitions per group")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
