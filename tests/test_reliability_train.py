"""Run safety: an earlier run is never clobbered, faults leave no litter and no repeated logs, unreadable
images are skipped by path, evaluation never costs a checkpoint, SIGTERM stops with a checkpoint that
resumes exactly, and the output folder is checked before training."""
from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

import dynamicvit
import dynamicvit.training.loop as train_mod
import dynamicvit.training.state as state_mod
from dynamicvit.cli import main
from dynamicvit.errors import ConfigError, DataError, OutputError, TrainingStopped
from dynamicvit.training.loop import train
from dynamicvit.training.safety import ResumableSampler
from test_train import MICRO, config, state, synthetic


def metric_steps(out: Path) -> list[tuple[str, int]]:
    return [(row["kind"], row["step"]) for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def same_weights(a: Path, b: Path) -> None:
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# -- item 3: an earlier run is resumed or refused, never clobbered -------------------------------


def test_a_second_run_without_resume_is_refused_and_changes_nothing(tmp_path, capsys):
    cfg = config(tmp_path, epochs=1, max_steps_per_epoch=2, log_every=1)
    train(cfg, train_set=synthetic(16), val_set=None)
    out = Path(cfg.output)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"}
    with pytest.raises(ConfigError, match=r"earlier run \(last.pth, model.safetensors\).*--resume.*--overwrite"):
        train(config(tmp_path, epochs=1, max_steps_per_epoch=2, log_every=1), train_set=synthetic(16), val_set=None)
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"}
    assert after == before
    # --overwrite replaces it, and the metrics start afresh instead of being appended.
    train(config(tmp_path, epochs=1, max_steps_per_epoch=2, log_every=1, overwrite=True, seed=1),
          train_set=synthetic(16), val_set=None)
    assert metric_steps(out) == [("train", 1), ("train", 2), ("epoch", 2)]
    assert not torch.equal(state(out / "model.safetensors")["predictors.0.out_conv.2.weight"],
                           dynamicvit.weights.formats.read_checkpoint(_bytes_file(tmp_path, before["model.safetensors"]))[0]["predictors.0.out_conv.2.weight"])
    with pytest.raises(ConfigError, match="--overwrite.*--resume"):
        config(tmp_path, overwrite=True, resume=True).validate()
    # --resume with the model file but no checkpoint to resume from: refused too, saying why.
    (out / "last.pth").unlink()
    with pytest.raises(ConfigError, match=r"earlier run \(model.safetensors\) but no last.pth to resume it from"):
        train(config(tmp_path, epochs=1, max_steps_per_epoch=2, resume=True), train_set=synthetic(16), val_set=None)
    assert (out / "model.safetensors").exists()


def test_resuming_another_folders_checkpoint_into_a_run_folder_is_refused(tmp_path):
    train(config(tmp_path, epochs=1, max_steps_per_epoch=1, output=str(tmp_path / "a")), train_set=synthetic(8), val_set=None)
    train(config(tmp_path, epochs=1, max_steps_per_epoch=1, output=str(tmp_path / "b")), train_set=synthetic(8), val_set=None)
    before = (tmp_path / "b" / "last.pth").read_bytes()
    with pytest.raises(ConfigError, match=r"b holds an earlier run .*resuming .*a/last.pth there would replace it"):
        train(config(tmp_path, epochs=2, max_steps_per_epoch=1, output=str(tmp_path / "b"), resume=str(tmp_path / "a" / "last.pth")),
              train_set=synthetic(8), val_set=None)
    assert (tmp_path / "b" / "last.pth").read_bytes() == before
    # Resuming a folder's own checkpoint by its path is the same as --resume.
    done = train(config(tmp_path, epochs=2, max_steps_per_epoch=1, output=str(tmp_path / "b"),
                        resume=str(tmp_path / "b" / "last.pth")), train_set=synthetic(8), val_set=None)
    assert len(done.history) == 2


def _bytes_file(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "copy.safetensors"
    path.write_bytes(data)
    return path


def test_train_cli_refuses_an_earlier_run_in_one_line_and_takes_model_kwargs(tmp_path, capsys):
    teacher = tmp_path / "teacher.safetensors"
    config(tmp_path)  # writes the teacher
    args = ["train", "--teacher", str(teacher), "--output", str(tmp_path / "run"), "--epochs", "1",
            "--batch-size", "4", "--max-steps-per-epoch", "1", "--mixup", "0", "--cutmix", "0", "--num-workers", "0",
            "--device", "cpu", "--no-progress", "--no-tensorboard", "--dataset", "fashion-mnist",
            "--model-kwargs", "drop_path_rate=0.0"]
    # The dataset is Fashion-MNIST only if installed; the flags are what this test is about.
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("needs the Fashion-MNIST package")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pth").write_bytes(b"an earlier run")
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2
    assert [line for line in err.splitlines() if "error" in line] == [
        f"dynamicvit train: error: {tmp_path / 'run'} holds an earlier run (last.pth); pass --resume to continue it, "
        "--overwrite to replace it, or choose another --output"
    ]
    assert (tmp_path / "run" / "last.pth").read_bytes() == b"an earlier run"


# -- item 7: no litter, no repeated log lines after a resume -------------------------------------


def test_stale_temp_files_are_removed_and_resumed_logs_do_not_repeat(tmp_path, monkeypatch):
    cfg = config(tmp_path, epochs=3, max_steps_per_epoch=2, log_every=1)
    real_save = state_mod.save_checkpoint
    saves = []

    def killed_during_second_write(path, ckpt):
        saves.append(path)
        if len(saves) == 2:  # a kill mid-write: the temporary file stays, last.pth is the first epoch's
            (Path(path).parent / f".{Path(path).name}.abc123.tmp").write_bytes(b"half")
            raise KeyboardInterrupt
        real_save(path, ckpt)

    monkeypatch.setattr(state_mod, "save_checkpoint", killed_during_second_write)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, train_set=synthetic(16), val_set=None)
    out = Path(cfg.output)
    assert (out / ".last.pth.abc123.tmp").exists()
    assert metric_steps(out)[-1] == ("epoch", 4)  # logged, but its checkpoint never landed
    monkeypatch.setattr(state_mod, "save_checkpoint", real_save)
    train(config(tmp_path, epochs=3, max_steps_per_epoch=2, log_every=1, resume=True), train_set=synthetic(16), val_set=None)
    assert not list(out.glob(".*.tmp"))
    steps = metric_steps(out)
    assert steps == [("train", 1), ("train", 2), ("epoch", 2), ("train", 3), ("train", 4), ("epoch", 4),
                     ("train", 5), ("train", 6), ("epoch", 6)]


# -- item 2: unreadable images are skipped by path (or stop the run before training) -------------


@pytest.fixture
def image_folder(tmp_path) -> Path:
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    good = (root / "train" / "a" / "0.png").read_bytes()
    (root / "train" / "b" / "bad.png").write_bytes(good[:60])  # truncated
    (root / "val" / "a" / "bad.jpg").write_bytes(b"not an image")
    return root


def folder_config(tmp_path, root, **changes):
    return config(tmp_path, teacher=None, dense=True, model="vit_tiny_patch16_224", dataset=str(root),
                  timm_kwargs={**MICRO, "num_classes": 2}, epochs=1, batch_size=4, augment={"no_aug": True}, **changes)


def test_unreadable_images_are_skipped_by_path_and_counted(tmp_path, image_folder, caplog, capsys):
    with caplog.at_level(logging.WARNING):
        result = train(folder_config(tmp_path, image_folder), train_set=None)
    row = result.history[-1]
    assert row["unreadable_images"] == 1  # the truncated training image, once in the epoch
    assert row["val_unreadable"] == 1 and row["val_images"] == 8
    assert str(image_folder / "train" / "b" / "bad.png") in caplog.text
    assert str(image_folder / "val" / "a" / "bad.jpg") in caplog.text
    # eval skips it too, and says so.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        code = main(["eval", "--checkpoint", str(result.checkpoint), "--dataset", str(image_folder), "--device", "cpu",
                     "--num-workers", "0", "--json"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert rows[0]["unreadable"] == 1 and rows[0]["images"] == 8
    assert str(image_folder / "val" / "a" / "bad.jpg") in caplog.text
    # visualize draws the readable samples of the dataset and names the unreadable one.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        code = main(["visualize", "--model", "vit_tiny_patch16_224", "--model-kwargs", "patch_size=4,img_size=16,depth=4,embed_dim=24,num_heads=2",
                     "--dataset", str(image_folder), "--num-samples", "0", "--output", str(tmp_path / "pictures"), "--device", "cpu"])
    assert code == 0 and len(list((tmp_path / "pictures").glob("*.png"))) == 8
    assert str(image_folder / "val" / "a" / "bad.jpg") in caplog.text


def test_bad_images_abort_stops_before_training(tmp_path, image_folder):
    cfg = folder_config(tmp_path, image_folder, bad_images="abort")
    with pytest.raises(DataError, match=r"2 unreadable image\(s\): .*train/b/bad\.png .*val/a/bad\.jpg .*--bad-images skip"):
        train(cfg, train_set=None)
    assert not (Path(cfg.output) / "last.pth").exists()


def test_an_evaluation_failure_keeps_the_epochs_checkpoint(tmp_path, monkeypatch):
    cfg = config(tmp_path, epochs=2, max_steps_per_epoch=1)

    def broken(*args, **kwargs):
        raise OSError("the validation disk went away")

    monkeypatch.setattr(train_mod, "evaluate", broken)
    with pytest.raises(OSError, match="went away"):
        train(cfg, train_set=synthetic(8), val_set=synthetic(8, seed=1))
    ckpt = torch.load(Path(cfg.output) / "last.pth", weights_only=True)
    assert ckpt["epoch"] == 1  # the trained epoch is kept; --resume goes on with epoch 2


# -- SIGTERM / SIGINT: stop with a checkpoint; --resume continues exactly ------------------------


class SignalAt(Dataset):
    """A dataset that sends `signum` to this process when item `index` is read (num_workers=0)."""

    def __init__(self, base: Dataset, index: int, signum: int):
        self.base, self.index, self.signum, self.armed = base, index, signum, True

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        if self.armed and i == self.index:
            self.armed = False
            os.kill(os.getpid(), self.signum)
        return self.base[i]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_with_a_checkpoint_that_resumes_exactly(tmp_path, signum):
    common = dict(epochs=2, max_steps_per_epoch=3, mixup=0.8, cutmix=1.0, clip_grad=1.0, log_every=1)
    data, val = synthetic(24), synthetic(8, seed=1)
    full = train(config(tmp_path, output=str(tmp_path / "full"), **common), train_set=data, val_set=val)

    # Which sample the sampler reads first in epoch 1's second batch: the signal comes mid-epoch.
    order = list(ResumableSampler(data, num_replicas=1, rank=0, shuffle=True, seed=0, drop_last=True))
    with pytest.raises(TrainingStopped) as stopped:
        train(config(tmp_path, output=str(tmp_path / "split"), **common), train_set=SignalAt(data, order[8], signum), val_set=val)
    assert stopped.value.signum == signum
    ckpt = torch.load(tmp_path / "split" / "last.pth", weights_only=True)
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == (0, 2)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored

    resumed = train(config(tmp_path, output=str(tmp_path / "split"), resume=True, **common), train_set=data, val_set=val)
    same_weights(full.checkpoint, resumed.checkpoint)
    drop_time = lambda h: [{k: v for k, v in row.items() if k != "epoch_time_s"} for row in h]  # noqa: E731
    assert drop_time(full.history) == drop_time(resumed.history)
    assert metric_steps(tmp_path / "split") == metric_steps(tmp_path / "full")


def test_cli_reports_a_stop_and_exits_with_128_plus_the_signal(tmp_path, monkeypatch, capsys):
    def stopped(cfg):
        raise TrainingStopped("stopped by SIGTERM at epoch 1, step 2; checkpoint x/last.pth (--resume continues from it)",
                              signum=signal.SIGTERM)

    monkeypatch.setattr(train_mod, "train", stopped)
    code = main(["train", "--model", "vit_tiny_patch16_224", "--output", str(tmp_path / "r")])
    assert code == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in capsys.readouterr().err


# -- pre-flight: the output folder is writable and has room for two checkpoints ----------------


def test_no_room_for_two_checkpoints_fails_before_training(tmp_path, monkeypatch):
    import shutil

    import dynamicvit.files as outputs

    real = shutil.disk_usage
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda p: real(p)._replace(free=100_000))
    cfg = config(tmp_path, epochs=1, max_steps_per_epoch=1)
    trained = []
    monkeypatch.setattr(train_mod, "run_epoch", lambda *a, **k: trained.append(1))
    with pytest.raises(OutputError, match=r"0\.1 MB free.*two checkpoints of this model \(\d+\.\d MB each\)"):
        train(cfg, train_set=synthetic(8), val_set=None)
    assert not trained and not (Path(cfg.output) / "last.pth").exists()


def test_an_output_that_is_a_file_fails_before_anything_is_read(tmp_path):
    (tmp_path / "taken").write_text("user data")
    with pytest.raises(OutputError, match="--output .*taken is a file"):
        train(config(tmp_path, output=str(tmp_path / "taken")), train_set=synthetic(8))
    assert (tmp_path / "taken").read_text() == "user data"


def test_a_full_disk_during_a_checkpoint_write_is_one_line_and_keeps_the_last_one(tmp_path, monkeypatch, capsys):
    import errno

    real_save = torch.save
    calls = []

    def full_disk(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OutputError, match=r"cannot write .*last.pth: no space left on the device; the previous file is intact"):
        train(config(tmp_path, epochs=2, max_steps_per_epoch=1), train_set=synthetic(8), val_set=None)
    assert torch.load(tmp_path / "run" / "last.pth", weights_only=True)["epoch"] == 1


def test_a_second_run_in_the_same_folder_at_the_same_time_is_refused(tmp_path):
    from dynamicvit.files import RunLock

    (tmp_path / "run").mkdir()
    with RunLock(tmp_path / "run"):
        with pytest.raises(OutputError, match=f"in use by a running job \\(pid {os.getpid()}\\)"):
            train(config(tmp_path), train_set=synthetic(8))
