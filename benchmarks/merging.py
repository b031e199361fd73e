"""The token-merging baseline: bipartite soft matching with proportional attention (Bolya et al.,
"Token Merging: Your ViT But Faster", ICLR 2023), written for this project from the published
algorithm, on a timm ViT.

In every block, between the attention and the MLP branch, r patch tokens are merged away:
1. the metric is the block's attention keys, averaged over the heads (B, M, D);
2. the patch tokens are split alternately into two sets, A (even positions) and B (odd positions);
3. every token of A is matched with its most similar token of B (cosine similarity of the metric);
4. the r best-matched tokens of A are added into their match as a size-weighted average
   (`dynamicvit.core.ops.scatter_merge`); the other tokens of A and all of B stay;
5. each token carries its size, the number of original patches it holds, and attention adds log size
   to the key logits (proportional attention), so a merged token counts for what it holds.
The prefix tokens (class, distillation, register tokens) take no part in the matching: they are never
merged and nothing is merged into them. r is capped at half the patch tokens of the block.

`TokenMergingViT` runs a timm ViT that way with r set per forward (`model(x, r=8)`), so one fine-tuned
model serves every r; in training mode it draws r per forward from `r_range` (uniformly, from Python's
`random`, which the training loop seeds and restores on resume). r = 0 is the dense model exactly.
The module adds no parameter: its state dict is the backbone's, so a checkpoint the training loop
writes of it is a dense ViT checkpoint (`dynamicvit.load_model` reads it; wrap it again to merge).

Shapes: B batch, P prefix tokens, n patch tokens in the sequence, C width, H heads, D head width.
"""
from __future__ import annotations

import random
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from dynamicvit.core.hosts import ViTHost
from dynamicvit.core.hosts.vit import attention_heads, attention_output
from dynamicvit.core.ops import cosine_similarity, scatter_merge, size_bias
from dynamicvit.errors import ConfigError, UnsupportedModelError


def bipartite_merge(
    x: torch.Tensor, metric: torch.Tensor, sizes: torch.Tensor, r: int, num_prefix_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge r patch tokens away by bipartite soft matching.

    Args:
        x: tokens, (B, P + n, C).
        metric: what similarity is measured on, (B, P + n, D) (the keys averaged over heads).
        sizes: original patches each token holds, (B, P + n).
        r: tokens to merge away, 0 <= r <= n // 2.
        num_prefix_tokens: P; they are left as they are, first in the sequence.

    Returns:
        (tokens (B, P + n - r, C): prefix, the unmerged tokens of A, then B; their sizes (B, P + n - r)).
    """
    P, C = num_prefix_tokens, x.shape[-1]
    patches, m, s = x[:, P:], metric[:, P:], sizes[:, P:]
    a, b = patches[:, ::2], patches[:, 1::2]  # the two sets, alternating positions
    best, match = cosine_similarity(m[:, ::2], m[:, 1::2]).max(dim=-1)  # (B, |A|): each A token's best B token
    order = best.argsort(dim=-1, descending=True)
    merged, kept = order[:, :r], order[:, r:]  # the r best-matched A tokens go, the rest stay
    s_a = s[:, ::2]
    b, s_b = scatter_merge(
        b, s[:, 1::2], a.gather(1, merged.unsqueeze(-1).expand(-1, -1, C)), s_a.gather(1, merged), match.gather(1, merged)
    )
    stay = a.gather(1, kept.unsqueeze(-1).expand(-1, -1, C))
    return torch.cat([x[:, :P], stay, b], dim=1), torch.cat([sizes[:, :P], s_a.gather(1, kept), s_b], dim=1)


class TokenMergingViT(nn.Module):
    """A timm `VisionTransformer` that merges r tokens per block (see the module's text).

    Modifications against timm's `Block.forward`: the attention branch is computed from the module's
    own projections with `F.scaled_dot_product_attention` and the log-size bias (fused attention
    kept), and returns its keys for the matching; the merge runs between the two residual branches.
    Drop path and LayerScale are the block's own. Pooling must be the class token's.

    Args:
        backbone: a timm ViT (shared, not copied).
        r: tokens merged per block in eval mode (and in training mode without `r_range`).
        r_range: (low, high): in training mode each forward draws r uniformly from low..high.
    """

    def __init__(self, backbone: nn.Module, r: int = 0, r_range: Optional[tuple[int, int]] = None):
        super().__init__()
        self.host = ViTHost(backbone)  # checks the blocks and attention modules are timm's own
        if backbone.global_pool != "token":
            raise UnsupportedModelError(f"the merging baseline pools the class token; {backbone.global_pool!r} pooling is not supported")
        if backbone.num_prefix_tokens < 1:
            raise UnsupportedModelError("the merging baseline needs a class token")
        self.backbone = backbone
        self.r = _as_r(r)
        if r_range is not None and not 0 <= _as_r(r_range[0]) <= _as_r(r_range[1]):
            raise ConfigError(f"r_range must be (low, high) with 0 <= low <= high, got {r_range!r}")
        self.r_range = None if r_range is None else (int(r_range[0]), int(r_range[1]))

    # A checkpoint of this module is the backbone's: merging adds no parameter.
    @property
    def pretrained_cfg(self) -> dict:
        return self.backbone.pretrained_cfg

    @property
    def model_name(self) -> str:
        return self.backbone.pretrained_cfg.get("architecture")

    @property
    def dynamicvit_timm_kwargs(self) -> dict:
        return getattr(self.backbone, "dynamicvit_timm_kwargs", getattr(self.backbone, "_model_args", {}))

    def state_dict(self, *args, **kwargs):
        return self.backbone.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.backbone.load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(self, x: torch.Tensor, r: Optional[int] = None) -> torch.Tensor:
        """Images (B, C, H, W) -> logits (B, K), merging r tokens per block.

        Args:
            r: tokens merged per block; None: drawn from `r_range` in training mode, else `self.r`.
        """
        if r is None:
            r = random.randint(*self.r_range) if self.training and self.r_range is not None else self.r
        r = _as_r(r)
        host, P = self.host, self.host.num_prefix_tokens
        x = host.embed(x)
        sizes = None  # (B, P + n): none until the first merge (then proportional attention)
        for blk in host.blocks:
            n = x.shape[1] - P
            if r == 0 or n < 2:
                x = blk(x) if sizes is None else _block(blk, x, sizes, 0, P)[0]
            else:
                x, sizes = _block(blk, x, x.new_ones(x.shape[:2], dtype=torch.float32) if sizes is None else sizes,
                                  min(r, n // 2), P)
        return self.backbone.forward_head(host.norm(x))

    def extra_repr(self) -> str:
        return f"r={self.r}, r_range={self.r_range}"


def _block(blk: nn.Module, x: torch.Tensor, sizes: torch.Tensor, r: int, P: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A timm Block with proportional attention and r tokens merged between its branches."""
    attn = blk.attn
    q, k, v = attention_heads(attn, blk.norm1(x))  # (B, H, M, D) each
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=size_bias(sizes, q.dtype), dropout_p=attn.attn_drop.p if attn.training else 0.0
    )
    x = x + blk.drop_path1(blk.ls1(attention_output(attn, out)))
    if r > 0:
        x, sizes = bipartite_merge(x, k.mean(dim=1), sizes, r, P)
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x)))), sizes


def _as_r(r) -> int:
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ConfigError(f"r (tokens merged per block) must be a whole number >= 0, got {r!r}")
    return r


def merged_tokens(num_patches: int, depth: int, r: int) -> list[int]:
    """Patch tokens entering each block when r are merged per block (capped at half of them)."""
    counts, n = [], num_patches
    for _ in range(depth):
        counts.append(n)
        n -= min(r, n // 2) if n >= 2 else 0
    return counts
