"""`dynamicvit` command line: one sub-command per module in `dynamicvit.commands`.

Each command module defines `HELP` (one line), `add_arguments(parser)` and `run(args) -> int`.
Modules are imported only when their command runs, so `dynamicvit --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Optional, Sequence

from .errors import DynamicViTError, TrainingStopped

COMMANDS = {
    "demo": "Fashion-MNIST end to end: dense teacher vs DynamicViT, accuracy, MACs, speed, pictures.",
    "train": "Train a dense ViT or fine-tune a DynamicViT from a dense teacher.",
    "eval": "Top-1/top-5 of a model on a dataset at a chosen keep ratio, plus its MACs.",
    "calibrate": "Calibrate per-image budget thresholds on a dataset and write them into a checkpoint.",
    "visualize": "Draw the tokens a DynamicViT keeps at each stage.",
    "flops": "Count multiply-accumulates (GMACs) and parameters, per stage and in total.",
    "bench": "Throughput and latency of dense vs DynamicViT, side by side.",
    "info": "Build a DynamicViT and print its stages and token counts.",
    "export": "Export the inference path to ONNX (checked with ONNX Runtime), optionally int8-quantized.",
    "predict": "Classify image files and folders (top-k with class names); optionally draw the kept tokens.",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynamicvit", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        top, rest = parser.parse_known_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if top.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.DEBUG if top.verbose else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    module = importlib.import_module(f"dynamicvit.commands.{top.command}")
    cmd_parser = argparse.ArgumentParser(prog=f"dynamicvit {top.command}", description=COMMANDS[top.command])
    module.add_arguments(cmd_parser)
    try:
        args = cmd_parser.parse_args(rest)
    except SystemExit as e:  # usage error (argparse printed it) or --help
        return int(e.code or 0)
    try:
        return int(module.run(args) or 0)
    except TrainingStopped as e:  # SIGINT / SIGTERM: a checkpoint was written; 128 + signal, as a shell reports it
        print(f"dynamicvit {top.command}: {e}", file=sys.stderr)
        return 128 + e.signum
    except DynamicViTError as e:
        print(f"dynamicvit {top.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dynamicvit {top.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout went away (`| head`): nothing to report
        _silence_stdout()
        return 141  # 128 + SIGPIPE, as a shell reports it


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail on the closed pipe."""
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout is not a file (captured, replaced)
        pass


if __name__ == "__main__":
    sys.exit(main())
