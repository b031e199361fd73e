"""Nothing lost, nothing silent, on the command line: outputs never replace a user's file, bad values
are usage errors naming the value, unwritable outputs are one line, logs stay plain in files."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dynamicvit
from conftest import tiny_model
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


# -- items 6 and 8: bad values are usage errors naming the value ---------------------------------


@pytest.mark.parametrize("argv, value", [
    (["info", "--img-size", "0"], "'0'"),
    (["info", "--img-size", "-5"], "'-5'"),
    (["bench", "--batch-size", "0"], "'0'"),
    (["bench", "--batch-sizes", "32,0"], "'32,0'"),
    (["bench", "--repeats", "0"], "'0'"),
    (["eval", "--checkpoint", "m.safetensors", "--keep-ratio", ","], "','"),
    (["eval", "--checkpoint", "m.safetensors", "--num-workers", "-1"], "'-1'"),
    (["eval", "--checkpoint", "m.safetensors", "--batch-size", "0"], "'0'"),
    (["visualize", "--output", "o", "--std", "0"], "'0'"),
    (["visualize", "--output", "o", "--std", "0.2,0,0.2"], "'0.2,0,0.2'"),
    (["visualize", "--output", "o", "--img-size", "0"], "'0'"),
    (["flops", "--img-size", "0"], "'0'"),
    (["flops", "--prune-locs", ","], "','"),
    (["demo", "--epochs", "0"], "'0'"),
    (["demo", "--workers", "-2"], "'-2'"),
])
def test_invalid_values_are_usage_errors_naming_the_value(capsys, argv, value):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    line = one_error_line(err, argv[0])
    assert line.startswith(f"dynamicvit {argv[0]}: error: argument") and value in line


@pytest.mark.parametrize("kwargs, match", [
    (dict(keep_ratio=True), "keep_ratio must be a number in \\(0, 1\\], got True"),
    (dict(prune_locs=(True, 3)), "prune_locs must be a sequence of block indices \\(integers\\), got \\(True, 3\\)"),
    (dict(prune_locs=[np.int64(1), np.bool_(True)]), "prune_locs must be"),
])
def test_api_refuses_booleans_that_would_read_as_numbers(kwargs, match):
    with pytest.raises(dynamicvit.ConfigError, match=match):
        tiny_model(**kwargs)


def test_info_with_a_valid_size_and_model_kwargs(capsys):
    code, out, _ = run_cli(capsys, "info", "--model", "vit_tiny_patch16_224", "--img-size", "64",
                           "--model-kwargs", "patch_size=8,depth=8")
    assert code == 0 and "grid 8x8 = 64 patch tokens" in out and "8 blocks" in out


@pytest.mark.parametrize("command", ["bench", "demo", "train"])
def test_output_that_is_a_file_is_one_line_before_any_work(tmp_path, capsys, command):
    taken = tmp_path / "taken"
    taken.write_text("user data")
    code, _, err = run_cli(capsys, command, "--output", taken, *(["--model", "vit_tiny_patch16_224"] if command == "train" else []))
    assert code == 2 and f"error: --output {taken} is a file" in one_error_line(err, command)
    assert taken.read_text() == "user data"


# -- item 10: one spelling for every command that builds a model ---------------------------------


@pytest.mark.parametrize("command", ["train", "eval", "visualize", "flops", "bench", "info"])
def test_every_model_command_takes_model_kwargs(command):
    import argparse
    import importlib

    parser = argparse.ArgumentParser()
    importlib.import_module(f"dynamicvit.commands.{command}").add_arguments(parser)
    flags = {s for a in parser._actions for s in a.option_strings}
    assert {"--model-kwargs", "--timm-kwargs"} <= flags


def test_readme_names_the_files_train_writes():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "last.pt`" not in readme and "last.pt " not in readme
    assert "`last.pth`" in readme


# -- item 11: plain progress lines when stderr is not a terminal; python -m dynamicvit ----------


def test_progress_is_plain_lines_in_a_log_file(monkeypatch, caplog):
    import logging

    from dynamicvit import progress

    monkeypatch.setattr(progress, "LINE_INTERVAL_S", 0.0)
    with caplog.at_level(logging.INFO, logger="dynamicvit.progress"):
        bar = progress.progress_bar(total=4, desc="epoch 1/2", unit="step")
        for _ in range(4):
            bar.update(1)
            bar.set_postfix({"loss": "0.5"})
        bar.close()
        assert list(progress.progress_bar(range(3), desc="eval")) == [0, 1, 2]
    assert not isinstance(bar, __import__("tqdm").tqdm)  # pytest's stderr is not a terminal
    lines = [r.getMessage() for r in caplog.records]
    assert "epoch 1/2: 4/4 (100%)" in lines[3] and lines[3].endswith("loss=0.5")
    assert not any("\r" in line for line in lines)


@pytest.mark.slow  # a fresh interpreter imports torch and timm: ~10 s on a busy machine
def test_python_dash_m_runs_the_cli(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "dynamicvit", "info", "--model", "vit_tiny_patch16_224", "--img-size", "64"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and "grid 4x4 = 16 patch tokens" in done.stdout, done.stderr


@pytest.mark.parametrize("command", ["train", "demo", "bench"])
def test_output_under_proc_is_one_line(capsys, command):
    code, _, err = run_cli(capsys, command, "--output", "/proc/dynamicvit-run/x",
                           *(["--model", "vit_tiny_patch16_224"] if command == "train" else []))
    assert code == 2
    assert one_error_line(err, command).startswith(f"dynamicvit {command}: error: --output /proc/dynamicvit-run/x cannot be written")


def test_demo_refuses_the_held_target_without_merged_tokens_before_it_writes(tmp_path, capsys):
    out = tmp_path / "demo"
    code, _, err = run_cli(capsys, "demo", "--token-target", "held", "--output", out)
    assert code == 2
    assert "'held' is the target of merged tokens: add --merge-dropped" in one_error_line(err, "demo")
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("flag", ["--json", "--markdown", "--plot"])
def test_bench_output_files_are_checked_before_timing(tmp_path, capsys, flag):
    code, _, err = run_cli(capsys, "bench", flag, tmp_path)  # a folder where a file belongs
    assert code == 2 and f"error: {flag} {tmp_path} is a folder" in one_error_line(err, "bench")
    code, _, err = run_cli(capsys, "bench", flag, "/proc/nowhere/bench.out")
    assert code == 2 and f"error: {flag} /proc/nowhere cannot be written" in one_error_line(err, "bench")


def test_a_closed_output_pipe_is_not_a_traceback(monkeypatch, capsys):
    from dynamicvit.commands import info

    def reader_went_away(args):
        raise BrokenPipeError(32, "Broken pipe")  # what `dynamicvit eval --json | head -1` raises

    monkeypatch.setattr(info, "run", reader_went_away)
    code, _, err = run_cli(capsys, "info")
    assert code == 141 and err == ""


# -- training config files and evaluation batches that do not fit ---------------------------------


@pytest.mark.parametrize("content, words", [
    ("model: vit_tiny_patch16_224\nepochs: 2\ndataset: caf\xe9\n".encode("latin-1"), "is not UTF-8 text (byte 0xe9"),
    (b"model: vit_tiny_patch16_224\ntimm_kwargs: {pretrained: true}\n", "timm_kwargs may not set pretrained"),
    (b"timm_kwargs:\n  checkpoint_path: /etc/passwd\n", "timm_kwargs may not set checkpoint_path"),
])
def test_a_config_file_that_cannot_be_used_is_one_line(tmp_path, capsys, content, words):
    path = tmp_path / "run.yaml"
    path.write_bytes(content)
    code, _, err = run_cli(capsys, "train", "--config", path, "--output", tmp_path / "out")
    assert code == 2 and words in one_error_line(err, "train"), err
    assert not (tmp_path / "out").exists()


def test_timm_kwargs_that_would_download_are_refused_in_a_config():
    from dynamicvit.errors import ConfigError
    from dynamicvit.training.config import TrainConfig

    with pytest.raises(ConfigError, match=r"timm_kwargs may not set pretrained: use the setting `pretrained: true`"):
        TrainConfig.from_dict({"model": "vit_tiny_patch16_224", "timm_kwargs": {"pretrained": True}})


@pytest.mark.parametrize("message", [
    "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate "
    "98784247808 bytes. Error code 12 (Cannot allocate memory)",
    "CUDA out of memory. Tried to allocate 90.00 GiB. GPU 0 has a total capacity of 139.72 GiB",
])
def test_eval_out_of_memory_names_the_batch_size_to_lower(tmp_path, capsys, monkeypatch, message):
    import dynamicvit.evaluate

    root = tmp_path / "data"
    for label in ("a", "b"):
        (root / "val" / label).mkdir(parents=True)
        Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(root / "val" / label / "0.png")
    ckpt = dynamicvit.save_model(tiny_model(num_classes=2), tmp_path / "m.safetensors")

    def out_of_memory(*args, **kwargs):
        raise RuntimeError(message)

    monkeypatch.setattr(dynamicvit.evaluate, "evaluate", out_of_memory)
    code, _, err = run_cli(capsys, "eval", "--checkpoint", ckpt, "--dataset", root, "--batch-size", "100000",
                           "--num-workers", "0", "--device", "cpu")
    line = one_error_line(err, "eval")
    assert code == 2 and "out of memory evaluating batches of 100000 images" in line
    assert "lower --batch-size, e.g. --batch-size 12500" in line
