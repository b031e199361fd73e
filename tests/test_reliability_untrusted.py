"""Files from elsewhere: an ONNX file's metadata and a checkpoint's settings are checked before anything is
built from them. Whatever they hold ends in one `DynamicViTError` (one line and exit code 2 on the
command line) or a working model, never another exception, and never an allocation beyond what the
model needs."""
from __future__ import annotations

import json
import logging
import resource
import time
import unicodedata

import numpy as np
import onnx
import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from PIL import Image

import dynamicvit
from dynamicvit.cli import main
from dynamicvit.data import FASHION_MNIST_CLASSES, eval_transform, preprocessing_config
from dynamicvit.errors import CheckpointError, ConfigError, DynamicViTError
from dynamicvit.runtime import deploy
from dynamicvit.weights.build import SIZE_SLACK
from dynamicvit.weights.formats import model_settings

FMNIST_KWARGS = dict(img_size=28, in_chans=1, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=10)
DEEP = "[" * 100_000 + "]" * 100_000  # valid JSON, deeper than any parser's recursion


def fmnist_model():
    torch.manual_seed(0)
    return dynamicvit.create_model("vit_tiny_patch16_224", keep_ratio=0.7, prune_locs=(1, 2, 3), **FMNIST_KWARGS).eval()


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, err
    return lines[0]


# -- ONNX metadata ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A verified export of a DynamicViT for 28 px grayscale images, and an image for it."""
    folder = tmp_path_factory.mktemp("exported")
    model = fmnist_model()
    path = deploy.export_onnx(model, folder / "m.onnx", exporter="torchscript", class_names=list(FASHION_MNIST_CLASSES),
                              preprocessing=preprocessing_config(model, "fashion-mnist")).path
    image = folder / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8)).save(image)
    return path, image


def craft_onnx(source, target, settings=None, class_names=None):
    """A copy of `source` whose metadata entries are replaced (a str is stored verbatim, else as JSON)."""
    proto = onnx.load(str(source))
    for key, value in ((deploy.METADATA_KEY, settings), (deploy.CLASS_NAMES_KEY, class_names)):
        if value is not None:
            entry = next(p for p in proto.metadata_props if p.key == key)
            entry.value = value if isinstance(value, str) else json.dumps(value)
    onnx.save(proto, str(target))
    return target


def stored(path) -> tuple[dict, list]:
    proto = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    return json.loads(props[deploy.METADATA_KEY]), json.loads(props[deploy.CLASS_NAMES_KEY])


def changed(settings: dict, dotted: str, value) -> dict:
    """`settings` with the entry at `a.b` set to `value` (`DELETE`: removed)."""
    out = json.loads(json.dumps(settings))
    *parents, key = dotted.split(".")
    node = out
    for p in parents:
        node = node[p]
    if value is DELETE:
        node.pop(key, None)
    else:
        node[key] = value
    return out


DELETE = object()
# (where, value, words of the error). Those of the report first, then more of the same kind.
METADATA_VARIANTS = [
    ("settings", "{not json", "not valid JSON"),
    ("settings", "[1, 2]", "expected a JSON object"),
    ("settings", DEEP, "nested too deeply"),
    ("class_names", "3", "expected a JSON list"),
    ("class_names", ["a", "b"], "class_names"),
    ("class_names", list(range(10)), "class_names"),
    ("class_names", "{}", "expected a JSON list"),
    ("preprocessing.std", [0.0], "std"),
    ("preprocessing.std", [-0.353], "std"),
    ("preprocessing.std", [float("nan")], "std"),
    ("preprocessing.crop_pct", 0, "crop_pct"),
    ("preprocessing.crop_pct", -0.5, "crop_pct"),
    ("preprocessing.crop_pct", "0.9", "crop_pct"),
    ("preprocessing.crop_pct", 1e-6, "crop_pct"),  # resize 28 px to 28 million before the crop
    ("preprocessing.crop_pct", 1.5, "crop_pct"),
    ("preprocessing.mean", [0.1, 0.2, 0.3], "mean"),
    ("preprocessing.mean", "0.5", "mean"),
    ("preprocessing.input_size", [1, -28, 28], "input_size"),
    ("preprocessing.input_size", [1, 0, 28], "input_size"),
    ("preprocessing.input_size", "28", "input_size"),
    ("preprocessing.input_size", [3, 28, 28], "preprocessing"),  # one mean for three channels
    ("preprocessing.input_size", [1, 32, 32], "input_size"),
    ("preprocessing.interpolation", "evil", "interpolation"),
    ("preprocessing.crop_mode", ["center"], "crop_mode"),
    ("preprocessing", None, "preprocessing"),
    ("preprocessing", [1, 28, 28], "preprocessing"),
    ("preprocessing", DELETE, "no dynamicvit metadata (preprocessing)"),
    ("input_size", [1, -1, 28], "input_size"),
    ("input_size", [2, 28, 28], "input_size"),
    ("grid_size", [-7, 7], "grid_size"),
    ("grid_size", "7x7", "grid_size"),
    ("keep_counts", [34, 24], "keep_counts"),
    ("keep_counts", [34, 24, 10**9], "keep_counts"),
    ("keep_ratio", "0.7", "keep_ratio"),
    ("num_classes", 11, "num_classes"),
    ("model_name", 42, "model_name"),
    ("kind", "evil", "kind"),
]


@pytest.mark.parametrize("where, value, words", METADATA_VARIANTS,
                         ids=[f"{w}={str(v)[:12]}" for w, v, _ in METADATA_VARIANTS])
def test_malformed_onnx_metadata_is_one_line_and_exit_2(tmp_path, exported, capsys, where, value, words):
    path, image = exported
    settings, names = stored(path)
    if where == "settings":
        target = craft_onnx(path, tmp_path / "m.onnx", settings=value)
    elif where == "class_names":
        target = craft_onnx(path, tmp_path / "m.onnx", class_names=value)
    else:
        target = craft_onnx(path, tmp_path / "m.onnx", settings=changed(settings, where, value))
    code = main(["predict", str(image), "--onnx", str(target)])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and words in line and str(target) in line, line
    if where != "preprocessing" or value is not DELETE:
        with pytest.raises(ConfigError):
            deploy.read_metadata(target)


def test_a_huge_input_size_is_refused_before_anything_is_allocated(tmp_path, exported, capsys):
    path, image = exported
    settings, _ = stored(path)
    big = changed(changed(settings, "input_size", [1, 30000, 30000]), "preprocessing.input_size", [1, 30000, 30000])
    target = craft_onnx(path, tmp_path / "big.onnx", settings=big)
    start, peak = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code = main(["predict", str(image), "--onnx", str(target)])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and "input_size" in line and "4096" in line
    assert time.monotonic() - start < 10
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 200 * 1024  # KiB: nothing image-sized


def test_onnx_class_and_model_names_reach_the_terminal_escaped(tmp_path, exported, capsys, caplog):
    path, image = exported
    settings, names = stored(path)
    names = [f"\x1b]0;pwned\x07{n}\x1b[2J" for n in names]
    target = craft_onnx(path, tmp_path / "m.onnx", settings={**settings, "model_name": "vit\x1b[31m"},
                        class_names=names)
    caplog.set_level(logging.INFO)
    code = main(["predict", str(image), "--onnx", str(target), "--top-k", "10"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "\x1b" not in captured.out + captured.err + caplog.text and "\x07" not in captured.out
    assert "\\x1b]0;pwned\\x07" in captured.out and "vit\\x1b[31m (keep ratio" in caplog.text


def test_a_valid_file_still_reads_as_written(exported):
    path, _ = exported
    meta = deploy.read_metadata(path)
    settings, names = stored(path)
    assert meta["class_names"] == names and meta["preprocessing"] == settings["preprocessing"]
    assert meta["keep_counts"] == settings["keep_counts"] and meta["grid_size"] == [7, 7]


# -- checkpoint settings ----------------------------------------------------------------------------


def craft_checkpoint(path, state, settings) -> str:
    text = settings if isinstance(settings, str) else json.dumps(settings)
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"dynamicvit": text})
    return str(path)


SETTINGS_VARIANTS = [
    ("settings", DEEP, "nested too deeply"),
    ("extra", 5, "extra"),
    ("extra", {"class_names": 3}, "class_names"),
    ("extra", {"class_names": ["a", 3]}, "class_names"),
    ("extra", {"train_config": [1]}, "train_config"),
    ("extra", {"train_config": {"dataset": {"path": "/"}}}, "dataset"),
    ("timm_kwargs.act_layer", "no_such_activation", "do not build a model"),
    ("timm_kwargs.embed_dim", -32, "do not build a model"),
    ("timm_kwargs.embed_dim", 33, "do not build a model"),  # not a multiple of the heads
    ("timm_kwargs.embed_dim", 100_000, "describe a model of"),
    ("timm_kwargs.depth", 10**6, "depth"),  # a million blocks: too many modules even without weights
    ("timm_kwargs.img_size", 100_000, "img_size"),
    ("timm_kwargs.img_size", [28, -28], "img_size"),
    ("timm_kwargs.patch_size", 0, "do not build a model"),
    ("timm_kwargs.mlp_ratio", float("nan"), "not finite numbers"),
    ("keep_ratio", 5, "keep_ratio"),
    ("keep_ratio", float("inf"), "keep_ratio"),
    ("prune_locs", [1, 2, 99], "do not build a model"),
    ("fuse_dropped", "yes", "fuse_dropped"),
    ("keep_ratio_range", [0.9, 0.1], "do not build a model"),
]


@pytest.mark.parametrize("where, value, words", SETTINGS_VARIANTS,
                         ids=[f"{w}={str(v)[:12]}" for w, v, _ in SETTINGS_VARIANTS])
def test_malformed_checkpoint_settings_are_a_checkpoint_error_and_exit_2(tmp_path, capsys, where, value, words):
    model = fmnist_model()
    settings = value if where == "settings" else changed(model_settings(model), where, value)
    path = craft_checkpoint(tmp_path / "m.safetensors", model.state_dict(), settings)
    start = time.monotonic()
    with pytest.raises(CheckpointError, match=words):
        dynamicvit.load_model(path)
    assert time.monotonic() - start < 30  # refused from the settings, not after building a huge model
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(image)
    for argv in (["predict", str(image), "--runtime", "eager"], ["export", "--output", str(tmp_path / "m.onnx")]):
        code = main([*argv, "--checkpoint", path])
        line = one_error_line(capsys.readouterr().err)
        assert code == 2 and "m.safetensors" in line, line
    assert not (tmp_path / "m.onnx").exists()


def test_settings_naming_the_architecture_from_a_file_are_checked_for_create_model_too(tmp_path):
    model = fmnist_model()
    path = craft_checkpoint(tmp_path / "m.safetensors", model.state_dict(),
                            changed(model_settings(model), "timm_kwargs.embed_dim", 100_000))
    with pytest.raises(CheckpointError, match="describe a model of"):
        dynamicvit.create_model("vit_tiny_patch16_224", checkpoint_path=path)


# -- fuzzing both readers ---------------------------------------------------------------------------

# JSON values of every type, size and nesting (NaN and infinities included: Python's JSON reads them).
LEAVES = (st.none() | st.booleans() | st.integers(-2, 40) | st.integers(-10**12, 10**12) | st.floats()
          | st.text(max_size=8) | st.sampled_from(["center", "bicubic", "dynamicvit", "dense", "gelu", "\x1b[31m"]))
JSON_VALUES = st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                           max_leaves=12)


def mutations(valid: dict) -> st.SearchStrategy:
    """`valid` with one to three entries (at any depth, named or new) replaced by arbitrary JSON or removed."""
    paths = []

    def walk(node, prefix):
        for key, value in node.items():
            paths.append(prefix + key)
            if isinstance(value, dict):
                walk(value, prefix + key + ".")

    walk(valid, "")
    one = st.tuples(st.sampled_from(paths) | st.text(min_size=1, max_size=6), JSON_VALUES | st.just(DELETE))

    def apply(changes):
        out = valid
        for where, value in changes:
            parent = where.rpartition(".")[0]
            try:
                out = changed(out, where, value)
            except (KeyError, TypeError, AttributeError):  # an earlier change replaced a parent
                out = changed(out, parent, value) if parent else out
        return out

    return st.lists(one, min_size=1, max_size=3).map(apply)


def onnx_metadata_strategy(settings: dict, names: list) -> st.SearchStrategy:
    whole = st.builds(lambda v: json.dumps(v), JSON_VALUES) | st.sampled_from([DEEP, "{", "NaN", ""])
    settings_text = mutations(settings).map(json.dumps) | whole | st.just(json.dumps(settings))
    names_text = st.just(json.dumps(names)) | st.builds(json.dumps, JSON_VALUES) | st.lists(st.text(max_size=5), min_size=10, max_size=10).map(json.dumps)
    return st.fixed_dictionaries({deploy.METADATA_KEY: settings_text, deploy.CLASS_NAMES_KEY: names_text})


def check_onnx_metadata(props: dict, graph_input: list, graph_outputs: dict, image: Image.Image) -> None:
    """One input to the reader: an error of ours, or settings whose transform gives the graph's input."""
    try:
        meta = deploy.check_metadata(props, "fuzz.onnx", graph_input, graph_outputs)
    except DynamicViTError:
        return
    if "preprocessing" not in meta:
        return
    x = eval_transform(meta["preprocessing"])(image)
    assert list(x.shape) == graph_input[1:]  # what the graph takes, nothing larger
    assert all(isinstance(n, str) and harmless(n) for n in meta["class_names"] or [])
    assert harmless(meta.get("model_name") or "")


def harmless(text: str) -> bool:
    """No control, format or separator character that could move the cursor or rewrite a line."""
    return not any(unicodedata.category(c)[0] == "C" or unicodedata.category(c) in ("Zl", "Zp") for c in text)


def run_onnx_fuzz(exported, max_examples: int) -> None:
    path, image_path = exported
    settings, names = stored(path)
    proto = onnx.load(str(path), load_external_data=False)
    graph_input, graph_outputs = deploy._graph_shapes(proto.graph)
    image = Image.open(image_path).convert("L")

    @hypothesis_settings(max_examples=max_examples, deadline=None, suppress_health_check=list(HealthCheck),
                         derandomize=True)
    @given(onnx_metadata_strategy(settings, names))
    def fuzz(props):
        check_onnx_metadata(props, graph_input, graph_outputs, image)

    fuzz()


def test_fuzz_onnx_metadata(exported):
    run_onnx_fuzz(exported, 300)


@pytest.mark.slow
def test_fuzz_onnx_metadata_longer(exported):
    run_onnx_fuzz(exported, 5000)


@pytest.fixture(scope="module")
def small_checkpoint_parts():
    model = fmnist_model()
    return {k: v.clone() for k, v in model.state_dict().items()}, model_settings(model)


def check_checkpoint_settings(tmp_path, state: dict, raw: str) -> None:
    """One input to the reader: an error of ours, or a model no larger than the file's weights allow."""
    path = craft_checkpoint(tmp_path / "fuzz.safetensors", state, raw)
    try:
        model = dynamicvit.load_model(path)
    except DynamicViTError:
        return
    held = sum(t.numel() for t in state.values())
    assert sum(p.numel() for p in model.parameters()) <= 2 * held + SIZE_SLACK


def run_checkpoint_fuzz(tmp_path, parts, max_examples: int) -> None:
    state, valid = parts
    raw = mutations(valid).map(json.dumps) | st.builds(json.dumps, JSON_VALUES) | st.sampled_from([DEEP, "{", "[]"])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    @hypothesis_settings(max_examples=max_examples, deadline=None, suppress_health_check=list(HealthCheck),
                         derandomize=True)
    @given(raw)
    def fuzz(text):
        check_checkpoint_settings(tmp_path, state, text)

    fuzz()
    # Nothing along the way allocated more than a few tiny models (a huge model would show in the peak).
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 1024 * 1024  # KiB


def test_fuzz_checkpoint_settings(tmp_path, small_checkpoint_parts):
    run_checkpoint_fuzz(tmp_path, small_checkpoint_parts, 40)


@pytest.mark.slow
def test_fuzz_checkpoint_settings_longer(tmp_path, small_checkpoint_parts):
    run_checkpoint_fuzz(tmp_path, small_checkpoint_parts, 400)
