"""What keeps a training run's folder trustworthy across crashes, kills and re-runs.

- `claim_run_folder`: a folder holding a finished or resumable run is continued (`--resume`) or
  refused, never silently replaced; `--overwrite` clears the earlier run's files first. Temporary
  files a killed write left behind are removed.
- `check_room`: before training, the folder must hold two checkpoints (an atomic write keeps the old
  file until the new one is complete) plus the final model file.
- `trim_metrics`: after a resume, `metrics.jsonl` keeps only the lines up to the checkpoint's step, so
  the steps trained again are not logged twice.
- `StopRequest`: SIGINT / SIGTERM ask the loop to stop at the next step boundary, after a checkpoint.
- `StopSafeLoader`: the loop's data loader, whose workers ignore those signals from their first instruction.
- `ResumableSampler`: the training sampler, able to skip the batches of an epoch that a mid-epoch
  checkpoint already trained.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import logging
import multiprocessing
import multiprocessing.util  # registers its exit handler now, so that ours (below) runs before it
import os
import signal
import threading
import weakref
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler

from ..errors import ConfigError
from ..files import atomic_write, check_free_space, remove_stale_temp_files

_logger = logging.getLogger(__name__)

# Files a run writes into its folder; the first three make it a run that can be resumed or lost.
RESULT_FILES = ("last.pth", "model.safetensors", "model_ema.safetensors")
LOG_FILES = ("metrics.jsonl", "config.json")


def claim_run_folder(out: Path, resume_from: Optional[Path], overwrite: bool, resume_asked: bool = False) -> bool:
    """Refuse to start over an earlier run unless resuming it or told to overwrite it (rank 0 only).

    Resuming from a checkpoint in another folder counts as a new run in `out`.

    Call with the folder's `RunLock` held: removes the temporary files interrupted writes left behind.

    Returns:
        Whether an earlier run is to be cleared (`overwrite`): call `clear_run` once the new run has
        passed its checks, so a run that fails to start costs nothing.

    Raises:
        ConfigError: the folder holds a run's checkpoint or model and neither `resuming` nor `overwrite`.
    """
    remove_stale_temp_files(out, RESULT_FILES + LOG_FILES)
    existing = [name for name in RESULT_FILES if (out / name).exists()]
    resuming = resume_from is not None and resume_from.resolve() == (out / "last.pth").resolve()
    if not existing or resuming:
        return False
    if resume_asked and resume_from is None:
        raise ConfigError(
            f"{out} holds an earlier run ({', '.join(existing)}) but no last.pth to resume it from; pass --overwrite "
            "instead of --resume to replace it, or choose another --output"
        )
    if resume_from is not None:
        raise ConfigError(
            f"{out} holds an earlier run ({', '.join(existing)}); resuming {resume_from} there would replace it. "
            "Choose another --output (or pass --resume alone to continue the run in it)"
        )
    if not overwrite:
        raise ConfigError(
            f"{out} holds an earlier run ({', '.join(existing)}); pass --resume to continue it, --overwrite to "
            "replace it, or choose another --output"
        )
    return True


def clear_run(out: Path) -> None:
    """Remove an earlier run's checkpoints, model files, logs and TensorBoard events (`--overwrite`)."""
    removed = [name for name in RESULT_FILES + LOG_FILES if (out / name).exists()]
    for name in removed:
        (out / name).unlink()
    for events in (out / "tb").glob("events.out.tfevents.*"):
        events.unlink()
    _logger.warning("--overwrite: removed the earlier run's %s from %s", ", ".join(removed), out)


def trim_metrics(path: Path, last_step: int) -> int:
    """Keep the lines of `metrics.jsonl` up to `last_step` (the checkpoint's); returns how many were dropped.

    Lines past the checkpoint describe steps the resumed run trains again; a line that does not parse
    (the half-written last line of a killed run) is dropped too.
    """
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            ok = int(json.loads(line)["step"]) <= last_step
        except (ValueError, KeyError, TypeError):
            ok = False
        if ok:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(f"{line}\n" for line in kept)))
    return dropped


def checkpoint_bytes(model: nn.Module, ema: bool) -> tuple[int, int]:
    """Estimated sizes of (a training checkpoint, the final model file) of `model`.

    The checkpoint holds the weights, AdamW's two fp32 moments per trainable parameter and, with EMA,
    a second copy of the weights.
    """
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    moments = sum(2 * 4 * p.numel() for p in model.parameters() if p.requires_grad)
    return weights * (2 if ema else 1) + moments, weights


def check_room(out: Path, model: nn.Module, ema: bool) -> None:
    """Raise `OutputError` unless `out` can take two checkpoints and the final model file(s)."""
    ckpt, weights = checkpoint_bytes(model, ema)
    needed = 2 * ckpt + weights * (2 if ema else 1)
    needed -= sum((out / name).stat().st_size for name in RESULT_FILES if (out / name).exists())  # replaced in place
    check_free_space(out, needed, f"two checkpoints of this model ({ckpt / 2**20:.1f} MB each) and the final model")


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_CAN_MASK = hasattr(signal, "pthread_sigmask")  # POSIX


def ignore_stop_signals(worker_id: int) -> None:
    """Data loader workers ignore SIGINT and SIGTERM: a signal sent to the whole process group (Ctrl-C,
    a cluster's SIGTERM) must reach the training loop, which stops them after its checkpoint; a worker
    killed by it first would make the loader raise in the middle of that. The signals were blocked when
    the worker was forked (`StopSafeLoader`); one that arrived since is dropped here. Workers still exit
    with their parent."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    if _CAN_MASK:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextlib.contextmanager
def _stop_signals_blocked() -> Iterator[None]:
    """SIGINT / SIGTERM wait (pending, not lost) until the block ends; processes forked inside it start
    with them blocked."""
    if not _CAN_MASK:
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


_workers: "weakref.WeakSet[multiprocessing.Process]" = weakref.WeakSet()
_workers_owner = os.getpid()


def _kill_workers_at_exit() -> None:
    """Workers ignore SIGTERM, so multiprocessing's own exit handler, which terminates daemon children
    with SIGTERM and then joins them, would wait forever for the workers of a loader whose iterator an
    exception kept alive (a worker that died mid-evaluation, say). Registered after multiprocessing's
    handler, this one runs first and kills them."""
    if os.getpid() != _workers_owner:
        return
    alive = [worker for worker in list(_workers) if worker.is_alive()]
    if alive and hasattr(signal, "SIGCHLD"):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would raise for each worker killed
    for worker in alive:
        worker.kill()
    for worker in alive:
        worker.join(5)


atexit.register(_kill_workers_at_exit)


class StopSafeLoader(DataLoader):
    """`DataLoader` for the training loop, whose workers outlive a SIGINT / SIGTERM sent to the whole
    process group, even one that arrives while they start: they are forked with the signals blocked
    and ignore them before unblocking (`ignore_stop_signals`). Without the block, a worker hit between
    its fork and its `worker_init_fn` would run the loop's handler or die, and the loader would raise."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, worker_init_fn=ignore_stop_signals, **kwargs)

    def __iter__(self):
        before = set(multiprocessing.active_children())
        with _stop_signals_blocked():
            iterator = super().__iter__()
        _workers.update(set(multiprocessing.active_children()) - before)
        return iterator


class StopRequest:
    """SIGINT and SIGTERM set a flag; the loop stops at the next step boundary after a checkpoint.

    A second signal of either kind stops at once (SIGINT raises KeyboardInterrupt, SIGTERM gets its
    previous handler). Handlers are installed only in the main thread and restored on exit.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = 0
        self._previous: dict[int, object] = {}

    @contextlib.contextmanager
    def installed(self) -> Iterator["StopRequest"]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        try:
            yield self
        finally:
            self._restore()

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum:  # asked twice: stop now
            self._restore()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.raise_signal(signum)
            return
        self.signum = signum
        _logger.warning(
            "%s received: stopping after this step with a checkpoint (send it again to stop at once)",
            signal.Signals(signum).name,
        )

    def requested(self, distributed: bool = False, device: Optional[torch.device] = None) -> int:
        """The signal that asked for the stop, 0 if none; under DDP, any rank's (all ranks stop together)."""
        if not distributed:
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


class ResumableSampler(DistributedSampler):
    """`DistributedSampler` that can skip the first `skip` indices of the next epoch (a mid-epoch resume).

    The order of an epoch depends only on the seed and the epoch, so skipping the batches a checkpoint
    already trained continues exactly where the run stopped.
    """

    skip: int = 0

    def __iter__(self):
        indices = super().__iter__()
        skip, self.skip = self.skip, 0
        for i, index in enumerate(indices):
            if i >= skip:
                yield index


def check_resume_settings(saved: dict, cfg_dict: dict) -> None:
    """A mid-epoch checkpoint can be continued only with the same batch layout."""
    for key in ("batch_size", "max_steps_per_epoch", "subset", "seed"):
        if saved.get(key) != cfg_dict.get(key):
            raise ConfigError(
                f"the checkpoint stopped inside an epoch with {key}={saved.get(key)!r}; resuming it needs the same "
                f"{key} (got {cfg_dict.get(key)!r}), or resume from an end-of-epoch checkpoint"
            )
