"""The GPU-minded fast paths, checked on the CPU against the exact ones.

- inference selection: `PredictionModule.keep_margin` + `prune_tokens` (few operators) vs the
  reference-exact `logits` + `select_tokens`, and the operator budget per pruning stage;
- `fast_patch_embed`: timm's patch convolution as reshape + matrix product;
- fused masked attention (`policy_bias` + F.scaled_dot_product_attention) vs `masked_softmax`;
- `benchmarks/gpu_table.py --device cpu` runs end to end.
"""
from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import dynamicvit
from conftest import scramble, tiny_kwargs, tiny_model
from dynamicvit.errors import UnsupportedModelError
from dynamicvit.runtime.flops import count_operators
from dynamicvit.core.hosts.vit import masked_attention
from dynamicvit.core.losses import DynamicViTLoss
from dynamicvit.core.ops import PredictionModule, masked_softmax, policy_bias, prune_tokens, select_tokens
from dynamicvit.runtime.speedups import PatchProjection, fast_patch_embed, fused_masked_attention

ROOT = Path(__file__).resolve().parents[1]

# DeiT-S's structure (224 px, 16 px patches: 196 tokens; 12 blocks; stages before 3, 6, 9) at a
# width that runs in milliseconds: operator counts depend on the structure, not the width.
DEIT_S_SHAPED = dict(embed_dim=48, num_heads=3)


# -- inference selection ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["deit_small_patch16_224", "deit_small_distilled_patch16_224"])
def test_pruning_stage_adds_at_most_20_operators(name):
    torch.manual_seed(0)
    dense = timm.create_model(name, **DEIT_S_SHAPED)
    model = dynamicvit.sparsify(copy.deepcopy(dense), keep_ratio=0.7)
    dense_ops = sum(count_operators(dense).values())
    pruned = count_operators(model)
    per_stage = (sum(pruned.values()) - dense_ops) / len(model.prune_locs)
    assert per_stage <= 20, (per_stage, pruned)  # 28.7 before the fast path
    # One top-k and one gather of the tokens per stage; no index is built for the prefix tokens.
    assert pruned["aten.topk.default"] == 3 and "aten.arange.default" not in pruned


def test_operator_count_sees_what_runs():
    dense = timm.create_model("deit_small_patch16_224", **DEIT_S_SHAPED)
    ops = count_operators(dense)
    assert ops["aten.layer_norm.default"] == 2 * 12 + 1
    assert ops["aten.linear.default"] == 4 * 12 + 1  # qkv, proj, fc1, fc2 per block; the head
    assert dense.training  # the training flag is restored


def test_keep_margin_equals_the_reference_logits():
    torch.manual_seed(0)
    pm = scramble(PredictionModule(32)).eval()
    x = torch.randn(3, 2 + 20, 32)
    z = pm.logits(x, num_prefix_tokens=2)  # (B, N, 2), the reference-exact path
    with torch.no_grad():
        margin = pm.keep_margin(x[:, 2:]).squeeze(-1)
        torch.testing.assert_close(margin, z[..., 0] - z[..., 1], atol=1e-5, rtol=1e-5)
        assert torch.equal(margin.argsort(1), pm(x, num_prefix_tokens=2)[..., 0].argsort(1))
        for k in (1, 7, 20):  # well-separated scores: the same kept set
            assert torch.equal(margin.topk(k).indices.sort(1).values, z[..., 0].sub(z[..., 1]).topk(k).indices.sort(1).values)


def test_keep_margin_follows_weight_updates_and_gradients():
    torch.manual_seed(0)
    pm = scramble(PredictionModule(16))
    x = torch.randn(2, 9, 16)

    def reference():
        z = pm.logits(x)
        return z[..., 0] - z[..., 1]

    with torch.no_grad():
        first = pm.keep_margin(x).squeeze(-1)  # builds the cache
        for p in pm.out_conv[4].parameters():  # in-place updates (optimizer steps, load_state_dict)
            p.mul_(-1.0)
        torch.testing.assert_close(pm.keep_margin(x).squeeze(-1), reference(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pm.keep_margin(x).squeeze(-1), -first, atol=1e-5, rtol=1e-5)
    pm.load_state_dict(scramble(PredictionModule(16)).state_dict())
    with torch.no_grad():
        torch.testing.assert_close(pm.keep_margin(x).squeeze(-1), reference(), atol=1e-5, rtol=1e-5)
    # With a gradient wanted the derived weights are part of the graph: every parameter gets one.
    pm.keep_margin(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pm.parameters())


@pytest.mark.parametrize("P", [0, 1, 2])
def test_prune_tokens_equals_select_tokens_on_the_reference_score(P):
    torch.manual_seed(P)
    pm = scramble(PredictionModule(24)).eval()
    x = torch.randn(3, P + 16, 24)
    with torch.no_grad():
        fast, fast_keep = prune_tokens(x, pm, 5, P)
        ref, ref_keep = select_tokens(x, pm(x, num_prefix_tokens=P)[..., 0], 5, P)
    assert fast.shape == (3, P + 5, 24) and torch.equal(fast[:, :P], x[:, :P])
    order = fast_keep.argsort(1)  # top-k order may differ between the two scores; the kept set may not
    assert torch.equal(fast_keep.gather(1, order), ref_keep.sort(1).values)
    torch.testing.assert_close(fast[:, P:].gather(1, order[..., None].expand(-1, -1, 24)),
                               x[:, P:].gather(1, ref_keep.sort(1).values[..., None].expand(-1, -1, 24)))


def test_fast_inference_path_keeps_what_the_training_path_keeps():
    model = tiny_model("deit_small_distilled_patch16_224", keep_ratio=0.6).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        fast = model.forward_pruned(x)
        ref = model.forward_pruned(x, return_scores=True)  # the reference-exact predictor
        masked = model.forward_masked(x, decisions=[_grid_mask(k, model.num_patches) for k in fast.kept_indices])
    for a, b in zip(fast.kept_indices, ref.kept_indices):
        assert torch.equal(a.sort(1).values, b.sort(1).values)
    torch.testing.assert_close(fast.logits, ref.logits)
    torch.testing.assert_close(fast.logits, masked.logits[0] if isinstance(masked.logits, tuple) else masked.logits,
                               atol=1e-4, rtol=1e-4)


def _grid_mask(index: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(index.shape[0], n).scatter(1, index, 1.0)


# -- fast patch embedding -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        (dict(img_size=32, patch_size=4), (2, 3, 32, 32)),
        (dict(img_size=(24, 40), patch_size=8, in_chans=1), (2, 1, 24, 40)),  # non-square, grey
        (dict(img_size=30, patch_size=(4, 6), no_embed_class=True), (1, 3, 30, 30)),  # patches do not tile
        (dict(img_size=32, patch_size=4, dynamic_img_size=True), (2, 3, 40, 24)),  # another size at run time
        (dict(img_size=32, patch_size=4, dynamic_img_size=True, dynamic_img_pad=True), (2, 3, 30, 26)),
        (dict(img_size=32, patch_size=4, pre_norm=True, class_token=False, global_pool="avg"), (2, 3, 32, 32)),  # no bias
    ],
)
def test_fast_patch_embed_equals_timm(kwargs, shape):
    torch.manual_seed(0)
    dense = timm.create_model("vit_tiny_patch16_224", **{**tiny_kwargs(depth=2), **kwargs}).eval()
    fast = fast_patch_embed(copy.deepcopy(dense))
    assert isinstance(fast.patch_embed.proj, PatchProjection)
    assert list(fast.state_dict()) == list(dense.state_dict())
    x = torch.randn(*shape)
    with torch.no_grad():
        torch.testing.assert_close(fast.patch_embed(x), dense.patch_embed(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast(x), dense(x), atol=1e-5, rtol=1e-5)


def test_fast_patch_embed_with_norm_bias_shares_weights_and_trains():
    torch.manual_seed(0)
    dense = timm.create_model("vit_tiny_patch16_224", **tiny_kwargs(depth=1), embed_norm_layer=torch.nn.LayerNorm)
    assert isinstance(dense.patch_embed.norm, torch.nn.LayerNorm)
    proj = dense.patch_embed.proj
    fast_patch_embed(dense)
    assert dense.patch_embed.proj.weight is proj.weight and dense.patch_embed.proj.bias is proj.bias
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    got = dense.patch_embed(x)
    want = dense.patch_embed.norm(proj(x).flatten(2).transpose(1, 2))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    (got * torch.randn_like(got)).sum().backward()
    assert proj.weight.grad is not None and x.grad is not None
    assert fast_patch_embed(dense) is dense  # again: nothing to do


def test_fast_patch_embed_on_a_dynamicvit_loads_checkpoints_and_exports(tmp_path):
    model = tiny_model(keep_ratio=0.7).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    path = dynamicvit.save_model(model, tmp_path / "m.safetensors")
    fast = fast_patch_embed(dynamicvit.load_model(path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), before, atol=1e-5, rtol=1e-5)
    fast.predictors[0].reset_parameters()  # saved and loaded in the fast form, keys unchanged
    dynamicvit.load_model(dynamicvit.save_model(fast, tmp_path / "f.safetensors"))
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(fast, (x,), dynamic_shapes={"x": {0: batch}})
    assert "convolution" not in str(program.graph)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), fast(x))


@pytest.mark.slow
def test_fast_patch_embed_exports_to_onnx():
    ort = pytest.importorskip("onnxruntime")
    model = fast_patch_embed(tiny_model(keep_ratio=0.7)).eval()
    x = torch.randn(2, 3, 32, 32)
    proto = torch.onnx.export(model, (x,), dynamo=True).model_proto
    assert "Conv" not in {node.op_type for node in proto.graph.node}
    session = ort.InferenceSession(proto.SerializeToString())
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x), atol=1e-5, rtol=1e-5)


def test_fast_patch_embed_refuses_what_it_cannot_compute():
    dense = timm.create_model("vit_tiny_patch16_224", **tiny_kwargs(depth=1))
    overlapping = copy.deepcopy(dense)
    overlapping.patch_embed.proj = torch.nn.Conv2d(3, 48, kernel_size=6, stride=4, padding=1)
    with pytest.raises(UnsupportedModelError, match="overlapping"):
        fast_patch_embed(overlapping)
    assert type(overlapping.patch_embed.proj) is torch.nn.Conv2d  # left unchanged
    padded = copy.deepcopy(dense)
    padded.patch_embed.proj = torch.nn.Conv2d(3, 48, kernel_size=4, stride=4, padding=2)
    with pytest.raises(UnsupportedModelError, match="padding"):
        fast_patch_embed(padded)
    with pytest.raises(UnsupportedModelError, match="no timm PatchEmbed"):
        fast_patch_embed(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, 4)))


# -- fused masked attention ---------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fused_masked_attention_matches_the_reference_formula(seed):
    from timm.layers import Attention

    torch.manual_seed(seed)
    attn = Attention(48, num_heads=3, qk_norm=seed == 2, norm_layer=torch.nn.LayerNorm)
    x = torch.randn(4, 17, 48, requires_grad=True)
    policy = (torch.rand(4, 17, 1) > 0.4).float()
    policy[:, 0] = 1.0  # the class token is never dropped
    policy.requires_grad_(True)
    weight = torch.randn(4, 17, 48)
    results = []
    for fused in (False, True):
        attn.zero_grad()
        x.grad = policy.grad = None
        y = masked_attention(attn, x, policy, fused=fused)
        (y * weight).sum().backward()
        results.append((y.detach(), x.grad.clone(), policy.grad.clone(), attn.qkv.weight.grad.clone()))
    for exact, fused in zip(*results):
        torch.testing.assert_close(fused, exact, atol=1e-5, rtol=1e-4)


def test_policy_bias_gradient_is_the_reference_one_and_stays_bounded():
    g = torch.tensor([[1.0, 1.0, 0.0]], requires_grad=True)
    upstream = torch.randn(1, 1, 3, 3)
    for lead in (5.0, 10.0, 40.0):  # a dropped key `lead` nats above the kept ones
        a = torch.zeros(1, 1, 3, 3)
        a[..., 2] = lead
        grads = []
        for weights in ((a + policy_bias(g)).softmax(-1), masked_softmax(a, g)):
            assert torch.isfinite(weights).all()
            (grad,) = torch.autograd.grad((weights * upstream).sum(), g)
            assert torch.isfinite(grad).all() and grad.abs().max() < 1e7  # exact: ~exp(40) = 2e17
            grads.append(grad)
        if lead < 13.0:  # the normal regime (log 1/eps = 13.8): the same gradient, nonzero for the dropped key
            # The two stabilizers differ by ~eps relative to the kept keys' weight e^-lead.
            torch.testing.assert_close(grads[0], grads[1], atol=1e-4, rtol=3e-6 * math.exp(lead) + 1e-4)
            assert grads[0][0, 2] != 0
    # A kept key leads each row: the bias gives the reference's weights.
    torch.manual_seed(0)
    a = torch.randn(2, 3, 6, 6)
    g = torch.tensor([[1.0, 0, 1, 1, 0, 1], [1, 1, 1, 0, 0, 0]])
    torch.testing.assert_close((a + policy_bias(g)).softmax(-1), masked_softmax(a, g), atol=1e-5, rtol=1e-4)


def test_fused_masked_attention_trains_like_the_reference():
    """A few steps of the full objective from the same start give the same weights either way."""
    torch.manual_seed(0)
    start = tiny_model(keep_ratio=0.6, num_classes=4)
    teacher = copy.deepcopy(start.backbone).eval()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    with torch.no_grad():
        feats = teacher.forward_features(x)
        t_logits, t_tokens = teacher.forward_head(feats), feats[:, 1:]
    criterion = DynamicViTLoss(0.6)
    trained = []
    for fused in (False, True):
        model = fused_masked_attention(copy.deepcopy(start), fused).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        torch.manual_seed(1)  # the same Gumbel noise for both
        for _ in range(4):
            loss, _ = criterion(model(x), y, t_logits, t_tokens)
            opt.zero_grad()
            loss.backward()
            opt.step()
        trained.append(model)
    exact, fused = trained
    assert exact.host.fused_masked_attn is False and fused.host.fused_masked_attn is True
    for (name, a), b in zip(exact.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-3, msg=name)
    moved = [(a - s).abs().max() for a, s in zip(exact.predictors.parameters(), start.predictors.parameters())]
    assert max(moved) > 1e-3  # the predictors really learned something in those steps


def test_fused_masked_attention_needs_a_dynamicvit():
    with pytest.raises(UnsupportedModelError, match="DynamicViT"):
        fused_masked_attention(timm.create_model("vit_tiny_patch16_224", **tiny_kwargs(depth=1)))


# -- the GPU benchmark script ---------------------------------------------------------------------


def _dry_run(tmp_path, *extra) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_table.py"), "--device", "cpu", "--output", str(tmp_path), *extra],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    table = (tmp_path / "gpu_table.md").read_text()
    assert table in out.stdout
    assert "failed" not in table and "skipped" not in table and "nan" not in table.lower(), table
    for row in ("DeiT-S batch 2, bf16 autocast, timm's embedding in both", "DeiT-S batch 2, bf16 weights, fast embedding",
                "DeiT-S batch 1, bf16 autocast", "DeiT-B batch 2", "one pruning stage (keep_margin + top-k + gather)", "DeiT-B batch 1", "fast patch embedding alone",
                "training step DeiT-S batch 2, bf16 autocast, exact masked attention",
                "training step DeiT-S batch 2, bf16 autocast, fused masked attention"):
        assert row in table, row
    assert table.count("x |") >= 10  # speed-ups of ours and of the free-predictor bound
    return table


def test_gpu_table_dry_run_on_cpu(tmp_path):
    table = _dry_run(tmp_path, "--no-compile")
    assert "CUDA graphs" not in table


@pytest.mark.slow
def test_gpu_table_dry_run_on_cpu_with_the_compiled_rows(tmp_path):
    table = _dry_run(tmp_path)
    assert 'DeiT-S batch 1, CUDA graphs (compile mode "reduce-overhead", bf16 weights), fast embedding in both' in table
    assert "DeiT-S batch 2, torch.compile (bf16 weights), fast embedding in both" in table
