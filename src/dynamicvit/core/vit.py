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

With `merge_dropped` every token a stage drops is added into its most similar kept patch token
(cosine similarity of the features, `ops.merge_into_kept`) as a size-weighted average: each token
carries its size, the number of original patches it holds, and attention is proportional to it (log
size added to the key logits). The prediction module still decides which tokens are kept; merging
decides only where the dropped ones go, and never into a prefix token. The training path keeps every
token in the sequence and merges the newly dropped ones into the kept ones in place
(`ops.merge_masked`): for the same decisions it computes what the inference path computes. Until a
stage drops a token (keep ratio 1.0) there are no sizes and the blocks are the backbone's own.

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
from .ops import (PredictionModule, fold_dropped, merge_into_kept, merge_masked, prune_tokens, ratio_shift,
                  sample_keep, select_tokens, split_positions)
from .settings import SparsityConfig, _as_ratio, check_predictor_width

_logger = logging.getLogger(__name__)


class DynamicViT(SparseModel):
    """A backbone (any `dynamicvit.core.hosts` family) with DynamicViT token sparsification.

    In training mode `forward` runs the training path and returns a `DynamicViTOutput`; in eval
    mode it runs the inference path and returns the logits, like any timm classifier (on a transformers
    backbone: a `TransformersOutput` with `.logits`, or `.pooler_output` for base models).

    Args:
        backbone: a dense model of a supported host family.
        keep_ratio: rho; stage s keeps int(N * rho ** s) patch tokens.
        prune_locs: blocks before which to prune; default three evenly spaced stages.
        model_name, timm_kwargs: how to rebuild the backbone from timm (stored in checkpoints).
        fuse_dropped: fold the dropped tokens into one extra token instead of discarding them.
        merge_dropped: add each dropped token into its most similar kept token (excludes `fuse_dropped`).
        keep_ratio_range: (low, high), the keep ratios an elastic model was trained for (recorded
            in checkpoints; a keep ratio outside it is allowed, with a warning). None: trained at
            `keep_ratio` alone, as in the paper.
        budget, thresholds, min_keep: the per-image budget (see `SparsityConfig`); thresholds are
            {keep ratio: (t_1, ..., t_S)} as `dynamicvit.core.budget.calibrate_thresholds` finds them.
        predictor_width: hidden width of the prediction modules (see `PredictionModule`); None: the
            model's width, the paper's layout.

    Attributes:
        packed_attention: how the per-image budget computes attention on the packed batch (one of
            `core.packed.ATTENTION_KERNELS`; set it with `core.packed.set_packed_attention`).
        detach_predictor_input: training path only: the prediction modules read the tokens without
            passing a gradient back into the backbone, so the keep-ratio loss (and the decisions'
            straight-through gradient) trains the prediction modules alone. False is the paper's method.
    """

    packed_attention: str = "auto"
    detach_predictor_input: bool = False

    def __init__(
        self,
        backbone: nn.Module,
        keep_ratio: float = 0.7,
        prune_locs: Optional[Sequence[int]] = None,
        model_name: Optional[str] = None,
        timm_kwargs: Optional[dict] = None,
        fuse_dropped: bool = False,
        keep_ratio_range: Optional[Sequence[float]] = None,
        merge_dropped: bool = False,
        budget: str = "fixed",
        thresholds: Optional[Mapping[float, Sequence[float]]] = None,
        min_keep: int = 1,
        predictor_width: Optional[int] = None,
    ):
        super().__init__()
        self.host: Host = host_for(backbone)
        self.backbone = backbone
        self.config = SparsityConfig.create(keep_ratio, prune_locs, self.host.depth, self.num_patches, fuse_dropped,
                                            merge_dropped, budget, thresholds, min_keep)
        self._check_host_supports(self.config)
        self.keep_ratio_range: Optional[tuple[float, float]] = None
        if keep_ratio_range is not None:
            self.set_keep_ratio_range(keep_ratio_range)
        # Each stage starts by keeping about rho of the tokens before it, so stage s starts at its target rho^s.
        prior = min(max(self.config.keep_ratio, 0.05), 0.95)
        self.predictor_width = check_predictor_width(predictor_width, self.embed_dim)
        self.predictors = nn.ModuleList(PredictionModule(self.embed_dim, prior, self.predictor_width)
                                        for _ in self.config.prune_locs)
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
    def merge_dropped(self) -> bool:
        return self.config.merge_dropped

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
            **({"merge_dropped": True} if self.merge_dropped else {}),
            **({"predictor_width": self.predictor_width} if self.predictor_width else {}),
            **({"keep_ratio_range": list(self.keep_ratio_range)} if self.keep_ratio_range else {}),
            **({"budget": self.budget} if self.budget != "fixed" else {}),
            **({"thresholds": {repr(r): list(t) for r, t in self.config.thresholds}, "min_keep": self.config.min_keep}
               if self.config.thresholds else {}),
            **self.host.settings(),  # transformers: the class and its config
        }

    def at_keep_ratio(self, keep_ratio: float, budget: Optional[str] = None) -> "DynamicViT":
        """A twin at `keep_ratio` (and `budget`, default this model's) sharing every module."""
        twin = DynamicViT(self.backbone, keep_ratio, self.prune_locs, self.model_name, self.timm_kwargs,
                          fuse_dropped=self.fuse_dropped, keep_ratio_range=self.keep_ratio_range,
                          merge_dropped=self.merge_dropped, budget=budget or self.budget, thresholds=self.thresholds,
                          min_keep=self.config.min_keep, predictor_width=self.predictor_width)
        twin.predictors = self.predictors
        twin.packed_attention = self.packed_attention
        twin.detach_predictor_input = self.detach_predictor_input
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
        settings = {**dict(fuse_dropped=cfg.fuse_dropped, merge_dropped=cfg.merge_dropped, budget=cfg.budget,
                           thresholds=cfg.thresholds, min_keep=cfg.min_keep), **changes}
        config = SparsityConfig.create(keep_ratio, self.prune_locs, self.host.depth, self.num_patches, **settings)
        self._check_host_supports(config)
        return config

    def _check_host_supports(self, config: SparsityConfig) -> None:
        """Refuse the settings this host family cannot run (one line naming the alternative)."""
        if config.merge_dropped and not self.host.merges_tokens:
            raise ConfigError(f"merge_dropped is not supported for {self.host.family} models yet; use fuse_dropped")
        if config.budget == "per-image" and not self.host.packs_tokens:
            raise ConfigError(f"the per-image budget is not supported for {self.host.family} models yet; "
                              "use budget='fixed'")
        if config.budget == "per-image" and config.merge_dropped:
            raise ConfigError("the per-image budget does not run merged tokens yet; use fuse_dropped or budget='fixed'")

    def extra_repr(self) -> str:
        text = f"keep_ratio={self.keep_ratio}, prune_locs={self.prune_locs}, keep_counts={self.keep_counts()}"
        if self.fuse_dropped:
            text += ", fuse_dropped=True"
        if self.merge_dropped:
            text += ", merge_dropped=True"
        if self.predictor_width:
            text += f", predictor_width={self.predictor_width}"
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
        sizes = None  # (B, N): original patches each patch token holds, once merging has begun
        merges = [] if self.merge_dropped else None  # each stage's (target, moved): `DynamicViTOutput.held`
        policy = None
        stage_decisions = []
        stage_at = self._stage_at()
        for i in range(host.depth):
            stage = stage_at.get(i)
            if stage is not None:
                tokens = x[:, : P + N]  # without the fused token
                previous = decision
                if decisions is None or self.fuse_dropped:
                    seen = tokens.detach() if self.detach_predictor_input else tokens
                    log_probs = self.predictors[stage](seen, decision, P)  # (B, N, 2)
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
                if self.merge_dropped:
                    x, sizes, merge = self._merge_masked(x, sizes, previous, decision)
                    merges.append(merge)
            x = host.block(i, x, policy, _with_prefix(sizes, P))
        x = host.norm(x[:, : P + N])
        mask = decision.squeeze(-1).detach()
        return DynamicViTOutput(
            logits=host.logits(x, mask), tokens=host.distill_targets(x), decisions=stage_decisions, mask=mask,
            class_logits=host.class_logits(x), merges=merges,
        )

    # -- inference path: tokens removed --------------------------------------------------------

    def forward(self, x: torch.Tensor, **train_kwargs):
        """Training mode: `forward_masked`; eval mode: the inference path's output as the host presents it
        (`Host.outputs`: the logits for timm backbones, a `TransformersOutput` for transformers ones)."""
        if self.training:
            return self.forward_masked(x, **train_kwargs)
        if x.shape[0] == 0:  # some hosts' layers cannot run an empty batch
            return self.empty_output(x).logits
        if self.budget == "per-image":
            return self.forward_pruned(x).logits
        tokens, kept, _, _ = self._pruned_tokens(x, return_scores=False)
        return self.host.outputs(tokens, kept)

    def forward_pruned(self, x: torch.Tensor, return_scores: bool = False) -> PrunedOutput:
        """Inference path: the least informative patch tokens are removed at each stage.

        Args:
            x: images, (B, C, H, W).
            return_scores: also return each stage's keep log-probabilities on the original grid.
        """
        if x.shape[0] == 0:
            return self.empty_output(x, return_scores)
        if self.budget == "per-image":
            return packed.forward_packed(self, x, return_scores)
        x, kept, scores, merged_into = self._pruned_tokens(x, return_scores)
        return PrunedOutput(self.host.logits(x), kept, scores if return_scores else None, merged_into or None, tokens=x)

    def _pruned_tokens(self, x: torch.Tensor, return_scores: bool) -> tuple[torch.Tensor, list, list, list]:
        """The inference path up to the final norm: (tokens (B, P + k, C), kept indices, keep scores,
        where each patch was merged to)."""
        host = self.host
        x = host.embed(x)
        B, P, N = x.shape[0], self.num_prefix_tokens, self.num_patches
        counts = self.keep_counts()
        n = N  # patch tokens in the sequence; a fused token, once there is one, follows them
        index = None  # (B, n) original grid index of each current patch token
        fused_weight = None  # (B, 1, 1): total weight held by the fused token x[:, P + n]
        sizes = None  # (B, n): original patches each patch token holds, once a stage has merged
        slot = None  # (B, N): position among the current patch tokens of the token holding each patch
        kept, scores, merged_into = [], [], []
        stage_at = self._stage_at()
        for i in range(host.depth):
            stage = stage_at.get(i)
            if stage is not None:
                predictor = self.predictors[stage]
                tokens = x if fused_weight is None else x[:, : P + n]  # without the fused token
                score = None
                if return_scores:
                    log_p = predictor(tokens, num_prefix_tokens=P)[..., 0]  # (B, n)
                    score = log_p
                    full = log_p.new_full((B, N), float("nan"))
                    src = index if index is not None else torch.arange(N, device=x.device).expand(B, N)
                    scores.append(full.scatter(1, src, log_p))
                elif self.fuse_dropped or self.merge_dropped:
                    score = predictor.keep_score(tokens, P)  # logit of p(keep)
                if self.merge_dropped:
                    kept_tokens, keep, sizes, went = self._merge_pruned(tokens, score, counts[stage], sizes)
                    if return_scores:
                        slot = _follow_merges(slot, keep, went, B, N)
                elif score is not None:
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
                if slot is not None:
                    merged_into.append(index.gather(1, slot))
            x = host.block(i, x, sizes=_with_prefix(sizes, P))
        return host.norm(x if fused_weight is None else x[:, : P + n]), kept, scores, merged_into

    # -- merging dropped tokens ----------------------------------------------------------------

    def _merge_masked(self, x, sizes, previous, decision) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """Training path: the newly dropped patch tokens of x (B, P + N, C) merged into the kept ones, the
        sizes (B, N) after the merge, and (where each token went, whether it took part), each (B, N)."""
        P = self.num_prefix_tokens
        B, N = x.shape[0], x.shape[1] - P
        if sizes is None:
            sizes = x.new_ones(B, N, dtype=torch.float32)
        moved = previous.squeeze(-1).detach()  # kept + newly dropped (`carry_held` thresholds it)
        patches, sizes, target = merge_masked(x[:, P:], sizes, decision.squeeze(-1), (previous - decision).squeeze(-1))
        return torch.cat([x[:, :P], patches], dim=1), sizes, (target, moved)

    def _merge_pruned(self, tokens, score, num_keep, sizes):
        """Inference path: keep the `num_keep` best-scoring patch tokens of tokens (B, P + n, C) and merge
        the others into them.

        Returns:
            (prefix + merged kept tokens (B, P + k, C), kept positions (B, k), their sizes (B, k) or
            None before anything was merged, (dropped positions (B, n - k), position in the kept
            tokens each went to (B, n - k)) or None when nothing was dropped).
        """
        P = self.num_prefix_tokens
        if num_keep >= tokens.shape[1] - P:  # nothing dropped (keep ratio 1.0): no merge, no sizes
            kept_tokens, keep = select_tokens(tokens, score, num_keep, P)
            return kept_tokens, keep, None if sizes is None else sizes.gather(1, keep), None
        keep, drop = split_positions(score, num_keep)
        merged, sizes, target = merge_into_kept(tokens[:, P:], sizes, keep, drop)
        return torch.cat([tokens[:, :P], merged], dim=1), keep, sizes, (drop, target)


def _with_prefix(sizes: Optional[torch.Tensor], num_prefix_tokens: int) -> Optional[torch.Tensor]:
    """Sizes of the patch tokens (B, n) -> of the whole sequence (B, P + n): prefix tokens hold themselves."""
    if sizes is None:
        return None
    return torch.cat([sizes.new_ones(sizes.shape[0], num_prefix_tokens), sizes], dim=1)


def _follow_merges(slot, keep, went, B: int, N: int) -> torch.Tensor:
    """Where every original patch lives after a stage: its holder's position among the kept tokens, (B, N).

    Args:
        slot: (B, N) positions among the tokens before the stage (None: the original grid, 0..N-1).
        keep: (B, k) positions of the kept tokens; `went`: (dropped positions, their targets) or None.
    """
    if slot is None:
        slot = torch.arange(N, device=keep.device).expand(B, N)
    k = keep.shape[1]
    moved = keep.new_empty(B, k + (0 if went is None else went[0].shape[1]))  # (B, n): new position of each
    moved.scatter_(1, keep, torch.arange(k, device=keep.device).expand(B, k))
    if went is not None:
        moved.scatter_(1, went[0], went[1])
    return moved.gather(1, slot)
