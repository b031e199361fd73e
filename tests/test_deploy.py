"""Deployment: the ONNX export checks itself, int8 quantization, ONNX Runtime inference, torch.compile."""
import json

import numpy as np
import onnx
import pytest
import torch

import dynamicvit
from dynamicvit.evaluate import onnx_accuracy
from dynamicvit.runtime import deploy
from dynamicvit.errors import ConfigError

from conftest import require_fashion_mnist, tiny_kwargs, tiny_model


def _ops(path) -> set:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_onnx_graph_matches_pytorch_at_several_batch_sizes(tmp_path, exporter):
    model = tiny_model(keep_ratio=0.6).eval()
    result = deploy.export_onnx(model, tmp_path / "m.onnx", exporter=exporter)
    assert result.verification.passed and result.verification.batch_sizes == [1, 4]
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # one self-contained file, no external data
    assert result.verification.max_abs_diff <= 1e-4 and result.verification.top1_agreement == 1.0
    # The batch axis is symbolic, and top-k and gather are in the graph.
    graph = onnx.load(str(result.path)).graph
    assert not graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")
    assert {"TopK", "GatherElements"} <= _ops(result.path)
    # Batch sizes the verification did not use: logits and kept tokens as in PyTorch.
    session = deploy.OnnxModel(result.path)
    for bs in (3, 9):
        x = torch.randn(bs, 3, 32, 32)
        got = session.run(x)
        with torch.no_grad():
            ref = model.forward_pruned(x)
        torch.testing.assert_close(got["logits"], ref.logits, rtol=0, atol=1e-4)
        for s, idx in enumerate(ref.kept_indices):
            assert torch.equal(got[f"kept_tokens_{s + 1}"].sort(1).values, idx.sort(1).values)
        assert got["kept_tokens_3"].shape == (bs, model.keep_counts()[2])


@pytest.mark.parametrize("variant", [dict(class_token=False, global_pool="avg"), dict(reg_tokens=2)])
def test_onnx_export_of_other_variants(tmp_path, variant):
    model = tiny_model(keep_ratio=0.5, **variant).eval()
    result = deploy.export_onnx(model, tmp_path / "m.onnx", exporter="torchscript")
    assert result.verification.passed and result.verification.compared == 5


def test_dense_export_is_the_backbone(tmp_path):
    model = tiny_model(keep_ratio=0.5).eval()
    result = deploy.export_onnx(model, tmp_path / "dense.onnx", dense=True, exporter="torchscript")
    assert "TopK" not in _ops(result.path) and result.outputs == ["logits"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(deploy.OnnxModel(result.path)(x), model.backbone(x), rtol=0, atol=1e-4)
    assert result.metadata["kind"] == "dense"


def test_metadata_round_trips(tmp_path):
    model = tiny_model(keep_ratio=0.7).eval()
    names = [f"class {chr(65 + i)}" for i in range(10)]
    result = deploy.export_onnx(model, tmp_path / "m.onnx", keep_ratio=0.5, class_names=names, exporter="torchscript")
    meta = deploy.read_metadata(result.path)
    assert meta["class_names"] == names
    assert meta["keep_ratio"] == 0.5 and meta["keep_counts"] == [32, 16, 8] and meta["prune_locs"] == [1, 3, 4]
    assert meta["input_size"] == [3, 32, 32] and meta["grid_size"] == [8, 8]
    assert meta["preprocessing"]["input_size"] == [3, 32, 32] and len(meta["preprocessing"]["mean"]) == 3
    props = {p.key: p.value for p in onnx.load(str(result.path)).metadata_props}
    assert props["keep_ratio"] == "0.5" and json.loads(props["dynamicvit"])["model_name"] == "vit_tiny_patch16_224"
    # The settings rebuild the same architecture, and the model itself kept its keep ratio.
    rebuilt = dynamicvit.create_model(meta["model_name"], keep_ratio=meta["keep_ratio"], prune_locs=meta["prune_locs"],
                                      **meta["timm_kwargs"])
    assert rebuilt.keep_counts() == (32, 16, 8) and model.keep_ratio == 0.7
    assert deploy.OnnxModel(result.path).class_names == names


def test_imagenet_models_get_imagenet_class_names(tmp_path):
    model = dynamicvit.create_model("vit_tiny_patch16_224", **tiny_kwargs(num_classes=1000)).eval()
    result = deploy.export_onnx(model, tmp_path / "m.onnx", dense=True, exporter="torchscript")
    names = deploy.read_metadata(result.path)["class_names"]
    assert len(names) == 1000 and "goldfish" in names[1].lower()


def test_export_refuses_bad_models_and_settings(tmp_path):
    model = tiny_model()
    with pytest.raises(ConfigError, match="training mode.*model.eval"):
        deploy.export_onnx(model, tmp_path / "m.onnx")
    model.eval()
    with pytest.raises(ConfigError, match="opset 11.*18..23"):
        deploy.export_onnx(model, tmp_path / "m.onnx", opset=11)
    with pytest.raises(ConfigError, match="dense=True.*keep_ratio"):
        deploy.export_onnx(model, tmp_path / "m.onnx", dense=True, keep_ratio=0.5)
    with pytest.raises(ConfigError, match="keep_ratio must be in"):
        deploy.export_onnx(model, tmp_path / "m.onnx", keep_ratio=1.5)
    with pytest.raises(ConfigError, match="dense model without trained prediction modules"):
        deploy.export_onnx(model.backbone, tmp_path / "m.onnx", keep_ratio=0.5)
    with pytest.raises(ConfigError, match="fp32"):
        deploy.export_onnx(tiny_model().eval().to(torch.bfloat16), tmp_path / "m.onnx")
    with pytest.raises(ConfigError, match="3 class names"):
        deploy.export_onnx(model, tmp_path / "m.onnx", class_names=["a", "b", "c"])
    assert not list(tmp_path.iterdir())


def test_export_never_overwrites_unless_told(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"user data")
    model = tiny_model().eval()
    with pytest.raises(ConfigError, match="already exists.*overwrite"):
        deploy.export_onnx(model, path, exporter="torchscript")
    assert path.read_bytes() == b"user data"
    deploy.export_onnx(model, path, exporter="torchscript", overwrite=True)
    assert deploy.read_metadata(path)["keep_ratio"] == 0.7


def test_a_graph_that_disagrees_is_refused_and_not_written(tmp_path, monkeypatch):
    forward = deploy._InferenceGraph.forward

    def wrong(self, images):  # the exported graph adds a small error to the logits
        out = forward(self, images)
        return (out[0] + 1e-3, *out[1:])

    monkeypatch.setattr(deploy._InferenceGraph, "forward", wrong)
    with pytest.raises(deploy.ExportError, match="disagrees with PyTorch.*max abs logit diff 1.00e-03"):
        deploy.export_onnx(tiny_model().eval(), tmp_path / "m.onnx", exporter="torchscript")
    assert not list(tmp_path.iterdir())


def test_tied_scores_of_untrained_predictors_are_reported_not_failed(tmp_path):
    # Fresh prediction modules score all tokens nearly alike: rounding decides the kept set, and the two
    # runtimes may decide differently. Those images are recognized as ties; all others must agree exactly.
    torch.manual_seed(0)
    model = dynamicvit.create_model("vit_tiny_patch16_224", **tiny_kwargs()).eval()
    margins = deploy.stage_margins(model, torch.randn(8, 3, 32, 32))
    assert margins.shape == (8, 3) and (margins < deploy.SCORE_TIE).all()
    result = deploy.export_onnx(model, tmp_path / "m.onnx", exporter="torchscript", verify_batch_sizes=(1, 16))
    v = result.verification
    assert v.passed and v.compared + v.tied == 17 and v.kept_agreement >= v.compared / 17
    # Scores that differ clearly (trained-like predictors) have margins orders of magnitude larger.
    trained_like = deploy.stage_margins(tiny_model().eval(), torch.randn(8, 3, 32, 32))
    assert trained_like.median() > 10 * margins.median()


def test_int8_quantization_keeps_predictions_and_metadata(tmp_path):
    model = tiny_model(keep_ratio=0.7).eval()
    fp32 = deploy.export_onnx(model, tmp_path / "m.onnx", exporter="torchscript").path
    int8 = deploy.quantize_int8(fp32, tmp_path / "m.int8.onnx")
    ops = _ops(int8)
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul", "DynamicQuantizeLinear"}
    # Only linear layers: the attention products of two activations stay fp32 MatMul.
    assert "MatMul" in ops
    assert deploy.read_metadata(int8)["quantization"] == "int8-dynamic"
    assert int8.stat().st_size < 0.6 * fp32.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.int8.onnx", "m.onnx"]
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    got = deploy.OnnxModel(int8)(x)
    assert (got - ref).abs().max() < 0.5 * ref.abs().max()
    with pytest.raises(ConfigError, match="already exists"):
        deploy.quantize_int8(fp32, int8)


@pytest.mark.fashion_mnist
def test_int8_accuracy_on_fashion_mnist_with_the_shipped_teacher(tmp_path):
    from dynamicvit.demo import TEACHER_ASSET

    require_fashion_mnist()
    teacher = dynamicvit.load_model(TEACHER_ASSET).eval()
    fp32 = deploy.export_onnx(teacher, tmp_path / "t.onnx", exporter="torchscript",
                              class_names=deploy.checkpoint_class_names({"extra": {"train_config": {"dataset": "fashion-mnist"}}}, 10)).path
    int8 = deploy.quantize_int8(fp32, tmp_path / "t.int8.onnx")
    acc_torch = onnx_accuracy(teacher, subset=500)
    acc_fp32 = onnx_accuracy(deploy.OnnxModel(fp32), subset=500)
    acc_int8 = onnx_accuracy(deploy.OnnxModel(int8), subset=500)
    assert acc_fp32["images"] == 500 and acc_fp32["top1"] == acc_torch["top1"] > 80
    assert abs(acc_int8["top1"] - acc_fp32["top1"]) < 3
    assert deploy.read_metadata(fp32)["class_names"][0] == "T-shirt/top"


# -- torch.compile --------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", [dict(), dict(class_token=False, global_pool="avg"), dict(reg_tokens=2)])
def test_inference_path_compiles_without_graph_breaks(variant):
    model = tiny_model(keep_ratio=0.6, **variant).eval()
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(torch.randn(2, 3, 32, 32))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_compiled_and_eager_agree_with_a_dynamic_batch():
    model = tiny_model(keep_ratio=0.6).eval()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = deploy.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        for bs in (2, 5, 7):
            x = torch.randn(bs, 3, 32, 32)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    # One compilation serves every batch size above 1 (the batch is symbolic).
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_compile_refuses_training_mode():
    with pytest.raises(ConfigError, match="training mode"):
        dynamicvit.compile(tiny_model())


@pytest.mark.slow
def test_inductor_compiled_model_agrees_with_eager():
    model = tiny_model(keep_ratio=0.6).eval()
    dense = model.backbone
    torch._dynamo.reset()
    with torch.no_grad():
        for m in (model, dense):
            compiled = dynamicvit.compile(m)
            for bs in (3, 1):
                x = torch.randn(bs, 3, 32, 32)
                torch.testing.assert_close(compiled(x), m(x), rtol=1e-4, atol=1e-4)


def test_onnx_model_times_and_evaluates_like_a_torch_model(tmp_path):
    from dynamicvit.runtime.bench import compare_throughput

    model = tiny_model().eval()
    path = deploy.export_onnx(model, tmp_path / "m.onnx", exporter="torchscript").path
    session = deploy.OnnxModel(path, threads=1)
    assert session.input_size == (3, 32, 32)
    results = compare_throughput({"ort": session, "torch": model}, (3, 32, 32), 2, repeats=1, warmup=1,
                                 measure_memory=False)
    assert results["ort"].latency_ms > 0
    assert np.isfinite(results["torch"].latency_ms)
