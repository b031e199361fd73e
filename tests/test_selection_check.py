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
