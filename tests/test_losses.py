"""The DynamicViT loss terms against hand-computed values, and the ratio loss at work on a tiny model."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_model
from dynamicvit.core.losses import DynamicViTLoss, classification_loss, kl_distill, ratio_loss, token_distill
from dynamicvit.core.base import DynamicViTOutput



def _decisions():
    # Stage 1 keeps 3/4 and 1/4 of the tokens of the two images; stage 2 keeps 2/4 and 0/4.
    return [
        torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]]),
        torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]]),
    ]


def test_ratio_loss_hand_computed():
    # rho = 0.6: stage 1 target 0.6 -> ((0.75-0.6)^2 + (0.25-0.6)^2)/2 = (0.0225 + 0.1225)/2 = 0.0725
    #            stage 2 target 0.36 -> ((0.5-0.36)^2 + (0-0.36)^2)/2 = (0.0196 + 0.1296)/2 = 0.0746
    # mean over stages: 0.07355
    assert ratio_loss(_decisions(), 0.6).item() == pytest.approx(0.07355, abs=1e-6)
    # Decisions exactly at rho^s cost nothing.
    exact = [torch.tensor([[1.0, 1.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0, 0.0]])]
    assert ratio_loss(exact, 0.5).item() == pytest.approx(0.0, abs=1e-7)


def test_kl_distill_hand_computed():
    # Row 1: teacher p = (0.75, 0.25), student p = (0.5, 0.5):
    #   KL = 0.75 ln(0.75/0.5) + 0.25 ln(0.25/0.5) = 0.75 ln 1.5 - 0.25 ln 2 = 0.1308121
    # Row 2: identical distributions, KL = 0. batchmean divides the sum by B = 2.
    student = torch.tensor([[0.0, 0.0], [1.0, -1.0]], requires_grad=True)
    teacher = torch.tensor([[math.log(3.0), 0.0], [1.0, -1.0]], requires_grad=True)
    kl = kl_distill(student, teacher)
    expected = (0.75 * math.log(1.5) - 0.25 * math.log(2.0)) / 2
    assert kl.item() == pytest.approx(expected, abs=1e-6)
    kl.backward()
    assert student.grad is not None and teacher.grad is None  # the teacher is a fixed target


def test_token_distill_hand_computed():
    student = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]], requires_grad=True)  # (B=1, N=3, C=2)
    teacher = torch.zeros(1, 3, 2)
    # Tokens 0 and 2 survive: (1 + 4 + 25 + 36) / 4 values = 16.5
    assert token_distill(student, teacher, torch.tensor([[1.0, 0.0, 1.0]])).item() == pytest.approx(16.5)
    # No mask: all 6 values, 91 / 6.
    assert token_distill(student, teacher).item() == pytest.approx(91 / 6)
    # Nothing survives: 0, and backward still works.
    none = token_distill(student, teacher, torch.zeros(1, 3))
    assert none.item() == 0.0
    none.backward()
    assert torch.count_nonzero(student.grad) == 0


def test_classification_loss_hand_computed():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # p = (0.25, 0.75)
    # Hard label 1 with smoothing 0.1 over 2 classes: target (0.05, 0.95).
    expected = -(0.05 * math.log(0.25) + 0.95 * math.log(0.75))
    assert classification_loss(logits, torch.tensor([1]), smoothing=0.1).item() == pytest.approx(expected, abs=1e-6)
    assert classification_loss(logits, torch.tensor([1])).item() == pytest.approx(-math.log(0.75), abs=1e-6)
    # Soft targets (mixup): smoothing is already inside them and is not applied again.
    soft = torch.tensor([[0.3, 0.7]])
    expected = -(0.3 * math.log(0.25) + 0.7 * math.log(0.75))
    assert classification_loss(logits, soft, smoothing=0.1).item() == pytest.approx(expected, abs=1e-6)


def _output():
    torch.manual_seed(0)
    decisions = _decisions()
    return DynamicViTOutput(
        logits=torch.randn(2, 5, requires_grad=True),
        tokens=torch.randn(2, 4, 3, requires_grad=True),
        decisions=decisions,
        mask=decisions[-1],
    )


def test_dynamicvit_loss_weighs_the_terms():
    out = _output()
    target = torch.tensor([1, 3])
    t_logits, t_tokens = torch.randn(2, 5), torch.randn(2, 4, 3)
    ce = classification_loss(out.logits, target, 0.1)
    ratio = ratio_loss(out.decisions, 0.7)
    kl = kl_distill(out.logits, t_logits)
    tok = token_distill(out.tokens, t_tokens, out.mask)

    total, terms = DynamicViTLoss(keep_ratio=0.7)(out, target, t_logits, t_tokens)
    assert total.item() == pytest.approx((ce + 2.0 * ratio + 0.5 * kl + 0.5 * tok).item(), rel=1e-6)
    assert {k: v.item() for k, v in terms.items()} == pytest.approx(
        {"ce": ce.item(), "ratio": ratio.item(), "kl": kl.item(), "token": tok.item()}
    )

    custom = DynamicViTLoss(0.7, ratio_weight=5.0, distill_weight=0.0, token_weight=1.5, smoothing=0.0)
    total, _ = custom(out, target, t_logits, t_tokens)
    expected = classification_loss(out.logits, target) + 5.0 * ratio + 1.5 * tok
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)

    # Without a teacher only CE + ratio remain.
    total, terms = DynamicViTLoss(0.7)(out, target)
    assert set(terms) == {"ce", "ratio"}
    assert total.item() == pytest.approx((ce + 2.0 * ratio).item(), rel=1e-6)


def _expected_ratio_error(model, images, keep_ratio, draws=4):
    with torch.no_grad():
        return sum(ratio_loss(model.forward_masked(images).decisions, keep_ratio).item() for _ in range(draws)) / draws


def test_ratio_loss_pulls_the_realized_ratio_to_the_target(images):
    """Training only the predictors with the ratio loss moves the mean decision of stage s toward rho^s."""
    keep_ratio = 0.9  # targets 0.9, 0.81, 0.729; predictors at the reference init keep about 1/2, 1/4, 1/8
    model = tiny_model(keep_ratio=keep_ratio).train()
    for predictor in model.predictors:
        predictor.reset_parameters(keep_prior=0.5)  # start far from the target
    model.backbone.requires_grad_(False)
    optimizer = torch.optim.Adam(model.predictors.parameters(), lr=2e-2)
    torch.manual_seed(0)
    before = _expected_ratio_error(model, images, keep_ratio)
    for _ in range(25):
        loss = ratio_loss(model.forward_masked(images).decisions, keep_ratio)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = _expected_ratio_error(model, images, keep_ratio)
    assert before > 0.05
    assert after < 0.2 * before
    with torch.no_grad():
        realized = [d.mean().item() for d in model.forward_masked(images).decisions]
    for s, r in enumerate(realized, start=1):
        assert abs(r - keep_ratio**s) < 0.15, (s, realized)


def test_per_image_budget_pulls_the_batch_mean_not_each_image():
    # Stage 1 keeps 3/4 and 1/4 (batch mean 0.5), stage 2 keeps 2/4 and 0/4 (batch mean 0.25).
    # rho = 0.5: the batch means sit at 0.5 and 0.25 exactly, so the batch form costs nothing while
    # the per-image form charges both images: ((0.25^2 + 0.25^2)/2 + (0.25^2 + 0.25^2)/2) / 2 = 0.0625.
    decisions = _decisions()
    assert ratio_loss(decisions, 0.5, over="batch").item() == pytest.approx(0.0, abs=1e-7)
    assert ratio_loss(decisions, 0.5).item() == pytest.approx(0.0625, abs=1e-7)
    # rho = 0.6: (0.5 - 0.6)^2 = 0.01 and (0.25 - 0.36)^2 = 0.0121, mean 0.01105.
    assert ratio_loss(decisions, 0.6, over="batch").item() == pytest.approx(0.01105, abs=1e-7)
    with pytest.raises(ValueError, match="over must be"):
        ratio_loss(decisions, 0.6, over="token")


def test_per_image_loss_lets_images_differ_and_takes_the_step_ratio():
    out = _output()
    target = torch.tensor([1, 3])
    fixed, per_image = DynamicViTLoss(0.7), DynamicViTLoss(0.7, budget="per-image")
    for rho in (None, 0.5):  # elastic training passes the ratio drawn for the step
        _, f = fixed(out, target, keep_ratio=rho)
        _, p = per_image(out, target, keep_ratio=rho)
        r = 0.7 if rho is None else rho
        assert f["ratio"].item() == pytest.approx(ratio_loss(out.decisions, r).item())
        assert p["ratio"].item() == pytest.approx(ratio_loss(out.decisions, r, over="batch").item())
        assert f["ce"] == p["ce"]
    # The gradient of the batch form reaches every image's decisions (through the batch mean).
    decisions = [d.clone().requires_grad_(True) for d in _decisions()]
    ratio_loss(decisions, 0.6, over="batch").backward()
    assert all((d.grad != 0).all() for d in decisions)
    with pytest.raises(ValueError, match="budget must be one of"):
        DynamicViTLoss(0.7, budget="sometimes")
