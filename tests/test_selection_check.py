"""benchmarks/selection_check.py: the random and inverted choices it compares against."""
import importlib.util
from pathlib import Path

import pytest
import timm
import torch

import dynamicvit
from dynamicvit.errors import ConfigError

from conftest import tiny_kwargs

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("selection_check", ROOT / "benchmarks" / "selection_check.py")
selection_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(selection_check)


def test_nested_masks_keep_the_counts_inside_the_previous_stage():
    torch.manual_seed(0)
    scores = [torch.randn(4, 49) for _ in range(3)]
    counts = (34, 24, 16)
    masks = selection_check._nested_masks(scores, counts, lambda s: torch.rand(s.shape))
    previous = torch.ones(4, 49)
    for mask, k in zip(masks, counts):
        assert (mask.sum(1) == k).all()
        assert (mask <= previous).all()  # only tokens the previous stage kept
        previous = mask


def test_inverted_masks_take_the_lowest_scores():
    scores = [torch.arange(10.0).repeat(2, 1), torch.arange(10.0).repeat(2, 1)]
    first, second = selection_check._nested_masks(scores, (6, 3), lambda s: -s)
    assert first[0].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5]
    assert second[0].nonzero().flatten().tolist() == [0, 1, 2]


def test_a_dense_checkpoint_needs_sparsify_dense(tmp_path):
    path = dynamicvit.save_model(timm.create_model("vit_tiny_patch16_224", **tiny_kwargs()), tmp_path / "dense.safetensors")
    with pytest.raises(ConfigError, match="dense model; pass --sparsify-dense"):
        selection_check.check(str(path), images=10)


def test_canvas_items_sit_at_their_spot_on_a_blank_field():
    from conftest import require_fashion_mnist

    require_fashion_mnist()
    spec = importlib.util.spec_from_file_location("spatial_canvas", ROOT / "benchmarks" / "spatial_canvas.py")
    canvas = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(canvas)
    test, again = canvas.CanvasFashionMNIST("val", seed=3), canvas.CanvasFashionMNIST("val", seed=3)
    blank = (0.0 - canvas.FASHION_MNIST.mean[0]) / canvas.FASHION_MNIST.std[0]
    for i in range(5):
        x, y = test[i]
        assert x.shape == (1, 112, 112) and y == int(test.targets[i])
        torch.testing.assert_close(x, again[i][0])  # a test item's spot is fixed
        top, left = (2 * v for v in test.spots[i].tolist())  # canvas 56 -> 112 px
        outside = torch.ones(112, 112, dtype=torch.bool)
        outside[max(top - 1, 0):top + 57, max(left - 1, 0):left + 57] = False  # the item's box, and bilinear's 1 px
        assert torch.allclose(x[0][outside], torch.tensor(blank))
        assert (x[0][~outside] > blank + 0.5).any()
    train = canvas.CanvasFashionMNIST("train")
    first_ink = lambda: tuple((train[0][0][0] > blank + 0.5).nonzero()[0].tolist())  # noqa: E731
    assert len({first_ink() for _ in range(8)}) > 1  # a new spot each time


def test_spread_is_largest_minus_smallest_keep_probability_of_the_scored_positions():
    flat = torch.full((3, 49), 0.7).log()
    assert selection_check._spread(flat).item() == pytest.approx(0.0)
    p = torch.tensor([[0.9, 0.2, 0.5], [0.6, 0.6, 0.1]])
    assert selection_check._spread(p.log()).item() == pytest.approx(0.7 + 0.5)
    dropped = torch.tensor([[0.9, 1.0, 0.5]]).log()
    dropped[0, 1] = float("-inf")  # a token an earlier stage removed (DynamicViT) is left out
    assert selection_check._spread(dropped).item() == pytest.approx(0.4)


@pytest.mark.parametrize("args, message", [
    (["--teacher", "missing.safetensors"], "error: no teacher at missing.safetensors"),
    (["--keep-ratios", "0.7,x"], "expected comma-separated numbers"),
])
def test_spatial_canvas_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "spatial_canvas.py"), "--output", str(tmp_path / "out"),
                           *args], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.slow
def test_spatial_canvas_runs_end_to_end_and_resumes_from_its_runs(tmp_path):
    """A smoke run (1 step per epoch, 50 test items): a teacher, a student, the table with every column and
    spread, the picture; a second run reuses the trained models instead of training again."""
    import json
    import subprocess
    import sys

    from conftest import require_fashion_mnist

    require_fashion_mnist()
    out = tmp_path / "canvas"
    command = [sys.executable, str(ROOT / "benchmarks" / "spatial_canvas.py"), "--output", str(out), "--teacher-epochs", "1",
               "--student-epochs", "1", "--max-steps-per-epoch", "1", "--images", "50", "--keep-ratios", "0.5"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((out / "selection.json").read_text())
    assert set(rows) == {"DynamicSpatial 0.5, fine-tuned", "teacher + fresh predictors and fast paths, 0.7"}
    for row in rows.values():
        assert set(selection_check.COLUMNS) <= set(row) and row["images"] == 50 and len(row["spread"]) == 3
    assert (out / "dynamic-0.5" / "choices.png").stat().st_size > 0
    assert "| DynamicSpatial 0.5, fine-tuned |" in (out / "selection.md").read_text()
    trained = (out / "dynamic-0.5" / "model.safetensors").stat().st_mtime_ns
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "dynamic-0.5" / "model.safetensors").stat().st_mtime_ns == trained  # not trained again
