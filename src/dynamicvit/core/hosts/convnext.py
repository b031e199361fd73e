"""timm's ConvNeXt as a DynamicSpatial host (DynamicCNN in the authors' release).

Mirrors timm 1.0's `ConvNeXtBlock.forward` with the default channels-last MLP (conv_mlp=False):
the spatial mixer is the depthwise convolution `conv_dw`; the FFN is `norm` -> `mlp` -> `gamma`
on channels-last positions; one residual spans both. Maps are NCHW.
"""
from __future__ import annotations

import re
from typing import Optional

import torch
import torch.nn as nn

from ...errors import CheckpointError, UnsupportedModelError
from .spatial_base import SpatialHost

_FAST_PATH = re.compile(r"^stages\.2\.(\d+)\.fast_path(?:\.(\d)|_gamma)\.?(.*)$")
_PREDICTOR = re.compile(r"^score_predictor\.(\d+)\.(.*)$")


class ConvNeXtHost(SpatialHost):
    family = "convnext"
    layout = "NCHW"
    mixer_has_residual = False
    fast_path_layer_scale = 1e-6
    predictor_norm_eps = 1e-6  # the authors' channels-first LayerNorm
    default_locs = {
        ((3, 3, 9, 3), (96, 192, 384, 768)): (1, 2, 3),  # ConvNeXt-T
        ((3, 3, 27, 3), (96, 192, 384, 768)): (3, 6, 9),  # ConvNeXt-S
        ((3, 3, 27, 3), (128, 256, 512, 1024)): (3, 6, 9),  # ConvNeXt-B
    }

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        from timm.models.convnext import ConvNeXt

        return isinstance(model, ConvNeXt)

    @classmethod
    def check(cls, model: nn.Module) -> None:
        from timm.layers import Mlp
        from timm.models.convnext import ConvNeXtBlock

        name = type(model).__name__
        if len(model.stages) != 4:
            raise UnsupportedModelError(f"{name} has {len(model.stages)} stages; only 4-stage ConvNeXts are supported")
        blocks = model.stages[cls.sparse_stage].blocks
        if any(type(b) is not ConvNeXtBlock for b in blocks):
            raise UnsupportedModelError(f"{name}: stage 3 must consist of timm's ConvNeXtBlock")
        if any(type(b.mlp) is not Mlp for b in blocks):
            raise UnsupportedModelError(
                f"{name} uses {type(blocks[0].mlp).__name__} in its blocks (e.g. ConvNeXt-V2's global response norm, "
                "which mixes positions); only the plain per-position Mlp of ConvNeXt (V1) is supported"
            )
        if any(b.use_conv_mlp for b in blocks):
            raise UnsupportedModelError(
                f"{name} uses conv_mlp=True (channels-first MLP); build it with conv_mlp=False (timm's default)"
            )
        if any(not isinstance(b.shortcut, nn.Identity) for b in blocks):
            raise UnsupportedModelError(f"{name}: stage 3 blocks must keep their width and resolution")

    # -- geometry --------------------------------------------------------------------------------

    @property
    def stages(self) -> nn.Sequential:
        return self.model.stages

    @property
    def img_size(self) -> tuple[int, int]:
        # ConvNeXt takes any size; this is the size it was built or pretrained for.
        return tuple(self.model.pretrained_cfg.get("input_size", (3, 224, 224))[-2:])

    def stage_grid(self, img_size: Optional[tuple[int, int]] = None) -> tuple[int, int]:
        H, W = img_size or self.img_size
        r = self.model.feature_info[self.sparse_stage]["reduction"]
        return H // r, W // r

    # -- forward pieces --------------------------------------------------------------------------

    def stem(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.stem(images)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.norm_pre(x)

    def distill_targets(self, features: torch.Tensor) -> torch.Tensor:
        m = self.model
        # Default ConvNeXt (head_norm_first=False) normalizes after pooling, in the head: the per-position
        # map is that LayerNorm applied to every position (the authors' `norm(x.permute(0, 2, 3, 1))`).
        if isinstance(m.norm_pre, nn.Identity):
            features = m.head.norm(features)
        return features.flatten(2).transpose(1, 2)  # (B, N4, C4)

    def mix(self, j: int, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[j].conv_dw(x)

    def ffn(self, j: int, x: torch.Tensor) -> torch.Tensor:
        blk = self.blocks[j]
        x = blk.mlp(blk.norm(x))
        return x if blk.gamma is None else x * blk.gamma

    def drop_path(self, j: int) -> nn.Module:
        return self.blocks[j].drop_path

    def ffn_norm_eps(self, j: int) -> float:
        return self.blocks[j].norm.eps

    # -- weights ---------------------------------------------------------------------------------

    def filter_state(self, state: dict) -> dict:
        """timm's mapping from the original ConvNeXt release (`downsample_layers`, `dwconv`, `pwconv`, ...)."""
        from timm.models.convnext import checkpoint_filter_fn

        try:
            return checkpoint_filter_fn(state, self.model)
        except KeyError as e:
            raise CheckpointError(f"the weights do not fit {type(self.model).__name__}: no parameter {e} in the model") from None
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"the weights do not fit {type(self.model).__name__}: {e}") from None

    def split_reference(self, state: dict) -> tuple[dict, dict]:
        """DynamicCNN keys: `score_predictor.{s}.*` (1x1 convs -> linear weights), `stages.2.{j}.fast_path.{0,1}.*`
        (LayerNorm, Linear) and `stages.2.{j}.fast_path_gamma`."""
        dense, new = {}, {}
        for k, v in state.items():
            if m := _PREDICTOR.match(k):
                # (out, in, 1, 1) conv weights of the channels-first predictor are linear weights.
                new[f"predictors.{m[1]}.{m[2]}"] = v.flatten(1) if v.ndim == 4 else v
            elif m := _FAST_PATH.match(k):
                j, idx, rest = m[1], m[2], m[3]
                if idx is None:
                    new[f"fast_paths.{j}.gamma"] = v
                else:
                    # An unknown part keeps its own name, so the strict load reports it as unexpected.
                    part = {"0": "norm", "1": "fc"}.get(idx)
                    new[f"fast_paths.{j}.{part}.{rest}" if part else k] = v
            else:
                dense[k] = v
        return dense, new
