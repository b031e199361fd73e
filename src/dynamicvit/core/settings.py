"""Sparsification settings, validated once: where to prune, how many tokens (or positions) each stage
keeps (a fixed count, or per image above calibrated thresholds), what happens to the dropped ones, and
the range of keep ratios an elastic model is trained for.

`SparsityConfig` is a DynamicViT's (token hosts), `SpatialConfig` a DynamicSpatial's (ConvNeXt, Swin),
`KeepRatioSampler` the keep ratios elastic training draws from.
"""
from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

from ..errors import ConfigError

# How many patch tokens a stage keeps: "fixed" keeps int(N * rho^s) in every image (the paper's rule);
# "per-image" keeps those scored above a calibrated threshold, so the count follows the image.
BUDGETS = ("fixed", "per-image")
# Calibrated thresholds: per keep ratio, one threshold on p(keep) per stage.
ThresholdTable = Union[Mapping[float, Sequence[float]], Sequence[tuple[float, Sequence[float]]]]


# The paper's rho for DeiT: the keep ratio of a model built without one.
DEFAULT_KEEP_RATIO = 0.7


def default_prune_locs(depth: int, num_stages: int = 3) -> tuple[int, ...]:
    """Evenly spaced stages: (3, 6, 9) for 12 blocks, (4, 8, 12) for 16, (5, 10, 15) for 20."""
    if depth < num_stages + 1:
        raise ConfigError(
            f"a model with {depth} blocks is too shallow for {num_stages} pruning stages; "
            f"pass prune_locs explicitly (block indices in 1..{depth - 1})"
        )
    return tuple(int(depth * s / (num_stages + 1)) for s in range(1, num_stages + 1))


def keep_counts(num_patches: int, keep_ratio: float, num_stages: int) -> tuple[int, ...]:
    """Patch tokens kept after each stage: int(N * rho ** s), as the reference computes it, and at least
    one: at low budgets (rho = 0.25 on a 7 x 7 grid gives int(0.77) at stage 3) the last stages keep a
    single patch token rather than none, which the heads that pool patch tokens (LV-ViT's aux head,
    average pooling) and merged tokens need."""
    return tuple(max(1, int(num_patches * keep_ratio ** s)) for s in range(1, num_stages + 1))


@dataclass(frozen=True)
class SparsityConfig:
    """How a DynamicViT prunes tokens.

    Attributes:
        keep_ratio: rho; stage s keeps int(N * rho ** s) of the N original patch tokens. 1.0 keeps all.
        prune_locs: 0-indexed blocks before which a prediction module prunes, strictly increasing.
        fuse_dropped: fold the tokens each stage drops into one extra token (their average weighted
            by the predictor's keep probability) that the remaining blocks process like a kept one,
            instead of discarding them. False is the paper's method.
        merge_dropped: add each token a stage drops into its most similar kept token (cosine
            similarity of the features) as a size-weighted average; the sizes are carried through
            the later stages and attention is proportional to them (log size as a bias on each
            key). Excludes `fuse_dropped`: once every dropped token lives on in a kept one, nothing
            is left to fold.
        budget: "fixed" (int(N * rho^s) tokens per stage in every image) or "per-image" (stage s keeps
            the tokens whose p(keep) reaches the threshold calibrated for this keep ratio, at least
            `min_keep` and never more than the image still has).
        thresholds: calibrated per-image thresholds, ((keep ratio, (t_1, ..., t_S)), ...) sorted by
            ratio; t_s in [0, 1), 0 keeps every token. Chosen so that the mean kept count over a
            sample equals the fixed budget's (`dynamicvit.core.budget.calibrate_thresholds`).
        min_keep: the fewest patch tokens an image keeps at any stage under the per-image budget.
    """

    keep_ratio: float = 0.7
    prune_locs: tuple[int, ...] = (3, 6, 9)
    fuse_dropped: bool = False
    merge_dropped: bool = False
    budget: str = "fixed"
    thresholds: tuple[tuple[float, tuple[float, ...]], ...] = ()
    min_keep: int = 1

    @classmethod
    def create(
        cls,
        keep_ratio: float,
        prune_locs: Optional[Sequence[int]],
        depth: int,
        num_patches: int,
        fuse_dropped: bool = False,
        merge_dropped: bool = False,
        budget: str = "fixed",
        thresholds: Optional[ThresholdTable] = None,
        min_keep: int = 1,
    ) -> "SparsityConfig":
        """Validate the settings against a model of `depth` blocks and `num_patches` patch tokens."""
        locs = default_prune_locs(depth) if prune_locs is None else _as_locs(prune_locs)
        for name, value in (("fuse_dropped", fuse_dropped), ("merge_dropped", merge_dropped)):
            if not isinstance(value, bool):
                raise ConfigError(f"{name} must be True or False, got {value!r}")
        if fuse_dropped and merge_dropped:
            raise ConfigError(
                "fuse_dropped and merge_dropped are two homes for the dropped tokens (one fused token, or the most "
                "similar kept token); choose one"
            )
        cfg = cls(keep_ratio=_as_ratio(keep_ratio), prune_locs=locs, fuse_dropped=fuse_dropped, merge_dropped=merge_dropped,
                  budget=budget, thresholds=_as_table(thresholds or (), len(locs)), min_keep=min_keep)
        cfg.validate(depth, num_patches)
        return cfg

    @property
    def num_stages(self) -> int:
        return len(self.prune_locs)

    def keep_counts(self, num_patches: int) -> tuple[int, ...]:
        return keep_counts(num_patches, self.keep_ratio, self.num_stages)

    def replace(self, **changes) -> "SparsityConfig":
        return dataclasses.replace(self, **changes)

    def thresholds_at(self, keep_ratio: float) -> Optional[tuple[float, ...]]:
        """The per-stage thresholds calibrated for `keep_ratio`, or None."""
        return next((t for r, t in self.thresholds if abs(r - keep_ratio) < 1e-9), None)

    def stage_thresholds(self) -> tuple[float, ...]:
        """The thresholds the per-image budget uses at this keep ratio; a clear error when none were calibrated."""
        found = self.thresholds_at(self.keep_ratio)
        if found is None:
            have = ", ".join(f"{r:g}" for r, _ in self.thresholds) or "none"
            raise ConfigError(
                f"the per-image budget has no calibrated thresholds for keep ratio {self.keep_ratio:g} (calibrated: "
                f"{have}); run `dynamicvit calibrate --checkpoint IN --dataset DATA --keep-ratio {self.keep_ratio:g} "
                "--output OUT` (or dynamicvit.calibrate_thresholds), or use budget='fixed'"
            )
        return found

    def validate(self, depth: int, num_patches: int) -> None:
        _check_budget(self, num_patches)
        _as_ratio(self.keep_ratio)
        locs = _as_locs(self.prune_locs)
        bad = [i for i in locs if not 0 < i < depth]
        if bad:
            raise ConfigError(
                f"prune_locs {list(locs)} has block indices {bad} out of range: the model has {depth} "
                f"blocks, so each location must be in 1..{depth - 1} (pruning happens before that block)"
            )


def check_predictor_width(width, embed_dim: Optional[int] = None) -> Optional[int]:
    """The hidden width of the prediction modules, checked: None (or the model's width) is the paper's
    layout, returned as None; otherwise a multiple of 4 from 4 to the model's width `embed_dim` (not
    checked when None: settings checked before the model is built)."""
    if width is None:
        return None
    if isinstance(width, bool) or not isinstance(width, int) or width < 4 or width % 4 or width > (embed_dim or width):
        up_to = f" to the model's width {embed_dim}" if embed_dim else ""
        raise ConfigError(
            f"predictor_width must be a multiple of 4 from 4{up_to} (the prediction modules map it to width/2, "
            f"width/4 and 2), got {width!r}; leave it unset for the paper's layout"
        )
    return None if width == embed_dim else width


def _check_budget(cfg: SparsityConfig, num_patches: int) -> None:
    if cfg.budget not in BUDGETS:
        raise ConfigError(f"budget must be one of {', '.join(BUDGETS)}, got {cfg.budget!r}")
    m = cfg.min_keep
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ConfigError(f"min_keep must be a whole number of tokens, at least 1, got {m!r}")
    if m > num_patches:
        raise ConfigError(
            f"min_keep {m} is larger than the sequence ({num_patches} patch tokens); use at most {num_patches}"
        )
    if cfg.budget == "per-image":
        cfg.stage_thresholds()


def _as_table(table: ThresholdTable, num_stages: int) -> tuple[tuple[float, tuple[float, ...]], ...]:
    """Calibrated thresholds as sorted ((keep ratio, per-stage thresholds), ...), each checked."""
    items = table.items() if isinstance(table, Mapping) else table
    out = {}
    for ratio, values in items:
        r = _as_ratio(float(ratio) if isinstance(ratio, str) else ratio)
        try:
            ts = tuple(float(t) for t in values)
        except (TypeError, ValueError):
            raise ConfigError(f"thresholds for keep ratio {r:g} must be numbers, got {values!r}") from None
        if len(ts) != num_stages:
            raise ConfigError(
                f"thresholds for keep ratio {r:g} give {len(ts)} values for {num_stages} stages; give one per stage"
            )
        bad = [t for t in ts if not 0.0 <= t < 1.0]  # NaN fails too
        if bad:
            raise ConfigError(
                f"threshold(s) {bad} for keep ratio {r:g} are outside (0, 1): a threshold is a keep probability "
                "(0 keeps every token, 1 would keep none); recalibrate with `dynamicvit calibrate`"
            )
        out[r] = ts
    return tuple(sorted(out.items()))


def _as_ratio(keep_ratio) -> float:
    if isinstance(keep_ratio, bool) or _is_numpy_bool(keep_ratio):  # True would read as 1.0
        raise ConfigError(f"keep_ratio must be a number in (0, 1], got {keep_ratio!r}")
    try:
        r = float(keep_ratio)
    except (TypeError, ValueError):
        raise ConfigError(f"keep_ratio must be a number in (0, 1], got {keep_ratio!r}") from None
    if not (0.0 < r <= 1.0) or math.isnan(r):
        raise ConfigError(
            f"keep_ratio must be in (0, 1] (the fraction of tokens each stage keeps), got {keep_ratio!r}"
        )
    return r


def _as_locs(prune_locs) -> tuple[int, ...]:
    if isinstance(prune_locs, (str, bytes)) or any(isinstance(i, bool) or _is_numpy_bool(i) for i in _items(prune_locs)):
        raise ConfigError(f"prune_locs must be a sequence of block indices (integers), got {prune_locs!r}")
    try:
        locs = tuple(int(i) for i in prune_locs)
        if any(int(i) != i for i in prune_locs):
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"prune_locs must be a sequence of block indices, got {prune_locs!r}") from None
    if not locs:
        raise ConfigError("prune_locs is empty: give at least one block index, e.g. (3, 6, 9)")
    if len(set(locs)) != len(locs):
        raise ConfigError(f"prune_locs {list(locs)} repeats a block index; each stage needs its own block")
    if list(locs) != sorted(locs):
        raise ConfigError(
            f"prune_locs {list(locs)} is not sorted; stages prune in order, e.g. {sorted(locs)}"
        )
    return locs


def _items(value) -> tuple:
    try:
        return tuple(value)
    except TypeError:
        return ()


def _is_numpy_bool(value) -> bool:
    # numpy.bool_ (named numpy.bool in numpy 2), told apart without importing numpy here
    return type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool")


@dataclass(frozen=True)
class KeepRatioSampler:
    """The keep ratios elastic training draws from, one per step.

    Written `LO:HI` (a ratio drawn uniformly from the interval, e.g. `0.4:1.0`), `low:LO:HI` (drawn
    from the interval with a density that falls linearly from LO to zero at HI: the small ratios,
    the hardest, are trained about twice as often as under `LO:HI`; the middle of the range as often)
    or `A,B,C` (one of the listed ratios, each as likely). The paper's recipe trains at a single ratio
    (no sampler).

    Attributes:
        low, high: the smallest and largest ratio that can be drawn.
        values: the listed ratios; empty for an interval.
        shape: "uniform" or "low", how an interval is drawn from.
    """

    low: float
    high: float
    values: tuple[float, ...] = ()
    shape: str = "uniform"

    SHAPES = ("uniform", "low")

    @classmethod
    def parse(cls, spec) -> "KeepRatioSampler":
        """`"0.4:1.0"`, `"low:0.4:1.0"` or `"0.4,0.7,1.0"` (a list of numbers is accepted too)."""
        text = ",".join(str(v) for v in spec) if isinstance(spec, (list, tuple)) else str(spec).replace(" ", "")
        hint = ("write LO:HI (e.g. 0.4:1.0, a ratio drawn uniformly per step), low:LO:HI (small ratios drawn "
                "more often) or A,B,C (e.g. 0.4,0.7,1.0)")
        shape = "uniform"
        if text[:1].isalpha():
            shape, _, text = text.partition(":")
            if shape not in cls.SHAPES:
                raise ConfigError(f"keep_ratios {spec!r}: unknown distribution {shape!r} (one of {', '.join(cls.SHAPES)}); {hint}")
            if ":" not in text:
                raise ConfigError(f"keep_ratios {spec!r}: a distribution needs an interval LO:HI; {hint}")
        interval = ":" in text
        try:
            numbers = [float(v) for v in text.split(":" if interval else ",") if v]
        except ValueError:
            raise ConfigError(f"keep_ratios {spec!r} is not a range of keep ratios; {hint}") from None
        if not numbers or (interval and len(numbers) != 2):
            raise ConfigError(f"keep_ratios {spec!r} names no keep ratio range; {hint}")
        numbers = [_as_ratio(v) for v in numbers]
        if interval:
            if numbers[0] >= numbers[1]:
                raise ConfigError(f"keep_ratios {spec!r}: the interval is empty ({numbers[0]} >= {numbers[1]}); {hint}")
            return cls(numbers[0], numbers[1], shape=shape)
        values = tuple(sorted(set(numbers)))
        return cls(values[0], values[-1], values)

    @property
    def range(self) -> tuple[float, float]:
        return (self.low, self.high)

    def sample(self, rng: random.Random) -> float:
        """One keep ratio."""
        if self.values:
            return rng.choice(self.values)
        if self.shape == "low":
            return rng.triangular(self.low, self.high, self.low)
        return rng.uniform(self.low, self.high)

    def expected_fraction(self, stage: int) -> float:
        """E[rho^s] over the draws: the kept fraction of stage s (1-based) averaged over training."""
        s, lo, hi = stage, self.low, self.high
        if self.values:
            return sum(v**s for v in self.values) / len(self.values)
        if self.shape == "low":  # density 2 (hi - r) / (hi - lo)^2 on [lo, hi]
            d = hi - lo
            return 2 * (hi * (hi ** (s + 1) - lo ** (s + 1)) / (s + 1) - (hi ** (s + 2) - lo ** (s + 2)) / (s + 2)) / d**2
        return (hi ** (s + 1) - lo ** (s + 1)) / ((s + 1) * (hi - lo))

    def __str__(self) -> str:
        if self.values:
            return ",".join(f"{v:g}" for v in self.values)
        prefix = "" if self.shape == "uniform" else f"{self.shape}:"
        return f"{prefix}{self.low:g}:{self.high:g}"


RATIO_STEP = 0.2  # r_s = rho - 0.2 * s (the authors' schedule)


def default_stage_ratios(keep_ratio: float, num_stages: int) -> tuple[float, ...]:
    """The authors' per-stage keep ratios r = (rho, rho - 0.2, rho - 0.4, ...), rounded so 0.7 - 0.4 is 0.3."""
    return tuple(round(keep_ratio - RATIO_STEP * s, 6) for s in range(num_stages))


@dataclass(frozen=True)
class SpatialConfig:
    """How a DynamicSpatial sparsifies its third stage.

    Attributes:
        keep_ratio: rho, the first stage's keep ratio.
        prune_locs: block indices inside stage 3 (0-based) before which a predictor runs, increasing;
            blocks before the first are unchanged, every later block is adaptive.
        stage_ratios: r_s per predictor; stage s keeps int(N * r_s) positions. Not hierarchical.
        restart_streams: training path only. True: at every predictor both streams restart from the
            merged map, so the training path computes what inference computes for the same decisions.
            False: the authors' release, where the streams restart at the first predictor only and a
            position whose decision flips between predictors carries its other stream's stale value.
    """

    keep_ratio: float = 0.7
    prune_locs: tuple[int, ...] = (1, 2, 3)
    stage_ratios: tuple[float, ...] = (0.7, 0.5, 0.3)
    restart_streams: bool = True

    @classmethod
    def create(
        cls,
        keep_ratio: float,
        prune_locs: Sequence[int],
        depth: int,
        num_positions: int,
        stage_ratios: Optional[Sequence[float]] = None,
        restart_streams: bool = True,
    ) -> "SpatialConfig":
        """Validate the settings against a third stage of `depth` blocks and `num_positions` positions."""
        locs = _as_locs(prune_locs)
        rho = _as_ratio(keep_ratio)
        if stage_ratios is None:
            ratios = default_stage_ratios(rho, len(locs))
            if ratios[-1] <= 0:
                raise ConfigError(
                    f"keep_ratio {rho} gives stage ratios {list(ratios)} (rho - 0.2 per stage) for {len(locs)} "
                    f"predictors; use keep_ratio > {round(RATIO_STEP * (len(locs) - 1), 6)} or pass stage_ratios"
                )
        else:
            try:
                ratios = tuple(_as_ratio(r) for r in stage_ratios)
            except ConfigError as e:
                raise ConfigError(f"stage_ratios {list(stage_ratios)}: {e}") from None
            if len(ratios) != len(locs):
                raise ConfigError(
                    f"stage_ratios has {len(ratios)} values for {len(locs)} predictor locations {list(locs)}; "
                    "give one keep ratio per predictor"
                )
        cfg = cls(keep_ratio=rho, prune_locs=locs, stage_ratios=ratios, restart_streams=bool(restart_streams))
        cfg.validate(depth, num_positions)
        return cfg

    @property
    def num_stages(self) -> int:
        return len(self.prune_locs)

    def keep_counts(self, num_positions: int) -> tuple[int, ...]:
        """Positions on the full path after each predictor: int(N * r_s)."""
        return tuple(int(num_positions * r) for r in self.stage_ratios)

    def replace(self, **changes) -> "SpatialConfig":
        return dataclasses.replace(self, **changes)

    def validate(self, depth: int, num_positions: int) -> None:
        bad = [i for i in self.prune_locs if not 0 <= i < depth]
        if bad:
            raise ConfigError(
                f"prune_locs {list(self.prune_locs)} has block indices {bad} out of range: stage 3 has {depth} "
                f"blocks, so each location must be in 0..{depth - 1} (the predictor runs before that block)"
            )
        counts = self.keep_counts(num_positions)
        if min(counts) < 1:
            s = counts.index(min(counts))
            raise ConfigError(
                f"stage ratio {self.stage_ratios[s]} keeps zero of the {num_positions} positions of the stage-3 map "
                f"at predictor {s + 1}; use a larger keep ratio or larger images"
            )
