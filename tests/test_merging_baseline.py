"""benchmarks/merging.py: the token-merging baseline (bipartite soft matching, proportional attention),
and the training loop's distillation of a plain classifier that fine-tunes it."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import timm
import torch

import dynamicvit
from dynamicvit.errors import ConfigError, UnsupportedModelError
from dynamicvit.runtime.flops import count_macs

from conftest import tiny_kwargs

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("merging", ROOT / "benchmarks" / "merging.py")
merging = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(merging)


def _vit(**overrides):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", **tiny_kwargs(**overrides)).eval()


def _x(batch=3, seed=1, chans=3, size=32):
    torch.manual_seed(seed)
    return torch.randn(batch, chans, size, size)


# -- the matching ---------------------------------------------------------------------------------


def test_bipartite_merge_hand_computed():
    """Prefix token, then A = positions 0, 2, 4 and B = 1, 3 of the patches; A's token 4 is B's token 3
    up to scale (cosine 1), A's token 0 is closest to B's token 1: with r = 1 only the first merges."""
    cls = torch.tensor([[9.0, 9.0]])
    patches = torch.tensor([[1.0, 0.2], [1.0, 0.0], [0.3, 1.0], [0.0, 1.0], [0.0, 3.0]])
    x = torch.cat([cls, patches]).unsqueeze(0)  # (1, 6, 2)
    sizes = torch.tensor([[1.0, 1.0, 1.0, 1.0, 2.0, 1.0]])  # token 3 (B) already holds two
    out, out_sizes = merging.bipartite_merge(x, x, sizes, 1, 1)
    assert out.shape == (1, 5, 2) and torch.equal(out[0, 0], cls[0])
    # Stays: A's 0 and 2 (token 4, patch position 4, went into B's position 3). B: 1, then 3 merged.
    torch.testing.assert_close(out[0, 1:3], patches[[0, 2]])
    torch.testing.assert_close(out[0, 3], patches[1])
    torch.testing.assert_close(out[0, 4], (2 * patches[3] + 1 * patches[4]) / 3)
    assert out_sizes.tolist() == [[1.0, 1.0, 1.0, 1.0, 3.0]]


@pytest.mark.parametrize("n, r", [(10, 3), (9, 4), (8, 4), (7, 0)])
def test_bipartite_merge_conserves_sizes_and_content_and_leaves_the_prefix(n, r):
    torch.manual_seed(n)
    x, metric = torch.randn(2, 2 + n, 5), torch.randn(2, 2 + n, 3)
    sizes = torch.cat([torch.ones(2, 2), torch.randint(1, 4, (2, n)).float()], dim=1)
    out, out_sizes = merging.bipartite_merge(x, metric, sizes, r, 2)
    assert out.shape == (2, 2 + n - r, 5) and out_sizes.shape == (2, 2 + n - r)
    assert torch.equal(out[:, :2], x[:, :2]) and torch.equal(out_sizes[:, :2], sizes[:, :2])
    torch.testing.assert_close(out_sizes.sum(1), sizes.sum(1))
    torch.testing.assert_close((out * out_sizes.unsqueeze(-1)).sum(1), (x * sizes.unsqueeze(-1)).sum(1))


# -- the model ------------------------------------------------------------------------------------


def test_r_zero_is_the_dense_model():
    vit = _vit()
    model = merging.TokenMergingViT(vit, r=0).eval()
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(model(x), vit(x), rtol=0, atol=0)


def test_r_merges_r_tokens_per_block_and_is_set_per_forward():
    vit = _vit()
    model = merging.TokenMergingViT(vit, r=8).eval()
    seen = []
    hooks = [b.norm2.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1])) for b in vit.blocks]
    x = _x()
    with torch.no_grad():
        a = model(x)
        assert seen == [1 + n - min(8, n // 2) for n in merging.merged_tokens(64, 6, 8)]  # after each merge
        seen.clear()
        b = model(x, r=3)
        assert seen == [1 + n - 3 for n in merging.merged_tokens(64, 6, 3)]
    for h in hooks:
        h.remove()
    assert not torch.allclose(a, b, atol=1e-4)
    assert merging.merged_tokens(64, 6, 8) == [64, 56, 48, 40, 32, 24]
    assert merging.merged_tokens(10, 4, 8) == [10, 5, 3, 2]  # capped at half


def test_training_draws_r_from_the_range(monkeypatch):
    model = merging.TokenMergingViT(_vit(), r=0, r_range=(2, 5)).train()
    drawn = []
    monkeypatch.setattr(merging.random, "randint", lambda lo, hi: drawn.append((lo, hi)) or 4)
    out = model(_x(batch=2))
    out.square().sum().backward()
    assert drawn == [(2, 5)]
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing
    model.eval()
    model(_x(batch=1))
    assert drawn == [(2, 5)]  # eval mode uses model.r


def test_outputs_do_not_depend_on_the_rest_of_the_batch():
    model = merging.TokenMergingViT(_vit(), r=6).eval()
    x = _x(batch=4)
    with torch.no_grad():
        batch = model(x)
        for i in range(4):
            torch.testing.assert_close(model(x[i : i + 1])[0], batch[i], atol=1e-5, rtol=1e-4)


def test_macs_count_the_matching_and_the_merge():
    """Per block with n patch tokens and r' = min(r, n // 2) merged: the attention branch on P + n tokens,
    the similarity of A with B on the keys averaged over heads (|A| |B| D), the scatter-adds of the
    merge (r' C + r') and the MLP on P + n - r' tokens."""
    vit = _vit()
    dense = count_macs(vit)
    C, D, P, depth = vit.embed_dim, vit.embed_dim // 3, 1, len(vit.blocks)
    outside = dense.total - depth * (12 * C * C * (P + 64) + 2 * (P + 64) ** 2 * C)  # embedding and head
    for r in (0, 5, 8):
        total = outside
        for n in merging.merged_tokens(64, depth, r):
            m = min(r, n // 2)
            M = P + n
            total += 4 * C * C * M + 2 * M * M * C + 8 * C * C * (M - m)
            total += ((n + 1) // 2) * (n // 2) * D + m * (C + 1) if m else 0
        report = count_macs(merging.TokenMergingViT(vit, r=r))
        assert report.total == total and not report.uncounted, r


def test_a_checkpoint_of_the_baseline_is_the_dense_vit(tmp_path):
    vit = _vit()
    model = merging.TokenMergingViT(vit, r=4)
    assert set(model.state_dict()) == set(vit.state_dict())
    path = dynamicvit.save_model(model, tmp_path / "tome.safetensors")
    loaded = dynamicvit.load_model(path)
    assert type(loaded) is type(vit)
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(merging.TokenMergingViT(loaded.eval(), r=4).eval()(x), model.eval()(x))


def test_unsupported_backbones_and_bad_r_are_clear_errors():
    with pytest.raises(UnsupportedModelError, match="pools the class token"):
        merging.TokenMergingViT(_vit(global_pool="avg"))
    with pytest.raises(ConfigError, match="r_range"):
        merging.TokenMergingViT(_vit(), r_range=(5, 2))
    with pytest.raises(ConfigError, match="whole number"):
        merging.TokenMergingViT(_vit(), r=-1)


# -- fine-tuning it with the project's training loop ---------------------------------------------


def test_the_loop_distills_a_plain_classifier_with_ce_and_kl(tmp_path, monkeypatch):
    from dynamicvit.core.losses import LogitDistillLoss
    from dynamicvit.training.loop import train

    from test_train import config, synthetic

    seen = []
    loss_forward = LogitDistillLoss.forward
    monkeypatch.setattr(LogitDistillLoss, "forward",
                        lambda self, *a, **k: seen.append(a[2] is not None) or loss_forward(self, *a, **k))
    cfg = config(tmp_path, epochs=1, max_steps_per_epoch=3, distill_weight=0.5, teacher=None)
    teacher = timm.create_model("vit_tiny_patch16_224", **tiny_kwargs(img_size=16, num_classes=4, patch_size=4))
    student = merging.TokenMergingViT(timm.create_model("vit_tiny_patch16_224", **tiny_kwargs(img_size=16, num_classes=4, patch_size=4)),
                                      r=2, r_range=(1, 3))
    student.backbone.load_state_dict(teacher.state_dict())
    before = {k: v.clone() for k, v in student.state_dict().items()}
    result = train(cfg, train_set=synthetic(24), val_set=synthetic(8, seed=1), models=(student, teacher))
    assert seen == [True, True, True]  # the teacher's logits reach the loss at every step
    rows = [json.loads(line) for line in (Path(cfg.output) / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert {"ce", "kl"} <= set(train_rows[-1]) and "ratio" not in train_rows[-1]
    assert result.history[-1]["val_top1"] is not None
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and "cls_token" not in changed and "pos_embed" not in changed  # frozen, as for DynamicViT
    assert all(not p.requires_grad for p in teacher.parameters())
    assert type(dynamicvit.load_model(result.checkpoint)) is type(teacher)


def test_frontier_finds_the_keep_ratio_of_an_equal_budget():
    frontier = _frontier_script()
    model = dynamicvit.create_model("vit_tiny_patch16_224", keep_ratio=0.7, merge_dropped=True, **tiny_kwargs())
    target = count_macs(model.at_keep_ratio(0.5)).total
    rho, macs = frontier.equal_budget(model, target, 0.01)
    assert abs(macs / target - 1) <= 0.01 and macs == count_macs(model.at_keep_ratio(rho)).total
    assert frontier.equal_budget(model, target // 10, 0.01) is None  # below anything a keep ratio reaches


def _frontier_script():
    spec = importlib.util.spec_from_file_location("frontier", ROOT / "benchmarks" / "frontier.py")
    frontier = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(frontier)
    return frontier


def _report(variant: str, top1: list, baseline=(88.0, 87.0), seed=0) -> dict:
    rows = [{"r": r, "macs": 1000 - r, "merging": b, "merging-untrained": b - 1,
             "variants": {variant: {"keep_ratio": 0.5, "macs": 1000 - r, "top1": t} if t is not None else None}}
            for r, b, t in zip((1, 2), baseline, top1)]
    return {"dense": {"macs": 1100, "top1": 88.5}, "rows": rows, "variants": {variant: {"merge_dropped": True}},
            "prune_locs": {variant: [2, 3, 4]}, "r_range": [4, 10], "tolerance": 0.01, "seed": seed,
            "test_images": 100, "quick": False}


def test_frontier_combines_the_reports_of_earlier_runs(tmp_path, capsys):
    frontier = _frontier_script()
    paths = []
    for name, report in (("a", _report("fused", [88.1, 87.2])), ("b", _report("merged-deep", [88.4, None]))):
        paths.append(tmp_path / name / "frontier.json")
        paths[-1].parent.mkdir()
        paths[-1].write_text(json.dumps(report))
    out = frontier.run(frontier.parse_args(["--output", str(tmp_path / "all"), "--combine", ",".join(map(str, paths))]))
    assert list(out["variants"]) == ["fused", "merged-deep"] and (tmp_path / "all" / "frontier.png").is_file()
    assert [r["variants"]["merged-deep"] and r["variants"]["merged-deep"]["top1"] for r in out["rows"]] == [88.4, None]
    assert [r["variants"]["fused"]["top1"] for r in out["rows"]] == [88.1, 87.2]
    table = capsys.readouterr().out
    assert "| 88.40 (0.5, 0.00 M) | 88.00 (1)" in table and "| - | 87.00 (2)" in table
    assert json.loads((tmp_path / "all" / "frontier.json").read_text())["combined"] == list(map(str, paths))
    other = tmp_path / "c.json"
    other.write_text(json.dumps(_report("merged", [88.0, 87.0], baseline=(88.2, 87.0))))
    with pytest.raises(ConfigError, match="another baseline, seed or test set"):
        frontier.run(frontier.parse_args(["--output", str(tmp_path / "x"), "--combine", f"{paths[0]},{other}"]))
    with pytest.raises(ConfigError, match="cannot read"):
        frontier.run(frontier.parse_args(["--output", str(tmp_path / "x"), "--combine", str(tmp_path / "none.json")]))


def test_a_frontier_run_adds_its_variants_to_the_folders_report_and_never_replaces_another(tmp_path, caplog):
    frontier = _frontier_script()
    (tmp_path / "frontier.json").write_text(json.dumps(_report("fused", [88.1, 87.2])))
    merged = frontier.with_earlier(_report("merged-deep", [88.4, 87.5]), tmp_path)
    assert list(merged["variants"]) == ["fused", "merged-deep"]
    assert [r["variants"]["fused"]["top1"] for r in merged["rows"]] == [88.1, 87.2]
    again = frontier.with_earlier(_report("fused", [88.3, 87.0]), tmp_path)  # a variant run again: its new cells
    assert [r["variants"]["fused"]["top1"] for r in again["rows"]] == [88.3, 87.0]
    earlier = _report("fused", [88.1, 87.2], seed=1)
    (tmp_path / "frontier.json").write_text(json.dumps(earlier))
    new = frontier.with_earlier(_report("merged", [88.0, 87.0]), tmp_path)  # another seed: kept aside, not merged
    assert list(new["variants"]) == ["merged"] and not (tmp_path / "frontier.json").exists()
    assert json.loads((tmp_path / "frontier.earlier-1.json").read_text()) == earlier
    # --combine into a folder that holds another report keeps it too
    (tmp_path / "a.json").write_text(json.dumps(_report("fused", [88.1, 87.2])))
    (tmp_path / "frontier.json").write_text(json.dumps(earlier))
    frontier.run(frontier.parse_args(["--output", str(tmp_path), "--combine", str(tmp_path / "a.json")]))
    assert json.loads((tmp_path / "frontier.earlier-2.json").read_text()) == earlier
    assert list(json.loads((tmp_path / "frontier.json").read_text())["variants"]) == ["fused"]
