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
    torch.manual_seed(0)
    return dynamicvit.create_model(name, keep_ratio=keep_ratio, prune_locs=prune_locs, **tiny_kwargs(**overrides))


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
