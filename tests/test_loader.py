"""`dynamicvit.load`: the one way every command builds a model from a file, whatever the file holds."""
import pytest
import timm
import torch

import dynamicvit
from dynamicvit.errors import CheckpointError, ConfigError

from conftest import reference_state, tiny_kwargs, tiny_model

def _logits(model, x):
    with torch.no_grad():
        out = model.eval()(x)
    return out.logits if hasattr(out, "logits") else out


def test_a_file_with_settings_is_rebuilt_from_them(tmp_path):
    model = tiny_model(keep_ratio=0.6, prune_locs=[2, 4])
    path = dynamicvit.save_model(model, tmp_path / "m.safetensors")
    loaded = dynamicvit.load(path)
    assert isinstance(loaded, dynamicvit.DynamicViT) and loaded.keep_ratio == 0.6 and loaded.prune_locs == (2, 4)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_logits(loaded, x), _logits(model, x), rtol=0, atol=0)
    # `keep_ratio` is for plain weights: the file's own ratio stays.
    assert dynamicvit.load(path, keep_ratio=0.9).keep_ratio == 0.6
    with pytest.raises(CheckpointError, match="deit_small_patch16_224"):
        dynamicvit.load(path, "deit_small_patch16_224")
    with pytest.raises(CheckpointError, match="prune"):
        dynamicvit.load(path, prune_locs=[1, 3])


def test_plain_weights_with_predictors_give_the_trained_model(tmp_path):
    model = tiny_model(keep_ratio=0.5)
    torch.save({"model": reference_state(model)}, tmp_path / "ref.pth")
    loaded = dynamicvit.load(tmp_path / "ref.pth", "vit_tiny_patch16_224", keep_ratio=0.5, overrides=tiny_kwargs())
    assert isinstance(loaded, dynamicvit.DynamicViT) and loaded.keep_ratio == 0.5
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_logits(loaded, x), _logits(model, x), rtol=0, atol=0)


def test_plain_dense_weights_give_the_dense_model_or_fresh_predictors(tmp_path):
    torch.manual_seed(0)
    dense = timm.create_model("vit_tiny_patch16_224", **tiny_kwargs())
    torch.save({"model": dense.state_dict()}, tmp_path / "dense.pth")
    x = torch.randn(2, 3, 32, 32)
    loaded = dynamicvit.load(tmp_path / "dense.pth", "vit_tiny_patch16_224", overrides=tiny_kwargs())
    assert type(loaded) is type(dense)
    torch.testing.assert_close(_logits(loaded, x), _logits(dense, x), rtol=0, atol=0)
    wrapped = dynamicvit.load(tmp_path / "dense.pth", "vit_tiny_patch16_224", keep_ratio=1.0, prune_locs=[2],
                              overrides=tiny_kwargs(), sparse=True)
    assert isinstance(wrapped, dynamicvit.DynamicViT) and wrapped.prune_locs == (2,)
    torch.testing.assert_close(_logits(wrapped, x), _logits(dense, x), rtol=0, atol=1e-6)  # nothing pruned at 1.0


def test_plain_weights_need_a_name_and_must_fit(tmp_path):
    dense = timm.create_model("vit_tiny_patch16_224", **tiny_kwargs())
    torch.save(dense.state_dict(), tmp_path / "dense.pth")
    with pytest.raises(ConfigError, match="teacher .* name the architecture with --model"):
        dynamicvit.load(tmp_path / "dense.pth", role="teacher")
    with pytest.raises(CheckpointError, match="teacher .*dense.pth does not match"):
        dynamicvit.load(tmp_path / "dense.pth", "vit_tiny_patch16_224", overrides=tiny_kwargs(embed_dim=96),
                        role="teacher")


def test_a_file_is_read_once(tmp_path, monkeypatch):
    """Plain .pth weights are read whole: a loader that read them once for the settings and again for the
    weights would double the start-up time of every command on a large checkpoint."""
    import dynamicvit.weights.formats as checkpoint
    import dynamicvit.weights.build as factory

    reads = []
    read = checkpoint.read_checkpoint

    def counting(*args, **kwargs):
        reads.append(args[0])
        return read(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "read_checkpoint", counting)
    monkeypatch.setattr(factory, "read_checkpoint", counting)
    torch.save(timm.create_model("vit_tiny_patch16_224", **tiny_kwargs()).state_dict(), tmp_path / "dense.pth")
    torch.save({"model": reference_state(tiny_model())}, tmp_path / "ref.pth")
    saved = dynamicvit.save_model(tiny_model(), tmp_path / "m.safetensors")
    for path, sparse in [(tmp_path / "dense.pth", False), (tmp_path / "dense.pth", True), (tmp_path / "ref.pth", False),
                         (saved, False)]:
        reads.clear()
        dynamicvit.load(path, "vit_tiny_patch16_224", overrides=tiny_kwargs(), sparse=sparse)
        assert len(reads) == 1, (path, sparse, reads)
