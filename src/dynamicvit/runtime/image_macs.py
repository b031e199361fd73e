"""MACs per image under the per-image budget, where each image keeps its own number of tokens.

An image's MACs depend only on its kept counts k_1..k_S (k_0 = N):

    MACs(k) = embed + stage 0 + head(k_S)
            + sum_s [ c_s + a_s k_{s-1} + phi_s k_{s-1} [k_s < k_{s-1}] + u_s L_s + v_s L_s^2 ],

L_s = P + k_s + f_s the sequence stage s's blocks see (f_s = 1 with `fuse_dropped` once the image has
dropped a token), c_s + a_s n the prediction module on n patch tokens, phi_s n the folding of dropped
tokens into the fused token (only at a stage that drops), u_s L + v_s L^2 the blocks (linear layers,
both attention products), head(n) affine (LV-ViT's aux head runs on every kept token). `PerImageMacs.of`
finds the coefficients by counting fixed-budget twins of the model with `count_macs` at four keep
ratios (three fit them, the fourth must come out exact), so every operator the counter sees is in.
The MACs of an image are those of that image run alone (a batch pads the fused-token folding).
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from ..core.settings import keep_counts
from ..errors import ConfigError, DynamicViTError
from .flops import MacsReport, count_macs

CANDIDATE_RATIOS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)


@dataclass(frozen=True)
class PerImageMacs:
    """MACs of one image as a function of its kept counts (see the module docstring).

    Attributes:
        base: embed + the blocks before the first stage.
        predictor: (c_s, a_s, phi_s) per stage.
        blocks: (u_s, v_s) per stage.
        head: (h_0, h_1): head(n) = h_0 + h_1 n.
        num_patches, num_prefix_tokens, fused: N, P and whether dropped tokens are fused.
    """

    base: Fraction
    predictor: tuple[tuple[Fraction, Fraction, Fraction], ...]
    blocks: tuple[tuple[Fraction, Fraction], ...]
    head: tuple[Fraction, Fraction]
    num_patches: int
    num_prefix_tokens: int
    fused: bool

    @classmethod
    def of(cls, model: nn.Module) -> "PerImageMacs":
        """Derive the coefficients of a DynamicViT from fixed-budget counts (the model is not changed)."""
        N, S = model.num_patches, len(model.prune_locs)
        ratios = _ratios(N, S)
        reports = {r: count_macs(model.at_keep_ratio(r, budget="fixed")) for r in (1.0, *ratios)}
        formula = _fit(reports, N, model.num_prefix_tokens, model.fuse_dropped, ratios[:2])
        for r in ratios[2:]:
            counts = keep_counts(N, r, S)
            if formula(counts) != reports[r].total:
                raise DynamicViTError(
                    f"the MACs of {type(model.backbone).__name__} are not a per-stage quadratic in the token count "
                    f"(keep ratio {r}: {formula(counts)} predicted, {reports[r].total} counted); per-image MACs cannot "
                    "be derived for this model"
                )
        return formula

    def __call__(self, counts: Sequence[int]) -> int:
        """MACs of one image that kept `counts` (k_1..k_S) patch tokens."""
        N, P = self.num_patches, self.num_prefix_tokens
        total, previous = self.base, N
        for (c, a, phi), (u, v), k in zip(self.predictor, self.blocks, counts):
            k = int(k)
            L = P + k + (self.fused and k < N)
            total += c + a * previous + (phi * previous if k < previous else 0) + u * L + v * L * L
            previous = k
        return int(total + self.head[0] + self.head[1] * previous)

    def per_image(self, counts: torch.Tensor) -> np.ndarray:
        """MACs of each image, (M,) int64, from its counts (M, S)."""
        rows = [tuple(r) for r in counts.tolist()]
        cache = {r: self(r) for r in set(rows)}
        return np.array([cache[r] for r in rows], dtype=np.int64)


def _ratios(N: int, S: int) -> list[float]:
    """Three keep ratios whose counts differ from N and from each other at every stage (and keep >= 1)."""
    chosen, seen = [], [keep_counts(N, 1.0, S)]
    for r in CANDIDATE_RATIOS:
        counts = keep_counts(N, r, S)
        if counts[-1] >= 1 and all(all(c != o for c, o in zip(counts, other)) for other in seen):
            chosen.append(r)
            seen.append(counts)
        if len(chosen) == 3:
            return chosen
    raise ConfigError(f"a model with {N} patch tokens and {S} stages is too small to derive per-image MACs from")


def _fit(reports: dict[float, MacsReport], N: int, P: int, fused: bool, ratios: Sequence[float]) -> PerImageMacs:
    """Coefficients from the dense-count report (ratio 1.0) and two pruned ones."""
    full, a_r, b_r = reports[1.0], reports[ratios[0]], reports[ratios[1]]
    stages = lambda rep: rep.stages[2:-1]  # noqa: E731 - [embed, stage0, stage1..S, head]
    base = Fraction(full.stages[0]["macs"] + full.stages[1]["macs"])
    predictor, blocks = [], []
    for s, (f, a, b) in enumerate(zip(stages(full), stages(a_r), stages(b_r))):
        qf, qa, qb = (Fraction(x["predictor_macs"]) for x in (f, a, b))
        if s == 0:  # always on N tokens: a constant, and the fold when it drops
            predictor.append((qf, Fraction(0), (qa - qf) / N))
        else:
            na, nb = a_r.keep_counts[s - 1], b_r.keep_counts[s - 1]
            slope = (qa - qb) / (na - nb)  # a + phi: these stages drop
            c = qa - slope * na
            a_s = (qf - c) / N
            predictor.append((c, a_s, slope - a_s))
        (lf, mf), (la, ma) = ((x["tokens"], Fraction(x["macs"] - x["predictor_macs"])) for x in (f, a))
        v = (mf / lf - ma / la) / (lf - la)
        blocks.append((mf / lf - v * lf, v))
    hf, ha = Fraction(full.stages[-1]["macs"]), Fraction(a_r.stages[-1]["macs"])
    h1 = (hf - ha) / (N - a_r.keep_counts[-1])
    return PerImageMacs(base, tuple(predictor), tuple(blocks), (hf - h1 * N, h1), N, P, fused)


def macs_summary(macs: np.ndarray, bins: int = 10) -> dict:
    """Mean, spread and histogram of MACs per image, in GMACs."""
    g = macs.astype(np.float64) / 1e9
    counts, edges = np.histogram(g, bins=bins)
    return {
        "images": int(g.size),
        "mean_gmacs": float(g.mean()),
        "std_gmacs": float(g.std()),
        "min_gmacs": float(g.min()),
        "max_gmacs": float(g.max()),
        "histogram": {"counts": counts.tolist(), "edges_gmacs": edges.tolist()},
    }
