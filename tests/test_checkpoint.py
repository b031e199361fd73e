"""Checkpoints: our own round trip, reference DynamicViT files, plain timm weights, and clear errors."""
import json

import pytest
import timm
import torch

import dynamicvit
from dynamicvit.weights.formats import read_checkpoint
from dynamicvit.errors import CheckpointError

from conftest import reference_state, tiny_kwargs, tiny_model


def _x(seed=2):
    torch.manual_seed(seed)
    return torch.randn(3, 3, 32, 32)


def _perturb(model):
    """Give the predictors non-default weights so a silently skipped load would show."""
    torch.manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_round_trip_identical_outputs(tmp_path):
    model = _perturb(tiny_model(keep_ratio=0.6, prune_locs=[2, 4], reg_tokens=2)).eval()
    path = dynamicvit.save_model(model, tmp_path / "m.safetensors")
    loaded = dynamicvit.load_model(path).eval()
    assert loaded.keep_ratio == 0.6 and loaded.prune_locs == (2, 4) and loaded.num_prefix_tokens == 3
    x = _x()
    with torch.no_grad():
        a, b = model.forward_pruned(x), loaded.forward_pruned(x)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    for i, j in zip(a.kept_indices, b.kept_indices):
        assert torch.equal(i, j)
    # The keep ratio of a saved model can be changed when loading.
    assert dynamicvit.load_model(path, keep_ratio=0.9).keep_ratio == 0.9


def test_save_refuses_to_overwrite(tmp_path):
    model = tiny_model()
    target = tmp_path / "user.safetensors"
    target.write_text("precious")
    with pytest.raises(CheckpointError, match="already exists"):
        dynamicvit.save_model(model, target)
    assert target.read_text() == "precious"
    dynamicvit.save_model(model, target, overwrite=True)
    assert read_checkpoint(target)[1]["kind"] == "dynamicvit"


def test_dense_model_round_trip(tmp_path):
    dense = timm.create_model("vit_tiny_patch16_224", **tiny_kwargs()).eval()
    path = dynamicvit.save_model(dense, tmp_path / "dense.safetensors")
    loaded = dynamicvit.load_model(path).eval()
    assert not isinstance(loaded, dynamicvit.DynamicViT)
    with torch.no_grad():
        torch.testing.assert_close(dense(_x()), loaded(_x()), rtol=0, atol=0)


def test_reference_checkpoint_loads_and_matches(tmp_path):
    source = _perturb(tiny_model()).eval()
    sd = reference_state(source)
    assert "score_predictor.0.in_conv.0.weight" in sd and "score_predictor.2.out_conv.4.bias" in sd
    torch.save({"model": sd}, tmp_path / "ref.pth")
    model = dynamicvit.create_model(
        "vit_tiny_patch16_224", checkpoint_path=tmp_path / "ref.pth", **tiny_kwargs()
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(_x()), source(_x()), rtol=0, atol=0)


def test_plain_timm_weights_load_with_fresh_predictors(tmp_path):
    dense = _perturb(timm.create_model("vit_tiny_patch16_224", **tiny_kwargs())).eval()
    torch.save(dense.state_dict(), tmp_path / "dense.pth")
    model = dynamicvit.create_model("vit_tiny_patch16_224", checkpoint_path=tmp_path / "dense.pth", keep_ratio=1.0, **tiny_kwargs()).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(_x()), dense(_x()), atol=1e-5, rtol=1e-4)


def test_dense_weights_for_other_classes_reset_the_head(tmp_path):
    dense = timm.create_model("vit_tiny_patch16_224", **tiny_kwargs(num_classes=1000))
    torch.save({"model": dense.state_dict()}, tmp_path / "in1k.pth")
    model = dynamicvit.create_model("vit_tiny_patch16_224", checkpoint_path=tmp_path / "in1k.pth", **tiny_kwargs())
    assert model.num_classes == 10
    torch.testing.assert_close(model.backbone.blocks[0].attn.qkv.weight, dense.blocks[0].attn.qkv.weight)


def test_position_embedding_is_resized_for_another_image_size(tmp_path):
    dense = timm.create_model("vit_tiny_patch16_224", **tiny_kwargs())
    torch.save(dense.state_dict(), tmp_path / "dense.pth")
    model = dynamicvit.create_model("vit_tiny_patch16_224", checkpoint_path=tmp_path / "dense.pth", **tiny_kwargs(img_size=48))
    assert model.backbone.pos_embed.shape[1] == 1 + 12 * 12


def test_mismatched_checkpoint_lists_offending_keys(tmp_path):
    deeper = tiny_model(depth=8)
    torch.save({"model": deeper.state_dict()}, tmp_path / "deep.pth")  # weights only: the keys tell
    with pytest.raises(CheckpointError, match=r"unexpected keys \(\d+\): backbone.blocks.6"):
        dynamicvit.create_model("vit_tiny_patch16_224", checkpoint_path=tmp_path / "deep.pth", **tiny_kwargs())
    # With its settings stored, the clash is named before any key is compared.
    dynamicvit.save_model(deeper, tmp_path / "deep.safetensors")
    with pytest.raises(CheckpointError, match=r"saved with depth=8 but depth=6 was asked for"):
        dynamicvit.create_model("vit_tiny_patch16_224", checkpoint_path=tmp_path / "deep.safetensors", **tiny_kwargs())
    wider = tiny_model(embed_dim=96)
    torch.save({"model": wider.state_dict()}, tmp_path / "wide.pth")
    with pytest.raises(CheckpointError, match="shape mismatch"):
        dynamicvit.create_model("vit_tiny_patch16_224", checkpoint_path=tmp_path / "wide.pth", **tiny_kwargs())


def test_missing_predictors_in_own_checkpoint_is_an_error(tmp_path):
    model = tiny_model()
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("predictors.2.")}
    torch.save({"model": sd}, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"missing keys \(\d+\): predictors.2"):
        dynamicvit.create_model("vit_tiny_patch16_224", checkpoint_path=tmp_path / "partial.pth", **tiny_kwargs())


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"\x80\x02garbage"])
def test_corrupt_files_are_clear_errors(tmp_path, content):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        dynamicvit.create_model("vit_tiny_patch16_224", checkpoint_path=path, **tiny_kwargs())


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    path = dynamicvit.save_model(tiny_model(), tmp_path / "m.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        dynamicvit.load_model(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        dynamicvit.load_model(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="is a folder"):
        dynamicvit.load_model(tmp_path)


def test_weights_without_settings_need_a_model_name(tmp_path):
    torch.save(tiny_model().state_dict(), tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match="create_model"):
        dynamicvit.load_model(tmp_path / "w.pth")


def test_training_checkpoint_with_settings_loads(tmp_path):
    model = _perturb(tiny_model()).eval()
    settings = json.loads(json.dumps(dynamicvit.weights.formats.model_settings(model)))
    torch.save({"model": model.state_dict(), "dynamicvit": settings, "epoch": 3}, tmp_path / "last.pt")
    loaded = dynamicvit.load_model(tmp_path / "last.pt").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(_x()), model(_x()), rtol=0, atol=0)


def test_failed_download_says_how_to_pass_a_local_file(monkeypatch):
    real = timm.create_model

    def offline(name, pretrained=False, **kw):
        if pretrained:
            raise OSError("We couldn't connect to the hub")
        return real(name, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(CheckpointError, match="checkpoint_path=") as err:
        dynamicvit.create_model("vit_tiny_patch16_224", pretrained=True, **tiny_kwargs())
    assert "couldn't connect" in str(err.value)


def test_saved_model_loads_at_another_image_size(tmp_path):
    path = dynamicvit.save_model(tiny_model(), tmp_path / "m.safetensors")
    model = dynamicvit.load_model(path, img_size=48).eval()
    assert model.num_patches == 144 and model.keep_counts() == (100, 70, 49)
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 10)


def test_saved_files_are_readable_like_any_file(tmp_path):
    import os
    import stat

    path = dynamicvit.save_model(tiny_model(), tmp_path / "m.safetensors")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


def test_read_settings_from_every_format(tmp_path):
    from dynamicvit.weights.formats import read_settings

    model = tiny_model()
    assert read_settings(dynamicvit.save_model(model, tmp_path / "m.safetensors"))["prune_locs"] == [1, 3, 4]
    torch.save({"model": model.state_dict()}, tmp_path / "plain.pth")
    assert read_settings(tmp_path / "plain.pth") is None
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(CheckpointError, match="cannot read"):
        read_settings(tmp_path / "bad.safetensors")
