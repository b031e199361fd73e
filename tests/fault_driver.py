"""Runs one tiny training in a subprocess for tests/test_fault_injection.py, optionally killing itself.

    python fault_driver.py ROOT OUTPUT MODE N [WORKERS]

MODE "step": SIGKILL inside the N-th optimizer step (after backward, before the update); "write": SIGKILL
in the N-th checkpoint write, after half the file is on disk; "term-starting-workers": SIGTERM to the whole
process group just after the first evaluation's loader forked its workers, which are slowed to start (so
the signal reaches them before their worker_init_fn); "worker-dies": SIGKILL one of those workers instead;
"none": run to the end. The run always
passes resume=True, so it continues whatever an earlier, killed run left in OUTPUT. WORKERS: data
loader processes (default 0). A stop by SIGTERM / SIGINT exits with 128 + the signal, as the CLI does.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from test_train import config, synthetic  # noqa: E402

from dynamicvit.errors import TrainingStopped  # noqa: E402
from dynamicvit.training.loop import train  # noqa: E402

RUN = dict(epochs=3, max_steps_per_epoch=2, mixup=0.8, cutmix=1.0, clip_grad=1.0, log_every=1)


def kill_at(n: int, count: list) -> bool:
    count[0] += 1
    return count[0] == n


def main() -> None:
    root, output, mode, n = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    workers = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    torch.set_num_threads(1)
    count = [0]
    if mode == "step":
        real_step = torch.optim.AdamW.step

        def step(self, *args, **kwargs):
            if kill_at(n, count):
                os.kill(os.getpid(), signal.SIGKILL)
            return real_step(self, *args, **kwargs)

        torch.optim.AdamW.step = step
    elif mode == "write":
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            if kill_at(n, count):
                real_save(obj, f, *args, **kwargs)
                with open(f, "r+b") as half:
                    half.truncate(os.path.getsize(f) // 2)
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *args, **kwargs)

        torch.save = save
    elif mode in ("term-starting-workers", "worker-dies"):
        import torch.utils.data._utils.worker as worker  # private: the function each worker process runs

        real_loop, real_iter = worker._worker_loop, torch.utils.data.DataLoader.__iter__

        def slow_loop(*args, **kwargs):
            time.sleep(1.0)  # a worker slow to start: the signal comes before its worker_init_fn
            return real_loop(*args, **kwargs)

        def start(self):
            before = set(multiprocessing.active_children())
            iterator = real_iter(self)
            if not self.persistent_workers and kill_at(1, count):  # the first evaluation's loader
                if mode == "worker-dies":
                    os.kill(min(p.pid for p in set(multiprocessing.active_children()) - before), signal.SIGKILL)
                else:
                    os.killpg(os.getpgid(0), signal.SIGTERM)
            return iterator

        worker._worker_loop, torch.utils.data.DataLoader.__iter__ = slow_loop, start
    cfg = config(root, output=output, resume=True, num_workers=workers, **RUN)
    try:
        train(cfg, train_set=synthetic(24), val_set=synthetic(8, seed=1))
    except TrainingStopped as e:
        sys.exit(128 + e.signum)


if __name__ == "__main__":
    main()
