"""timm's VisionTransformer (ViT, DeiT, DeiT III, registers) as a DynamicViT host.

Mirrors timm 1.0's `VisionTransformer.forward_features` / `forward_head` and `Block.forward`
(pre-norm, LayerScale, drop path): `block` with a policy or token sizes is that forward with
`masked_attention` in place of the block's attention; without either it is the block itself. LayerScale, qk-norm, register
and distillation tokens, and any image or patch size the backbone supports work unchanged.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...errors import CheckpointError, ConfigError, UnsupportedModelError
from ..ops import masked_softmax, policy_bias, size_bias
from .base import Host

SUPPORTED_POOLS = ("token", "avg")


class ViTHost(Host):
    family = "vit"
    # Masked attention on the training path: False computes `masked_softmax` with explicit fp32
    # products (the reference formula); True runs F.scaled_dot_product_attention with the policy as
    # an additive bias (`ops.policy_bias`: same forward to ~1e-6 where a kept key leads the row,
    # gradient bounded alike). Set per model with `dynamicvit.fused_masked_attention`.
    fused_masked_attn: bool = False

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        from timm.models.vision_transformer import VisionTransformer

        return isinstance(model, VisionTransformer)

    @classmethod
    def check(cls, model: nn.Module) -> None:
        from timm.layers import Attention
        from timm.models.vision_transformer import Block

        name = type(model).__name__
        bad_blocks = {type(b).__name__ for b in model.blocks if type(b) is not Block}
        if bad_blocks:
            raise UnsupportedModelError(
                f"{name} uses block type(s) {sorted(bad_blocks)}; only timm's pre-norm `Block` is supported"
            )
        bad_attn = {type(b.attn).__name__ for b in model.blocks if type(b.attn) is not Attention}
        if bad_attn or any(getattr(b.attn, "gate", None) is not None for b in model.blocks):
            raise UnsupportedModelError(
                f"{name} uses attention {sorted(bad_attn) or ['gated Attention']}; only timm's `Attention` is supported"
            )
        if model.attn_pool is not None or model.global_pool not in SUPPORTED_POOLS:
            raise UnsupportedModelError(
                f"{name} pools with global_pool={model.global_pool!r}; supported: {SUPPORTED_POOLS} "
                "(pass global_pool='token' or 'avg' when creating the model)"
            )
        if not isinstance(model.patch_drop, nn.Identity):
            raise UnsupportedModelError(
                "patch dropout (patch_drop_rate > 0) changes the token count at random; build the model without it"
            )
        if getattr(model, "dynamic_img_size", False):
            raise UnsupportedModelError(
                "dynamic_img_size=True is not supported: the number of kept tokens per stage is fixed by the "
                "image size; build the model with img_size=<your size> instead"
            )

    # -- geometry --------------------------------------------------------------------------------

    @property
    def in_chans(self) -> int:
        return self.model.patch_embed.proj.in_channels

    # -- forward pieces --------------------------------------------------------------------------

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        m = self.model
        check_images(images, self.in_chans, self.img_size)
        x = m.patch_embed(images)
        x = m._pos_embed(x)
        x = m.patch_drop(x)
        return m.norm_pre(x)

    def block(
        self, i: int, x: torch.Tensor, policy: Optional[torch.Tensor] = None, sizes: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        blk = self.blocks[i]
        if policy is None and sizes is None:
            return blk(x)
        return self.block_with(i, x, lambda t: masked_attention(blk.attn, t, policy, self.fused_masked_attn, sizes))

    def block_with(self, i: int, x: torch.Tensor, attention: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Block i with `attention` (normed tokens -> the attention branch's output) in place of its own."""
        blk = self.blocks[i]
        x = x + blk.drop_path1(blk.ls1(attention(blk.norm1(x))))
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))

    def logits(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        m = self.model
        if mask is None or m.global_pool != "avg":
            return m.forward_head(x)
        # Average pooling over the kept patch tokens only (the masked ones are still in x).
        w = mask.unsqueeze(-1).to(x.dtype)  # (B, N, 1)
        x = (x[:, self.num_prefix_tokens :] * w).sum(1) / w.sum(1).clamp_min(1e-6)
        return m.head(m.head_drop(m.fc_norm(x)))

    # -- weights ---------------------------------------------------------------------------------

    def filter_state(self, state: dict) -> dict:
        """timm's own adaptation of ViT weights (position embedding resize, foreign layouts)."""
        from timm.models.vision_transformer import checkpoint_filter_fn

        try:
            return checkpoint_filter_fn(state, self.model)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"the weights do not fit {type(self.model).__name__}: {e}") from None


def check_images(images: torch.Tensor, in_chans: int, img_size: tuple[int, int]) -> None:
    """A clear error for images the backbone was not built for (before the backbone's own assertions)."""
    if images.ndim != 4:
        raise ConfigError(f"expected images of shape (B, C, H, W), got a tensor of shape {tuple(images.shape)}")
    if images.shape[1] != in_chans or tuple(images.shape[-2:]) != tuple(img_size):
        raise ConfigError(
            f"the model takes images of {in_chans} channel(s) at {img_size[0]}x{img_size[1]} px, got shape "
            f"{tuple(images.shape)}; resize/convert the images, or build the model with img_size=... / in_chans=..."
        )


def masked_attention(
    attn: nn.Module,
    x: torch.Tensor,
    policy: Optional[torch.Tensor] = None,
    fused: bool = False,
    sizes: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """A timm `Attention` module's forward with `masked_softmax` in place of the softmax, and/or
    proportional attention for merged tokens.

    Uses the module's own weights (qkv, q/k norm, output norm, proj) and dropouts.

    Args:
        attn: a `timm.layers.Attention`.
        x: tokens, (B, M, C).
        policy: (B, M, 1), or None when no token is masked (the inference path).
        fused: F.scaled_dot_product_attention with `policy_bias` instead of explicit products. Without
            a policy attention is always fused: `size_bias` is an ordinary float mask.
        sizes: (B, M), how many original tokens each token holds; None: one each.
    """
    q, k, v = attention_heads(attn, x)
    if policy is None or fused:
        if policy is not None:
            bias = policy_bias(policy, q.dtype, sizes)
        else:
            bias = None if sizes is None else size_bias(sizes, q.dtype)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if attn.training else 0.0
        )  # (B, H, M, D)
    else:
        a = (q * attn.scale) @ k.transpose(-2, -1)  # (B, H, M, M)
        x = attn.attn_drop(masked_softmax(a, policy, sizes)) @ v
    return attention_output(attn, x)


def attention_heads(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values of a timm `Attention` (its qkv projection and q/k norms), (B, H, M, D) each."""
    B, M, _ = x.shape
    qkv = attn.qkv(x).reshape(B, M, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, M, D)
    q, k, v = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def attention_output(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The heads' outputs (B, H, M, D) -> (B, M, C) through the module's output norm, projection and dropout."""
    B, H, M, D = x.shape
    x = attn.norm(x.transpose(1, 2).reshape(B, M, H * D))
    return attn.proj_drop(attn.proj(x))
