"""DynamicViT: prediction modules and token pruning on top of a host backbone.

`DynamicViT` holds the unmodified backbone as `backbone`, one `PredictionModule` per stage, and a
`Host` (`dynamicvit.core.hosts`) that says how this family of backbone embeds images, runs a block with
masked attention and computes logits from the final tokens. The method lives here, once, for every
host family:
- Training path (`forward_masked`): before each block in `prune_locs` a prediction module samples
  hard keep decisions (straight-through Gumbel-softmax); from the first stage on, every block runs
  with masked attention so dropped tokens cannot influence any other token.
- Inference path (`forward_pruned`): before each block in `prune_locs` the top-k patch tokens are
  gathered and the remaining blocks run the backbone's own (fused) attention on the shorter sequence.

With `fuse_dropped` the tokens a stage drops are not discarded but folded into one extra token at the
end of the sequence (`fold_dropped`): the average of the dropped tokens weighted by the predictor's
keep probability. Later stages fold their dropped tokens into the same token, which keeps the total
weight of everything it holds, so after stage s it is the weighted average of every token dropped so
far (each taken at the depth where it was dropped, the earlier ones carried on through the blocks in
between). The fused token attends and is attended to like a kept token, but it is never scored,
never selected as a kept patch and is removed before the final norm: the class token (or the pooled
kept patches) still decides. The training path holds it as token P + N, masked out of attention
until a first token has been dropped.

Under the per-image budget (`set_keep_ratio(rho, budget="per-image")`) each image keeps the tokens
scored above calibrated thresholds and the batch runs packed (`core.packed`).
"""
from __future__ import annotations

import logging
from typing import Mapping, Optional, Sequence

import torch
import torch.nn as nn

from ..errors import ConfigError
from .base import DynamicViTOutput, PrunedOutput, SparseModel
from . import packed
from .hosts import Host, host_for
from .ops import PredictionModule, fold_dropped, prune_tokens, ratio_shift, sample_keep, select_tokens
from .settings import SparsityConfig, _as_ratio

_logger = logging.getLogger(__name__)


class DynamicViT(SparseModel):
    """A backbone (any `dynamicvit.core.hosts` family) with DynamicViT token sparsification.

    In training mode `forward` runs the training path and returns a `DynamicViTOutput`; in eval
    mode it runs the inference path and returns the logits, like any timm classifier.

    Args:
        backbone: a dense model of a supported host family.
        keep_ratio: rho; stage s keeps int(N * rho ** s) patch tokens.
        prune_locs: blocks before which to prune; default three evenly spaced stages.
        model_name, timm_kwargs: how to rebuild the backbone from timm (stored in checkpoints).
        fuse_dropped: fold the dropped tokens into one extra token instead of discarding them.
        keep_ratio_range: (low, high), the keep ratios an elastic model was trained for (recorded
            in checkpoints; a keep ratio outside it is allowed, with a warning). None: trained at
            `keep_ratio` alone, as in the paper.
        budget, thresholds, min_keep: the per-image budget (see `SparsityConfig`); thresholds are
            {keep ratio: (t_1, ..., t_S)} as `dynamicvit.core.budget.calibrate_thresholds` finds them.

    Attributes:
        packed_attention: how the per-image budget computes attention on the packed batch (one of
            `core.packed.ATTENTION_KERNELS`; set it with `core.packed.set_packed_attention`).
    """

    packed_attention: str = "auto"

    def __init__(
        self,
        backbone: nn.Module,
        keep_ratio: float = 0.7,
        prune_locs: Optional[Sequence[int]] = None,
        model_name: Optional[str] = None,
        timm_kwargs: Optional[dict] = None,
        fuse_dropped: bool = False,
        keep_ratio_range: Optional[Sequence[float]] = None,
        budget: str = "fixed",
        thresholds: Optional[Mapping[float, Sequence[float]]] = None,
        min_keep: int = 1,
    ):
        super().__init__()
        self.host: Host = host_for(backbone)
        self.backbone = backbone
        self.config = SparsityConfig.create(keep_ratio, prune_locs, self.host.depth, self.num_patches, fuse_dropped,
                                            budget, thresholds, min_keep)
        self.keep_ratio_range: Optional[tuple[float, float]] = None
        if keep_ratio_range is not None:
            self.set_keep_ratio_range(keep_ratio_range)
        # Each stage starts by keeping about rho of the tokens before it, so stage s starts at its target rho^s.
        prior = min(max(self.config.keep_ratio, 0.05), 0.95)
        self.predictors = nn.ModuleList(PredictionModule(self.embed_dim, prior) for _ in self.config.prune_locs)
        self._set_source(model_name, timm_kwargs)

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
    def fuse_dropped(self) -> bool:
        return self.config.fuse_dropped

    @property
    def budget(self) -> str:
        """"fixed" (int(N * rho^s) tokens per stage) or "per-image" (above calibrated thresholds)."""
        return self.config.budget

    @property
    def thresholds(self) -> dict[float, tuple[float, ...]]:
        """The calibrated per-image thresholds, {keep ratio: (t_1, ..., t_S)} (empty if none)."""
        return dict(self.config.thresholds)

    def settings(self) -> dict:
        return {
            "kind": "dynamicvit",
            "model_name": self.model_name,
            "timm_kwargs": self.timm_kwargs,
            "keep_ratio": self.keep_ratio,
            "prune_locs": list(self.prune_locs),
            # Written only when set, so the settings of a model without them read as before.
            **({"fuse_dropped": True} if self.fuse_dropped else {}),
            **({"keep_ratio_range": list(self.keep_ratio_range)} if self.keep_ratio_range else {}),
            **({"budget": self.budget} if self.budget != "fixed" else {}),
            **({"thresholds": {repr(r): list(t) for r, t in self.config.thresholds}, "min_keep": self.config.min_keep}
               if self.config.thresholds else {}),
        }

    def at_keep_ratio(self, keep_ratio: float, budget: Optional[str] = None) -> "DynamicViT":
        """A twin at `keep_ratio` (and `budget`, default this model's) sharing every module."""
        twin = DynamicViT(self.backbone, keep_ratio, self.prune_locs, self.model_name, self.timm_kwargs,
                          fuse_dropped=self.fuse_dropped, keep_ratio_range=self.keep_ratio_range,
                          budget=budget or self.budget, thresholds=self.thresholds, min_keep=self.config.min_keep)
        twin.predictors = self.predictors
        twin.packed_attention = self.packed_attention
        return twin

    def set_keep_ratio(self, keep_ratio: float, budget: Optional[str] = None) -> None:
        """Change how many tokens each stage keeps; no retraining needed.

        Args:
            budget: "fixed" or "per-image" (needs thresholds calibrated for `keep_ratio`); None: unchanged.
        """
        self.config = self._config_at(keep_ratio, budget=budget or self.budget)
        low, high = self.keep_ratio_range or (self.keep_ratio, self.keep_ratio)
        if self.keep_ratio_range is not None and not low - 1e-9 <= self.keep_ratio <= high + 1e-9:
            _logger.warning(
                "keep ratio %g is outside the range %g..%g this model was trained for; expect lower accuracy",
                self.keep_ratio, low, high,
            )

    def set_keep_ratio_range(self, keep_ratio_range: Sequence[float]) -> None:
        """Record the keep ratios the model is (being) trained for, (low, high); both must be valid."""
        try:
            low, high = (_as_ratio(r) for r in keep_ratio_range)
        except (TypeError, ValueError):
            raise ConfigError(f"keep_ratio_range must be (low, high), got {keep_ratio_range!r}") from None
        if low > high:
            raise ConfigError(f"keep_ratio_range ({low}, {high}) is empty; give (low, high) with low <= high")
        self._config_at(low, budget="fixed")  # raises when the smallest ratio keeps no token at some stage
        self.keep_ratio_range = (low, high)

    def set_thresholds(self, thresholds: Mapping[float, Sequence[float]], min_keep: Optional[int] = None) -> None:
        """Add (or replace) per-image thresholds, {keep ratio: (t_1, ..., t_S)} with t_s in [0, 1) (0 keeps
        every token); `min_keep`: the fewest patch tokens an image keeps per stage (None: unchanged)."""
        table = {**self.thresholds, **dict(thresholds)}
        self.config = self._config_at(self.keep_ratio, thresholds=table,
                                      min_keep=self.config.min_keep if min_keep is None else min_keep)

    def _config_at(self, keep_ratio: float, **changes) -> SparsityConfig:
        cfg = self.config
        settings = {**dict(fuse_dropped=cfg.fuse_dropped, budget=cfg.budget, thresholds=cfg.thresholds,
                           min_keep=cfg.min_keep), **changes}
        return SparsityConfig.create(keep_ratio, self.prune_locs, self.host.depth, self.num_patches, **settings)

    def extra_repr(self) -> str:
        text = f"keep_ratio={self.keep_ratio}, prune_locs={self.prune_locs}, keep_counts={self.keep_counts()}"
        if self.fuse_dropped:
            text += ", fuse_dropped=True"
        if self.budget != "fixed":
            text += f", budget={self.budget!r}, thresholds={self.config.stage_thresholds()}, min_keep={self.config.min_keep}"
        if self.keep_ratio_range is not None:
            text += f", keep_ratio_range={self.keep_ratio_range}"
        return text

    def _stage_at(self) -> dict[int, int]:
        """{block index: stage} for the blocks a prediction module runs before."""
        return {loc: s for s, loc in enumerate(self.prune_locs)}

    # -- training path: tokens masked ----------------------------------------------------------

    def forward_masked(
        self,
        x: torch.Tensor,
        decisions: Optional[Sequence[torch.Tensor]] = None,
        keep_ratio: Optional[float] = None,
    ) -> DynamicViTOutput:
        """Training path: every token is computed, dropped ones are masked out of attention.

        Args:
            x: images, (B, C, H, W).
            decisions: optional per-stage keep masks (B, N) to use instead of sampling; they are
                combined hierarchically like sampled ones. Used to compare with the inference path.
            keep_ratio: the keep ratio this step trains for (elastic training); sampling shifts
                every keep logit by logit(keep_ratio) - logit(self.keep_ratio), so the predictors
                keep about that fraction without taking the ratio as an input. None: no shift.
        """
        host = self.host
        x = host.embed(x)
        B, P, N = x.shape[0], self.num_prefix_tokens, self.num_patches
        decision = x.new_ones(B, N, 1)
        prefix = x.new_ones(B, P, 1)
        shift = ratio_shift(keep_ratio, self.keep_ratio)
        fused_weight = None  # (B, 1, 1): total weight held by the fused token x[:, P + N]
        policy = None
        stage_decisions = []
        stage_at = self._stage_at()
        for i in range(host.depth):
            stage = stage_at.get(i)
            if stage is not None:
                tokens = x[:, : P + N]  # without the fused token
                previous = decision
                if decisions is None or self.fuse_dropped:
                    log_probs = self.predictors[stage](tokens, decision, P)  # (B, N, 2)
                if decisions is None:
                    logits = log_probs + log_probs.new_tensor([shift, 0.0]) if shift else log_probs
                    decision = sample_keep(logits, decision)
                else:
                    decision = decisions[stage].reshape(B, -1, 1).to(x.dtype) * decision
                stage_decisions.append(decision.squeeze(-1))
                policy = torch.cat([prefix, decision], dim=1)  # (B, P + N, 1)
                if self.fuse_dropped:
                    # Newly dropped tokens, weighted by their keep probability (with gradient into both).
                    weight = log_probs[..., 0].exp() * (previous - decision).squeeze(-1)  # (B, N)
                    fused = x[:, P + N :] if fused_weight is not None else None
                    token, fused_weight = fold_dropped(tokens[:, P:], weight, fused, fused_weight)
                    x = torch.cat([tokens, token], dim=1)  # (B, P + N + 1, C)
                    # The fused token takes part once some token was dropped (as on the inference path);
                    # < 0.5, not == 0: straight-through decisions are 0 or 1 only up to rounding.
                    present = (decision < 0.5).any(dim=1, keepdim=True).to(x.dtype)  # (B, 1, 1)
                    policy = torch.cat([policy, present], dim=1)
            x = host.block(i, x, policy)
        x = host.norm(x[:, : P + N])
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
        if self.budget == "per-image":
            return packed.forward_packed(self, x, return_scores)
        host = self.host
        x = host.embed(x)
        B, P, N = x.shape[0], self.num_prefix_tokens, self.num_patches
        counts = self.keep_counts()
        n = N  # patch tokens in the sequence; a fused token, once there is one, follows them
        index = None  # (B, n) original grid index of each current patch token
        fused_weight = None  # (B, 1, 1): total weight held by the fused token x[:, P + n]
        kept, scores = [], []
        stage_at = self._stage_at()
        for i in range(host.depth):
            stage = stage_at.get(i)
            if stage is not None:
                predictor = self.predictors[stage]
                tokens = x if fused_weight is None else x[:, : P + n]  # without the fused token
                if return_scores:
                    log_p = predictor(tokens, num_prefix_tokens=P)[..., 0]  # (B, n)
                    score = log_p
                    full = log_p.new_full((B, N), float("nan"))
                    src = index if index is not None else torch.arange(N, device=x.device).expand(B, N)
                    scores.append(full.scatter(1, src, log_p))
                    kept_tokens, keep = select_tokens(tokens, score, counts[stage], P)
                elif self.fuse_dropped:
                    score = predictor.keep_score(tokens, P)  # logit of p(keep)
                    kept_tokens, keep = select_tokens(tokens, score, counts[stage], P)
                else:
                    kept_tokens, keep = prune_tokens(tokens, predictor, counts[stage], P)
                if self.fuse_dropped and counts[stage] < n:
                    p_keep = log_p.exp() if return_scores else torch.sigmoid(score)  # (B, n)
                    weight = p_keep.scatter(1, keep, 0.0)  # dropped tokens only
                    fused = x[:, P + n :] if fused_weight is not None else None
                    token, fused_weight = fold_dropped(tokens[:, P:], weight, fused, fused_weight)
                    kept_tokens = torch.cat([kept_tokens, token], dim=1)
                elif fused_weight is not None:
                    kept_tokens = torch.cat([kept_tokens, x[:, P + n :]], dim=1)  # nothing new dropped
                x, n = kept_tokens, counts[stage]
                index = keep if index is None else index.gather(1, keep)
                kept.append(index)
            x = host.block(i, x)
        x = host.norm(x if fused_weight is None else x[:, : P + n])
        return PrunedOutput(host.logits(x), kept, scores if return_scores else None)
