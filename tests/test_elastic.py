"""Elastic training: one model trained over a range of keep ratios, a ratio drawn per step."""
from __future__ import annotations

import logging
import random

import pytest
import torch

import dynamicvit
from dynamicvit.core.settings import KeepRatioSampler
from dynamicvit.errors import ConfigError
from dynamicvit.core.losses import DynamicViTLoss, ratio_loss
from dynamicvit.core.base import DynamicViTOutput
from dynamicvit.training.config import TrainConfig
from dynamicvit.training.loop import train

from conftest import tiny_model
from test_train import config, synthetic
from test_cli_train import parse
from dynamicvit.commands import train as train_cmd


def test_interval_draws_cover_the_range():
    sampler = KeepRatioSampler.parse("0.4:1.0")
    rng = random.Random(0)
    draws = [sampler.sample(rng) for _ in range(2000)]
    assert all(0.4 <= r <= 1.0 for r in draws)
    assert min(draws) < 0.41 and max(draws) > 0.99
    # Uniform: every tenth of the range gets its share (333 expected in each of the 6 bins).
    bins = [0] * 6
    for r in draws:
        bins[min(int((r - 0.4) / 0.1), 5)] += 1
    assert all(270 < b < 400 for b in bins), bins
    # E[rho^s], which the end-of-run drift check compares with, against the draws.
    for s in (1, 2, 3):
        assert sampler.expected_fraction(s) == pytest.approx(sum(r**s for r in draws) / len(draws), abs=0.01)


def test_low_interval_draws_small_ratios_more_often():
    sampler = KeepRatioSampler.parse("low:0.4:1.0")
    assert sampler.shape == "low" and sampler.range == (0.4, 1.0) and str(sampler) == "low:0.4:1"
    rng = random.Random(0)
    draws = [sampler.sample(rng) for _ in range(6000)]
    assert all(0.4 <= r <= 1.0 for r in draws)
    bins = [0] * 6
    for r in draws:
        bins[min(int((r - 0.4) / 0.1), 5)] += 1
    # Density 2 (1 - x) over the range: bin k of 6 holds (11 - 2k) / 36 of the draws.
    for k, b in enumerate(bins):
        assert b == pytest.approx(6000 * (11 - 2 * k) / 36, rel=0.15), bins
    assert bins[0] > 1.7 * 1000  # about twice the uniform share of the smallest tenth
    for s in (1, 2, 3):
        assert sampler.expected_fraction(s) == pytest.approx(sum(r**s for r in draws) / len(draws), abs=0.01)
    assert KeepRatioSampler.parse("uniform:0.4:1.0") == KeepRatioSampler.parse("0.4:1.0")


def test_listed_ratios_are_each_drawn():
    sampler = KeepRatioSampler.parse("1.0, 0.4,0.7")
    assert sampler.values == (0.4, 0.7, 1.0) and sampler.range == (0.4, 1.0) and str(sampler) == "0.4,0.7,1"
    draws = [sampler.sample(random.Random(i)) for i in range(300)]
    assert set(draws) == {0.4, 0.7, 1.0}
    assert KeepRatioSampler.parse([0.5, 0.9]).values == (0.5, 0.9)


@pytest.mark.parametrize("spec, message", [
    ("1.0:0.4", "interval is empty"), ("0:1", "must be in"), ("0.4:1.5", "must be in"), ("0.4:high", "not a range"),
    ("wide:0.4:1.0", "unknown distribution"), ("low:0.4,0.7", "needs an interval"),
    ("", "names no keep ratio"), ("0.4:0.6:1.0", "names no keep ratio"),
])
def test_bad_ranges_are_one_clear_error(spec, message):
    with pytest.raises(ConfigError, match=message):
        KeepRatioSampler.parse(spec)
    with pytest.raises(ConfigError, match=message):
        TrainConfig(keep_ratios=spec).validate()


def test_the_ratio_loss_targets_the_ratio_of_the_step():
    decisions = [torch.tensor([[1.0, 0.0, 1.0, 1.0]]), torch.tensor([[1.0, 0.0, 0.0, 0.0]])]
    out = DynamicViTOutput(logits=torch.zeros(1, 3), tokens=torch.zeros(1, 4, 2), decisions=decisions, mask=decisions[-1])
    criterion = DynamicViTLoss(keep_ratio=0.7)
    _, at_default = criterion(out, torch.tensor([0]))
    _, at_step = criterion(out, torch.tensor([0]), keep_ratio=0.5)
    assert at_default["ratio"].item() == pytest.approx(ratio_loss(decisions, 0.7).item())
    assert at_step["ratio"].item() == pytest.approx(ratio_loss(decisions, 0.5).item())
    assert at_step["ratio"].item() != pytest.approx(at_default["ratio"].item())


def test_sampling_shifts_to_the_ratio_of_the_step():
    """Fresh predictors keep about rho^s of the tokens at the model's ratio; with a step's ratio the
    keep logits move by logit(step) - logit(model), so they keep about step^s (no ratio input)."""
    torch.manual_seed(0)
    model = dynamicvit.create_model("deit_tiny_patch16_224", keep_ratio=0.7, img_size=64).train()
    x = torch.randn(32, 3, 64, 64)
    for step in (0.4, 0.7, 1.0):
        decisions = model(x, keep_ratio=step).decisions
        for s, d in enumerate(decisions, start=1):
            assert abs(d.float().mean().item() - min(step, 0.99) ** s) < 0.05, (step, s, d.float().mean().item())


def test_training_draws_a_ratio_per_step_and_the_loss_targets_it(tmp_path, monkeypatch, caplog):
    seen = {"forward": [], "loss": []}
    forward, loss = dynamicvit.DynamicViT.forward_masked, DynamicViTLoss.forward

    def spy_forward(self, x, decisions=None, keep_ratio=None):
        seen["forward"].append(keep_ratio)
        return forward(self, x, decisions, keep_ratio)

    def spy_loss(self, output, target, teacher_logits=None, teacher_tokens=None, keep_ratio=None):
        seen["loss"].append(keep_ratio)
        return loss(self, output, target, teacher_logits, teacher_tokens, keep_ratio)

    monkeypatch.setattr(dynamicvit.DynamicViT, "forward_masked", spy_forward)
    monkeypatch.setattr(DynamicViTLoss, "forward", spy_loss)
    cfg = config(tmp_path, epochs=2, max_steps_per_epoch=6, keep_ratios="0.4:1.0", keep_ratio=0.7)
    with caplog.at_level(logging.WARNING, logger="dynamicvit"):
        result = train(cfg, train_set=synthetic(48))
    assert "elastic training without gradient clipping" in caplog.text  # the setting that collapsed on the demo
    ratios = seen["loss"]
    assert len(ratios) == 12 and seen["forward"] == ratios
    assert all(0.4 <= r <= 1.0 for r in ratios) and len(set(ratios)) == 12
    # The range is recorded with the model; its keep ratio at inference is keep_ratio.
    model = dynamicvit.load_model(result.checkpoint)
    assert model.keep_ratio_range == (0.4, 1.0) and model.keep_ratio == 0.7
    # The paper's recipe (no range) trains at keep_ratio alone.
    seen["loss"].clear()
    train(config(tmp_path, epochs=1, max_steps_per_epoch=2, output=str(tmp_path / "single")), train_set=synthetic(16))
    assert seen["loss"] == [None, None]


def test_the_train_command_takes_a_range_and_fusion():
    cfg = train_cmd.config_from_args(parse("--keep-ratios", "0.4:1.0", "--fuse-dropped"))
    assert cfg.keep_ratios == "0.4:1.0" and cfg.fuse_dropped is True
    assert train_cmd.config_from_args(parse()).keep_ratios is None


def test_a_range_is_checked_against_the_model_and_recorded(caplog):
    model = tiny_model(keep_ratio=0.7)
    with pytest.raises(ConfigError, match="keep_ratio_range must be"):
        model.set_keep_ratio_range((0.0, 1.0))
    with pytest.raises(ConfigError, match="empty"):
        model.set_keep_ratio_range((0.9, 0.5))
    assert model.keep_ratio_range is None
    model.set_keep_ratio_range((0.4, 1.0))
    with caplog.at_level("WARNING", logger="dynamicvit.model"):
        model.set_keep_ratio(0.5)
        assert not caplog.records
        model.set_keep_ratio(0.3)
    assert "outside the range 0.4..1 this model was trained for" in caplog.text


def test_per_image_training_pulls_the_batch_mean_at_each_drawn_ratio(tmp_path, monkeypatch):
    seen = []
    loss = DynamicViTLoss.forward

    def spy_loss(self, output, target, teacher_logits=None, teacher_tokens=None, keep_ratio=None):
        total, terms = loss(self, output, target, teacher_logits, teacher_tokens, keep_ratio)
        batch = ratio_loss(output.decisions, keep_ratio, over="batch").item()
        seen.append((self.budget, keep_ratio, terms["ratio"].item(), batch))
        return total, terms

    monkeypatch.setattr(DynamicViTLoss, "forward", spy_loss)
    cfg = config(tmp_path, epochs=1, max_steps_per_epoch=3, keep_ratios="0.4:1.0", keep_ratio=0.7, budget="per-image",
                 clip_grad=1.0)
    train(cfg, train_set=synthetic(24))
    assert len(seen) == 3 and len({rho for _, rho, _, _ in seen}) == 3
    assert all(budget == "per-image" and term == pytest.approx(batch) for budget, _, term, batch in seen)
    cfg = train_cmd.config_from_args(parse("--budget", "per-image"))
    assert cfg.budget == "per-image" and train_cmd.config_from_args(parse()).budget == "fixed"
    with pytest.raises(SystemExit):
        parse("--budget", "sometimes")
    with pytest.raises(ConfigError, match="budget must be one of"):
        TrainConfig(budget="sometimes").validate()
