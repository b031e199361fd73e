"""`dynamicvit bench`: throughput, latency, MACs and peak memory of dense vs DynamicViT, side by side.

The Markdown table goes to stdout; progress and notes go to stderr.
"""
from __future__ import annotations

import argparse
import logging

from ._model import add_budget_argument, add_model_arguments, build_base_model, check_budget, model_name

from ._common import float_list, non_negative_int, positive_int, positive_int_list

HELP = "Throughput and latency of dense vs DynamicViT, side by side."

_logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "--keep-ratios", type=float_list, default=[1.0, 0.9, 0.8, 0.7, 0.5],
        help="comma-separated keep ratios; 1.0 is the unmodified dense timm model, the baseline (default: 1.0,0.9,0.8,0.7,0.5)",
    )
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--batch-size", type=positive_int, default=None, help="one batch size")
    sizes.add_argument("--batch-sizes", type=positive_int_list, default=None, help="comma-separated batch sizes (default: 32,1)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    parser.add_argument("--threads", type=positive_int, default=None, help="CPU threads (torch.set_num_threads); default: torch's")
    parser.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none", help="autocast dtype (default: none = fp32)")
    parser.add_argument(
        "--runtime", type=_runtimes, default=None, metavar="RUNTIME[,RUNTIME]",
        help="where to run the models, comma-separated: torch (eager), compile (torch.compile, compiled during "
        "warm-up), onnxruntime (exported to ONNX, verified, run on the CPU); one table row per runtime (default: torch)",
    )
    parser.add_argument("--compile", action="store_true", help="same as --runtime compile")
    parser.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune"],
                        help="torch.compile mode of the compile runtime; reduce-overhead = CUDA graphs on a GPU (default: %(default)s)")
    parser.add_argument("--onnx-dir", default=None, metavar="DIR", help="keep the exported ONNX files here (default: a temporary folder)")
    add_budget_argument(parser)
    parser.add_argument("--packed-attention", default=None, metavar="KERNEL",
                        help="--budget per-image: how attention runs on the packed batch: auto, varlen, flash, loop, "
                        "groups, blockdiag or padded (default: auto)")
    parser.add_argument("--repeats", type=positive_int, default=10, help="timed repetitions per model (default: %(default)s)")
    parser.add_argument("--warmup", type=non_negative_int, default=3, help="untimed forwards per model first (default: %(default)s)")
    parser.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="write the rows as a JSON list")
    parser.add_argument("--markdown", default=None, metavar="PATH", help="write the Markdown table")
    parser.add_argument("--plot", default=None, metavar="PATH", help="write a PNG of speed-up and GMACs against keep ratio")
    parser.add_argument("--output", default=None, metavar="DIR", help="write bench.json, bench.md and bench.png into DIR")


def _runtimes(text: str) -> list[str]:
    from ..runtime.bench import RUNTIMES

    names = [s for s in text.replace(" ", "").split(",") if s]
    bad = [n for n in names if n not in RUNTIMES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown runtime(s) {bad or text!r}; choose from {', '.join(RUNTIMES)}")
    return names


def _runtime_list(args: argparse.Namespace) -> list[str]:
    runtimes = list(args.runtime or ([] if args.compile else ["torch"]))
    if args.compile and "compile" not in runtimes:
        runtimes.append("compile")
    return runtimes


def run(args: argparse.Namespace) -> int:
    from ..core.base import SparseModel
    from ..errors import ConfigError
    from ..files import check_output_file, prepare_output_dir
    from ..runtime.bench import run_benchmark, save_json, save_markdown, save_plot, to_markdown

    # Before minutes of timing, not after.
    if args.output:
        prepare_output_dir(args.output)
    for flag, path in (("--json", args.json_path), ("--markdown", args.markdown), ("--plot", args.plot)):
        if path:
            check_output_file(path, flag)
    if any(not 0.0 < r <= 1.0 for r in args.keep_ratios):
        raise ConfigError(f"--keep-ratios must be in (0, 1]; got {args.keep_ratios}")
    batch_sizes = [args.batch_size] if args.batch_size is not None else (args.batch_sizes or [32, 1])
    base = build_base_model(args, keep_ratio=min(r for r in args.keep_ratios))
    check_budget(base, args.budget)
    if args.packed_attention is not None:
        from ..core.packed import set_packed_attention

        set_packed_attention(base, args.packed_attention)
    if not isinstance(base, SparseModel):
        _logger.warning("the checkpoint holds a dense model: the DynamicViTs get untrained prediction modules")
    if args.checkpoint is None:
        _logger.info("random weights: fine for speed and MACs (pass --checkpoint for a trained model)")
    rows = run_benchmark(
        base,
        args.keep_ratios,
        batch_sizes,
        device=args.device,
        repeats=args.repeats,
        warmup=args.warmup,
        amp=args.amp,
        threads=args.threads,
        runtimes=_runtime_list(args),
        onnx_dir=args.onnx_dir,
        compile_mode=args.compile_mode,
        model_name=getattr(base, "model_name", None) or model_name(args),
        progress=True,
        budget=args.budget,
    )
    json_path, md_path, plot_path = args.json_path, args.markdown, args.plot
    if args.output:
        out = prepare_output_dir(args.output)
        json_path = json_path or out / "bench.json"
        md_path = md_path or out / "bench.md"
        plot_path = plot_path or out / "bench.png"
    for path, save in ((json_path, save_json), (md_path, save_markdown), (plot_path, save_plot)):
        if path:
            _logger.info("wrote %s", save(rows, path))
    print(to_markdown(rows), end="")
    return 0
