"""`train` with ConvNeXt / Swin students: the spec's objective, new parameters at the full lr, recipes."""
import argparse
import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

import dynamicvit
from dynamicvit.commands import train as train_cmd
from dynamicvit.weights.build import create_backbone
from dynamicvit.core.losses import DynamicSpatialLoss
from dynamicvit.core.spatial import DynamicSpatial
from dynamicvit.training.config import TrainConfig
from dynamicvit.training.loop import train
from dynamicvit.training.models import build_criterion, param_groups

IMG = 96
TINY = {
    "convnext_tiny": dict(depths=(1, 1, 4, 1), dims=(16, 32, 64, 128), img_size=IMG, num_classes=4),
    "swin_tiny_patch4_window7_224": dict(
        depths=(1, 1, 4, 1), embed_dim=16, num_heads=(1, 2, 4, 8), window_size=3, img_size=IMG, num_classes=4
    ),
}


def synthetic(n: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, IMG, IMG, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    x[:, :, : IMG // 2, : IMG // 2] += y.float().view(-1, 1, 1, 1) / 4
    return TensorDataset(x, y)


@pytest.mark.parametrize("name", list(TINY))
def test_fine_tuning_a_spatial_student_from_a_dense_teacher(tmp_path, name):
    torch.manual_seed(0)
    teacher = dynamicvit.save_model(create_backbone(name, **TINY[name]), tmp_path / "teacher.safetensors")
    cfg = TrainConfig(
        teacher=str(teacher), output=str(tmp_path / "run"), epochs=1, max_steps_per_epoch=2, batch_size=4,
        lr=1e-3, warmup_epochs=0, freeze_backbone_epochs=0, mixup=0.0, cutmix=0.0, num_workers=0, device="cpu",
        amp="none", progress=False, tensorboard=False, log_every=1, prune_locs=[1, 2, 3], ratio_weight=10.0,
    )
    result = train(cfg, train_set=synthetic(8), val_set=synthetic(4, seed=1))
    model = dynamicvit.load_model(result.checkpoint)
    assert isinstance(model, DynamicSpatial) and model.stage_ratios == (0.7, 0.5, 0.3)
    lines = [json.loads(s) for s in (Path(cfg.output) / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "ce", "ratio", "kl", "token", "keep1", "keep2", "keep3"} <= set(lines[0])
    assert all(0.0 <= lines[0][f"keep{s}"] <= 1.0 for s in (1, 2, 3))
    row = result.history[0]
    assert row["val_top1"] is not None and "keep_ratio_stage3" in row
    # The objective is the hierarchical one; fast paths train with the predictors at the full lr.
    assert isinstance(build_criterion(model, cfg), DynamicSpatialLoss)
    groups = param_groups(model, 0.05, 0.01)
    new = {id(p) for g in groups if g["part"] == "predictors" for p in g["params"]}
    assert {id(p) for p in model.fast_paths.parameters()} <= new
    assert {id(p) for p in model.predictors.parameters()} <= new
    assert not new & {id(p) for p in model.backbone.parameters()}


def test_recipes_fill_in_the_spatial_settings_and_flags_win(tmp_path):
    parser = argparse.ArgumentParser()
    train_cmd.add_arguments(parser)
    cfg = train_cmd.config_from_args(parser.parse_args(["--recipe", "convnext-t", "--epochs", "3"]))
    assert cfg.model == "convnext_tiny" and cfg.epochs == 3 and cfg.ratio_weight == 10.0
    assert cfg.timm_kwargs == {"drop_path_rate": 0.2} and cfg.backbone_lr_scale == 0.01 and cfg.ema
    cfg = train_cmd.config_from_args(parser.parse_args(["--recipe", "swin-b"]))
    assert cfg.model == "swin_base_patch4_window7_224" and cfg.timm_kwargs["drop_path_rate"] == 0.5
    with pytest.raises(SystemExit):
        parser.parse_args(["--recipe", "convnext-xl"])
