"""Merging dropped tokens: the math on its own, both paths of the model, MACs, export, checkpoints,
pictures, low budgets and the command-line flags.

(The invariants every variant meets, merged ones included: tests/test_model.py, the "+merged" ids; the
output at keep ratio 1.0 and torch.export: tests/test_fusion.py, parametrized over both homes.)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dynamicvit
from dynamicvit.core.losses import DynamicViTLoss, held_targets
from dynamicvit.core.ops import (carry_held, cosine_similarity, masked_softmax, merge_into_kept, merge_masked,
                                 policy_bias, scatter_merge, size_bias)
from dynamicvit.errors import CheckpointError, ConfigError
from dynamicvit.runtime.flops import count_macs

from conftest import pruned_with_block_inputs, tiny_model


def _x(model, batch=3, seed=1):
    torch.manual_seed(seed)
    h, w = model.host.img_size
    return torch.randn(batch, model.host.in_chans, h, w)


def _masks(model, kept_indices):
    return [torch.zeros(kept_indices[0].shape[0], model.num_patches).scatter(1, idx, 1.0) for idx in kept_indices]


# -- the math -------------------------------------------------------------------------------------


def test_cosine_similarity_is_torchs():
    torch.manual_seed(0)
    a, b = torch.randn(2, 5, 8), torch.randn(2, 3, 8)
    expected = F.cosine_similarity(a.unsqueeze(2), b.unsqueeze(1), dim=-1)  # (2, 5, 3)
    torch.testing.assert_close(cosine_similarity(a, b), expected)


def test_scatter_merge_hand_computed():
    kept = torch.tensor([[[1.0, 0.0], [0.0, 4.0]]])  # (B=1, k=2, C=2)
    dropped = torch.tensor([[[3.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])  # (1, 3, 2)
    target = torch.tensor([[0, 1, 0]])
    merged, sizes = scatter_merge(kept, torch.tensor([[1.0, 2.0]]), dropped, torch.tensor([[1.0, 2.0, 2.0]]), target)
    # token 0: (1 * (1, 0) + 1 * (3, 0) + 2 * (5, 5)) / 4; token 1: (2 * (0, 4) + 2 * (0, 1)) / 4
    torch.testing.assert_close(merged, torch.tensor([[[14 / 4, 10 / 4], [0.0, 10 / 4]]]))
    torch.testing.assert_close(sizes, torch.tensor([[4.0, 4.0]]))


def test_merge_into_kept_sends_each_dropped_token_to_its_most_similar_kept_one():
    torch.manual_seed(0)
    patches = torch.randn(3, 10, 6)
    keep = torch.stack([torch.randperm(10) for _ in range(3)])
    keep, drop = keep[:, :4], keep[:, 4:]
    merged, sizes, target = merge_into_kept(patches, None, keep, drop)
    assert merged.shape == (3, 4, 6) and sizes.shape == (3, 4) and target.shape == (3, 6)
    for b in range(3):
        kept, dropped = patches[b, keep[b]], patches[b, drop[b]]
        sim = F.cosine_similarity(dropped.unsqueeze(1), kept.unsqueeze(0), dim=-1)  # (6, 4)
        assert torch.equal(target[b], sim.argmax(1))
        for j in range(4):
            group = [kept[j]] + [dropped[i] for i in range(6) if target[b, i] == j]
            torch.testing.assert_close(merged[b, j], torch.stack(group).mean(0))
            assert sizes[b, j] == len(group)


@pytest.mark.parametrize("start", ["ones", "random"])
def test_sizes_are_conserved(start):
    torch.manual_seed(0)
    patches = torch.randn(2, 12, 4)
    sizes = torch.ones(2, 12) if start == "ones" else torch.randint(1, 5, (2, 12)).float()
    order = torch.stack([torch.randperm(12) for _ in range(2)])
    _, out, _ = merge_into_kept(patches, sizes, order[:, :5], order[:, 5:])
    torch.testing.assert_close(out.sum(1), sizes.sum(1))
    # What a merged token holds is conserved too: the size-weighted sum of all tokens.
    merged, out, _ = merge_into_kept(patches, sizes, order[:, :5], order[:, 5:])
    torch.testing.assert_close((merged * out.unsqueeze(-1)).sum(1), (patches * sizes.unsqueeze(-1)).sum(1))


def test_a_token_merged_into_itself_is_unchanged():
    torch.manual_seed(0)
    kept = torch.randn(1, 3, 5)
    # A kept token that receives nothing is itself, exactly at size 1 and to rounding at other sizes.
    merged, sizes = scatter_merge(kept, torch.ones(1, 3), kept[:, :1], torch.ones(1, 1), torch.tensor([[0]]))
    assert torch.equal(merged[:, 1:], kept[:, 1:]) and torch.equal(sizes, torch.tensor([[2.0, 1.0, 1.0]]))
    # A dropped copy of a kept token leaves it unchanged whatever the sizes.
    torch.testing.assert_close(merged[:, 0], kept[:, 0])
    merged, _ = scatter_merge(kept, torch.tensor([[3.0, 1.0, 2.0]]), kept[:, 2:], torch.tensor([[5.0]]), torch.tensor([[2]]))
    torch.testing.assert_close(merged, kept)


def test_merge_gradients_reach_tokens_and_sizes():
    torch.manual_seed(0)
    patches = torch.randn(2, 8, 4, requires_grad=True)
    sizes = torch.ones(2, 8, requires_grad=True)
    order = torch.stack([torch.randperm(8) for _ in range(2)])
    merged, out, _ = merge_into_kept(patches, sizes, order[:, :3], order[:, 3:])
    (merged.square().sum() + out.square().sum()).backward()
    assert torch.isfinite(patches.grad).all() and (patches.grad.abs().sum(-1) > 0).all()  # every token counts
    assert torch.isfinite(sizes.grad).all() and sizes.grad.abs().sum() > 0


def test_sizes_stay_exact_in_half_precision():
    """Sizes are fp32 whatever the tokens' dtype: bf16 counts exactly only up to 256."""
    patches = torch.randn(1, 600, 4).to(torch.bfloat16)
    keep, drop = torch.arange(1).view(1, 1), torch.arange(1, 600).view(1, -1)
    merged, sizes, _ = merge_into_kept(patches, None, keep, drop)
    assert merged.dtype == torch.bfloat16 and sizes.dtype == torch.float32 and sizes.item() == 600


def test_merge_masked_computes_merge_into_kept_for_the_same_decisions():
    torch.manual_seed(0)
    B, N, C, k = 3, 10, 6, 4
    patches, sizes = torch.randn(B, N, C), torch.randint(1, 4, (B, N)).float()
    order = torch.stack([torch.randperm(N) for _ in range(B)])
    keep, drop = order[:, :k], order[:, k:]
    merged, out, target = merge_into_kept(patches, sizes, keep, drop)
    decision = torch.zeros(B, N).scatter(1, keep, 1.0)
    masked, masked_sizes, went = merge_masked(patches, sizes, decision, 1.0 - decision)
    torch.testing.assert_close(masked.gather(1, keep.unsqueeze(-1).expand(-1, -1, C)), merged)
    torch.testing.assert_close(masked_sizes.gather(1, keep), out)
    assert torch.equal(went.gather(1, drop), keep.gather(1, target))  # where each dropped token went
    # Dropped tokens keep their values and sizes (attention masks them out).
    assert torch.equal(masked.gather(1, drop.unsqueeze(-1).expand(-1, -1, C)), patches.gather(1, drop.unsqueeze(-1).expand(-1, -1, C)))
    assert torch.equal(masked_sizes.gather(1, drop), sizes.gather(1, drop))


def test_merge_masked_merges_only_the_tokens_dropped_now():
    patches = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]]])
    keep = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    dropped = torch.tensor([[0.0, 1.0, 0.0, 0.0]])  # token 3 was dropped at an earlier stage
    out, sizes, _ = merge_masked(patches, torch.ones(1, 4), keep, dropped)
    torch.testing.assert_close(out[0, 0], torch.tensor([1.0, 0.05]))
    assert torch.equal(out[0, 2], patches[0, 2]) and torch.equal(sizes, torch.tensor([[2.0, 1.0, 1.0, 1.0]]))


def test_merge_masked_gradient_reaches_the_decisions_and_stays_finite_when_everything_is_dropped():
    torch.manual_seed(0)
    patches = torch.randn(2, 6, 4, requires_grad=True)
    keep = torch.tensor([[1.0, 0, 1, 0, 0, 1], [0, 0, 0, 0, 0, 0]], requires_grad=True)  # image 2 keeps nothing
    dropped = (1.0 - keep.detach()).requires_grad_()
    out, sizes, _ = merge_masked(patches, torch.ones(2, 6), keep, dropped)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], patches[1])  # nothing kept: nothing merged
    (out.square().sum() + sizes.sum()).backward()
    for t in (patches, keep, dropped):
        assert torch.isfinite(t.grad).all()
    assert dropped.grad[0].abs().sum() > 0 and keep.grad[0].abs().sum() > 0


def test_proportional_attention_counts_a_merged_token_as_the_tokens_it_holds():
    """A token of size s draws the attention of s identical tokens: softmax(A + log s) on the merged
    sequence equals the plain softmax on the sequence with the token repeated s times."""
    torch.manual_seed(0)
    q, kv = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 3, 8)
    repeated = torch.cat([kv, kv[:, :, 2:].expand(-1, -1, 2, -1)], dim=2)  # token 2 three times
    expected = F.scaled_dot_product_attention(q, repeated, repeated)
    sizes = torch.tensor([[1.0, 1.0, 3.0]])
    got = F.scaled_dot_product_attention(q, kv, kv, attn_mask=size_bias(sizes))
    torch.testing.assert_close(got, expected)


def test_masked_softmax_and_policy_bias_take_the_sizes_alike():
    torch.manual_seed(0)
    a = torch.randn(2, 3, 6, 6)
    policy = torch.tensor([[1.0, 1, 0, 1, 1, 0], [1, 0, 1, 1, 0, 1]])
    sizes = torch.tensor([[1.0, 2, 1, 4, 1, 1], [1, 1, 3, 1, 1, 2]])
    explicit = masked_softmax(a, policy, sizes)
    fused = (a + policy_bias(policy, sizes=sizes)).softmax(-1)
    torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=1e-4)
    # On the kept keys: the proportional softmax of the inference path.
    kept = policy[0].bool()
    inference = (a[0][:, kept][:, :, kept] + size_bias(sizes[:1, kept])[0]).softmax(-1)
    torch.testing.assert_close(explicit[0][:, kept][:, :, kept], inference, atol=1e-5, rtol=1e-4)


# -- the model ------------------------------------------------------------------------------------


def test_fuse_and_merge_exclude_each_other_and_merging_is_for_vits():
    with pytest.raises(ConfigError, match="choose one"):
        tiny_model(fuse_dropped=True, merge_dropped=True)
    with pytest.raises(ConfigError, match="merge_dropped applies to ViTs only"):
        dynamicvit.create_model("convnext_tiny", merge_dropped=True, img_size=64, num_classes=10)


@pytest.mark.parametrize("keep_ratio", [0.7, 0.5])
def test_the_tokens_after_a_stage_are_the_size_weighted_merges(keep_ratio):
    model = tiny_model(keep_ratio=keep_ratio, merge_dropped=True).eval()
    x = _x(model)
    out, seen = pruned_with_block_inputs(model, x)
    P, N, k = model.num_prefix_tokens, model.num_patches, model.keep_counts()[0]
    loc = model.prune_locs[0]
    with torch.no_grad():
        tokens = model.backbone.blocks[loc - 1](seen[loc - 1])  # the tokens the first predictor scored
        score = model.predictors[0].keep_score(tokens, P)
    with torch.no_grad():
        holders = model.forward_pruned(x, return_scores=True).merged_into[0]
    for b in range(x.shape[0]):
        keep = out.kept_indices[0][b]
        assert set(keep.tolist()) == set(score[b].topk(k).indices.tolist())
        patches = tokens[b, P:]
        dropped = [i for i in range(N) if i not in set(keep.tolist())]
        sim = F.cosine_similarity(patches[dropped].unsqueeze(1), patches[keep].unsqueeze(0), dim=-1)
        target = sim.argmax(1)
        for j in range(k):
            group = [keep[j].item()] + [dropped[i] for i in range(len(dropped)) if target[i] == j]
            torch.testing.assert_close(seen[loc][b, P + j], patches[group].mean(0), atol=1e-5, rtol=1e-4)
            assert set(torch.nonzero(holders[b] == keep[j]).flatten().tolist()) == set(group)


def test_merged_into_follows_every_patch_to_the_token_that_holds_it():
    model = tiny_model(keep_ratio=0.5, merge_dropped=True).eval()
    x = _x(model)
    with torch.no_grad():
        out = model.forward_pruned(x, return_scores=True)
        plain = model.forward_pruned(x)
    torch.testing.assert_close(out.logits, plain.logits, atol=1e-5, rtol=1e-4)
    assert len(out.merged_into) == len(model.prune_locs)
    previous = None
    for kept, holder in zip(out.kept_indices, out.merged_into):
        assert holder.shape == (x.shape[0], model.num_patches)
        for b in range(x.shape[0]):
            holders = set(holder[b].tolist())
            assert holders == set(kept[b].tolist())  # every kept token holds at least itself, nothing else holds
            assert all(holder[b, j] == j for j in kept[b].tolist())
            if previous is not None:  # a patch's holder after stage s is where its holder before it went
                assert torch.equal(holder[b], holder[b][previous[b]])
        previous = holder
    assert tiny_model(keep_ratio=0.5).eval().forward_pruned(x, return_scores=True).merged_into is None


def test_carry_held_adds_the_rows_of_the_tokens_that_moved():
    held = torch.eye(4).unsqueeze(0)
    held = carry_held(held, torch.tensor([[0, 0, 2, 3]]), torch.tensor([[1.0, 1.0, 1.0, 1.0]]))  # 1 into 0
    held = carry_held(held, torch.tensor([[2, 1, 2, 3]]), torch.tensor([[1.0, 0.0, 1.0, 0.0]]))  # 0 into 2; 1, 3 gone
    assert torch.equal(held[0, 2], torch.tensor([1.0, 1.0, 1.0, 0.0]))  # token 2 holds patches 0, 1 and 2
    assert torch.equal(held[0, 3], torch.tensor([0.0, 0.0, 0.0, 1.0]))  # dropped earlier: its row as it was


@pytest.mark.parametrize("keep_ratio", [0.7, 0.4])
def test_the_training_path_holds_the_patches_the_inference_path_merged(keep_ratio):
    """For the inference path's decisions, `DynamicViTOutput.held` says which original patches each kept
    token holds at the end, as `merged_into` does on the inference path, and its rows sum to the sizes."""
    model = tiny_model(keep_ratio=keep_ratio, merge_dropped=True).eval()
    x = _x(model)
    with torch.no_grad():
        pruned = model.forward_pruned(x, return_scores=True)
        masked = model.forward_masked(x, decisions=_masks(model, pruned.kept_indices))
    holder, kept = pruned.merged_into[-1], pruned.kept_indices[-1]
    expected = torch.zeros(x.shape[0], model.num_patches, model.num_patches)
    expected.scatter_(1, holder.unsqueeze(1), 1.0)  # expected[b, holder[b, o], o] = 1
    rows = kept.unsqueeze(-1).expand(-1, -1, model.num_patches)
    assert torch.equal(masked.held.gather(1, rows), expected.gather(1, rows))
    assert masked.held.gather(1, rows).sum() == x.shape[0] * model.num_patches  # every patch held once
    assert tiny_model(keep_ratio=keep_ratio).eval().forward_masked(x).held is None


def test_held_targets_average_the_teachers_tokens_over_the_patches_a_token_holds():
    teacher = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [5.0, 4.0]]])
    held = torch.tensor([[[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])  # token 0 holds 0 and 1
    torch.testing.assert_close(held_targets(held, teacher)[0, [0, 2]], torch.tensor([[2.0, 1.0], [5.0, 4.0]]))
    torch.testing.assert_close(held_targets(torch.eye(3).unsqueeze(0), teacher), teacher)


def test_the_held_token_target_changes_the_loss_only_where_tokens_were_merged():
    torch.manual_seed(0)
    model = tiny_model(keep_ratio=0.5, merge_dropped=True).train()
    x, y = _x(model, batch=4), torch.arange(4)
    losses = {t: DynamicViTLoss(0.5, token_target=t) for t in ("position", "held")}
    ones = [torch.ones(4, model.num_patches)] * len(model.prune_locs)
    out = model.forward_masked(x, decisions=ones)  # nothing dropped: both targets are the teacher's tokens
    teacher_tokens = torch.randn_like(out.tokens)
    assert torch.equal(losses["position"](out, y, None, teacher_tokens)[0], losses["held"](out, y, None, teacher_tokens)[0])
    out = model(x, keep_ratio=0.5)
    position, held = (losses[t](out, y, None, teacher_tokens)[1]["token"] for t in losses)
    assert not torch.allclose(position, held)
    keep = out.mask > 0.5
    torch.testing.assert_close(held, F.mse_loss(out.tokens[keep], held_targets(out.held, teacher_tokens)[keep]).detach())
    with pytest.raises(ValueError, match="token_target"):
        DynamicViTLoss(0.5, token_target="mean")


def test_held_is_built_only_for_the_loss_that_reads_it(monkeypatch):
    """The training path records each merge's (target, moved); `held` is folded from them on read, so the
    default token target never pays for the (B, N, N) tensor."""
    import dynamicvit.core.base as base

    torch.manual_seed(0)
    model = tiny_model(keep_ratio=0.5, merge_dropped=True).train()
    x, y = _x(model, batch=3), torch.arange(3)
    out = model(x, keep_ratio=0.5)
    assert len(out.merges) == len(model.prune_locs)
    steps = torch.eye(model.num_patches).expand(3, -1, -1)
    for target, moved in out.merges:
        steps = carry_held(steps, target, moved)
    assert torch.equal(out.held, steps)
    teacher_tokens = torch.randn_like(out.tokens)
    built = []
    monkeypatch.setattr(base, "held_after", lambda merges: built.append(1) or steps)
    DynamicViTLoss(0.5, token_target="position")(out, y, None, teacher_tokens)
    assert built == []
    DynamicViTLoss(0.5, token_target="held")(out, y, None, teacher_tokens)
    assert built == [1]


def test_the_fused_masked_attention_takes_the_sizes_too():
    """With the training path's fused kernel (`fused_masked_attention`) the paths still agree."""
    from dynamicvit.runtime.speedups import fused_masked_attention

    model = fused_masked_attention(tiny_model(keep_ratio=0.5, merge_dropped=True).eval())
    x = _x(model)
    with torch.no_grad():
        pruned = model.forward_pruned(x)
        masked = model.forward_masked(x, decisions=_masks(model, pruned.kept_indices))
    torch.testing.assert_close(masked.logits, pruned.logits, atol=1e-4, rtol=1e-4)


def test_training_path_samples_and_merges_with_gradient_into_the_predictors():
    model = tiny_model(keep_ratio=0.5, merge_dropped=True).train()
    out = model(_x(model, batch=4), keep_ratio=0.4)
    (out.logits.square().sum() + out.tokens.square().mean()).backward()
    for predictor in model.predictors:
        assert sum(p.grad.abs().sum() for p in predictor.parameters()) > 0


def test_batch_independence_of_the_merged_inference_path():
    model = tiny_model(keep_ratio=0.5, merge_dropped=True).eval()
    x = _x(model, batch=4)
    with torch.no_grad():
        batch = model(x)
        for i in range(4):
            torch.testing.assert_close(model(x[i : i + 1])[0], batch[i], atol=1e-5, rtol=1e-4)


def test_macs_count_the_similarity_and_the_scatter():
    """Per stage that drops m = n - k of n tokens: the similarity of every dropped token with every
    kept one (m * k * C) and the scatter-adds of the size-weighted sums (m * C) and of the sizes (m).
    Attention with the size bias costs what attention costs."""
    plain, merged = tiny_model(keep_ratio=0.5), tiny_model(keep_ratio=0.5, merge_dropped=True)
    a, b = count_macs(plain), count_macs(merged)
    C, n, extra = plain.embed_dim, plain.num_patches, 0
    for k in plain.keep_counts():
        m = n - k
        extra += m * k * C + m * C + m
        n = k
    assert b.total - a.total == extra and not b.uncounted
    assert b.by_kind["scatter"] == sum(m * (C + 1) for m in (64 - 32, 32 - 16, 16 - 8))
    assert count_macs(merged.at_keep_ratio(0.7)).total == count_macs(tiny_model(keep_ratio=0.7, merge_dropped=True)).total
    merged.set_keep_ratio(1.0)
    plain.set_keep_ratio(1.0)
    assert count_macs(merged).total == count_macs(plain).total


def test_onnx_export_of_a_merged_model_is_verified(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from dynamicvit.runtime.deploy import OnnxModel, export_onnx

    model = tiny_model(keep_ratio=0.5, merge_dropped=True).eval()
    result = export_onnx(model, tmp_path / "merged.onnx", class_names=[str(i) for i in range(10)])
    assert result.verification.passed and result.verification.kept_agreement == 1.0
    assert result.metadata["merge_dropped"] is True
    x = _x(model, batch=3)
    with torch.no_grad():
        torch.testing.assert_close(OnnxModel(result.path)(x), model(x), atol=1e-4, rtol=1e-4)


def test_merged_model_round_trips_through_save_and_load(tmp_path):
    model = tiny_model(keep_ratio=0.6, merge_dropped=True).eval()
    model.set_keep_ratio_range((0.25, 1.0))
    path = dynamicvit.save_model(model, tmp_path / "merged.safetensors")
    settings = dynamicvit.weights.formats.read_settings(path)
    assert settings["merge_dropped"] is True and "fuse_dropped" not in settings
    loaded = dynamicvit.load_model(path).eval()
    assert loaded.merge_dropped and not loaded.fuse_dropped and loaded.keep_ratio_range == (0.25, 1.0)
    x = _x(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="merge_dropped=True, but merge_dropped=False"):
        dynamicvit.create_model("vit_tiny_patch16_224", checkpoint_path=path, merge_dropped=False)
    plain = dynamicvit.create_model("vit_tiny_patch16_224", checkpoint_path=path)
    assert plain.merge_dropped  # the checkpoint's setting


@pytest.mark.parametrize("settings, message", [
    ({"merge_dropped": "yes"}, "merge_dropped 'yes'; expected true or false"),
    ({"merge_dropped": True, "fuse_dropped": True}, "exclude each other"),
])
def test_bad_merge_settings_in_a_checkpoint_are_refused(settings, message):
    from dynamicvit.weights.formats import check_settings

    base = {"kind": "dynamicvit", "model_name": "vit_tiny_patch16_224", "keep_ratio": 0.5, "prune_locs": [1, 3, 4]}
    with pytest.raises(CheckpointError, match=message):
        check_settings({**base, **settings}, "model.safetensors")


def test_visualize_shows_where_the_dropped_tokens_went(tmp_path):
    from dynamicvit.visualize import kept_token_masks, merge_outlines, save_contact_sheet, stage_titles

    model = tiny_model(keep_ratio=0.5, merge_dropped=True).eval()
    x = _x(model, batch=2)
    masks = kept_token_masks(model, x)
    assert masks.merged_into.shape == (2, 3, 8, 8) and masks.merged and not masks.fused
    # Every patch's holder is a kept patch of that stage.
    for s in range(3):
        kept = masks.masks[0, s].reshape(-1)
        assert kept[masks.merged_into[0, s].reshape(-1)].all()
    assert stage_titles(masks.keep_counts, 64, merged=True)[1] == "stage 1: 32/64 + merged"
    # Outlines run between patches of different groups (a group: a token holding more than its own
    # patch), on the last pixel row or column of the upper or left patch, and nowhere else.
    holder = np.array([[0, 0, 2], [3, 4, 2], [3, 7, 8]])  # token 0 holds 0 and 1; 2 holds 2 and 5; 3: 3, 6
    edges = merge_outlines(holder, (4, 4), (12, 12))
    assert edges[3, :4].all() and edges[3, 4:8].all()  # 0 | 3 below it, 1 | 4 below it
    assert not edges[:3, 3].any()  # 0 and 1 are one group
    assert edges[4:7, 7].all()  # 4 | 5: a singleton next to a group
    assert edges[8:11, 3].all() and not edges[8:11, 7].any()  # 6 (group 3) | 7, but 7 | 8 both alone
    assert not edges[7, 4:7].any()  # 4 above 7: both alone
    assert not edges[1:3, 1:3].any()  # inside a patch
    real = merge_outlines(masks.merged_into[0, 0], model.patch_size, (32, 32))
    assert real.any() and real.sum() < 32 * 32 / 2
    assert kept_token_masks(tiny_model(keep_ratio=0.5), x).merged_into is None
    path = save_contact_sheet(model, x, tmp_path / "sheet.png", mean=(0.5,), std=(0.5,))
    assert Path(path).stat().st_size > 0
    assert masks[1].merged_into.shape == (1, 3, 8, 8)


# -- low budgets ----------------------------------------------------------------------------------


def test_keep_ratio_quarter_on_the_demo_grid_and_elastic_training_over_the_whole_range():
    """The demo's model: a 7 x 7 grid, stages before blocks 2, 3 and 4."""
    model = tiny_model(img_size=28, patch_size=4, in_chans=1, prune_locs=(2, 3, 4), keep_ratio=0.25,
                       merge_dropped=True)
    assert model.keep_counts() == (12, 3, 1)
    model.set_keep_ratio(0.7)
    model.set_keep_ratio_range((0.25, 1.0))
    model.train()
    x = _x(model, batch=4)
    from dynamicvit.core.settings import KeepRatioSampler
    import random

    sampler = KeepRatioSampler.parse("low:0.25:1.0")
    for rho in (0.25, sampler.sample(random.Random(0)), 1.0):
        out = model(x, keep_ratio=rho)
        assert torch.isfinite(out.logits).all()
    model.eval()
    model.set_keep_ratio(0.25)
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


# -- command line ---------------------------------------------------------------------------------


def test_train_and_demo_take_merge_dropped():
    import argparse

    from dynamicvit.commands import demo as demo_cmd, train as train_cmd
    from dynamicvit.demo import DemoConfig

    parser = argparse.ArgumentParser()
    train_cmd.add_arguments(parser)
    cfg = train_cmd.config_from_args(parser.parse_args(["--keep-ratios", "low:0.25:1.0", "--merge-dropped"]))
    assert cfg.merge_dropped is True and cfg.fuse_dropped is False
    with pytest.raises(ConfigError, match="choose one"):
        train_cmd.config_from_args(parser.parse_args(["--merge-dropped", "--fuse-dropped"]))
    assert cfg.token_target == "position"
    cfg = train_cmd.config_from_args(parser.parse_args(["--merge-dropped", "--token-target", "held"]))
    assert cfg.token_target == "held"
    from dynamicvit.training.models import build_criterion
    assert build_criterion(tiny_model(merge_dropped=True), cfg).token_target == "held"
    with pytest.raises(SystemExit):
        parser.parse_args(["--token-target", "mean"])
    with pytest.raises(ConfigError, match="token_target must be one of position, held"):
        dynamicvit.TrainConfig(token_target="mean").validate()
    with pytest.raises(ConfigError, match="token_target must be one of position, held"):
        DemoConfig(token_target="mean").validate()
    with pytest.raises(ConfigError, match="'held' is the target of merged tokens: add --merge-dropped"):
        train_cmd.config_from_args(parser.parse_args(["--token-target", "held"]))
    with pytest.raises(ConfigError, match="'held' is the target of merged tokens: add --merge-dropped"):
        DemoConfig(token_target="held").validate()
    parser = argparse.ArgumentParser()
    demo_cmd.add_arguments(parser)
    args = parser.parse_args(["--merge-dropped"])
    cfg = DemoConfig(keep_ratios=args.keep_ratios, fuse_dropped=args.fuse_dropped, merge_dropped=args.merge_dropped)
    assert cfg.merge_dropped and not cfg.fuse_dropped  # merging replaces the recipe's fusion
    with pytest.raises(ConfigError, match="choose one"):
        DemoConfig(fuse_dropped=True, merge_dropped=True).validate()
    assert demo_cmd.config_from_args(args).token_target == "position"
    cfg = demo_cmd.config_from_args(parser.parse_args(["--merge-dropped", "--token-target", "held", "--prune-locs", "1,2,3,4,5"]))
    assert (cfg.token_target, cfg.merge_dropped, cfg.prune_locs) == ("held", True, (1, 2, 3, 4, 5))
    with pytest.raises(ConfigError, match="'held' is the target of merged tokens: add --merge-dropped"):
        demo_cmd.config_from_args(parser.parse_args(["--token-target", "held"])).validate()
    with pytest.raises(SystemExit):
        parser.parse_args(["--token-target", "mean"])


def test_the_commands_take_a_merged_checkpoint(tmp_path, capsys):
    """flops, bench and visualize read a merged model's file and keep it merged (export: above)."""
    import json

    import numpy as np
    from PIL import Image

    from dynamicvit import cli

    model = tiny_model(keep_ratio=0.5, merge_dropped=True).eval()
    path = dynamicvit.save_model(model, tmp_path / "merged.safetensors")
    assert cli.main(["flops", "--checkpoint", str(path), "--keep-ratio", "0.7", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    twin = model.at_keep_ratio(0.7)
    assert report["macs"] == count_macs(twin).total and report["by_kind_gmacs"]["scatter"] > 0
    assert cli.main(["flops", "--checkpoint", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "dropped ones merged" in printed and "scatter" in printed
    assert cli.main(["bench", "--checkpoint", str(path), "--keep-ratios", "0.5", "--batch-size", "2", "--repeats", "1",
                     "--warmup", "0", "--threads", "1", "--device", "cpu", "--json", str(tmp_path / "bench.json")]) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())
    assert rows[-1]["keep_ratio"] == 0.5 and rows[-1]["gmacs"] == count_macs(model).gmacs
    (tmp_path / "in").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "in" / "a.png")
    assert cli.main(["visualize", "--checkpoint", str(path), "--output", str(tmp_path / "pics"), str(tmp_path / "in")]) == 0
    assert list((tmp_path / "pics").glob("*.png"))


def test_dropped_speed_benchmark_times_the_three_homes_on_the_same_tokens():
    """benchmarks/dropped_speed.py: plain, fused and merged share backbone and predictors, keep as many
    tokens at one keep ratio, and merging costs MACs on top of discarding."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("dropped_speed", Path(__file__).resolve().parent.parent / "benchmarks" / "dropped_speed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.parse_args(["--model", "vit_tiny_patch16_224", "--model-kwargs", "img_size=32,patch_size=4,depth=6",
                             "--keep-ratios", "0.5", "--batch-sizes", "2", "--repeats", "1", "--warmup", "0", "--threads", "1"])
    models = bench.build_models(args)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        kept = {v: models[(v, 0.5)].forward_pruned(x).kept_indices for v in bench.VARIANTS}
    for v in ("fused", "merged"):  # the first stage sees the same tokens; later ones what the homes made of them
        assert torch.equal(kept["plain"][0].sort(1).values, kept[v][0].sort(1).values)
        assert [k.shape for k in kept[v]] == [k.shape for k in kept["plain"]]
    assert models[("merged", 0.5)].backbone is models[("plain", 0.5)].backbone
    macs = {v: count_macs(models[(v, 0.5)]).total for v in bench.VARIANTS}
    assert macs["merged"] > macs["plain"] and macs["fused"] > macs["plain"]
    rows = bench.measure(args)
    assert {r["variant"] for r in rows} == set(bench.VARIANTS)
    assert next(r for r in rows if r["variant"] == "fused")["vs_fused"] == 1.0
    assert "| 2 | 0.5 | merged |" in bench.table(rows)
