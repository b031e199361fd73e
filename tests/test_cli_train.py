"""`dynamicvit train` and `dynamicvit eval`: flags, config files, clear errors, and a Fashion-MNIST run."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest

from dynamicvit.cli import main
from dynamicvit.commands import train as train_cmd
from dynamicvit.training.config import TrainConfig

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
TINY = '{"patch_size": 7, "embed_dim": 32, "depth": 4, "num_heads": 2, "global_pool": "avg"}'



def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    train_cmd.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_every_setting_has_a_flag():
    parser = argparse.ArgumentParser()
    train_cmd.add_arguments(parser)
    dests = {a.dest for a in parser._actions}
    for f in dataclasses.fields(TrainConfig):
        assert f.name in dests, f.name
        assert f.name in train_cmd.FLAG_HELP, f"no help for --{f.name.replace('_', '-')}"


def test_flags_win_over_the_config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: deit_tiny_patch16_224\nepochs: 3\nlr: 0.002\nmixup: 0.0\ntimm_kwargs: {drop_path_rate: 0.1}\n")
    cfg = train_cmd.config_from_args(parse("--config", str(path), "--epochs", "5", "--prune-locs", "2,4,6", "--ema",
                                           "--no-progress", "--resume"))
    assert cfg.model == "deit_tiny_patch16_224" and cfg.lr == 0.002 and cfg.mixup == 0.0  # from the file
    assert cfg.epochs == 5 and cfg.prune_locs == [2, 4, 6] and cfg.ema is True  # flags
    assert cfg.progress is False and cfg.resume is True
    assert cfg.timm_kwargs == {"drop_path_rate": 0.1}
    assert cfg.cutmix == TrainConfig().cutmix  # neither: the default
    cfg = train_cmd.config_from_args(parse("--resume", "x/last.pth", "--timm-kwargs", '{"img_size": 64}'))
    assert cfg.resume == "x/last.pth" and cfg.timm_kwargs == {"img_size": 64}


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_missing_dataset_path(tmp_path, capsys):
    code, text = _run(capsys, "train", "--dense", "--model", "vit_tiny_patch16_224", "--dataset", str(tmp_path / "nowhere"),
                      "--output", str(tmp_path / "run"))
    assert code == 2
    assert "nowhere" in text and "ImageFolder" in text
    code, text = _run(capsys, "eval", "--checkpoint", str(tmp_path / "m.safetensors"), "--dataset", str(tmp_path / "nowhere"))
    assert code == 2 and "nowhere" in text


def test_unknown_model(tmp_path, capsys):
    code, text = _run(capsys, "train", "--dense", "--model", "vit_tinny_patch16_224", "--output", str(tmp_path / "run"))
    assert code == 2
    assert "unknown timm model 'vit_tinny_patch16_224'" in text and "did you mean" in text
    code, text = _run(capsys, "train", "--output", str(tmp_path / "run"))
    assert code == 2 and "--model" in text


def test_unreadable_checkpoints(tmp_path, capsys):
    garbage = tmp_path / "teacher.pth"
    garbage.write_bytes(b"\x00\x01not a checkpoint at all" * 10)
    code, text = _run(capsys, "train", "--teacher", str(garbage), "--model", "vit_tiny_patch16_224", "--output", str(tmp_path / "run"))
    assert code == 2
    assert "cannot read checkpoint" in text and str(garbage) in text
    code, text = _run(capsys, "train", "--teacher", str(tmp_path / "absent.pth"), "--model", "vit_tiny_patch16_224")
    assert code == 2 and "no checkpoint at" in text
    code, text = _run(capsys, "eval", "--checkpoint", str(garbage), "--dataset", "fashion-mnist")
    assert code == 2 and "cannot read checkpoint" in text  # read before any image is


def test_bad_config_file(tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"model": "vit_tiny_patch16_224", "epoch": 3}))
    code, text = _run(capsys, "train", "--config", str(path))
    assert code == 2 and "epoch (did you mean epochs?)" in text
    code, text = _run(capsys, "train", "--config", str(tmp_path / "none.yaml"))
    assert code == 2 and "not found" in text


@pytest.mark.slow
@pytest.mark.fashion_mnist
@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason=f"Fashion-MNIST not installed in {FASHION_MNIST} (apt-get install dataset-fashion-mnist)")
def test_train_dense_then_dynamicvit_then_eval(tmp_path, capsys):
    common = ["--dataset", "fashion-mnist", "--subset", "256", "--val-subset", "128", "--batch-size", "32", "--num-workers", "0",
              "--device", "cpu", "--no-progress", "--no-tensorboard", "--mixup", "0", "--cutmix", "0"]
    code, text = _run(capsys, "train", "--dense", "--model", "vit_tiny_patch16_224", "--timm-kwargs", TINY, "--epochs", "1",
                      "--lr", "0.01", "--warmup-epochs", "0.2", "--output", str(tmp_path / "dense"), *common)
    assert code == 0, text
    assert "model:" in text and "val top1" in text
    teacher = tmp_path / "dense" / "model.safetensors"
    code, text = _run(capsys, "train", "--teacher", str(teacher), "--epochs", "1", "--freeze-backbone-epochs", "0",
                      "--keep-ratio", "0.5", "--lr", "0.01", "--output", str(tmp_path / "dyn"), *common)
    assert code == 0, text
    assert "keep1" in text
    code, text = _run(capsys, "eval", "--checkpoint", str(tmp_path / "dyn" / "model.safetensors"), "--keep-ratio", "0.5,1.0",
                      "--subset", "64", "--device", "cpu", "--num-workers", "0", "--json")
    assert code == 0, text
    report = json.loads(text[text.index("{"):])
    rows = report["results"]
    assert [r["keep_ratio"] for r in rows] == [0.5, 1.0]
    assert all(r["images"] == 64 and 0 <= r["top1"] <= r["top5"] <= 100 for r in rows)
    assert rows[0]["keep_counts"] == [8, 4, 2]  # 16 patch tokens: int(16 * 0.5^s)
    if rows[0]["gmacs"] is not None:  # dynamicvit.flops present
        assert rows[0]["gmacs"] < rows[1]["gmacs"]
