"""The deployment table: DeiT-S at keep ratio 0.7 against dense DeiT-S on the same runtime.

Part 1, speed (random weights: with a fixed number of tokens per stage the speed does not depend on
them). Eight models timed together per batch size with the interleaved protocol of
`dynamicvit.runtime.bench.compare_throughput`: dense and pruned, each in eager PyTorch, torch.compile, ONNX
Runtime fp32 and ONNX Runtime int8 (dynamic quantization of the linear layers). Printed:
- pruned vs dense on each runtime at batch 32 and 1 (targets: ONNX Runtime at least the MACs ratio, 1.55x for
  DeiT-S at 0.7, and 1.40x; torch.compile 1.40x at batch 1; eager 1.6x and 1.30x);
- torch.compile vs eager on the pruned model at batch 32 and 1 (targets: no slower at 32, faster at 1);
- int8 + pruning vs fp32 dense, both in ONNX Runtime (reported).
Each runtime's dense and pruned models are timed together, one runtime after the other: the thread pools
of ONNX Runtime and of PyTorch's OpenMP keep spinning for work after a run and take the cores from
whatever runs next, so with all eight interleaved (`--all-interleaved`) each model's time depends on which
runtime ran before it (on 2 cores, eager DeiT-S timed after an ONNX Runtime session ran 20% slower, and
pruned vs dense came out upside down). ONNX Runtime sessions run without spinning threads here.

Part 2, accuracy (Fashion-MNIST test set, ONNX Runtime): the shipped dense teacher in fp32 and int8, and
a fine-tuned DynamicViT (`--finetuned`, e.g. demo-output/finetune/model.safetensors from
`dynamicvit demo`) in fp32 and int8, with the speed of each against the fp32 dense teacher.

    python benchmarks/deploy_table.py --threads 2 --finetuned demo-output/finetune/model.safetensors
    python benchmarks/deploy_table.py --threads 2 --batch-sizes 1 --skip-accuracy      # the batch-1 ratios alone
    python benchmarks/deploy_table.py --threads 2 --batch-sizes 1 --skip-accuracy --opset 23   # ONNX's Attention op
    python benchmarks/deploy_table.py --model vit_tiny_patch16_224 --model-kwargs img_size=64 --quick   # smoke run
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--model-kwargs", default="", help="timm kwargs as key=value pairs (for smoke runs at tiny sizes)")
    p.add_argument("--keep-ratio", type=float, default=0.7)
    p.add_argument("--batch-sizes", default="32,1")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for PyTorch and ONNX Runtime")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset of the exported graphs (default: export_onnx's)")
    p.add_argument("--all-interleaved", action="store_true",
                   help="time all eight models together (default: each runtime's dense and pruned model together)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--teacher", default=None, help="dense Fashion-MNIST checkpoint (default: the shipped teacher)")
    p.add_argument("--finetuned", default=None, help="a fine-tuned DynamicViT on Fashion-MNIST (e.g. demo-output/finetune/model.safetensors)")
    p.add_argument("--subset", type=int, default=None, help="evaluate on this many test images (default: all 10,000)")
    p.add_argument("--skip-speed", action="store_true", help="only the accuracy part")
    p.add_argument("--skip-accuracy", action="store_true", help="only the speed part")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 repetition, 1 warm-up, 500 test images")
    p.add_argument("--output", default=None, metavar="FILE", help="also write all numbers as JSON")
    return p.parse_args(argv)


def speed_part(args, folder: Path) -> tuple[str, dict]:
    import torch

    import dynamicvit
    from dynamicvit.runtime.bench import compare_throughput, runtime_model
    from dynamicvit.runtime.device import device_name
    from dynamicvit.commands._common import model_kwargs
    from dynamicvit.runtime.deploy import DEFAULT_OPSET, OnnxModel, export_onnx, quantize_int8
    from dynamicvit.runtime.flops import count_macs

    torch.manual_seed(0)
    pruned = dynamicvit.create_model(args.model, keep_ratio=args.keep_ratio, **model_kwargs(args.model_kwargs)).eval()
    dense = pruned.backbone
    macs_ratio = count_macs(dense).total / count_macs(pruned).total
    models = {}
    for tag, m in (("dense", dense), ("pruned", pruned)):
        models[f"eager {tag}"] = m
        models[f"compile {tag}"] = runtime_model(m, "compile")
        fp32 = folder / f"{tag}.onnx"
        export_onnx(m, fp32, opset=args.opset, overwrite=True)
        models[f"ort {tag}"] = OnnxModel(fp32, threads=args.threads, spinning=False)
        models[f"ort int8 {tag}"] = OnnxModel(quantize_int8(fp32, folder / f"{tag}.int8.onnx", overwrite=True),
                                              threads=args.threads, spinning=False)
    size = tuple(count_macs(dense).input_size)
    # Each runtime's dense and pruned model timed together, one runtime after the other (--all-interleaved:
    # all eight together, where each runtime's thread pool still spins while the next one runs).
    runtimes = ("eager", "compile", "ort", "ort int8")
    groups = [list(models)] if args.all_interleaved else [[f"{rt} dense", f"{rt} pruned"] for rt in runtimes]
    times = {}
    for bs in [int(s) for s in args.batch_sizes.split(",")]:
        times[bs] = {}
        for names in groups:
            res = compare_throughput({n: models[n] for n in names}, size, bs, repeats=args.repeats, warmup=args.warmup,
                                     threads=args.threads, measure_memory=False, progress=True)
            times[bs].update({name: r.latency_ms for name, r in res.items()})

    def ratio(bs, slow, fast):
        return times[bs][slow] / times[bs][fast]

    sizes = list(times)
    head = "| comparison | " + " | ".join(f"batch {bs}" for bs in sizes) + " | target |"
    lines = [
        f"{args.model}, keep ratio {args.keep_ratio} vs dense, fp32 unless noted, {size[1]}x{size[2]} px, "
        f"{device_name(torch.device('cpu'))}, {args.threads} threads, torch {torch.__version__}; "
        f"median of {args.repeats} repetitions, interleaved "
        f"{'across all eight models' if args.all_interleaved else 'within each runtime'}; MACs ratio {macs_ratio:.2f}x; ONNX opset {args.opset or DEFAULT_OPSET}",
        "",
        head,
        "|" + "---|" * (len(sizes) + 2),
    ]
    rows = [
        ("ONNX Runtime: pruned vs dense", "ort dense", "ort pruned", f">= {macs_ratio:.2f}x at 32, >= 1.40x at 1"),
        ("torch.compile: pruned vs dense", "compile dense", "compile pruned", ">= 1.40x at 1"),
        ("eager: pruned vs dense", "eager dense", "eager pruned", ">= 1.6x at 32, >= 1.30x at 1"),
        ("pruned: torch.compile vs eager", "eager pruned", "compile pruned", ">= 1.00x at 32, > 1.00x at 1"),
        ("pruned: ONNX Runtime vs eager", "eager pruned", "ort pruned", ""),
        ("int8 + pruning vs fp32 dense (ONNX Runtime)", "ort dense", "ort int8 pruned", "reported"),
        ("int8 dense vs fp32 dense (ONNX Runtime)", "ort dense", "ort int8 dense", "reported"),
    ]
    for label, slow, fast, target in rows:
        lines.append(f"| {label} | " + " | ".join(f"{ratio(bs, slow, fast):.2f}x" for bs in sizes) + f" | {target} |")
    lines += ["", "| model | " + " | ".join(f"batch {bs}: ms" for bs in sizes) + " |", "|" + "---|" * (len(sizes) + 1)]
    for name in models:
        lines.append(f"| {name} | " + " | ".join(f"{times[bs][name]:.2f}" for bs in sizes) + " |")
    return "\n".join(lines) + "\n", {"latency_ms": times, "macs_ratio": macs_ratio}


def accuracy_part(args, folder: Path) -> tuple[str, dict]:
    import dynamicvit
    from dynamicvit.runtime.bench import compare_throughput
    from dynamicvit.data import preprocessing_config
    from dynamicvit.evaluate import onnx_accuracy
    from dynamicvit.runtime.deploy import OnnxModel, checkpoint_class_names, export_onnx, quantize_int8
    from dynamicvit.weights.formats import read_settings
    from dynamicvit.demo import teacher_path

    subset = 500 if args.quick and args.subset is None else args.subset
    sources = {"teacher (dense)": teacher_path(args.teacher)}
    if args.finetuned:
        sources["DynamicViT (fine-tuned)"] = Path(args.finetuned)
    sessions = {}
    for label, path in sources.items():
        model = dynamicvit.load_model(path).eval()
        settings = read_settings(path)
        fp32 = export_onnx(model, folder / f"{len(sessions)}.onnx", overwrite=True,
                           class_names=checkpoint_class_names(settings, 10),
                           preprocessing=preprocessing_config(model, "fashion-mnist")).path
        sessions[f"{label}, fp32"] = OnnxModel(fp32, threads=args.threads, spinning=False)
        sessions[f"{label}, int8"] = OnnxModel(quantize_int8(fp32, folder / f"{len(sessions)}.int8.onnx", overwrite=True),
                                               threads=args.threads, spinning=False)
    top1 = {name: onnx_accuracy(s, "fashion-mnist", subset=subset, progress=True)["top1"] for name, s in sessions.items()}
    base = "teacher (dense), fp32"
    speed = {}
    for bs in (256, 1):
        res = compare_throughput(sessions, sessions[base].input_size, bs, repeats=args.repeats, warmup=args.warmup,
                                 threads=args.threads, measure_memory=False, progress=True)
        speed[bs] = {name: res[base].latency_ms / r.latency_ms for name, r in res.items()}
    lines = [
        f"Fashion-MNIST test set ({subset or 10000} images), ONNX Runtime on the CPU, {args.threads} threads; "
        "speed-up against the fp32 dense teacher in ONNX Runtime",
        "",
        "| model | top-1 | change vs fp32 teacher | speed-up, batch 256 | speed-up, batch 1 |",
        "|---|---|---|---|---|",
    ]
    for name in sessions:
        lines.append(f"| {name} | {top1[name]:.2f} | {top1[name] - top1[base]:+.2f} pt | {speed[256][name]:.2f}x | {speed[1][name]:.2f}x |")
    if not args.finetuned:
        lines.append("| DynamicViT (fine-tuned) | not run: pass --finetuned demo-output/finetune/model.safetensors | | | |")
    return "\n".join(lines) + "\n", {"top1": top1, "speedup": speed}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = 1, 1
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    report = {}
    with tempfile.TemporaryDirectory(prefix="deploy-table-") as tmp:
        if not args.skip_speed:
            text, report["speed"] = speed_part(args, Path(tmp))
            print(text)
        if not args.skip_accuracy:
            text, report["accuracy"] = accuracy_part(args, Path(tmp))
            print(text)
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
