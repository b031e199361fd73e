"""Slim prediction modules (`predictor_width`): the module's formula at any width, the MACs they save,
checkpoints, and the settings and flags that take it.

(The invariants every variant meets, slim ones included: tests/test_model.py, the "+slim" ids.)
"""
from __future__ import annotations

import argparse

import pytest
import torch

import dynamicvit
from dynamicvit.core.ops import PredictionModule
from dynamicvit.errors import CheckpointError, ConfigError
from dynamicvit.runtime.flops import count_macs

from conftest import scramble, tiny_model
from test_reliability_cli import one_error_line, run_cli


@pytest.mark.parametrize("width", [4, 8, 16])
def test_a_slim_module_computes_the_papers_formula_at_its_width(width):
    """in_conv maps C -> W, the local half and the (masked) mean of the global half are concatenated and
    out_conv maps W -> W/2 -> W/4 -> 2: the reference layout with W for C after the first layer."""
    torch.manual_seed(0)
    pm = scramble(PredictionModule(16, width=width)).eval()
    assert [m.weight.shape for m in (pm.in_conv[1], pm.out_conv[0], pm.out_conv[2], pm.out_conv[4])] == [
        (width, 16), (width // 2, width), (width // 4, width // 2), (2, width // 4)]
    x = torch.randn(2, 7, 16)
    policy = torch.tensor([1, 1, 0, 1, 0, 1.0]).view(1, 6, 1).expand(2, 6, 1)  # the patch tokens
    for p in (None, policy):
        h = pm.in_conv(x[:, 1:])  # one prefix token
        local, glob = h[..., : width // 2], h[..., width // 2 :]
        weights = torch.ones_like(glob[..., :1]) if p is None else p
        glob = (glob * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True)
        expected = pm.out_conv(torch.cat([local, glob.expand_as(local)], dim=-1))
        torch.testing.assert_close(pm(x, p, num_prefix_tokens=1), expected, atol=1e-5, rtol=1e-4)
    # The inference path's ranking score is the margin of the same logits.
    logits = pm.logits(x[:, 1:])
    torch.testing.assert_close(pm.keep_score(x, 1), logits[..., 0] - logits[..., 1], atol=1e-5, rtol=1e-4)


def test_slim_modules_cost_what_their_layers_cost():
    """The MAC counter follows the narrower layers: per patch token C*W + (W/2)^2 + (W/2)(W/4) + W/4 (at
    inference the two-way last layer is one margin dot product) less than the full width's, the global
    half of out_conv[0] once per image, the norm unchanged."""
    full = tiny_model(keep_ratio=0.5).eval()
    slim = tiny_model(keep_ratio=0.5, predictor_width=8).eval()
    a, b = count_macs(full), count_macs(slim)
    tokens = [full.num_patches] + list(full.keep_counts()[:-1])  # the tokens each stage scores
    C = full.embed_dim

    def per_token(w):
        return C * w + (w // 2) ** 2 + (w // 2) * (w // 4) + w // 4

    def per_image(w):
        return (w // 2) ** 2

    saved = sum(n * (per_token(C) - per_token(8)) + per_image(C) - per_image(8) for n in tokens)
    assert a.predictor_macs - b.predictor_macs == saved
    assert a.total - b.total == saved
    assert b.predictor_macs < a.predictor_macs / 4


def test_a_slim_model_round_trips_and_its_width_wins(tmp_path):
    model = tiny_model(merge_dropped=True, predictor_width=8).eval()
    path = dynamicvit.save_model(model, tmp_path / "slim.safetensors")
    loaded = dynamicvit.load_model(path).eval()
    assert loaded.predictor_width == 8 and "predictor_width=8" in repr(loaded)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    again = dynamicvit.create_model("vit_tiny_patch16_224", checkpoint_path=path)
    assert again.predictor_width == 8
    with pytest.raises(CheckpointError, match="width 8, but predictor_width=16 was asked for; drop the argument"):
        dynamicvit.create_model("vit_tiny_patch16_224", checkpoint_path=path, predictor_width=16)
    # A twin at another keep ratio keeps the width in what it would save.
    assert model.at_keep_ratio(0.5).settings()["predictor_width"] == 8
    # The paper's layout writes nothing new: its settings read as before.
    assert "predictor_width" not in tiny_model().settings()
    assert tiny_model(predictor_width=48).predictor_width is None  # the model's own width is the paper's


@pytest.mark.parametrize("width", [6, 0, 2, 64, True, 8.0])
def test_a_bad_width_is_one_clear_error(width):
    with pytest.raises(ConfigError, match="predictor_width must be a multiple of 4 from 4"):
        tiny_model(predictor_width=width)  # width 48


@pytest.mark.parametrize("width", [6, 0, "16", True])
def test_a_bad_width_in_a_checkpoint_is_refused(width):
    from dynamicvit.weights.formats import check_settings

    base = {"kind": "dynamicvit", "model_name": "vit_tiny_patch16_224", "keep_ratio": 0.5, "prune_locs": [1, 3, 4]}
    check_settings({**base, "predictor_width": 16}, "model.safetensors")
    with pytest.raises(CheckpointError, match="predictor_width .*; expected a multiple of 4"):
        check_settings({**base, "predictor_width": width}, "model.safetensors")


def test_convnext_and_swin_keep_the_authors_modules():
    with pytest.raises(ConfigError, match="predictor_width applies to ViTs only"):
        dynamicvit.create_model("convnext_atto", predictor_width=16, num_classes=10)


def test_train_and_demo_take_the_width(tmp_path, capsys):
    from dynamicvit.commands import demo as demo_cmd, train as train_cmd
    from dynamicvit.demo import DemoConfig, fine_tune_config
    from dynamicvit.training.models import build_models

    parser = argparse.ArgumentParser()
    train_cmd.add_arguments(parser)
    cfg = train_cmd.config_from_args(parser.parse_args(["--predictor-width", "16"]))
    assert cfg.predictor_width == 16
    with pytest.raises(ConfigError, match="predictor_width must be a multiple of 4"):
        train_cmd.config_from_args(parser.parse_args(["--predictor-width", "6"]))
    parser = argparse.ArgumentParser()
    demo_cmd.add_arguments(parser)
    demo = demo_cmd.config_from_args(parser.parse_args(["--predictor-width", "16", "--merge-dropped"]))
    assert demo.predictor_width == 16
    train_cfg = fine_tune_config(demo, tmp_path, tmp_path / "teacher.safetensors", torch.device("cpu"))
    assert train_cfg.predictor_width == 16
    # The student the demo's fine-tuning builds has the width (a tiny teacher stands in for the shipped one).
    teacher = tiny_model().backbone
    path = dynamicvit.save_model(teacher, tmp_path / "teacher.safetensors")
    student, _ = build_models(dynamicvit.TrainConfig(teacher=str(path), predictor_width=8, dataset="fashion-mnist"), {})
    assert all(p.in_conv[1].out_features == 8 for p in student.predictors)
    with pytest.raises(ConfigError, match="predictor_width must be a multiple of 4"):
        DemoConfig(predictor_width=10).validate()
    out = tmp_path / "demo"
    code, _, err = run_cli(capsys, "demo", "--predictor-width", "10", "--output", out)
    assert code == 2 and "predictor_width must be a multiple of 4" in one_error_line(err, "demo")
    assert not out.exists() or not any(out.iterdir())


def test_onnx_export_of_a_slim_model_is_verified(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from dynamicvit.runtime.deploy import OnnxModel, export_onnx

    model = tiny_model(keep_ratio=0.5, predictor_width=8).eval()
    result = export_onnx(model, tmp_path / "slim.onnx")
    assert result.verification.passed and result.verification.kept_agreement == 1.0
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(OnnxModel(result.path)(x), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("detach", [False, True])
def test_a_detached_predictor_input_leaves_the_ratio_loss_to_the_prediction_modules(detach):
    from dynamicvit.core.losses import ratio_loss

    model = tiny_model(merge_dropped=True, predictor_width=8).train()
    model.detach_predictor_input = detach
    assert model.at_keep_ratio(0.5).detach_predictor_input == detach
    out = model(torch.randn(4, 3, 32, 32))
    ratio_loss(out.decisions, 0.3).backward(retain_graph=True)
    backbone = [n for n, p in model.backbone.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.predictors[0].parameters())
    assert (backbone == []) == detach  # the paper's method sends the ratio loss into the backbone too
    model.zero_grad()
    out.logits.square().sum().backward()  # the task's gradient still reaches every backbone parameter
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())


def test_train_takes_detach_predictor_input(tmp_path):
    from dynamicvit.commands import train as train_cmd
    from dynamicvit.training.models import build_models

    parser = argparse.ArgumentParser()
    train_cmd.add_arguments(parser)
    assert train_cmd.config_from_args(parser.parse_args(["--detach-predictor-input"])).detach_predictor_input
    path = dynamicvit.save_model(tiny_model().backbone, tmp_path / "teacher.safetensors")
    student, _ = build_models(dynamicvit.TrainConfig(teacher=str(path), detach_predictor_input=True,
                                                     dataset="fashion-mnist"), {})
    assert student.detach_predictor_input
    assert "detach_predictor_input" not in student.settings()  # a training choice: inference is the same
