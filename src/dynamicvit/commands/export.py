"""`dynamicvit export`: the inference path as one ONNX graph, verified against PyTorch.

The command exits 0 only when ONNX Runtime reproduces PyTorch (fp32 logits within 1e-4 at two batch
sizes); otherwise nothing is written and it exits 2 with the measured difference. `--quantize int8`
also writes `<output>.int8.onnx` and reports its accuracy and speed against the fp32 graph.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ._model import add_budget_argument, add_model_arguments, build_base_model, set_budget

HELP = "Export the inference path to ONNX (checked with ONNX Runtime), optionally int8-quantized."

_logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add = parser.add_argument
    add("--format", default="onnx", choices=["onnx"], help="output format (default: %(default)s)")
    add("--output", required=True, metavar="FILE", help="the .onnx file to write")
    add("--keep-ratio", type=float, default=None, help="keep ratio fixed into the graph (default: the checkpoint's, else 0.7)")
    add("--dense", action="store_true", help="export the backbone without pruning (for side-by-side comparison)")
    add_budget_argument(parser)
    add("--opset", type=int, default=None, help="ONNX opset (default 18)")
    add("--exporter", choices=["dynamo", "torchscript"], default="dynamo",
        help="torch.onnx exporter: dynamo (torch.export + onnxscript) or torchscript (tracing) (default: %(default)s)")
    add("--overwrite", action="store_true", help="replace an existing output file")
    add("--no-verify", dest="verify", action="store_false", help="skip the ONNX Runtime check (not recommended)")
    add("--quantize", choices=["int8"], default=None,
        help="also write <output>.int8.onnx (ONNX Runtime dynamic quantization of the linear layers) and report "
        "its accuracy and speed against the fp32 graph")
    add("--dataset", default="fashion-mnist", help="dataset for the --quantize accuracy report (default: %(default)s)")
    add("--data-dir", default=None, help="Fashion-MNIST: folder with the IDX files (default: the system package)")
    add("--subset", type=int, default=None, help="--quantize: evaluate on a fixed random subset of this many images")
    add("--threads", type=int, default=None, help="CPU threads for ONNX Runtime and PyTorch (default: torch's)")
    add("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..core.base import SparseModel
    from ..data import num_classes_of, preprocessing_config
    from ..errors import ConfigError
    from ..runtime import deploy
    from ..weights.formats import read_settings
    from ..weights.hf import is_hf_spec

    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    output = Path(args.output)
    if output.suffix != ".onnx":
        raise ConfigError(f"--output {output}: name the file *.onnx")
    int8_path = output.with_name(output.stem + ".int8.onnx")
    for path in [output] + ([int8_path] if args.quantize else []):
        if path.exists() and not args.overwrite:
            raise ConfigError(f"{path} already exists; choose another --output or pass --overwrite")
    settings = read_settings(args.checkpoint) if args.checkpoint and not is_hf_spec(args.checkpoint) else None
    model = build_base_model(args, keep_ratio=args.keep_ratio or 0.7).eval()
    if args.budget is not None:  # the keep ratio goes to export_onnx, which exports a twin at it
        set_budget(model, None, args.budget)
    if args.quantize:
        _check_dataset_fits(args, model)
    if args.checkpoint is None and not is_hf_spec(args.model):
        _logger.warning("random weights (no --checkpoint): the graph is good for timing, not for predictions")
    train_dataset = (((settings or {}).get("extra") or {}).get("train_config") or {}).get("dataset")
    num_classes = num_classes_of(model)
    class_names = deploy.checkpoint_class_names(settings, num_classes) or deploy.default_class_names(model)
    dense = args.dense or (args.keep_ratio is None and not isinstance(model, SparseModel))
    result = deploy.export_onnx(
        model, output, keep_ratio=args.keep_ratio, opset=args.opset, dense=dense, class_names=class_names,
        preprocessing=preprocessing_config(model, train_dataset), overwrite=args.overwrite,
        verify=args.verify, exporter=args.exporter,
        extra_metadata={"source": str(args.checkpoint or args.model)},
    )
    report = {"export": result.to_dict()}
    if not args.json:
        meta = result.metadata
        what = deploy.sparsity_summary(meta)
        print(f"wrote {result.path} ({meta['model_name']}, {what}, opset {result.opset}, {args.exporter} exporter)")
        if result.verification is not None:
            print(result.verification.summary())
    if args.quantize:
        report["int8"] = _quantize_report(args, output, int8_path)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    return 0


def _check_dataset_fits(args, model) -> None:
    """Before the export: the --quantize report needs a dataset the model was made for."""
    from ..data import num_classes_of, resolve_dataset
    from ..errors import ConfigError
    from ..runtime.flops import default_input_size

    info = resolve_dataset(args.dataset, args.data_dir)  # raises DataError naming the fix
    C, H, W = default_input_size(model)
    num_classes = num_classes_of(model)
    if (C, num_classes) != (info.in_chans, info.num_classes) or H != W:
        raise ConfigError(
            f"--quantize reports accuracy on {info.name} ({info.in_chans}-channel images, {info.num_classes} classes), "
            f"but the model takes {C}x{H}x{W} images and predicts {num_classes} classes; name its dataset with --dataset"
        )


def _quantize_report(args, fp32_path: Path, int8_path: Path) -> dict:
    from ..evaluate import onnx_accuracy
    from ..runtime import deploy
    from ..runtime.bench import compare_throughput

    deploy.quantize_int8(fp32_path, int8_path, overwrite=args.overwrite)
    models = {"fp32": deploy.OnnxModel(fp32_path, args.threads), "int8": deploy.OnnxModel(int8_path, args.threads)}
    accuracy = {
        name: onnx_accuracy(m, args.dataset, data_dir=args.data_dir, subset=args.subset, progress=not args.json)
        for name, m in models.items()
    }
    size = models["fp32"].input_size
    speed = {}
    for bs in (32, 1):
        timing = compare_throughput(models, size, bs, repeats=5, warmup=2, measure_memory=False, progress=not args.json)
        speed[bs] = {name: r.latency_ms for name, r in timing.items()}
    report = {
        "path": str(int8_path),
        "dataset": args.dataset,
        "images": accuracy["fp32"]["images"],
        "top1_fp32": accuracy["fp32"]["top1"],
        "top1_int8": accuracy["int8"]["top1"],
        "top1_change": accuracy["int8"]["top1"] - accuracy["fp32"]["top1"],
        "latency_ms": speed,
        "speedup": {bs: s["fp32"] / s["int8"] for bs, s in speed.items()},
        "bytes": {"fp32": fp32_path.stat().st_size, "int8": int8_path.stat().st_size},
    }
    if not args.json:
        print(f"wrote {int8_path} (int8 dynamic quantization of the linear layers, "
              f"{report['bytes']['int8'] / 2**20:.1f} MiB vs {report['bytes']['fp32'] / 2**20:.1f} MiB)")
        print(f"{args.dataset} top-1 on {report['images']} images: fp32 {report['top1_fp32']:.2f}, "
              f"int8 {report['top1_int8']:.2f} ({report['top1_change']:+.2f} pt)")
        for bs, s in speed.items():
            print(f"ONNX Runtime, batch {bs}: fp32 {s['fp32']:.2f} ms, int8 {s['int8']:.2f} ms "
                  f"(x{report['speedup'][bs]:.2f}); timed on this machine, {models['fp32'].session.get_session_options().intra_op_num_threads} thread(s)")
    return report
