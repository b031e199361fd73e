"""The DynamicViT training objective: pure loss functions plus one module that weighs them.

L = CE(student, labels)
  + ratio_weight   * mean_s mean_b (mean_i D_{b,i,s} - rho^s)^2
  + distill_weight * KL(teacher || student)               (batchmean, T = 1)
  + token_weight   * token distillation                   (over tokens kept at the end)

With the per-image budget (`budget="per-image"`) the ratio term pulls the batch's mean kept fraction
toward rho^s instead of each image's: (mean_b mean_i D_{b,i,s} - rho^s)^2, so an easy image may keep
fewer tokens and a hard one more, as long as the batch keeps rho^s on average.

Token distillation follows the host (`Host.token_distill`): for ViTs the MSE between the student's
and the teacher's final patch tokens; for LV-ViT the KL divergence between their per-token aux-head
class distributions. For LV-ViT the reference trains the class head alone (`DynamicViTOutput.
class_logits`) with CE and the logit KL; the combined prediction is what inference reports.
A token that merged others holds several patches; with `token_target="held"` its target is the mean of
the teacher's tokens over the patches it holds (`held_targets`) instead of the teacher's token at its
own position.

Reference weights: 2.0 / 0.5 / 0.5 for DeiT and LV-ViT alike. Shapes: B batch, N patch tokens, C width,
K classes.

Hierarchical models (`DynamicSpatial`, docs/spatial.md) use `DynamicSpatialLoss`:
the ratio term pulls predictor s toward its own r_s (decisions not hierarchical), weight 10.0, and the
feature term compares the final normalized maps over all positions.
Every term is computed in fp32, whatever the autocast dtype of its inputs.
"""
from __future__ import annotations

from typing import Literal, Optional, Sequence

RatioOver = Literal["image", "batch"]
BUDGET_RATIO: dict[str, RatioOver] = {"fixed": "image", "per-image": "batch"}  # what the ratio term averages

import torch
import torch.nn as nn
import torch.nn.functional as F


def ratio_loss(decisions: Sequence[torch.Tensor], keep_ratio: float, over: RatioOver = "image") -> torch.Tensor:
    """Pull the fraction of kept tokens of stage s (1-based) toward keep_ratio ** s.

    Args:
        decisions: per-stage keep decisions, each (B, N), 1 = kept (hierarchical: a token dropped
            at stage s is 0 in every later stage).
        keep_ratio: rho.
        over: "image": every image's fraction is pulled (the paper, the fixed budget); "batch": the
            batch's mean fraction is (the per-image budget).

    Returns:
        mean over stages of mean_b (mean_i D_{b,i,s} - rho^s)^2 ("image") or of
        (mean_b mean_i D_{b,i,s} - rho^s)^2 ("batch"), a scalar.
    """
    return stage_ratio_loss(decisions, [keep_ratio**s for s in range(1, len(decisions) + 1)], over)


def stage_ratio_loss(decisions: Sequence[torch.Tensor], targets: Sequence[float], over: RatioOver = "image") -> torch.Tensor:
    """Pull the fraction of kept tokens (positions) of each stage toward its own target.

    Args:
        decisions: per-stage keep decisions, each (B, N) (or (B, H, W)), 1 = kept.
        targets: the target fraction per stage (rho^s for ViTs, r_s for hierarchical models).
        over: "image" (each image's fraction) or "batch" (the batch's mean fraction), as in `ratio_loss`.

    Returns:
        mean over stages of mean_b (mean_i D_{b,i,s} - target_s)^2 (or the batch form), a scalar.
    """
    if over not in ("image", "batch"):
        raise ValueError(f"over must be 'image' or 'batch', got {over!r}")
    if not decisions:
        raise ValueError("the ratio loss needs at least one stage of decisions")
    if len(targets) != len(decisions):
        raise ValueError(f"{len(decisions)} stages of decisions but {len(targets)} target ratios")
    terms = []
    for d, target in zip(decisions, targets):
        realized = d.float().flatten(1).mean(dim=1)  # (B,)
        if over == "batch":
            realized = realized.mean()
        terms.append(((realized - target) ** 2).mean())
    return torch.stack(terms).mean()


def kl_distill(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the class distributions, summed over classes, averaged over the batch.

    Args:
        student_logits: (B, K).
        teacher_logits: (B, K); no gradient flows into them.
    """
    return F.kl_div(
        F.log_softmax(student_logits.float(), dim=-1),
        F.log_softmax(teacher_logits.detach().float(), dim=-1),
        reduction="batchmean",
        log_target=True,
    )


def token_distill(
    student_tokens: torch.Tensor, teacher_tokens: torch.Tensor, mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Mean squared error between the student's and the teacher's patch tokens where the mask is 1.

    Args:
        student_tokens: final normed patch tokens of the student, (B, N, C).
        teacher_tokens: the teacher's, (B, N, C); no gradient flows into them.
        mask: final keep decision, (B, N); None compares every token.

    Returns:
        The MSE averaged over kept tokens and channels; 0 (still differentiable) if no token survives.
    """
    s = student_tokens.float()
    t = teacher_tokens.detach().float()
    if mask is None:
        return F.mse_loss(s, t)
    keep = mask.detach() > 0.5  # (B, N)
    if not bool(keep.any()):
        return s.sum() * 0.0
    return F.mse_loss(s[keep], t[keep])  # (kept, C)


def token_kl_distill(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """KL(teacher || student) of per-token class distributions, averaged over the tokens where the mask is 1.

    Args:
        student_logits: per-token logits of the student (LV-ViT: aux head), (B, N, K).
        teacher_logits: the teacher's, (B, N, K); no gradient flows into them.
        mask: final keep decision, (B, N); None compares every token.

    Returns:
        The KL summed over classes and averaged over kept tokens; 0 (still differentiable) if no token survives.
    """
    s = student_logits.float()
    t = teacher_logits.detach().float()
    if mask is not None:
        keep = mask.detach() > 0.5  # (B, N)
        if not bool(keep.any()):
            return s.sum() * 0.0
        s, t = s[keep], t[keep]  # (kept, K)
    return kl_distill(s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]))


TOKEN_DISTILL = {"mse": token_distill, "kl": token_kl_distill}
TOKEN_TARGETS = ("position", "held")


def held_targets(held: torch.Tensor, teacher_tokens: torch.Tensor) -> torch.Tensor:
    """The teacher's per-token targets averaged over the original patches each student token holds.

    Args:
        held: (B, N, N), held[b, j, o] = 1 when token j holds patch o (`DynamicViTOutput.held`).
        teacher_tokens: (B, N, C).

    Returns:
        (B, N, C): row j is the mean of the teacher's tokens o that token j holds (its own when it
        holds only itself; rows of dropped tokens are not compared).
    """
    held = held.float()
    total = held.sum(-1, keepdim=True).clamp_min(1.0)
    return torch.bmm(held, teacher_tokens.detach().float()) / total


def classification_loss(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy against class indices (with label smoothing) or against soft targets.

    Args:
        logits: (B, K).
        target: class indices (B,), or soft targets (B, K) as made by mixup/cutmix; these already
            hold their label smoothing, so `smoothing` is not applied to them.
        smoothing: label smoothing for class-index targets.
    """
    logits = logits.float()
    if target.ndim == logits.ndim:
        return torch.sum(-target.float() * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return F.cross_entropy(logits, target, label_smoothing=smoothing)


class DynamicViTLoss(nn.Module):
    """The weighted DynamicViT objective.

    Call it with the student's training output (`DynamicViTOutput`), the targets and the teacher's
    logits and per-token targets (`train.teacher_targets`); it returns the total and each term
    (detached, for logging). `token_distill` is the host's (`Host.token_distill`): "mse" or "kl".
    Without teacher outputs the distillation terms are left out. `budget` is the budget the model
    is trained for: "fixed" pulls every image to rho^s, "per-image" the batch's mean (see the module doc).
    """

    def __init__(
        self,
        keep_ratio: float,
        ratio_weight: float = 2.0,
        distill_weight: float = 0.5,
        token_weight: float = 0.5,
        smoothing: float = 0.1,
        token_distill: Literal["mse", "kl"] = "mse",
        budget: str = "fixed",
        token_target: str = "position",
    ):
        super().__init__()
        if token_target not in TOKEN_TARGETS:
            raise ValueError(f"token_target must be one of {TOKEN_TARGETS}, got {token_target!r}")
        if token_distill not in TOKEN_DISTILL:
            raise ValueError(f"token_distill must be one of {sorted(TOKEN_DISTILL)}, got {token_distill!r}")
        if budget not in BUDGET_RATIO:
            raise ValueError(f"budget must be one of {sorted(BUDGET_RATIO)}, got {budget!r}")
        self.token_distill = token_distill
        self.token_target = token_target
        self.budget = budget
        self.keep_ratio = keep_ratio
        self.ratio_weight = ratio_weight
        self.distill_weight = distill_weight
        self.token_weight = token_weight
        self.smoothing = smoothing

    def forward(
        self,
        output,
        target: torch.Tensor,
        teacher_logits: Optional[torch.Tensor] = None,
        teacher_tokens: Optional[torch.Tensor] = None,
        keep_ratio: Optional[float] = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and its terms.

        Args:
            output: the student's `DynamicViTOutput` (logits, tokens, decisions, mask, class_logits).
            target: class indices (B,) or soft targets (B, K).
            teacher_logits: the teacher's counterpart of the student's trained logits (its class head
                for LV-ViT), (B, K), or None.
            teacher_tokens: the teacher's `Host.distill_targets`, (B, N, C) or (B, N, K), or None.
            keep_ratio: the ratio this step's ratio loss targets (elastic training draws one per
                step); None: the one given at construction.

        Returns:
            (total, {"ce", "ratio", "kl", "token"}) with the terms unweighted and detached.
        """
        logits = output.logits if getattr(output, "class_logits", None) is None else output.class_logits
        ce = classification_loss(logits, target, self.smoothing)
        rho = self.keep_ratio if keep_ratio is None else keep_ratio
        ratio = ratio_loss(output.decisions, rho, BUDGET_RATIO[self.budget])
        total = ce + self.ratio_weight * ratio
        terms = {"ce": ce.detach(), "ratio": ratio.detach()}
        if teacher_logits is not None:
            kl = kl_distill(logits, teacher_logits)
            total = total + self.distill_weight * kl
            terms["kl"] = kl.detach()
        if teacher_tokens is not None:
            held = getattr(output, "held", None) if self.token_target == "held" else None  # built on read
            if held is not None:
                teacher_tokens = held_targets(held, teacher_tokens)
            tok = TOKEN_DISTILL[self.token_distill](output.tokens, teacher_tokens, output.mask)
            total = total + self.token_weight * tok
            terms["token"] = tok.detach()
        return total, terms

    def extra_repr(self) -> str:
        return (
            f"keep_ratio={self.keep_ratio}, ratio_weight={self.ratio_weight}, "
            f"distill_weight={self.distill_weight}, token_weight={self.token_weight}, smoothing={self.smoothing}, "
            f"token_distill={self.token_distill!r}, budget={self.budget!r}, token_target={self.token_target!r}"
        )


class LogitDistillLoss(nn.Module):
    """CE + distill_weight * KL(teacher || student), for a student whose training forward returns
    logits (a plain classifier, e.g. a token-merging baseline fine-tuned like a DynamicViT).

    Called like `DynamicViTLoss` with the student's logits (B, K), the targets and the teacher's
    logits (teacher tokens are ignored); returns the total and the terms ("ce", "kl"), detached.
    """

    def __init__(self, distill_weight: float = 0.5, smoothing: float = 0.1):
        super().__init__()
        self.distill_weight = distill_weight
        self.smoothing = smoothing

    def forward(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        teacher_logits: Optional[torch.Tensor] = None,
        teacher_tokens: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ce = classification_loss(logits, target, self.smoothing)
        kl = kl_distill(logits, teacher_logits) if teacher_logits is not None else ce.new_zeros(())
        return ce + self.distill_weight * kl, {"ce": ce.detach(), "kl": kl.detach()}

    def extra_repr(self) -> str:
        return f"distill_weight={self.distill_weight}, smoothing={self.smoothing}"


class DynamicSpatialLoss(nn.Module):
    """The objective of hierarchical models (docs/spatial.md): CE + 10 * ratio + 0.5 * KL + 0.5 * feature MSE.

    Called like `DynamicViTLoss` with the student's training output of a `DynamicSpatial` (its
    `tokens` are the final normalized feature map, (B, N4, C4)), the targets, and the teacher's logits
    and final normalized map; returns the total and the terms ("ce", "ratio", "kl", "token"), detached.
    """

    def __init__(
        self,
        stage_ratios: Sequence[float],
        ratio_weight: float = 10.0,
        distill_weight: float = 0.5,
        feature_weight: float = 0.5,
        smoothing: float = 0.1,
    ):
        super().__init__()
        self.stage_ratios = tuple(stage_ratios)
        self.ratio_weight = ratio_weight
        self.distill_weight = distill_weight
        self.feature_weight = feature_weight
        self.smoothing = smoothing

    def forward(
        self,
        output,
        target: torch.Tensor,
        teacher_logits: Optional[torch.Tensor] = None,
        teacher_tokens: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        weighted = {
            "ce": (1.0, classification_loss(output.logits, target, self.smoothing)),
            "ratio": (self.ratio_weight, stage_ratio_loss(output.decisions, self.stage_ratios)),
        }
        if teacher_logits is not None:
            weighted["kl"] = (self.distill_weight, kl_distill(output.logits, teacher_logits))
        if teacher_tokens is not None:
            # Every position counts: the map keeps all of them (only their path differs).
            weighted["token"] = (self.feature_weight, token_distill(output.tokens, teacher_tokens))
        total = sum(w * term for w, term in weighted.values())
        return total, {k: term.detach() for k, (_, term) in weighted.items()}

    def extra_repr(self) -> str:
        return (
            f"stage_ratios={self.stage_ratios}, ratio_weight={self.ratio_weight}, "
            f"distill_weight={self.distill_weight}, feature_weight={self.feature_weight}, smoothing={self.smoothing}"
        )


__all__ = [
    "DynamicSpatialLoss",
    "DynamicViTLoss",
    "LogitDistillLoss",
    "TOKEN_DISTILL",
    "classification_loss",
    "kl_distill",
    "ratio_loss",
    "stage_ratio_loss",
    "token_distill",
    "token_kl_distill",
]
