"""Invariants of the timm adapter: dense equivalence, path agreement, token counts, gradients."""
import pytest
import timm
import torch

import dynamicvit
from dynamicvit import DynamicViT, DynamicViTOutput
from dynamicvit.errors import ConfigError, UnsupportedModelError

from conftest import pruned_with_block_inputs, tiny_kwargs, tiny_model

# Variants covering prefix tokens, LayerScale, qk-norm, pooling, position embedding styles, grids.
VARIANTS = {
    "vit": ("vit_tiny_patch16_224", {}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}),
    "registers_avgpool": ("vit_tiny_patch16_224", dict(reg_tokens=4, global_pool="avg", class_token=False, no_embed_class=True)),
    "registers_token": ("vit_tiny_patch16_224", dict(reg_tokens=2)),
    "layerscale_qknorm": ("vit_tiny_patch16_224", dict(init_values=0.1, qk_norm=True)),
    "deit3_noembedclass": ("deit3_small_patch16_224", dict(embed_dim=48, num_heads=3)),
    "img48_patch8": ("vit_tiny_patch16_224", dict(img_size=48, patch_size=8)),
    "nonsquare": ("vit_tiny_patch16_224", dict(img_size=(32, 48), patch_size=8)),
    # LV-ViT: convolution stem, residual branches / skip_lam, class head + 0.5 * max of the aux head.
    "lvvit_s": ("lvvit_s", {}),
    "lvvit_m_skip1_patch8": ("lvvit_m", dict(patch_size=8, skip_lam=1.0)),
    "lvvit_nonsquare": ("lvvit_s", dict(img_size=(32, 48), patch_size=8)),
}


def _images(model: DynamicViT, batch: int = 3, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    h, w = model.host.img_size
    return torch.randn(batch, model.host.in_chans, h, w)


# Every invariant holds with the dropped tokens fused into one extra token, or merged into the kept
# ones, too, and with slim prediction modules (width 8 instead of the model's).
VARIANT_IDS = (list(VARIANTS) + [f"{v}+fused" for v in VARIANTS] + [f"{v}+merged" for v in VARIANTS]
               + ["vit+slim", "registers_token+fused+slim", "lvvit_s+merged+slim"])


@pytest.fixture(params=VARIANT_IDS, ids=VARIANT_IDS)
def variant(request) -> DynamicViT:
    key, *options = request.param.split("+")
    name, kw = VARIANTS[key]
    model = tiny_model(name, fuse_dropped="fused" in options, merge_dropped="merged" in options,
                       predictor_width=8 if "slim" in options else None, **kw)
    assert all(p.in_conv[1].out_features == (8 if "slim" in options else model.embed_dim) for p in model.predictors)
    return model.eval()


def test_keep_ratio_one_reproduces_timm(variant):
    variant.set_keep_ratio(1.0)
    x = _images(variant)
    with torch.no_grad():
        torch.testing.assert_close(variant(x), variant.backbone(x), atol=1e-5, rtol=1e-4)


def test_training_path_with_all_tokens_kept_equals_dense(variant):
    x = _images(variant)
    ones = [torch.ones(x.shape[0], variant.num_patches)] * len(variant.prune_locs)
    with torch.no_grad():
        out = variant.forward_masked(x, decisions=ones)
        dense = variant.backbone.forward_features(x)
        torch.testing.assert_close(out.logits, variant.backbone.forward_head(dense), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out.tokens, variant.host.distill_targets(dense), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("keep_ratio", [0.7, 0.5])
def test_inference_and_training_paths_agree_on_kept_tokens(variant, keep_ratio):
    variant.set_keep_ratio(keep_ratio)
    x = _images(variant)
    with torch.no_grad():
        pruned = variant.forward_pruned(x)
        masks = []
        for idx in pruned.kept_indices:
            m = torch.zeros(x.shape[0], variant.num_patches)
            masks.append(m.scatter(1, idx, 1.0))
        masked = variant.forward_masked(x, decisions=masks)
    torch.testing.assert_close(pruned.logits, masked.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(masked.mask, masks[-1])


def test_token_counts_per_stage_and_prefix_tokens_kept(variant):
    x = _images(variant)
    out, seen = pruned_with_block_inputs(variant, x)
    N, P = variant.num_patches, variant.num_prefix_tokens
    counts = [int(N * variant.keep_ratio ** s) for s in range(1, len(variant.prune_locs) + 1)]
    assert list(variant.keep_counts()) == counts
    expected, stage = [], 0
    for i in range(len(variant.backbone.blocks)):
        if stage < len(variant.prune_locs) and i == variant.prune_locs[stage]:
            stage += 1
        # With fusion, one fused token follows the kept ones once a token has been dropped.
        expected.append(P + (counts[stage - 1] + variant.fuse_dropped if stage else N))
    assert [t.shape[1] for t in seen] == expected
    # The prefix tokens entering each pruning block are the very tokens that left the block before.
    outputs = [None]
    pruned_with_block_inputs(variant, x, outputs)
    for loc in variant.prune_locs:
        torch.testing.assert_close(seen[loc][:, :P], outputs[loc][:, :P])
    # Kept indices: right count, unique, in range, nested across stages.
    prev = None
    for idx, k in zip(out.kept_indices, counts):
        assert idx.shape == (x.shape[0], k)
        for b in range(x.shape[0]):
            s = set(idx[b].tolist())
            assert len(s) == k and all(0 <= i < N for i in s)
            if prev is not None:
                assert s <= set(prev[b].tolist())
        prev = idx


def test_every_parameter_gets_a_gradient(variant):
    variant.train()
    x = _images(variant, batch=4)
    out = variant(x)
    assert isinstance(out, DynamicViTOutput)
    logits = out.logits if torch.is_tensor(out.logits) else sum(out.logits)
    (logits.square().sum() + out.tokens.square().mean()).backward()
    missing = [n for n, p in variant.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient for {missing}"


def test_training_decisions_are_hierarchical():
    model = tiny_model().train()
    out = model(_images(model, batch=4))
    assert len(out.decisions) == 3
    for a, b in zip(out.decisions, out.decisions[1:]):
        assert (b <= a).all()
    torch.testing.assert_close(out.mask, out.decisions[-1].detach())
    assert out.tokens.shape == (4, model.num_patches, model.embed_dim)


def test_batch_independence_at_inference():
    model = tiny_model().eval()
    x = _images(model, batch=5)
    with torch.no_grad():
        batch = model.forward_pruned(x)
        for i in range(5):
            single = model.forward_pruned(x[i : i + 1])
            torch.testing.assert_close(single.logits[0], batch.logits[i], atol=1e-5, rtol=1e-4)
            for a, b in zip(single.kept_indices, batch.kept_indices):
                assert set(a[0].tolist()) == set(b[i].tolist())


def test_keep_ratio_can_change_at_inference():
    model = tiny_model(keep_ratio=0.7).eval()
    x = _images(model)
    with torch.no_grad():
        a = model.forward_pruned(x)
        model.set_keep_ratio(0.5)
        b = model.forward_pruned(x)
    assert [i.shape[1] for i in a.kept_indices] == [44, 31, 21]
    assert [i.shape[1] for i in b.kept_indices] == [32, 16, 8]
    with pytest.raises(ConfigError):
        model.set_keep_ratio(0.0)
    assert model.keep_ratio == 0.5  # a rejected value leaves the model as it was


def test_keep_scores_on_original_grid():
    model = tiny_model().eval()
    with torch.no_grad():
        out = model.forward_pruned(_images(model), return_scores=True)
    first, second = out.keep_scores[0], out.keep_scores[1]
    assert first.shape == (3, model.num_patches) and torch.isfinite(first).all()
    assert (first <= 0).all()  # log-probabilities
    # Stage 2 scores exist exactly for the tokens stage 1 kept.
    for b in range(3):
        finite = set(torch.nonzero(torch.isfinite(second[b])).flatten().tolist())
        assert finite == set(out.kept_indices[0][b].tolist())


def test_timm_registry_and_sparsify_share_weights():
    m = timm.create_model("dynamicvit_deit_small_patch16_224", keep_ratio=0.5, **tiny_kwargs())
    assert isinstance(m, DynamicViT) and m.keep_ratio == 0.5 and m.prune_locs == (1, 3, 4)
    dense = timm.create_model("vit_tiny_patch16_224", **tiny_kwargs())
    wrapped = dynamicvit.sparsify(dense, keep_ratio=0.8, prune_locs=[2, 4])
    assert wrapped.backbone is dense and wrapped.keep_counts() == (51, 40)
    assert wrapped.backbone.blocks[0].attn.qkv.weight is dense.blocks[0].attn.qkv.weight


def test_a_stage_keeps_at_least_one_patch_token():
    """int(64 * 0.2^3) = 0: the last stage keeps one token instead of none, on both paths."""
    model = tiny_model(keep_ratio=0.2).eval()
    assert model.keep_counts() == (12, 2, 1)
    x = _images(model)
    with torch.no_grad():
        out = model.forward_pruned(x)
    assert [i.shape[1] for i in out.kept_indices] == [12, 2, 1] and torch.isfinite(out.logits).all()


def test_default_prune_locs_follow_the_paper():
    assert dynamicvit.create_model("deit_small_patch16_224").prune_locs == (3, 6, 9)
    assert dynamicvit.create_model("deit_small_patch16_224").keep_counts() == (137, 96, 67)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(keep_ratio=0.0), "keep_ratio must be in (0, 1]"),
        (dict(keep_ratio=1.2), "keep_ratio must be in (0, 1]"),
        (dict(keep_ratio="high"), "keep_ratio must be a number"),
        (dict(prune_locs=[0, 3]), "out of range"),
        (dict(prune_locs=[2, 6]), "out of range"),
        (dict(prune_locs=[3, 2]), "not sorted"),
        (dict(prune_locs=[2, 2]), "repeats"),
        (dict(prune_locs=[]), "empty"),
        (dict(fuse_dropped=True, merge_dropped=True), "choose one"),
    ],
)
def test_validation_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_model(**kwargs)


def test_unsupported_models_are_rejected():
    with pytest.raises(UnsupportedModelError, match="did you mean deit_small_patch16_224"):
        dynamicvit.create_model("deit_smal_patch16_224")
    with pytest.raises(UnsupportedModelError, match="not a supported backbone"):
        dynamicvit.sparsify(timm.create_model("resnet18"))
    with pytest.raises(UnsupportedModelError, match="global_pool='map'"):
        tiny_model(global_pool="map")


@pytest.mark.parametrize("shape", [(1, 3, 64, 64), (1, 1, 32, 32), (3, 32, 32)])
def test_wrong_image_shape_is_our_clear_error_on_both_paths(shape):
    """Our check runs before timm's assertions, on the inference and the training path alike."""
    model = tiny_model()
    for train in (False, True):
        model.train(train)
        with pytest.raises(ConfigError, match=r"(3 channel\(s\) at 32x32 px)|(\(B, C, H, W\))"):
            model(torch.randn(*shape))


def test_fresh_predictors_start_at_the_target_keep_fractions():
    """Stage s of an untrained DynamicViT keeps about rho^s of the patch tokens in training."""
    torch.manual_seed(0)
    model = dynamicvit.create_model("deit_tiny_patch16_224", keep_ratio=0.6, img_size=64).train()
    decisions = model(torch.randn(32, 3, 64, 64)).decisions
    for s, d in enumerate(decisions, start=1):
        assert abs(d.float().mean().item() - 0.6**s) < 0.05, (s, d.float().mean().item())
