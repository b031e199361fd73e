"""The protocol every host family implements (see `hosts/__init__.py`).

Shapes: B batch, P prefix tokens (never dropped), N patch tokens of the full grid, n patch tokens
currently in the sequence (n = N on the training path), C width, K classes.
"""
from __future__ import annotations

from typing import Callable, ClassVar, Literal, Optional

import torch
import torch.nn as nn


class BackboneInfo:
    """What the data module and the commands read about a host's backbone (`model`), with timm's answers;
    token and hierarchical hosts alike."""

    model: nn.Module

    @property
    def pretrained_cfg(self) -> dict:
        """timm's pretrained config of the backbone: architecture, input size, normalization, crop, classes."""
        return self.model.pretrained_cfg

    @property
    def preprocessing(self) -> Optional[dict]:
        """How the backbone's own release prepares evaluation images, as `data.eval_config` describes it,
        when the family prescribes it exactly (transformers: the image processor's settings); None: the
        data module derives it from `pretrained_cfg`."""
        return None

    @property
    def class_names(self) -> Optional[list[str]]:
        """The class names the backbone carries (transformers: `config.id2label`), or None."""
        return None


class Host(BackboneInfo):
    """How DynamicViT drives one backbone of a family. Holds the backbone, owns no parameters.

    A host is a plain object (not a module): the backbone's weights stay under `backbone.` in the
    DynamicViT's state dict, and `copy.deepcopy` of the DynamicViT gives a host of the copy.
    """

    family: ClassVar[str] = "?"
    # What token distillation compares on the final kept tokens: "mse" on features or "kl" on
    # per-token class distributions (see `distill_targets`).
    token_distill: ClassVar[Literal["mse", "kl"]] = "mse"
    # Whether `block` takes token sizes (proportional attention), which merging dropped tokens needs.
    merges_tokens: ClassVar[bool] = True
    # Whether the per-image budget's packed execution can run its blocks (`block_with` on timm attention).
    packs_tokens: ClassVar[bool] = True
    # Evenly spaced stages for `depth` blocks by default (`config.default_prune_locs`).

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
        """Raise `UnsupportedModelError` naming the problem unless this family can prune `model`."""

    # -- geometry --------------------------------------------------------------------------------

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.blocks

    @property
    def depth(self) -> int:
        return len(self.blocks)

    # The defaults read timm's conventions: `num_prefix_tokens` on the model and a `patch_embed`
    # holding num_patches, grid_size, patch_size and img_size.

    @property
    def num_prefix_tokens(self) -> int:
        return self.model.num_prefix_tokens

    @property
    def num_patches(self) -> int:
        return self.model.patch_embed.num_patches

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.model.patch_embed.grid_size)

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.model.patch_embed.patch_size)

    @property
    def img_size(self) -> tuple[int, int]:
        return tuple(self.model.patch_embed.img_size)

    @property
    def in_chans(self) -> int:
        raise NotImplementedError

    @property
    def embed_dim(self) -> int:
        return self.model.embed_dim

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def patch_embed(self) -> Optional[nn.Module]:
        """The module that turns images into patch tokens (where MAC counting attributes the embedding)."""
        return getattr(self.model, "patch_embed", None)

    def head_modules(self) -> list[nn.Module]:
        """The modules after the last block: final norm and heads (MAC counting's `head` stage)."""
        names = ("norm", "fc_norm", "attn_pool", "head", "head_dist", "aux_head")
        return [m for n in names if isinstance(m := getattr(self.model, n, None), nn.Module)]

    # -- where the backbone comes from ----------------------------------------------------------

    def settings(self) -> dict:
        """What checkpoints store to rebuild the backbone beyond a timm name and timm arguments."""
        return {}

    # -- forward pieces --------------------------------------------------------------------------

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> tokens (B, P + N, C) with position information, ready for block 0."""
        raise NotImplementedError

    def block(
        self, i: int, x: torch.Tensor, policy: Optional[torch.Tensor] = None, sizes: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Block i on tokens (B, P + n, C); with `policy` (B, P + n, 1), dropped tokens are masked out
        of attention (they cannot influence any other token); with `sizes` (B, P + n), how many original
        tokens each token holds (merged tokens), attention is proportional to them (`ops.size_bias`,
        `ops.masked_softmax`). With neither, the block is the backbone's own, unchanged."""
        raise NotImplementedError

    def block_with(self, i: int, x: torch.Tensor, attention: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Block i on tokens (..., M, C) with `attention` in place of its own attention module: it takes
        the normed tokens and returns the attention branch's output (projection included), same shape.
        The masked training path and the packed per-image inference path run blocks this way."""
        raise NotImplementedError

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm, (B, P + n, C)."""
        return self.model.norm(x)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The dense backbone's final normed tokens (B, P + N, C): what a teacher's targets come from."""
        return self.model.forward_features(images)

    def logits(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Class logits (B, K) from the final normed tokens (B, P + n, C).

        Args:
            mask: training path only: which of the n = N patch tokens are kept, (B, N); None when
                every patch token in `x` counts (the inference path, where dropped tokens are gone).
        """
        raise NotImplementedError

    def outputs(self, x: torch.Tensor, kept_indices: list[torch.Tensor]):
        """What a sparse model returns in eval mode from its final normed tokens (B, P + n, C): the
        logits for timm families (as timm classifiers do); transformers hosts return an output object.

        Args:
            kept_indices: per stage, the kept patch tokens' indices into the original grid, (B, k_s).
        """
        return self.logits(x)

    def class_logits(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The prediction that CE and the logit distillation train, (B, K), when it is not `logits`
        (LV-ViT's reference trains its class head alone); None: train `logits`."""
        return None

    def distill_targets(self, x: torch.Tensor) -> torch.Tensor:
        """What token distillation compares, per patch token, from the final normed tokens (B, P + n, C):
        (B, n, C) features for "mse", (B, n, K) logits for "kl"."""
        return x[:, self.num_prefix_tokens :]

    # -- weights ---------------------------------------------------------------------------------

    def filter_state(self, state: dict) -> dict:
        """Map a dense checkpoint of this family (original release or timm layout) onto the backbone's
        keys, resizing position embeddings for another image size."""
        return state
