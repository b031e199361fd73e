"""Fusion of dropped tokens: the fold itself, both paths, MACs, export, pictures, old checkpoints."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dynamicvit
from dynamicvit.runtime.flops import count_macs
from dynamicvit.core.ops import fold_dropped

from conftest import pruned_with_block_inputs, tiny_model

DATA = Path(__file__).parent / "data"


def _x(model, batch=3, seed=1):
    torch.manual_seed(seed)
    h, w = model.backbone.patch_embed.img_size
    return torch.randn(batch, 3, h, w)


def test_fold_dropped_hand_computed():
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [4.0, 4.0]]])  # (B=1, n=3, C=2)
    weight = torch.tensor([[0.25, 0.75, 0.0]])  # token 2 is not dropped now
    token, total = fold_dropped(tokens, weight)
    # (0.25 * (1, 0) + 0.75 * (0, 2)) / 1.0 = (0.25, 1.5)
    torch.testing.assert_close(token, torch.tensor([[[0.25, 1.5]]]))
    torch.testing.assert_close(total, torch.tensor([[[1.0]]]))
    # A later stage folds into the same token, which keeps the weight it holds: (1.0 * f + 0.5 * (4, 4)) / 1.5.
    token2, total2 = fold_dropped(tokens, torch.tensor([[0.0, 0.0, 0.5]]), token, total)
    torch.testing.assert_close(token2, torch.tensor([[[(0.25 + 2.0) / 1.5, (1.5 + 2.0) / 1.5]]]))
    torch.testing.assert_close(total2, torch.tensor([[[1.5]]]))


def test_fold_dropped_with_nothing_dropped_is_zero_with_finite_gradient():
    tokens = torch.randn(2, 4, 3, requires_grad=True)
    weight = torch.zeros(2, 4, requires_grad=True)
    token, total = fold_dropped(tokens, weight)
    assert torch.equal(token, torch.zeros(2, 1, 3)) and torch.equal(total, torch.zeros(2, 1, 1))
    token.sum().backward()
    assert torch.isfinite(weight.grad).all() and weight.grad.abs().max() < 10


@pytest.mark.parametrize("keep_ratio", [0.7, 0.5])
def test_the_fused_token_is_the_weighted_average_of_the_dropped_ones(keep_ratio):
    """(Token counts per block with fusion: tests/test_model.py, the "+fused" variants.)"""
    model = tiny_model(keep_ratio=keep_ratio, fuse_dropped=True).eval()
    out, seen = pruned_with_block_inputs(model, _x(model))
    P, N, counts = model.num_prefix_tokens, model.num_patches, model.keep_counts()
    # The fused token is never selected as a kept patch: the kept indices are patches of the grid.
    for idx, k in zip(out.kept_indices, counts):
        assert idx.shape == (3, k) and int(idx.max()) < N
    # Entering the first pruned block, the last token is the keep-probability-weighted average of
    # the dropped tokens of that stage.
    loc = model.prune_locs[0]
    before = seen[loc - 1]  # the input of the block before the stage ...
    with torch.no_grad():
        tokens = model.backbone.blocks[loc - 1](before)  # ... gives the tokens the predictor scored
        p_keep = torch.sigmoid(model.predictors[0].keep_score(tokens, P))  # (B, N)
    dropped = torch.ones(3, N, dtype=torch.bool).scatter(1, out.kept_indices[0], False)
    w = p_keep * dropped
    manual = (w.unsqueeze(-1) * tokens[:, P:]).sum(1) / w.sum(1, keepdim=True)
    torch.testing.assert_close(seen[loc][:, -1], manual, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("home", ["fuse_dropped", "merge_dropped"])
def test_fusion_or_merging_changes_the_output_and_the_ratio_one_output_not(home):
    """At keep ratio 1.0 nothing is dropped: no fused token, no merge and no size bias."""
    plain, fused = tiny_model(keep_ratio=0.5).eval(), tiny_model(keep_ratio=0.5, **{home: True}).eval()
    fused.load_state_dict(plain.state_dict())  # neither adds a parameter
    x = _x(plain)
    with torch.no_grad():
        assert not torch.allclose(plain(x), fused(x), atol=1e-3)
        for m in (plain, fused):
            m.set_keep_ratio(1.0)
        torch.testing.assert_close(plain(x), fused(x), rtol=0, atol=0)
        torch.testing.assert_close(fused(x), fused.backbone(x), atol=1e-5, rtol=1e-4)


def test_training_path_fuses_with_gradient_into_the_predictors():
    """With hard decisions fixed, the predictors still get a gradient: through the fusion weights."""
    model = tiny_model(keep_ratio=0.5, fuse_dropped=True).train()
    x = _x(model, batch=4)
    with torch.no_grad():
        kept = model.eval().forward_pruned(x).kept_indices
    model.train()
    masks = [torch.zeros(4, model.num_patches).scatter(1, idx, 1.0) for idx in kept]
    out = model.forward_masked(x, decisions=masks)
    out.logits.square().sum().backward()
    for s, predictor in enumerate(model.predictors):
        grads = [p.grad for p in predictor.parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0, s
    # Without fusion fixed decisions leave the predictors out of the graph.
    plain = tiny_model(keep_ratio=0.5).train()
    plain.forward_masked(x, decisions=masks).logits.square().sum().backward()
    assert all(p.grad is None for p in plain.predictors.parameters())


def test_macs_count_the_fused_token():
    """The dispatch counter sees the fused token: one more token in every block after the first
    stage (its linear layers and both attention products) plus the weighted sum of the fold."""
    plain, fused = tiny_model(keep_ratio=0.5), tiny_model(keep_ratio=0.5, fuse_dropped=True)
    a, b = count_macs(plain), count_macs(fused)
    C, P, N = plain.embed_dim, plain.num_prefix_tokens, plain.num_patches
    counts, locs, depth = plain.keep_counts(), plain.prune_locs, len(plain.backbone.blocks)
    extra, n = 0, N
    for s, (loc, k) in enumerate(zip(locs, counts)):
        extra += n * C  # the fold: (1, n) @ (n, C)
        end = locs[s + 1] if s + 1 < len(locs) else depth
        L = P + k  # tokens without the fused one
        per_block = 12 * C * C + 2 * C * ((L + 1) ** 2 - L**2)  # qkv + proj + mlp (ratio 4), q k^T and attn v
        extra += (end - loc) * per_block
        n = k
    assert b.total - a.total == extra
    # `flops` and `bench` count other keep ratios on a twin of the loaded model: it fuses too.
    
    assert fused.at_keep_ratio(0.8).fuse_dropped
    assert count_macs(plain.at_keep_ratio(0.5)).total == a.total
    assert count_macs(fused.at_keep_ratio(0.5)).total == b.total
    # At keep ratio 1.0 nothing is dropped and nothing is added.
    plain.set_keep_ratio(1.0)
    fused.set_keep_ratio(1.0)
    assert count_macs(fused).total == count_macs(plain).total


@pytest.mark.parametrize("home", ["fuse_dropped", "merge_dropped"])
def test_export_with_fused_or_merged_tokens_and_dynamic_batch_matches_eager(home):
    model = tiny_model(keep_ratio=0.6, **{home: True}).eval()
    batch = torch.export.Dim("batch", min=1, max=256)
    program = torch.export.export(model, (torch.randn(2, 3, 32, 32),), dynamic_shapes={"x": {0: batch}})
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=0, atol=1e-6)


def test_fused_model_round_trips_through_save_and_load(tmp_path):
    model = tiny_model(keep_ratio=0.6, fuse_dropped=True).eval()
    model.set_keep_ratio_range((0.4, 1.0))
    path = dynamicvit.save_model(model, tmp_path / "fused.safetensors")
    settings = dynamicvit.weights.formats.read_settings(path)
    assert settings["fuse_dropped"] is True and settings["keep_ratio_range"] == [0.4, 1.0]
    loaded = dynamicvit.load_model(path).eval()
    assert loaded.fuse_dropped and loaded.keep_ratio_range == (0.4, 1.0) and loaded.keep_ratio == 0.6
    x = _x(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_a_checkpoint_written_before_fusion_loads_without_it_and_gives_the_same_logits():
    """tests/data/dynamicvit_v1.* were written by the code before fusion and elastic training (commit
    0ef47af): the model, and its logits at keep ratios 0.6 and 0.4 on fixed images."""
    from safetensors.torch import load_file

    model = dynamicvit.load_model(DATA / "dynamicvit_v1.safetensors").eval()
    settings = dynamicvit.weights.formats.read_settings(DATA / "dynamicvit_v1.safetensors")
    assert "fuse_dropped" not in settings and "keep_ratio_range" not in settings
    assert model.fuse_dropped is False and model.keep_ratio_range is None and model.keep_ratio == 0.6
    io = load_file(DATA / "dynamicvit_v1_outputs.safetensors")
    with torch.no_grad():
        out = model.forward_pruned(io["images"])
        torch.testing.assert_close(out.logits, io["logits"], rtol=0, atol=1e-6)
        assert torch.equal(out.kept_indices[-1], io["kept_last"])
        model.set_keep_ratio(0.4)
        torch.testing.assert_close(model(io["images"]), io["logits_at_0.4"], rtol=0, atol=1e-6)


def test_visualize_draws_a_fused_model(tmp_path):
    from dynamicvit.visualize import kept_token_masks, save_contact_sheet, stage_titles

    model = tiny_model(keep_ratio=0.5, fuse_dropped=True).eval()
    x = _x(model, batch=2)
    masks = kept_token_masks(model, x)
    assert masks.masks.shape == (2, 3, 8, 8)
    assert [int(m.sum()) for m in masks.masks[0]] == list(model.keep_counts()) and masks.fused
    assert stage_titles(masks.keep_counts, 64, masks.fused)[1] == "stage 1: 32/64 + fused"
    assert not kept_token_masks(tiny_model(keep_ratio=0.5), x).fused
    path = save_contact_sheet(model, x, tmp_path / "sheet.png", mean=(0.5,), std=(0.5,))
    assert Path(path).stat().st_size > 0
