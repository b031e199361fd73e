"""The Fashion-MNIST demo: a dense ViT teacher against the DynamicViT fine-tuned from it.

`run_demo` does the whole job on a CPU in minutes:

1. reads the Fashion-MNIST test set (10,000 images) and evaluates the dense teacher (a small ViT
   shipped in `dynamicvit/assets`, made by `scripts/train_teacher.sh` with `dynamicvit train --dense`);
2. fine-tunes a DynamicViT from it with `dynamicvit.training.loop.train` (three pruning stages, the full
   objective: CE + keep-ratio + KL + token distillation) at keep ratio 0.7, the paper's recipe, or
   elastic (`--keep-ratios 0.4:1.0`: a keep ratio drawn per step, so one model serves every budget);
3. measures both: top-1 on the test set, MACs per image (`flops.count_macs`) and images/s
   (`bench.compare_throughput`, interleaved timing);
4. evaluates the fine-tuned model at several keep ratios (changed at inference, no retraining), next
   to the single-ratio model's curve (`SINGLE_RATIO_SWEEP`, measured on the shipped teacher, or
   fine-tuned and measured in this run with `compare_single_ratio`);
5. writes `report.json`, a contact sheet of the tokens kept on test images and a keep-ratio plot.

The demo writes only its own files into the output folder (see `DEMO_FILES`) and refuses to replace
files of those names that it did not write.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import platform
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from .core.base import SparseModel
from .core.hosts import host_for
from .core.losses import TOKEN_TARGETS
from .core.settings import KeepRatioSampler, check_predictor_width
from .data import build_dataset, resolve_dataset
from .errors import CheckpointError, ConfigError
from .extras import require
from .evaluate import evaluate
from .files import atomic_write
from .runtime.bench import compare_throughput
from .runtime.device import resolve_device
from .runtime.flops import count_macs
from .training.config import TrainConfig
from .training.loop import TrainResult, train
from .version import __version__
from .visualize import save_contact_sheet
from .weights.build import load_model

_logger = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets"
TEACHER_ASSET = ASSETS / "fmnist_vit_teacher.safetensors"
# The single-ratio model's keep-ratio sweep on the shipped teacher, measured on the full test set
# (what the plot compares the elastic model with unless `compare_single_ratio` fine-tunes one).
SINGLE_RATIO_SWEEP = ASSETS / "fmnist_single_ratio_sweep.json"
DATASET = "fashion-mnist"

# What the demo writes into its output folder; nothing else there is touched.
REPORT, SHEET, SWEEP_PLOT, FINETUNE_DIR = "report.json", "kept_tokens.png", "keep_ratio_sweep.png", "finetune"
SINGLE_DIR = "finetune-single-ratio"
DEMO_FILES = (REPORT, SHEET, SWEEP_PLOT, FINETUNE_DIR, SINGLE_DIR)
MARKER = ".dynamicvit-demo"

# Where the shipped 6-block teacher is pruned: the evenly spaced default (1, 3, 4) prunes after a
# single block; letting two blocks mix the tokens first loses less top-1 for a somewhat smaller MAC
# saving (docs/experiments/2026-11-26-demo-recipe.md).
SHIPPED_PRUNE_LOCS = (2, 3, 4)

# The demo's claim: DynamicViT at keep ratio 0.7 within this many points of the teacher's top-1,
# with at least this fraction fewer MACs.
TARGET_MAX_TOP1_DROP = 0.5
TARGET_MIN_MACS_REDUCTION = 0.30

# The default recipe trains one model for every keep ratio in this range (small ratios drawn more often).
ELASTIC_RANGE = "low:0.4:1.0"


@dataclass
class DemoConfig:
    """Settings of `run_demo`; the defaults are the full demo (the elastic recipe: 14.0 minutes on 2 idle
    CPU cores; `single_ratio()`: about 9).

    The fine-tuning recipe is the reference one scaled to a short CPU run: the student starts from
    the teacher, predictors learn at `lr`, the backbone at `lr * backbone_lr_scale` from the first
    step (no frozen epochs), no mixup (a few epochs are too short for it to pay off), and a stronger
    keep-ratio loss. The default trains one model for every keep ratio (elastic, `ELASTIC_RANGE`), with
    each stage's dropped tokens fused into one and the gradient norm clipped to 1.0. The trials that
    chose these values, with their figures and commands, are in
    docs/experiments/2026-11-26-demo-recipe.md.
    """

    output: str = "demo-output"  # folder for report.json, pictures and the fine-tuned model
    data_dir: Optional[str] = None  # folder with the Fashion-MNIST IDX files (default: the Debian package's)
    download: bool = False  # download Fashion-MNIST when missing
    teacher: Optional[str] = None  # dense teacher checkpoint (default: the one shipped with dynamicvit)
    keep_ratio: float = 0.7  # rho: stage s keeps int(49 * rho^s) of the 49 patch tokens
    keep_ratios: Optional[str] = ELASTIC_RANGE  # elastic training: a keep ratio drawn per step from this
    # range (small ratios more often, see config.KeepRatioSampler); None: the paper's recipe, trained at
    # keep_ratio alone (`--single-ratio`)
    fuse_dropped: Optional[bool] = None  # fold the dropped tokens into one extra token (`--fuse-dropped`);
    # None: the recipe's choice (elastic: yes, single ratio: no; never with merge_dropped)
    merge_dropped: bool = False  # add each dropped token into its most similar kept token (`--merge-dropped`)
    predictor_width: Optional[int] = None  # hidden width of the prediction modules; None: the model's width
    # (64 for the shipped teacher)
    detach_predictor_input: bool = False  # no gradient from the prediction modules into the backbone
    compare_single_ratio: bool = False  # also fine-tune the single-ratio model and sweep it (twice the
    # fine-tuning time); otherwise the plot shows its sweep measured on the shipped teacher
    prune_locs: Optional[tuple[int, ...]] = None  # blocks before which to prune; None: SHIPPED_PRUNE_LOCS
    # for the shipped teacher, three evenly spaced stages for another one
    epochs: Optional[int] = None  # fine-tuning epochs over `train_images` (about 2 minutes each on 2 cores);
    # None: the recipe's (elastic: 6, single ratio: 4)
    train_images: Optional[int] = None  # fine-tune on a fixed random subset of this many images (None: all 60,000)
    batch_size: int = 128
    lr: float = 3e-3  # predictor learning rate (a short run needs a larger one than the reference's)
    backbone_lr_scale: float = 1 / 3  # backbone lr = lr * this = 1e-3 (half the teacher's peak lr)
    warmup_epochs: float = 0.2
    clip_grad: Optional[float] = None  # gradient norm clipping; None: the recipe's (elastic: 1.0, without which
    # its loss jumps and the predictors can collapse; single ratio: none), 0: no clipping
    ratio_weight: float = 10.0  # keep-ratio loss weight (reference 2.0): with only 49 tokens each one
    # matters more to the CE, and at 2.0 the kept fraction drifts far above rho^s during training
    token_weight: float = 0.5  # token distillation weight (the reference's); a merged token holds several
    # patches, so the teacher's token at its place is not its target (benchmarks/frontier.py tries 0)
    token_target: str = "position"  # or "held": a merged token's target is the teacher's tokens averaged over
    # the patches it holds
    device: str = "auto"  # training, evaluation and timing device
    threads: Optional[int] = None  # CPU threads (None: torch's default)
    num_workers: int = 1  # data loader processes
    sweep: tuple[float, ...] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)  # keep ratios for the plot
    bench_batch_size: int = 256
    bench_repeats: int = 10
    sheet_images: int = 10  # test images in the contact sheet (one per class first)
    test_images: Optional[int] = None  # evaluate on a subset (None: the full 10,000; the report says which)
    max_steps_per_epoch: Optional[int] = None  # cut fine-tuning epochs short (smoke runs)
    seed: int = 0
    progress: bool = True  # progress bars
    quick: bool = False  # set by `quick_mode()`; recorded in the report

    @classmethod
    def quick_mode(cls, **overrides) -> "DemoConfig":
        """A smoke run in seconds: a few steps on a small subset, a subset of the test set."""
        values = dict(
            epochs=1, train_images=256, batch_size=32, max_steps_per_epoch=4, test_images=500,
            sweep=(1.0, 0.7, 0.5), bench_batch_size=32, bench_repeats=2, sheet_images=4, num_workers=0,
            warmup_epochs=0.0, quick=True,
        )
        values.update(overrides)
        return cls(**values)

    def __post_init__(self):
        # The two recipes: the settings left at None take the chosen recipe's values.
        elastic = self.keep_ratios is not None
        if self.fuse_dropped is None:
            self.fuse_dropped = elastic and not self.merge_dropped  # merged tokens leave nothing to fuse
        if self.epochs is None:
            self.epochs = 6 if elastic else 4
        if self.clip_grad is None:
            self.clip_grad = 1.0 if elastic else 0.0

    @classmethod
    def single_ratio(cls, **overrides) -> "DemoConfig":
        """The paper's recipe: fine-tuned at `keep_ratio` alone, dropped tokens discarded, 4 epochs."""
        return cls(**{"keep_ratios": None, **overrides})

    def validate(self) -> None:
        if not 0 < self.keep_ratio <= 1:
            raise ConfigError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.token_weight < 0:
            raise ConfigError(f"token_weight must be >= 0 (0: no token distillation), got {self.token_weight}")
        if self.token_target not in TOKEN_TARGETS:
            raise ConfigError(f"token_target must be one of {', '.join(TOKEN_TARGETS)}, got {self.token_target!r}")
        if self.token_target == "held" and not self.merge_dropped:
            raise ConfigError("token_target 'held' is the target of merged tokens: add --merge-dropped, or drop it")
        if self.clip_grad < 0:
            raise ConfigError(f"clip_grad must be >= 0 (0: no clipping), got {self.clip_grad}")
        if self.keep_ratios is not None:
            KeepRatioSampler.parse(self.keep_ratios)
        if self.fuse_dropped and self.merge_dropped:
            raise ConfigError("--fuse-dropped and --merge-dropped are two homes for the dropped tokens; choose one")
        check_predictor_width(self.predictor_width)
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        for name in ("train_images", "test_images"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be a positive number of images, got {value}")


# -- output folder --------------------------------------------------------------------------------


def prepare_output(output: Path) -> None:
    """Create the output folder; refuse to replace files of the demo's names that it did not write."""
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {output} is a file; pass a folder for the demo's report and pictures")
    if output.exists() and not (output / MARKER).exists():
        clashes = [name for name in DEMO_FILES if (output / name).exists()]
        if clashes:
            raise ConfigError(
                f"{output} already holds {', '.join(clashes)}, which the demo did not write; the demo never "
                "overwrites other files: pass --output NEW_FOLDER (or move those files away)"
            )
    output.mkdir(parents=True, exist_ok=True)
    (output / MARKER).write_text(
        "This folder was written by `dynamicvit demo`; a new run replaces " + ", ".join(DEMO_FILES) + ".\n"
    )
    # The previous run's fine-tuning folder is the demo's own: start it afresh (metrics are appended otherwise).
    if (output / FINETUNE_DIR).is_dir():
        shutil.rmtree(output / FINETUNE_DIR)


# -- the demo -------------------------------------------------------------------------------------


def teacher_path(path: Optional[str]) -> Path:
    """The teacher checkpoint to use: `path`, or the one shipped with dynamicvit."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise CheckpointError(f"--teacher {p}: no such file; pass a dense checkpoint (e.g. the model.safetensors of `dynamicvit train --dense`)")
        return p
    if not TEACHER_ASSET.is_file():
        raise CheckpointError(
            f"the demo's teacher {TEACHER_ASSET} is missing from this installation; reinstall dynamicvit, "
            "recreate it with `bash scripts/train_teacher.sh`, or pass --teacher PATH"
        )
    return TEACHER_ASSET


def load_teacher(path: Path, info) -> nn.Module:
    """The dense teacher, checked against the dataset."""
    model = load_model(path)
    if isinstance(model, SparseModel):
        raise ConfigError(f"--teacher {path} is a DynamicViT; the demo needs a dense model to start from")
    host = host_for(model)
    in_chans, size = host.in_chans, tuple(host.img_size)
    if (in_chans, model.num_classes) != (info.in_chans, info.num_classes):
        raise ConfigError(
            f"--teacher {path} takes {in_chans}-channel images and predicts {model.num_classes} classes; "
            f"Fashion-MNIST needs {info.in_chans} channel and {info.num_classes} classes"
        )
    if size[0] != size[1]:
        raise ConfigError(f"--teacher {path} expects non-square {size} images; the demo needs a square input")
    return model.eval()


@dataclass
class DemoRun:
    """What the demo has built and measured so far; `run_demo` fills it in step by step."""

    cfg: DemoConfig
    out: Path
    device: torch.device
    threads: int  # CPU threads for training, evaluation and timing
    start: float = field(default_factory=time.perf_counter)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per part, for the report
    # 1. The test set and the dense teacher.
    info: Any = None  # the dataset's description (`data.resolve_dataset`)
    test_set: Any = None
    loader: Optional[DataLoader] = None
    teacher_path: Optional[Path] = None
    teacher: Optional[nn.Module] = None
    img_size: int = 0
    # 2. Fine-tuning.
    train_cfg: Optional[TrainConfig] = None
    result: Optional[TrainResult] = None  # result.model is the fine-tuned DynamicViT
    single: Optional[nn.Module] = None  # the single-ratio model, with `compare_single_ratio`
    # 3-5. Measurements, keyed "dense" / "dynamic".
    evals: dict = field(default_factory=dict)
    macs: dict = field(default_factory=dict)
    bench: dict = field(default_factory=dict)
    sweep: list[dict] = field(default_factory=list)
    single_sweep: Optional[dict] = None

    @property
    def student(self) -> nn.Module:
        return self.result.model

    def step(self, i: int, text: str, steps: int = 6) -> None:
        _logger.info("[%d/%d %5.0fs] %s", i, steps, time.perf_counter() - self.start, text)

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.timings[name] = time.perf_counter() - t0


def run_demo(cfg: DemoConfig) -> dict:
    """Run the demo and return the report (also written to `<output>/report.json`).

    Raises:
        DataError: Fashion-MNIST is missing (the message says what to install).
        CheckpointError / ConfigError: a bad teacher or setting.
    """
    cfg.validate()
    start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = DemoRun(cfg, Path(cfg.output).expanduser(), resolve_device(cfg.device), torch.get_num_threads(), start)

    run.step(1, "Fashion-MNIST test set and dense teacher")
    load_test_set_and_teacher(run)  # a missing dataset or checkpoint fails before any work
    prepare_output(run.out)
    with run.timed("evaluate_teacher"):
        run.evals["dense"] = evaluate(run.teacher, run.loader, run.device, progress=cfg.progress)
    _logger.info("dense teacher: top-1 %.2f%% on %d test images", run.evals["dense"]["top1"], run.evals["dense"]["images"])

    how = f"over keep ratios {cfg.keep_ratios}" if cfg.keep_ratios else f"at keep ratio {cfg.keep_ratio}"
    home = " with fused tokens" if cfg.fuse_dropped else " with merged tokens" if cfg.merge_dropped else ""
    run.step(2, f"fine-tuning DynamicViT {how}{home} ({cfg.epochs} epoch(s))")
    fine_tune(run)

    run.step(3, f"evaluating DynamicViT on {run.evals['dense']['images']} test images")
    with run.timed("evaluate_student"):
        run.evals["dynamic"] = evaluate(run.student, run.loader, run.device, progress=cfg.progress)

    run.step(4, f"counting MACs and timing both models (batch {cfg.bench_batch_size}, {run.threads} thread(s))")
    run.macs = {"dense": count_macs(run.teacher), "dynamic": count_macs(run.student)}
    with run.timed("benchmark"):
        run.bench = compare_throughput(
            {"dense": run.teacher, "dynamic": run.student}, (run.info.in_chans, run.img_size, run.img_size),
            cfg.bench_batch_size, device=run.device, repeats=cfg.bench_repeats, warmup=2, threads=cfg.threads,
            measure_memory=False, progress=cfg.progress,
        )

    run.step(5, f"keep-ratio sweep {', '.join(str(r) for r in cfg.sweep)}")
    with run.timed("sweep"):
        sweep_keep_ratios(run)

    run.step(6, f"pictures and report in {run.out}")
    report = build_report(run)
    atomic_write(run.out / REPORT, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2) + "\n"))
    _logger.info("done in %.0f s", report["elapsed_s"])
    return report


def load_test_set_and_teacher(run: DemoRun) -> None:
    """The Fashion-MNIST test set (at the teacher's input size) and its loader; the dense teacher."""
    cfg = run.cfg
    run.info = resolve_dataset(DATASET)
    run.test_set = build_dataset(DATASET, "val", data_dir=cfg.data_dir, download=cfg.download, subset=cfg.test_images,
                                 seed=cfg.seed)
    run.teacher_path = teacher_path(cfg.teacher)
    run.teacher = load_teacher(run.teacher_path, run.info).to(run.device)
    run.img_size = int(host_for(run.teacher).img_size[0])
    if run.img_size != run.info.img_size:
        run.test_set = build_dataset(DATASET, "val", img_size=run.img_size, data_dir=cfg.data_dir, subset=cfg.test_images,
                                     seed=cfg.seed)
    run.loader = DataLoader(run.test_set, batch_size=500, shuffle=False, num_workers=cfg.num_workers,
                            persistent_workers=cfg.num_workers > 0)


def fine_tune_config(cfg: DemoConfig, out: Path, teacher: Path, device: torch.device) -> TrainConfig:
    """The training settings of the demo's fine-tuning: the reference recipe scaled to a short CPU run
    (see `DemoConfig`), validation on at most 2,000 test images after the last epoch."""
    prune_locs = cfg.prune_locs or (SHIPPED_PRUNE_LOCS if cfg.teacher is None else None)
    return TrainConfig(
        dataset=DATASET,
        data_dir=cfg.data_dir,
        download=cfg.download,
        output=str(out / FINETUNE_DIR),
        teacher=str(teacher),
        keep_ratio=cfg.keep_ratio,
        keep_ratios=cfg.keep_ratios,
        fuse_dropped=cfg.fuse_dropped,
        merge_dropped=cfg.merge_dropped,
        predictor_width=cfg.predictor_width,
        detach_predictor_input=cfg.detach_predictor_input,
        prune_locs=list(prune_locs) if prune_locs else None,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        backbone_lr_scale=cfg.backbone_lr_scale,
        freeze_backbone_epochs=0,
        warmup_epochs=cfg.warmup_epochs,
        ratio_weight=cfg.ratio_weight,
        token_weight=cfg.token_weight,
        token_target=cfg.token_target,
        clip_grad=cfg.clip_grad or None,
        min_lr=1e-6,
        mixup=0.0,
        cutmix=0.0,
        subset=cfg.train_images,
        val_subset=min(2000, cfg.test_images or 2000),
        eval_every=cfg.epochs,
        max_steps_per_epoch=cfg.max_steps_per_epoch,
        device=str(device),
        num_workers=cfg.num_workers,
        seed=cfg.seed,
        progress=cfg.progress,
        tensorboard=False,
    )


def fine_tune(run: DemoRun) -> None:
    """Fine-tune DynamicViT from the teacher with the project's training loop; with
    `compare_single_ratio`, the single-ratio model (the paper's recipe) too."""
    cfg = run.cfg
    run.train_cfg = fine_tune_config(cfg, run.out, run.teacher_path, run.device)
    with run.timed("fine_tune"):
        run.result = train(run.train_cfg)
    run.student.eval()
    if cfg.compare_single_ratio and (cfg.keep_ratios or cfg.fuse_dropped or cfg.merge_dropped):
        _logger.info("fine-tuning the single-ratio model to compare (the paper's recipe at %s)", cfg.keep_ratio)
        paper = DemoConfig.single_ratio()
        single_cfg = dataclasses.replace(run.train_cfg, keep_ratios=None, fuse_dropped=paper.fuse_dropped,
                                         merge_dropped=paper.merge_dropped, epochs=paper.epochs,
                                         clip_grad=paper.clip_grad or None, eval_every=paper.epochs,
                                         output=str(run.out / SINGLE_DIR))
        with run.timed("fine_tune_single_ratio"):
            run.single = train(single_cfg).model.eval()


def sweep_keep_ratios(run: DemoRun) -> None:
    """The fine-tuned model at every keep ratio of `cfg.sweep` (same weights), next to the single-ratio
    model's sweep: fine-tuned in this run, or the shipped measurement."""
    cfg = run.cfg
    run.sweep = keep_ratio_sweep(run.student, run.loader, run.device, cfg.sweep, evaluate, count_macs, progress=cfg.progress)
    run.student.set_keep_ratio(cfg.keep_ratio)
    if run.single is not None:
        run.single_sweep = {"source": "fine-tuned in this run (--compare-single-ratio)",
                            "rows": keep_ratio_sweep(run.single, run.loader, run.device, cfg.sweep, evaluate, count_macs,
                                                     progress=cfg.progress)}
    else:
        run.single_sweep = shipped_single_ratio_sweep(cfg, run.teacher_path, run.sweep)


def comparison_rows(run: DemoRun) -> tuple[dict, dict]:
    """The report's rows of the dense teacher and of the DynamicViT: accuracy, MACs, speed."""
    cfg, student, bench = run.cfg, run.student, run.bench
    dense_eval, dyn_eval = run.evals["dense"], run.evals["dynamic"]
    dense_macs, dyn_macs = run.macs["dense"], run.macs["dynamic"]
    dense_row = {
        "top1": dense_eval["top1"], "top5": dense_eval["top5"], "loss": dense_eval["loss"],
        "gmacs": dense_macs.gmacs, "macs": dense_macs.total, "params": dense_macs.params,
        "images_per_s": bench["dense"].images_per_s, "latency_ms": bench["dense"].latency_ms,
    }
    dyn_row = {
        "keep_ratio": cfg.keep_ratio, "keep_ratios": cfg.keep_ratios, "fuse_dropped": cfg.fuse_dropped,
        "merge_dropped": cfg.merge_dropped, "prune_locs": list(student.prune_locs), "keep_counts": list(student.keep_counts()),
        "num_patches": student.num_patches,
        "top1": dyn_eval["top1"], "top5": dyn_eval["top5"], "loss": dyn_eval["loss"],
        "gmacs": dyn_macs.gmacs, "macs": dyn_macs.total, "predictor_macs": dyn_macs.predictor_macs,
        "params": dyn_macs.params,
        "images_per_s": bench["dynamic"].images_per_s, "latency_ms": bench["dynamic"].latency_ms,
        "checkpoint": str(run.result.checkpoint),
    }
    return dense_row, dyn_row


def build_report(run: DemoRun) -> dict:
    """The pictures (contact sheet, keep-ratio plot) and the report of the whole run."""
    cfg, out, info = run.cfg, run.out, run.info
    sheet = draw_kept_tokens(run.student, run.test_set, out / SHEET, info, cfg.sheet_images, run.device)
    dense_row, dyn_row = comparison_rows(run)
    top1_drop = dense_row["top1"] - dyn_row["top1"]
    macs_reduction = 1.0 - dyn_row["gmacs"] / dense_row["gmacs"]
    label = f"elastic {cfg.keep_ratios}" if cfg.keep_ratios else f"single ratio {cfg.keep_ratio:g}"
    label += ", fused" if cfg.fuse_dropped else ", merged" if cfg.merge_dropped else ""
    plot = save_sweep_plot(run.sweep, dense_row, cfg.keep_ratio, out / SWEEP_PLOT, label=label, single_ratio=run.single_sweep)
    return {
        "demo": "dynamicvit demo: dense ViT teacher vs DynamicViT on Fashion-MNIST",
        "quick": cfg.quick,
        "dataset": {
            "name": DATASET, "test_images": run.evals["dense"]["images"], "full_test_set": cfg.test_images is None,
            "train_images_per_epoch": _train_len(run.train_cfg),
            "img_size": run.img_size, "in_chans": info.in_chans, "num_classes": info.num_classes,
        },
        "teacher": {"path": str(run.teacher_path), "model_name": getattr(run.teacher, "pretrained_cfg", {}).get("architecture"),
                    "timm_kwargs": getattr(run.teacher, "dynamicvit_timm_kwargs", {})},
        "dense": dense_row,
        "dynamic": dyn_row,
        "comparison": {
            "top1_drop": top1_drop,
            "macs_reduction": macs_reduction,
            "speedup": dyn_row["images_per_s"] / dense_row["images_per_s"],
            "target": {
                "max_top1_drop": TARGET_MAX_TOP1_DROP,
                "min_macs_reduction": TARGET_MIN_MACS_REDUCTION,
                "met": bool(top1_drop <= TARGET_MAX_TOP1_DROP and macs_reduction >= TARGET_MIN_MACS_REDUCTION),
            },
        },
        "sweep": run.sweep,
        "sweep_single_ratio": run.single_sweep,
        "training": {"config": run.train_cfg.to_dict(), "history": run.result.history, "seconds": run.timings["fine_tune"]},
        "benchmark": {"device": str(run.device), "threads": run.threads, "batch_size": cfg.bench_batch_size,
                      "repeats": cfg.bench_repeats, "timing": "median of interleaved repetitions"},
        "pictures": {"kept_tokens": str(sheet), "keep_ratio_sweep": str(plot)},
        "settings": _jsonable(asdict(cfg)),
        "versions": {"dynamicvit": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "timings_s": run.timings,
        "elapsed_s": time.perf_counter() - run.start,
    }


def _train_len(train_cfg) -> int:
    """Images per fine-tuning epoch (the subset, or the whole training set)."""
    full = 60_000
    n = min(train_cfg.subset or full, full)
    if train_cfg.max_steps_per_epoch:
        n = min(n, train_cfg.max_steps_per_epoch * train_cfg.batch_size)
    return n


def _jsonable(values: dict) -> dict:
    return json.loads(json.dumps(values, default=str))


def shipped_single_ratio_sweep(cfg: DemoConfig, teacher: Path, sweep: list[dict]) -> Optional[dict]:
    """The shipped single-ratio sweep, when it was measured on this teacher and data (else None).

    Rows at the ratios of `sweep`; the report says where they come from.
    """
    if cfg.teacher is not None or cfg.test_images is not None or not SINGLE_RATIO_SWEEP.is_file():
        return None
    meta = json.loads(SINGLE_RATIO_SWEEP.read_text())
    if not (cfg.keep_ratios or cfg.fuse_dropped or cfg.merge_dropped):
        return None  # this run trains the single-ratio model itself
    ratios = {r["keep_ratio"] for r in sweep}
    rows = [r for r in meta["sweep"] if r["keep_ratio"] in ratios]
    return {"source": f"shipped measurement ({SINGLE_RATIO_SWEEP.name}): {meta['description']}", "rows": rows} if rows else None


def keep_ratio_sweep(model, loader, device, ratios: Sequence[float], evaluate, count_macs, progress: bool = False) -> list[dict]:
    """Top-1 and MACs of a DynamicViT at each keep ratio (its weights unchanged)."""
    rows = []
    for r in ratios:
        try:
            model.set_keep_ratio(r)
        except ConfigError as e:
            _logger.warning("skipping keep ratio %s: %s", r, e)
            continue
        ev = evaluate(model, loader, device, progress=progress)
        macs = count_macs(model)
        rows.append({"keep_ratio": r, "keep_counts": list(model.keep_counts()), "top1": ev["top1"], "top5": ev["top5"],
                     "gmacs": macs.gmacs, "macs": macs.total})
        _logger.info("  keep ratio %.2f: top-1 %.2f%%, %.2f MMACs", r, ev["top1"], macs.total / 1e6)
    return rows


def pick_images(dataset, count: int, num_classes: int) -> tuple[torch.Tensor, list[int]]:
    """`count` test images: the first of each class, then the next ones in order."""
    chosen, labels, seen = [], [], set()
    rest = []
    for i in range(len(dataset)):
        if len(chosen) >= count or len(seen) == num_classes:
            break
        x, y = dataset[i]
        if y not in seen:
            seen.add(y)
            chosen.append(x)
            labels.append(int(y))
        elif len(rest) < count:
            rest.append((x, int(y)))
    for x, y in rest:
        if len(chosen) >= count:
            break
        chosen.append(x)
        labels.append(y)
    return torch.stack(chosen[:count]), labels[:count]


def draw_kept_tokens(model, dataset, path: Path, info, count: int, device) -> Path:
    """A contact sheet of the tokens the model keeps on `count` test images, titled label / prediction."""
    images, labels = pick_images(dataset, count, info.num_classes)
    with torch.no_grad():
        preds = model.eval()(images.to(device)).argmax(-1).tolist()
    names = info.classes or tuple(str(i) for i in range(info.num_classes))
    titles = [f"{names[y]} -> {names[p]}" + ("" if y == p else " (wrong)") for y, p in zip(labels, preds)]
    return Path(save_contact_sheet(model, images.to(device), path, mean=info.mean, std=info.std, titles=titles))


def save_sweep_plot(
    sweep: list[dict], dense: dict, keep_ratio: float, path: Path, label: str = "DynamicViT",
    single_ratio: Optional[dict] = None,
) -> Path:
    """Top-1 vs keep ratio and vs MACs, with the dense teacher and the 0.5-point band.

    Args:
        label: what the trained model is (e.g. "elastic 0.4:1.0").
        single_ratio: {"source", "rows"}: the single-ratio model's sweep, drawn next to it.
    """
    require("matplotlib", "the demo's keep-ratio plot").use("Agg")
    plt = require("matplotlib.pyplot", "the demo's keep-ratio plot")

    ratios = [r["keep_ratio"] for r in sweep]
    top1 = [r["top1"] for r in sweep]
    mmacs = [r["macs"] / 1e6 for r in sweep]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax in (a, b):
        ax.axhline(dense["top1"], color="0.3", ls="--", lw=1, label=f"dense teacher {dense['top1']:.2f}%")
        ax.axhspan(dense["top1"] - TARGET_MAX_TOP1_DROP, dense["top1"], color="tab:green", alpha=0.12,
                   label=f"within {TARGET_MAX_TOP1_DROP} pt")
        ax.set_ylabel("top-1 on the test set (%)")
        ax.grid(alpha=0.3)
    a.plot(ratios, top1, "o-", color="tab:blue", label=f"DynamicViT, {label} (one model)")
    if single_ratio:
        rows = single_ratio["rows"]
        shipped = " (shipped measurement)" if single_ratio["source"].startswith("shipped") else ""
        for ax, xs in ((a, [r["keep_ratio"] for r in rows]), (b, [r["macs"] / 1e6 for r in rows])):
            ax.plot(xs, [r["top1"] for r in rows], "s--", color="tab:gray", ms=4,
                    label=f"DynamicViT, single ratio {keep_ratio:g}{shipped}")
    chosen = [(r["keep_ratio"], r["macs"] / 1e6, r["top1"]) for r in sweep if r["keep_ratio"] == keep_ratio]
    for r, x, y in chosen:
        a.plot([r], [y], "o", ms=11, mfc="none", color="tab:orange", label=f"keep ratio {keep_ratio:g} (the table)")
        b.plot([x], [y], "o", ms=11, mfc="none", color="tab:orange")
    a.set_xlabel("keep ratio (changed at inference)")
    a.invert_xaxis()
    b.plot(mmacs, top1, "o-", color="tab:blue", label=f"DynamicViT, {label}")
    b.plot([dense["macs"] / 1e6], [dense["top1"]], "*", ms=14, color="tab:red", label="dense teacher")
    for r, x, y in zip(ratios, mmacs, top1):
        b.annotate(f"{r:g}", (x, y), textcoords="offset points", xytext=(4, -12), fontsize=8)
    b.set_xlabel("MMACs per image")
    for ax in (a, b):
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"Fashion-MNIST: DynamicViT ({label}) at every keep ratio, same weights")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- the table ------------------------------------------------------------------------------------


def format_table(report: dict) -> str:
    """The side-by-side comparison as aligned text."""
    d, s, c = report["dense"], report["dynamic"], report["comparison"]
    bench = report["benchmark"]
    n = report["dataset"]["test_images"]
    rows = [
        (f"top-1 on {n} test images (%)", f"{d['top1']:.2f}", f"{s['top1']:.2f}", f"{-c['top1_drop']:+.2f} pt"),
        ("MACs per image (M)", f"{d['macs'] / 1e6:.2f}", f"{s['macs'] / 1e6:.2f}", f"{-100 * c['macs_reduction']:+.1f} %"),
        ("GMACs per image", f"{d['gmacs']:.4f}", f"{s['gmacs']:.4f}", ""),
        (f"images/s (batch {bench['batch_size']}, {bench['threads']} thr)", f"{d['images_per_s']:.0f}",
         f"{s['images_per_s']:.0f}", f"x{c['speedup']:.2f}"),
        ("parameters (M)", f"{d['params'] / 1e6:.3f}", f"{s['params'] / 1e6:.3f}", ""),
    ]
    head = ("", "dense ViT", f"DynamicViT {s['keep_ratio']:g}", "change")
    w0 = max(len(r[0]) for r in rows)
    widths = [w0, 12, 16, 11]
    line = lambda r: f"{r[0]:<{widths[0]}}  " + "  ".join(f"{v:>{w}}" for v, w in zip(r[1:], widths[1:]))  # noqa: E731
    out = [line(head), "-" * (sum(widths) + 6)] + [line(r) for r in rows]
    t = c["target"]
    verdict = "MET" if t["met"] else "NOT MET"
    out.append(
        f"target (top-1 within {t['max_top1_drop']} pt, >= {100 * t['min_macs_reduction']:.0f}% fewer MACs): {verdict} "
        f"(top-1 {-c['top1_drop']:+.2f} pt, MACs {-100 * c['macs_reduction']:+.1f} %)"
    )
    counts = "/".join(str(k) for k in s["keep_counts"])
    out.append(f"tokens kept after the stages before blocks {tuple(s['prune_locs'])}: {counts} of {s['num_patches']}")
    if report.get("sweep"):
        out.append("keep-ratio sweep (same weights): " + ", ".join(
            f"{r['keep_ratio']:g}: {r['top1']:.2f}% @ {r['macs'] / 1e6:.2f}M" for r in report["sweep"]))
    if report.get("sweep_single_ratio"):
        out.append("single-ratio model, same ratios: " + ", ".join(
            f"{r['keep_ratio']:g}: {r['top1']:.2f}%" for r in report["sweep_single_ratio"]["rows"]))
    if report.get("quick"):
        out.append("QUICK MODE: a few training steps on a subset; the numbers are a smoke test, not results")
    return "\n".join(out)
