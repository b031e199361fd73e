"""The protocol of hierarchical backbones (ConvNeXt, Swin) for dynamic spatial sparsification.

`DynamicSpatial` (`core.spatial`) holds the method; a `SpatialHost` says only how one family differs:
which stage is sparsified and its blocks, how one block splits into a spatial mixer and a
per-position feed-forward part (FFN), how images reach the sparsified stage and how features become
logits, the layout of its maps, and how the authors' checkpoints map onto timm's modules.

Shapes: B batch, C width of the sparsified stage, H x W its map, N = H * W positions, K classes.
Maps are in the host's `layout`: (B, C, H, W) for "NCHW" (ConvNeXt), (B, H, W, C) for "NHWC" (Swin).
"""
from __future__ import annotations

from typing import ClassVar, Literal, Optional

import torch
import torch.nn as nn

from ...errors import ConfigError
from .base import BackboneInfo


class SpatialHost(BackboneInfo):
    """How `DynamicSpatial` drives one hierarchical backbone. Holds the backbone, owns no parameters."""

    family: ClassVar[str] = "?"
    layout: ClassVar[Literal["NCHW", "NHWC"]] = "NHWC"
    # The sparsified stage (0-based): the third, which holds most of the compute.
    sparse_stage: ClassVar[int] = 2
    # True when the block adds the mixer's output to its input before the FFN (Swin: two residuals),
    # so the FFN's residual is the mixer's output; False when one residual spans mixer and FFN
    # (ConvNeXt), so the FFN's residual is the block's input.
    mixer_has_residual: ClassVar[bool] = True
    # Layer-scale init of the fast path (ConvNeXt: 1e-6 like its own); None: no layer scale.
    fast_path_layer_scale: ClassVar[Optional[float]] = None
    # LayerNorm eps of the prediction modules in the authors' release.
    predictor_norm_eps: ClassVar[float] = 1e-5
    # The authors' predictor locations, by (stage depths, stage widths) (table in docs/spatial.md).
    default_locs: ClassVar[dict[tuple[tuple[int, ...], tuple[int, ...]], tuple[int, ...]]] = {}

    def __init__(self, model: nn.Module):
        self.check(model)
        self.model = model

    # -- which models ----------------------------------------------------------------------------

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        """True when `model` belongs to this family (it may still be an unsupported variant)."""
        raise NotImplementedError

    @classmethod
    def check(cls, model: nn.Module) -> None:
        """Raise `UnsupportedModelError` naming the problem unless this family can sparsify `model`."""

    # -- geometry --------------------------------------------------------------------------------

    @property
    def stages(self) -> nn.Sequential:
        """The four stages; each has `.downsample` (first) and `.blocks`."""
        raise NotImplementedError

    @property
    def blocks(self) -> nn.Sequential:
        """The blocks of the sparsified stage."""
        return self.stages[self.sparse_stage].blocks

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def depths(self) -> tuple[int, ...]:
        return tuple(len(s.blocks) for s in self.stages)

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(int(f["num_chs"]) for f in self.model.feature_info)

    @property
    def embed_dim(self) -> int:
        """C, the width of the sparsified stage."""
        return self.widths[self.sparse_stage]

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def in_chans(self) -> int:
        return self.model.in_chans

    @property
    def img_size(self) -> tuple[int, int]:
        """The image size the model is built (or was pretrained) for."""
        raise NotImplementedError

    def stage_grid(self, img_size: Optional[tuple[int, int]] = None) -> tuple[int, int]:
        """(H, W) of the sparsified stage's map for images of `img_size` (default: `img_size`)."""
        raise NotImplementedError

    def prune_locs(self) -> tuple[int, ...]:
        """The authors' predictor locations for this model; a clear error for depths and widths they did not publish."""
        key = (self.depths, self.widths)
        if key not in self.default_locs:
            raise ConfigError(
                f"{type(self.model).__name__} with depths {list(self.depths)} and widths {list(self.widths)} has no "
                f"default predictor locations (the authors' table covers the published {self.family} models); pass "
                f"prune_locs explicitly: block indices inside stage {self.sparse_stage + 1}, in 0..{self.depth - 1}"
            )
        return self.default_locs[key]

    # -- forward pieces --------------------------------------------------------------------------

    def check_images(self, images: torch.Tensor) -> None:
        """A clear error for images the backbone cannot take (before the backbone's own assertions).

        By default any image size is accepted (fully convolutional hosts); channels must match.
        """
        if images.ndim != 4 or images.shape[1] != self.in_chans:
            raise ConfigError(
                f"expected images of shape (B, {self.in_chans}, H, W), got a tensor of shape {tuple(images.shape)}; "
                "convert the images, or build the model with in_chans=..."
            )

    def stem(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> the map entering stage 0."""
        raise NotImplementedError

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's map -> what timm's `forward_features` returns."""
        raise NotImplementedError

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(B, K) from `final_norm`'s output."""
        return self.model.forward_head(features)

    def distill_targets(self, features: torch.Tensor) -> torch.Tensor:
        """The final normalized feature map as tokens, (B, N4, C4), from `final_norm`'s output."""
        raise NotImplementedError

    def mix(self, j: int, x: torch.Tensor) -> torch.Tensor:
        """The spatial mixer of block j on a whole map (same layout in and out)."""
        raise NotImplementedError

    def ffn(self, j: int, x: torch.Tensor) -> torch.Tensor:
        """The per-position part of block j (norm, MLP, layer scale) on channels-last (..., C)."""
        raise NotImplementedError

    def drop_path(self, j: int) -> nn.Module:
        """Stochastic depth of block j's FFN branch (the fast path uses it too)."""
        raise NotImplementedError

    def ffn_norm_eps(self, j: int) -> float:
        """eps of block j's FFN norm; the fast path's LayerNorm uses the same."""
        raise NotImplementedError

    def to_nhwc(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1) if self.layout == "NCHW" else x

    def from_nhwc(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2) if self.layout == "NCHW" else x

    def to_nchw(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.layout == "NCHW" else x.permute(0, 3, 1, 2)

    # -- weights ---------------------------------------------------------------------------------

    def filter_state(self, state: dict) -> dict:
        """Map a dense checkpoint of this family (original release or timm layout) onto the backbone's keys."""
        return state

    def split_reference(self, state: dict) -> tuple[dict, dict]:
        """Split an authors' DynamicCNN/DynamicSwin state dict: (dense backbone part in the original layout,
        {"predictors.{s}.*", "fast_paths.{j}.*": tensors} in `DynamicSpatial`'s names)."""
        raise NotImplementedError
