"""Shared fixtures: tiny timm ViTs that build and run in milliseconds on a CPU."""
from __future__ import annotations

import pytest
import torch

import dynamicvit

# 32 px images, 4 px patches: an 8x8 grid of 64 patch tokens; 6 blocks, default stages (1, 3, 4).
TINY = dict(img_size=32, patch_size=4, embed_dim=48, depth=6, num_heads=3, num_classes=10)


def tiny_kwargs(**overrides) -> dict:
    return {**TINY, **overrides}


def tiny_model(name: str = "vit_tiny_patch16_224", keep_ratio: float = 0.7, prune_locs=None, **overrides):
    """A small DynamicViT whose predictors score tokens clearly apart, like trained ones (see `scramble`)."""
    torch.manual_seed(0)
    model = dynamicvit.create_model(name, keep_ratio=keep_ratio, prune_locs=prune_locs, **tiny_kwargs(**overrides))
    for predictor in model.predictors:
        scramble(predictor)
    return model


def scramble(module: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Large random weights. Fresh prediction modules start with nearly equal scores for all tokens
    (the reference init), so their top-k is decided by rounding; tests that compare the tokens two
    computations keep need scores that differ clearly, as a trained module's do."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module


def reference_state(model) -> dict:
    """A DynamicViT's weights in the authors' checkpoint layout: timm backbone keys + score_predictor.{s}.*"""
    return {("score_predictor." + k[len("predictors."):]) if k.startswith("predictors.") else k[len("backbone."):]: v.clone()
            for k, v in model.state_dict().items()}


def pruned_with_block_inputs(model, images: torch.Tensor, outputs: list = None):
    """The inference path's output and the token sequence entering every block, (B, M_i, C) each.

    The sequences are taken where the model hands them to its host (`Host.block`), so they are seen
    however the host runs the block (the backbone's own module, or its parts with a size bias).
    `outputs`, when given, receives what every block returns.
    """
    seen = []
    run = model.host.block

    def block(i, x, *args, **kwargs):
        seen.append(x)
        out = run(i, x, *args, **kwargs)
        if outputs is not None:
            outputs.append(out)
        return out

    model.host.block = block
    try:
        with torch.no_grad():
            out = model.forward_pruned(images)
    finally:
        del model.host.block
    return out, seen


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; on a busy 2-core machine more threads slow them many times."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(4, 3, 32, 32)


def require_fashion_mnist() -> None:
    """Skip the calling test when the Fashion-MNIST files are not installed; any other error fails it."""
    from dynamicvit.data import fashion_mnist_root
    from dynamicvit.errors import DataError

    try:
        fashion_mnist_root()
    except DataError:
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
