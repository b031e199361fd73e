"""DynamicViT: prediction modules and token pruning on top of a host backbone.

`DynamicViT` holds the unmodified backbone as `backbone`, one `PredictionModule` per stage, and a
`Host` (`dynamicvit.hosts`) that says how this family of backbone embeds images, runs a block with
masked attention and computes logits from the final tokens. The method lives here, once, for every
host family:
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
from .hosts import Host, host_for
from .ops import PredictionModule, prune_tokens, sample_keep, select_tokens

_logger = logging.getLogger(__name__)


@dataclass
class DynamicViTOutput:
    """What the training path returns.

    Attributes:
        logits: classifier output, (B, num_classes) (a tuple for distilled DeiT in distilled training).
        tokens: what token distillation compares per patch token (`Host.distill_targets`): the final
            normed patch tokens (B, N, C) for ViTs, the aux-head logits (B, N, K) for LV-ViT.
        decisions: per-stage hard keep decisions with straight-through gradients, each (B, N).
        mask: the final keep decision, (B, N), detached.
        class_logits: what CE and the logit distillation train when it differs from `logits`
            (`Host.class_logits`: LV-ViT's class head alone), else None.
    """

    logits: torch.Tensor
    tokens: torch.Tensor
    decisions: list[torch.Tensor]
    mask: torch.Tensor
    class_logits: Optional[torch.Tensor] = None


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
    """A backbone (any `dynamicvit.hosts` family) with DynamicViT token sparsification.

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
        self.host: Host = host_for(backbone)
        self.backbone = backbone
        self.config = SparsityConfig.create(keep_ratio, prune_locs, self.host.depth, self.num_patches)
        # Each stage starts by keeping about rho of the tokens before it, so stage s starts at its target rho^s.
        prior = min(max(self.config.keep_ratio, 0.05), 0.95)
        self.predictors = nn.ModuleList(PredictionModule(self.embed_dim, prior) for _ in self.config.prune_locs)
        # How to rebuild the backbone from timm (stored in checkpoints).
        self.model_name = model_name or backbone.pretrained_cfg.get("architecture")
        self.timm_kwargs = dict(timm_kwargs or {})

    # -- properties ----------------------------------------------------------------------------

    @property
    def num_prefix_tokens(self) -> int:
        return self.host.num_prefix_tokens

    @property
    def num_patches(self) -> int:
        return self.host.num_patches

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.host.grid_size

    @property
    def patch_size(self) -> tuple[int, int]:
        """Pixels per patch token (height, width)."""
        return self.host.patch_size

    @property
    def embed_dim(self) -> int:
        return self.host.embed_dim

    @property
    def num_classes(self) -> int:
        return self.host.num_classes

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
        self.config = SparsityConfig.create(keep_ratio, self.prune_locs, self.host.depth, self.num_patches)

    def extra_repr(self) -> str:
        return f"keep_ratio={self.keep_ratio}, prune_locs={self.prune_locs}, keep_counts={self.keep_counts()}"

    def _stage_at(self) -> dict[int, int]:
        """{block index: stage} for the blocks a prediction module runs before."""
        return {loc: s for s, loc in enumerate(self.prune_locs)}

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
        host = self.host
        x = host.embed(x)
        B, P = x.shape[0], self.num_prefix_tokens
        decision = x.new_ones(B, self.num_patches, 1)
        prefix = x.new_ones(B, P, 1)
        policy = None
        stage_decisions = []
        stage_at = self._stage_at()
        for i in range(host.depth):
            stage = stage_at.get(i)
            if stage is not None:
                if decisions is None:
                    log_probs = self.predictors[stage](x, decision, P)
                    decision = sample_keep(log_probs, decision)
                else:
                    decision = decisions[stage].reshape(B, -1, 1).to(x.dtype) * decision
                stage_decisions.append(decision.squeeze(-1))
                policy = torch.cat([prefix, decision], dim=1)  # (B, M, 1)
            x = host.block(i, x, policy)
        x = host.norm(x)
        mask = decision.squeeze(-1).detach()
        return DynamicViTOutput(
            logits=host.logits(x, mask), tokens=host.distill_targets(x), decisions=stage_decisions, mask=mask,
            class_logits=host.class_logits(x),
        )

    # -- inference path: tokens removed --------------------------------------------------------

    def forward_pruned(self, x: torch.Tensor, return_scores: bool = False) -> PrunedOutput:
        """Inference path: the least informative patch tokens are removed at each stage.

        Args:
            x: images, (B, C, H, W).
            return_scores: also return each stage's keep log-probabilities on the original grid.
        """
        host = self.host
        x = host.embed(x)
        B, P, N = x.shape[0], self.num_prefix_tokens, self.num_patches
        counts = self.keep_counts()
        index = None  # (B, n) original grid index of each current patch token
        kept, scores = [], []
        stage_at = self._stage_at()
        for i in range(host.depth):
            stage = stage_at.get(i)
            if stage is not None:
                predictor = self.predictors[stage]
                if return_scores:
                    log_p = predictor(x, num_prefix_tokens=P)[..., 0]  # (B, n)
                    score = log_p
                    full = log_p.new_full((B, N), float("nan"))
                    src = index if index is not None else torch.arange(N, device=x.device).expand(B, N)
                    scores.append(full.scatter(1, src, log_p))
                    x, keep = select_tokens(x, score, counts[stage], P)
                else:
                    x, keep = prune_tokens(x, predictor, counts[stage], P)
                index = keep if index is None else index.gather(1, keep)
                kept.append(index)
            x = host.block(i, x)
        x = host.norm(x)
        return PrunedOutput(host.logits(x), kept, scores if return_scores else None)

    def forward(self, x: torch.Tensor):
        if self.training:
            return self.forward_masked(x)
        return self.forward_pruned(x).logits
