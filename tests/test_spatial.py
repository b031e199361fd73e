"""Invariants of DynamicSpatial (ConvNeXt, Swin): dense equivalence, path agreement, kept counts,
shapes of a dense-prediction backbone, gradients, settings, and the objective."""
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import dynamicvit
from dynamicvit.weights.build import create_backbone
from dynamicvit.errors import ConfigError, UnsupportedModelError
from dynamicvit.core.losses import DynamicSpatialLoss, stage_ratio_loss
from dynamicvit.core.settings import default_stage_ratios
from dynamicvit.core.spatial import DynamicSpatial, dense_targets

from conftest import scramble

IMG = 96  # stage-3 maps of 6 x 6 = 36 positions
# Tiny versions of the timm classes: 4 blocks in stage 3, predictors before blocks 1, 2, 3 (as for -T).
SPATIAL = {
    # ConvNeXt takes any size; img_size (turned into its pretrained config) sets the one it is for.
    "convnext": ("convnext_tiny", dict(depths=(1, 1, 4, 1), dims=(16, 32, 64, 128), img_size=IMG)),
    # window 3: stage 3 (6 x 6) has shifted windows with masks, stage 4 (3 x 3) one window.
    "swin": ("swin_tiny_patch4_window7_224", dict(depths=(1, 1, 4, 1), embed_dim=16, num_heads=(1, 2, 4, 8), window_size=3, img_size=IMG)),
}


def tiny_spatial(family: str, keep_ratio: float = 0.7, **overrides) -> DynamicSpatial:
    """A tiny DynamicSpatial with weights large enough that every part of a block matters: fresh
    layer scales (1e-6) would hide FFN and fast path, fresh predictors score all positions alike."""
    name, kw = SPATIAL[family]
    torch.manual_seed(0)
    kw = {**kw, "num_classes": 10, "drop_path_rate": 0.0, **overrides}
    model = dynamicvit.create_model(name, keep_ratio=keep_ratio, prune_locs=(1, 2, 3), **kw)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("gamma"):
                p.uniform_(0.2, 0.6)
        for fast in model.fast_paths.values():
            scramble(fast.fc)
    for predictor in model.predictors:
        scramble(predictor)
    return model


def images(batch: int = 2, size: int = IMG, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(batch, 3, size, size)


@pytest.fixture(params=list(SPATIAL))
def family(request) -> str:
    return request.param


def test_all_positions_on_the_full_path_equal_the_dense_model(family):
    model = tiny_spatial(family, keep_ratio=1.0, stage_ratios=(1.0, 1.0, 1.0)).eval()
    x = images()
    ones = [torch.ones(2, model.num_patches)] * 3
    with torch.no_grad():
        dense = model.backbone(x)
        torch.testing.assert_close(model(x), dense, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.forward_features(x), model.backbone.forward_features(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.forward_masked(x, decisions=ones).logits, dense, atol=1e-5, rtol=1e-5)
    # The fast paths are real: sending positions there changes the output.
    model.set_keep_ratio(0.7)
    with torch.no_grad():
        assert (model(x) - dense).abs().max() > 1e-3


@pytest.mark.parametrize("keep_ratio", [0.7, 0.9])
def test_training_and_inference_paths_agree_on_the_same_decisions(family, keep_ratio):
    model = tiny_spatial(family, keep_ratio).eval()
    x = images()
    with torch.no_grad():
        pruned = model.forward_pruned(x)
        masks = [torch.zeros(2, model.num_patches).scatter(1, k, 1.0) for k in pruned.kept_indices]
        # Decisions flip between predictors here (not hierarchical), which the streams must follow.
        assert any(bool((a != b).any()) for a, b in zip(masks, masks[1:]))
        masked = model.forward_masked(x, decisions=masks)
        again = model.forward_pruned(x, kept=pruned.kept_indices)
    torch.testing.assert_close(masked.logits, pruned.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again.logits, pruned.logits)
    torch.testing.assert_close(masked.mask, masks[-1])


def test_authors_streams_agree_when_decisions_do_not_flip_and_differ_when_they_do(family):
    model = tiny_spatial(family, restart_streams=False).eval()
    x = images()
    with torch.no_grad():
        pruned = model.forward_pruned(x)
        masks = [torch.zeros(2, model.num_patches).scatter(1, k, 1.0) for k in pruned.kept_indices]
        flipped = model.forward_masked(x, decisions=masks).logits
        same = [masks[0]] * 3
        steady = model.forward_masked(x, decisions=same).logits
        pruned_same = model.forward_pruned(x, kept=[pruned.kept_indices[0]] * 3).logits
    torch.testing.assert_close(steady, pruned_same, atol=1e-5, rtol=1e-5)
    # A position whose decision flips carries its other stream's stale value in the authors' version.
    assert (flipped - pruned.logits).abs().max() > 1e-4


@pytest.mark.parametrize("keep_ratio", [0.7, 0.9, 0.5])
def test_kept_counts_per_stage_are_int_n_r_s(family, keep_ratio):
    model = tiny_spatial(family, keep_ratio).eval()
    N = model.num_patches
    assert N == 36 and model.grid_size == (6, 6)
    ratios = (keep_ratio, keep_ratio - 0.2, keep_ratio - 0.4)
    assert model.stage_ratios == pytest.approx(ratios)
    counts = [int(N * r) for r in default_stage_ratios(keep_ratio, 3)]
    assert list(model.keep_counts()) == counts
    seen = []
    # Positions per image each block's FFN sees (its input is (..., C) with the batch of 2 folded in).
    hooks = [b.mlp.register_forward_pre_hook(lambda m, a: seen.append(a[0][..., 0].numel() // 2)) for b in model.host.blocks]
    with torch.no_grad():
        out = model.forward_pruned(images())
    for h in hooks:
        h.remove()
    assert [k.shape[1] for k in out.kept_indices] == counts
    for k in out.kept_indices:
        assert all(len(set(row.tolist())) == row.numel() for row in k)  # distinct positions
    # Block 0 runs dense on the whole map; blocks 1, 2, 3 run their FFN on exactly the kept positions.
    assert seen == [N, *counts]


def test_decisions_are_not_hierarchical_and_sampled_hard(family):
    model = tiny_spatial(family).train()
    out = model(images(batch=4))
    assert len(out.decisions) == 3
    for d in out.decisions:
        assert d.shape == (4, model.num_patches)
        assert set(d.detach().unique().tolist()) <= {0.0, 1.0}
    # Each predictor scores every position: a later stage may keep a position an earlier one dropped.
    d0, d1 = out.decisions[0].detach(), out.decisions[1].detach()
    assert bool(((d0 == 0) & (d1 == 1)).any())


def test_every_trainable_parameter_gets_a_gradient(family):
    model = tiny_spatial(family).train()
    teacher = create_backbone(SPATIAL[family][0], **{**SPATIAL[family][1], "num_classes": 10}).eval()
    x, y = images(batch=4), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        t_logits, t_tokens = dense_targets(teacher, x)
    assert t_tokens.shape == (4, 9, 128)  # the 3 x 3 stage-4 map, every position
    out = model(x)
    loss, terms = DynamicSpatialLoss(model.stage_ratios)(out, y, t_logits, t_tokens)
    loss.backward()
    assert set(terms) == {"ce", "ratio", "kl", "token"}
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, missing


def test_stage_maps_have_the_dense_shapes_and_feed_a_segmentation_head(family):
    model = tiny_spatial(family).eval()
    x = images()
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        d_final, d_maps = model.backbone.forward_intermediates(x)
        only = model.forward_intermediates(x, indices=[2], intermediates_only=True, stop_early=True)
    assert final.shape == d_final.shape
    assert [m.shape for m in maps] == [m.shape for m in d_maps]
    assert len(only) == 1 and only[0].shape == d_maps[2].shape
    # Stages 1 and 2 run before any predictor: identical to the dense model's.
    torch.testing.assert_close(maps[1], d_maps[1])

    class TinySegHead(nn.Module):
        """Project every stage to 8 channels, upsample to stride 4, sum, classify per pixel."""

        def __init__(self, widths, classes=5):
            super().__init__()
            self.proj = nn.ModuleList(nn.Conv2d(c, 8, 1) for c in widths)
            self.cls = nn.Conv2d(8, classes, 1)

        def forward(self, feats):
            size = feats[0].shape[-2:]
            return self.cls(sum(F.interpolate(p(f), size=size, mode="bilinear") for p, f in zip(self.proj, feats)))

    head = TinySegHead([m.shape[1] for m in maps])
    model.train()
    seg = head(model.forward_intermediates(x, intermediates_only=True))
    assert seg.shape == (2, 5, IMG // 4, IMG // 4)
    F.cross_entropy(seg, torch.zeros(2, IMG // 4, IMG // 4, dtype=torch.long)).backward()
    assert all(p.grad is not None for p in model.predictors.parameters())


def test_convnext_takes_other_image_sizes_with_counts_from_the_map():
    model = tiny_spatial("convnext", keep_ratio=1.0, stage_ratios=(1.0, 1.0, 1.0)).eval()
    x = images(size=128)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.backbone(x), atol=1e-5, rtol=1e-5)
    model.set_keep_ratio(0.7)
    with torch.no_grad():
        out = model.forward_pruned(x)
    assert [k.shape[1] for k in out.kept_indices] == [int(64 * r) for r in (0.7, 0.5, 0.3)]
    with pytest.raises(ConfigError, match="keeps zero of the 1 positions"):
        model(images(size=16))  # a 1 x 1 stage-3 map


def test_keep_ratio_changes_after_training_and_settings_round_trip(family, tmp_path):
    model = tiny_spatial(family).eval()
    x = images()
    with torch.no_grad():
        before = model(x)
    model.set_keep_ratio(0.9)
    assert model.stage_ratios == (0.9, 0.7, 0.5)
    model.set_keep_ratio(0.8, stage_ratios=(0.8, 0.8, 0.4))
    assert model.keep_counts() == (28, 28, 14)
    path = dynamicvit.save_model(model, tmp_path / "m.safetensors")
    loaded = dynamicvit.load_model(path).eval()
    assert isinstance(loaded, DynamicSpatial) and loaded.stage_ratios == (0.8, 0.8, 0.4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
        loaded.set_keep_ratio(0.7)
        torch.testing.assert_close(loaded(x), before)


def test_dense_weights_load_as_a_teacher_with_fresh_new_parameters(family, tmp_path):
    name, kw = SPATIAL[family]
    torch.manual_seed(3)
    teacher = create_backbone(name, **{**kw, "num_classes": 10}).eval()
    torch.save({"model": teacher.state_dict()}, tmp_path / "teacher.pth")
    model = dynamicvit.create_model(
        name, checkpoint_path=tmp_path / "teacher.pth", prune_locs=(1, 2, 3), stage_ratios=(1, 1, 1), **{**kw, "num_classes": 10}
    ).eval()
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), teacher(x), atol=1e-5, rtol=1e-5)
    assert set(model.fast_paths) == {"1", "2", "3"}
    if family == "convnext":  # layer scale of the fast paths starts at 1e-6, like ConvNeXt's own
        assert all(torch.all(f.gamma == 1e-6) for f in model.fast_paths.values())
        assert model.predictors[0].in_conv[0].eps == 1e-6


def test_sparsify_and_registry(family):
    name, kw = SPATIAL[family]
    dense = create_backbone(name, **kw)
    model = dynamicvit.sparsify(dense, keep_ratio=0.9, prune_locs=(1, 2, 3))
    assert isinstance(model, DynamicSpatial) and model.backbone is dense and model.stage_ratios == (0.9, 0.7, 0.5)
    with pytest.raises(ConfigError, match="already a DynamicSpatial"):
        dynamicvit.sparsify(model)
    assert timm.is_model("dynamicvit_" + name)
    reg = timm.create_model("dynamicvit_" + name, prune_locs=(1, 2, 3), **kw)
    assert isinstance(reg, DynamicSpatial)


def test_published_models_get_the_spec_table_locations():
    # Built on the meta device: only the structure is read.
    expected = {
        "convnext_tiny": (1, 2, 3),
        "convnext_small": (3, 6, 9),
        "convnext_base": (3, 6, 9),
        "swin_tiny_patch4_window7_224": (1, 2, 3),
        "swin_small_patch4_window7_224": (2, 4, 6),
        "swin_base_patch4_window7_224": (2, 4, 6),
    }
    for name, locs in expected.items():
        with torch.device("meta"):
            model = dynamicvit.create_model(name)
        assert model.prune_locs == locs, name
        assert model.keep_counts() == (137, 98, 58), name  # 14 x 14 = 196 positions at 224 px


def test_unsupported_variants_and_settings_are_refused():
    name, kw = SPATIAL["convnext"]
    with pytest.raises(ConfigError, match="prune_locs explicitly"):
        dynamicvit.create_model(name, **kw)
    with pytest.raises(ConfigError, match="out of range"):
        dynamicvit.create_model(name, prune_locs=(1, 2, 4), **kw)
    with pytest.raises(ConfigError, match="rho - 0.2"):
        dynamicvit.create_model(name, keep_ratio=0.4, prune_locs=(1, 2, 3), **kw)
    with pytest.raises(ConfigError, match="one keep ratio per predictor"):
        dynamicvit.create_model(name, prune_locs=(1, 2, 3), stage_ratios=(0.5, 0.5), **kw)
    with pytest.raises(UnsupportedModelError, match="conv_mlp"):
        dynamicvit.create_model(name, prune_locs=(1, 2, 3), conv_mlp=True, **kw)
    with pytest.raises(UnsupportedModelError, match="global response norm"):
        dynamicvit.create_model("convnextv2_atto", prune_locs=(1,))
    with pytest.raises(ConfigError, match="ConvNeXt and Swin models only"):
        dynamicvit.create_model("vit_tiny_patch16_224", stage_ratios=(0.7, 0.5, 0.3), img_size=32, patch_size=8, depth=4)
    swin = tiny_spatial("swin")
    with pytest.raises(ConfigError, match="96x96"):
        swin(images(size=64))


def test_stage_ratio_loss_and_the_objective():
    d = [torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 1]]), torch.tensor([[1.0, 1, 0, 0], [0, 0, 0, 0]])]
    # stage 1: ((0.25 - 0.5)^2 + (1 - 0.5)^2) / 2; stage 2: ((0.5 - 0.25)^2 + 0.25^2) / 2
    expected = ((0.0625 + 0.25) / 2 + (0.0625 + 0.0625) / 2) / 2
    assert stage_ratio_loss(d, [0.5, 0.25]).item() == pytest.approx(expected)
    with pytest.raises(ValueError):
        stage_ratio_loss(d, [0.5])

    class Out:
        logits = torch.randn(2, 3)
        decisions = d
        tokens = torch.randn(2, 5, 4)
        mask = torch.tensor([[1.0, 0, 0, 0, 0], [0, 0, 0, 0, 0]])  # ignored: every position counts

    target, t_logits, t_tokens = torch.tensor([0, 2]), torch.randn(2, 3), torch.randn(2, 5, 4)
    total, terms = DynamicSpatialLoss([0.5, 0.25], smoothing=0.0)(Out, target, t_logits, t_tokens)
    assert terms["token"].item() == pytest.approx(F.mse_loss(Out.tokens, t_tokens).item())
    assert terms["ratio"].item() == pytest.approx(expected)
    ce = F.cross_entropy(Out.logits, target)
    kl = F.kl_div(F.log_softmax(Out.logits, -1), F.log_softmax(t_logits, -1), reduction="batchmean", log_target=True)
    assert total.item() == pytest.approx((ce + 10 * expected + 0.5 * kl + 0.5 * terms["token"]).item(), rel=1e-5)


@pytest.mark.slow  # torch.export takes about 10 s per model
def test_inference_path_exports_with_a_dynamic_batch(family):
    model = tiny_spatial(family).eval()
    program = torch.export.export(model, (images(),), dynamic_shapes={"x": {0: torch.export.Dim("batch", max=64)}})
    x = images(batch=3, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x))


@pytest.mark.slow  # the ONNX export and its check in ONNX Runtime take about 10 s per model
def test_inference_path_exports_to_onnx_and_agrees(family, tmp_path):
    model = tiny_spatial(family).eval()
    result = dynamicvit.export_onnx(model, tmp_path / "model.onnx")
    check = result.verification
    assert check.max_abs_diff < 1e-4 and check.top1_agreement == 1.0, check.summary()
    from dynamicvit.runtime.deploy import OnnxModel

    x = images(batch=3, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(OnnxModel(tmp_path / "model.onnx")(x), model(x), atol=1e-4, rtol=1e-4)
