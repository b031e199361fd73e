"""Training and evaluation: fine-tune a DynamicViT from a dense teacher, or train a dense ViT.

`train(cfg)` runs the whole recipe; its loop is written out in one place (`_fit`) so it can be read
in one sitting: per-iteration warmup + cosine learning rate, autocast, gradient clipping, an optional
EMA, evaluation under no_grad and a resumable checkpoint every epoch.

The DynamicViT objective follows the paper (see `dynamicvit.core.losses`): CE (soft targets under
mixup/cutmix) + 2.0 * ratio + 0.5 * KL to the dense teacher + 0.5 * token distillation. The teacher
is the dense model the student starts from, frozen and in eval mode, fed the same (mixed) images.

Multi-GPU / multi-node: launch with torchrun; RANK, WORLD_SIZE and LOCAL_RANK select the process's
share of the data (DistributedSampler) and its GPU; the model is wrapped in DistributedDataParallel;
rank 0 alone logs, shows progress and writes files. `batch_size` is per process.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import Dataset, Subset

from ..core.base import SparseModel
from ..core.hosts import Host, host_for
from ..core.losses import DynamicSpatialLoss, DynamicViTLoss, classification_loss
from ..core.layouts import check_finite
from ..core.settings import KeepRatioSampler
from ..core.spatial import DynamicSpatial, dense_targets
from ..data import (UnreadableImages, bad_images_error, build_dataset, check_images, check_model_fits, drop_unreadable,
                    num_classes_of, resolve_dataset, square_img_size)
from ..errors import CheckpointError, ConfigError, DataError, DynamicViTError, TrainingStopped
from ..evaluate import evaluate
from ..extras import MissingExtraError, require
from ..files import RunLock, atomic_write, prepare_output_dir
from ..progress import progress_bar
from ..runtime.device import amp_dtype, autocast, resolve_device
from ..weights.build import create_backbone, load, sparsify
from ..weights.formats import load_weights, model_settings, read_checkpoint, save_model
from .config import REFERENCE_AUGMENT, REFERENCE_BATCH, REFERENCE_LR, TrainConfig
from .safety import (
    ResumableSampler,
    StopRequest,
    StopSafeLoader,
    check_resume_settings,
    check_room,
    claim_run_folder,
    clear_run,
    trim_metrics,
)

_logger = logging.getLogger(__name__)

# Learnable tokens the reference does not train when fine-tuning (and never decays).
FROZEN_TOKENS = ("cls_token", "pos_embed", "dist_token", "reg_token")


@dataclass
class TrainResult:
    """What `train` returns.

    Attributes:
        checkpoint: the final model (`dynamicvit.load_model` reads it), with the settings as `extra`.
        last: the resumable training checkpoint of the last epoch.
        history: one dict per epoch: train losses, lr, realized keep ratio per stage, val top1/top5.
        ema_checkpoint: the EMA weights as a model file, when `ema` was on.
        model: the trained model (unwrapped), in eval mode.
    """

    checkpoint: Path
    last: Path
    history: list[dict]
    ema_checkpoint: Optional[Path] = None
    model: Optional[nn.Module] = None


# -- distributed / device -----------------------------------------------------------------------


@dataclass
class DistEnv:
    """This process's place in a torchrun job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device_spec: str) -> tuple[DistEnv, torch.device]:
    """Join the process group described by RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun).

    The backend is NCCL on CUDA and gloo on the CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv(), resolve_device(device_spec)
    try:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError):
        raise ConfigError("WORLD_SIZE is set but RANK is missing; launch multi-process training with torchrun") from None
    device = resolve_device(device_spec, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    initialized_here = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
        initialized_here = True
    return DistEnv(rank, world, local_rank, initialized_here), device


# -- models ---------------------------------------------------------------------------------------


def load_dense(path: Union[str, os.PathLike], name: Optional[str], kwargs: dict, overrides: dict, role: str) -> nn.Module:
    """A dense timm ViT from a checkpoint: ours (`save_model`/training) or plain timm/DeiT weights.

    Args:
        name: the timm architecture (needed only for plain weights, which carry no settings).
        kwargs: timm arguments for plain weights (dataset defaults + user's).
        overrides: the user's timm arguments, applied over the settings stored in our checkpoints.
        role: "teacher" or "initial weights", for messages.
    """
    checkpoint = read_checkpoint(path)
    settings = checkpoint[1]
    if settings is not None:
        if settings.get("kind") != "dense":
            raise ConfigError(
                f"the {role} {path} is a DynamicViT; the {role} must be a dense model "
                "(e.g. the model.safetensors of `dynamicvit train --dense`)"
            )
        if name is not None and settings.get("model_name") != name:
            raise ConfigError(
                f"the {role} {path} is a {settings.get('model_name')}, not a {name}; "
                "drop --model or pass the matching architecture"
            )
    model = load(path, name, overrides=overrides, plain_kwargs=kwargs, role=role, checkpoint=checkpoint)
    if isinstance(model, SparseModel):
        raise ConfigError(f"the {role} {path} holds prediction modules; the {role} must be a dense model")
    return model


def build_models(cfg: TrainConfig, kwargs: dict) -> tuple[nn.Module, Optional[nn.Module]]:
    """(model to train, frozen dense teacher or None).

    Dense: a timm ViT from `init_checkpoint`, timm's pretrained weights or scratch.
    DynamicViT: the teacher from `teacher` (or timm's pretrained model); the student is a copy of it
    with fresh prediction modules, or is loaded from `init_checkpoint`.
    """
    if cfg.dense:
        if cfg.init_checkpoint:
            return load_dense(cfg.init_checkpoint, cfg.model, kwargs, cfg.timm_kwargs, "initial weights"), None
        return create_backbone(_need_model(cfg), pretrained=cfg.pretrained, **kwargs), None

    if cfg.teacher:
        teacher = load_dense(cfg.teacher, cfg.model, kwargs, cfg.timm_kwargs, "teacher")
    elif cfg.pretrained:
        teacher = create_backbone(_need_model(cfg), pretrained=True, **kwargs)
        default_classes = teacher.pretrained_cfg.get("num_classes")
        if default_classes and default_classes != teacher.num_classes:
            _logger.warning(
                "the pretrained teacher's head was re-initialized for %d classes, so it teaches nothing: "
                "train a dense teacher first (dynamicvit train --dense --pretrained ...) and pass it with --teacher",
                teacher.num_classes,
            )
    else:
        raise ConfigError(
            "fine-tuning a DynamicViT needs a dense teacher: pass --teacher PATH (a dense checkpoint, e.g. the "
            "model.safetensors of `dynamicvit train --dense`) or --pretrained (timm's weights), or use --dense"
        )
    teacher.eval().requires_grad_(False)
    student = sparsify(copy.deepcopy(teacher), cfg.keep_ratio, cfg.prune_locs, fuse_dropped=cfg.fuse_dropped)
    student.backbone.requires_grad_(True)
    if cfg.predictor_keep_prior is not None:
        for predictor in student.predictors:
            predictor.reset_parameters(cfg.predictor_keep_prior)
    if cfg.keep_ratios is not None:
        if isinstance(student, DynamicSpatial):
            raise ConfigError("--keep-ratios (elastic training) is for ViTs and LV-ViTs; ConvNeXt and Swin train at one --keep-ratio")
        student.set_keep_ratio_range(KeepRatioSampler.parse(cfg.keep_ratios).range)
        if not cfg.clip_grad:
            _logger.warning(
                "elastic training without gradient clipping: on the demo its loss jumped and, in one run, every "
                "prediction module collapsed to keeping ~3%% of the tokens; --clip-grad 1.0 kept it smooth"
            )
    if cfg.init_checkpoint:
        load_weights(student, cfg.init_checkpoint)
    return student, teacher


def _need_model(cfg: TrainConfig) -> str:
    if not cfg.model:
        raise ConfigError("no model given: pass --model NAME (a timm ViT, e.g. deit_small_patch16_224)")
    return cfg.model


def check_model_name(name: Optional[str]) -> None:
    """Fail fast on an unknown timm name (before any data is read)."""
    if name is None:
        return
    import timm

    bare = name[len("dynamicvit_"):] if name.startswith("dynamicvit_") else name
    if not timm.is_model(bare):
        create_backbone(bare)  # raises UnsupportedModelError with suggestions


def freeze_tokens(model: nn.Module) -> list[str]:
    """Stop training the class/distillation/register tokens and the position embedding.

    The reference recipe when fine-tuning a DynamicViT; a dense model (`--dense`, possibly trained from
    scratch) trains them.
    """
    frozen = []
    for name, p in model.named_parameters():
        if name.split(".")[-1] in FROZEN_TOKENS:
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def param_groups(model: nn.Module, weight_decay: float, backbone_lr_scale: float) -> list[dict]:
    """AdamW parameter groups: predictors at lr, backbone at lr * backbone_lr_scale.

    Biases, norm weights, tokens and position embeddings (1-D or listed in the model's
    `no_weight_decay`) get no weight decay. A dense model is all "backbone".
    """
    skip = set()
    inner = getattr(model, "backbone", model)
    if hasattr(inner, "no_weight_decay"):
        skip = {n.split(".")[-1] for n in inner.no_weight_decay()}
    groups: dict[tuple[str, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # New parameters (prediction modules; fast paths of ConvNeXt/Swin) train at the full lr from the start.
        part = "predictors" if name.startswith(getattr(model, "new_parameter_prefixes", "predictors.")) else "backbone"
        decay = p.ndim > 1 and name.split(".")[-1] not in skip
        group = groups.setdefault(
            (part, decay),
            {
                "params": [],
                "part": part,
                "lr_scale": 1.0 if part == "predictors" else backbone_lr_scale,
                "weight_decay": weight_decay if decay else 0.0,
            },
        )
        group["params"].append(p)
    return list(groups.values())


def cosine_lr(step: int, *, base_lr: float, min_lr: float, warmup_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup from warmup_lr to base_lr, then half a cosine down to min_lr (per iteration)."""
    if step < warmup_steps:
        return warmup_lr + (base_lr - warmup_lr) * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


# -- checkpoints and RNG ------------------------------------------------------------------------


def rng_state() -> dict:
    """Every random generator a step draws from (python, numpy for mixup, torch for Gumbel noise)."""
    py = random.getstate()
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save through a temporary file: a crash mid-write leaves the previous checkpoint intact."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path) -> dict:
    """A training checkpoint written by `save_checkpoint`."""
    if not Path(path).is_file():
        raise CheckpointError(f"no training checkpoint at {path}; check --resume (default: <output>/last.pth)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means an unreadable file
        raise CheckpointError(f"cannot read training checkpoint {path}: {type(e).__name__}; the file is corrupt or not ours") from None
    needed = {"model", "optimizer", "epoch", "config"}
    if not isinstance(ckpt, dict) or not needed <= set(ckpt):
        raise CheckpointError(
            f"{path} is not a resumable training checkpoint (needs {sorted(needed)}); to start from its weights "
            "pass it as --init-checkpoint instead of --resume"
        )
    return ckpt


# -- metrics --------------------------------------------------------------------------------------


class MetricsLog:
    """Metrics as JSON lines (<output>/metrics.jsonl) and TensorBoard scalars; a no-op off rank 0."""

    def __init__(self, output: Path, enabled: bool, tensorboard: bool, purge_step: Optional[int] = None):
        """`purge_step`: TensorBoard drops events from this step on (a resume trains them again)."""
        self.enabled = enabled
        self.file = None
        self.writer = None
        if not enabled:
            return
        output.mkdir(parents=True, exist_ok=True)
        self.file = open(output / "metrics.jsonl", "a")
        if tensorboard:
            try:
                writer = require("torch.utils.tensorboard", "TensorBoard logs").SummaryWriter
            except MissingExtraError as e:  # metrics.jsonl still has every value
                _logger.warning("%s; training goes on without them (--no-tensorboard silences this)", e)
            else:
                self.writer = writer(str(output / "tb"), purge_step=purge_step)

    def log(self, kind: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        self.file.flush()
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self.writer.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


# -- training -------------------------------------------------------------------------------------


def train(cfg: TrainConfig, *, train_set: Optional[Dataset] = None, val_set: Optional[Dataset] = None) -> TrainResult:
    """Train a DynamicViT from a dense teacher (or a dense ViT when `cfg.dense`).

    Args:
        cfg: the settings.
        train_set, val_set: datasets of (image tensor, label) to use instead of `cfg.dataset`; the
            model's timm arguments (num_classes, in_chans, img_size) then come from `cfg.timm_kwargs`.

    Returns:
        The final model file, the last resumable checkpoint and the per-epoch history.
    """
    cfg.validate()
    env, device = init_distributed(cfg.device)
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        # Rank 0 writes the files; the lock keeps a second run out of the folder while this one lives.
        with RunLock(prepare_output_dir(cfg.output)) if env.is_main else nullcontext():
            return _fit(cfg, env, device, train_set, val_set)
    finally:
        torch.use_deterministic_algorithms(previous_deterministic)
        if env.initialized_here:
            dist.destroy_process_group()


def _fit(cfg: TrainConfig, env: DistEnv, device: torch.device, train_set, val_set) -> TrainResult:
    log = _logger.info if env.is_main else (lambda *a, **k: None)
    out = Path(cfg.output)

    # 1. Fail fast on what the user can get wrong: names and files first, data next.
    check_model_name(cfg.model)
    for path in (cfg.teacher, cfg.init_checkpoint):
        if path:
            read_checkpoint(path)  # raises CheckpointError for missing or unreadable files
    resume_from = _resume_path(cfg, out)
    clear_earlier = False
    if env.is_main:  # an earlier run is continued or refused, never silently replaced
        clear_earlier = claim_run_folder(out, resume_from, cfg.overwrite, resume_asked=cfg.resume not in (False, None, ""))
    kwargs = dict(cfg.timm_kwargs)
    info = None
    if train_set is None:
        info = resolve_dataset(cfg.dataset, cfg.data_dir)
        kwargs = {"num_classes": info.num_classes, "in_chans": info.in_chans, "img_size": info.img_size, **kwargs}

    # 2. Models: the same initialization on every rank (DDP broadcasts rank 0's anyway).
    seed_everything(cfg.seed)
    model, teacher = build_models(cfg, kwargs)
    check_model_fits(model, info)
    frozen = [] if cfg.dense else freeze_tokens(model)
    model.to(device)
    if teacher is not None:
        teacher.to(device)
    img_size = square_img_size(model)

    # 3. Data: each process reads its own share (DistributedSampler; a fixed shuffle per epoch).
    if train_set is None:
        train_set, val_set = build_datasets(cfg, info, img_size, model.pretrained_cfg)
    if cfg.bad_images == "abort":
        _check_all_images(env, device, train=train_set, val=val_set)
    sampler, train_loader, val_loader = build_loaders(cfg, env, device, train_set, val_set)
    steps_per_epoch = min(len(train_loader), cfg.max_steps_per_epoch or len(train_loader))
    if steps_per_epoch == 0:
        raise DataError(
            f"the training set has {len(train_set)} images, fewer than one batch of {cfg.batch_size} per process "
            f"({env.world_size} process(es)); lower --batch-size or use more images"
        )

    # 4. Optimizer, schedule, precision, EMA.
    global_batch = cfg.batch_size * env.world_size
    base_lr = cfg.lr if cfg.lr is not None else REFERENCE_LR * global_batch / REFERENCE_BATCH
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    groups = param_groups(model, cfg.weight_decay, 1.0 if cfg.dense else cfg.backbone_lr_scale)
    optimizer = torch.optim.AdamW(groups, lr=base_lr, betas=(0.9, 0.999))
    dtype = amp_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16 and device.type == "cuda")
    criterion = None if cfg.dense else _criterion(model, cfg)
    mixup_fn = None
    if cfg.mixing:
        from timm.data import Mixup

        mixup_fn = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing, num_classes=num_classes_of(model))

    # 5. Resume (at an epoch's end, or inside an epoch after a SIGTERM / SIGINT stop).
    start_epoch, history = 0, []
    resumed, step_in_epoch, partial = None, 0, None
    if resume_from is not None:
        resumed = load_checkpoint(resume_from)
        _warn_config_changes(resumed["config"], cfg)
        check_finite(resumed["model"], f"training checkpoint {resume_from}")
        step_in_epoch, partial = int(resumed.get("step_in_epoch", 0)), resumed.get("partial")
        if step_in_epoch:
            check_resume_settings(resumed["config"], cfg.to_dict())
        try:
            model.load_state_dict(resumed["model"])
            optimizer.load_state_dict(resumed["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{resume_from} does not match this run's model: {str(e).splitlines()[0]}") from None
        if resumed.get("scaler"):
            scaler.load_state_dict(resumed["scaler"])
        start_epoch, history = int(resumed["epoch"]), list(resumed.get("history", []))
        log("resuming from %s after epoch %d%s", resume_from, start_epoch,
            f", step {step_in_epoch} of epoch {start_epoch + 1}" if step_in_epoch else "")

    ema = None
    if cfg.ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.ema_decay)
        if resumed is not None and resumed.get("ema") is not None:
            ema.module.load_state_dict(resumed["ema"])

    net = model
    if env.distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    # Per-rank random streams (Gumbel noise, mixup, augmentation); exact on resume for rank 0. Inside an
    # epoch the state is restored once the epoch's batches are set up (that set-up draws a loader seed).
    restore_rng = None
    if resumed is not None and env.is_main and "rng" in resumed:
        if step_in_epoch:
            restore_rng = resumed["rng"]
        else:
            set_rng_state(resumed["rng"])
    else:
        seed_everything(cfg.seed + env.rank + 1000 * start_epoch)

    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(
        "training %s %s: %d trainable parameters, %d steps/epoch x %d epochs, global batch %d, lr %.3g%s, "
        "device %s%s, amp %s",
        "dense" if cfg.dense else type(model).__name__, getattr(model, "model_name", None) or cfg.model, n_params,
        steps_per_epoch, cfg.epochs, global_batch, base_lr,
        "" if cfg.dense else f" (backbone x{cfg.backbone_lr_scale:.4g}, frozen {cfg.freeze_backbone_epochs} epochs)",
        device, f" x{env.world_size}" if env.distributed else "", str(dtype).replace("torch.", "") if dtype else "none",
    )
    if frozen:
        log("not trained (reference recipe): %s", ", ".join(frozen))
    if env.is_main and cfg.warmup_epochs >= cfg.epochs:
        _logger.warning("warmup_epochs %s >= epochs %d: the learning rate never reaches %.3g", cfg.warmup_epochs, cfg.epochs, base_lr)
    if env.is_main and not cfg.dense and cfg.freeze_backbone_epochs >= cfg.epochs:
        _logger.warning("freeze_backbone_epochs %d >= epochs %d: only the prediction modules will train",
                        cfg.freeze_backbone_epochs, cfg.epochs)
    resume_step = 0 if resumed is None else int(resumed.get("step", start_epoch * steps_per_epoch))
    if env.is_main:
        check_room(out, model, cfg.ema)
        if clear_earlier:
            clear_run(out)
        dropped = trim_metrics(out / "metrics.jsonl", resume_step)  # steps after the checkpoint are trained again
        if dropped:
            log("metrics.jsonl: dropped %d line(s) logged after the checkpoint (those steps run again)", dropped)
        atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(cfg.to_dict(), indent=2)))
    metrics = MetricsLog(out, env.is_main, cfg.tensorboard, purge_step=resume_step + 1)
    last = out / "last.pth"

    def checkpoint(epochs_done: int, **position) -> None:
        """Write last.pth (rank 0): weights, optimizer, EMA, RNG, history; `position` for a mid-epoch stop."""
        if not env.is_main:
            return
        save_checkpoint(last, {
            "model": model.state_dict(),
            "dynamicvit": model_settings(model),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "ema": ema.module.state_dict() if ema is not None else None,
            "epoch": epochs_done,
            "step": epochs_done * steps_per_epoch + position.get("step_in_epoch", 0),
            "config": cfg.to_dict(),
            "history": history,
            "rng": rng_state(),
            **position,
        })

    # 6. The loop. SIGINT / SIGTERM stop it at the next step with a checkpoint (`--resume` continues).
    stop = StopRequest()
    amp = cfg.amp if dtype else "none"
    if step_in_epoch:
        sampler.skip = step_in_epoch * cfg.batch_size  # the batches the checkpoint already trained
    try:
        with stop.installed():
            for epoch in range(start_epoch, cfg.epochs):
                sampler.set_epoch(epoch)
                net.train()
                freeze_backbone = not cfg.dense and epoch < cfg.freeze_backbone_epochs
                row, position = _train_epoch(
                    cfg, env, net, model, teacher, criterion, optimizer, scaler, ema, mixup_fn, train_loader,
                    device, dtype, epoch, steps_per_epoch, freeze_backbone, metrics,
                    schedule=dict(base_lr=base_lr, min_lr=cfg.min_lr, warmup_lr=cfg.warmup_lr, warmup_steps=warmup_steps, total_steps=total_steps),
                    start=step_in_epoch, partial=partial, restore_rng=restore_rng, stop=stop,
                )
                step_in_epoch, partial, restore_rng = 0, None, None
                if row is None:  # stopped inside the epoch
                    checkpoint(epoch, **position)
                    _stopped(stop, env, last, f"epoch {epoch + 1}, step {position['step_in_epoch']}")
                stopping = stop.requested(env.distributed, device)
                if val_loader is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
                    if stopping:
                        log("evaluation of epoch %d skipped: stopping", epoch + 1)
                    else:
                        try:
                            row.update(_validate(model, ema, val_loader, device, amp, env.distributed))
                        except Exception:
                            # The epoch's training is worth keeping whatever broke the evaluation.
                            history.append(row)
                            checkpoint(epoch + 1)
                            _logger.error("evaluation after epoch %d failed; the epoch's training is saved in %s "
                                          "(--resume continues after it)", epoch + 1, last)
                            raise
                history.append(row)
                metrics.log("epoch", (epoch + 1) * steps_per_epoch, row)
                log("epoch %d/%d: %s", epoch + 1, cfg.epochs, _fmt(row))
                checkpoint(epoch + 1)
                if env.distributed:
                    dist.barrier()
                if stopping and epoch + 1 < cfg.epochs:
                    _stopped(stop, env, last, f"the end of epoch {epoch + 1}")
    finally:
        metrics.close()
    if env.is_main and not cfg.dense and history:
        targets = getattr(model, "stage_ratios", None)  # ConvNeXt / Swin: r_s per predictor
        if cfg.keep_ratios is not None:  # elastic: the kept fractions average over the ratios drawn
            sampler = KeepRatioSampler.parse(cfg.keep_ratios)
            targets = [sampler.expected_fraction(s) for s in range(1, len(model.prune_locs) + 1)]
        for warning in keep_ratio_drift(history[-1], model.keep_ratio, targets=targets):
            _logger.warning(warning)

    # 7. The final model file(s), with the settings that made them.
    model.eval()
    final, ema_final = out / "model.safetensors", None
    extra = {"train_config": cfg.to_dict(), "epochs_done": len(history), "final": history[-1] if history else None}
    if env.is_main:
        save_model(model, final, overwrite=True, extra=extra)
        if ema is not None:
            ema_final = save_model(ema.module, out / "model_ema.safetensors", overwrite=True, extra=extra)
        log("saved %s%s", final, f" and {ema_final}" if ema_final else "")
    elif ema is not None:
        ema_final = out / "model_ema.safetensors"
    if env.distributed:
        dist.barrier()
    return TrainResult(checkpoint=final, last=last, history=history, ema_checkpoint=ema_final, model=model)


def build_datasets(cfg: TrainConfig, info, img_size: int, pretrained_cfg: Optional[dict] = None) -> tuple[Dataset, Dataset]:
    """Training and validation sets of `cfg.dataset` (through `dynamicvit.data`); validation images
    are resized as the model's `pretrained_cfg` says (see `data.eval_config`)."""
    augment = cfg.augment
    if augment is None and info.name != "fashion-mnist":
        augment = dict(REFERENCE_AUGMENT)
    common = dict(img_size=img_size, data_dir=cfg.data_dir, download=cfg.download, seed=cfg.seed)
    train_set = build_dataset(cfg.dataset, "train", augment=augment, subset=cfg.subset, **common)
    val_set = build_dataset(cfg.dataset, "val", subset=cfg.val_subset, pretrained_cfg=pretrained_cfg,
                            crop_pct=cfg.eval_crop_pct, **common)
    return train_set, val_set


def build_loaders(cfg: TrainConfig, env: DistEnv, device: torch.device, train_set: Dataset, val_set: Optional[Dataset]):
    """(train sampler, train loader, validation loader or None); validation is sharded over the ranks."""
    sampler = ResumableSampler(
        train_set, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=cfg.seed, drop_last=True
    )
    pin = device.type == "cuda"
    train_loader = StopSafeLoader(
        train_set, cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers, pin_memory=pin,
        drop_last=True, persistent_workers=cfg.num_workers > 0,
    )
    val_loader = None
    if val_set is not None:
        shard = Subset(val_set, range(env.rank, len(val_set), env.world_size)) if env.distributed else val_set
        val_loader = StopSafeLoader(shard, cfg.batch_size, shuffle=False, num_workers=cfg.num_workers, pin_memory=pin)
    return sampler, train_loader, val_loader


def _train_epoch(
    cfg, env, net, model, teacher, criterion, optimizer, scaler, ema, mixup_fn, loader, device, dtype,
    epoch, steps_per_epoch, freeze_backbone, metrics, schedule, *, start=0, partial=None, restore_rng=None,
    stop: Optional[StopRequest] = None,
) -> tuple[Optional[dict], Optional[dict]]:
    """One epoch of optimization.

    Args:
        start, partial: continue a stopped epoch from step `start` with its running sums `partial`.
        restore_rng: RNG state to restore once the batches are set up (a mid-epoch resume).
        stop: ends the epoch early when a signal asked for it.

    Returns:
        (the epoch's mean losses and realized keep ratios, None), or (None, the position to store in a
        checkpoint) when `stop` ended the epoch early.
    """
    keys = ["loss", "ce"] if cfg.dense else ["loss", "ce", "ratio", "kl", "token"]
    # Token hosts give the teacher's targets; hierarchical teachers use `spatial.dense_targets`.
    teacher_host = host_for(teacher) if teacher is not None and not isinstance(model, DynamicSpatial) else None
    sampler = None if cfg.dense or cfg.keep_ratios is None else KeepRatioSampler.parse(cfg.keep_ratios)
    stages = 0 if cfg.dense else len(model.prune_locs)
    sums = torch.zeros(len(keys) + stages, device=device)  # running sums since the epoch began
    window = torch.zeros_like(sums)  # since the last log line
    if partial:
        sums, window = (torch.tensor(partial[k], device=device, dtype=sums.dtype) for k in ("sums", "window"))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    unreadable = UnreadableImages(loader.dataset, "training")
    batches = iter(loader)
    if restore_rng is not None:
        set_rng_state(restore_rng)
    bar = progress_bar(total=steps_per_epoch, initial=start, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       enabled=env.is_main and cfg.progress)
    t0, lr = time.time(), 0.0
    for it, (x, y) in enumerate(batches, start=start):
        if it >= steps_per_epoch:
            break
        step = epoch * steps_per_epoch + it
        lr = cosine_lr(step, **schedule)
        for g in optimizer.param_groups:
            g["lr"] = 0.0 if freeze_backbone and g["part"] == "backbone" else lr * g["lr_scale"]

        x, y = _readable(x, y, unreadable, mixup_fn is not None)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if mixup_fn is not None:
            x, y = mixup_fn(x, y)  # y becomes soft targets (B, K) with label smoothing folded in
        with autocast(device, dtype):
            if teacher is None:
                loss = classification_loss(net(x), y, cfg.smoothing)
                terms = {"ce": loss.detach()}
                keep = []
            else:
                with torch.no_grad():
                    t_logits, t_tokens = teacher_targets(teacher, teacher_host, x)
                # Elastic training: this step's keep ratio (python's RNG: per rank, restored on resume).
                rho = sampler.sample(random) if sampler is not None else None
                if rho is None:
                    out = net(x)  # DynamicViTOutput: training path, tokens masked
                    loss, terms = criterion(out, y, t_logits, t_tokens)
                else:
                    out = net(x, keep_ratio=rho)
                    loss, terms = criterion(out, y, t_logits, t_tokens, keep_ratio=rho)
                keep = [d.detach().float().mean() for d in out.decisions]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.clip_grad:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(params, cfg.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        if ema is not None:
            ema.update(model, step=step)

        values = torch.stack([loss.detach().float()] + [terms[k].float() for k in keys[1:]] + keep)
        sums += values
        window += values
        bar.update(1)
        if (it + 1) % cfg.log_every == 0 or it + 1 == steps_per_epoch:
            n = (it % cfg.log_every) + 1
            mean = (window / n).tolist()
            window.zero_()
            if not math.isfinite(mean[0]):
                raise DynamicViTError(
                    f"the loss is {mean[0]} at epoch {epoch + 1}, step {it + 1}; lower --lr, set --clip-grad 1.0 "
                    "or use --amp bf16 / none"
                )
            row = dict(zip(keys, mean[: len(keys)]))
            row.update({f"keep{s + 1}": r for s, r in enumerate(mean[len(keys):])})
            row["lr"] = lr
            metrics.log("train", step + 1, row)
            postfix = {"loss": f"{row['loss']:.3f}", "lr": f"{lr:.2e}"}
            if stages:
                postfix["keep"] = "/".join(f"{r:.2f}" for r in mean[len(keys):])
            bar.set_postfix(postfix)
        # The last step of an epoch goes on to the end-of-epoch checkpoint instead.
        if stop is not None and it + 1 < steps_per_epoch and stop.requested(env.distributed, device):
            bar.close()
            return None, {"step_in_epoch": it + 1, "partial": {"sums": sums.tolist(), "window": window.tolist()}}
    bar.close()
    steps = min(steps_per_epoch, len(loader))
    if env.distributed:
        dist.all_reduce(sums)
        sums /= env.world_size
    mean = (sums / steps).tolist()
    row = {"epoch": epoch + 1, **{f"train_{k}": v for k, v in zip(keys, mean[: len(keys)])}}
    row.update({f"keep_ratio_stage{s + 1}": r for s, r in enumerate(mean[len(keys):])})
    row.update({"lr": lr, "epoch_time_s": time.time() - t0})
    if unreadable.count:
        row["unreadable_images"] = unreadable.count
    return row, None


def _readable(x: torch.Tensor, y: torch.Tensor, unreadable: UnreadableImages, even: bool):
    """The batch without its unreadable images (reported by path); mixup/cutmix pair images, so `even`."""
    x, y, bad = drop_unreadable(x, y)
    if not bad:
        return x, y
    unreadable.note(bad)
    if even and len(y) % 2:
        x, y = x[:-1], y[:-1]
    if not len(y):
        raise DataError(
            f"every image of a training batch was unreadable ({len(bad)} images); check the dataset, or pass "
            "--bad-images abort to list them all before training"
        )
    return x, y


def _validate(model, ema, loader, device, amp: str, distributed: bool) -> dict:
    """Validation metrics of the model (and its EMA) as `val_*` / `val_ema_*` entries of an epoch's row."""
    row = {}
    for prefix, net in (("val_", model), ("val_ema_", ema.module if ema is not None else None)):
        if net is not None:
            val = evaluate(net, loader, device, amp, distributed=distributed)
            # The counts of unreadable images and non-finite outputs only when there are some.
            row.update({f"{prefix}{k}": v for k, v in val.items() if v or k not in ("non_finite", "unreadable")})
    return row


def teacher_targets(teacher: nn.Module, host: Optional[Host], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen teacher's (logits, per-token targets) for the distillation terms.

    Token hosts (ViT, LV-ViT): the logits the student's trained logits are compared with
    (`Host.class_logits`, else `Host.logits`) and `Host.distill_targets` (final normed patch tokens for
    ViTs, aux-head logits for LV-ViT). Hierarchical teachers (`host` None): logits and the final
    normalized map, every position (`spatial.dense_targets`).
    """
    if host is None:
        return dense_targets(teacher, x)
    feats = host.model.forward_features(x)  # (B, P + N, C), normed
    logits = host.class_logits(feats)
    return (host.logits(feats) if logits is None else logits), host.distill_targets(feats)


def _stopped(stop: StopRequest, env: DistEnv, last: Path, where: str):
    """Raise `TrainingStopped` (after the checkpoint at `where`), on every rank together."""
    import signal

    if env.distributed:
        dist.barrier()
    signum = stop.signum or signal.SIGTERM
    raise TrainingStopped(
        f"stopped by {signal.Signals(signum).name} at {where}; checkpoint {last} (--resume continues from it)",
        signum=signum,
        checkpoint=last,
    )


def _check_all_images(env: DistEnv, device: torch.device, **datasets) -> None:
    """`--bad-images abort`: read every image before training; any unreadable one stops the run."""
    bad = []
    for what, dataset in datasets.items():
        if dataset is not None:
            bad += check_images(dataset, what, env.rank, env.world_size)
    total = len(bad)
    if env.distributed:  # each rank read its share
        count = torch.tensor([total], device=device)
        dist.all_reduce(count)
        total = int(count.item())
    if total:
        raise bad_images_error(bad, total)


# -- helpers --------------------------------------------------------------------------------------


def _criterion(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """The objective of the model's kind: DynamicViT's, or the hierarchical one (per-stage r_s, feature
    distillation over all positions) for ConvNeXt / Swin."""
    if isinstance(model, DynamicSpatial):
        if cfg.budget != "fixed":
            raise ConfigError("--budget per-image is for ViTs and LV-ViTs; ConvNeXt and Swin keep their maps at a fixed "
                              "budget: drop --budget")
        return DynamicSpatialLoss(model.stage_ratios, cfg.ratio_weight, cfg.distill_weight, cfg.token_weight, cfg.smoothing)
    return DynamicViTLoss(
        model.keep_ratio, cfg.ratio_weight, cfg.distill_weight, cfg.token_weight, cfg.smoothing,
        token_distill=model.host.token_distill, budget=cfg.budget,
    )


def keep_ratio_drift(
    row: dict, keep_ratio: float, tolerance: float = 0.05, targets: Optional[Sequence[float]] = None
) -> list[str]:
    """Warnings for stages whose kept fraction in an epoch of training missed its target by more than
    `tolerance`: rho^s, or `targets[s - 1]` (ConvNeXt / Swin: their own r_s; elastic training: the mean
    of rho^s over the ratios drawn).

    `targets` replaces rho^s per stage (elastic training: the mean of rho^s over the ratios drawn).

    Inference keeps exactly int(N * rho^s) tokens per stage, so a model that kept more (or fewer) while
    training meets token sets it was not trained on. The usual cause is a prediction module that
    saturated at "keep every token": the straight-through Gumbel gradient then vanishes and the ratio
    loss can no longer move it (the stage keeps as much as the one before it).
    """
    out = []
    stage = 1
    while f"keep_ratio_stage{stage}" in row:
        realized = row[f"keep_ratio_stage{stage}"]
        target = targets[stage - 1] if targets is not None else keep_ratio**stage
        of = f"keep ratio {keep_ratio}^{stage}" if targets is None else "the mean of rho^s over the ratios drawn"
        if abs(realized - target) > tolerance:
            previous = row.get(f"keep_ratio_stage{stage - 1}", 1.0)
            stuck = " and keeps every token the stage before kept" if stage > 1 and realized >= previous - 1e-3 else ""
            out.append(
                f"stage {stage} kept {realized:.3f} of the patch tokens in the last epoch, against {target:.3f} "
                f"({of}){stuck}; at inference it keeps int(N * {target:.3f}) tokens, token sets "
                "the model was not trained on. Train longer or raise --ratio-weight; if a stage keeps everything, "
                "its prediction module saturated: lower --lr"
            )
        stage += 1
    return out


def _resume_path(cfg: TrainConfig, out: Path) -> Optional[Path]:
    if cfg.resume is False or cfg.resume is None or cfg.resume == "":
        return None
    if cfg.resume is True or str(cfg.resume).lower() in ("true", "auto", "last"):
        path = out / "last.pth"
        if not path.exists():
            _logger.info("no checkpoint to resume in %s; starting from scratch", out)
            return None
        return path
    path = Path(cfg.resume)
    if not path.is_file():
        raise CheckpointError(f"--resume {path}: no such file; pass a last.pth written by `dynamicvit train`")
    return path


def _warn_config_changes(saved: dict, cfg: TrainConfig) -> None:
    ignore = {"resume", "overwrite", "progress", "tensorboard", "num_workers", "log_every", "device", "eval_every"}
    changed = {k: (saved.get(k), v) for k, v in cfg.to_dict().items() if k not in ignore and saved.get(k) != v}
    if changed:
        _logger.warning("resuming with changed settings: %s", ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()))


def _fmt(row: dict) -> str:
    parts = []
    for k, v in row.items():
        if k == "epoch":
            continue
        parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    return ", ".join(parts)
