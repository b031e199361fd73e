"""The math in isolation: prediction module, masked softmax, Gumbel decisions, top-k gather."""
import pytest
import torch
import torch.nn.functional as F

from dynamicvit.core.ops import PredictionModule, masked_softmax, sample_keep, select_tokens

from conftest import scramble


def test_masked_softmax_all_kept_is_softmax():
    torch.manual_seed(0)
    a = torch.randn(2, 3, 5, 5) * 3
    torch.testing.assert_close(masked_softmax(a, torch.ones(2, 5)), a.softmax(-1), atol=1e-6, rtol=1e-5)


def test_masked_softmax_blocks_dropped_keys_but_keeps_diagonal():
    torch.manual_seed(0)  # the 1e-6 bound holds when a kept key is near the row max (eps/M over the kept sum)
    a = torch.randn(1, 2, 4, 4)
    g = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    w = masked_softmax(a, g)
    for i in range(4):
        for j in (1, 3):
            if i != j:
                assert w[0, :, i, j].abs().max() < 1e-6  # nobody attends to a dropped token (eps/M aside)
        assert (w[0, :, i, i] > 0).all()  # a token always sees itself
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 2, 4))
    # Kept rows equal a softmax over the kept keys alone.
    kept = [0, 2]
    torch.testing.assert_close(w[0][:, kept][:, :, kept], a[0][:, kept][:, :, kept].softmax(-1), atol=1e-6, rtol=1e-5)


def test_masked_softmax_stays_finite_on_large_dropped_logits():
    a = torch.zeros(1, 1, 3, 3)
    a[..., 2] = 1000.0
    w = masked_softmax(a, torch.tensor([[1.0, 1.0, 0.0]]))
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 1, 3))


def test_masked_softmax_gradient_reaches_policy():
    a = torch.randn(1, 1, 4, 4)
    g = torch.tensor([[1.0, 1.0, 0.0, 1.0]], requires_grad=True)
    (masked_softmax(a, g) * torch.randn(1, 1, 4, 4)).sum().backward()
    assert g.grad is not None and g.grad.abs().sum() > 0


def test_prediction_module_global_feature_ignores_dropped_tokens():
    torch.manual_seed(0)
    pm = scramble(PredictionModule(16)).eval()
    x = torch.randn(2, 6, 16)
    policy = torch.tensor([1, 1, 0, 1, 0, 1.0]).view(1, 6, 1).expand(2, 6, 1)
    out = pm(x, policy)
    x2 = x.clone()
    x2[:, [2, 4]] = torch.randn(2, 2, 16) * 10  # change only dropped tokens
    out2 = pm(x2, policy)
    kept = [0, 1, 3, 5]
    torch.testing.assert_close(out[:, kept], out2[:, kept])
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(2, 6))
    # The global term really is a masked mean: dropping a token changes the kept tokens' scores.
    assert not torch.allclose(pm(x, torch.ones(2, 6, 1))[:, kept], out[:, kept])


def test_prediction_module_keep_score_ranks_like_log_prob():
    torch.manual_seed(0)
    pm = scramble(PredictionModule(16)).eval()
    x = torch.randn(3, 10, 16)
    assert torch.equal(pm.keep_score(x).argsort(1), pm(x)[..., 0].argsort(1))


def test_prediction_module_all_dropped_row_is_finite():
    pm = PredictionModule(8)
    assert torch.isfinite(pm(torch.randn(1, 4, 8), torch.zeros(1, 4, 1))).all()


def test_sample_keep_is_hard_hierarchical_and_differentiable():
    torch.manual_seed(0)
    logits = torch.randn(4, 20, 2, requires_grad=True)
    prev = (torch.rand(4, 20, 1) > 0.5).float()
    d = sample_keep(F.log_softmax(logits, -1), prev)
    assert set(d.unique().tolist()) <= {0.0, 1.0}
    assert (d <= prev).all()  # once dropped, a token stays dropped
    d.sum().backward()
    assert logits.grad.abs().sum() > 0


def test_select_tokens_keeps_prefix_and_top_k():
    B, P, N, C = 2, 2, 6, 3
    x = torch.arange(B * (P + N) * C, dtype=torch.float32).view(B, P + N, C)
    score = torch.tensor([[0.1, 0.9, 0.5, 0.3, 0.8, 0.0], [0.7, 0.1, 0.2, 0.9, 0.3, 0.4]])
    out, keep = select_tokens(x, score, 3, P)
    assert out.shape == (B, P + 3, C)
    torch.testing.assert_close(out[:, :P], x[:, :P])
    assert [sorted(k.tolist()) for k in keep] == [[1, 2, 4], [0, 3, 5]]
    for b in range(B):
        torch.testing.assert_close(out[b, P:], x[b, P + keep[b]])


def test_prediction_module_equals_the_concatenated_formulation():
    # The paper's formula: z = concat(local, global) then the MLP; ours splits the first weight.
    torch.manual_seed(0)
    pm = scramble(PredictionModule(16))
    x, policy = torch.randn(2, 5, 16), (torch.rand(2, 5, 1) > 0.3).float()
    h = pm.in_conv(x)
    glob = (h[..., 8:] * policy).sum(1, keepdim=True) / policy.sum(1, keepdim=True)
    z = torch.cat([h[..., :8], glob.expand(-1, 5, -1)], dim=-1)
    torch.testing.assert_close(pm(x, policy), pm.out_conv(z))


def test_masked_softmax_gradient_stays_bounded_for_dominant_dropped_keys():
    # A dropped key 40 nats above the kept ones: the exact derivative in g is ~exp(40) = 2e17 and
    # would drown every other loss term; the reference's eps-stabilized gradient stays bounded.
    a = torch.zeros(1, 1, 3, 3)
    a[..., 2] = 40.0
    g = torch.tensor([[1.0, 1.0, 0.0]], requires_grad=True)
    w = masked_softmax(a, g)
    # Rows that a dropped key dominates by > ~14 nats are flattened by eps (the reference's trade-off).
    assert torch.isfinite(w).all()
    (w * torch.randn(1, 1, 3, 3)).sum().backward()
    assert torch.isfinite(g.grad).all() and g.grad.abs().max() < 1e7
    assert g.grad[0, 2] != 0  # the dropped token still learns


def test_prediction_module_init_is_the_reference_one_with_a_keep_prior():
    torch.manual_seed(0)
    pm = PredictionModule(64, keep_prior=0.7)
    for name, p in pm.named_parameters():
        if name.endswith("weight") and p.ndim == 2:
            assert 0.015 < p.std().item() < 0.025 and p.abs().max().item() < 0.15, name  # N(0, 0.02)
    assert torch.count_nonzero(pm.out_conv[0].bias) == 0 and torch.count_nonzero(pm.out_conv[2].bias) == 0
    keep = pm(torch.randn(2, 11, 64), num_prefix_tokens=1).exp()[..., 0]
    assert torch.allclose(keep, torch.full_like(keep, 0.7), atol=0.01)
    pm.reset_parameters(0.5)
    assert torch.allclose(pm(torch.randn(2, 10, 64)).exp(), torch.full((2, 10, 2), 0.5), atol=0.01)
    with pytest.raises(ValueError, match="keep_prior"):
        PredictionModule(64, keep_prior=1.0)
