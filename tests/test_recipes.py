"""The paper recipes as presets: each gives exactly the reference settings; explicit settings win."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest
import timm
import torch

from dynamicvit.commands import train as train_cmd
from dynamicvit.data import DatasetInfo, build_transform, eval_config
from dynamicvit.errors import ConfigError
from dynamicvit.training.config import RECIPES, TrainConfig
from dynamicvit.training.loop import train
from dynamicvit.training.models import build_models
from test_train import config, synthetic

# What the authors' README training command and main.py set, written out per recipe (ImageNet, 8 GPUs).
COMMON = dict(
    epochs=30, batch_size=128, lr=1e-3, backbone_lr_scale=0.01, freeze_backbone_epochs=5, warmup_epochs=5,
    warmup_lr=0.0, min_lr=1e-6, weight_decay=0.05, clip_grad=None, keep_ratio=0.7, ratio_weight=2.0,
    distill_weight=0.5, token_weight=0.5, smoothing=0.1, mixup=0.8, cutmix=1.0,
    augment={"auto_augment": "rand-m9-mstd0.5-inc1", "color_jitter": 0.4, "re_prob": 0.25, "re_mode": "pixel",
             "re_count": 1, "interpolation": "bicubic"},
    amp="none", ema=True, ema_decay=0.9999, predictor_keep_prior=0.5, eval_crop_pct=0.875,
)
EXPECTED = {
    "deit-s": dict(COMMON, model="deit_small_patch16_224", prune_locs=[3, 6, 9], timm_kwargs={"drop_path_rate": 0.0}),
    "deit-b": dict(COMMON, model="deit_base_patch16_224", prune_locs=[3, 6, 9], ratio_weight=5.0,
                   timm_kwargs={"drop_path_rate": 0.2}),
    "deit-256": dict(COMMON, model="deit_small_patch16_224", prune_locs=[3, 6, 9],
                     timm_kwargs={"embed_dim": 256, "num_heads": 4, "drop_path_rate": 0.0}),
    "lvvit-s": dict(COMMON, model="lvvit_s", prune_locs=[4, 8, 12], timm_kwargs={"drop_path_rate": 0.0}),
    "lvvit-m": dict(COMMON, model="lvvit_m", prune_locs=[5, 10, 15], timm_kwargs={"drop_path_rate": 0.0}),
}
# The hierarchical recipes (shared/reference/spatial.md): the rest stays at TrainConfig's defaults.
SPATIAL = dict(keep_ratio=0.7, epochs=120, backbone_lr_scale=0.01, freeze_backbone_epochs=5, weight_decay=0.05,
               ratio_weight=10.0, distill_weight=0.5, token_weight=0.5, smoothing=0.1, mixup=0.8, cutmix=1.0, ema=True)
EXPECTED.update({
    "convnext-t": dict(SPATIAL, model="convnext_tiny", timm_kwargs={"drop_path_rate": 0.2}),
    "convnext-s": dict(SPATIAL, model="convnext_small", timm_kwargs={"drop_path_rate": 0.2}),
    "convnext-b": dict(SPATIAL, model="convnext_base", timm_kwargs={"drop_path_rate": 0.5}),
    "swin-t": dict(SPATIAL, model="swin_tiny_patch4_window7_224", timm_kwargs={"drop_path_rate": 0.2}),
    "swin-s": dict(SPATIAL, model="swin_small_patch4_window7_224", timm_kwargs={"drop_path_rate": 0.2}),
    "swin-b": dict(SPATIAL, model="swin_base_patch4_window7_224", timm_kwargs={"drop_path_rate": 0.5}),
})


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    train_cmd.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_recipe_gives_exactly_its_settings(name):
    assert set(RECIPES) == set(EXPECTED)
    want = {**TrainConfig().to_dict(), **EXPECTED[name], "recipe": name}
    assert TrainConfig.from_recipe(name).to_dict() == want
    assert train_cmd.config_from_args(parse("--recipe", name)).to_dict() == want


def test_recipe_models_are_the_paper_architectures():
    for name, (width, heads) in {"deit-256": (256, 4), "deit-b": (768, 12), "lvvit-m": (512, 8)}.items():
        cfg = TrainConfig.from_recipe(name)
        kwargs = {k: v for k, v in cfg.timm_kwargs.items() if k != "drop_path_rate"}
        model = timm.create_model(cfg.model, **kwargs)
        assert (model.embed_dim, model.blocks[0].attn.num_heads) == (width, heads)


def test_explicit_settings_win_over_the_recipe(tmp_path):
    args = parse("--recipe", "lvvit-s", "--epochs", "15", "--timm-kwargs", '{"img_size": 384}',
                 "--augment", '{"re_prob": 0.0}', "--amp", "bf16")
    cfg = train_cmd.config_from_args(args)
    assert (cfg.epochs, cfg.amp, cfg.model, cfg.prune_locs, cfg.ema) == (15, "bf16", "lvvit_s", [4, 8, 12], True)
    assert cfg.timm_kwargs == {"drop_path_rate": 0.0, "img_size": 384}  # dicts merge key by key
    assert cfg.augment == {**COMMON["augment"], "re_prob": 0.0}
    # A config file wins over the recipe, a flag over the file; the file may name the recipe itself.
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"recipe": "deit-b", "ratio_weight": 3.0, "lr": 5e-4}))
    cfg = train_cmd.config_from_args(parse("--config", str(path), "--lr", "2e-4"))
    assert (cfg.recipe, cfg.model, cfg.ratio_weight, cfg.lr, cfg.timm_kwargs) == (
        "deit-b", "deit_base_patch16_224", 3.0, 2e-4, {"drop_path_rate": 0.2})
    assert TrainConfig.from_recipe("deit-s", keep_ratio=0.5, ema=False).keep_ratio == 0.5
    # Without a recipe nothing changes.
    assert TrainConfig.from_dict({}).to_dict() == TrainConfig().to_dict()


def test_unknown_recipe_is_a_clear_error(capsys):
    with pytest.raises(ConfigError, match="unknown recipe 'lvvit-l'; choose one of deit-s, deit-b, deit-256, lvvit-s, lvvit-m"):
        TrainConfig.from_recipe("lvvit-l")
    with pytest.raises(SystemExit):
        parse("--recipe", "lvvit-l")
    assert "invalid choice: 'lvvit-l'" in capsys.readouterr().err


def test_reference_predictor_start_and_stored_settings(tmp_path):
    """predictor_keep_prior 0.5 starts every stage at keep probability 0.5; the run stores the
    effective settings, recipe included, and an EMA model."""
    config(tmp_path)  # writes the micro teacher
    # The recipe with the data, model size and run length of a micro run replaced explicitly.
    cfg = TrainConfig.from_recipe(
        "deit-s", model="vit_tiny_patch16_224", teacher=str(tmp_path / "teacher.safetensors"),
        output=str(tmp_path / "run"), prune_locs=None, timm_kwargs={}, augment=None, epochs=1, batch_size=8,
        max_steps_per_epoch=2, warmup_epochs=0, freeze_backbone_epochs=0, mixup=0.0, cutmix=0.0, eval_crop_pct=None,
        num_workers=0, device="cpu", progress=False, tensorboard=False,
    )
    assert cfg.ema and cfg.ema_decay == 0.9999 and cfg.predictor_keep_prior == 0.5
    student, _ = build_models(cfg, {})
    for p in student.predictors:
        torch.testing.assert_close(p.out_conv[4].bias, torch.zeros(2))  # logit 0: keep probability 0.5
    default, _ = build_models(dataclasses.replace(cfg, predictor_keep_prior=None), {})
    assert default.predictors[0].out_conv[4].bias[0] > 0  # rho = 0.7 by default
    result = train(cfg, train_set=synthetic(16), val_set=synthetic(8, seed=1))
    stored = torch.load(result.last, map_location="cpu", weights_only=True)["config"]
    assert stored == cfg.to_dict() and stored["recipe"] == "deit-s" and stored["warmup_lr"] == 0.0
    assert result.ema_checkpoint is not None and Path(result.ema_checkpoint).is_file()
    assert "val_ema_top1" in result.history[-1]


def test_evaluation_resize_follows_the_model_and_the_reference():
    deit = timm.create_model("deit_small_patch16_224").pretrained_cfg
    config = eval_config((3, 224, 224), (0.5,) * 3, (0.5,) * 3, pretrained_cfg=deit)
    assert {k: config[k] for k in ("crop_pct", "crop_mode", "interpolation")} == {
        "crop_pct": 0.9, "crop_mode": "center", "interpolation": "bicubic"}
    info = DatasetInfo("folder", 10, 3, 224, (0.5,) * 3, (0.5,) * 3)
    t = build_transform(info, "val", img_size=224, pretrained_cfg=deit, crop_pct=0.875)
    resize, crop = t.transforms[0], t.transforms[1]
    assert (resize.size, str(resize.interpolation.value), crop.size) == (256, "bicubic", (224, 224))
    t = build_transform(info, "val", img_size=384, pretrained_cfg=deit, crop_pct=0.875)
    assert t.transforms[0].size == (384, 384) and t.transforms[1].size == (384, 384)  # warped whole, no crop
    lvvit = timm.create_model("lvvit_s").pretrained_cfg
    lvvit_m = timm.create_model("lvvit_m").pretrained_cfg
    assert eval_config((3, 224, 224), (0.5,) * 3, (0.5,) * 3, pretrained_cfg=lvvit)["crop_pct"] == 0.9
    assert eval_config((3, 224, 224), (0.5,) * 3, (0.5,) * 3, pretrained_cfg=lvvit_m)["crop_pct"] == 1.0
    train_t = build_transform(info, "train", img_size=224, augment=COMMON["augment"])
    erase = train_t.transforms[-1]
    assert type(erase).__name__ == "RandomErasing" and erase.mode == "pixel" and erase.probability == 0.25
