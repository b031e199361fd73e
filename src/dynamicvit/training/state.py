"""A run's state in one object (`TrainState`), its training checkpoint (last.pth) and the random state
that makes a resumed run repeat an uninterrupted one exactly."""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from ..core.hosts import Host
from ..core.settings import KeepRatioSampler
from ..errors import CheckpointError
from ..files import atomic_write
from ..weights.formats import model_settings
from .config import TrainConfig
from .distributed import DistEnv
from .metrics import MetricsLog
from .safety import ResumableSampler, StopRequest

_logger = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Everything a run holds between its phases: `loop.setup` builds it, `loop.resume` positions it,
    `loop.run_epoch` and `loop.train_step` advance it."""

    cfg: TrainConfig
    env: DistEnv  # this process's rank in a torchrun job
    device: torch.device
    out: Path  # the run folder (rank 0 writes it)
    # The models and the objective.
    model: nn.Module  # the model being trained, unwrapped: what is saved and evaluated
    net: nn.Module  # what a step calls: `model`, or its DistributedDataParallel wrapper
    teacher: Optional[nn.Module]  # the frozen dense teacher; None when training a dense model
    teacher_host: Optional[Host]  # reads the teacher's targets; None: a hierarchical teacher (dense_targets)
    criterion: Optional[nn.Module]  # the sparse model's objective; None: plain CE (dense)
    keys: list[str]  # what a step reports, in order: "loss", "ce" and for a sparse model "ratio", "kl", "token"
    stages: int  # pruning stages (0 for a dense model); a step also reports the kept fraction of each
    keep_sampler: Optional[KeepRatioSampler]  # elastic training: this step's keep ratio; None: cfg.keep_ratio
    frozen: list[str]  # parameters not trained (the tokens, when fine-tuning)
    # Optimization.
    optimizer: torch.optim.Optimizer
    params: list[nn.Parameter]  # every parameter the optimizer updates, in its order (gradient clipping)
    schedule: dict  # `loop.cosine_lr` arguments: base_lr, min_lr, warmup_lr, warmup_steps, total_steps
    dtype: Optional[torch.dtype]  # autocast precision; None: full precision
    scaler: torch.amp.GradScaler  # loss scaling for fp16 on CUDA; a pass-through otherwise
    ema: Optional[nn.Module]  # timm's ModelEmaV3 of the weights (cfg.ema)
    mixup: Optional[Callable]  # timm's Mixup / CutMix: mixed images, soft targets (B, K)
    # The data.
    sampler: ResumableSampler  # this rank's share of the training set, reshuffled per epoch
    train_loader: DataLoader
    val_loader: Optional[DataLoader]
    steps_per_epoch: int
    # Where the run is.
    resume_from: Optional[Path]  # the checkpoint to continue, if any
    clear_earlier: bool  # --overwrite: remove the earlier run's files once every check has passed
    stop: StopRequest = field(default_factory=StopRequest)  # set by SIGINT / SIGTERM
    metrics: Optional[MetricsLog] = None  # opened by `loop.open_run`
    history: list[dict] = field(default_factory=list)  # one row per finished epoch
    start_epoch: int = 0  # the first epoch to train (epochs the checkpoint finished)
    step: int = 0  # global steps trained: the checkpoint's, then the current step's index
    epoch: int = 0  # the epoch being trained
    lr: float = 0.0  # the last step's learning rate (before each group's scale)
    # A checkpoint written inside an epoch continues there: its steps, running sums and random state.
    step_in_epoch: int = 0
    partial: Optional[dict] = None
    restore_rng: Optional[dict] = None

    @property
    def last(self) -> Path:
        """The resumable training checkpoint."""
        return self.out / "last.pth"


def write_checkpoint(state: TrainState, epochs_done: int, **position) -> None:
    """Write last.pth (rank 0): weights, optimizer, EMA, RNG, history; `position` for a mid-epoch stop."""
    if not state.env.is_main:
        return
    save_checkpoint(state.last, {
        "model": state.model.state_dict(),
        "dynamicvit": model_settings(state.model),
        "optimizer": state.optimizer.state_dict(),
        "scaler": state.scaler.state_dict(),
        "ema": state.ema.module.state_dict() if state.ema is not None else None,
        "epoch": epochs_done,
        "step": epochs_done * state.steps_per_epoch + position.get("step_in_epoch", 0),
        "config": state.cfg.to_dict(),
        "history": state.history,
        "rng": rng_state(),
        **position,
    })


def restore_checkpoint(state: TrainState, ckpt: dict, path: Path) -> None:
    """Weights, optimizer, loss scaler and EMA from a training checkpoint (the EMA restarts from the
    weights when the checkpoint has none)."""
    try:
        state.model.load_state_dict(ckpt["model"])
        state.optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path} does not match this run's model: {str(e).splitlines()[0]}") from None
    if ckpt.get("scaler"):
        state.scaler.load_state_dict(ckpt["scaler"])
    if state.ema is not None:
        ema = ckpt.get("ema")
        state.ema.module.load_state_dict(ema if ema is not None else state.model.state_dict())


def save_checkpoint(path: Path, ckpt: dict) -> None:
    """torch.save through a temporary file: a crash mid-write leaves the previous checkpoint intact."""
    atomic_write(path, lambda tmp: torch.save(ckpt, tmp))


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


def resume_path(cfg: TrainConfig, out: Path) -> Optional[Path]:
    """The checkpoint `cfg.resume` asks for: <output>/last.pth (True, "auto", "last") when it exists, or a file."""
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


# -- random state ---------------------------------------------------------------------------------


def rng_state() -> dict:
    """Every random generator a step draws from (python for elastic keep ratios, numpy for mixup,
    torch for Gumbel noise and loader seeds)."""
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
    """Restore what `rng_state` saved (CUDA's only on the same number of GPUs)."""
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
