"""`dynamicvit train`: fine-tune a DynamicViT from a dense teacher, or train a dense ViT (--dense).

Every `TrainConfig` setting has a flag (`keep_ratio` -> `--keep-ratio`). Settings come from, in
increasing priority: the defaults, a paper recipe (--recipe lvvit-s, convnext-t, ...), a YAML/JSON
file (--config), the flags.

Multi-GPU:  torchrun --nproc_per_node 8 -m dynamicvit.cli train --config deit_s.yaml
"""
from __future__ import annotations

import argparse
import dataclasses
import os

from ..errors import ConfigError

from ._common import int_list, model_kwargs

HELP = "Train a dense ViT or fine-tune a DynamicViT from a dense teacher."

# One line per setting; `TrainConfig` documents the choices in full.
FLAG_HELP = {
    "model": "timm model name, e.g. deit_small_patch16_224 (default: the teacher checkpoint's)",
    "dataset": "'fashion-mnist' or an ImageFolder root with train/ and val/ class folders",
    "data_dir": "Fashion-MNIST: folder holding the IDX files (default: the system package's)",
    "output": "folder for last.pth, model.safetensors, metrics.jsonl and TensorBoard logs",
    "dense": "train a plain dense ViT with cross-entropy (e.g. to make a teacher)",
    "teacher": "dense teacher checkpoint; the student starts from its weights",
    "pretrained": "without --teacher: use timm's pretrained weights (needs the hub or its cache)",
    "init_checkpoint": "weights to start the model from instead of the teacher's",
    "keep_ratio": "rho: stage s keeps int(N * rho^s) patch tokens (ConvNeXt/Swin: int(N * (rho - 0.2 s)) positions on the FFN)",
    "keep_ratios": "elastic training: LO:HI (e.g. 0.4:1.0, uniform), low:LO:HI (small ratios drawn more often) or A,B,C, a keep ratio drawn per step (default: --keep-ratio only)",
    "fuse_dropped": "fold each stage's dropped tokens into one extra token instead of discarding them",
    "merge_dropped": "add each dropped token into its most similar kept token (size-weighted; excludes --fuse-dropped)",
    "predictor_width": "hidden width of the prediction modules, a multiple of 4 (default: the model's width, the "
    "paper's layout; a quarter of it costs about a fifth of the MACs)",
    "detach_predictor_input": "ViTs: the prediction modules pass no gradient back into the backbone (the keep-ratio "
    "loss trains them alone)",
    "budget": "fixed, or per-image: the ratio loss holds the batch's mean kept fraction at rho^s, not each image's "
    "(calibrate the thresholds afterwards with `dynamicvit calibrate`)",
    "prune_locs": "comma-separated blocks before which to prune, e.g. 3,6,9 (default: evenly spaced; "
    "ConvNeXt/Swin: block indices inside stage 3, default the authors' table)",
    "timm_kwargs": "timm.create_model arguments: a JSON object ('{\"drop_path_rate\": 0.1}') or key=value pairs",
    "recipe": "start from a paper recipe (deit-s, deit-b, deit-256, lvvit-s, lvvit-m, convnext-t/s/b, swin-t/s/b); flags given win",
    "predictor_keep_prior": "keep probability fresh prediction modules start at; None: rho (0.5: the reference's)",
    "eval_crop_pct": "evaluation crop of ImageFolder images; None: the model's pretrained config's",
    "epochs": "training epochs",
    "batch_size": "images per process and step",
    "lr": "predictor learning rate (whole model when --dense); default 1e-3 * global batch / 1024",
    "backbone_lr_scale": "backbone lr = lr * this",
    "freeze_backbone_epochs": "backbone lr is 0 for these first epochs",
    "warmup_epochs": "linear warmup epochs (may be fractional)",
    "warmup_lr": "learning rate at the start of the warmup",
    "min_lr": "learning rate at the end of the cosine schedule",
    "weight_decay": "AdamW weight decay (not on biases, norms, tokens)",
    "clip_grad": "clip the global gradient norm to this",
    "ratio_weight": "weight of the keep-ratio loss",
    "distill_weight": "weight of the KL distillation to the teacher's logits",
    "token_weight": "weight of the token distillation loss",
    "token_target": "token distillation target of a merged token: position (the teacher's token at its place) or "
    "held (the mean of the teacher's tokens over the patches it holds)",
    "smoothing": "label smoothing",
    "mixup": "mixup alpha (0 disables)",
    "cutmix": "cutmix alpha (0 disables)",
    "augment": "JSON of timm create_transform arguments, e.g. '{\"auto_augment\": \"rand-m9-mstd0.5-inc1\"}'",
    "amp": "mixed precision: auto, none, bf16 or fp16",
    "ema": "keep an exponential moving average of the weights",
    "ema_decay": "EMA decay per step",
    "seed": "random seed",
    "device": "auto, cpu, cuda, cuda:N or mps",
    "num_workers": "data loader processes",
    "download": "download Fashion-MNIST when missing",
    "subset": "train on a fixed random subset of this many images",
    "val_subset": "evaluate on a fixed random subset of this many images",
    "max_steps_per_epoch": "cut every epoch after this many steps",
    "eval_every": "evaluate every this many epochs",
    "log_every": "steps between metric lines",
    "resume": "continue from <output>/last.pth, or from the given file",
    "overwrite": "replace an earlier run in --output (without it, an earlier run is an error)",
    "bad_images": "unreadable images: skip (each reported by path, counted) or abort (all read before training)",
    "deterministic": "use deterministic algorithms (slower, repeatable)",
    "progress": "show progress bars",
    "tensorboard": "write TensorBoard logs",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..core.losses import TOKEN_TARGETS
    from ..core.settings import BUDGETS
    from ..data import BAD_IMAGE_MODES
    from ..runtime.device import AMP_MODES
    from ..training.config import RECIPES, TrainConfig

    parser.add_argument("--config", default=None, help="YAML or JSON file of settings (flags win over it)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type).replace(" ", "")
        help_text = FLAG_HELP.get(f.name, "")
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        help_text = f"{help_text} (default: {default})"
        common = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if f.name == "resume":
            parser.add_argument(flag, nargs="?", const=True, metavar="PATH", **common)
        elif f.name == "data_dir":
            parser.add_argument(flag, "--data", type=str, metavar="DIR", **common)
        elif f.name == "amp":
            parser.add_argument(flag, choices=AMP_MODES, **common)
        elif f.name == "recipe":
            parser.add_argument(flag, choices=list(RECIPES), **common)
        elif f.name == "bad_images":
            parser.add_argument(flag, choices=BAD_IMAGE_MODES, **common)
        elif f.name == "budget":
            parser.add_argument(flag, choices=BUDGETS, **common)
        elif f.name == "token_target":
            parser.add_argument(flag, choices=TOKEN_TARGETS, **common)
        elif f.name == "timm_kwargs":  # one spelling for every command: --model-kwargs (--timm-kwargs still works)
            parser.add_argument("--model-kwargs", flag, type=model_kwargs, metavar="KWARGS", **common)
        elif kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif "list[int]" in kind:
            parser.add_argument(flag, type=int_list, metavar="I,J,K", **common)
        elif "dict" in kind:
            parser.add_argument(flag, type=model_kwargs, metavar="JSON", **common)
        elif "int" in kind:
            parser.add_argument(flag, type=int, **common)
        elif "float" in kind:
            parser.add_argument(flag, type=float, **common)
        else:
            parser.add_argument(flag, type=str, **common)


def config_from_args(args: argparse.Namespace):
    """Defaults, then the --config file, then the flags given on the command line."""
    from ..training.config import TrainConfig, read_config_file

    values = read_config_file(args.config) if args.config else {}
    flags = {k: v for k, v in vars(args).items() if k != "config"}
    return TrainConfig.from_dict({**values, **flags})


def run(args: argparse.Namespace) -> int:
    from ..training.loop import train

    cfg = config_from_args(args)
    if cfg.model is None and not (cfg.teacher or cfg.init_checkpoint):
        raise ConfigError("no model given: pass --model NAME (a timm ViT, e.g. deit_small_patch16_224)")
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print_history(result.history)
    print(f"model:      {result.checkpoint}")
    if result.ema_checkpoint:
        print(f"ema model:  {result.ema_checkpoint}")
    print(f"checkpoint: {result.last}  (resume with --resume)")
    return 0


def print_history(history: list[dict]) -> None:
    if not history:
        print("nothing to train: the run had already finished (see --epochs)")
        return
    keep_cols = sorted(k for k in history[-1] if k.startswith("keep_ratio_stage"))
    header = f"{'epoch':>5} {'train loss':>10} {'val top1':>8} {'val top5':>8}"
    header += "".join(f" {'keep' + k[len('keep_ratio_stage'):]:>6}" for k in keep_cols)
    print(header)
    for row in history:
        line = f"{row['epoch']:>5} {row['train_loss']:>10.4f} {_pct(row.get('val_top1'))} {_pct(row.get('val_top5'))}"
        line += "".join(f" {row[k]:>6.3f}" for k in keep_cols)
        print(line)


def _pct(value) -> str:
    return f"{value:>8.2f}" if value is not None else f"{'-':>8}"
