"""Hugging Face transformers models as hosts: every supported class, built tiny and random in the test
(no downloads), against the unmodified transformers model; folders, checkpoints, MACs, commands, bad input."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

import dynamicvit
from dynamicvit import cli
from dynamicvit.core.hosts.hf import SUPPORTED, TransformersOutput
from dynamicvit.errors import CheckpointError, ConfigError, UnsupportedModelError
from dynamicvit.weights.build import create_backbone
from dynamicvit.weights.formats import check_settings

from conftest import scramble

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent

# 32 px images, 8 px patches: a 4x4 grid of 16 patch tokens; 4 layers, stages before layers (1, 2, 3).
TINY = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, image_size=32, patch_size=8)
CONFIGS = {  # class -> (config class, extra config fields)
    "ViTModel": ("ViTConfig", dict(intermediate_size=64)),
    "ViTForImageClassification": ("ViTConfig", dict(intermediate_size=64, num_labels=5)),
    "DeiTModel": ("DeiTConfig", dict(intermediate_size=64)),
    "DeiTForImageClassification": ("DeiTConfig", dict(intermediate_size=64, num_labels=5)),
    "DeiTForImageClassificationWithTeacher": ("DeiTConfig", dict(intermediate_size=64, num_labels=5)),
    "Dinov2Model": ("Dinov2Config", dict(layerscale_value=0.5)),
    "Dinov2ForImageClassification": ("Dinov2Config", dict(num_labels=5, use_swiglu_ffn=True)),
    "Dinov2WithRegistersModel": ("Dinov2WithRegistersConfig", dict(num_register_tokens=3)),
    "Dinov2WithRegistersForImageClassification": ("Dinov2WithRegistersConfig", dict(num_register_tokens=2, num_labels=5)),
    "CLIPVisionModel": ("CLIPVisionConfig", dict(intermediate_size=64)),
    "CLIPVisionModelWithProjection": ("CLIPVisionConfig", dict(intermediate_size=64, projection_dim=16)),
}
PREFIX = {"DeiT": 2, "Dinov2WithRegistersModel": 4, "Dinov2WithRegistersForImageClassification": 3}
OUTPUTS = ("logits", "pooler_output", "image_embeds", "cls_logits", "distillation_logits")
IMPLS = ("sdpa", "eager")


def hf_model(name: str, attn: str = "sdpa", seed: int = 0, **config_overrides):
    """A tiny random transformers model of class `name`, every parameter moved off its init (zero tokens,
    unit LayerScale) so that the tests see them."""
    torch.manual_seed(seed)
    config_cls, extra = CONFIGS[name]
    config = getattr(transformers, config_cls)(**{**TINY, **extra, **config_overrides})
    model = getattr(transformers, name)._from_config(config, attn_implementation=attn)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def sparse(name: str, attn: str = "sdpa", keep_ratio: float = 0.7, **kwargs):
    model = dynamicvit.sparsify(hf_model(name, attn), keep_ratio, **kwargs)
    for predictor in model.predictors:
        scramble(predictor)
    return model.eval()


def images(batch: int = 3, seed: int = 1, size: int = 32) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(batch, 3, size, size)


def prefix_tokens(name: str) -> int:
    return PREFIX.get(name, PREFIX.get(name[:4], 1))


def in_grid_order(tokens: torch.Tensor, kept: torch.Tensor, P: int, N: int) -> torch.Tensor:
    """Final tokens (B, P + N, C) in kept order -> prefix tokens, then patch tokens in grid order."""
    patches = torch.empty_like(tokens[:, P:]).scatter(1, kept.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]), tokens[:, P:])
    return torch.cat([tokens[:, :P], patches], dim=1)


def kept_masks(kept_indices, batch: int, N: int) -> list[torch.Tensor]:
    return [torch.zeros(batch, N).scatter(1, idx, 1.0) for idx in kept_indices]


# -- invariants on every supported class -----------------------------------------------------------


def test_every_supported_class_is_tested():
    assert set(CONFIGS) == set(SUPPORTED)


@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("name", CONFIGS)
def test_keep_ratio_one_reproduces_the_transformers_model(name, attn):
    model = sparse(name, attn, keep_ratio=1.0)
    x = images()
    with torch.no_grad():
        ref, out = model.backbone(x), model(x)
        hidden = model.host.base(x).last_hidden_state  # a classifier's base model's output
    assert isinstance(out, TransformersOutput)
    compared = [k for k in OUTPUTS if getattr(ref, k, None) is not None]
    # Everything the model returns, and for CLIP with projection the pooled output besides its embedding.
    assert compared and set(compared) <= {k for k in OUTPUTS if getattr(out, k) is not None}
    for key in compared:
        torch.testing.assert_close(getattr(out, key), getattr(ref, key), atol=1e-5, rtol=1e-4)
    P, N = model.num_prefix_tokens, model.num_patches
    assert P == prefix_tokens(name)
    # The final tokens, put back in grid order by the kept indices, are the model's last_hidden_state.
    restored = in_grid_order(out.last_hidden_state, out.kept_indices[-1], P, N)
    torch.testing.assert_close(restored, hidden, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", CONFIGS)
def test_training_path_with_all_tokens_kept_equals_the_dense_model(name):
    model = sparse(name)
    x = images()
    ones = [torch.ones(x.shape[0], model.num_patches)] * len(model.prune_locs)
    with torch.no_grad():
        out = model.forward_masked(x, decisions=ones)
        ref = model.backbone(x)
        hidden = model.host.base(x).last_hidden_state
    main = next(getattr(ref, k) for k in ("logits", "image_embeds", "pooler_output") if getattr(ref, k, None) is not None)
    torch.testing.assert_close(out.logits, main, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.tokens, hidden[:, model.num_prefix_tokens:], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fused", [False, True], ids=["dropped", "fused"])
@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("name", CONFIGS)
def test_inference_and_training_paths_agree_on_the_kept_tokens(name, attn, fused):
    model = sparse(name, attn, keep_ratio=0.5, fuse_dropped=fused)
    x = images()
    with torch.no_grad():
        pruned = model.forward_pruned(x)
        masks = kept_masks(pruned.kept_indices, x.shape[0], model.num_patches)
        masked = model.forward_masked(x, decisions=masks)
    torch.testing.assert_close(pruned.logits, masked.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(masked.mask, masks[-1])


@pytest.mark.parametrize("name", CONFIGS)
def test_prefix_tokens_are_never_dropped(name):
    model = sparse(name, keep_ratio=0.5)
    P, N = model.num_prefix_tokens, model.num_patches
    x = images()
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda m, a: seen.append(a[0])) for layer in model.host.blocks]
    with torch.no_grad():
        out = model(x)
    for h in hooks:
        h.remove()
    counts = model.keep_counts()
    assert [t.shape[1] for t in seen] == [P + N, P + counts[0], P + counts[1], P + counts[2]]
    assert out.last_hidden_state.shape[1] == P + counts[-1]
    for idx, k in zip(out.kept_indices, counts):
        assert idx.shape == (x.shape[0], k) and all(len(set(row.tolist())) == k for row in idx) and int(idx.max()) < N
    # The training path keeps the prefix tokens by construction: the same final prefix tokens (class,
    # distillation, registers) mean that the inference path kept them at every stage too.
    trained = training_final_tokens(model, x, kept_masks(out.kept_indices, x.shape[0], N))
    torch.testing.assert_close(out.last_hidden_state[:, :P], trained[:, :P], atol=1e-4, rtol=1e-4)


def training_final_tokens(model, x, masks) -> torch.Tensor:
    """The training path's final normed tokens (B, P + N, C) for the given decisions, as the final norm returns them."""
    captured = []
    norm = model.host.norm
    model.host.norm = lambda t: captured.append(norm(t)) or captured[-1]  # the host is a plain object: patch it
    try:
        with torch.no_grad():
            model.forward_masked(x, decisions=masks)
    finally:
        del model.host.norm
    return captured[0]


@pytest.mark.parametrize("name", CONFIGS)
def test_every_parameter_gets_a_gradient(name):
    model = sparse(name).train()
    out = model(images(batch=4))
    (out.logits.square().sum() + out.tokens.square().mean() + sum(d.mean() for d in out.decisions)).backward()
    # A mask token serves masked image modeling only; the unmodified model leaves it without gradient too.
    missing = [n for n, p in model.named_parameters()
               if "mask_token" not in n and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not missing, f"no gradient for {missing}"


@pytest.mark.parametrize("name", ["ViTForImageClassification", "Dinov2WithRegistersForImageClassification",
                                  "CLIPVisionModelWithProjection", "DeiTForImageClassificationWithTeacher"])
def test_fused_masked_attention_matches_the_reference_formula(name):
    model = sparse(name, keep_ratio=0.5)
    x = images()
    with torch.no_grad():
        masks = kept_masks(model.forward_pruned(x).kept_indices, x.shape[0], model.num_patches)
        reference = model.forward_masked(x, decisions=masks).logits
        dynamicvit.fused_masked_attention(model)
        fused = model.forward_masked(x, decisions=masks).logits
    torch.testing.assert_close(fused, reference, atol=1e-4, rtol=1e-4)


def test_an_image_does_not_depend_on_the_rest_of_the_batch():
    model = sparse("Dinov2WithRegistersForImageClassification", keep_ratio=0.5)
    x = images(batch=4)
    with torch.no_grad():
        together = model(x).logits
        alone = torch.cat([model(x[i : i + 1]).logits for i in range(4)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)


# -- saving and loading -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_save_model_and_load_round_trip_exactly(name, tmp_path):
    model = sparse(name, attn="eager", keep_ratio=0.6, fuse_dropped=True)
    model.set_keep_ratio_range((0.5, 0.8))
    path = dynamicvit.save_model(model, tmp_path / "model.safetensors")
    loaded = dynamicvit.load(path).eval()
    assert type(loaded.backbone).__name__ == name and loaded.backbone.config._attn_implementation == "eager"
    assert (loaded.keep_ratio, loaded.prune_locs, loaded.fuse_dropped, loaded.keep_ratio_range) == (
        0.6, model.prune_locs, True, (0.5, 0.8))
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    x = images()
    with torch.no_grad():
        a, b = model(x), loaded(x)
    for key in a.keys():
        if key != "kept_indices":
            assert torch.equal(getattr(a, key), getattr(b, key)), key


def test_a_dense_transformers_model_round_trips_through_save_model(tmp_path):
    model = hf_model("ViTForImageClassification")
    loaded = dynamicvit.load(dynamicvit.save_model(model, tmp_path / "dense.safetensors"))
    assert type(loaded) is type(model)
    x = images()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_settings_store_the_config_and_never_a_path(tmp_path):
    folder = tmp_path / "vit"
    hf_model("ViTForImageClassification").save_pretrained(folder)
    model = dynamicvit.create_model(f"hf:{folder}")
    settings = dynamicvit.weights.formats.model_settings(model)
    assert settings["model_name"] == "hf:ViTForImageClassification"
    assert settings["transformers"]["config"]["model_type"] == "vit"
    assert str(tmp_path) not in json.dumps(settings)  # nothing that points back at the folder


def test_save_pretrained_folder_is_read_by_transformers_and_dynamicvit(tmp_path):
    model = sparse("Dinov2ForImageClassification", keep_ratio=0.6)
    folder = dynamicvit.save_pretrained(model, tmp_path / "sparse")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "dynamicvit.safetensors", "model.safetensors"]
    x = images()
    # transformers reads the backbone (the dense model, as before sparsification) ...
    dense = transformers.Dinov2ForImageClassification.from_pretrained(folder).eval()
    # ... and dynamicvit the sparse model, with its prediction modules.
    again = dynamicvit.load(f"hf:{folder}").eval()
    assert again.keep_ratio == 0.6 and again.prune_locs == model.prune_locs
    with torch.no_grad():
        assert torch.equal(dense(x).logits, model.backbone(x).logits)
        assert torch.equal(again(x).logits, model(x).logits)
    # Nothing a user wrote is replaced: a non-empty folder is refused unless overwrite is asked for.
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not empty"):
        dynamicvit.save_pretrained(model, tmp_path / "notes")
    dynamicvit.save_pretrained(model, tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"


def test_a_folder_runs_at_the_size_its_image_processor_makes(tmp_path):
    # DINOv2's releases: a position table for 518 px (here 56 px), images cropped to 224 px (here 32 px).
    model = hf_model("Dinov2Model", image_size=56)
    folder = tmp_path / "dinov2"
    model.save_pretrained(folder)
    processor = {"size": {"shortest_edge": 36}, "crop_size": {"height": 32, "width": 32}, "do_center_crop": True,
                 "resample": 3, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    sparse_model = dynamicvit.create_model(f"hf:{folder}", keep_ratio=1.0).eval()
    assert sparse_model.img_size == (32, 32) and sparse_model.num_patches == 16
    x = images()
    with torch.no_grad():
        ref = model(x)  # transformers interpolates the position table itself
        torch.testing.assert_close(sparse_model(x).pooler_output, ref.pooler_output, atol=1e-5, rtol=1e-4)
    prep = dynamicvit.data.preprocessing_config(sparse_model)
    assert prep["crop_mode"] == "center" and prep["crop_pct"] == pytest.approx(32 / 36)
    assert prep["mean"] == pytest.approx(processor["image_mean"]) and prep["interpolation"] == "bicubic"


def test_image_processor_settings_become_an_eval_transform():
    from dynamicvit.core.hosts.hf_processor import processor_preprocessing

    deit = {"size": {"height": 256, "width": 256}, "crop_size": {"height": 224, "width": 224}, "do_center_crop": True,
            "resample": 3, "rescale_factor": 1 / 255, "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.2, 0.2]}
    assert processor_preprocessing(deit, "deit", (3, 224, 224)) == {
        "input_size": [3, 224, 224], "mean": pytest.approx([0.5, 0.4, 0.3]), "std": pytest.approx([0.2] * 3),
        "crop_pct": 0.875, "crop_mode": "squash", "interpolation": "bicubic"}
    # Pixels scaled to [-1, 1] by rescale_factor 1/127.5 and mean 1: the same as mean 0.5, std 0.5 on [0, 1].
    signed = {"size": 224, "rescale_factor": 1 / 127.5, "image_mean": [1.0], "image_std": [1.0], "resample": 2}
    prep = processor_preprocessing(signed, "vit", (3, 224, 224))
    assert prep["mean"] == pytest.approx([0.5] * 3) and prep["std"] == pytest.approx([0.5] * 3)
    assert (prep["crop_mode"], prep["crop_pct"], prep["interpolation"]) == ("squash", 1.0, "bilinear")


@pytest.mark.slow
def test_import_dynamicvit_does_not_import_transformers():
    import subprocess

    code = "import sys, dynamicvit; sys.exit('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=600).returncode == 0


# -- multiply-accumulates ------------------------------------------------------------------------------

# facebook/deit-small-patch16-224 is a ViTForImageClassification with this configuration.
DEIT_SMALL = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, image_size=224,
                  patch_size=16, num_labels=1000, qkv_bias=True, layer_norm_eps=1e-12, hidden_act="gelu")


@pytest.fixture(scope="module")
def deit_small_folder(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("hf") / "deit-small-patch16-224"
    config = transformers.ViTConfig(**DEIT_SMALL, architectures=["ViTForImageClassification"])
    transformers.ViTForImageClassification(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("keep_ratio, paper", [(1.0, 4.6), (0.7, 2.9)])
def test_deit_small_counts_the_macs_of_timm(deit_small_folder, keep_ratio, paper):
    from dynamicvit.runtime.flops import count_macs

    hf_spec = f"hf:{deit_small_folder}"
    if keep_ratio == 1.0:
        ours, timm_model = create_backbone(hf_spec), create_backbone("deit_small_patch16_224")
    else:
        ours = dynamicvit.create_model(hf_spec, keep_ratio=keep_ratio)
        timm_model = dynamicvit.create_model("deit_small_patch16_224", keep_ratio=keep_ratio)
    a, b = count_macs(ours), count_macs(timm_model)
    assert (a.total, a.norm_ops, a.predictor_macs, a.params) == (b.total, b.norm_ops, b.predictor_macs, b.params)
    assert [(s["name"], s["macs"], s["tokens"]) for s in a.stages] == [(s["name"], s["macs"], s["tokens"]) for s in b.stages]
    assert a.to_dict()["gmacs_paper_style"] == paper and not a.uncounted


def test_flops_command_counts_a_transformers_folder(deit_small_folder, capsys):
    assert cli.main(["flops", "--model", f"hf:{deit_small_folder}", "--keep-ratio", "0.7", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "hf:ViTForImageClassification" and report["keep_counts"] == [137, 96, 67]
    assert report["gmacs_paper_style"] == 2.9
    assert cli.main(["flops", "--model", f"hf:{deit_small_folder}", "--dense", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["gmacs_paper_style"] == 4.6


# -- bad input -------------------------------------------------------------------------------------------


def test_an_unsupported_transformers_class_names_the_supported_ones(tmp_path, capsys):
    config = transformers.ViTConfig(**TINY, intermediate_size=64)
    model = transformers.ViTForMaskedImageModeling(config)
    with pytest.raises(UnsupportedModelError, match="ViTForMaskedImageModeling is not supported.*ViTForImageClassification"):
        dynamicvit.sparsify(model)
    model.save_pretrained(tmp_path / "mim")
    capsys.readouterr()
    assert cli.main(["flops", "--model", f"hf:{tmp_path / 'mim'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ViTForMaskedImageModeling" in err and "Dinov2Model" in err


def test_a_config_the_host_cannot_follow_is_refused(tmp_path, capsys):
    # DINOv2 interpolates the position table of a non-square image at every call, from a square grid only.
    model = hf_model("Dinov2Model", image_size=(32, 48))
    with pytest.raises(UnsupportedModelError, match="interpolate its position embeddings"):
        dynamicvit.sparsify(model)
    model.save_pretrained(tmp_path / "nonsquare")
    capsys.readouterr()
    assert cli.main(["flops", "--model", f"hf:{tmp_path / 'nonsquare'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "square config.image_size" in err
    # A position table that does not fit config.image_size (the model would interpolate it at every call).
    other = hf_model("ViTModel")
    other.embeddings.position_embeddings = torch.nn.Parameter(torch.zeros(1, 26, 32))
    with pytest.raises(UnsupportedModelError, match="holds 25 patch positions"):
        dynamicvit.sparsify(other)
    # An image size the model does not run at.
    with pytest.raises(ConfigError, match="32x32 px, got shape"):
        sparse("ViTModel")(images(size=48))


def test_a_hub_name_asks_for_a_local_folder(capsys):
    with pytest.raises(CheckpointError, match="not a local folder.*pass hf:DIR"):
        dynamicvit.create_model("hf:facebook/deit-small-patch16-224")
    assert cli.main(["flops", "--model", "hf:facebook/deit-small-patch16-224"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "hf download facebook/deit-small-patch16-224" in err


def test_hf_without_transformers_names_the_extra(deit_small_folder, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails
    assert cli.main(["flops", "--model", f"hf:{deit_small_folder}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'dynamicvit[hf]'" in err


def test_an_old_transformers_is_named(deit_small_folder, monkeypatch):
    # The module `import transformers` gives now (transformers' lazy module may have replaced itself).
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.57.1")
    with pytest.raises(ConfigError, match=r"transformers 4.57.1 is older than 5.18.*pip install -U"):
        dynamicvit.create_model(f"hf:{deit_small_folder}")


def test_timm_arguments_map_onto_the_config_or_are_refused(tmp_path, caplog):
    hf_model("Dinov2ForImageClassification").save_pretrained(tmp_path / "dinov2")
    hf_model("ViTForImageClassification").save_pretrained(tmp_path / "vit")
    dinov2 = create_backbone(f"hf:{tmp_path / 'dinov2'}", drop_path_rate=0.1, attn_drop_rate=0.2, num_classes=7)
    assert (dinov2.config.drop_path_rate, dinov2.config.attention_probs_dropout_prob, dinov2.config.num_labels) == (0.1, 0.2, 7)
    assert dinov2.classifier.out_features == 7
    vit = create_backbone(f"hf:{tmp_path / 'vit'}", drop_path_rate=0.1, drop_rate=0.3)  # ViT has no drop path
    assert vit.config.hidden_dropout_prob == 0.3 and "drop_path_rate=0.1 is ignored" in caplog.text
    with pytest.raises(ConfigError, match=r"\['embed_dim'\] cannot be applied"):
        create_backbone(f"hf:{tmp_path / 'vit'}", embed_dim=64)
    with pytest.raises(ConfigError, match="takes 3-channel images, not 1"):
        create_backbone(f"hf:{tmp_path / 'vit'}", in_chans=1)
    hf_model("Dinov2Model").save_pretrained(tmp_path / "base")
    with pytest.raises(ConfigError, match="Dinov2Model has no classifier"):
        create_backbone(f"hf:{tmp_path / 'base'}", num_classes=3)


def _stored(name: str = "ViTForImageClassification", **changes) -> dict:
    config = json.loads(hf_model(name).config.to_json_string(use_diff=False))
    block = {"class": name, "config": config, "attn_implementation": "sdpa", "img_size": [32, 32], "processor": None}
    settings = {"format_version": 1, "kind": "dense", "model_name": f"hf:{name}", "timm_kwargs": {}, "transformers": block}
    for key, value in changes.items():
        if key in block:
            block[key] = value
        else:
            settings[key] = value
    return settings


@pytest.mark.parametrize("changes, message", [
    (dict(model_name="hf:ViTForMaskedImageModeling", **{"class": "ViTForMaskedImageModeling"}), "supported: ViTModel"),
    (dict(model_name="hf:ViTModel"), "transformers class 'ViTForImageClassification'"),
    (dict(config={"model_type": "vit", "auto_map": {"AutoModel": "evil.Model"}}), "could run custom code"),
    (dict(config={"model_type": "dinov2"}), "model_type 'dinov2', not 'vit'"),
    (dict(config={"model_type": "vit", "x": object()}), "not a JSON object"),
    (dict(attn_implementation="flash_attention_2"), "attn_implementation"),
    (dict(img_size="224"), "img_size"),
    (dict(timm_kwargs={"pretrained": True}), "timm arguments"),
])
def test_stored_transformers_settings_are_checked(changes, message):
    with pytest.raises(CheckpointError, match=message):
        check_settings(_stored(**changes), "model.safetensors")


def test_stored_transformers_settings_that_are_fine_pass():
    settings = check_settings(json.dumps(_stored()), "model.safetensors")
    assert settings["transformers"]["class"] == "ViTForImageClassification"


# -- commands ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_eval_export_predict_and_visualize_a_transformers_folder(tmp_path, capsys, caplog):
    pytest.importorskip("onnxruntime")
    from PIL import Image

    # An ImageFolder of 2 classes and a tiny DeiT with 2 classes as the teacher.
    for split in ("train", "val"):
        for c in range(2):
            folder = tmp_path / "data" / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(8):
                Image.fromarray((torch.rand(40, 40, 3) * 255).byte().numpy()).save(folder / f"{i}.png")
    teacher = hf_model("DeiTForImageClassificationWithTeacher", num_labels=2)
    teacher.save_pretrained(tmp_path / "teacher")
    out = tmp_path / "run"
    assert cli.main(["train", "--model", f"hf:{tmp_path / 'teacher'}", "--dataset", str(tmp_path / "data"),
                     "--output", str(out), "--epochs", "1", "--batch-size", "4", "--num-workers", "0",
                     "--no-progress", "--no-tensorboard", "--device", "cpu"]) == 0
    trained = dynamicvit.load(out / "model.safetensors")
    assert trained.model_name == "hf:DeiTForImageClassificationWithTeacher" and trained.img_size == (32, 32)
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(out / "model.safetensors"), "--dataset", str(tmp_path / "data"),
                     "--num-workers", "0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["results"][0]
    assert result["images"] == 16 and result["keep_counts"] == list(trained.keep_counts())
    assert cli.main(["export", "--checkpoint", str(out / "model.safetensors"), "--output", str(tmp_path / "m.onnx"),
                     "--json"]) == 0
    export = json.loads(capsys.readouterr().out)["export"]
    assert export["verification"]["max_abs_diff"] < 1e-4
    # The trained model as a transformers folder: predict, visualize and bench read it as a checkpoint.
    folder = dynamicvit.save_pretrained(trained, tmp_path / "trained")
    image = tmp_path / "data" / "val" / "class0" / "0.png"
    assert cli.main(["predict", str(image), "--checkpoint", f"hf:{folder}", "--json", "--top-k", "2"]) == 0
    assert len(json.loads(capsys.readouterr().out)["results"]) == 1
    assert cli.main(["predict", str(image), "--model", f"hf:{tmp_path / 'teacher'}", "--json"]) == 0
    caplog.clear()
    assert cli.main(["visualize", "--checkpoint", f"hf:{folder}", "--dataset", str(tmp_path / "data"),
                     "--output", str(tmp_path / "pics"), "--num-samples", "2", "--device", "cpu"]) == 0
    assert list((tmp_path / "pics").glob("*.png"))
    assert "random weights" not in caplog.text  # the folder's prediction modules are the trained ones
    assert cli.main(["bench", "--checkpoint", f"hf:{folder}", "--keep-ratios", "1.0,0.7", "--batch-sizes", "2",
                     "--repeats", "1", "--warmup", "0", "--device", "cpu", "--json", str(tmp_path / "bench.json")]) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())
    assert [r["keep_ratio"] for r in rows] == [1.0, 0.7] and rows[1]["keep_counts"] == list(trained.keep_counts())


@pytest.mark.slow
def test_the_speed_benchmark_runs_at_tiny_sizes(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("hf_speed", ROOT / "benchmarks" / "hf_speed.py")
    hf_speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hf_speed)
    assert hf_speed.main(["--tiny", "--repeats", "1", "--warmup", "0", "--batch-sizes", "2,1", "--threads", "1",
                          "--json", str(tmp_path / "rows.json")]) == 0
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["library"], r["keep_ratio"], r["batch_size"]) for r in rows] == [
        (lib, ratio, bs) for bs in (2, 1) for lib, ratio in
        (("transformers", 1.0), ("transformers", 0.7), ("timm", 1.0), ("timm", 0.7))]
    # Both libraries count the same MACs at each keep ratio; the table ends with the verdict per batch size.
    assert rows[0]["gmacs"] == rows[2]["gmacs"] and rows[1]["gmacs"] == rows[3]["gmacs"] < rows[0]["gmacs"]
    assert re.findall(r"^batch (\d+): transformers", capsys.readouterr().out, flags=re.M) == ["2", "1"]


# -- the guide -------------------------------------------------------------------------------------------

GUIDE = ROOT / "docs" / "huggingface.md"


def test_the_guide_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"^```python\n(.*?)^```", GUIDE.read_text(), flags=re.S | re.M)
    assert blocks
    monkeypatch.chdir(tmp_path)
    for i, code in enumerate(blocks):
        exec(compile(code, f"{GUIDE}#block{i}", "exec"), {"__name__": "guide"})
