"""LV-ViT (Jiang et al., "All Tokens Matter: Token Labeling for Training Better Vision Transformers",
2021) as a timm model, and its DynamicViT host.

The backbone is written from the paper's description, with the original release's checkpoint key
names, so its weights (e.g. lvvit_s-26M-224-83.3.pth.tar) load unchanged:
- `patch_embed`: a convolution stem, conv1 7x7/2 (64 channels, no bias) -> bn1 -> ReLU, conv2 3x3 ->
  bn2 -> ReLU, conv3 3x3 -> bn3 -> ReLU, then `proj`, a convolution with kernel = stride =
  patch_size / 2 to the embedding width (with bias): a 224 px image gives 14 x 14 tokens at patch 16.
- A class token and a learned position embedding, as in ViT.
- Pre-norm blocks (`norm1`, `attn.qkv` without bias, `attn.proj`, `norm2`, `mlp.fc1`, `mlp.fc2`),
  MLP ratio 3, each residual branch scaled down: x = x + drop_path(branch(norm(x))) / skip_lam.
- `head` on the class token and `aux_head` on every patch token (token labeling); the prediction is
  head(class token) + 0.5 * max over patch tokens of aux_head(patch tokens).

`lvvit_s` (width 384, depth 16, 6 heads) and `lvvit_m` (512, 20, 8 heads), both with skip_lam 2,
are registered with timm when this module is imported (`import dynamicvit` does).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

from ...errors import CheckpointError, ConfigError, UnsupportedModelError
from .base import Host
from .vit import check_images, masked_attention

__all__ = ["AUX_WEIGHT", "ConvStem", "LVViT", "LVViTBlock", "LVViTHost", "checkpoint_filter_fn"]

# The weight of the token-labeling term in the prediction: head(cls) + AUX_WEIGHT * max_i aux_head(x_i).
AUX_WEIGHT = 0.5
# Channels of the convolution stem.
STEM_WIDTH = 64
# The original release (Jiang et al., TokenLabeling 1.0), ImageNet-1k at 224 px.
RELEASE = "https://github.com/zihangJiang/TokenLabeling/releases/download/1.0/"


class ConvStem(nn.Module):
    """Images (B, C_in, H, W) -> patch tokens (B, N, C): four convolutions, the first three with BN/ReLU.

    conv1 (stride 2) halves the image; `proj` (kernel = stride = patch_size / 2) makes one token per
    patch_size x patch_size pixels.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans: int = 3, embed_dim: int = 384):
        super().__init__()
        self.img_size = _pair(img_size)
        self.patch_size = _pair(patch_size)
        bad = [p for p in self.patch_size if p < 2 or p % 2]
        if bad:
            raise ConfigError(f"LV-ViT's stem needs an even patch_size >= 2 (it halves the image first), got {patch_size}")
        if any(s % p for s, p in zip(self.img_size, self.patch_size)):
            raise ConfigError(
                f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}; pick an img_size "
                f"divisible by {self.patch_size[0]}"
            )
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.in_chans = in_chans
        # Kept from timm's PatchEmbed: the stem takes exactly img_size (position embeddings are per token).
        self.strict_img_size = True
        W = STEM_WIDTH
        self.conv1 = nn.Conv2d(in_chans, W, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(W)
        self.conv2 = nn.Conv2d(W, W, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(W)
        self.conv3 = nn.Conv2d(W, W, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(W)
        self.act = nn.ReLU(inplace=True)
        half = (self.patch_size[0] // 2, self.patch_size[1] // 2)
        self.proj = nn.Conv2d(W, embed_dim, kernel_size=half, stride=half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.conv1(x)))  # (B, 64, H/2, W/2)
        x = self.act(self.bn2(self.conv2(x)))
        x = self.act(self.bn3(self.conv3(x)))
        x = self.proj(x)  # (B, C, gh, gw)
        return x.flatten(2).transpose(1, 2)  # (B, N, C), row-major


class LVViTBlock(nn.Module):
    """Pre-norm transformer block whose two residual branches are divided by `skip_lam`."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 3.0,
        qkv_bias: bool = False,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        skip_lam: float = 1.0,
    ):
        super().__init__()
        from timm.layers import Attention, DropPath, Mlp

        self.skip_lam = skip_lam
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        # One module for both branches, as in the original (each call draws its own mask).
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)

    def forward(self, x: torch.Tensor, attention: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
        """Tokens (B, M, C) -> (B, M, C).

        Args:
            attention: replaces `self.attn` on the normed tokens (the DynamicViT host passes masked
                attention here); None: the module's own (fused) attention.
        """
        x = x + self.drop_path((attention or self.attn)(self.norm1(x))) / self.skip_lam
        return x + self.drop_path(self.mlp(self.norm2(x))) / self.skip_lam


class LVViT(nn.Module):
    """LV-ViT classifier with timm's model interface (`forward_features`, `forward_head`,
    `reset_classifier`, `pretrained_cfg`, `num_prefix_tokens`)."""

    def __init__(
        self,
        img_size=224,
        patch_size=16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 384,
        depth: int = 16,
        num_heads: int = 6,
        mlp_ratio: float = 3.0,
        qkv_bias: bool = False,
        skip_lam: float = 2.0,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if embed_dim % num_heads:
            raise ConfigError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.global_pool = "token"
        self.patch_embed = ConvStem(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear stochastic depth
        self.blocks = nn.ModuleList(
            LVViTBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, rates[i], skip_lam)
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.aux_head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """New `head` and `aux_head` for `num_classes` (0: the model returns class-token features)."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.aux_head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, N, C) -> (B, 1 + N, C) with the class token and the position embedding."""
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C_in, H, W) -> final normed tokens (B, 1 + N, C)."""
        x = self._pos_embed(self.patch_embed(x))
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Final tokens (B, 1 + n, C) -> head(class token) + 0.5 * max over tokens of aux_head, (B, K)."""
        if pre_logits or self.num_classes == 0:
            return x[:, 0]
        return self.head(x[:, 0]) + AUX_WEIGHT * self.aux_head(x[:, 1:]).amax(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class LVViTHost(Host):
    """DynamicViT on an `LVViT`: the class token is the one prefix token; the aux head's max runs
    over the kept patch tokens only; token distillation is a KL divergence between the per-token
    aux-head distributions of student and teacher.

    Modifications against `LVViTBlock.forward` on the training path, and with merged tokens:
    `masked_attention` in place of the attention's own (the branch scaling and drop path are the
    block's own).
    """

    family = "lvvit"
    token_distill = "kl"

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        return isinstance(model, LVViT)

    @classmethod
    def check(cls, model: nn.Module) -> None:
        bad = {type(b).__name__ for b in model.blocks if not isinstance(b, LVViTBlock)}
        if bad:
            raise UnsupportedModelError(f"LV-ViT with block type(s) {sorted(bad)}; only `LVViTBlock` is supported")
        if model.num_classes == 0:
            raise UnsupportedModelError("an LV-ViT without classifier (num_classes=0) has no aux head to prune with")

    # -- geometry --------------------------------------------------------------------------------

    @property
    def in_chans(self) -> int:
        return self.model.patch_embed.in_chans

    # -- forward pieces --------------------------------------------------------------------------

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self.in_chans, self.img_size)
        return self.model._pos_embed(self.model.patch_embed(images))

    def block(
        self, i: int, x: torch.Tensor, policy: Optional[torch.Tensor] = None, sizes: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        blk = self.blocks[i]
        if policy is None and sizes is None:
            return blk(x)
        return self.block_with(i, x, lambda t: masked_attention(blk.attn, t, policy, sizes=sizes))

    def block_with(self, i: int, x: torch.Tensor, attention: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Block i with `attention` (normed tokens -> the attention branch's output) in place of its own."""
        return self.blocks[i](x, attention=attention)

    def logits(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """head(class token) + 0.5 * max of aux_head over the kept patch tokens, (B, K).

        On the training path (`mask` given) the dropped tokens are still in `x`: they are excluded
        from the max. An image whose tokens were all dropped gets the class head alone.
        """
        m = self.model
        if mask is None:
            return m.forward_head(x)
        aux = m.aux_head(x[:, self.num_prefix_tokens :])  # (B, N, K)
        kept = mask.detach().unsqueeze(-1) > 0.5  # (B, N, 1)
        best = aux.masked_fill(~kept, float("-inf")).amax(dim=1)  # (B, K)
        best = torch.where(kept.any(dim=1), best, torch.zeros_like(best))
        return m.head(x[:, 0]) + AUX_WEIGHT * best

    def class_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The class head alone: what the reference trains with CE and distills from the teacher."""
        return self.model.head(x[:, 0])

    def distill_targets(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token aux-head logits of the patch tokens, (B, n, K)."""
        return self.model.aux_head(x[:, self.num_prefix_tokens :])

    # -- weights ---------------------------------------------------------------------------------

    def filter_state(self, state: dict) -> dict:
        return checkpoint_filter_fn(state, self.model)


def checkpoint_filter_fn(state: dict, model: LVViT) -> dict:
    """Map LV-ViT weights onto `model`: the original release (a state dict, or one under 'state_dict' /
    'model'), with the position embedding resized for another grid and BatchNorm step counters
    filled in when a release left them out. Other mismatches are left for the strict load to name."""
    from timm.layers import resample_abs_pos_embed

    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    own = model.state_dict()
    pos = state.get("pos_embed")
    # Another grid of the same width is resized; another width is left for the strict load to report.
    if pos is not None and pos.ndim == 3 and pos.shape[1:] != own["pos_embed"].shape[1:] and pos.shape[-1] == own["pos_embed"].shape[-1]:
        n_old = pos.shape[1] - model.num_prefix_tokens
        side = int(round(n_old**0.5))
        if side * side != n_old:
            raise CheckpointError(
                f"pos_embed of shape {tuple(pos.shape)} cannot be resized to {tuple(own['pos_embed'].shape)}: "
                f"its {n_old} patch positions are not a square grid; build the model with the checkpoint's img_size"
            )
        state["pos_embed"] = resample_abs_pos_embed(
            pos, new_size=list(model.patch_embed.grid_size), old_size=[side, side],
            num_prefix_tokens=model.num_prefix_tokens,
        )
    for k, v in own.items():
        if k.endswith("num_batches_tracked") and k not in state and k.replace("num_batches_tracked", "running_mean") in state:
            state[k] = v.clone()
    return state


# -- timm registration ---------------------------------------------------------------------------


def _pair(value) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, (int, float)) else tuple(int(v) for v in value)


def _cfg(url: str, crop_pct: float) -> dict:
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": crop_pct,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.conv1",
        "classifier": ("head", "aux_head"),  # both are dropped for weights of another class count
    }


def _default_cfgs():
    from timm.models import generate_default_cfgs

    # Evaluation crops of the original release: 0.9 for -S, 1.0 for -M.
    return generate_default_cfgs({
        "lvvit_s.tl_in1k": _cfg(RELEASE + "lvvit_s-26M-224-83.3.pth.tar", crop_pct=0.9),
        "lvvit_m.tl_in1k": _cfg(RELEASE + "lvvit_m-56M-224-84.0.pth.tar", crop_pct=1.0),
    })


default_cfgs = _default_cfgs()


def _create(variant: str, pretrained: bool, **kwargs) -> LVViT:
    from timm.models import build_model_with_cfg

    return build_model_with_cfg(LVViT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


def lvvit_s(pretrained: bool = False, **kwargs) -> LVViT:
    """LV-ViT-S: width 384, depth 16, 6 heads, MLP ratio 3, skip_lam 2 (26M parameters), 224 px."""
    args = dict(patch_size=16, embed_dim=384, depth=16, num_heads=6, mlp_ratio=3.0, skip_lam=2.0)
    return _create("lvvit_s", pretrained, **{**args, **kwargs})


def lvvit_m(pretrained: bool = False, **kwargs) -> LVViT:
    """LV-ViT-M: width 512, depth 20, 8 heads, MLP ratio 3, skip_lam 2 (56M parameters), 224 px."""
    args = dict(patch_size=16, embed_dim=512, depth=20, num_heads=8, mlp_ratio=3.0, skip_lam=2.0)
    return _create("lvvit_m", pretrained, **{**args, **kwargs})


def _register() -> None:
    from timm.models import register_model

    for fn in (lvvit_s, lvvit_m):
        register_model(fn)


_register()
