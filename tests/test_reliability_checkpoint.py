"""Checkpoints can be trusted: their own settings win (or a clash is named), broken weights are refused by
name, settings from a file pass an allow-list (no downloads, no other files), damaged settings are one
clear error, and the Python API checks its inputs before timm does."""
from __future__ import annotations

import json
import math

import pytest
import safetensors.torch
import timm
import torch

import dynamicvit
from conftest import reference_state, tiny_kwargs, tiny_model
from dynamicvit.cli import main
from dynamicvit.errors import CheckpointError, ConfigError

NAME = "vit_tiny_patch16_224"


def craft(path, state, settings) -> str:
    """A .safetensors whose settings header is whatever the test says (a string is stored verbatim)."""
    text = settings if isinstance(settings, str) else json.dumps(settings)
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"dynamicvit": text})
    return str(path)


def settings_of(model) -> dict:
    return dynamicvit.weights.formats.model_settings(model)


# -- item 4: a checkpoint's own settings win, or the clash is an error naming both ---------------


@pytest.mark.parametrize("fmt", ["safetensors", "training"])
def test_create_model_uses_the_checkpoints_prune_locs(tmp_path, images, fmt):
    trained = tiny_model(prune_locs=(2, 3, 4)).eval()
    if fmt == "safetensors":
        path = dynamicvit.save_model(trained, tmp_path / "m.safetensors")
    else:
        path = tmp_path / "last.pth"
        torch.save({"model": trained.state_dict(), "dynamicvit": settings_of(trained), "epoch": 1}, path)
    model = dynamicvit.create_model(NAME, checkpoint_path=path, **tiny_kwargs()).eval()
    assert model.prune_locs == (2, 3, 4)  # not the default (1, 3, 4) for 6 blocks
    assert torch.equal(model(images), trained(images))
    # timm's registry reads the same file the same way.
    via_timm = timm.create_model("dynamicvit_" + NAME, checkpoint_path=None, **tiny_kwargs())
    assert via_timm.prune_locs == (1, 3, 4)
    with pytest.raises(CheckpointError, match=r"prune before blocks \[2, 3, 4\].*prune_locs=\[1, 3, 4\]"):
        dynamicvit.create_model(NAME, checkpoint_path=path, prune_locs=(1, 3, 4), **tiny_kwargs())
    with pytest.raises(CheckpointError, match=r"saved with num_classes=10 but num_classes=5"):
        dynamicvit.create_model(NAME, checkpoint_path=path, **tiny_kwargs(num_classes=5))
    with pytest.raises(CheckpointError, match=r"holds a vit_tiny_patch16_224, not a deit_tiny_patch16_224"):
        dynamicvit.create_model("deit_tiny_patch16_224", checkpoint_path=path, **tiny_kwargs())
    # Loading into a model built elsewhere with other stages is refused too (train --init-checkpoint, visualize).
    with pytest.raises(CheckpointError, match=r"prune before blocks \[2, 3, 4\], but prune_locs=\[1, 3, 4\] was asked for"):
        dynamicvit.weights.formats.load_weights(tiny_model(), path)
    # The keep ratio is a run-time choice, not part of the weights: asking for another one is fine.
    assert dynamicvit.create_model(NAME, checkpoint_path=path, keep_ratio=0.5, **tiny_kwargs()).keep_ratio == 0.5


# -- item 5: non-finite weights are refused by name; eval counts non-finite outputs --------------


def test_non_finite_weights_are_refused_naming_the_tensors(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        model.backbone.blocks[2].mlp.fc1.weight[0, 0] = float("nan")
        model.predictors[1].out_conv[2].bias[0] = float("inf")
    path = dynamicvit.save_model(model, tmp_path / "nan.safetensors")
    pattern = r"non-finite values \(NaN or Inf\) in 2 tensor\(s\): backbone.blocks.2.mlp.fc1.weight, predictors.1.out_conv.2.bias"
    with pytest.raises(CheckpointError, match=pattern):
        dynamicvit.load_model(path)
    with pytest.raises(CheckpointError, match=pattern):
        dynamicvit.create_model(NAME, checkpoint_path=path, **tiny_kwargs())
    torch.save({"model": model.state_dict()}, tmp_path / "nan.pth")
    with pytest.raises(CheckpointError, match="non-finite"):
        dynamicvit.create_model(NAME, checkpoint_path=tmp_path / "nan.pth", **tiny_kwargs())


def test_evaluate_counts_non_finite_outputs_as_misses():
    from torch.utils.data import DataLoader, TensorDataset

    from dynamicvit.evaluate import evaluate

    class HalfBroken(torch.nn.Module):
        def forward(self, x):  # the right class for every image, NaN for the first half
            logits = torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), 3).float() * 5
            logits[: len(x) // 2] = float("nan")
            return logits

    y = torch.tensor([0, 1, 2, 1])
    x = y.float().view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()
    metrics = evaluate(HalfBroken(), DataLoader(TensorDataset(x, y), batch_size=4))
    assert metrics["non_finite"] == 2 and metrics["images"] == 4
    assert metrics["top1"] == 50.0  # a NaN row is never a hit, whatever topk makes of it
    assert math.isfinite(metrics["loss"])


def test_eval_json_is_valid_json_when_outputs_are_not_finite(tmp_path, monkeypatch, capsys, caplog):
    path = dynamicvit.save_model(tiny_model(in_chans=1, num_classes=10, img_size=28, patch_size=7), tmp_path / "m.safetensors")
    monkeypatch.setattr("dynamicvit.evaluate.evaluate", lambda *a, **k: {
        "top1": 10.0, "top5": 50.0, "loss": float("nan"), "images": 8, "non_finite": 8, "unreadable": 0})
    monkeypatch.setattr("dynamicvit.data.build_dataset", lambda *a, **k: torch.utils.data.TensorDataset(torch.zeros(8, 1, 28, 28), torch.zeros(8).long()))
    code = main(["eval", "--checkpoint", str(path), "--json", "--device", "cpu", "--num-workers", "0"])
    captured = capsys.readouterr()
    assert code == 0

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    report = json.loads(captured.out, parse_constant=refuse)
    assert report["results"][0]["loss"] is None and report["results"][0]["non_finite"] == 8
    assert "8 of 8 images gave non-finite outputs" in caplog.text


# -- item 9: settings from a file pass an allow-list --------------------------------------------


@pytest.mark.parametrize("hostile", [
    {"timm_kwargs": {"pretrained": True, "pretrained_cfg_overlay": {"file": "/etc/passwd"}}},
    {"timm_kwargs": {"checkpoint_path": "/etc/passwd"}},
    {"timm_kwargs": {"cache_dir": "/tmp/elsewhere"}},
    {"model_name": "hf-hub:someone/evil-model"},
    {"model_name": "local-dir:/tmp/evil"},
    {"timm_kwargs": {"num_classes": {"nested": "dict"}}},
    {"keep_ratio": True},
    {"prune_locs": [True, 3, 4]},
])
def test_settings_outside_the_allow_list_are_refused_before_timm_is_called(tmp_path, monkeypatch, capsys, hostile):
    model = tiny_model()
    settings = settings_of(model)
    for key, value in hostile.items():
        settings[key] = {**settings[key], **value} if isinstance(value, dict) and key == "timm_kwargs" else value
    path = craft(tmp_path / "evil.safetensors", model.state_dict(), settings)
    called = []
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: called.append((a, k)))
    with pytest.raises(CheckpointError, match="evil.safetensors"):
        dynamicvit.load_model(path)
    assert not called
    code = main(["visualize", "--checkpoint", path, "--output", str(tmp_path / "out"), str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("dynamicvit visualize: error: the settings stored in")
    assert not called


def test_saved_settings_keep_only_architecture_arguments(tmp_path):
    model = tiny_model()
    model.timm_kwargs["pretrained_cfg_overlay"] = {"file": "/somewhere/weights.bin"}
    path = dynamicvit.save_model(model, tmp_path / "m.safetensors")
    assert "pretrained_cfg_overlay" not in dynamicvit.weights.formats.read_settings(path)["timm_kwargs"]
    assert dynamicvit.load_model(path).prune_locs == model.prune_locs


# -- item 6: damaged settings, bad inputs and timm's registry: clear errors ----------------------


@pytest.mark.parametrize("settings", ["{not json", json.dumps({"kind": "dynamicvit", "model_name": "no_such_vit_9000",
                                                               "keep_ratio": 0.7, "prune_locs": [1, 3, 4]})])
def test_damaged_settings_are_one_error_and_create_model_still_loads_the_weights(tmp_path, images, capsys, settings):
    model = tiny_model().eval()
    path = craft(tmp_path / "m.safetensors", model.state_dict(), settings)
    with pytest.raises(CheckpointError, match=r"the settings stored in .*m\.safetensors (are not valid JSON|name the model 'no_such_vit_9000')"):
        dynamicvit.load_model(path)
    loaded = dynamicvit.create_model(NAME, checkpoint_path=path, **tiny_kwargs()).eval()  # names the architecture itself
    assert torch.equal(loaded(images), model(images))
    code = main(["eval", "--checkpoint", path, "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err


def test_wrong_image_size_or_channels_is_a_config_error_naming_the_fix():
    model = tiny_model().eval()
    for shape in [(2, 3, 48, 48), (2, 1, 32, 32)]:
        for path in (model.eval(), model.train()):
            with pytest.raises(ConfigError) as e:
                path(torch.randn(*shape))
            message = str(e.value)  # what was given, what the model takes, and the two ways to fix it
            assert str(shape) in message and "3 channel(s)" in message and "32x32" in message
            assert "img_size" in message and "in_chans" in message


def test_timm_registry_with_a_dense_checkpoint_goes_through_our_loader(tmp_path, images):
    from dynamicvit.weights.build import create_backbone

    torch.manual_seed(3)
    dense = create_backbone(NAME, **tiny_kwargs()).eval()
    torch.save(dense.state_dict(), tmp_path / "dense.pth")
    model = timm.create_model("dynamicvit_" + NAME, checkpoint_path=str(tmp_path / "dense.pth"), keep_ratio=1.0, **tiny_kwargs())
    assert torch.allclose(model.eval()(images), dense(images), atol=1e-5)  # keep ratio 1.0 is the dense model
    broken = {k: v.clone() for k, v in dense.state_dict().items()}
    broken["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    torch.save(broken, tmp_path / "nan.pth")
    with pytest.raises(CheckpointError, match="blocks.0.attn.qkv.weight"):
        timm.create_model("dynamicvit_" + NAME, checkpoint_path=str(tmp_path / "nan.pth"), **tiny_kwargs())


def test_the_training_data_named_in_a_checkpoint_is_never_read(tmp_path, monkeypatch, capsys):
    """visualize normalizes image files like the checkpoint's training data, from its name alone."""
    import numpy as np
    from PIL import Image

    import dynamicvit.data as data

    secret = tmp_path / "secret"
    (secret / "train" / "x").mkdir(parents=True)
    path = dynamicvit.save_model(tiny_model(), tmp_path / "m.safetensors", extra={"train_config": {"dataset": str(secret)}})
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "a.png")

    def no_reading(*args, **kwargs):
        raise AssertionError("a path from the checkpoint was opened")

    monkeypatch.setattr(data, "resolve_dataset", no_reading)
    code = main(["visualize", "--checkpoint", str(path), "--output", str(tmp_path / "out"), str(tmp_path / "a.png")])
    assert code == 0, capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["visualize", "--model", "deit_tiny_patch16_224", "--output", "OUT", "IMG"],
    ["flops", "--model", "deit_tiny_patch16_224"],
    ["flops", "--prune-locs", "1,3,4"],
    ["bench", "--prune-locs", "1,3,4", "--batch-size", "1", "--repeats", "1"],
    ["eval", "--model", "deit_tiny_patch16_224"],
])
def test_commands_refuse_explicit_settings_that_contradict_the_checkpoint(tmp_path, capsys, argv):
    path = dynamicvit.save_model(tiny_model(prune_locs=(2, 3, 4)), tmp_path / "m.safetensors")
    argv = [str(tmp_path / "out") if a == "OUT" else str(tmp_path) if a == "IMG" else a for a in argv]
    code = main([*argv, "--checkpoint", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert ("not a deit_tiny_patch16_224" in err) or ("[2, 3, 4], but prune_locs=[1, 3, 4]" in err)


def test_load_model_overrides_may_resize_but_not_reshape(tmp_path):
    path = dynamicvit.save_model(tiny_model(global_pool="token"), tmp_path / "m.safetensors")
    assert dynamicvit.load_model(path, img_size=48).num_patches == 144  # the position embedding is resized
    with pytest.raises(CheckpointError, match=r"saved with global_pool='token' but global_pool='avg' was asked for"):
        dynamicvit.load_model(path, global_pool="avg")  # same shapes, silently another model: refused


def test_timm_registry_with_a_reference_dynamicvit_checkpoint(tmp_path, images):
    trained = tiny_model().eval()
    torch.save({"model": reference_state(trained)}, tmp_path / "reference.pth")  # the authors' layout
    model = timm.create_model("dynamicvit_" + NAME, checkpoint_path=str(tmp_path / "reference.pth"), **tiny_kwargs())
    assert torch.equal(model.eval()(images), trained(images))
