"""`dynamicvit export` and `dynamicvit predict` end to end on a tiny Fashion-MNIST-shaped DynamicViT."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import dynamicvit
from dynamicvit import cli
from dynamicvit.data import eval_transform, preprocessing_config
from dynamicvit.runtime import deploy
from dynamicvit.data import FASHION_MNIST_CLASSES

from conftest import require_fashion_mnist, scramble

FMNIST_KWARGS = dict(img_size=28, in_chans=1, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=10)


@pytest.fixture
def checkpoint(tmp_path):
    """A DynamicViT trained (as far as its settings say) on Fashion-MNIST, with decisive predictors."""
    torch.manual_seed(0)
    model = dynamicvit.create_model("vit_tiny_patch16_224", keep_ratio=0.7, prune_locs=(1, 2, 3), **FMNIST_KWARGS)
    for p in model.predictors:
        scramble(p)
    return dynamicvit.save_model(model, tmp_path / "dvit.safetensors",
                                 extra={"train_config": {"dataset": "fashion-mnist"}})


@pytest.fixture
def folder(tmp_path):
    """Two images (one in a subfolder, one RGB), a truncated PNG and a text file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "inputs"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(root / "a.png")
    Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(root / "sub" / "b.jpg")
    (root / "broken.png").write_bytes((root / "a.png").read_bytes()[:50])
    (root / "notes.txt").write_text("not an image")
    return root


def test_export_writes_a_verified_graph_with_metadata(tmp_path, checkpoint, capsys):
    out = tmp_path / "dvit.onnx"
    assert cli.main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--output", str(out),
                     "--keep-ratio", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert "keep ratio 0.5" in printed and "max abs logit diff" in printed and "top-1 agreement 100.0%" in printed
    meta = deploy.read_metadata(out)
    assert meta["class_names"] == list(FASHION_MNIST_CLASSES) and meta["keep_ratio"] == 0.5
    assert meta["preprocessing"]["mean"] == [0.286] and meta["preprocessing"]["crop_pct"] == 1.0
    before = out.read_bytes()
    assert cli.main(["export", "--checkpoint", str(checkpoint), "--output", str(out), "--exporter", "torchscript"]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == before
    assert cli.main(["export", "--checkpoint", str(checkpoint), "--output", str(out), "--dense", "--overwrite",
                     "--exporter", "torchscript", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["export"]["outputs"] == ["logits"] and report["export"]["verification"]["max_abs_diff"] <= 1e-4
    assert deploy.read_metadata(out)["kind"] == "dense"


def test_export_usage_errors(tmp_path, checkpoint, capsys):
    assert cli.main(["export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "m.onnx"), "--opset", "9"]) == 2
    assert "opset 9" in capsys.readouterr().err
    assert cli.main(["export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "m.pt")]) == 2
    assert "*.onnx" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.onnx"))


@pytest.mark.fashion_mnist
def test_export_quantize_reports_accuracy_and_speed(tmp_path, capsys):
    from dynamicvit.demo import TEACHER_ASSET

    require_fashion_mnist()
    out = tmp_path / "teacher.onnx"
    assert cli.main(["export", "--checkpoint", str(TEACHER_ASSET), "--output", str(out), "--exporter", "torchscript",
                     "--quantize", "int8", "--subset", "300", "--threads", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["int8"]
    assert report["images"] == 300 and report["top1_fp32"] > 80 and abs(report["top1_change"]) < 3
    assert set(report["speedup"]) == {"32", "1"} and (tmp_path / "teacher.int8.onnx").is_file()


def _run_predict(capsys, *args):
    code = cli.main(["predict", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured


def test_predict_folder_mixing_images_a_corrupt_image_and_a_text_file(tmp_path, checkpoint, folder, capsys, monkeypatch):
    monkeypatch.setenv("DYNAMICVIT_CACHE", str(tmp_path / "cache"))
    code, cap = _run_predict(capsys, folder, "--checkpoint", checkpoint, "--json", "--top-k", "3",
                             "--show-tokens", tmp_path / "pics")
    assert code == 1  # something was skipped
    report = json.loads(cap.out)
    assert report["runtime"] == "onnxruntime"  # the default on a CPU: exported once into the cache
    assert [r["file"] for r in report["results"]] == [str(folder / "a.png"), str(folder / "sub" / "b.jpg")]
    skipped = {s["file"]: s["error"] for s in report["skipped"]}
    assert set(skipped) == {str(folder / "broken.png"), str(folder / "notes.txt")}
    assert "truncated" in skipped[str(folder / "broken.png")] and "not an image" in skipped[str(folder / "notes.txt")]
    for r in report["results"]:
        probs = [p["probability"] for p in r["predictions"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True)
        assert all(p["name"] == FASHION_MNIST_CLASSES[p["class"]] for p in r["predictions"])
    assert sorted(p.name for p in (tmp_path / "pics").iterdir()) == ["00000_a.png", "00001_b.png"]
    assert len(list((tmp_path / "cache" / "onnx").glob("*.onnx"))) == 1

    # The same answers from eager PyTorch, and from the model's own forward on the same pixels.
    code, cap = _run_predict(capsys, folder / "a.png", folder / "sub", "--checkpoint", checkpoint, "--json",
                             "--top-k", "3", "--runtime", "eager")
    assert code == 0
    eager = json.loads(cap.out)["results"]
    for a, b in zip(report["results"], eager):
        assert [p["class"] for p in a["predictions"]] == [p["class"] for p in b["predictions"]]
        assert a["predictions"][0]["probability"] == pytest.approx(b["predictions"][0]["probability"], abs=1e-5)
    model = dynamicvit.load_model(checkpoint).eval()
    config = preprocessing_config(model, "fashion-mnist")
    x = eval_transform(config)(Image.open(folder / "a.png").convert("L"))[None]
    with torch.no_grad():
        p = model(x).softmax(-1)[0]
    assert eager[0]["predictions"][0]["class"] == int(p.argmax())
    assert eager[0]["predictions"][0]["probability"] == pytest.approx(float(p.max()), abs=1e-6)


def test_predict_with_an_onnx_file_and_text_output(tmp_path, checkpoint, folder, capsys):
    onnx_path = tmp_path / "m.onnx"
    model = dynamicvit.load_model(checkpoint).eval()
    deploy.export_onnx(model, onnx_path, exporter="torchscript", class_names=list(FASHION_MNIST_CLASSES),
                       preprocessing=preprocessing_config(model, "fashion-mnist"))
    code, cap = _run_predict(capsys, folder / "a.png", "--onnx", onnx_path, "--top-k", "2",
                             "--show-tokens", tmp_path / "pics")
    assert code == 0
    line = cap.out.strip()
    assert line.startswith(f"{folder / 'a.png'}: ") and line.count("%") == 2
    assert any(name in line for name in FASHION_MNIST_CLASSES)
    assert "classified 1 image(s)" in cap.err
    with Image.open(tmp_path / "pics" / "00000_a.png") as im:
        assert im.size[0] > 300
    # Settings an ONNX file cannot honour are refused with one clear line.
    code, cap = _run_predict(capsys, folder / "a.png", "--onnx", onnx_path, "--keep-ratio", "0.5")
    assert code == 2 and "fixed at export" in cap.err
    code, cap = _run_predict(capsys, folder / "a.png", "--onnx", onnx_path, "--compile")
    assert code == 2 and "PyTorch model" in cap.err


def test_predict_show_tokens_never_replaces_an_input_image_or_a_users_file(tmp_path, checkpoint, capsys):
    """Pictures written into the input folder (or next to a user's file of the same name) take free names."""
    rng = np.random.default_rng(1)
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(photos / "a.png")
    Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(photos / "00001_a.png")  # an input
    pics = tmp_path / "pics"
    pics.mkdir()
    (pics / "00000_00001_a.png").write_bytes(b"a user's file, not a picture of ours")
    originals = {p: p.read_bytes() for p in [photos / "a.png", photos / "00001_a.png", pics / "00000_00001_a.png"]}
    for out in (pics, photos):
        code, cap = _run_predict(capsys, photos, "--checkpoint", checkpoint, "--runtime", "eager", "--show-tokens", out)
        assert code == 0, cap.err
    assert {p: p.read_bytes() for p in originals} == originals
    assert sorted(p.name for p in photos.iterdir()) == ["00000_00001_a.png", "00001_a.png", "00001_a_2.png", "a.png"]
    assert sorted(p.name for p in pics.iterdir()) == ["00000_00001_a.png", "00000_00001_a_2.png", "00001_a.png"]
    # A later run into the same folder replaces its own earlier picture, still not the user's file.
    code, _ = _run_predict(capsys, photos / "00001_a.png", "--checkpoint", checkpoint, "--runtime", "eager",
                           "--show-tokens", pics)
    assert code == 0 and (pics / "00000_00001_a.png").read_bytes() == originals[pics / "00000_00001_a.png"]
    assert sorted(p.name for p in pics.iterdir()) == ["00000_00001_a.png", "00000_00001_a_2.png", "00001_a.png"]
    # A file or an unwritable place as the folder: one line, exit 2, nothing written.
    code, cap = _run_predict(capsys, photos / "a.png", "--checkpoint", checkpoint, "--runtime", "eager",
                             "--show-tokens", photos / "a.png")
    assert code == 2 and "is a file" in cap.err and photos.joinpath("a.png").read_bytes() == originals[photos / "a.png"]
    code, cap = _run_predict(capsys, photos / "a.png", "--checkpoint", checkpoint, "--runtime", "eager",
                             "--show-tokens", "/proc/dynamicvit-pics")
    assert code == 2 and "--show-tokens" in cap.err


def test_predict_errors(tmp_path, checkpoint, capsys):
    code, cap = _run_predict(capsys, tmp_path / "missing.png", "--checkpoint", checkpoint, "--runtime", "eager", "--json")
    assert code == 1 and "no such file" in json.loads(cap.out)["skipped"][0]["error"]
    code, cap = _run_predict(capsys, tmp_path, "--checkpoint", checkpoint, "--onnx", "x.onnx")
    assert code == 2  # argparse: the sources exclude each other
    code, cap = _run_predict(capsys, tmp_path, "--onnx", tmp_path / "nothing.onnx")
    assert code == 2 and "no ONNX file" in cap.err


@pytest.mark.slow
def test_predict_compiled(tmp_path, checkpoint, folder, capsys):
    code, cap = _run_predict(capsys, folder / "a.png", "--checkpoint", checkpoint, "--compile", "--json")
    assert code == 0 and json.loads(cap.out)["runtime"] == "compile"


@pytest.mark.slow
@pytest.mark.fashion_mnist
def test_eval_compile_gives_the_eager_accuracy(capsys):
    from dynamicvit.demo import TEACHER_ASSET

    require_fashion_mnist()
    results = []
    for extra in ([], ["--compile"]):
        args = ["eval", "--checkpoint", str(TEACHER_ASSET), "--subset", "200", "--num-workers", "0", "--device", "cpu",
                "--json", *extra]
        assert cli.main(args) == 0
        results.append(json.loads(capsys.readouterr().out)["results"][0])
    assert results[1]["top1"] == results[0]["top1"] and results[1]["loss"] == pytest.approx(results[0]["loss"], abs=1e-4)


def test_predict_random_model_in_onnx_runtime_names_imagenet_classes(tmp_path, folder, capsys):
    code, cap = _run_predict(capsys, folder / "sub" / "b.jpg", "--model", "vit_tiny_patch16_224", "--model-kwargs",
                             "img_size=32,patch_size=4,embed_dim=48,depth=6,num_heads=3", "--runtime", "onnxruntime",
                             "--json", "--top-k", "1")
    assert code == 0
    report = json.loads(cap.out)
    pred = report["results"][0]["predictions"][0]
    assert report["runtime"] == "onnxruntime" and pred["name"] != f"class {pred['class']}"  # ImageNet's names
