"""The MACs counter: the paper's DeiT-S figures, a closed form for any ViT, fused attention, the CLI."""
import json

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import dynamicvit
from dynamicvit import cli
from dynamicvit.runtime.flops import _MacCounter, count_macs, default_input_size, truncate
from conftest import tiny_kwargs, tiny_model


# -- a closed form, written from the architecture alone ----------------------------------------------


def _dims(model):
    bb = model.backbone if isinstance(model, dynamicvit.DynamicViT) else model
    proj = bb.patch_embed.proj
    return dict(
        C=bb.embed_dim,
        hidden=bb.blocks[0].mlp.fc1.out_features,
        depth=len(bb.blocks),
        N=bb.patch_embed.num_patches,
        P=bb.num_prefix_tokens,
        patch=proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1],
        heads=bb.num_classes * (2 if getattr(bb, "head_dist", None) is not None else 1),
    )


def closed_form_backbone(d, tokens_per_block):
    """Patch embedding + per block M(3C^2 + C^2 + 2 C Hd) + 2 M^2 C + classifier head(s)."""
    C, Hd = d["C"], d["hidden"]
    blocks = sum(M * (4 * C * C + 2 * C * Hd) + 2 * M * M * C for M in tokens_per_block)
    return d["N"] * d["patch"] * C + blocks + C * d["heads"]


def closed_form_predictors(C, scored, P):
    """Prediction modules scoring `scored[s]` patch tokens at stage s, in the two layouts.

    Reference layout: Linear(C, C) + Linear(C, C/2) on concat(local, global) + Linear(C/2, C/4) + Linear(C/4, 2)
    per patch token. Ours (the inference path's `keep_margin`): out_conv[0]'s global half is applied once per
    image ((C/2)^2), and the two-way last layer is one dot product (w_keep - w_drop) per token.
    """
    reference = sum(n * (C * C + C * (C // 2) + C // 2 * (C // 4) + C // 4 * 2) for n in scored)
    ours = sum(n * (C * C + (C // 2) * (C // 2) + C // 2 * (C // 4) + C // 4) + (C // 2) * (C // 2) for n in scored)
    return reference, ours


def tokens_per_block(model):
    d = _dims(model)
    if not isinstance(model, dynamicvit.DynamicViT):
        return [d["P"] + d["N"]] * d["depth"], []
    counts, locs = model.keep_counts(), model.prune_locs
    tokens, scored, n = [], [], d["N"]
    for i in range(d["depth"]):
        if i in locs:
            scored.append(n)
            n = counts[locs.index(i)]
        tokens.append(d["P"] + n)
    return tokens, scored


def assert_matches_closed_form(model):
    report = count_macs(model)
    d = _dims(model)
    tokens, scored = tokens_per_block(model)
    backbone = closed_form_backbone(d, tokens)
    assert report.total - report.predictor_macs == backbone
    assert report.predictor_macs in closed_form_predictors(d["C"], scored, d["P"])
    assert report.uncounted == []
    return report


# -- the paper's DeiT-S figures --------------------------------------------------------------------


@pytest.fixture(scope="module")
def deit_small():
    torch.manual_seed(0)
    return dynamicvit.create_model("deit_small_patch16_224", keep_ratio=0.7)


@pytest.mark.parametrize("keep_ratio, paper", [(1.0, 4.6), (0.9, 4.0), (0.8, 3.4), (0.7, 2.9)])
def test_deit_small_reproduces_paper_table(deit_small, keep_ratio, paper):
    model = deit_small.backbone if keep_ratio == 1.0 else deit_small.at_keep_ratio(keep_ratio)
    report = assert_matches_closed_form(model)
    # The paper's figures: truncated to one decimal, normalization layers counted as fvcore does.
    assert truncate(report.gmacs_with_norms, 1) == paper
    assert report.to_dict()["gmacs_paper_style"] == paper
    if keep_ratio < 1.0:
        assert truncate(report.gmacs, 1) == paper  # matrix products alone already give the figure
    else:
        assert report.total == 4_598_882_304  # 4.599 G: matrix products alone truncate to 4.5


def test_deit_small_at_07_and_its_predictors(deit_small):
    report = count_macs(deit_small.at_keep_ratio(0.7))
    assert report.keep_counts == (137, 96, 67)
    assert 2.96 < report.gmacs < 2.99
    # The three prediction modules: 0.103 G in the reference layout, 0.071 G with the global half per image.
    assert 0.07 < report.predictor_macs / 1e9 < 0.105
    # Fused attention is counted: both products at 197 tokens are 2 * 197^2 * 384 = 29.8 M MACs per block.
    assert report.by_kind["attention"] == sum(2 * M * M * 384 for M in [197] * 3 + [138] * 3 + [97] * 3 + [68] * 3)


# -- any ViT ---------------------------------------------------------------------------------------


CONFIGS = {
    "tiny": ("vit_tiny_patch16_224", {}),
    "patch8_mlp2": ("vit_tiny_patch16_224", dict(img_size=48, patch_size=8, embed_dim=64, num_heads=4, mlp_ratio=2.0, num_classes=7)),
    "distilled": ("deit_tiny_distilled_patch16_224", {}),
    "registers": ("vit_tiny_patch16_224", dict(reg_tokens=4)),
    "no_class_token": ("vit_tiny_patch16_224", dict(class_token=False, global_pool="avg")),
    "rectangular_gray": ("vit_tiny_patch16_224", dict(img_size=(32, 48), in_chans=1)),
}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("keep_ratio", [1.0, 0.7, 0.5])
def test_counter_matches_closed_form(name, keep_ratio):
    arch, kwargs = CONFIGS[name]
    model = tiny_model(arch, keep_ratio=0.7 if keep_ratio == 1.0 else keep_ratio, **kwargs)
    if keep_ratio == 1.0:
        model = model.backbone
    report = assert_matches_closed_form(model)
    if keep_ratio < 1.0:
        assert report.predictor_macs > 0 and report.total < count_macs(model.backbone).total


def test_distilled_and_register_prefix_tokens_are_kept():
    model = tiny_model("deit_tiny_distilled_patch16_224")
    report = count_macs(model)
    stage_tokens = [s["tokens"] for s in report.stages if s["name"].startswith("stage")]
    assert stage_tokens == [2 + 64] + [2 + k for k in model.keep_counts()]


def test_stages_add_up_and_describe_the_model():
    model = tiny_model(keep_ratio=0.6, prune_locs=(2, 4))
    report = count_macs(model)
    names = [s["name"] for s in report.stages]
    assert names == ["embed", "stage0", "stage1", "stage2", "head"]
    assert sum(s["macs"] for s in report.stages) == report.total
    assert sum(s["params"] for s in report.stages) == report.params == sum(p.numel() for p in model.parameters())
    assert sum(s["predictor_macs"] for s in report.stages) == report.predictor_macs
    assert [s["blocks"] for s in report.stages[1:4]] == [[0, 1], [2, 3], [4, 5]]
    assert report.stages[0]["tokens"] == 64
    assert [s["tokens"] for s in report.stages[1:4]] == [65, 1 + 38, 1 + 23]  # int(64 * .6), int(64 * .36)
    assert report.stages[1]["predictor_macs"] == 0 and report.stages[2]["predictor_macs"] > 0
    # Embedding stage: the patch projection; head: the classifier.
    assert report.stages[0]["macs"] == 64 * 3 * 4 * 4 * 48
    assert report.stages[-1]["macs"] == 48 * 10
    assert report.stages[-1]["params"] == sum(p.numel() for p in model.backbone.head.parameters()) + 2 * 48  # + final norm


def test_fused_and_manual_attention_count_the_same():
    model = tiny_model().backbone
    fused = count_macs(model)
    for blk in model.blocks:
        blk.attn.fused_attn = False
    manual = count_macs(model)
    assert fused.total == manual.total
    assert fused.by_kind["attention"] == manual.by_kind["matmul"] > 0
    assert fused.by_kind["matmul"] == manual.by_kind["attention"] == 0


@pytest.mark.parametrize("inference_mode", [True, False])
def test_cpu_fused_attention_kernel_is_counted(inference_mode):
    # Outside inference mode the dispatcher shows the CPU kernel (_scaled_dot_product_flash_attention_for_cpu)
    # rather than scaled_dot_product_attention; torch's own FlopCounterMode counts zero for it.
    q, k, v = torch.randn(2, 3, 17, 8), torch.randn(2, 3, 11, 8), torch.randn(2, 3, 11, 5)
    counter = _MacCounter(lambda args: "x")
    with (torch.inference_mode() if inference_mode else torch.no_grad()), counter:
        F.scaled_dot_product_attention(q, k, v)
    assert counter.macs == {"x": 2 * 3 * 17 * 11 * (8 + 5)}


def test_agrees_with_torch_flop_counter_where_it_works():
    # torch counts FLOPs = 2 x MACs and misses the CPU fused attention; with manual attention it sees everything.
    model = tiny_model(keep_ratio=0.5).eval()
    for blk in model.backbone.blocks:
        blk.attn.fused_attn = False
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(torch.randn(1, 3, 32, 32))
    assert fc.get_total_flops() == 2 * count_macs(model).total


def test_meta_run_equals_real_run(monkeypatch):
    import dynamicvit.runtime.flops as flops

    model = tiny_model(keep_ratio=0.5)
    meta = count_macs(model)
    real_run = flops._run

    def no_meta(model, layout, size, dtype, meta):
        if meta:
            raise NotImplementedError("pretend an operator has no meta kernel")
        return real_run(model, layout, size, dtype, meta)

    monkeypatch.setattr(flops, "_run", no_meta)
    real = count_macs(model)
    assert real.total == meta.total and real.stages == meta.stages and real.norm_ops == meta.norm_ops


def test_count_leaves_the_model_alone():
    model = tiny_model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count_macs(model)
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].device.type == "cpu" for k in before)


def test_input_size_and_image_size():
    model = timm.create_model("vit_tiny_patch16_224", **tiny_kwargs(img_size=48))
    assert default_input_size(model) == (3, 48, 48)
    assert default_input_size(dynamicvit.sparsify(model)) == (3, 48, 48)
    assert count_macs(model).input_size == (3, 48, 48)
    with pytest.raises(dynamicvit.ConfigError):
        count_macs(dynamicvit.sparsify(model), input_size=(3, 32, 32))  # built for 48 px


def test_plain_module_without_blocks():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 30 * 30, 5))
    report = count_macs(model, input_size=(3, 32, 32))
    assert report.total == 8 * 30 * 30 * 27 + 8 * 30 * 30 * 5
    assert [s["name"] for s in report.stages] == ["model"]


def test_truncate_cuts_instead_of_rounding():
    assert truncate(2.98, 1) == 2.9
    assert truncate(4.6, 1) == 4.6
    assert truncate(3.0, 1) == 3.0
    assert truncate(4.599, 1) == 4.5
    assert truncate(0.0349, 2) == 0.03


# -- CLI -------------------------------------------------------------------------------------------

KWARGS = json.dumps({k: v for k, v in tiny_kwargs().items()})


def test_cli_json(capsys):
    assert cli.main(["flops", "--model", "vit_tiny_patch16_224", "--model-kwargs", KWARGS, "--keep-ratio", "0.7", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = count_macs(tiny_model(keep_ratio=0.7))
    assert out["gmacs"] == pytest.approx(expected.gmacs, rel=0, abs=1e-12)
    assert out["params"] == expected.params
    assert out["dense"] is False and out["keep_counts"] == [44, 31, 21]
    assert [s["name"] for s in out["stages"]] == ["embed", "stage0", "stage1", "stage2", "stage3", "head"]


@pytest.mark.parametrize("flag", [["--dense"], ["--keep-ratio", "1.0"]])
def test_cli_dense(capsys, flag):
    args = ["flops", "--model", "vit_tiny_patch16_224", "--model-kwargs", "img_size=32,patch_size=4,embed_dim=48,"
            "depth=6,num_heads=3,num_classes=10", "--json", *flag]
    assert cli.main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dense"] is True and out["predictor_gmacs"] == 0
    assert out["gmacs"] * 1e9 == pytest.approx(count_macs(tiny_model().backbone).total)


def test_cli_table(capsys):
    assert cli.main(["flops", "--model-kwargs", KWARGS, "--model", "vit_tiny_patch16_224", "--img-size", "48"]) == 0
    out = capsys.readouterr().out
    assert "one 3x48x48 image" in out and "stage3" in out and out.count("\n") > 8
    assert f"{count_macs(tiny_model(img_size=48)).gmacs:.4f}" in out


def test_cli_checkpoint(tmp_path, capsys):
    model = tiny_model(keep_ratio=0.5)
    path = dynamicvit.save_model(model, tmp_path / "m.safetensors")
    assert cli.main(["flops", "--checkpoint", str(path), "--keep-ratio", "0.5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["gmacs"] == pytest.approx(count_macs(model).gmacs)


def test_cli_dense_counts_any_timm_model(capsys):
    assert cli.main(["flops", "--model", "resnet18", "--dense", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 1.81 < out["gmacs"] < 1.83 and out["params"] == 11_689_512  # timm's published 1.8 GMACs, 11.7 M


def test_cli_bad_kwargs(capsys):
    assert cli.main(["flops", "--model-kwargs", "{not json", "--json"]) == 2
    assert "--model-kwargs" in capsys.readouterr().err
    assert cli.main(["flops", "--model-kwargs", "patch_size", "--json"]) == 2
