"""DynamicViT on top of a timm VisionTransformer.

`DynamicViT` holds the unmodified timm model as `backbone` and one `PredictionModule` per stage.
It reuses the backbone's own stages (`patch_embed`, `_pos_embed`, `norm_pre`, blocks, `norm`,
`forward_head`), so LayerScale, qk-norm, register and distillation tokens, and any image or patch
size the backbone supports work unchanged.

Modifications against timm's `VisionTransformer.forward`:
- Training path (`forward_masked`): before each block in `prune_locs` a prediction module samples
  hard keep decisions (straight-through Gumbel-softmax); from the first stage on, every block runs
  with masked attention so dropped tokens cannot influence any other token.
- Inference path (`forward_pruned`): before each block in `prune_locs` the top-k patch tokens are
  gathered and the remaining blocks run the backbone's own (fused) attention on the shorter sequence.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn

from .config import SparsityConfig
from .errors import ConfigError, UnsupportedModelError
from .ops import PredictionModule, masked_attention, sample_keep, select_tokens

_logger = logging.getLogger(__name__)

SUPPORTED_POOLS = ("token", "avg")


@dataclass
class DynamicViTOutput:
    """What the training path returns.

    Attributes:
        logits: classifier output, (B, num_classes) (a tuple for distilled DeiT in distilled training).
        tokens: final normed patch tokens, (B, N, C), for token distillation.
        decisions: per-stage hard keep decisions with straight-through gradients, each (B, N).
        mask: the final keep decision, (B, N), detached.
    """

    logits: torch.Tensor
    tokens: torch.Tensor
    decisions: list[torch.Tensor]
    mask: torch.Tensor


@dataclass
class PrunedOutput:
    """What the inference path returns.

    Attributes:
        logits: classifier output, (B, num_classes).
        kept_indices: per stage, the kept patch tokens as indices into the original grid
            (row-major, 0..N-1), each (B, k_s), in the order they sit in the sequence.
        keep_scores: per stage (only when asked for), the predictor's log-probability of "keep" for
            every original patch, (B, N), NaN where the token had been dropped at an earlier stage.
    """

    logits: torch.Tensor
    kept_indices: list[torch.Tensor]
    keep_scores: Optional[list[torch.Tensor]] = None


class DynamicViT(nn.Module):
    """A timm VisionTransformer with DynamicViT token sparsification.

    In training mode `forward` runs the training path and returns a `DynamicViTOutput`; in eval
    mode it runs the inference path and returns the logits, like any timm classifier.
    """

    def __init__(
        self,
        backbone: nn.Module,
        keep_ratio: float = 0.7,
        prune_locs: Optional[Sequence[int]] = None,
        model_name: Optional[str] = None,
        timm_kwargs: Optional[dict] = None,
    ):
        super().__init__()
        check_backbone(backbone)
        self.backbone = backbone
        self.config = SparsityConfig.create(keep_ratio, prune_locs, len(backbone.blocks), self.num_patches)
        # Each stage starts by keeping about rho of the tokens before it, so stage s starts at its target rho^s.
        prior = min(max(self.config.keep_ratio, 0.05), 0.95)
        self.predictors = nn.ModuleList(PredictionModule(backbone.embed_dim, prior) for _ in self.config.prune_locs)
        # How to rebuild the backbone from timm (stored in checkpoints).
        self.model_name = model_name or backbone.pretrained_cfg.get("architecture")
        self.timm_kwargs = dict(timm_kwargs or {})

    # -- properties ----------------------------------------------------------------------------

    @property
    def num_prefix_tokens(self) -> int:
        return self.backbone.num_prefix_tokens

    @property
    def num_patches(self) -> int:
        return self.backbone.patch_embed.num_patches

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.backbone.patch_embed.grid_size)

    @property
    def embed_dim(self) -> int:
        return self.backbone.embed_dim

    @property
    def num_classes(self) -> int:
        return self.backbone.num_classes

    @property
    def keep_ratio(self) -> float:
        return self.config.keep_ratio

    @property
    def prune_locs(self) -> tuple[int, ...]:
        return self.config.prune_locs

    @property
    def pretrained_cfg(self) -> dict:
        return self.backbone.pretrained_cfg

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Also takes timm/DeiT and reference DynamicViT weights, as `timm.create_model("dynamicvit_...",
        checkpoint_path=...)` passes them, through `dynamicvit.checkpoint` (clear errors, NaN checks)."""
        from .checkpoint import load_foreign_state

        if any(k.startswith(("backbone.", "predictors.")) for k in state_dict):
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        return load_foreign_state(self, state_dict, "the state dict")

    def keep_counts(self) -> tuple[int, ...]:
        """Patch tokens kept after each stage, int(N * rho ** s)."""
        return self.config.keep_counts(self.num_patches)

    def set_keep_ratio(self, keep_ratio: float) -> None:
        """Change how many tokens each stage keeps; no retraining needed."""
        self.config = SparsityConfig.create(keep_ratio, self.prune_locs, len(self.backbone.blocks), self.num_patches)

    def extra_repr(self) -> str:
        return f"keep_ratio={self.keep_ratio}, prune_locs={self.prune_locs}, keep_counts={self.keep_counts()}"

    # -- shared stages -------------------------------------------------------------------------

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        m = self.backbone
        C, (H, W) = m.patch_embed.proj.in_channels, m.patch_embed.img_size
        # Checked here, before timm's PatchEmbed asserts with a message that names no fix.
        if x.ndim != 4 or x.shape[1] != C or (getattr(m.patch_embed, "strict_img_size", True) and x.shape[-2:] != (H, W)):
            raise ConfigError(
                f"expected images of shape (B, {C}, {H}, {W}), got a tensor of shape {tuple(x.shape)}; resize the "
                f"images to {H}x{W} with {C} channel(s), or build the model with img_size / in_chans to match them"
            )
        x = m.patch_embed(x)
        x = m._pos_embed(x)
        x = m.patch_drop(x)
        x = m.norm_pre(x)
        if x.shape[1] != self.num_prefix_tokens + self.num_patches:
            raise ConfigError(
                f"the image gave {x.shape[1] - self.num_prefix_tokens} patch tokens but the model was built "
                f"for {self.num_patches} ({self.grid_size[0]}x{self.grid_size[1]}); resize the images to "
                f"{tuple(m.patch_embed.img_size)} or build the model with img_size=<your size>"
            )
        return x

    def _head(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Classifier head on normed tokens; `mask` (B, N) restricts average pooling to kept tokens."""
        m = self.backbone
        if mask is None or m.global_pool != "avg":
            return m.forward_head(x)
        w = mask.unsqueeze(-1).to(x.dtype)  # (B, N, 1)
        x = (x[:, self.num_prefix_tokens :] * w).sum(1) / w.sum(1).clamp_min(1e-6)
        return m.head(m.head_drop(m.fc_norm(x)))

    # -- training path: tokens masked ----------------------------------------------------------

    def forward_masked(
        self, x: torch.Tensor, decisions: Optional[Sequence[torch.Tensor]] = None
    ) -> DynamicViTOutput:
        """Training path: every token is computed, dropped ones are masked out of attention.

        Args:
            x: images, (B, C, H, W).
            decisions: optional per-stage keep masks (B, N) to use instead of sampling; they are
                combined hierarchically like sampled ones. Used to compare with the inference path.
        """
        x = self._embed(x)
        B, P = x.shape[0], self.num_prefix_tokens
        decision = x.new_ones(B, self.num_patches, 1)
        prefix = x.new_ones(B, P, 1)
        policy = None
        stage_decisions = []
        stage = 0
        for i, blk in enumerate(self.backbone.blocks):
            if stage < len(self.prune_locs) and i == self.prune_locs[stage]:
                if decisions is None:
                    log_probs = self.predictors[stage](x, decision, P)
                    decision = sample_keep(log_probs, decision)
                else:
                    decision = decisions[stage].reshape(B, -1, 1).to(x.dtype) * decision
                stage_decisions.append(decision.squeeze(-1))
                policy = torch.cat([prefix, decision], dim=1)  # (B, M, 1)
                stage += 1
            x = blk(x) if policy is None else _masked_block(blk, x, policy)
        x = self.backbone.norm(x)
        mask = decision.squeeze(-1).detach()
        return DynamicViTOutput(
            logits=self._head(x, mask), tokens=x[:, P:], decisions=stage_decisions, mask=mask
        )

    # -- inference path: tokens removed --------------------------------------------------------

    def forward_pruned(self, x: torch.Tensor, return_scores: bool = False) -> PrunedOutput:
        """Inference path: the least informative patch tokens are removed at each stage.

        Args:
            x: images, (B, C, H, W).
            return_scores: also return each stage's keep log-probabilities on the original grid.
        """
        x = self._embed(x)
        B, P, N = x.shape[0], self.num_prefix_tokens, self.num_patches
        counts = self.keep_counts()
        index = None  # (B, n) original grid index of each current patch token
        kept, scores = [], []
        stage = 0
        for i, blk in enumerate(self.backbone.blocks):
            if stage < len(self.prune_locs) and i == self.prune_locs[stage]:
                predictor = self.predictors[stage]
                if return_scores:
                    log_p = predictor(x, num_prefix_tokens=P)[..., 0]  # (B, n)
                    score = log_p
                    full = log_p.new_full((B, N), float("nan"))
                    src = index if index is not None else torch.arange(N, device=x.device).expand(B, N)
                    scores.append(full.scatter(1, src, log_p))
                else:
                    score = predictor.keep_score(x, P)
                x, keep = select_tokens(x, score, counts[stage], P)
                index = keep if index is None else index.gather(1, keep)
                kept.append(index)
                stage += 1
            x = blk(x)
        x = self.backbone.norm(x)
        return PrunedOutput(self.backbone.forward_head(x), kept, scores if return_scores else None)

    def forward(self, x: torch.Tensor):
        if self.training:
            return self.forward_masked(x)
        return self.forward_pruned(x).logits


def _masked_block(blk: nn.Module, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
    """A timm `Block` forward with masked attention."""
    x = x + blk.drop_path1(blk.ls1(masked_attention(blk.attn, blk.norm1(x), policy)))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


def check_backbone(model: nn.Module) -> None:
    """Raise `UnsupportedModelError` unless `model` is a pre-norm ViT that DynamicViT can prune."""
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    name = type(model).__name__
    if not isinstance(model, VisionTransformer):
        raise UnsupportedModelError(
            f"{name} is not a timm VisionTransformer; DynamicViT supports ViT-style timm models "
            "such as deit_small_patch16_224, deit_base_patch16_224, vit_tiny_patch16_224"
        )
    bad_blocks = {type(b).__name__ for b in model.blocks if type(b) is not Block}
    if bad_blocks:
        raise UnsupportedModelError(
            f"{name} uses block type(s) {sorted(bad_blocks)}; only timm's pre-norm `Block` is supported"
        )
    bad_attn = {type(b.attn).__name__ for b in model.blocks if type(b.attn) is not Attention}
    if bad_attn or any(getattr(b.attn, "gate", None) is not None for b in model.blocks):
        raise UnsupportedModelError(
            f"{name} uses attention {sorted(bad_attn) or ['gated Attention']}; only timm's `Attention` is supported"
        )
    if model.attn_pool is not None or model.global_pool not in SUPPORTED_POOLS:
        raise UnsupportedModelError(
            f"{name} pools with global_pool={model.global_pool!r}; supported: {SUPPORTED_POOLS} "
            "(pass global_pool='token' or 'avg' when creating the model)"
        )
    if not isinstance(model.patch_drop, nn.Identity):
        raise UnsupportedModelError(
            "patch dropout (patch_drop_rate > 0) changes the token count at random; build the model without it"
        )
    if getattr(model, "dynamic_img_size", False):
        raise UnsupportedModelError(
            "dynamic_img_size=True is not supported: the number of kept tokens per stage is fixed by the "
            "image size; build the model with img_size=<your size> instead"
        )
