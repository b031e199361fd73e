"""The commands with ConvNeXt / Swin models: info, flops, bench, eval, visualize (tiny models)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import dynamicvit
from dynamicvit.cli import main
from dynamicvit.runtime.flops import count_macs

CNX_KWARGS = '{"depths": [1, 1, 4, 1], "dims": [16, 32, 64, 128]}'


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def tiny_convnext(**kw):
    torch.manual_seed(0)
    return dynamicvit.create_model(
        "convnext_tiny", depths=(1, 1, 4, 1), dims=(16, 32, 64, 128), img_size=96, prune_locs=(1, 2, 3), **kw
    )


def test_info_prints_the_predictors_and_counts(capsys):
    code, text = _run(capsys, "info", "--model", "convnext_tiny")
    assert code == 0, text
    assert "14x14 map = 196 positions" in text
    lines = [l.split() for l in text.splitlines() if l.strip()[:1].isdigit()]
    assert [l[:5] for l in lines] == [["1", "1", "0.70", "137", "59"], ["2", "2", "0.50", "98", "98"], ["3", "3", "0.30", "58", "138"]]


def test_flops_counts_predictors_and_fast_paths(capsys):
    code, text = _run(capsys, "flops", "--model", "convnext_tiny", "--model-kwargs", CNX_KWARGS, "--img-size", "96",
                      "--prune-locs", "1,2,3", "--json")
    assert code == 0, text
    report = json.loads(text[text.index("{"):])
    model = tiny_convnext()
    dense = count_macs(model.backbone).total
    assert report["macs"] == count_macs(model.eval()).total < dense
    # Stage 3 at r = (0.7, 0.5, 0.3): the MACs drop by the FFN MACs of the positions on the fast path,
    # minus what the fast paths (C * C per position) and the predictors cost.
    C, N, counts = 64, 36, model.keep_counts()
    saved = sum((N - k) * 8 * C * C for k in counts)
    fast = sum((N - k) * C * C for k in counts)
    # Predictors: the global half of out_conv.0 runs once per image (ops.PredictionModule).
    h, q = C // 2, C // 4
    predictors = 3 * (N * (C * C + h * h + h * q + q) + h * h)  # the last layer ranks by one margin row (keep_margin)
    assert dense - report["macs"] == saved - fast - predictors
    # Per stage of the backbone: only stage 3 changes, and it holds the predictors.
    stages = {s["name"]: s for s in report["stages"]}
    dense_stages = {s["name"]: s for s in count_macs(model.backbone).stages}
    assert list(stages) == ["embed", "stage1", "stage2", "stage3", "stage4", "head"]
    for name in ("embed", "stage1", "stage2", "stage4", "head"):
        assert stages[name]["macs"] == dense_stages[name]["macs"]
    assert stages["stage3"]["predictor_macs"] == predictors and stages["stage3"]["blocks"] == [0, 1, 2, 3]
    assert report["keep_counts"] == [25, 18, 10]


def test_bench_times_dense_and_dynamic_side_by_side(capsys):
    code, text = _run(capsys, "bench", "--model", "swin_tiny_patch4_window7_224", "--model-kwargs",
                      '{"depths": [1, 1, 4, 1], "embed_dim": 16, "num_heads": [1, 2, 4, 8], "window_size": 3}',
                      "--img-size", "96", "--prune-locs", "1,2,3", "--keep-ratios", "1.0,0.7", "--batch-size", "2",
                      "--repeats", "1", "--warmup", "1", "--threads", "1")
    assert code == 0, text
    assert "| 1.0 (dense) | 2 |" in text and "| 0.7 | 2 |" in text


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / "data" / split / c).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(tmp_path / "data" / split / c / f"{i}.png")
    return tmp_path / "data"


def test_eval_and_visualize_a_saved_convnext(tmp_path, image_folder, capsys):
    path = dynamicvit.save_model(tiny_convnext(num_classes=2), tmp_path / "cnx.safetensors")
    code, text = _run(capsys, "eval", "--checkpoint", str(path), "--dataset", str(image_folder), "--keep-ratio", "0.7,0.9",
                      "--device", "cpu", "--num-workers", "0", "--json")
    assert code == 0, text
    rows = json.loads(text[text.index("{"):])["results"]
    assert [r["keep_counts"] for r in rows] == [[25, 18, 10], [32, 25, 18]]
    assert all(r["images"] == 4 for r in rows) and rows[0]["gmacs"] < rows[1]["gmacs"]
    code, text = _run(capsys, "eval", "--checkpoint", str(path), "--dataset", str(image_folder), "--device", "cpu",
                      "--num-workers", "0")
    assert code == 0 and "DynamicSpatial (convnext_tiny) on" in text, text

    out = tmp_path / "vis"
    code, text = _run(capsys, "visualize", "--checkpoint", str(path), "--output", str(out), str(image_folder / "val" / "a"))
    assert code == 0, text
    assert len(list(out.glob("*.png"))) >= 2


def test_flops_uses_the_image_size_and_channels_the_model_is_built_for():
    swin = dynamicvit.create_model(
        "swin_tiny_patch4_window7_224", depths=(1, 1, 4, 1), embed_dim=16, num_heads=(1, 2, 4, 8), window_size=3,
        img_size=96, in_chans=1, prune_locs=(1, 2, 3),
    )
    assert count_macs(swin).input_size == (1, 96, 96) == count_macs(swin.backbone).input_size
    assert count_macs(tiny_convnext(in_chans=1)).input_size == (1, 96, 96)
