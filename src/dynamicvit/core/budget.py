"""Calibrating the per-image budget, and recording what it kept.

Stage s of the per-image budget keeps, in each image, the patch tokens whose keep probability reaches
a threshold t_s (at least `min_keep`, never more than the image still has). `calibrate_thresholds`
chooses t_1, t_2, ... in turn on a sample of images so that the mean kept count at stage s equals the
fixed budget's int(N * rho^s): the mean MACs per image then equal the fixed budget's, while an easy
image may keep fewer tokens and a hard one more. Stage s is calibrated with the thresholds of the
stages before it in place, since what it sees depends on what they kept.

`CountRecorder` wraps a model so that evaluation also records each image's kept counts (for the
MACs per image, `runtime.flops.PerImageMacs`).
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Iterable, Optional, Sequence

import torch
import torch.nn as nn

from ..errors import ConfigError
from .packed import stage_scores
from .settings import keep_counts

_logger = logging.getLogger(__name__)


@dataclass
class Calibration:
    """The thresholds found for one keep ratio, and what they keep on the calibration sample.

    Attributes:
        keep_ratio: rho.
        thresholds: t_s on p(keep), one per stage (0: keep every token).
        target_counts: the fixed budget's int(N * rho^s), which the mean count is matched to.
        mean_counts: the mean kept count per stage on the sample.
        min_counts, max_counts: the fewest and most tokens an image of the sample kept per stage.
        clamped: per stage, the fraction of images that scored fewer than `min_keep` tokens above the
            threshold and were raised to the minimum.
        images: images in the sample.
    """

    keep_ratio: float
    thresholds: tuple[float, ...]
    target_counts: tuple[int, ...]
    mean_counts: tuple[float, ...]
    min_counts: tuple[int, ...]
    max_counts: tuple[int, ...]
    clamped: tuple[float, ...]
    images: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def calibrate_thresholds(
    model: nn.Module,
    batches: Iterable,
    keep_ratios: Sequence[float],
    *,
    min_keep: Optional[int] = None,
    progress: bool = False,
) -> list[Calibration]:
    """Choose per-image thresholds for each keep ratio and store them in the model (`set_thresholds`).

    The model's budget is left as it was: switch with `model.set_keep_ratio(rho, budget="per-image")`.

    Args:
        model: a DynamicViT (its device and dtype are used).
        batches: image batches (B, C, H, W) normalized for the model, or (images, labels, ...) tuples
            as a DataLoader yields them. Read once per stage and keep ratio, so it must be re-iterable
            (a list or a DataLoader, not a generator).
        keep_ratios: the rho values to calibrate.
        min_keep: the fewest patch tokens an image keeps per stage (default: the model's, 1 when new).
        progress: log each stage's result.

    Returns:
        One `Calibration` per keep ratio.
    """
    if iter(batches) is batches:
        raise ConfigError("calibration reads the images once per stage: pass a list of batches or a DataLoader, not a generator")
    if getattr(model, "family", None) not in ("vit", "lvvit"):
        raise ConfigError(f"per-image budgets are for token models (ViT, DeiT, LV-ViT), not {type(model).__name__}")
    if min_keep is not None:
        model.set_thresholds({}, min_keep=min_keep)
    was_training = model.training
    model.eval()
    try:
        results = [_calibrate(model, batches, float(rho), progress) for rho in keep_ratios]
    finally:
        model.train(was_training)
    model.set_thresholds({c.keep_ratio: c.thresholds for c in results})
    return results


def _calibrate(model: nn.Module, batches: Iterable, rho: float, progress: bool) -> Calibration:
    N, S, least = model.num_patches, len(model.prune_locs), model.config.min_keep
    targets = keep_counts(N, rho, S)
    if targets[-1] < 1:
        model._config_at(rho, budget="fixed")  # the clear error for a ratio that keeps no token
    thresholds, stats = [], []
    for s in range(S):
        scores, counts = _sample_scores(model, batches, thresholds, s)
        t, kept, clamped = choose_threshold(scores, counts, targets[s], least)
        thresholds.append(t)
        stats.append((kept, clamped))
        if progress:
            _logger.info("keep ratio %g, stage %d: threshold %.6g keeps %.2f tokens on average (target %d)",
                         rho, s + 1, t, kept.double().mean().item(), targets[s])
    clamped = tuple(float(c.double().mean()) for _, c in stats)
    for s, frac in enumerate(clamped):
        if frac > 0:
            _logger.warning("keep ratio %g, stage %d: %.1f%% of the calibration images score fewer than min_keep=%d "
                            "tokens above the threshold and are raised to it", rho, s + 1, 100 * frac, least)
    return Calibration(
        keep_ratio=rho, thresholds=tuple(thresholds), target_counts=targets,
        mean_counts=tuple(float(k.double().mean()) for k, _ in stats),
        min_counts=tuple(int(k.min()) for k, _ in stats), max_counts=tuple(int(k.max()) for k, _ in stats),
        clamped=clamped, images=int(stats[0][0].numel()),
    )


def _sample_scores(model, batches, thresholds, stage) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep margins of `stage` over the sample, (M, N) float64 with -inf where a token is absent, and
    the patch tokens each image holds there (M,)."""
    param = next(model.parameters())
    rows, counts = [], []
    for batch in batches:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        sc = stage_scores(model, images.to(param.device, param.dtype), thresholds, stage)
        B = sc.counts.shape[0]
        full = torch.full((B, model.num_patches), -math.inf, dtype=torch.float64, device=sc.margin.device)
        rows.append(full.index_put_((sc.image, sc.pos), sc.margin.double()).cpu())
        counts.append(sc.counts.cpu())
    if not rows:
        raise ConfigError("no images to calibrate on: the batches were empty")
    return torch.cat(rows), torch.cat(counts)


def choose_threshold(
    scores: torch.Tensor, counts: torch.Tensor, target: int, min_keep: int
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """The threshold on p(keep) whose mean kept count over the sample is closest to `target`.

    Args:
        scores: keep margins (l_keep - l_drop), (M, n), -inf where an image holds no token.
        counts: tokens each image holds, (M,).
        target: the mean count wanted.
        min_keep: the fewest an image keeps.

    Returns:
        (threshold in [0, 1), each image's kept count (M,), whether it was raised to the minimum (M,)).
        The threshold lies halfway (in logits) between the last score kept and the next, so tiny
        numerical differences at inference do not move it across a score.
    """
    least = counts.clamp(max=min_keep)

    def kept_at(theta: float) -> tuple[torch.Tensor, torch.Tensor]:
        above = (scores >= theta).sum(1)
        return torch.maximum(above, least).minimum(counts), above < least

    if target >= counts.double().mean():  # keep everything
        return 0.0, counts.clone(), torch.zeros_like(counts, dtype=torch.bool)
    values = scores[torch.isfinite(scores)].unique().flip(0)  # descending
    lo, hi = 0, len(values) - 1  # the smallest j with mean kept >= target
    while lo < hi:
        mid = (lo + hi) // 2
        if kept_at(float(values[mid]))[0].double().mean() >= target:
            hi = mid
        else:
            lo = mid + 1
    j = lo
    if j > 0:
        above, below = (kept_at(float(values[i]))[0].double().mean().item() for i in (j, j - 1))
        j = j if above - target <= target - below else j - 1
    theta = float(values[j] + values[j + 1]) / 2 if j + 1 < len(values) else float(values[j]) - 1.0
    kept, clamped = kept_at(theta)
    return _probability(theta), kept, clamped


def _probability(theta: float) -> float:
    """sigmoid(theta) in float64, inside [0, 1): a margin beyond ~36.7 rounds to 1.0 and is kept just below."""
    t = 1.0 / (1.0 + math.exp(-theta)) if theta > -700 else 0.0
    if t >= 1.0:
        _logger.warning("a calibrated threshold (margin %.1f) is beyond float64 precision; using the largest below 1", theta)
        t = math.nextafter(1.0, 0.0)
    return t


class CountRecorder(nn.Module):
    """A DynamicViT whose forward returns the inference path's logits and records the patch tokens
    each image kept per stage (`counts()`, (M, S)), under either budget. For evaluation loops that
    want the MACs per image."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self._counts: list[torch.Tensor] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model.forward_pruned(images)
        counts = out.kept_counts
        if counts is None:  # fixed budget: the same counts for every image
            counts = torch.tensor(self.model.keep_counts()).expand(images.shape[0], -1)
        self._counts.append(counts.detach().cpu())
        return out.logits

    def last(self) -> torch.Tensor:
        """The counts of the last batch, (B, S)."""
        return self._counts[-1]

    def counts(self) -> torch.Tensor:
        """The counts recorded so far, (M, S)."""
        if not self._counts:
            return torch.zeros(0, len(self.model.prune_locs), dtype=torch.long)
        return torch.cat(self._counts)

    @property
    def pretrained_cfg(self) -> dict:
        return self.model.pretrained_cfg
