"""Nothing lost, nothing silent, on the command line: outputs never replace a user's file, bad values
are usage errors naming the value, unwritable outputs are one line, logs stay plain in files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dynamicvit
from conftest import TINY, tiny_model
from dynamicvit.cli import main


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str, command: str) -> str:
    """The stderr of a failed command: exactly one line, `dynamicvit CMD: error: ...` (or argparse's usage + error)."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    return errors[0]


# -- item 1: visualize never overwrites an input -------------------------------------------------


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "d"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / "photo.png")
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / "cat.jpg")
    return folder


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_visualize_into_the_input_folder_keeps_every_input(tmp_path, photos, capsys):
    ckpt = dynamicvit.save_model(tiny_model(), tmp_path / "m.safetensors")
    before = _snapshot(photos)
    code, out, err = run_cli(capsys, "visualize", "--checkpoint", ckpt, "--output", photos, photos, "--html",
                             "--contact-sheet")
    assert code == 0, err
    after = _snapshot(photos)
    for name, data in before.items():
        assert after[name] == data, f"{name} was overwritten"
    figures = sorted(set(after) - set(before))
    assert figures == ["cat.png", "contact_sheet.png", "index.html", "photo_2.png"]
    # A second run reads the first run's figures as inputs too: they are inputs now, so they are kept.
    before = _snapshot(photos)
    assert run_cli(capsys, "visualize", "--checkpoint", ckpt, "--output", photos, photos)[0] == 0
    after = _snapshot(photos)
    assert all(after[name] == data for name, data in before.items())


def test_visualize_replaces_its_own_pictures_but_never_a_users_file(tmp_path, photos, capsys):
    ckpt = dynamicvit.save_model(tiny_model(), tmp_path / "m.safetensors")
    out = tmp_path / "out"
    assert run_cli(capsys, "visualize", "--checkpoint", ckpt, "--output", out, photos / "photo.png")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["photo.png"]
    assert run_cli(capsys, "visualize", "--checkpoint", ckpt, "--output", out, photos / "photo.png")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["photo.png"]  # our own picture: replaced, no photo_2.png
    (out / "photo.png").write_bytes((photos / "photo.png").read_bytes())  # now it is the user's picture
    (out / "average_keep.npy").write_bytes(b"user data")
    users = _snapshot(out)
    assert run_cli(capsys, "visualize", "--checkpoint", ckpt, "--output", out, photos / "photo.png")[0] == 0
    assert run_cli(capsys, "visualize", "--checkpoint", ckpt, "--output", out, "--average", photos)[0] == 0
    after = _snapshot(out)
    assert all(after[name] == data for name, data in users.items())
    assert {"photo_2.png", "average_keep_2.png", "average_keep_2.npy"} <= set(after)


@pytest.mark.parametrize("where", ["file", "proc"])
def test_unusable_output_folder_is_one_line(tmp_path, photos, capsys, where):
    ckpt = dynamicvit.save_model(tiny_model(), tmp_path / "m.safetensors")
    target = photos / "photo.png" if where == "file" else Path("/proc/dynamicvit-out")
    before = _snapshot(photos)
    code, _, err = run_cli(capsys, "visualize", "--checkpoint", ckpt, "--output", target, photos)
    assert code == 2
    line = one_error_line(err, "visualize")
    assert line.startswith("dynamicvit visualize: error: --output") and str(target) in line
    assert _snapshot(photos) == before
