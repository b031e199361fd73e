"""Batch-1 deployment: the exported graph carries no run-time shape arithmetic around attention, and ONNX
Runtime sessions share one set of options."""
from collections import Counter

import onnx
import pytest
import torch

from dynamicvit.runtime import deploy

from conftest import tiny_model


def _op_counts(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


@pytest.mark.parametrize("dense", [False, True])
def test_exported_attention_has_no_shape_arithmetic(tmp_path, dense):
    """One Shape node in the whole graph (the class token's batch), none per block, and still verified."""
    model = tiny_model(keep_ratio=0.6).eval()
    result = deploy.export_onnx(model, tmp_path / "m.onnx", dense=dense)
    assert result.verification.passed
    ops = _op_counts(result.path)
    depth = len(model.backbone.blocks)
    assert ops["Shape"] <= 1 and ops["Concat"] <= 2 + (0 if dense else len(model.prune_locs))
    assert ops["Softmax"] == depth  # the attention's own products, one softmax per block


def test_opset_20_writes_gelu_as_one_operator(tmp_path):
    """GELU as ONNX's Gelu node (which ONNX Runtime fuses with its bias), not Erf arithmetic: one per block's
    MLP and three per prediction module, and the graph still verified."""
    model = tiny_model(keep_ratio=0.6).eval()
    result = deploy.export_onnx(model, tmp_path / "m.onnx", opset=20)
    assert result.opset == 20 and result.verification.passed
    ops = _op_counts(result.path)
    assert ops["Erf"] == 0
    assert ops["Gelu"] == len(model.backbone.blocks) + 3 * len(model.prune_locs)


def test_attention_switch_is_restored_after_export(tmp_path, monkeypatch):
    model = tiny_model(keep_ratio=0.6).eval()
    assert all(blk.attn.fused_attn for blk in model.backbone.blocks)
    deploy.export_onnx(model, tmp_path / "m.onnx", verify=False)
    assert all(blk.attn.fused_attn for blk in model.backbone.blocks)

    during = []

    def fail(*args, **kwargs):
        during.extend(blk.attn.fused_attn for blk in model.backbone.blocks)
        raise RuntimeError("exporter failed")

    monkeypatch.setattr(torch.onnx, "export", fail)
    with pytest.raises(deploy.ExportError):
        deploy.export_onnx(model, tmp_path / "n.onnx", verify=False)
    assert during and not any(during)  # the explicit products while exporting
    assert all(blk.attn.fused_attn for blk in model.backbone.blocks)


def test_opset_23_keeps_the_attention_operator(tmp_path):
    pytest.importorskip("onnxruntime")
    model = tiny_model(keep_ratio=0.6).eval()
    result = deploy.export_onnx(model, tmp_path / "m.onnx", opset=23)
    assert result.verification.passed
    assert _op_counts(result.path)["Attention"] == len(model.backbone.blocks)


def test_onnx_model_runs_with_the_shared_session_options(tmp_path, monkeypatch):
    model = tiny_model(keep_ratio=0.6).eval()
    path = deploy.export_onnx(model, tmp_path / "m.onnx", verify=False).path
    seen = []
    real = deploy.session_options
    monkeypatch.setattr(deploy, "session_options",
                        lambda threads=None, spinning=True: seen.append((threads, spinning)) or real(threads, spinning))
    session = deploy.OnnxModel(path, threads=1)
    assert seen == [(1, True)] and session.session.get_session_options().intra_op_num_threads == 1
    quiet = deploy.OnnxModel(path, threads=1, spinning=False)
    assert seen[-1] == (1, False)
    assert quiet.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(quiet(x), session(x))
