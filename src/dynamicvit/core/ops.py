"""The math of DynamicViT, with no knowledge of any host model.

- `PredictionModule`: scores every patch token (keep vs drop) from local and mask-aware global features.
- `sample_keep`: straight-through Gumbel-softmax decisions for training.
- `masked_softmax`: attention weights where dropped tokens cannot influence any other token,
  differentiable in the decision (the training path; each host applies it inside its attention).
  `policy_bias`: the same as an additive bias for fused attention kernels.
- `select_tokens` / `prune_tokens`: top-k selection and gather for the inference path (tokens
  physically removed); `prune_tokens` scores with `PredictionModule.keep_margin`, the few-operator
  fast path of the prediction module.
- `merge_into_kept` (inference path) / `merge_masked` (training path): each dropped token is added
  into its most similar kept token (`cosine_similarity`) as a size-weighted average (`scatter_merge`);
  `size_bias` and the `sizes` of `masked_softmax` / `policy_bias` make attention proportional to the
  number of original tokens a merged token holds; `carry_held` follows which original patches each
  token holds (the training path's target for merged tokens).

Shapes: B batch, N patch tokens, P prefix tokens, M = P + N, C width, H heads, D head width, W a
prediction module's hidden width.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class PredictionModule(nn.Module):
    """Per-token keep/drop scores (the paper's prediction module).

    Submodule names and indices follow the reference checkpoints (`in_conv.0`, `in_conv.1`,
    `out_conv.0/2/4`), so their weights load after renaming the `score_predictor.` prefix alone.
    Channel 0 of the output is "keep".

    `width` (W) is the hidden width: the module maps C -> W -> W/2 -> W/4 -> 2. The reference uses
    W = C, about 1.4 C^2 MACs per token, a tenth of a block's 12 C^2; at low budgets, with a stage
    before most blocks, that tenth competes with the tokens for the same MACs. W = C/4 costs about
    0.27 C^2 per token. W must be a multiple of 4.
    """

    def __init__(self, embed_dim: int, keep_prior: float = 0.5, width: Optional[int] = None):
        super().__init__()
        C, W = embed_dim, width or embed_dim
        self.in_conv = nn.Sequential(nn.LayerNorm(C), nn.Linear(C, W), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(W, W // 2),
            nn.GELU(),
            nn.Linear(W // 2, W // 4),
            nn.GELU(),
            nn.Linear(W // 4, 2),
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
        h = _gelu(F.linear(norm(x), fc_in.weight, fc_in.bias))  # (B, P + N, W)
        W = h.shape[-1]
        local, glob = h[..., : W // 2], h[:, P:, W // 2 :]
        if policy is None:
            glob = glob.mean(dim=1, keepdim=True)  # (B, 1, W/2)
        else:
            # Masked mean: dropped tokens must not leak into the global feature. An all-dropped
            # row gives 0 / eps = 0 instead of the reference's 0 / 0 = NaN.
            glob = (glob * policy).sum(dim=1, keepdim=True) / policy.sum(dim=1, keepdim=True).clamp_min(1e-6)
        # out_conv[0] acts on concat(local, global). Split its weight instead of concatenating: the
        # global half is one row per image, so it costs (W/2)^2 per image instead of per token, and
        # no (B, N, C) copy is made. Same weights and result as the reference layout.
        fc0, fc1, fc2 = self.out_conv[0], self.out_conv[2], self.out_conv[4]
        z = F.linear(local, fc0.weight[:, : W // 2]).add_(F.linear(glob, fc0.weight[:, W // 2 :], fc0.bias))
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
        return self.keep_margin(x[:, num_prefix_tokens:]).squeeze(-1)

    def keep_margin(
        self, patches: torch.Tensor, segments: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    ) -> torch.Tensor:
        """l_keep - l_drop of every patch token, (B, n, 1): the inference path's ranking score.

        The same function as `logits` without a policy (equal to ~1e-6), in as few operators as
        possible, since on a GPU each one is a kernel launch and the whole module is ~3% of the MACs:
        it runs on the patch tokens only (no prefix rows to slice off at the end), splits the hidden
        features with one view, and the two-way last layer becomes one dot product with
        (w_keep - w_drop, b_keep - b_drop): the softmax is monotone in that margin. Weights derived
        that way are cached between calls (see `_inference_weights`). Twelve operators in all.
        Trade-off: for B > 1 the patch tokens are a strided view of the sequence, which layer_norm
        copies once (B, n, C); running the per-token layers on all P + n rows instead (the reference
        layout of `logits`) avoids that copy for two more view operators per stage.

        Args:
            patches: the patch tokens, (B, n, C), without prefix tokens; or the patch tokens of a
                packed batch, (T, C), with `segments`.
            segments: for packed patches, (image of each row (T,), patch tokens per image (B,)): the
                global feature is then each image's own mean.
        """
        w = self._inference_weights()
        norm, fc_in, fc1 = self.in_conv[0], self.in_conv[1], self.out_conv[2]
        h = _gelu(F.linear(norm(patches), fc_in.weight, fc_in.bias))  # (B, n, W) or (T, W)
        local, glob = h.split(h.shape[-1] // 2, dim=-1)  # (B, n, W/2) each
        if segments is None:
            z = F.linear(local, w.local).add_(F.linear(glob.mean(dim=1, keepdim=True), w.glob, w.bias))
        else:
            image, counts = segments
            mean = glob.new_zeros(counts.shape[0], glob.shape[-1]).index_add_(0, image, glob) / counts[:, None]
            z = F.linear(local, w.local).add_(F.linear(mean, w.glob, w.bias)[image])  # (T, W/2)
        z = _gelu(F.linear(_gelu(z), fc1.weight, fc1.bias))  # (B, n, W/4)
        return F.linear(z, w.margin, w.margin_bias)

    def _inference_weights(self) -> "_InferenceWeights":
        """`out_conv[0]`'s weight split into its local and global halves, and the last layer's
        margin row (w_keep - w_drop, b_keep - b_drop).

        Cached while the source parameters stay the same tensors at the same version (every in-place
        update, `load_state_dict`, an optimizer step or `.to()` changes one of them; writing through
        `param.data` does not, so call `clear_inference_cache()` after doing that). Derived afresh,
        differentiably, when a gradient is wanted and while torch.compile / torch.export / tracing
        follow the code: then they are part of the traced graph, not constants.
        """
        fc0, fc2 = self.out_conv[0], self.out_conv[4]
        sources = (fc0.weight, fc0.bias, fc2.weight, fc2.bias)
        if _tracing() or (torch.is_grad_enabled() and any(p.requires_grad for p in sources)):
            return _InferenceWeights.of(fc0, fc2)
        try:
            key = tuple((id(p), p.data_ptr(), p._version) for p in sources)
        except RuntimeError:  # inference tensors have no version counter, fake tensors no data
            return _InferenceWeights.of(fc0, fc2)
        cached = self.__dict__.get("_inference_cache")
        if cached is None or cached[0] != key:
            # Outside inference mode, so that the cached tensors can meet autograd later.
            with torch.inference_mode(False), torch.no_grad():
                derived = _InferenceWeights(*(t.contiguous() for t in _InferenceWeights.of(fc0, fc2)))
            self.__dict__["_inference_cache"] = cached = (key, derived)
        return cached[1]

    def clear_inference_cache(self) -> None:
        """Forget the derived inference weights (needed only after writing through `param.data`)."""
        self.__dict__.pop("_inference_cache", None)


class _InferenceWeights(NamedTuple):
    local: torch.Tensor  # (W/2, W/2), out_conv[0] on the local half (W: the module's width)
    glob: torch.Tensor  # (W/2, W/2), out_conv[0] on the global half
    bias: torch.Tensor  # (W/2,)
    margin: torch.Tensor  # (1, W/4), w_keep - w_drop
    margin_bias: torch.Tensor  # (1,), b_keep - b_drop

    @classmethod
    def of(cls, fc0: nn.Linear, fc2: nn.Linear) -> "_InferenceWeights":
        local, glob = fc0.weight.split(fc0.in_features // 2, dim=1)
        margin = fc2.weight[0:1] - fc2.weight[1:2]
        return cls(local, glob, fc0.bias, margin, fc2.bias[0:1] - fc2.bias[1:2])


def _tracing() -> bool:
    """True while torch.compile, torch.export or the TorchScript tracer follows the Python code."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


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


def masked_softmax(attn: torch.Tensor, policy: torch.Tensor, sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Softmax over keys in which dropped keys get zero weight ("softmax with policy").

    attn_ij = (E_ij G_ij + eps/M) / (sum_k E_ik G_ik + eps), E = exp(A - rowmax A), eps = 1e-6,
    G_ij = g_j (i != j), G_ii = 1: the reference's formula, computed in fp32. Gradients flow into g,
    which is how the predictor learns.

    Why the row max over all keys and the eps, although they distort rows in which a dropped key
    dominates by more than ~14 nats (the kept terms fall below eps and the row flattens): the exact
    derivative with respect to a dropped g_j grows like exp(A_ij - max over kept keys), 1e9 and more
    in models with peaked attention, and drowns every other loss term. eps bounds it. An exact
    forward (max over kept keys) with this bounded gradient lets forward and gradient disagree, and
    its predictors learn worse (a lower rank correlation between keep score and patch content).
    Elsewhere the result equals the exact masked softmax to ~1e-6.

    With `sizes` (merged tokens) the gate becomes G_ij s_j: proportional attention, each key
    weighted by the number of original tokens it holds, as `size_bias` does on the inference path.

    Args:
        attn: attention logits, (B, H, M, M).
        policy: (B, M, 1) or (B, M); 1 for prefix and kept tokens, 0 for dropped ones.
        sizes: (B, M) or None; how many original tokens each token holds (1 for prefix tokens).
    """
    M = attn.shape[-1]
    a = attn.to(torch.float32)
    e = torch.exp(a - a.amax(dim=-1, keepdim=True).detach()) * _key_gate(policy, M, sizes)
    return ((e + _EPS / M) / (e.sum(dim=-1, keepdim=True) + _EPS)).to(attn.dtype)


def policy_bias(
    policy: torch.Tensor, dtype: torch.dtype = torch.float32, sizes: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """`masked_softmax` as an additive attention bias, for fused attention kernels (training path).

    softmax(A + log(G + eps)) = E (G + eps) / sum_k E_k (G_k + eps), E = exp(A - rowmax A): the
    reference formula with the stabilizer eps * E_ij in place of its constant eps / M (which needs
    the row max, i.e. the explicit (B, H, M, M) logits a fused kernel never writes out). Where a
    kept key is within ~14 nats (log 1/eps) of the row max, both equal the exact masked softmax to
    ~1e-6 and have the same gradient in g, which eps bounds: through the log, d/dg_j =
    1 / (g_j + eps) <= 1/eps multiplies the weight eps E_ij / sum(...) of a dropped key, giving
    ~E_ij / sum_kept E <= 1/eps as in the reference (the exact derivative grows like exp(D) for a
    dropped key D nats above the kept ones). Beyond ~14 nats the two distort the row differently:
    the reference flattens it (weight eps/M / eps = 1/M on every key) and keeps a gradient of
    ~1/eps for the dominant dropped key; here that key takes the row's weight and its gradient
    vanishes (saturated softmax). Such rows are rare enough that the predictors learn alike
    (tests/test_speed.py), but this is why the fused kernel is opt-in.

    Args:
        policy: (B, M, 1) or (B, M); 1 for prefix and kept tokens, 0 for dropped ones.
        dtype: the queries' dtype (fused kernels want the bias in it); computed in fp32.
        sizes: (B, M) or None; as in `masked_softmax`.

    Returns:
        (B, 1, M, M), broadcast over heads.
    """
    return torch.log(_key_gate(policy, policy.shape[1], sizes) + _EPS).to(dtype)


def _key_gate(policy: torch.Tensor, M: int, sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """G, (B, 1, M, M) fp32: G_ij = g_j off the diagonal, 1 on it (a dropped token still sees itself),
    times s_j when `sizes` (B, M) are given."""
    g = policy.reshape(-1, 1, 1, M).to(torch.float32)
    eye = torch.eye(M, dtype=torch.float32, device=policy.device).view(1, 1, M, M)
    gate = g + (1.0 - g) * eye
    return gate if sizes is None else gate * sizes.reshape(-1, 1, 1, M).to(torch.float32)


def size_bias(sizes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Proportional attention as an additive bias: log s_j on every key j, (B, 1, 1, M).

    softmax(A + log s) weighs each key by the number of original tokens it holds, so a token merged
    from s tokens draws the attention those s tokens drew together (had they been equal). Fused
    attention kernels take it as a float mask.

    Args:
        sizes: (B, M), >= 1; 1 for prefix tokens and tokens that hold only themselves.
        dtype: the queries' dtype.
    """
    return torch.log(sizes.to(torch.float32)).to(dtype).reshape(sizes.shape[0], 1, 1, -1)


def select_tokens(
    x: torch.Tensor, score: torch.Tensor, num_keep: int, num_prefix_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the prefix tokens and the `num_keep` highest-scoring patch tokens.

    Args:
        x: tokens, (B, P + N, C).
        score: keep score of the patch tokens, (B, N) or (B, N, 1).
        num_keep: k, patch tokens to keep.
        num_prefix_tokens: P.

    Returns:
        (tokens (B, P + k, C), positions of the kept patch tokens in the current sequence (B, k)).
        Kept tokens follow the prefix in the order top-k returns them; the position embedding was
        added at the input.
    """
    prefix, patches = _split_prefix(x, num_prefix_tokens)
    tokens, keep = _keep_top(prefix, patches, score.reshape(score.shape[0], -1, 1), num_keep)
    return tokens, keep.squeeze(-1)


def prune_tokens(
    x: torch.Tensor, predictor: PredictionModule, num_keep: int, num_prefix_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pruning stage of the inference path: `select_tokens` on `predictor.keep_margin`.

    The prefix / patch split is shared by the predictor and the gather, and no index is built for
    the prefix tokens (they are concatenated back), so a stage costs the predictor's 12 operators
    plus 6.

    Returns:
        As `select_tokens`.
    """
    prefix, patches = _split_prefix(x, num_prefix_tokens)
    tokens, keep = _keep_top(prefix, patches, predictor.keep_margin(patches), num_keep)
    return tokens, keep.squeeze(-1)


def _split_prefix(x: torch.Tensor, num_prefix_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(prefix (B, P, C), patches (B, N, C)) as views, in one operator."""
    return x.split([num_prefix_tokens, x.shape[1] - num_prefix_tokens], dim=1)


def _keep_top(
    prefix: torch.Tensor, patches: torch.Tensor, score: torch.Tensor, num_keep: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prefix + the top-k patches (B, P + k, C), their positions (B, k, 1)); score (B, N, 1)."""
    keep = score.topk(num_keep, dim=1, sorted=False).indices  # (B, k, 1)
    kept = patches.gather(1, keep.expand(-1, -1, patches.shape[-1]))  # (B, k, C)
    if prefix.shape[1] == 0:
        return kept, keep
    return torch.cat([prefix, kept], dim=1), keep


def fold_dropped(
    tokens: torch.Tensor,
    weight: torch.Tensor,
    fused: Optional[torch.Tensor] = None,
    fused_weight: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold weighted tokens into the fused token: f = (W f_prev + sum_i w_i x_i) / (W + sum_i w_i).

    Args:
        tokens: patch tokens, (B, n, C).
        weight: w_i, (B, n): the keep probability of the tokens dropped now, 0 for the others.
        fused: the fused token so far, (B, 1, C), or None before the first fold.
        fused_weight: W, the total weight it holds, (B, 1, 1).

    Returns:
        (the fused token (B, 1, C), its total weight (B, 1, 1)). A row whose total weight is 0
        (nothing dropped yet, or every weight underflowed) gives a zero token, not 0 / 0.
    """
    w = weight.to(tokens.dtype).unsqueeze(1)  # (B, 1, n)
    total = w.sum(dim=-1, keepdim=True)  # (B, 1, 1)
    acc = w @ tokens  # (B, 1, C)
    if fused is not None:
        acc = acc + fused_weight * fused
        total = total + fused_weight
    # Divide by 1 where nothing is held: the gradient stays finite (a clamp to eps would scale it by 1/eps).
    return acc / torch.where(total > 0, total, torch.ones_like(total)), total


# -- merging dropped tokens -------------------------------------------------------------------


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every token of `a` (B, m, C) with every token of `b` (B, k, C), (B, m, k).

    One batched product of the unit-normalized features: m * k * C multiply-accumulates.
    """
    a = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    b = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    return a @ b.transpose(1, 2)


def scatter_merge(
    kept: torch.Tensor, kept_sizes: torch.Tensor, dropped: torch.Tensor, dropped_sizes: torch.Tensor,
    target: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add each dropped token into a kept one, as a size-weighted average.

    x'_j = (s_j x_j + sum_{i -> j} s_i x_i) / s'_j with s'_j = s_j + sum_{i -> j} s_i: a merged token
    is the mean of the original tokens it holds (each taken at the depth where it was merged), and
    its size the number of them. A kept token that receives nothing is unchanged. Two scatter-adds
    (m * C + m multiply-accumulates).

    Args:
        kept: (B, k, C); kept_sizes: (B, k), > 0.
        dropped: (B, m, C); dropped_sizes: (B, m).
        target: (B, m), index into `kept` of the token each dropped token goes to.

    Returns:
        (merged tokens (B, k, C), their sizes (B, k)).
    """
    acc, sizes = _weighted_sums(kept, kept_sizes, dropped, dropped_sizes, target)
    return acc / sizes.to(acc.dtype).unsqueeze(-1), sizes


def _weighted_sums(kept, kept_sizes, dropped, dropped_sizes, target) -> tuple[torch.Tensor, torch.Tensor]:
    """(s_j x_j + sum_{i -> j} s_i x_i (B, k, C), s_j + sum_{i -> j} s_i (B, k)): `scatter_merge` before
    its division."""
    sizes = kept_sizes.scatter_add(1, target, dropped_sizes.to(kept_sizes.dtype))  # (B, k)
    index = target.unsqueeze(-1).expand(-1, -1, kept.shape[-1])  # (B, m, C)
    weighted = dropped * dropped_sizes.to(dropped.dtype).unsqueeze(-1)
    acc = (kept * kept_sizes.to(kept.dtype).unsqueeze(-1)).scatter_add(1, index, weighted)  # (B, k, C)
    return acc, sizes


def merge_into_kept(
    patches: torch.Tensor, sizes: Optional[torch.Tensor], keep: torch.Tensor, drop: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One merging stage of the inference path: the kept tokens, with every dropped token added into
    its most similar kept one (cosine similarity of the features).

    Args:
        patches: the patch tokens, (B, n, C).
        sizes: (B, n), how many original tokens each holds (fp32); None: 1 each.
        keep: (B, k) and drop: (B, n - k), positions in `patches` of the kept and the dropped tokens
            (together a permutation of 0..n-1).

    Returns:
        (merged kept tokens (B, k, C) in the order of `keep`, their sizes (B, k), and for each dropped
        token the position in `keep` of the token it went to (B, n - k)).
    """
    C = patches.shape[-1]
    kept = patches.gather(1, keep.unsqueeze(-1).expand(-1, -1, C))  # (B, k, C)
    dropped = patches.gather(1, drop.unsqueeze(-1).expand(-1, -1, C))  # (B, n - k, C)
    target = cosine_similarity(dropped, kept).argmax(dim=-1)  # (B, n - k)
    if sizes is None:  # fp32 whatever the tokens' dtype: bf16 counts exactly only up to 256
        sizes = patches.new_ones(patches.shape[:2], dtype=torch.float32)
    merged, merged_sizes = scatter_merge(kept, sizes.gather(1, keep), dropped, sizes.gather(1, drop), target)
    return merged, merged_sizes, target


def merge_masked(
    patches: torch.Tensor, sizes: torch.Tensor, keep: torch.Tensor, dropped: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`merge_into_kept` on the training path, where no token is removed: what the inference path
    computes for the same decisions, differentiable in the decisions.

    Each newly dropped token (dropped > 0.5) goes to the most similar token kept (keep > 0.5); the kept
    tokens become size-weighted averages with weights s_i * keep_i (kept) and s_i * dropped_i (newly
    dropped), so a straight-through decision passes a gradient into the predictor. Every other token
    (dropped at this or an earlier stage) keeps its value and size: attention masks it out.

    Args:
        patches: (B, N, C); sizes: (B, N).
        keep: this stage's decision, (B, N), 1 = kept (hard values, straight-through gradients).
        dropped: the tokens this stage drops, previous decision - keep, (B, N).

    Returns:
        (patch tokens (B, N, C), sizes (B, N), where each token went (B, N): the kept token a newly
        dropped one was added into, every other token's own index).
    """
    B, N, C = patches.shape
    kept = keep.detach() > 0.5  # < 0.5, not == 0: straight-through decisions are 0 or 1 up to rounding
    new = dropped.detach() > 0.5
    sim = cosine_similarity(patches, patches).masked_fill(~kept.unsqueeze(1), float("-inf"))  # (B, N, N)
    own = torch.arange(N, device=patches.device).expand(B, N)
    target = torch.where(new, sim.argmax(dim=-1), own)  # (B, N): itself unless dropped now
    weight = sizes * (keep + dropped).to(sizes.dtype)  # 0 for tokens dropped at an earlier stage
    acc, total = _weighted_sums(patches.new_zeros(B, N, C), sizes.new_zeros(B, N), patches, weight, target)
    # Divide only where kept: a zero total elsewhere would give 0 / 0, and a NaN gradient through `where`.
    merged = acc / torch.where(kept, total, torch.ones_like(total)).to(acc.dtype).unsqueeze(-1)
    return torch.where(kept.unsqueeze(-1), merged, patches), torch.where(kept, total, sizes), target


def carry_held(held: torch.Tensor, target: torch.Tensor, moved: torch.Tensor) -> torch.Tensor:
    """Which original patches each token holds, after one merging stage of the training path.

    held[b, j, o] is 1 when token j of image b holds original patch o (the identity before any merge);
    the rows of the tokens that moved (kept or newly dropped, `moved` > 0.5) are added into the row of the
    token they went to (`target`, from `merge_masked`), so a kept token's row sums to its size. Rows of
    tokens dropped at an earlier stage stay as they were (nothing reads them). No gradient.

    Args:
        held: (B, N, N); target: (B, N); moved: (B, N), keep + dropped of this stage.

    Returns:
        (B, N, N).
    """
    moved = (moved.detach() > 0.5).unsqueeze(-1)
    rows = torch.where(moved, held, torch.zeros_like(held))
    gathered = torch.zeros_like(held).scatter_add(1, target.unsqueeze(-1).expand_as(held), rows)
    return torch.where(moved, gathered, held)


def held_after(merges: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """`carry_held` over every merging stage, from the identity: which original patches each token holds
    at the end, (B, N, N). `merges` holds each stage's (target, moved), both (B, N), as the training path
    records them; built only when asked for (the token target of merged tokens reads it)."""
    target = merges[0][0]
    B, N = target.shape
    held = torch.eye(N, device=target.device).expand(B, N, N)
    for target, moved in merges:
        held = carry_held(held, target, moved)
    return held


def ratio_shift(keep_ratio: Optional[float], reference: float) -> float:
    """logit(keep_ratio) - logit(reference): how far elastic training moves the keep logits (0 for None).

    Ratios are clipped to [0.01, 0.99]: a ratio of 1.0 becomes a large finite shift (keep almost all).
    """
    if keep_ratio is None:
        return 0.0
    return _logit(keep_ratio) - _logit(reference)


def _logit(p: float) -> float:
    p = min(max(p, 0.01), 0.99)
    return math.log(p / (1.0 - p))


def split_positions(score: torch.Tensor, num_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `num_keep` highest-scoring positions and the others, as indices (B, k) and (B, N - k)."""
    order = score.argsort(dim=1, descending=True)
    return order[:, :num_keep], order[:, num_keep:]
