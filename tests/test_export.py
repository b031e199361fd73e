"""Deployment: the inference path (tokens removed) exports with torch.export and a dynamic batch."""
import torch

from conftest import tiny_model


def test_torch_export_with_dynamic_batch_matches_eager():
    model = tiny_model(keep_ratio=0.6).eval()
    batch = torch.export.Dim("batch", min=1, max=256)
    program = torch.export.export(model, (torch.randn(2, 3, 32, 32),), dynamic_shapes={"x": {0: batch}})
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=0, atol=0)
    # The exported graph holds no dense-length attention after the first stage: top-k is in it.
    assert "topk" in str(program.graph)
