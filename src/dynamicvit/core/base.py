"""`SparseModel`: what every sparse model shares, whatever its host family.

A sparse model holds the unmodified dense `backbone`, a host (`dynamicvit.core.hosts`) that says how
to drive it, a frozen settings object (`config`) and one `PredictionModule` per stage. Its forward
takes the training path (tokens masked, `forward_masked`) in training mode and the inference path
(tokens removed, `forward_pruned`) in eval mode. `DynamicViT` (token hosts: ViT, DeiT, LV-ViT) and
`DynamicSpatial` (hierarchical hosts: ConvNeXt, Swin) are the two kinds; code that accepts "a sparse
model" checks `isinstance(model, SparseModel)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
import torch.nn as nn

from . import layouts
from .ops import held_after


@dataclass
class DynamicViTOutput:
    """What the training path returns.

    Attributes:
        logits: classifier output, (B, num_classes) (a tuple for distilled DeiT in distilled training).
        tokens: what token distillation compares per patch token (`Host.distill_targets`): the final
            normed patch tokens (B, N, C) for ViTs, the aux-head logits (B, N, K) for LV-ViT, the final
            normalized map (B, N4, C4) for ConvNeXt / Swin.
        decisions: per-stage hard keep decisions with straight-through gradients, each (B, N).
        mask: the final keep decision, (B, N), detached.
        class_logits: what CE and the logit distillation train when it differs from `logits`
            (`Host.class_logits`: LV-ViT's class head alone), else None.
        merges: merged tokens only: each merging stage's (target, moved), both (B, N), detached: the
            token each patch token went to (its own index unless dropped there) and whether it took part
            (kept or newly dropped); else None. `held` is built from them when read.
    """

    logits: torch.Tensor
    tokens: torch.Tensor
    decisions: list[torch.Tensor]
    mask: torch.Tensor
    class_logits: Optional[torch.Tensor] = None
    merges: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None

    @property
    def held(self) -> Optional[torch.Tensor]:
        """Merged tokens only: held[b, j, o] = 1 when patch token j holds original patch o at the end,
        (B, N, N) (`ops.held_after`; rows sum to the sizes), else None. Built on each read."""
        return None if self.merges is None else held_after(self.merges)


@dataclass
class PrunedOutput:
    """What the inference path returns.

    Attributes:
        logits: classifier output, (B, num_classes).
        kept_indices: per stage, the kept patch tokens (positions, for DynamicSpatial) as indices into
            the original grid (row-major, 0..N-1), each (B, k_s), in the order they sit in the sequence.
            Under a per-image budget k_s is the largest count of the batch and an image's row ends in
            -1 after its own `kept_counts`.
        keep_scores: per stage (only when asked for), the predictor's log-probability of "keep" for
            every original patch, (B, N), NaN where the token had been dropped at an earlier stage.
        merged_into: per stage (only when asked for, and only for a model that merges its dropped
            tokens), the original grid index of the kept token that holds each original patch, (B, N)
            (a kept patch holds itself).
        tokens: DynamicViT: the final normed tokens the logits come from, (B, P + k, C): the prefix tokens,
            then the kept patch tokens in the order of `kept_indices[-1]`.
        kept_counts: per-image budget only: the patch tokens each image kept after each stage, (B, S).
    """

    logits: torch.Tensor
    kept_indices: list[torch.Tensor]
    keep_scores: Optional[list[torch.Tensor]] = None
    merged_into: Optional[list[torch.Tensor]] = None
    tokens: Optional[torch.Tensor] = None
    kept_counts: Optional[torch.Tensor] = None


class SparseModel(nn.Module):
    """The base of `DynamicViT` and `DynamicSpatial`: a dense backbone, its host, settings and predictors.

    Subclasses set `host`, `backbone`, `config` and `predictors` in their constructor and implement
    `forward_masked`, `forward_pruned`, `set_keep_ratio`, `at_keep_ratio` and `settings`.

    Attributes:
        model_name, timm_kwargs: how to rebuild the backbone with timm (stored in checkpoints).
    """

    # Parameters a dense checkpoint does not have (they start fresh when dense weights are loaded).
    new_parameter_prefixes: ClassVar[tuple[str, ...]] = ("predictors.",)

    def _set_source(self, model_name: Optional[str], timm_kwargs: Optional[dict]) -> None:
        self.model_name = model_name or self.pretrained_cfg.get("architecture")
        self.timm_kwargs = dict(timm_kwargs or {})

    # -- settings and geometry -------------------------------------------------------------------

    @property
    def keep_ratio(self) -> float:
        return self.config.keep_ratio

    @property
    def prune_locs(self) -> tuple[int, ...]:
        return self.config.prune_locs

    @property
    def budget(self) -> str:
        """"fixed" (the same token count per stage for every image) or "per-image"; spatial models are fixed."""
        return getattr(self.config, "budget", "fixed")

    @property
    def family(self) -> str:
        """The host family: "vit", "lvvit", "convnext" or "swin"."""
        return self.host.family

    @property
    def embed_dim(self) -> int:
        return self.host.embed_dim

    @property
    def num_classes(self) -> int:
        return self.host.num_classes

    @property
    def in_chans(self) -> int:
        return self.host.in_chans

    @property
    def img_size(self) -> tuple[int, int]:
        return tuple(self.host.img_size)

    @property
    def pretrained_cfg(self) -> dict:
        return self.host.pretrained_cfg

    def keep_counts(self) -> tuple[int, ...]:
        """Tokens (positions) kept after each stage."""
        return self.config.keep_counts(self.num_patches)

    def set_keep_ratio(self, keep_ratio: float) -> None:
        """Change how much each stage keeps; no retraining needed."""
        raise NotImplementedError

    def at_keep_ratio(self, keep_ratio: float) -> "SparseModel":
        """A twin at `keep_ratio` that shares this model's backbone and every new module (no copy)."""
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """What is needed to rebuild this model before loading its weights (stored in checkpoints)."""
        raise NotImplementedError

    # -- weights ---------------------------------------------------------------------------------

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Our own keys load as in torch. Other layouts (timm / DeiT / LV-ViT dense weights, the authors'
        sparse checkpoints), as `timm.create_model("dynamicvit_...", checkpoint_path=...)` passes them,
        are mapped first (`layouts.load_foreign_state`: clear errors, NaN checks)."""
        if any(k.startswith(("backbone.", *self.new_parameter_prefixes)) for k in state_dict):
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        return layouts.load_foreign_state(self, state_dict, "the state dict")

    # -- the two paths ---------------------------------------------------------------------------

    def forward_masked(self, images: torch.Tensor, **kwargs) -> DynamicViTOutput:
        raise NotImplementedError

    def forward_pruned(self, images: torch.Tensor, return_scores: bool = False) -> PrunedOutput:
        raise NotImplementedError

    def empty_output(self, images: torch.Tensor, return_scores: bool = False) -> PrunedOutput:
        """The inference path's output for a batch of no images, as timm and ONNX Runtime give it:
        logits (0, num_classes), kept indices (0, k_s) (some hosts' layers cannot reshape an empty batch)."""
        param = next(self.parameters())
        logits = images.new_zeros(0, self.num_classes, dtype=param.dtype)
        kept = [torch.zeros(0, k, dtype=torch.long, device=images.device) for k in self.keep_counts()]
        scores = [images.new_zeros(0, self.num_patches, dtype=param.dtype) for _ in kept] if return_scores else None
        return PrunedOutput(logits, kept, scores)

    def forward(self, x: torch.Tensor, **train_kwargs):
        """Training mode: `forward_masked` (`train_kwargs`, e.g. this step's keep ratio); eval mode: the
        logits of `forward_pruned` at the model's keep ratio, like any timm classifier.

        Args:
            x: images, (B, C, H, W).
        """
        if self.training:
            return self.forward_masked(x, **train_kwargs)
        return self.forward_pruned(x).logits


def backbone_of(model: nn.Module) -> nn.Module:
    """The dense timm model inside a sparse model; any other model is its own backbone."""
    return model.backbone if isinstance(model, SparseModel) else model


def logits_of(output: Any) -> torch.Tensor:
    """The logits in a model's output: a tensor as it is (timm models, sparse models of timm hosts), else the
    `logits` of a transformers-style output, or for models without classes their image embedding or pooled output."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("logits", "image_embeds", "pooler_output"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")
