"""`predict` and `export` keep the promises of the rest: nothing a user wrote is lost, nothing is left
behind, every input is accounted for, and results are what the model computed (valid JSON, the
sparse model described and run as one)."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
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
