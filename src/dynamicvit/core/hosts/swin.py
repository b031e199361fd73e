"""timm's Swin Transformer as a DynamicSpatial host (DynamicSwin in the authors' release).

Mirrors timm 1.0's `SwinTransformerBlock.forward`: the spatial mixer is `x + drop_path1(_attn(norm1(x)))`
(shifted window attention with its masks, padding and relative position bias, all inside `_attn`);
the FFN is `mlp(norm2(x))` with its own residual on the mixer's output. Maps are NHWC.
"""
from __future__ import annotations

import re
from typing import Optional

import torch
import torch.nn as nn

from ...errors import CheckpointError, UnsupportedModelError
from .spatial_base import SpatialHost
from .vit import check_images

_FAST_PATH = re.compile(r"^layers\.2\.blocks\.(\d+)\.fastmlp\.fc1\.(\d)\.(.*)$")
_PREDICTOR = re.compile(r"^layers\.2\.score_predictor\.(\d+)\.(.*)$")


class SwinHost(SpatialHost):
    family = "swin"
    layout = "NHWC"
    mixer_has_residual = True
    default_locs = {
        ((2, 2, 6, 2), (96, 192, 384, 768)): (1, 2, 3),  # Swin-T
        ((2, 2, 18, 2), (96, 192, 384, 768)): (2, 4, 6),  # Swin-S
        ((2, 2, 18, 2), (128, 256, 512, 1024)): (2, 4, 6),  # Swin-B
    }

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        from timm.models.swin_transformer import SwinTransformer

        return isinstance(model, SwinTransformer)

    @classmethod
    def check(cls, model: nn.Module) -> None:
        from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention

        name = type(model).__name__
        if len(model.layers) != 4:
            raise UnsupportedModelError(f"{name} has {len(model.layers)} stages; only 4-stage Swins are supported")
        blocks = model.layers[cls.sparse_stage].blocks
        if any(type(b) is not SwinTransformerBlock or type(b.attn) is not WindowAttention for b in blocks):
            raise UnsupportedModelError(
                f"{name}: stage 3 must consist of timm's SwinTransformerBlock with WindowAttention (Swin V1)"
            )

    # -- geometry --------------------------------------------------------------------------------

    @property
    def stages(self) -> nn.Sequential:
        return self.model.layers

    @property
    def img_size(self) -> tuple[int, int]:
        return tuple(self.model.patch_embed.img_size)

    def stage_grid(self, img_size: Optional[tuple[int, int]] = None) -> tuple[int, int]:
        if img_size is None or tuple(img_size) == self.img_size:
            return tuple(self.blocks[0].input_resolution)
        r = self.model.feature_info[self.sparse_stage]["reduction"]
        return -(-img_size[0] // r), -(-img_size[1] // r)  # the stages pad odd maps

    # -- forward pieces --------------------------------------------------------------------------

    def check_images(self, images: torch.Tensor) -> None:
        if self.model.dynamic_img_size:
            return super().check_images(images)
        check_images(images, self.in_chans, self.img_size)

    def stem(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.patch_embed(images)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.norm(x)

    def distill_targets(self, features: torch.Tensor) -> torch.Tensor:
        return features.flatten(1, 2)  # (B, N4, C4): the final normed tokens

    def mix(self, j: int, x: torch.Tensor) -> torch.Tensor:
        blk = self.blocks[j]
        return x + blk.drop_path1(blk._attn(blk.norm1(x)))

    def ffn(self, j: int, x: torch.Tensor) -> torch.Tensor:
        blk = self.blocks[j]
        return blk.mlp(blk.norm2(x))

    def drop_path(self, j: int) -> nn.Module:
        return self.blocks[j].drop_path2

    def ffn_norm_eps(self, j: int) -> float:
        return self.blocks[j].norm2.eps

    # -- weights ---------------------------------------------------------------------------------

    def filter_state(self, state: dict) -> dict:
        """timm's mapping from the original Swin release (downsample at the end of a stage, `head`)."""
        from timm.models.swin_transformer import checkpoint_filter_fn

        try:
            return checkpoint_filter_fn(state, self.model)
        except Exception as e:  # noqa: BLE001 - a foreign key or shape surfaces as one of many types
            raise CheckpointError(f"the weights do not fit {type(self.model).__name__}: {type(e).__name__}: {e}") from None

    def split_reference(self, state: dict) -> tuple[dict, dict]:
        """DynamicSwin keys: `layers.2.score_predictor.{s}.*` (linear layers as for ViTs) and
        `layers.2.blocks.{j}.fastmlp.fc1.{0,1}.*` (LayerNorm, Linear)."""
        dense, new = {}, {}
        for k, v in state.items():
            if m := _PREDICTOR.match(k):
                new[f"predictors.{m[1]}.{m[2]}"] = v
            elif m := _FAST_PATH.match(k):
                # An unknown part keeps its own name, so the strict load reports it as unexpected.
                part = {"0": "norm", "1": "fc"}.get(m[2])
                new[f"fast_paths.{m[1]}.{part}.{m[3]}" if part else k] = v
            else:
                dense[k] = v
        return dense, new
