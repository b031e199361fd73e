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
from pathlib import Path

import pytest
import torch

import dynamicvit
from test_train import make_teacher

DRIVER = Path(__file__).parent / "fault_driver.py"
KILLS = 4  # bounded: each kill costs a process start (a few seconds)


def run(root: Path, output: Path, mode: str = "none", n: int = 0) -> int:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(DRIVER), str(root), str(output), mode, str(n)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode in (0, -signal.SIGKILL), done.stderr[-3000:]
    return done.returncode


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
    a = dynamicvit.checkpoint.read_checkpoint(tmp_path / "full" / "model.safetensors")[0]
    b = dynamicvit.checkpoint.read_checkpoint(out / "model.safetensors")[0]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not list(out.glob(".*.tmp"))  # no litter from the killed writes
    steps = lambda p: [(r["kind"], r["step"]) for r in map(json.loads, (p / "metrics.jsonl").read_text().splitlines())]  # noqa: E731
    assert steps(out) == steps(tmp_path / "full")  # no repeated or missing log lines
