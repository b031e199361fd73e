"""The demo: end to end in quick mode, its report, its output-folder rules, its teacher asset."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

import dynamicvit
from dynamicvit import cli
from dynamicvit.data import FASHION_MNIST_SYSTEM_DIR
from dynamicvit.demo import (
    MARKER, REPORT, TEACHER_ASSET, DemoConfig, fine_tune_config, prepare_output, run_demo, save_sweep_plot,
    shipped_single_ratio_sweep,
)
from dynamicvit.errors import ConfigError, DataError

from test_data import fake_fmnist

HAVE_FMNIST = (FASHION_MNIST_SYSTEM_DIR / "t10k-images-idx3-ubyte.gz").is_file()


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNAMICVIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def tiny_teacher(tmp_path) -> Path:
    """A small dense ViT for 28 px grayscale images (untrained: the demo's plumbing is under test)."""
    torch.manual_seed(0)
    kw = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=4, num_heads=2, global_pool="token")
    model = timm.create_model("vit_tiny_patch16_224", **kw)
    model.dynamicvit_timm_kwargs = kw
    return dynamicvit.save_model(model, tmp_path / "teacher.safetensors")


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """Fake Fashion-MNIST files (random pixels) so the demo runs where the Debian package is absent."""
    folder = tmp_path / "fmnist"
    fake_fmnist(folder, n_train=160, n_test=60)
    return folder


def check_report(report: dict, test_images: int) -> None:
    for side in ("dense", "dynamic"):
        row = report[side]
        for key in ("top1", "gmacs", "images_per_s"):
            assert isinstance(row[key], float), (side, key)
        assert 0.0 <= row["top1"] <= 100.0
        assert row["images_per_s"] > 0
    assert report["dynamic"]["keep_ratio"] == 0.7
    assert report["dataset"]["test_images"] == test_images
    # Fewer MACs at keep ratio 0.7 (prediction modules included): 34/24/16 of 49 tokens after the stages.
    assert report["dynamic"]["keep_counts"] == [34, 24, 16]
    assert report["dynamic"]["gmacs"] < 0.8 * report["dense"]["gmacs"]
    reduction = 1 - report["dynamic"]["gmacs"] / report["dense"]["gmacs"]
    assert report["comparison"]["macs_reduction"] == pytest.approx(reduction)
    assert [r["keep_ratio"] for r in report["sweep"]] == [1.0, 0.7, 0.5]
    assert report["sweep"][0]["gmacs"] > report["sweep"][1]["gmacs"] > report["sweep"][2]["gmacs"]


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path, tiny_teacher, data_dir, capsys):
    out = tmp_path / "demo-out"
    code = cli.main(["demo", "--quick", "--teacher", str(tiny_teacher), "--data", str(data_dir), "--output", str(out),
                     "--no-progress", "--threads", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "dense ViT" in printed and "DynamicViT 0.7" in printed and "QUICK MODE" in printed

    report = json.loads((out / REPORT).read_text())
    check_report(report, test_images=60)
    assert report["quick"] is True
    assert report["dynamic"]["prune_locs"] == [1, 2, 3]  # evenly spaced for a 4-block teacher of the user's
    for name in ("kept_tokens", "keep_ratio_sweep"):
        with Image.open(report["pictures"][name]) as im:
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    # The fine-tuned model is a loadable DynamicViT at the demo's keep ratio.
    model = dynamicvit.load_model(report["dynamic"]["checkpoint"])
    assert isinstance(model, dynamicvit.DynamicViT) and model.keep_ratio == 0.7

    # Elastic and fused by default: both recorded with the model; no single-ratio curve for a user's teacher.
    assert report["dynamic"]["keep_ratios"] == "low:0.4:1.0" and model.keep_ratio_range == (0.4, 1.0)
    assert report["training"]["config"]["clip_grad"] == 1.0
    assert report["dynamic"]["fuse_dropped"] is True and model.fuse_dropped
    assert report["sweep_single_ratio"] is None

    # A second run into the same folder replaces the demo's own files; this one discards the dropped
    # tokens and fine-tunes the single-ratio model too, for the plot.
    before = (out / REPORT).stat().st_mtime_ns
    assert cli.main(["demo", "--quick", "--teacher", str(tiny_teacher), "--data", str(data_dir), "--output", str(out),
                     "--no-progress", "--threads", "1", "--keep-ratios", "0.4:1.0", "--no-fuse-dropped",
                     "--compare-single-ratio"]) == 0
    assert (out / REPORT).stat().st_mtime_ns != before
    report = json.loads((out / REPORT).read_text())
    assert report["dynamic"]["fuse_dropped"] is False and not dynamicvit.load_model(report["dynamic"]["checkpoint"]).fuse_dropped
    single = report["sweep_single_ratio"]
    assert single["source"].startswith("fine-tuned in this run")
    assert [r["keep_ratio"] for r in single["rows"]] == [r["keep_ratio"] for r in report["sweep"]]
    single_model = dynamicvit.load_model(out / "finetune-single-ratio" / "model.safetensors")
    assert single_model.keep_ratio_range is None and not single_model.fuse_dropped


@pytest.mark.slow
@pytest.mark.fashion_mnist
@pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
@pytest.mark.skipif(not TEACHER_ASSET.is_file(), reason="the teacher asset is not built (bash scripts/train_teacher.sh)")
def test_quick_demo_with_shipped_teacher(tmp_path):
    report = run_demo(DemoConfig.quick_mode(output=str(tmp_path / "out"), progress=False, threads=1))
    check_report(report, test_images=500)
    assert report["dynamic"]["prune_locs"] == [2, 3, 4]  # the stages tuned for the shipped teacher
    # The shipped teacher is trained: far above chance on real test images.
    assert report["dense"]["top1"] > 80.0


def test_the_sweep_plot_shows_the_shipped_single_ratio_curve(tmp_path):
    cfg = DemoConfig(keep_ratios="0.4:1.0", fuse_dropped=True)
    sweep = [{"keep_ratio": r, "top1": 88.0 - (1 - r) * 5, "macs": r * 17e6} for r in cfg.sweep]
    single = shipped_single_ratio_sweep(cfg, TEACHER_ASSET, sweep)
    assert single["source"].startswith("shipped measurement")
    assert [r["keep_ratio"] for r in single["rows"]] == list(cfg.sweep)
    assert single["rows"][-1]["top1"] == 78.64  # the cliff at 0.4 that elastic training is for
    # Not for another teacher, a subset of the test set, or a run that trains the single-ratio model itself.
    assert shipped_single_ratio_sweep(dataclasses.replace(cfg, teacher="mine.pth"), TEACHER_ASSET, sweep) is None
    assert shipped_single_ratio_sweep(dataclasses.replace(cfg, test_images=500), TEACHER_ASSET, sweep) is None
    assert shipped_single_ratio_sweep(DemoConfig.single_ratio(), TEACHER_ASSET, sweep) is None  # trains that model
    assert shipped_single_ratio_sweep(DemoConfig(), TEACHER_ASSET, sweep) == single  # the default is elastic
    dense = {"top1": 88.97, "macs": 16.7e6}
    path = save_sweep_plot(sweep, dense, 0.7, tmp_path / "plot.png", label="elastic 0.4:1.0", single_ratio=single)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 600


def test_demo_flags_select_the_recipe():
    from dynamicvit.commands import demo as demo_cmd
    import argparse

    parser = argparse.ArgumentParser()
    demo_cmd.add_arguments(parser)
    # The elastic, fused recipe is the default; --single-ratio selects the paper's, whose other settings
    # follow unless given.
    default = DemoConfig(**{k: v for k, v in vars(parser.parse_args([])).items() if k in ("keep_ratios", "fuse_dropped")})
    assert (default.keep_ratios, default.fuse_dropped, default.epochs, default.clip_grad) == ("low:0.4:1.0", True, 6, 1.0)
    single = parser.parse_args(["--keep-ratios", "0.4:1.0", "--single-ratio"])
    assert single.keep_ratios is None and single.fuse_dropped is None
    paper = DemoConfig(keep_ratios=single.keep_ratios, fuse_dropped=single.fuse_dropped)
    assert (paper.fuse_dropped, paper.epochs, paper.clip_grad) == (False, 4, 0.0) and paper == DemoConfig.single_ratio()
    assert DemoConfig.single_ratio(fuse_dropped=True, epochs=2, clip_grad=0.5).fuse_dropped
    assert parser.parse_args(["--no-fuse-dropped"]).fuse_dropped is False
    assert parser.parse_args(["--keep-ratios", "0.5,0.7"]).keep_ratios == "0.5,0.7"
    assert parser.parse_args(["--clip-grad", "0"]).clip_grad == 0.0
    with pytest.raises(ConfigError, match="clip_grad must be >= 0"):
        DemoConfig(clip_grad=-1.0).validate()
    with pytest.raises(ConfigError, match="token_weight must be >= 0"):
        DemoConfig(token_weight=-0.5).validate()
    no_token = DemoConfig(token_weight=0.0)  # no token distillation is a valid recipe, and it reaches training
    no_token.validate()
    assert fine_tune_config(no_token, Path("out"), Path("teacher.safetensors"), torch.device("cpu")).token_weight == 0.0
    assert fine_tune_config(DemoConfig(), Path("out"), Path("teacher.safetensors"), torch.device("cpu")).token_weight == 0.5
    with pytest.raises(ConfigError, match="interval is empty"):
        DemoConfig(keep_ratios="0.9:0.5").validate()


def test_missing_dataset_says_what_to_install(tmp_path, tiny_teacher, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    code = cli.main(["demo", "--quick", "--teacher", str(tiny_teacher), "--data", str(empty), "--output", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "sudo apt-get install dataset-fashion-mnist" in err
    assert "--data" in err and "--download" in err
    assert not out.exists()  # nothing written before the data is found
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        run_demo(DemoConfig.quick_mode(output=str(out), data_dir=str(empty), teacher=str(tiny_teacher)))


def test_output_folder_keeps_user_files(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / REPORT).write_text("my own report")
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="never overwrites"):
        prepare_output(out)
    assert (out / REPORT).read_text() == "my own report"

    other = tmp_path / "shared"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    prepare_output(other)  # unrelated files are fine: the demo writes only its own names
    assert (other / MARKER).is_file() and (other / "notes.txt").read_text() == "keep me"
    (other / REPORT).write_text("{}")
    (other / "finetune").mkdir()
    (other / "finetune" / "metrics.jsonl").write_text("old run\n")
    prepare_output(other)  # the demo's own files from an earlier run may be replaced
    assert not (other / "finetune").exists()
    assert (other / "notes.txt").read_text() == "keep me"

    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        prepare_output(f)


def test_bad_teacher(tmp_path, data_dir):
    with pytest.raises(dynamicvit.CheckpointError, match="no such file"):
        run_demo(DemoConfig.quick_mode(output=str(tmp_path / "o"), data_dir=str(data_dir), teacher=str(tmp_path / "nope.pth")))
    rgb = timm.create_model("vit_tiny_patch16_224", img_size=28, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=10)
    path = dynamicvit.save_model(rgb, tmp_path / "rgb.safetensors")
    with pytest.raises(ConfigError, match="1 channel"):
        run_demo(DemoConfig.quick_mode(output=str(tmp_path / "o"), data_dir=str(data_dir), teacher=str(path)))


@pytest.mark.skipif(not TEACHER_ASSET.is_file(), reason="the teacher asset is not built (bash scripts/train_teacher.sh)")
def test_teacher_asset():
    assert TEACHER_ASSET.stat().st_size < 5_000_000
    meta = json.loads(TEACHER_ASSET.with_suffix(".json").read_text())
    assert meta["sha256"] == hashlib.sha256(TEACHER_ASSET.read_bytes()).hexdigest()
    assert "dynamicvit train --dense" in meta["command"]
    model = dynamicvit.load_model(TEACHER_ASSET)
    assert not isinstance(model, dynamicvit.DynamicViT)
    assert model.patch_embed.proj.in_channels == 1 and model.num_classes == 10
    assert tuple(model.patch_embed.img_size) == (28, 28)
    assert sum(p.numel() for p in model.parameters()) == meta["params"]
    # Three evenly spaced stages at keep ratio 0.7 cut at least 30% of the MACs, predictors included.
    from dynamicvit.runtime.flops import count_macs

    dense, sparse = count_macs(model), count_macs(dynamicvit.sparsify(model, 0.7))
    assert 1 - sparse.total / dense.total >= 0.30


@pytest.mark.fashion_mnist
@pytest.mark.skipif(not (HAVE_FMNIST and TEACHER_ASSET.is_file()), reason="needs Fashion-MNIST and the teacher asset")
def test_teacher_asset_accuracy_matches_its_description():
    """The shipped teacher classifies real test images as well as its description says."""
    from dynamicvit.data import build_dataset
    from dynamicvit.evaluate import evaluate

    meta = json.loads(TEACHER_ASSET.with_suffix(".json").read_text())
    test_set = build_dataset("fashion-mnist", "val", subset=1000, seed=0)
    loader = torch.utils.data.DataLoader(test_set, batch_size=250)
    top1 = evaluate(dynamicvit.load_model(TEACHER_ASSET), loader, "cpu")["top1"]
    # 1,000 of the 10,000 images: the standard error of top-1 is about 1 point.
    assert abs(top1 - meta["val_top1"]) < 3.5, (top1, meta["val_top1"])
