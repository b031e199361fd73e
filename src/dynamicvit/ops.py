"""The math of DynamicViT, with no knowledge of any host model.

- `PredictionModule`: scores every patch token (keep vs drop) from local and mask-aware global features.
- `sample_keep`: straight-through Gumbel-softmax decisions for training.
- `masked_softmax`: attention weights where dropped tokens cannot influence any other token,
  differentiable in the decision (the training path; each host applies it inside its attention).
- `select_tokens`: top-k selection and gather for the inference path (tokens physically removed).

Shapes: B batch, N patch tokens, P prefix tokens, M = P + N, C width, H heads, D head width.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class PredictionModule(nn.Module):
    """Per-token keep/drop scores (the paper's prediction module).

    Submodule names and indices follow the reference checkpoints (`in_conv.0`, `in_conv.1`,
    `out_conv.0/2/4`), so their weights load after renaming the `score_predictor.` prefix alone.
    Channel 0 of the output is "keep".
    """

    def __init__(self, embed_dim: int, keep_prior: float = 0.5):
        super().__init__()
        C = embed_dim
        self.in_conv = nn.Sequential(nn.LayerNorm(C), nn.Linear(C, C), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(C, C // 2),
            nn.GELU(),
            nn.Linear(C // 2, C // 4),
            nn.GELU(),
            nn.Linear(C // 4, 2),
            nn.LogSoftmax(dim=-1),
        )
        self.reset_parameters(keep_prior)

    @torch.no_grad()
    def reset_parameters(self, keep_prior: float = 0.5) -> None:
        """The reference initialization (linear weights from `trunc_normal_(std=0.02)`, whose cut at
        +-2 leaves a plain N(0, 0.02); zero biases), with every token starting at keep probability
        `keep_prior`.

        The small weights make the first scores nearly equal across tokens. The reference starts them
        at 0.5, so three stages first keep 1/2, 1/4, 1/8 of the tokens; the keep-ratio loss and the
        CE then push hard toward keeping more, and with a short schedule's larger learning rate the
        last predictor can overshoot into "keep everything" and saturate (its straight-through
        gradient vanishes). Starting each stage at keep_prior = rho (so stage s keeps rho^s, its target)
        removes that jolt; keep_prior = 0.5 is the reference.
        """
        if not 0.0 < keep_prior < 1.0:
            raise ValueError(f"keep_prior must be in (0, 1), got {keep_prior}")
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        half_logit = 0.5 * math.log(keep_prior / (1.0 - keep_prior))
        self.out_conv[4].bias.copy_(torch.tensor([half_logit, -half_logit]))

    def logits(
        self, x: torch.Tensor, policy: Optional[torch.Tensor] = None, num_prefix_tokens: int = 0
    ) -> torch.Tensor:
        """Unnormalized (keep, drop) logits of the patch tokens, (B, N, 2).

        Args:
            x: tokens, (B, P + N, C); the first `num_prefix_tokens` (P) are skipped.
            policy: current keep decision of the patch tokens, (B, N, 1); None: all present.
            num_prefix_tokens: P. The per-token layers run on the whole sequence and the prefix rows
                are dropped at the end: slicing them off first would copy the (B, N, C) input.
        """
        P = num_prefix_tokens
        norm, fc_in = self.in_conv[0], self.in_conv[1]
        h = _gelu(F.linear(norm(x), fc_in.weight, fc_in.bias))  # (B, P + N, C)
        C = h.shape[-1]
        local, glob = h[..., : C // 2], h[:, P:, C // 2 :]
        if policy is None:
            glob = glob.mean(dim=1, keepdim=True)  # (B, 1, C/2)
        else:
            # Masked mean: dropped tokens must not leak into the global feature. An all-dropped
            # row gives 0 / eps = 0 instead of the reference's 0 / 0 = NaN.
            glob = (glob * policy).sum(dim=1, keepdim=True) / policy.sum(dim=1, keepdim=True).clamp_min(1e-6)
        # out_conv[0] acts on concat(local, global). Split its weight instead of concatenating: the
        # global half is one row per image, so it costs (C/2)^2 per image instead of per token, and
        # no (B, N, C) copy is made. Same weights and result as the reference layout.
        fc0, fc1, fc2 = self.out_conv[0], self.out_conv[2], self.out_conv[4]
        z = F.linear(local, fc0.weight[:, : C // 2]).add_(F.linear(glob, fc0.weight[:, C // 2 :], fc0.bias))
        z = _gelu(F.linear(_gelu(z), fc1.weight, fc1.bias))
        z = F.linear(z, fc2.weight, fc2.bias)
        return z[:, P:]

    def forward(
        self, x: torch.Tensor, policy: Optional[torch.Tensor] = None, num_prefix_tokens: int = 0
    ) -> torch.Tensor:
        """Log-probabilities of (keep, drop) of the patch tokens, (B, N, 2)."""
        return F.log_softmax(self.logits(x, policy, num_prefix_tokens), dim=-1)

    def keep_score(self, x: torch.Tensor, num_prefix_tokens: int = 0) -> torch.Tensor:
        """A score monotone in the keep probability, (B, N), for ranking at inference.

        log p_keep = l0 - logsumexp(l0, l1) is monotone in l0 - l1, so the ranking needs no softmax.
        """
        z = self.logits(x, num_prefix_tokens=num_prefix_tokens)
        return z[..., 0] - z[..., 1]


def _gelu(t: torch.Tensor) -> torch.Tensor:
    """GELU, in place when no gradient is needed: on a CPU every fresh large buffer costs page faults."""
    if torch.is_grad_enabled() and t.requires_grad:
        return F.gelu(t)
    return torch.ops.aten.gelu_(t)


def sample_keep(log_probs: torch.Tensor, prev_decision: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Hard keep decisions with straight-through gradients, (B, N, 1).

    Args:
        log_probs: predictor output, (B, N, 2), channel 0 = keep.
        prev_decision: decision of the previous stage, (B, N, 1); dropped tokens stay dropped.
    """
    return F.gumbel_softmax(log_probs, tau=tau, hard=True)[..., 0:1] * prev_decision


_EPS = 1e-6  # the reference's stabilizer of the masked softmax


def masked_softmax(attn: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
    """Softmax over keys in which dropped keys get zero weight ("softmax with policy").

    attn_ij = (E_ij G_ij + eps/M) / (sum_k E_ik G_ik + eps), E = exp(A - rowmax A), eps = 1e-6,
    G_ij = g_j (i != j), G_ii = 1: the reference's formula, computed in fp32. Gradients flow into g,
    which is how the predictor learns.

    Why the row max over all keys and the eps, although they distort rows in which a dropped key
    dominates by more than ~14 nats (the kept terms fall below eps and the row flattens): the exact
    derivative with respect to a dropped g_j grows like exp(A_ij - max over kept keys), 1e9 and more
    in models with peaked attention, and drowns every other loss term. eps bounds it. A variant
    with an exact forward (max over kept keys) and this gradient was measured too: its predictors
    learned worse (tests/test_train.py, keep score vs image content), as forward and gradient then
    disagree. Elsewhere the result equals the exact masked softmax to ~1e-6.

    Args:
        attn: attention logits, (B, H, M, M).
        policy: (B, M, 1) or (B, M); 1 for prefix and kept tokens, 0 for dropped ones.
    """
    B, H, M, _ = attn.shape
    g = policy.reshape(B, 1, 1, M).to(torch.float32)
    eye = torch.eye(M, dtype=torch.float32, device=attn.device).view(1, 1, M, M)
    G = g + (1.0 - g) * eye  # (B, 1, M, M): g_j off the diagonal, 1 on it
    a = attn.to(torch.float32)
    e = torch.exp(a - a.amax(dim=-1, keepdim=True).detach()) * G
    return ((e + _EPS / M) / (e.sum(dim=-1, keepdim=True) + _EPS)).to(attn.dtype)


def select_tokens(
    x: torch.Tensor, score: torch.Tensor, num_keep: int, num_prefix_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the prefix tokens and the `num_keep` highest-scoring patch tokens.

    Args:
        x: tokens, (B, P + N, C).
        score: keep score of the patch tokens, (B, N).
        num_keep: k, patch tokens to keep.
        num_prefix_tokens: P.

    Returns:
        (tokens (B, P + k, C), positions of the kept patch tokens in the current sequence (B, k)).
        Kept tokens come out in score order; the position embedding was added at the input.
    """
    B, _, C = x.shape
    P = num_prefix_tokens
    keep = score.topk(num_keep, dim=1, sorted=False).indices  # (B, k)
    if P:
        prefix = torch.arange(P, device=x.device).expand(B, P)
        index = torch.cat([prefix, keep + P], dim=1)  # (B, P + k)
    else:
        index = keep
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, C)), keep
