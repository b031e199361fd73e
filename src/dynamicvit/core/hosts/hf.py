"""Hugging Face transformers vision transformers as DynamicViT hosts: ViT, DeiT, DINOv2 (with and
without registers) and CLIP's vision tower.

Supported classes (`SUPPORTED`): `ViTModel`, `ViTForImageClassification`, `DeiTModel`,
`DeiTForImageClassification`, `DeiTForImageClassificationWithTeacher` (class and distillation token),
`Dinov2Model`, `Dinov2ForImageClassification`, `Dinov2WithRegistersModel`,
`Dinov2WithRegistersForImageClassification` (class and register tokens), `CLIPVisionModel` and
`CLIPVisionModelWithProjection` (the image embedding from the class token). They follow the module
layout of transformers >= `MIN_TRANSFORMERS`; nothing here imports transformers (a model is recognized
by its class), so `import dynamicvit` stays light.

How the pieces map onto the `Host` protocol:
- `embed`: the model's own embeddings module (and CLIP's pre-norm). The model runs at one image size
  (`img_size`: config.image_size, or the size its image processor crops to, e.g. 224 px for DINOv2
  released at 518): at another size than the position table's, the embeddings' own interpolation runs.
- `block` without a policy (the inference path, on the shorter sequence): the layer's own forward, so
  its attention implementation ("sdpa" or "eager") is the one that runs. With a policy (the training
  path): the same layer, its attention recomputed from its own q/k/v/o projections with
  `ops.masked_softmax` (or `ops.policy_bias` in fused attention, see `fused_masked_attn`); norms,
  dropout, LayerScale and drop path are the layer's own modules.
- `norm`: the final LayerNorm (CLIP: none, its post-norm acts on the pooled class token only).
- `logits`: what the class computes from the final tokens: the classifier on the class token (DeiT
  with teacher: the mean of both heads; DINOv2: the class token next to the mean of the patch tokens,
  over the kept ones), or for base models the pooled output (CLIP with projection: the image embedding).
  Base models have no classes (`num_classes` 0), as timm models built with num_classes=0.
- `outputs`: a `TransformersOutput` with the names a transformers user reads (`logits`,
  `pooler_output`, `image_embeds`, `last_hidden_state` of the kept tokens, and their indices).

What the host reads besides the model (set by `dynamicvit.weights.hf` when it builds one from a folder
or a checkpoint): `model.dynamicvit_hf = {"img_size": [H, W], "processor": {...}}`, the run size and the
image processor's settings (`preprocessor_config.json`); without them the model runs at
config.image_size with the preprocessing of the family's official releases (`DEFAULT_PROCESSORS`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...errors import ConfigError, UnsupportedModelError
from ..ops import masked_softmax, policy_bias
from .base import Host
from .hf_processor import DEFAULT_PROCESSORS, processor_preprocessing
from .vit import check_images

# The first release whose ViT, DeiT, DINOv2 and CLIP layers all have q/k/v/o projections (`q_proj`, ...).
MIN_TRANSFORMERS = "5.18"
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


@dataclass(frozen=True)
class Arch:
    """One supported transformers class.

    Attributes:
        model_type: its config's `model_type`.
        base: the attribute holding the base model ("" when the class is the base model).
        head: how the output comes out of the final tokens: "classifier" (class token),
            "two_heads" (DeiT with teacher), "token_and_mean" (DINOv2's classifier), "pooler" (ViT/DeiT
            base: the pooler when there is one, else the class token), "class_token", "clip",
            "clip_projection".
    """

    model_type: str
    base: str
    head: str

    @property
    def classifier(self) -> bool:
        return self.head in ("classifier", "two_heads", "token_and_mean")

    @property
    def clip(self) -> bool:
        return self.model_type == "clip_vision_model"


SUPPORTED: dict[str, Arch] = {
    "ViTModel": Arch("vit", "", "pooler"),
    "ViTForImageClassification": Arch("vit", "vit", "classifier"),
    "DeiTModel": Arch("deit", "", "pooler"),
    "DeiTForImageClassification": Arch("deit", "deit", "classifier"),
    "DeiTForImageClassificationWithTeacher": Arch("deit", "deit", "two_heads"),
    "Dinov2Model": Arch("dinov2", "", "class_token"),
    "Dinov2ForImageClassification": Arch("dinov2", "dinov2", "token_and_mean"),
    "Dinov2WithRegistersModel": Arch("dinov2_with_registers", "", "class_token"),
    "Dinov2WithRegistersForImageClassification": Arch("dinov2_with_registers", "dinov2_with_registers", "token_and_mean"),
    "CLIPVisionModel": Arch("clip_vision_model", "", "clip"),
    "CLIPVisionModelWithProjection": Arch("clip_vision_model", "vision_model", "clip_projection"),
}

def is_transformers_model(model: nn.Module) -> bool:
    """True for an instance of a transformers class (supported or not); transformers is not imported."""
    return type(model).__module__.startswith("transformers.")


@dataclass
class TransformersOutput:
    """What a sparsified transformers model returns in eval mode (tokens removed), with transformers' names.

    Attributes:
        last_hidden_state: the final tokens, (B, P + k, C): the P prefix tokens (class, distillation,
            registers) then the k kept patch tokens in the order `kept_indices[-1]` gives (normed as the
            model norms its own last_hidden_state; CLIP's is not).
        kept_indices: per stage, the kept patch tokens as indices into the original grid (row-major,
            0..N-1), each (B, k_s).
        logits: classifiers: (B, num_labels). DeiT with teacher: the mean of `cls_logits` and
            `distillation_logits`.
        pooler_output: base models: the pooled output of the model (ViT/DeiT: its pooler; DINOv2: the
            normed class token; CLIP: the post-normed class token).
        image_embeds: CLIPVisionModelWithProjection: the projected image embedding, (B, projection_dim).
        cls_logits, distillation_logits: DeiT with teacher: the class and distillation heads, (B, num_labels).
    """

    last_hidden_state: torch.Tensor
    kept_indices: list[torch.Tensor]
    logits: Optional[torch.Tensor] = None
    pooler_output: Optional[torch.Tensor] = None
    image_embeds: Optional[torch.Tensor] = None
    cls_logits: Optional[torch.Tensor] = None
    distillation_logits: Optional[torch.Tensor] = None

    def __getitem__(self, key: str):
        """`out["logits"]`, as transformers outputs allow."""
        if key not in {f.name for f in fields(self)}:
            raise KeyError(key)
        return getattr(self, key)

    def keys(self) -> list[str]:
        """The names of the fields that are set."""
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]


class _LayerParts(NamedTuple):
    """A pre-norm layer as two residual branches: x + after_attn(attn(norm1(x))), then x + after_mlp(mlp(norm2(x)))."""

    norm1: nn.Module
    attn: nn.Module
    after_attn: tuple[Callable, ...]
    norm2: nn.Module
    mlp: nn.Module
    after_mlp: tuple[Callable, ...]


# Layer class -> its parts (the attribute names of transformers >= MIN_TRANSFORMERS).
_LAYERS: dict[str, Callable[[nn.Module], _LayerParts]] = {
    "ViTLayer": lambda m: _LayerParts(m.layernorm_before, m.attention, (m.dropout,), m.layernorm_after, m.mlp, (m.dropout,)),
    "Dinov2Layer": lambda m: _LayerParts(
        m.norm1, m.attention, (m.layer_scale1, m.drop_path), m.norm2, m.mlp, (m.layer_scale2, m.drop_path)),
    "CLIPEncoderLayer": lambda m: _LayerParts(m.layer_norm1, m.self_attn, (), m.layer_norm2, m.mlp, ()),
}
_LAYERS["DeiTLayer"] = _LAYERS["ViTLayer"]
_LAYERS["Dinov2WithRegistersLayer"] = _LAYERS["Dinov2Layer"]


class HFHost(Host):
    """DynamicViT on a transformers ViT, DeiT, DINOv2 or CLIP vision model (see the module docstring).

    Modifications against the transformers layers on the training path: the attention's softmax is
    `masked_softmax` (computed from the layer's own projections, scale and dropout); everything else
    is the layer's own modules. The inference path runs the layers unchanged.
    """

    family = "transformers"
    merges_tokens = False  # the layers run as transformers defines them, without a size bias
    packs_tokens = False  # nor on packed sequences
    # Masked attention on the training path: False computes `masked_softmax` (the reference formula);
    # True runs F.scaled_dot_product_attention with `policy_bias` (see `dynamicvit.fused_masked_attention`).
    fused_masked_attn: bool = False

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.arch = SUPPORTED[type(model).__name__]
        self.base = getattr(model, self.arch.base) if self.arch.base else model
        self.config = model.config

    # -- which models ----------------------------------------------------------------------------

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        return is_transformers_model(model)

    @classmethod
    def check(cls, model: nn.Module) -> None:
        name = type(model).__name__
        arch = SUPPORTED.get(name)
        if arch is None:
            raise UnsupportedModelError(
                f"transformers' {name} is not supported; dynamicvit prunes {', '.join(SUPPORTED)}"
            )
        base = getattr(model, arch.base) if arch.base else model
        problem = _layout_problem(base, arch)
        if problem:
            raise UnsupportedModelError(
                f"{name}: {problem}; dynamicvit follows the layout of transformers >= {MIN_TRANSFORMERS}, "
                f"upgrade it: pip install -U 'transformers>={MIN_TRANSFORMERS}'"
            )
        impl = getattr(model.config, "_attn_implementation", None)
        if impl not in ATTN_IMPLEMENTATIONS:
            raise UnsupportedModelError(
                f"{name} uses attn_implementation={impl!r}; supported: {ATTN_IMPLEMENTATIONS} (load it with "
                "attn_implementation='sdpa')"
            )
        _check_positions(model, arch, base)

    # -- geometry --------------------------------------------------------------------------------

    @property
    def blocks(self) -> nn.ModuleList:
        return _layers_of(self.base, self.arch)

    @property
    def num_prefix_tokens(self) -> int:
        return _num_prefix_tokens(self.config, self.arch)

    @property
    def img_size(self) -> tuple[int, int]:
        return run_size(self.model)

    @property
    def patch_size(self) -> tuple[int, int]:
        return _pair(self.config.patch_size)

    @property
    def grid_size(self) -> tuple[int, int]:
        (h, w), (ph, pw) = self.img_size, self.patch_size
        return h // ph, w // pw

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid_size
        return gh * gw

    @property
    def in_chans(self) -> int:
        return int(self.config.num_channels)

    @property
    def embed_dim(self) -> int:
        return int(self.config.hidden_size)

    @property
    def num_classes(self) -> int:
        return int(self.config.num_labels) if self.arch.classifier else 0

    @property
    def patch_embed(self) -> nn.Module:
        embeddings = self.base.embeddings
        return embeddings.patch_embedding if self.arch.clip else embeddings.patch_embeddings

    def head_modules(self) -> list[nn.Module]:
        names = ("layernorm", "pooler", "post_layernorm")
        mods = [m for n in names if isinstance(m := getattr(self.base, n, None), nn.Module)]
        heads = ("classifier", "cls_classifier", "distillation_classifier", "visual_projection")
        return mods + [m for n in heads if isinstance(m := getattr(self.model, n, None), nn.Module)]

    # -- where the backbone comes from, and how images are prepared ------------------------------

    @property
    def architecture(self) -> str:
        """The name a sparse model of it goes by (`model_name`): "hf:" and the class."""
        return "hf:" + type(self.model).__name__

    @property
    def processor(self) -> dict:
        """The image processor's settings: the model's own (preprocessor_config.json) or its family's."""
        own = _hf_state(self.model).get("processor")
        return dict(own) if own else dict(DEFAULT_PROCESSORS[self.arch.model_type])

    @property
    def preprocessing(self) -> dict:
        return processor_preprocessing(self.processor, self.arch.model_type, (self.in_chans, *self.img_size))

    @property
    def pretrained_cfg(self) -> dict:
        prep = self.preprocessing
        cfg = {k: prep[k] for k in ("mean", "std", "crop_pct", "crop_mode", "interpolation")}
        return {"architecture": self.architecture, "num_classes": self.num_classes,
                "input_size": tuple(prep["input_size"]), **cfg}

    @property
    def class_names(self) -> Optional[list[str]]:
        labels = getattr(self.config, "id2label", None) or {}
        names = [labels.get(i, labels.get(str(i))) for i in range(self.num_classes)]
        # transformers names unnamed classes LABEL_0, LABEL_1, ...
        if not names or any(n is None for n in names) or all(n == f"LABEL_{i}" for i, n in enumerate(names)):
            return None
        return [str(n) for n in names]

    def settings(self) -> dict:
        """The class, its config (plain JSON, never a path), attention implementation, run size and image
        processor: enough to rebuild the model without transformers opening or downloading anything."""
        config = json.loads(self.config.to_json_string(use_diff=False))  # JSON as config.json holds it
        for key in ("_name_or_path", "auto_map", "transformers_version"):
            config.pop(key, None)
        return {"transformers": {
            "class": type(self.model).__name__,
            "config": config,
            "attn_implementation": self.config._attn_implementation,
            "img_size": list(self.img_size),
            "processor": _hf_state(self.model).get("processor"),
        }}

    # -- forward pieces --------------------------------------------------------------------------

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self.in_chans, self.img_size)
        embeddings = self.base.embeddings
        conv = self.patch_embed if isinstance(self.patch_embed, nn.Conv2d) else self.patch_embed.projection
        pixels = images.to(conv.weight.dtype)  # as the model's own forward casts them
        if self.arch.model_type.startswith("dinov2"):
            return embeddings(pixels)  # interpolates the position table itself when the grid differs
        x = embeddings(pixels, interpolate_pos_encoding=self.img_size != _pair(self.config.image_size))
        return self.base.pre_layrnorm(x) if self.arch.clip else x

    def block(self, i: int, x: torch.Tensor, policy: Optional[torch.Tensor] = None,
              sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
        if sizes is not None:  # refused when the model is built (see `check`); a guard for direct calls
            raise UnsupportedModelError("merged tokens (merge_dropped) are not supported for transformers models yet")
        layer = self.blocks[i]
        if policy is None:
            return layer(x, None)  # no attention mask (CLIP's layer takes it positionally)
        p = _LAYERS[type(layer).__name__](layer)
        h = masked_attention(p.attn, p.norm1(x), policy, self.fused_masked_attn)
        for f in p.after_attn:
            h = f(h)
        x = x + h
        h = p.mlp(p.norm2(x))
        for f in p.after_mlp:
            h = f(h)
        return x + h

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.arch.clip else self.base.layernorm(x)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(images)
        for i in range(self.depth):
            x = self.block(i, x)
        return self.norm(x)

    def logits(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        head, m = self.arch.head, self.model
        if head == "classifier":
            return m.classifier(x[:, 0])
        if head == "two_heads":
            return (m.cls_classifier(x[:, 0]) + m.distillation_classifier(x[:, 1])) / 2
        if head == "token_and_mean":
            return m.classifier(torch.cat([x[:, 0], self._patch_mean(x, mask)], dim=1))
        return self._pooled(x, projected=True)

    def outputs(self, x: torch.Tensor, kept_indices: list[torch.Tensor]) -> TransformersOutput:
        out = TransformersOutput(last_hidden_state=x, kept_indices=kept_indices)
        head, m = self.arch.head, self.model
        if head == "two_heads":
            out.cls_logits, out.distillation_logits = m.cls_classifier(x[:, 0]), m.distillation_classifier(x[:, 1])
            out.logits = (out.cls_logits + out.distillation_logits) / 2
        elif self.arch.classifier:
            out.logits = self.logits(x)
        else:
            out.pooler_output = self._pooled(x, projected=False)
            if head == "clip_projection":
                out.image_embeds = m.visual_projection(out.pooler_output)
        return out

    def _pooled(self, x: torch.Tensor, projected: bool) -> Optional[torch.Tensor]:
        """A base model's pooled output (the projected image embedding when `projected` and CLIP has one)."""
        head = self.arch.head
        if self.arch.clip:
            pooled = self.base.post_layernorm(x[:, 0])
            return self.model.visual_projection(pooled) if projected and head == "clip_projection" else pooled
        pooler = getattr(self.base, "pooler", None)
        return pooler(x) if head == "pooler" and pooler is not None else x[:, 0]

    def _patch_mean(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """The mean of the patch tokens, (B, C): over the kept ones on the training path (`mask` (B, N))."""
        patches = x[:, self.num_prefix_tokens :]
        if mask is None:
            return patches.mean(dim=1)
        w = mask.unsqueeze(-1).to(x.dtype)  # (B, N, 1)
        return (patches * w).sum(1) / w.sum(1).clamp_min(1e-6)


def masked_attention(attn: nn.Module, x: torch.Tensor, policy: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """A transformers attention module's forward with `masked_softmax` in place of the softmax.

    Uses the module's own q/k/v projections, scale, dropout probability and output projection.

    Args:
        attn: a ViT/DeiT/DINOv2/CLIP attention module of transformers >= MIN_TRANSFORMERS.
        x: normed tokens, (B, M, C).
        policy: (B, M, 1); 1 for prefix and kept tokens, 0 for dropped ones.
        fused: F.scaled_dot_product_attention with `policy_bias` instead of explicit products.
    """
    B, M, _ = x.shape
    shape = (B, M, -1, attn.head_dim)
    q, k, v = (proj(x).view(shape).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))  # (B, H, M, D)
    scale = attn.scaling if hasattr(attn, "scaling") else attn.scale
    p = (attn.attention_dropout if hasattr(attn, "attention_dropout") else attn.dropout) if attn.training else 0.0
    if fused:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=policy_bias(policy, q.dtype), dropout_p=p, scale=scale)
    else:
        weights = masked_softmax((q @ k.transpose(-2, -1)) * scale, policy)  # (B, H, M, M)
        out = F.dropout(weights, p, training=attn.training) @ v
    out = out.transpose(1, 2).reshape(B, M, -1)  # (B, M, H * D)
    return (attn.o_proj if hasattr(attn, "o_proj") else attn.out_proj)(out)


def run_size(model: nn.Module) -> tuple[int, int]:
    """The image size (H, W) a transformers model runs at: set by dynamicvit's loaders, else config.image_size."""
    size = _hf_state(model).get("img_size")
    return _pair(size) if size else _pair(model.config.image_size)


# -- helpers --------------------------------------------------------------------------------------


def _hf_state(model: nn.Module) -> dict:
    return getattr(model, "dynamicvit_hf", None) or {}


def _pair(value) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, (int, float)) else tuple(int(v) for v in value)


def _layers_of(base: nn.Module, arch: Arch) -> nn.ModuleList:
    if arch.model_type in ("vit", "deit"):
        return base.layers
    encoder = base.encoder
    return encoder.layers if arch.model_type == "clip_vision_model" else encoder.layer


def _num_prefix_tokens(config, arch: Arch) -> int:
    """Class token; DeiT: + distillation token; DINOv2 with registers: + its register tokens."""
    extra = {"deit": 1, "dinov2_with_registers": int(getattr(config, "num_register_tokens", 0))}
    return 1 + extra.get(arch.model_type, 0)


def _layout_problem(base: nn.Module, arch: Arch) -> str:
    """Why the base model's layers are not ones the host can drive ('' when they are)."""
    try:
        layers = _layers_of(base, arch)
    except AttributeError as e:
        return f"its layers are not where they are expected ({e})"
    for layer in layers:
        kind = type(layer).__name__
        if kind not in _LAYERS:
            return f"its layers are {kind}, not one of {sorted(_LAYERS)}"
        try:
            attn = _LAYERS[kind](layer).attn
        except AttributeError as e:
            return f"its {kind} lacks a part ({e})"
        missing = [a for a in ("q_proj", "k_proj", "v_proj", "head_dim") if not hasattr(attn, a)]
        if not (hasattr(attn, "o_proj") or hasattr(attn, "out_proj")):
            missing.append("o_proj")
        if missing:
            return f"its attention {type(attn).__name__} has no {', '.join(missing)}"
    return ""


def _check_positions(model: nn.Module, arch: Arch, base: nn.Module) -> None:
    """The position table fits config.image_size, and can be interpolated where the run size needs it."""
    config, name = model.config, type(model).__name__
    emb = base.embeddings
    table = emb.position_embedding.weight if arch.model_type == "clip_vision_model" else emb.position_embeddings
    with_position = 2 if arch.model_type == "deit" else 1  # prefix tokens that have a position (registers do not)
    (h0, w0), (ph, pw) = _pair(config.image_size), _pair(config.patch_size)
    grid0 = (h0 // ph, w0 // pw)
    positions = table.shape[-2] - with_position
    if positions != grid0[0] * grid0[1]:
        raise UnsupportedModelError(
            f"{name}'s position table holds {positions} patch positions, but config.image_size {h0}x{w0} with patch "
            f"size {ph} gives {grid0[0]}x{grid0[1]}; the model interpolates it at every call, which dynamicvit does "
            "not follow: set config.image_size to the size of the table"
        )
    H, W = run_size(model)
    if H % ph or W % pw:
        raise ConfigError(f"{name} runs at {H}x{W} px, which is not a multiple of its patch size {ph}x{pw}")
    # DINOv2 interpolates whenever the image is not square; the others when asked to (another size).
    interpolated = (H // ph, W // pw) != grid0 or (arch.model_type.startswith("dinov2") and H != W)
    if interpolated and (grid0[0] != grid0[1] or ph != pw):
        raise UnsupportedModelError(
            f"{name} would interpolate its position embeddings of a {grid0[0]}x{grid0[1]} grid to {H // ph}x{W // pw} "
            f"patches ({H}x{W} px), which transformers does only from a square grid with square patches; dynamicvit "
            "cannot follow it: use a square config.image_size and run at it"
        )
