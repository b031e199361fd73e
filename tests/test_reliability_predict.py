"""`predict` and `export` keep the promises of the rest: nothing a user wrote is lost, nothing is left
behind, every input is accounted for, and results are what the model computed (valid JSON, the
sparse model described and run as one)."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dynamicvit
from conftest import tiny_model
from dynamicvit.cli import main
from dynamicvit.data import eval_transform, preprocessing_config
from dynamicvit.errors import OutputError
from dynamicvit.runtime import deploy
from test_spatial import tiny_spatial


# -- an empty batch -------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda: tiny_model(),
    lambda: tiny_model(fuse_dropped=True),
    lambda: tiny_model(reg_tokens=2, class_token=False, global_pool="avg"),
    lambda: tiny_spatial("convnext"),
    lambda: tiny_spatial("swin"),
], ids=["vit", "vit-fused", "vit-registers", "convnext", "swin"])
def test_a_batch_of_no_images_gives_no_rows(make):
    """As timm and ONNX Runtime do: (0, classes) logits, (0, k_s) kept indices, in eval mode."""
    model = make().eval()
    size = model.img_size
    x = torch.zeros(0, model.in_chans, *size)
    with torch.no_grad():
        assert model(x).shape == (0, model.num_classes)
        out = model.forward_pruned(x, return_scores=True)
    assert [tuple(k.shape) for k in out.kept_indices] == [(0, k) for k in model.keep_counts()]
    assert all(k.dtype == torch.long for k in out.kept_indices)
    assert [tuple(s.shape) for s in out.keep_scores] == [(0, model.num_patches)] * len(model.keep_counts())


# -- ConvNeXt / Swin are sparse models in export and predict ----------------------------------------


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def rgb_images(folder: Path, count: int = 2, size: int = 96) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = [folder / f"img{i}.png" for i in range(count)]
    for path in paths:
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return paths


def test_export_of_a_convnext_checkpoint_is_sparse_and_verified(tmp_path, capsys):
    model = tiny_spatial("convnext").eval()
    path = dynamicvit.save_model(model, tmp_path / "cnx.safetensors")
    out = tmp_path / "cnx.onnx"
    code, text, err = run_cli(capsys, "export", "--checkpoint", path, "--output", out, "--keep-ratio", "0.7",
                              "--exporter", "torchscript")
    assert code == 0, err
    assert f"positions on the full path {list(model.keep_counts())}" in text and "same kept tokens 100.0%" in text
    meta = deploy.read_metadata(out)
    assert meta["kind"] == "dynamicvit" and meta["keep_counts"] == list(model.keep_counts())
    # The graph's kept positions are the model's: the file is the sparse model, not its dense backbone.
    session = deploy.OnnxModel(out, threads=1)
    assert session.output_names == ["logits", "kept_tokens_1", "kept_tokens_2", "kept_tokens_3"]
    x = torch.randn(2, 3, 96, 96)
    got = session.run(x)
    with torch.no_grad():
        ref = model.forward_pruned(x)
    for s, kept in enumerate(ref.kept_indices):
        assert torch.equal(got[f"kept_tokens_{s + 1}"].sort(1).values, kept.sort(1).values)
    # Without --keep-ratio: the checkpoint's own, still sparse; the file is replaced on request only.
    code, text, err = run_cli(capsys, "export", "--checkpoint", path, "--output", out, "--overwrite",
                              "--exporter", "torchscript")
    assert code == 0 and "positions on the full path" in text, err
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_predict_runs_a_convnext_checkpoint_as_a_sparse_model(tmp_path, capsys):
    model = tiny_spatial("convnext").eval()
    path = dynamicvit.save_model(model, tmp_path / "cnx.safetensors")
    files = rgb_images(tmp_path / "in")
    code, out, err = run_cli(capsys, "predict", tmp_path / "in", "--checkpoint", path, "--runtime", "eager",
                             "--keep-ratio", "0.5", "--show-tokens", tmp_path / "pics", "--json", "--top-k", "1")
    assert code == 0, err
    report = json.loads(out)
    at_half = model.at_keep_ratio(0.5).eval()
    assert f"positions on the full path {list(at_half.keep_counts())}" in report["model"]
    assert sorted(p.name for p in (tmp_path / "pics").iterdir()) == ["00000_img0.png", "00001_img1.png"]
    # The probabilities are those of the model at keep ratio 0.5 on the same pixels.
    config = preprocessing_config(model)
    x = torch.stack([eval_transform(config)(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        p = at_half(x).softmax(-1)
    for i, r in enumerate(report["results"]):
        assert r["predictions"][0]["class"] == int(p[i].argmax())
        assert r["predictions"][0]["probability"] == pytest.approx(float(p[i].max()), abs=1e-5)


@pytest.mark.slow  # the dynamo export of the cache entry takes a minute on a busy machine
def test_predict_runs_a_convnext_checkpoint_in_onnx_runtime_with_pictures(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DYNAMICVIT_CACHE", str(tmp_path / "cache"))
    path = dynamicvit.save_model(tiny_spatial("convnext"), tmp_path / "cnx.safetensors")
    rgb_images(tmp_path / "in")
    code, out, err = run_cli(capsys, "predict", tmp_path / "in", "--checkpoint", path, "--show-tokens",
                             tmp_path / "pics", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["runtime"] == "onnxruntime" and "positions on the full path" in report["model"]
    assert len(list((tmp_path / "pics").glob("*.png"))) == 2


# -- nothing left next to an export ---------------------------------------------------------------


@pytest.fixture
def exporter_writes_external_data(monkeypatch):
    """The export step leaves `<tmp>.data` beside the graph, as the dynamo exporter does by default."""
    export = deploy._export

    def with_data(model, path, *args):
        export(model, path, *args)
        Path(path + ".data").write_bytes(b"\0" * 4096)

    monkeypatch.setattr(deploy, "_export", with_data)


def test_an_export_leaves_only_its_file(tmp_path, exporter_writes_external_data):
    deploy.export_onnx(tiny_model().eval(), tmp_path / "m.onnx", exporter="torchscript")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_a_failed_verification_leaves_nothing(tmp_path, monkeypatch, exporter_writes_external_data):
    forward = deploy._InferenceGraph.forward
    monkeypatch.setattr(deploy._InferenceGraph, "forward", lambda self, x: (forward(self, x)[0] + 1e-3, *forward(self, x)[1:]))
    with pytest.raises(deploy.ExportError, match="disagrees"):
        deploy.export_onnx(tiny_model().eval(), tmp_path / "m.onnx", exporter="torchscript")
    assert not list(tmp_path.iterdir())


def test_a_full_disk_leaves_nothing_and_says_so(tmp_path, monkeypatch, exporter_writes_external_data):
    def full(path, metadata):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(deploy, "_write_metadata", full)
    with pytest.raises(OutputError, match="no space left on the device; nothing was written"):
        deploy.export_onnx(tiny_model().eval(), tmp_path / "m.onnx", exporter="torchscript")
    assert not list(tmp_path.iterdir())


def test_another_exports_temporaries_are_left_alone(tmp_path, exporter_writes_external_data):
    """Two runs exporting the same file (two predicts filling one cache entry): each removes its own."""
    theirs = [tmp_path / ".m.onnx.x1y2z3.tmp", tmp_path / ".m.onnx.x1y2z3.tmp.data"]
    for path in theirs:
        path.write_bytes(b"being written by another process")
    deploy.export_onnx(tiny_model().eval(), tmp_path / "m.onnx", exporter="torchscript")
    assert sorted(tmp_path.iterdir()) == sorted([tmp_path / "m.onnx", *theirs])


# -- predict accounts for every input -------------------------------------------------------------

FMNIST_KWARGS = dict(img_size=28, in_chans=1, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=10)


def fmnist_model():
    torch.manual_seed(0)
    return dynamicvit.create_model("vit_tiny_patch16_224", keep_ratio=0.7, prune_locs=(1, 2, 3), **FMNIST_KWARGS)


@pytest.fixture
def checkpoint(tmp_path):
    """A DynamicViT for 28 px grayscale images, trained (as far as its settings say) on Fashion-MNIST."""
    return dynamicvit.save_model(fmnist_model(), tmp_path / "dvit.safetensors",
                                 extra={"train_config": {"dataset": "fashion-mnist"}})


def gray_image(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (28, 28), dtype=np.uint8)).save(path)
    return path


def test_predict_reports_what_it_cannot_read_in_a_shared_folder(tmp_path, checkpoint, capsys, monkeypatch):
    """Unreadable sub-folders, broken links, links to folders and pipes are skipped by name, counted, exit 1."""
    shared = tmp_path / "shared"
    gray_image(shared / "a.png")
    gray_image(shared / "sub" / "b.png", 1)
    gray_image(shared / "locked" / "c.png", 2)
    gray_image(tmp_path / "elsewhere" / "d.png", 3)
    (shared / "gone.png").symlink_to(tmp_path / "deleted.png")
    (shared / "linked").symlink_to(tmp_path / "elsewhere")
    os.mkfifo(shared / "pipe.png")  # opening it would wait for a writer forever
    gray_image(shared / ".hidden" / "e.png", 4)  # hidden: skipped without a word, as before
    scandir = os.scandir

    def locked(path="."):  # as for another user's folder without read permission (the tests run as root)
        if Path(path) == shared / "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", locked)
    code, out, err = run_cli(capsys, "predict", shared, "--checkpoint", checkpoint, "--runtime", "eager", "--json")
    assert code == 1
    report = json.loads(out)
    assert [r["file"] for r in report["results"]] == [str(shared / "a.png"), str(shared / "sub" / "b.png")]
    skipped = {Path(s["file"]).name: s["error"] for s in report["skipped"]}
    assert set(skipped) == {"locked", "gone.png", "linked", "pipe.png"}
    assert "permission denied" in skipped["locked"].lower() and "broken symbolic link" in skipped["gone.png"]
    assert "not followed" in skipped["linked"] and "not a regular file" in skipped["pipe.png"]
    assert "classified 2 image(s), skipped 4" in err
    # A link to a folder named on the command line is followed.
    code, out, _ = run_cli(capsys, "predict", shared / "linked", "--checkpoint", checkpoint, "--runtime", "eager",
                           "--json")
    assert code == 0 and [Path(r["file"]).name for r in json.loads(out)["results"]] == ["d.png"]


def test_predict_json_is_valid_and_counts_non_finite_outputs(tmp_path, capsys):
    """A model whose logits overflow: such images are skipped and counted, the JSON stays JSON."""
    model = fmnist_model()
    with torch.no_grad():
        model.backbone.head.weight.fill_(3e38)  # finite weights (they load), logits of +-inf
    path = dynamicvit.save_model(model, tmp_path / "overflow.safetensors")
    gray_image(tmp_path / "in" / "a.png")
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(tmp_path / "in" / "black.png")
    code, out, err = run_cli(capsys, "predict", tmp_path / "in", "--checkpoint", path, "--runtime", "eager", "--json")

    def no_constants(name):
        raise AssertionError(f"{name} is not JSON")

    report = json.loads(out, parse_constant=no_constants)
    assert report["non_finite"] >= 1 and code == 1
    assert sum(s["error"].startswith("the model's output for this image is not finite") for s in report["skipped"]) \
        == report["non_finite"]
    assert len(report["results"]) + report["non_finite"] == 2
    assert all(0 <= p["probability"] <= 1 for r in report["results"] for p in r["predictions"])
    assert "non-finite outputs" in err


def test_predict_progress_is_plain_lines_when_stderr_is_not_a_terminal(tmp_path, checkpoint, capsys):
    for i in range(3):
        gray_image(tmp_path / "in" / f"{i}.png", i)
    code, out, err = run_cli(capsys, "predict", tmp_path / "in", "--checkpoint", checkpoint, "--runtime", "eager",
                             "--batch-size", "1")
    assert code == 0 and out.count("\n") == 3
    assert "\r" not in err and "\r" not in out and "\x1b" not in err


def test_show_tokens_into_a_file_or_proc_is_refused_before_any_export(tmp_path, checkpoint, capsys, monkeypatch):
    monkeypatch.setenv("DYNAMICVIT_CACHE", str(tmp_path / "cache"))
    image = gray_image(tmp_path / "a.png")
    for target, words in ((image, "is a file"), ("/proc/dynamicvit-pics", "cannot be written")):
        code, out, err = run_cli(capsys, "predict", image, "--checkpoint", checkpoint, "--show-tokens", target)
        assert code == 2 and "--show-tokens" in err and words in err and err.count("\n") == 1, err
    assert not (tmp_path / "cache").exists()  # refused before the checkpoint was exported into the cache
    assert not Path("/proc/dynamicvit-pics").exists()


# -- the ONNX cache of predict --------------------------------------------------------------------


@pytest.fixture
def quick_exports(monkeypatch):
    """Cache entries exported with the tracing exporter: seconds instead of a minute on a busy machine."""
    export = deploy.export_onnx
    monkeypatch.setattr(deploy, "export_onnx", lambda *a, **kw: export(*a, **{**kw, "exporter": "torchscript"}))


def test_a_damaged_cache_entry_is_reported_and_exported_again(tmp_path, checkpoint, capsys, monkeypatch,
                                                              quick_exports, caplog):
    monkeypatch.setenv("DYNAMICVIT_CACHE", str(tmp_path / "cache"))
    image = gray_image(tmp_path / "a.png")
    code, first, err = run_cli(capsys, "predict", image, "--checkpoint", checkpoint, "--json")
    assert code == 0, err
    (entry,) = (tmp_path / "cache" / "onnx").glob("*.onnx")
    entry.write_bytes(entry.read_bytes()[:1000])  # truncated: a full disk or a killed copy
    code, again, err = run_cli(capsys, "predict", image, "--checkpoint", checkpoint, "--json")
    assert code == 0, err
    assert "cached ONNX export is damaged" in caplog.text and "exporting" in caplog.text and str(entry.parent) in caplog.text
    assert json.loads(again)["results"] == json.loads(first)["results"]
    assert sorted(p.name for p in entry.parent.iterdir()) == [entry.name]  # replaced, nothing left beside it
    deploy.OnnxModel(entry)  # loads again


def test_an_unwritable_cache_names_the_variable_and_the_way_around_it(tmp_path, checkpoint, capsys, monkeypatch):
    monkeypatch.setenv("DYNAMICVIT_CACHE", "/proc/dynamicvit-cache")
    code, out, err = run_cli(capsys, "predict", gray_image(tmp_path / "a.png"), "--checkpoint", checkpoint)
    assert code == 2 and err.count("\n") == 1, err
    assert "DYNAMICVIT_CACHE" in err and "--runtime eager" in err


# -- names from files never reach the terminal raw ------------------------------------------------


def test_class_names_never_come_from_a_folder_a_checkpoint_names(tmp_path, capsys):
    """A checkpoint may name any folder as its training data: its sub-folders are not class names."""
    secret = tmp_path / "secret"
    for name in [f"private-{i}" for i in range(10)]:
        (secret / "train" / name).mkdir(parents=True)
    path = dynamicvit.save_model(fmnist_model(), tmp_path / "m.safetensors",
                                 extra={"train_config": {"dataset": str(secret)}})
    code, out, err = run_cli(capsys, "predict", gray_image(tmp_path / "a.png"), "--checkpoint", path,
                             "--runtime", "eager", "--json")
    assert code == 0, err
    names = [p["name"] for p in json.loads(out)["results"][0]["predictions"]]
    assert all(n.startswith("class ") for n in names) and "private" not in out + err


def test_class_names_from_a_checkpoint_are_printed_without_escape_sequences(tmp_path, capsys):
    names = [f"\x1b[31mred\x1b[0m {i}\r\u202e" for i in range(10)]
    path = dynamicvit.save_model(fmnist_model(), tmp_path / "m.safetensors", extra={"class_names": names})
    code, out, err = run_cli(capsys, "predict", gray_image(tmp_path / "a.png"), "--checkpoint", path,
                             "--runtime", "eager", "--top-k", "10")
    assert code == 0, err
    assert "\x1b" not in out + err and "\r" not in out and "\u202e" not in out
    assert "\\x1b[31mred\\x1b[0m 3\\r\\u202e" in out  # escaped, still readable
