"""Fault injection: a training subprocess is killed (SIGKILL) at random points, inside optimizer steps and
in the middle of checkpoint writes, a bounded number of times; each time `--resume` picks up the last
checkpoint, and the run ends at exactly the weights of a run that was never interrupted."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dynamicvit
from test_train import make_teacher

DRIVER = Path(__file__).parent / "fault_driver.py"
KILLS = 4  # bounded: each kill costs a process start (a few seconds)


def driver(root: Path, output: Path, mode: str = "none", n: int = 0, workers: int = 0) -> list[str]:
    return [sys.executable, str(DRIVER), str(root), str(output), mode, str(n), str(workers)]


def environment() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}


def run(root: Path, output: Path, mode: str = "none", n: int = 0, workers: int = 0) -> int:
    done = subprocess.run(driver(root, output, mode, n, workers), env=environment(), capture_output=True, text=True, timeout=300)
    assert done.returncode in (0, -signal.SIGKILL), done.stderr[-3000:]
    return done.returncode


def train_lines(out: Path) -> int:
    path = out / "metrics.jsonl"
    return sum('"train"' in line for line in path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.slow
def test_random_kills_then_resume_end_at_the_uninterrupted_weights(tmp_path):
    make_teacher(tmp_path / "teacher.safetensors")
    assert run(tmp_path, tmp_path / "full") == 0
    rng = random.Random(9)
    out, kills = tmp_path / "killed", []
    for attempt in range(KILLS):
        # 6 steps and 3 checkpoint writes in all; a resumed run has fewer left, so some draws pass the end.
        mode = ("step", "write")[attempt % 2]
        n = rng.randint(1, 4 if mode == "step" else 2)
        if run(tmp_path, out, mode, n) == -signal.SIGKILL:
            kills.append((mode, n))
            last = out / "last.pth"
            if last.exists():  # whatever was killed, the checkpoint on disk is a whole one
                assert {"model", "optimizer", "epoch"} <= set(torch.load(last, weights_only=True))
    assert any(mode == "write" for mode, _ in kills) and any(mode == "step" for mode, _ in kills), kills
    assert run(tmp_path, out) == 0  # and finish
    a = dynamicvit.weights.formats.read_checkpoint(tmp_path / "full" / "model.safetensors")[0]
    b = dynamicvit.weights.formats.read_checkpoint(out / "model.safetensors")[0]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not list(out.glob(".*.tmp"))  # no litter from the killed writes
    steps = lambda p: [(r["kind"], r["step"]) for r in map(json.loads, (p / "metrics.jsonl").read_text().splitlines())]  # noqa: E731
    assert steps(out) == steps(tmp_path / "full")  # no repeated or missing log lines


@pytest.mark.slow
def test_sigterm_to_the_whole_process_group_stops_with_a_checkpoint_despite_loader_workers(tmp_path):
    """A cluster sends SIGTERM to every process of the job, data loader workers included: the loop still
    stops at a step boundary with a checkpoint (exit 143), and --resume finishes the run."""
    make_teacher(tmp_path / "teacher.safetensors")
    out = tmp_path / "run"
    proc = subprocess.Popen(driver(tmp_path, out, workers=2), env=environment(), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while train_lines(out) < 1 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived (machine too fast)")
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "SIGTERM received" in err and "Traceback" not in err
    ckpt = torch.load(out / "last.pth", weights_only=True)
    assert ckpt["step"] >= 1
    assert run(tmp_path, out, workers=2) == 0
    assert (out / "model.safetensors").exists() and not list(out.glob(".*.tmp"))
    steps = [(r["kind"], r["step"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert steps == sorted(set(steps), key=steps.index) and steps[-1] == ("epoch", 6)  # no repeats, finished


def run_in_own_group(root: Path, output: Path, mode: str) -> subprocess.CompletedProcess:
    return subprocess.run(driver(root, output, mode, workers=2), env=environment(), start_new_session=True,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_sigterm_while_evaluation_workers_start_is_taken_once_by_the_loop(tmp_path):
    """The group's SIGTERM reaches freshly forked evaluation workers before their worker_init_fn: they were
    forked with the signal blocked, so they neither die nor run the loop's handler (which they inherit and
    which printed the stop message once per worker); the loop stops once, with a checkpoint."""
    make_teacher(tmp_path / "teacher.safetensors")
    done = run_in_own_group(tmp_path, tmp_path / "run", "term-starting-workers")
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-3000:]
    assert done.stderr.count("SIGTERM received") == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert torch.load(tmp_path / "run" / "last.pth", weights_only=True)["epoch"] == 1


@pytest.mark.slow
def test_a_worker_dying_mid_evaluation_ends_the_process_instead_of_hanging_it(tmp_path):
    """Workers ignore SIGTERM, so Python's exit (which terminates daemon children with SIGTERM, then joins
    them) waited forever for the workers an exception's traceback kept alive. Now the run fails, saves the
    epoch's training and exits."""
    make_teacher(tmp_path / "teacher.safetensors")
    done = run_in_own_group(tmp_path, tmp_path / "run", "worker-dies")  # hung until the timeout before
    assert done.returncode == 1, done.stderr[-3000:]
    assert "evaluation after epoch 1 failed" in done.stderr and "DataLoader worker" in done.stderr
    assert torch.load(tmp_path / "run" / "last.pth", weights_only=True)["epoch"] == 1
