"""LV-ViT: the original release's checkpoint layout, the authors' DiffPruning eval forward, losses.

`reference_logits` below is an independent plain-torch evaluation of DynamicViT on LV-ViT written
from the formulas (paper and method.md): convolution stem with BatchNorm in eval mode, hand-written
attention, residual branches divided by skip_lam, the prediction module, top-k of the keep score,
gather, and head(cls) + 0.5 * max of the aux head over the kept tokens. Checkpoints are built in the
authors' key layout with random weights and loaded through `dynamicvit`'s loaders.
"""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

import dynamicvit
from dynamicvit.errors import CheckpointError, ConfigError, UnsupportedModelError
from dynamicvit.core.hosts import LVViTHost, host_for
from dynamicvit.core.losses import DynamicViTLoss, token_kl_distill
from dynamicvit.training.models import load_dense, teacher_targets

# A tiny LV-ViT: 32 px images, patch 8 (stem to 16 px, projection 4x4): a 4x4 grid of 16 tokens.
TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=6, num_heads=3, num_classes=10)
STEM = 64
EPS = 1e-5  # nn.LayerNorm's and nn.BatchNorm2d's default, as in the original release


def their_state(C=48, depth=6, heads=3, K=10, grid=4, patch=8, in_chans=3, mlp_ratio=3, stages=0, seed=0) -> dict:
    """Random weights under the original key names (LV-ViT release; with `stages`, a reference
    DynamicViT-LV-ViT checkpoint's `score_predictor.{s}.*` too)."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape, std=0.02):
        return torch.randn(*shape, generator=g) * std

    H = int(C * mlp_ratio)
    s = {}
    for i, cin in enumerate((in_chans, STEM, STEM), start=1):
        k = 7 if i == 1 else 3
        s[f"patch_embed.conv{i}.weight"] = w(STEM, cin, k, k, std=1.0 / math.sqrt(cin * k * k))
        s[f"patch_embed.bn{i}.weight"] = 1.0 + w(STEM, std=0.1)
        s[f"patch_embed.bn{i}.bias"] = w(STEM, std=0.1)
        s[f"patch_embed.bn{i}.running_mean"] = w(STEM, std=0.1)
        s[f"patch_embed.bn{i}.running_var"] = 1.0 + torch.rand(STEM, generator=g)
        s[f"patch_embed.bn{i}.num_batches_tracked"] = torch.tensor(1000)
    s["patch_embed.proj.weight"] = w(C, STEM, patch // 2, patch // 2, std=0.05)
    s["patch_embed.proj.bias"] = w(C)
    s["cls_token"] = w(1, 1, C, std=0.5)
    s["pos_embed"] = w(1, grid * grid + 1, C, std=0.5)
    for i in range(depth):
        p = f"blocks.{i}."
        s[p + "norm1.weight"], s[p + "norm1.bias"] = 1.0 + w(C, std=0.1), w(C, std=0.1)
        s[p + "attn.qkv.weight"] = w(3 * C, C, std=0.2)  # no bias
        s[p + "attn.proj.weight"], s[p + "attn.proj.bias"] = w(C, C, std=0.1), w(C)
        s[p + "norm2.weight"], s[p + "norm2.bias"] = 1.0 + w(C, std=0.1), w(C, std=0.1)
        s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"] = w(H, C, std=0.1), w(H)
        s[p + "mlp.fc2.weight"], s[p + "mlp.fc2.bias"] = w(C, H, std=0.1), w(C)
    s["norm.weight"], s["norm.bias"] = 1.0 + w(C, std=0.1), w(C, std=0.1)
    s["head.weight"], s["head.bias"] = w(K, C, std=0.2), w(K)
    s["aux_head.weight"], s["aux_head.bias"] = w(K, C, std=0.2), w(K)
    for st in range(stages):
        p = f"score_predictor.{st}."
        s[p + "in_conv.0.weight"], s[p + "in_conv.0.bias"] = 1.0 + w(C, std=0.1), w(C, std=0.1)
        for name, (o, i) in {"in_conv.1": (C, C), "out_conv.0": (C // 2, C), "out_conv.2": (C // 4, C // 2),
                             "out_conv.4": (2, C // 4)}.items():
            s[p + name + ".weight"], s[p + name + ".bias"] = w(o, i, std=0.3), w(o, std=0.1)
    return s


def reference_logits(s: dict, x: torch.Tensor, heads: int, skip_lam: float, prune_locs=(), keep=()) -> torch.Tensor:
    """The authors' LV-ViT (DiffPruning) eval forward from the formulas; no pruning when `prune_locs` is empty."""
    def bn(t, i):
        p = f"patch_embed.bn{i}."
        return F.batch_norm(t, s[p + "running_mean"], s[p + "running_var"], s[p + "weight"], s[p + "bias"], False, 0.0, EPS)

    def ln(t, p):
        return F.layer_norm(t, t.shape[-1:], s[p + "weight"], s[p + "bias"], EPS)

    def lin(t, p):
        return t @ s[p + "weight"].T + (s[p + "bias"] if p + "bias" in s else 0)

    t = F.relu(bn(F.conv2d(x, s["patch_embed.conv1.weight"], stride=2, padding=3), 1))
    t = F.relu(bn(F.conv2d(t, s["patch_embed.conv2.weight"], padding=1), 2))
    t = F.relu(bn(F.conv2d(t, s["patch_embed.conv3.weight"], padding=1), 3))
    pw = s["patch_embed.proj.weight"]
    t = F.conv2d(t, pw, s["patch_embed.proj.bias"], stride=pw.shape[-1])
    B, C = t.shape[:2]
    t = t.flatten(2).transpose(1, 2)  # (B, N, C)
    N = t.shape[1]
    t = torch.cat([s["cls_token"].expand(B, 1, C), t], dim=1) + s["pos_embed"]
    depth = len({k.split(".")[1] for k in s if k.startswith("blocks.")})
    for i in range(depth):
        if i in prune_locs:
            st = prune_locs.index(i)
            p = f"score_predictor.{st}."
            h = F.gelu(lin(ln(t[:, 1:], p + "in_conv.0."), p + "in_conv.1."))
            local, glob = h[..., : C // 2], h[..., C // 2 :].mean(dim=1, keepdim=True)
            z = torch.cat([local, glob.expand_as(local)], dim=-1)
            z = F.gelu(lin(z, p + "out_conv.0."))
            z = F.gelu(lin(z, p + "out_conv.2."))
            score = F.log_softmax(lin(z, p + "out_conv.4."), dim=-1)[..., 0]  # keep = channel 0
            k = int(N * keep[st])
            order = torch.argsort(score, dim=1, descending=True)[:, :k]
            index = torch.cat([torch.zeros(B, 1, dtype=order.dtype), order + 1], dim=1)
            t = torch.gather(t, 1, index.unsqueeze(-1).expand(-1, -1, C))
        p = f"blocks.{i}."
        M, D = t.shape[1], C // heads
        qkv = lin(ln(t, p + "norm1."), p + "attn.qkv.").reshape(B, M, 3, heads, D).permute(2, 0, 3, 1, 4)
        q, kk, v = qkv[0], qkv[1], qkv[2]
        a = torch.softmax((q @ kk.transpose(-2, -1)) / math.sqrt(D), dim=-1)
        o = (a @ v).transpose(1, 2).reshape(B, M, C)
        t = t + lin(o, p + "attn.proj.") / skip_lam
        t = t + lin(F.gelu(lin(ln(t, p + "norm2."), p + "mlp.fc1.")), p + "mlp.fc2.") / skip_lam
    t = ln(t, "norm.")
    return lin(t[:, 0], "head.") + 0.5 * lin(t[:, 1:], "aux_head.").max(dim=1).values


@pytest.fixture
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(3, 3, 32, 32)


# -- the architecture ------------------------------------------------------------------------------


def test_registered_with_timm_and_paper_sizes():
    assert {"lvvit_s", "lvvit_m", "dynamicvit_lvvit_s", "dynamicvit_lvvit_m"} <= set(timm.list_models("*lvvit*"))
    with torch.device("meta"):  # full-size models, shapes only
        _check_paper_sizes()


def _check_paper_sizes():
    for name, params, depth, locs in (("lvvit_s", 26.15e6, 16, (4, 8, 12)), ("lvvit_m", 55.83e6, 20, (5, 10, 15))):
        dense = timm.create_model(name)
        assert dense.pretrained_cfg["architecture"] == name and dense.pretrained_cfg["input_size"] == (3, 224, 224)
        assert abs(sum(p.numel() for p in dense.parameters()) - params) < 0.01e6
        assert len(dense.blocks) == depth and all(b.skip_lam == 2.0 for b in dense.blocks)
        assert dense.blocks[0].attn.qkv.bias is None and dense.blocks[0].mlp.fc1.out_features == 3 * dense.embed_dim
        model = dynamicvit.create_model(name, keep_ratio=0.7)
        assert model.prune_locs == locs and model.keep_counts() == (137, 96, 67)
        assert isinstance(model.host, LVViTHost) and model.host.token_distill == "kl"
        assert timm.create_model("dynamicvit_" + name, keep_ratio=0.5).keep_counts() == (98, 49, 24)


def test_state_dict_keys_are_the_original_release_layout():
    model = timm.create_model("lvvit_s", **TINY)
    assert set(model.state_dict()) == set(their_state())


def test_other_image_sizes_and_shapes(images):
    model = timm.create_model("lvvit_s", **{**TINY, "img_size": 48}).eval()
    assert model.patch_embed.grid_size == (6, 6) and model.pos_embed.shape == (1, 37, 48)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 48, 48)).shape == (2, 10)
        assert model.forward_features(torch.randn(2, 3, 48, 48)).shape == (2, 37, 48)
    with pytest.raises(ConfigError, match="even patch_size"):
        timm.create_model("lvvit_s", **{**TINY, "patch_size": 5})
    with pytest.raises(ConfigError, match="not a multiple"):
        timm.create_model("lvvit_s", **{**TINY, "img_size": 36})
    with pytest.raises(ConfigError, match="3 channel"):
        dynamicvit.create_model("lvvit_s", **TINY)(torch.randn(1, 3, 48, 48))
    model.reset_classifier(4)
    assert model.head.out_features == model.aux_head.out_features == 4
    with pytest.raises(UnsupportedModelError, match="num_classes=0"):
        dynamicvit.sparsify(timm.create_model("lvvit_s", **{**TINY, "num_classes": 0}))


# -- loading ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model"])
def test_original_release_loads_as_dense_model_and_teacher(tmp_path, images, wrapper):
    s = their_state()
    path = tmp_path / "lvvit_s-tiny.pth.tar"
    torch.save(s if wrapper is None else {wrapper: s, "epoch": 300}, path)
    want = reference_logits(s, images, heads=3, skip_lam=2.0)
    teacher = load_dense(path, "lvvit_s", dict(TINY), {}, "teacher").eval()
    with torch.no_grad():
        torch.testing.assert_close(teacher(images), want, atol=1e-5, rtol=1e-5)
    # As the start of a DynamicViT: keep ratio 1.0 is the dense model.
    model = dynamicvit.create_model("lvvit_s", checkpoint_path=path, keep_ratio=1.0, **TINY).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(images), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("keep_ratio", [0.7, 0.5])
def test_reference_dynamicvit_lvvit_checkpoint_gives_the_authors_eval_logits(tmp_path, images, keep_ratio):
    locs = (1, 3, 4)
    s = their_state(stages=len(locs))
    path = tmp_path / "dynamicvit_lvvit_s.pth"
    torch.save({"model": s}, path)
    model = dynamicvit.create_model("lvvit_s", checkpoint_path=path, keep_ratio=keep_ratio, **TINY).eval()
    assert model.prune_locs == locs
    keep = [keep_ratio**k for k in (1, 2, 3)]
    want = reference_logits(s, images, heads=3, skip_lam=2.0, prune_locs=locs, keep=keep)
    with torch.no_grad():
        torch.testing.assert_close(model(images), want, atol=1e-5, rtol=1e-5)
        # ...and differs from the dense prediction: the pruning really happened.
        assert not torch.allclose(want, reference_logits(s, images, heads=3, skip_lam=2.0), atol=1e-3)


def test_position_embedding_is_resized_for_another_image_size(tmp_path):
    s = their_state()  # 4x4 grid
    path = tmp_path / "lvvit.pth"
    torch.save(s, path)
    model = dynamicvit.create_model("lvvit_s", checkpoint_path=path, **{**TINY, "img_size": 48})  # 6x6 grid
    pos = model.backbone.pos_embed
    assert pos.shape == (1, 37, 48)
    torch.testing.assert_close(pos[:, :1], s["pos_embed"][:, :1])  # the class token's is kept as is


def test_wrong_checkpoints_are_refused_naming_the_keys(tmp_path):
    s = their_state()
    s.pop("aux_head.weight")
    s["blocks.0.attn.qkv.bias"] = torch.zeros(144)
    path = tmp_path / "bad.pth"
    torch.save(s, path)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): aux_head.weight") as e:
        load_dense(path, "lvvit_s", dict(TINY), {}, "teacher")
    assert "unexpected keys (1): blocks.0.attn.qkv.bias" in str(e.value)
    deit = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=6, num_heads=3,
                             num_classes=10)
    torch.save({"model": deit.state_dict()}, path)
    with pytest.raises(CheckpointError, match="backbone.patch_embed.conv1.weight"):
        dynamicvit.create_model("lvvit_s", checkpoint_path=path, **TINY)
    s = their_state(C=48)
    torch.save(s, path)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        dynamicvit.create_model("lvvit_s", checkpoint_path=path, **{**TINY, "embed_dim": 96})


# -- training --------------------------------------------------------------------------------------


def test_training_path_prediction_ignores_dropped_tokens():
    """The aux-head max on the training path runs over kept tokens only (dropped ones are still in x)."""
    model = dynamicvit.create_model("lvvit_s", **TINY).eval()
    host = model.host
    torch.manual_seed(0)
    x = torch.randn(2, 17, 48)
    mask = torch.zeros(2, 16)
    mask[0, :5] = 1.0
    mask[1, 7] = 1.0
    got = host.logits(x, mask)
    for b in range(2):
        kept = torch.cat([x[b : b + 1, :1], x[b : b + 1, 1:][:, mask[b] > 0]], dim=1)
        torch.testing.assert_close(got[b], host.logits(kept)[0])
    # Dropping everything leaves the class head alone (not -inf).
    torch.testing.assert_close(host.logits(x, torch.zeros(2, 16)), model.backbone.head(x[:, 0]))


def test_teacher_targets_and_token_kl(images):
    teacher = timm.create_model("lvvit_s", **TINY).eval()
    with torch.no_grad():
        logits, tokens = teacher_targets(teacher, host_for(teacher), images)
        feats = teacher.forward_features(images)
    torch.testing.assert_close(logits, teacher.head(feats[:, 0]))  # the class head, as the reference distills
    torch.testing.assert_close(tokens, teacher.aux_head(feats[:, 1:]))  # (B, N, K)

    torch.manual_seed(0)
    s, t = torch.randn(2, 16, 10), torch.randn(2, 16, 10)
    mask = (torch.rand(2, 16) > 0.5).float()
    keep = mask > 0.5
    want = (F.softmax(t[keep], -1) * (F.log_softmax(t[keep], -1) - F.log_softmax(s[keep], -1))).sum() / keep.sum()
    torch.testing.assert_close(token_kl_distill(s, t, mask), want)
    s2 = s.clone()
    s2[~keep] += 100.0  # dropped tokens do not count
    torch.testing.assert_close(token_kl_distill(s2, t, mask), want)
    zero = token_kl_distill(s.requires_grad_(), t, torch.zeros(2, 16))
    assert zero.item() == 0.0 and zero.requires_grad


def test_lvvit_objective_trains_the_class_head_and_every_parameter(images):
    model = dynamicvit.create_model("lvvit_s", **TINY).train()
    teacher = timm.create_model("lvvit_s", **TINY).eval()
    out = model(images)
    assert out.tokens.shape == (3, 16, 10) and out.class_logits.shape == (3, 10)
    with torch.no_grad():
        t_logits, t_tokens = teacher_targets(teacher, host_for(teacher), images)
    loss_fn = DynamicViTLoss(0.7, token_distill="kl")
    loss, terms = loss_fn(out, torch.tensor([1, 2, 3]), t_logits, t_tokens)
    torch.testing.assert_close(terms["ce"], F.cross_entropy(out.class_logits, torch.tensor([1, 2, 3]), label_smoothing=0.1))
    torch.testing.assert_close(terms["token"], token_kl_distill(out.tokens, t_tokens, out.mask))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient for {missing}"
    with pytest.raises(ValueError, match="token_distill"):
        DynamicViTLoss(0.7, token_distill="cosine")


def test_dense_weights_for_another_class_count_reset_both_heads(tmp_path, caplog):
    path = tmp_path / "lvvit_1k.pth"
    torch.save(their_state(K=1000), path)
    model = dynamicvit.create_model("lvvit_s", checkpoint_path=path, **TINY)
    assert model.backbone.head.out_features == model.backbone.aux_head.out_features == 10
    assert "aux_head.weight" in caplog.text and "re-initialized" in caplog.text


def test_macs_count_the_stem_and_match_the_readme():
    from dynamicvit.runtime.flops import count_macs

    stem = 112 * 112 * 64 * (3 * 7 * 7 + 2 * 64 * 3 * 3)  # conv1..conv3 at half resolution
    for name, width, rows in (("lvvit_s", 384, {1.0: 6.551, 0.7: 4.634, 0.5: 3.778}), ("lvvit_m", 512, {1.0: 12.678, 0.7: 8.565})):
        for keep_ratio, gmacs in rows.items():
            with torch.device("meta"):  # shapes are all a count needs
                model = timm.create_model(name) if keep_ratio == 1.0 else dynamicvit.create_model(name, keep_ratio=keep_ratio)
            report = count_macs(model)
            assert report.by_kind["conv"] == stem + 196 * width * 64 * 8 * 8  # + the 8x8 projection
            assert round(report.gmacs, 3) == gmacs, (name, keep_ratio)
            assert report.input_size == (3, 224, 224) and not report.uncounted


def test_fine_tuning_from_the_original_release_runs_end_to_end(tmp_path):
    """`train` with an original-layout LV-ViT file as the teacher: token KL, a saved model that reloads."""
    from dynamicvit.training.config import TrainConfig
    from dynamicvit.training.loop import train
    from test_train import synthetic

    micro = dict(img_size=16, patch_size=4, embed_dim=24, depth=4, num_heads=2, num_classes=4)
    path = tmp_path / "lvvit_micro.pth.tar"
    torch.save({"state_dict": their_state(C=24, depth=4, heads=2, K=4, grid=4, patch=4)}, path)
    cfg = TrainConfig(model="lvvit_s", teacher=str(path), timm_kwargs=micro, output=str(tmp_path / "run"), epochs=1,
                      batch_size=8, lr=1e-3, warmup_epochs=0, freeze_backbone_epochs=0, mixup=0.8, cutmix=1.0,
                      num_workers=0, device="cpu", amp="none", progress=False, tensorboard=False)
    result = train(cfg, train_set=synthetic(16), val_set=synthetic(8, seed=1))
    row = result.history[-1]
    assert math.isfinite(row["train_token"]) and row["train_token"] > 0 and math.isfinite(row["val_top1"])
    model = dynamicvit.load_model(result.checkpoint)
    assert isinstance(model.host, LVViTHost) and model.prune_locs == (1, 2, 3)


# -- the commands ----------------------------------------------------------------------------------


def test_commands_work_with_lvvit(tmp_path, capsys):
    """info, flops, bench, eval and visualize on LV-ViT (eval and visualize from original-layout weights)."""
    import json

    from PIL import Image

    from dynamicvit.cli import main
    from test_data import make_image_folder

    def run(*argv):
        code = main([str(a) for a in argv])
        out = capsys.readouterr()
        assert code == 0, out.err
        return out.out

    out = run("info", "--model", "lvvit_s")
    assert "16 blocks" in out and [line.split()[1] for line in out.splitlines()[3:]] == ["4", "8", "12"]
    kwargs = "embed_dim=48,depth=6,num_heads=3"
    report = json.loads(run("flops", "--model", "lvvit_s", "--model-kwargs", kwargs, "--img-size", 64, "--json"))
    assert report["input_size"] == [3, 64, 64] and report["keep_counts"] == [11, 7, 5] and report["by_kind_gmacs"]["conv"] > 0
    run("bench", "--model", "lvvit_s", "--model-kwargs", kwargs + ",img_size=32,patch_size=8", "--keep-ratios", "1.0,0.7",
        "--batch-size", 2, "--repeats", 1, "--warmup", 0, "--threads", 1, "--output", tmp_path / "bench")
    assert (tmp_path / "bench").is_dir()

    root = make_image_folder(tmp_path / "pets")  # 3 classes, 224 px after resizing
    weights = tmp_path / "lvvit_pets.pth.tar"
    torch.save(their_state(K=3, grid=14, patch=16), weights)
    rows = json.loads(run("eval", "--checkpoint", weights, "--model", "lvvit_s", "--model-kwargs", kwargs,
                          "--dataset", root, "--device", "cpu", "--num-workers", 0, "--json"))["results"]
    assert rows[0]["images"] == 9 and rows[0]["keep_ratio"] == 1.0 and rows[0]["gmacs"] > 0
    Image.new("RGB", (50, 40), (200, 10, 10)).save(tmp_path / "red.png")
    run("visualize", "--model", "lvvit_s", "--checkpoint", weights, "--model-kwargs", kwargs + ",num_classes=3",
        "--output", tmp_path / "pictures", tmp_path / "red.png")
    assert any((tmp_path / "pictures").iterdir())
