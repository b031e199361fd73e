"""Optional parts: a missing extra is one line naming `pip install 'dynamicvit[EXTRA]'` (exit 2 on the
command line), never a traceback, and training without TensorBoard goes on with its metrics file."""
import json
import sys

import pytest
import torch

import dynamicvit
from dynamicvit.cli import main
from dynamicvit.extras import EXTRAS, MissingExtraError, require

from conftest import tiny_model


def hide(monkeypatch, *modules):
    """Make `import module` fail as it does when the package is not installed."""
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.parametrize("module", sorted(EXTRAS))
def test_require_names_the_extra_that_installs_a_missing_module(monkeypatch, module):
    hide(monkeypatch, module)
    with pytest.raises(MissingExtraError) as e:
        require(module, "doing it")
    message = str(e.value)
    assert "\n" not in message and f"pip install 'dynamicvit[{EXTRAS[module]}]'" in message
    assert message.startswith("doing it needs the optional package")


def test_export_without_onnx_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    path = dynamicvit.save_model(tiny_model(), tmp_path / "m.safetensors")
    hide(monkeypatch, "onnx", "onnxscript", "onnxruntime")
    code = main(["export", "--checkpoint", str(path), "--output", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'dynamicvit[onnx]'" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "m.onnx").exists()


def test_training_without_tensorboard_warns_once_and_keeps_its_metrics(tmp_path, monkeypatch, caplog):
    from torch.utils.data import TensorDataset

    from dynamicvit.training.config import TrainConfig
    from dynamicvit.training.loop import train

    hide(monkeypatch, "torch.utils.tensorboard")
    data = TensorDataset(torch.randn(8, 3, 32, 32), torch.arange(8) % 10)
    cfg = TrainConfig(model="vit_tiny_patch16_224", dense=True, output=str(tmp_path / "run"), epochs=1, batch_size=4,
                      mixup=0, cutmix=0, num_workers=0, progress=False,
                      timm_kwargs=dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10))
    with caplog.at_level("WARNING"):
        result = train(cfg, train_set=data, val_set=data)
    assert [r.message for r in caplog.records].count(next(
        r.message for r in caplog.records if "dynamicvit[tensorboard]" in r.message)) == 1
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(x["kind"] == "epoch" for x in lines) and result.checkpoint.is_file()
    assert not (tmp_path / "run" / "tb").exists()
