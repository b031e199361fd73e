"""Opt-in speed-ups that keep the weights, the state-dict keys and the results.

- `fast_patch_embed`: timm's patch-embedding convolution (kernel = stride = patch size) computed as a
  reshape and one matrix product with the same weights, for any timm model with a `PatchEmbed`,
  dense ones too. On a GPU the convolution is the slow way to do this product (DeiT-S at batch 256
  in bf16 on one H100: 1.80 ms for timm's 16x16/16 convolution, 0.27 ms for the matrix product;
  docs/results.md); the patch embedding is shared by a dense model and its pruned version, so
  compare the two with the same embedding.
- `fused_masked_attention`: the training path's masked attention through
  F.scaled_dot_product_attention with the policy as an additive bias (`ops.policy_bias`).
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.vit import DynamicViT
from ..errors import UnsupportedModelError

_logger = logging.getLogger(__name__)


class PatchProjection(nn.Conv2d):
    """A non-overlapping, unpadded patch convolution computed as reshape + one matrix product.

    A `nn.Conv2d` in everything but its forward: same parameters (`weight` (E, C, p_h, p_w), `bias`),
    same state-dict keys, same attributes (`in_channels`, `kernel_size`, ... which other code reads)
    and the same output, (B, E, H // p_h, W // p_w) with trailing rows and columns that do not fill
    a patch ignored, as the convolution does. The output is a permuted view of the (B, L, E) product,
    so timm's following `flatten(2).transpose(1, 2)` gives back that product without a copy.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        ph, pw = self.kernel_size
        gh, gw = H // ph, W // pw
        if H != gh * ph or W != gw * pw:
            x = x[..., : gh * ph, : gw * pw]
        # (B, C, gh, ph, gw, pw) -> (B, gh, gw, C, ph, pw): each patch's pixels in the weight's order
        patches = x.reshape(B, C, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * ph * pw)
        out = F.linear(patches, self.weight.reshape(self.out_channels, -1), self.bias)  # (B, L, E)
        return out.view(B, gh, gw, self.out_channels).permute(0, 3, 1, 2)  # (B, E, gh, gw)

    @classmethod
    def replacing(cls, conv: nn.Conv2d) -> "PatchProjection":
        """A `PatchProjection` sharing `conv`'s parameters (not copies)."""
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                  bias=conv.bias is not None, device="meta")
        new.weight = conv.weight
        new.bias = conv.bias
        new.train(conv.training)
        return new


def fast_patch_embed(model: nn.Module) -> nn.Module:
    """Compute every timm `PatchEmbed` of `model` as a reshape and one matrix product, in place.

    Works on any model holding timm `PatchEmbed` modules (ViT, DeiT, a `DynamicViT`, ...), at any
    image size the model takes (dynamic sizes and padding included: padding happens before the
    projection). The parameters are shared, not copied, and keep their names, so checkpoints load
    and save as before, and optimizers holding the parameters are unaffected. Forward hooks on the
    old convolutions are not carried over. Exports with torch.export and ONNX (reshape, permute,
    matmul). Calling it again changes nothing.

    Args:
        model: the model to change.

    Returns:
        `model`.

    Raises:
        UnsupportedModelError: no timm `PatchEmbed` in `model`, or one whose projection is not a
            plain `nn.Conv2d` with kernel = stride, no padding, no dilation and one group (nothing
            is changed then).
    """
    from timm.layers import PatchEmbed

    embeds = [(name, m) for name, m in model.named_modules() if isinstance(m, PatchEmbed)]
    if not embeds:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no timm PatchEmbed; fast_patch_embed applies to timm ViTs "
            "whose patch embedding is timm.layers.PatchEmbed"
        )
    todo = []
    for name, embed in embeds:
        proj = embed.proj
        if isinstance(proj, PatchProjection):
            continue
        problem = _patch_conv_problem(proj)
        if problem:
            raise UnsupportedModelError(
                f"{name or 'the model'}.proj is {problem}: not a non-overlapping patch projection, so it cannot "
                "be computed as one matrix product; leave this model's patch embedding as it is"
            )
        todo.append(embed)
    for embed in todo:
        embed.proj = PatchProjection.replacing(embed.proj)
    _logger.debug("fast_patch_embed: %d patch embedding(s) replaced", len(todo))
    return model


def _patch_conv_problem(proj: nn.Module) -> str:
    """Why `proj` is not a plain non-overlapping patch convolution ('' when it is one)."""
    if type(proj) is not nn.Conv2d:
        return f"a {type(proj).__name__}, not a plain nn.Conv2d"
    if tuple(proj.stride) != tuple(proj.kernel_size):
        return f"a convolution with kernel {tuple(proj.kernel_size)} and stride {tuple(proj.stride)} (overlapping patches)"
    if isinstance(proj.padding, str) or any(proj.padding):
        return f"a convolution with padding {proj.padding!r}"
    if any(d != 1 for d in proj.dilation):
        return f"a convolution with dilation {tuple(proj.dilation)}"
    if proj.groups != 1:
        return f"a grouped convolution (groups={proj.groups})"
    return ""


def fused_masked_attention(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch a DynamicViT's training-path masked attention to the fused kernel (or back), in place.

    With `enabled`, every block with a policy runs F.scaled_dot_product_attention with the policy as
    an additive bias (`dynamicvit.core.ops.policy_bias`) instead of the explicit fp32 products of
    `masked_softmax`: the same forward to ~1e-6 where a kept key leads each row and a gradient
    bounded the same way (see `policy_bias`), computed by the fused / memory-efficient kernels.
    The inference path is not affected (it already uses the backbone's own attention).

    Args:
        model: a `DynamicViT`.
        enabled: True for the fused kernel, False for the reference formula (the default).

    Returns:
        `model`.
    """
    if not isinstance(model, DynamicViT):
        raise UnsupportedModelError(
            f"fused_masked_attention applies to a DynamicViT, not {type(model).__name__} (dense models have no mask)"
        )
    if not hasattr(model.host, "fused_masked_attn"):
        raise UnsupportedModelError(f"the {model.host.family!r} host has no fused masked attention")
    model.host.fused_masked_attn = bool(enabled)
    return model
