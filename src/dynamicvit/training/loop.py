"""The training loop: fine-tune a sparse model (DynamicViT, DynamicSpatial) from a dense teacher, or
train a dense timm model.

`train(cfg)` is the table of contents; one `TrainState` carries the run from phase to phase:

    state = setup(cfg, env, device)   # names and files checked; models, data, optimizer, precision, EMA
    resume(state)                     # a checkpoint's weights, position and random state, or fresh seeds
    open_run(state)                   # the run folder: room, config.json, metrics.jsonl
    for epoch in ...:
        run_epoch(state, epoch)       # train_step per batch, evaluation, a log line, last.pth
    finish(state)                     # the final model file(s)

Per-step warmup + cosine learning rate, autocast, gradient clipping, an optional EMA, evaluation under
no_grad and a resumable checkpoint every epoch; SIGINT / SIGTERM stop at the next step with one.

The DynamicViT objective follows the paper (see `dynamicvit.core.losses`): CE (soft targets under
mixup/cutmix) + 2.0 * ratio + 0.5 * KL to the dense teacher + 0.5 * token distillation. The teacher
is the dense model the student starts from, frozen and in eval mode, fed the same (mixed) images.

Multi-GPU / multi-node: launch with torchrun; each process reads its share of the data
(DistributedSampler) on its GPU; the model is wrapped in DistributedDataParallel; rank 0 alone logs,
shows progress and writes files. `batch_size` is per process.
"""
from __future__ import annotations

import json
import logging
import math
import random
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from timm.data import Mixup
from timm.utils import ModelEmaV3
from torch.utils.data import Dataset

from ..core.base import SparseModel, logits_of
from ..core.hosts import host_for
from ..core.layouts import check_finite
from ..core.losses import classification_loss
from ..core.settings import KeepRatioSampler
from ..core.spatial import DynamicSpatial
from ..data import UnreadableImages, check_model_fits, num_classes_of, resolve_dataset, square_img_size
from ..errors import DynamicViTError, TrainingStopped
from ..evaluate import evaluate
from ..files import RunLock, atomic_write, prepare_output_dir
from ..progress import progress_bar
from ..runtime.device import amp_dtype, autocast
from ..weights.formats import read_checkpoint, save_model
from ..weights.hf import hf_folder, is_hf_spec
from .config import REFERENCE_BATCH, REFERENCE_LR, TrainConfig
from .distributed import DistEnv, init_distributed
from .loaders import build_datasets, build_loaders, check_all_images, readable, steps_per_epoch
from .metrics import MetricsLog, format_row, keep_ratio_drift
from .models import (build_criterion, build_models, check_model_name, freeze_tokens, given_models, param_groups,
                     teacher_targets)
from .safety import check_resume_settings, check_room, claim_run_folder, clear_run, trim_metrics
from .state import (TrainState, load_checkpoint, restore_checkpoint, resume_path, seed_everything, set_rng_state,
                    write_checkpoint)

_logger = logging.getLogger(__name__)


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


def train(cfg: TrainConfig, *, train_set: Optional[Dataset] = None, val_set: Optional[Dataset] = None,
          models: Optional[tuple[nn.Module, nn.Module]] = None) -> TrainResult:
    """Train a sparse model from a dense teacher (or a dense model when `cfg.dense`).

    Args:
        cfg: the settings.
        train_set, val_set: datasets of (image tensor, label) to use instead of `cfg.dataset`; the
            model's timm arguments (num_classes, in_chans, img_size) then come from `cfg.timm_kwargs`.
        models: (student, teacher) to train instead of the ones `cfg` describes; a student that is not
            a sparse model (its training forward returns logits, e.g. a token-merging baseline) learns
            from the teacher with CE + KL (`LogitDistillLoss`).

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
            state = setup(cfg, env, device, train_set, val_set, models)
            resume(state)
            open_run(state)
            try:
                with state.stop.installed():  # SIGINT / SIGTERM: stop at the next step, with a checkpoint
                    for epoch in range(state.start_epoch, cfg.epochs):
                        run_epoch(state, epoch)
            finally:
                state.metrics.close()
            return finish(state)
    finally:
        torch.use_deterministic_algorithms(previous_deterministic)
        if env.initialized_here:
            dist.destroy_process_group()


# -- the phases -----------------------------------------------------------------------------------


def setup(cfg: TrainConfig, env: DistEnv, device: torch.device, train_set: Optional[Dataset] = None,
          val_set: Optional[Dataset] = None, models: Optional[tuple[nn.Module, nn.Module]] = None) -> TrainState:
    """Models, data, optimizer, precision and EMA, the same on every rank. Names, files and the run
    folder are checked first, before any data is read; no file of the run is written yet."""
    out = Path(cfg.output)
    resume_from, clear_earlier, kwargs, info = _preflight(cfg, env, out, train_set)
    seed_everything(cfg.seed)  # the same initialization on every rank (DDP broadcasts rank 0's anyway)
    model, teacher = build_models(cfg, kwargs) if models is None else given_models(*models)
    sparse = isinstance(model, SparseModel)  # else a dense model, alone or distilled from the teacher
    check_model_fits(model, info)
    frozen = [] if cfg.dense else freeze_tokens(model)
    model.to(device)
    if teacher is not None:
        teacher.to(device)
    img_size = square_img_size(model)
    if train_set is None:  # each process reads its own share: a DistributedSampler, a fixed shuffle per epoch
        train_set, val_set = build_datasets(cfg, info, img_size, model.pretrained_cfg)
    if cfg.bad_images == "abort":
        check_all_images(env, device, train=train_set, val=val_set)
    sampler, train_loader, val_loader = build_loaders(cfg, env, device, train_set, val_set)
    steps = steps_per_epoch(cfg, env, train_loader, train_set)
    optimizer, schedule = _optimizer(cfg, env, model, steps)
    dtype = amp_dtype(cfg.amp, device)
    mixup = None
    if cfg.mixing:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing,
                      num_classes=num_classes_of(model))
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema else None  # a copy of the model: before DDP wraps it
    net = model
    if env.distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return TrainState(
        cfg=cfg, env=env, device=device, out=out,
        model=model, net=net, teacher=teacher, frozen=frozen,
        # Token hosts give the teacher's targets; hierarchical teachers use `spatial.dense_targets`.
        teacher_host=host_for(teacher) if teacher is not None and not isinstance(model, DynamicSpatial) else None,
        criterion=None if teacher is None else build_criterion(model, cfg),
        keys=["loss", "ce", "ratio", "kl", "token"] if sparse else ["loss", "ce"] + (["kl"] if teacher else []),
        stages=len(model.prune_locs) if sparse else 0,
        keep_sampler=KeepRatioSampler.parse(cfg.keep_ratios) if sparse and cfg.keep_ratios is not None else None,
        optimizer=optimizer, params=[p for g in optimizer.param_groups for p in g["params"]], schedule=schedule,
        dtype=dtype, scaler=torch.amp.GradScaler(device.type, enabled=dtype is torch.float16 and device.type == "cuda"),
        ema=ema, mixup=mixup,
        sampler=sampler, train_loader=train_loader, val_loader=val_loader, steps_per_epoch=steps,
        resume_from=resume_from, clear_earlier=clear_earlier,
    )


def resume(state: TrainState) -> None:
    """Continue the checkpoint `cfg.resume` names, at an epoch's end or inside an epoch (after a SIGINT /
    SIGTERM stop): weights, optimizer, EMA, history and position. Then the random streams (Gumbel
    noise, mixup, elastic keep ratios, augmentation): the checkpoint's on rank 0, else seeded per rank
    and epoch."""
    cfg, path, ckpt = state.cfg, state.resume_from, None
    if path is not None:
        ckpt = load_checkpoint(path)
        _warn_config_changes(ckpt["config"], cfg)
        check_finite(ckpt["model"], f"training checkpoint {path}")
        state.step_in_epoch, state.partial = int(ckpt.get("step_in_epoch", 0)), ckpt.get("partial")
        if state.step_in_epoch:
            check_resume_settings(ckpt["config"], cfg.to_dict())
            state.sampler.skip = state.step_in_epoch * cfg.batch_size  # the batches the checkpoint already trained
        restore_checkpoint(state, ckpt, path)
        state.start_epoch, state.history = int(ckpt["epoch"]), list(ckpt.get("history", []))
        state.step = int(ckpt.get("step", state.start_epoch * state.steps_per_epoch))
        _log(state, "resuming from %s after epoch %d%s", path, state.start_epoch,
             f", step {state.step_in_epoch} of epoch {state.start_epoch + 1}" if state.step_in_epoch else "")
    if ckpt is not None and state.env.is_main and "rng" in ckpt:
        if state.step_in_epoch:  # restored once the epoch's batches are set up (that set-up draws a loader seed)
            state.restore_rng = ckpt["rng"]
        else:
            set_rng_state(ckpt["rng"])
    else:
        seed_everything(cfg.seed + state.env.rank + 1000 * state.start_epoch)


def open_run(state: TrainState) -> None:
    """Describe the run; rank 0 checks the folder holds two checkpoints, clears an overwritten run, cuts
    metrics.jsonl back to the checkpoint (the steps after it run again) and writes config.json."""
    cfg, out = state.cfg, state.out
    _describe(state)
    if state.env.is_main:
        check_room(out, state.model, cfg.ema)
        if state.clear_earlier:
            clear_run(out)
        dropped = trim_metrics(out / "metrics.jsonl", state.step)
        if dropped:
            _log(state, "metrics.jsonl: dropped %d line(s) logged after the checkpoint (those steps run again)", dropped)
        atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(cfg.to_dict(), indent=2)))
    state.metrics = MetricsLog(out, state.env.is_main, cfg.tensorboard, purge_step=state.step + 1)


def run_epoch(state: TrainState, epoch: int) -> None:
    """One epoch: its steps, evaluation (every `eval_every` epochs and after the last), a log line and
    last.pth. A signal stops the run with a checkpoint: at the next step, or after the epoch's last."""
    cfg, env = state.cfg, state.env
    state.epoch = epoch
    state.sampler.set_epoch(epoch)
    state.net.train()
    row = train_epoch(state, epoch)
    if row is None:  # stopped inside the epoch, at step `state.step_in_epoch`
        write_checkpoint(state, epoch, step_in_epoch=state.step_in_epoch, partial=state.partial)
        _stopped(state, f"epoch {epoch + 1}, step {state.step_in_epoch}")
    stopping = state.stop.requested(env.distributed, state.device)
    if state.val_loader is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
        if stopping:
            _log(state, "evaluation of epoch %d skipped: stopping", epoch + 1)
        else:
            row.update(_validate(state, epoch, row))
    state.history.append(row)
    state.metrics.log("epoch", (epoch + 1) * state.steps_per_epoch, row)
    _log(state, "epoch %d/%d: %s", epoch + 1, cfg.epochs, format_row(row))
    write_checkpoint(state, epoch + 1)
    if env.distributed:
        dist.barrier()
    if stopping and epoch + 1 < cfg.epochs:
        _stopped(state, f"the end of epoch {epoch + 1}")


def train_epoch(state: TrainState, epoch: int) -> Optional[dict]:
    """The steps of one epoch (from `state.step_in_epoch` after a mid-epoch resume), logged every
    `log_every` steps.

    Returns:
        The epoch's row: mean losses, kept fraction per stage, last lr. None when a signal stopped the
        epoch; `state.step_in_epoch` and `state.partial` then say where.
    """
    cfg, steps = state.cfg, state.steps_per_epoch
    start, partial, restore_rng = state.step_in_epoch, state.partial, state.restore_rng
    state.step_in_epoch, state.partial, state.restore_rng = 0, None, None
    sums = torch.zeros(len(state.keys) + state.stages, device=state.device)  # running sums since the epoch began
    window = torch.zeros_like(sums)  # since the last log line
    if partial:
        sums, window = (torch.tensor(partial[k], device=state.device, dtype=sums.dtype) for k in ("sums", "window"))
    unreadable = UnreadableImages(state.train_loader.dataset, "training")
    batches = iter(state.train_loader)  # draws the loader's seed from torch's RNG
    if restore_rng is not None:
        set_rng_state(restore_rng)  # a mid-epoch resume: the random state just after that draw
    bar = progress_bar(total=steps, initial=start, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       enabled=state.env.is_main and cfg.progress)
    t0 = time.time()
    for it, (x, y) in enumerate(batches, start=start):
        if it >= steps:
            break
        state.step = epoch * steps + it
        x, y = readable(x, y, unreadable, even=state.mixup is not None)
        values = train_step(state, x, y)
        sums += values
        window += values
        bar.update(1)
        if (it + 1) % cfg.log_every == 0 or it + 1 == steps:
            _log_steps(state, window, it, bar)
        # The last step of an epoch goes on to the end-of-epoch checkpoint instead.
        if it + 1 < steps and state.stop.requested(state.env.distributed, state.device):
            bar.close()
            state.step_in_epoch, state.partial = it + 1, {"sums": sums.tolist(), "window": window.tolist()}
            return None
    bar.close()
    return _epoch_row(state, epoch, sums, t0, unreadable)


def train_step(state: TrainState, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One optimization step (global step `state.step`) on images (B, C, H, W) and labels (B,).

    Returns:
        What the epoch averages: the loss, its terms after "loss" in `state.keys`, the kept fraction per stage.
    """
    cfg = state.cfg
    state.lr = _set_lr(state)
    x, y = x.to(state.device, non_blocking=True), y.to(state.device, non_blocking=True)
    if state.mixup is not None:
        x, y = state.mixup(x, y)  # y becomes soft targets (B, K) with label smoothing folded in
    with autocast(state.device, state.dtype):
        if state.teacher is None:  # a dense model: cross-entropy alone
            loss = classification_loss(logits_of(state.net(x)), y, cfg.smoothing)
            terms, keep = {"ce": loss.detach()}, []
        else:
            with torch.no_grad():
                t_logits, t_tokens = teacher_targets(state.teacher, state.teacher_host, x)
            # Elastic training: this step's keep ratio, from python's RNG (per rank, restored on resume).
            rho = {} if state.keep_sampler is None else {"keep_ratio": state.keep_sampler.sample(random)}
            out = state.net(x, **rho)  # the training path: tokens masked (Gumbel-softmax), not removed
            loss, terms = state.criterion(out, y, t_logits, t_tokens, **rho)
            keep = [d.detach().float().mean() for d in out.decisions] if state.stages else []  # kept per stage
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    if cfg.clip_grad:
        state.scaler.unscale_(state.optimizer)  # clip the true gradients, not fp16-scaled ones
        nn.utils.clip_grad_norm_(state.params, cfg.clip_grad)
    state.scaler.step(state.optimizer)  # skips the update when fp16 gradients overflowed
    state.scaler.update()
    if state.ema is not None:
        state.ema.update(state.model, step=state.step)
    return torch.stack([loss.detach().float()] + [terms[k].float() for k in state.keys[1:]] + keep)


def finish(state: TrainState) -> TrainResult:
    """Warn about stages that missed their kept fraction; write the final model file(s), with the
    settings that made them."""
    cfg, env, model, out = state.cfg, state.env, state.model, state.out
    if env.is_main and state.stages and state.history:
        targets = getattr(model, "stage_ratios", None)  # ConvNeXt / Swin: r_s per predictor
        if state.keep_sampler is not None:  # elastic: the kept fractions average over the ratios drawn
            targets = [state.keep_sampler.expected_fraction(s) for s in range(1, len(model.prune_locs) + 1)]
        for warning in keep_ratio_drift(state.history[-1], model.keep_ratio, targets=targets):
            _logger.warning(warning)
    model.eval()
    final, ema_final = out / "model.safetensors", None
    extra = {"train_config": cfg.to_dict(), "epochs_done": len(state.history),
             "final": state.history[-1] if state.history else None}
    if env.is_main:
        save_model(model, final, overwrite=True, extra=extra)
        if state.ema is not None:
            ema_final = save_model(state.ema.module, out / "model_ema.safetensors", overwrite=True, extra=extra)
        _log(state, "saved %s%s", final, f" and {ema_final}" if ema_final else "")
    elif state.ema is not None:
        ema_final = out / "model_ema.safetensors"
    if env.distributed:
        dist.barrier()
    return TrainResult(checkpoint=final, last=state.last, history=state.history, ema_checkpoint=ema_final, model=model)


# -- the schedule ---------------------------------------------------------------------------------


def cosine_lr(step: int, *, base_lr: float, min_lr: float, warmup_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup from warmup_lr to base_lr, then half a cosine down to min_lr (per iteration)."""
    if step < warmup_steps:
        return warmup_lr + (base_lr - warmup_lr) * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _optimizer(cfg: TrainConfig, env: DistEnv, model: nn.Module, steps: int) -> tuple[torch.optim.Optimizer, dict]:
    """AdamW over `param_groups`, and the `cosine_lr` schedule over every step of the run; the peak lr
    is `cfg.lr`, or 1e-3 per 1024 images of global batch."""
    base_lr = cfg.lr if cfg.lr is not None else REFERENCE_LR * cfg.batch_size * env.world_size / REFERENCE_BATCH
    groups = param_groups(model, cfg.weight_decay, 1.0 if cfg.dense else cfg.backbone_lr_scale)
    optimizer = torch.optim.AdamW(groups, lr=base_lr, betas=(0.9, 0.999))
    schedule = dict(base_lr=base_lr, min_lr=cfg.min_lr, warmup_lr=cfg.warmup_lr,
                    warmup_steps=round(cfg.warmup_epochs * steps), total_steps=cfg.epochs * steps)
    return optimizer, schedule


def _set_lr(state: TrainState) -> float:
    """This step's lr on every parameter group, times the group's scale; the backbone's is 0 while frozen."""
    lr = cosine_lr(state.step, **state.schedule)
    frozen = not state.cfg.dense and state.epoch < state.cfg.freeze_backbone_epochs
    for g in state.optimizer.param_groups:
        g["lr"] = 0.0 if frozen and g["part"] == "backbone" else lr * g["lr_scale"]
    return lr


# -- the pieces of the phases ---------------------------------------------------------------------


def _preflight(cfg: TrainConfig, env: DistEnv, out: Path, train_set: Optional[Dataset]):
    """Fail fast on what a user can get wrong: names and files first, the run folder next.

    Returns:
        (the checkpoint to resume or None, whether an earlier run is to be cleared, the timm arguments,
        the dataset's description or None when `train_set` is given).
    """
    check_model_name(cfg.model)
    for path in (cfg.teacher, cfg.init_checkpoint):
        if path and is_hf_spec(path):
            hf_folder(path)  # raises CheckpointError for a missing folder or a hub name
        elif path:
            read_checkpoint(path)  # raises CheckpointError for missing or unreadable files
    resume_from = resume_path(cfg, out)
    clear_earlier = False
    if env.is_main:  # an earlier run is continued or refused, never silently replaced
        clear_earlier = claim_run_folder(out, resume_from, cfg.overwrite, resume_asked=cfg.resume not in (False, None, ""))
    kwargs, info = dict(cfg.timm_kwargs), None
    if train_set is None:
        info = resolve_dataset(cfg.dataset, cfg.data_dir)
        # A transformers model runs at its own size (config.image_size or its image processor's crop).
        hf = any(is_hf_spec(s) for s in (cfg.model, cfg.teacher, cfg.init_checkpoint))
        size = {} if hf else {"img_size": info.img_size}
        kwargs = {"num_classes": info.num_classes, "in_chans": info.in_chans, **size, **kwargs}
    return resume_from, clear_earlier, kwargs, info


def _describe(state: TrainState) -> None:
    """The run in one log line (rank 0), and warnings for settings that leave part of it idle."""
    cfg, env, model = state.cfg, state.env, state.model
    if not env.is_main:
        return
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base_lr, dtype = state.schedule["base_lr"], state.dtype
    _logger.info(
        "training %s %s: %d trainable parameters, %d steps/epoch x %d epochs, global batch %d, lr %.3g%s, "
        "device %s%s, amp %s",
        "dense" if cfg.dense else type(model).__name__, getattr(model, "model_name", None) or cfg.model, n_params,
        state.steps_per_epoch, cfg.epochs, cfg.batch_size * env.world_size, base_lr,
        "" if cfg.dense else f" (backbone x{cfg.backbone_lr_scale:.4g}, frozen {cfg.freeze_backbone_epochs} epochs)",
        state.device, f" x{env.world_size}" if env.distributed else "", str(dtype).replace("torch.", "") if dtype else "none",
    )
    if state.frozen:
        _logger.info("not trained (reference recipe): %s", ", ".join(state.frozen))
    if cfg.warmup_epochs >= cfg.epochs:
        _logger.warning("warmup_epochs %s >= epochs %d: the learning rate never reaches %.3g", cfg.warmup_epochs, cfg.epochs, base_lr)
    if not cfg.dense and cfg.freeze_backbone_epochs >= cfg.epochs:
        _logger.warning("freeze_backbone_epochs %d >= epochs %d: only the prediction modules will train",
                        cfg.freeze_backbone_epochs, cfg.epochs)


def _log_steps(state: TrainState, window: torch.Tensor, it: int, bar) -> None:
    """The mean of the steps since the last line to metrics.jsonl and the progress bar (then `window`
    restarts); a loss that is not finite stops the run."""
    keys, n = state.keys, (it % state.cfg.log_every) + 1
    mean = (window / n).tolist()
    window.zero_()
    if not math.isfinite(mean[0]):
        raise DynamicViTError(
            f"the loss is {mean[0]} at epoch {state.epoch + 1}, step {it + 1}; lower --lr, set --clip-grad 1.0 "
            "or use --amp bf16 / none"
        )
    row = dict(zip(keys, mean[: len(keys)]))
    row.update({f"keep{s + 1}": r for s, r in enumerate(mean[len(keys):])})
    row["lr"] = state.lr
    state.metrics.log("train", state.step + 1, row)
    postfix = {"loss": f"{row['loss']:.3f}", "lr": f"{state.lr:.2e}"}
    if state.stages:
        postfix["keep"] = "/".join(f"{r:.2f}" for r in mean[len(keys):])
    bar.set_postfix(postfix)


def _epoch_row(state: TrainState, epoch: int, sums: torch.Tensor, t0: float, unreadable: UnreadableImages) -> dict:
    """The epoch's means over its steps (and over the ranks under DDP) as a history row."""
    keys = state.keys
    steps = min(state.steps_per_epoch, len(state.train_loader))
    if state.env.distributed:
        dist.all_reduce(sums)
        sums /= state.env.world_size
    mean = (sums / steps).tolist()
    row = {"epoch": epoch + 1, **{f"train_{k}": v for k, v in zip(keys, mean[: len(keys)])}}
    row.update({f"keep_ratio_stage{s + 1}": r for s, r in enumerate(mean[len(keys):])})
    row.update({"lr": state.lr, "epoch_time_s": time.time() - t0})
    if unreadable.count:
        row["unreadable_images"] = unreadable.count
    return row


def _validate(state: TrainState, epoch: int, row: dict) -> dict:
    """Validation metrics of the model (and its EMA) as `val_*` / `val_ema_*` entries of the epoch's row.
    When evaluation fails, the epoch's training is saved first: it is worth keeping whatever broke."""
    amp = state.cfg.amp if state.dtype else "none"
    found = {}
    try:
        for prefix, net in (("val_", state.model), ("val_ema_", state.ema.module if state.ema is not None else None)):
            if net is not None:
                val = evaluate(net, state.val_loader, state.device, amp, distributed=state.env.distributed)
                # The counts of unreadable images and non-finite outputs only when there are some.
                found.update({f"{prefix}{k}": v for k, v in val.items() if v or k not in ("non_finite", "unreadable")})
    except Exception:
        state.history.append(row)
        write_checkpoint(state, epoch + 1)
        _logger.error("evaluation after epoch %d failed; the epoch's training is saved in %s "
                      "(--resume continues after it)", epoch + 1, state.last)
        raise
    return found


def _stopped(state: TrainState, where: str) -> NoReturn:
    """Raise `TrainingStopped` (after the checkpoint at `where`), on every rank together."""
    if state.env.distributed:
        dist.barrier()
    signum = state.stop.signum or signal.SIGTERM
    raise TrainingStopped(
        f"stopped by {signal.Signals(signum).name} at {where}; checkpoint {state.last} (--resume continues from it)",
        signum=signum,
        checkpoint=state.last,
    )


def _warn_config_changes(saved: dict, cfg: TrainConfig) -> None:
    ignore = {"resume", "overwrite", "progress", "tensorboard", "num_workers", "log_every", "device", "eval_every"}
    changed = {k: (saved.get(k), v) for k, v in cfg.to_dict().items() if k not in ignore and saved.get(k) != v}
    if changed:
        _logger.warning("resuming with changed settings: %s", ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()))


def _log(state: TrainState, msg: str, *args) -> None:
    """An info line from rank 0 only."""
    if state.env.is_main:
        _logger.info(msg, *args)
