"""Training presets: the authors' recipes as `TrainConfig` settings (`dynamicvit train --preset NAME`).

Hierarchical models (shared/reference/spatial.md): CE + 10 * ratio loss + 0.5 KL + 0.5 feature MSE;
predictors and fast paths at the full learning rate, the pretrained backbone at 0.01x and frozen for
the first 5 epochs; 120 epochs; peak lr 4e-3 at an effective batch of 4096, which is the default
scaling (1e-3 per 1024 images, so `lr` stays unset); AdamW, weight decay 0.05, cosine, RandAugment,
mixup 0.8 / cutmix 1.0, label smoothing 0.1, EMA. A preset fills in settings; a --config file and
flags override it.
"""
from __future__ import annotations

from .errors import ConfigError

_SPATIAL = dict(
    keep_ratio=0.7,
    epochs=120,
    backbone_lr_scale=0.01,
    freeze_backbone_epochs=5,
    weight_decay=0.05,
    ratio_weight=10.0,
    distill_weight=0.5,
    token_weight=0.5,  # the MSE of the final normalized feature maps, every position
    smoothing=0.1,
    mixup=0.8,
    cutmix=1.0,
    ema=True,
)

PRESETS: dict[str, dict] = {
    "convnext-t": dict(_SPATIAL, model="convnext_tiny", timm_kwargs={"drop_path_rate": 0.2}),
    "convnext-s": dict(_SPATIAL, model="convnext_small", timm_kwargs={"drop_path_rate": 0.2}),
    "convnext-b": dict(_SPATIAL, model="convnext_base", timm_kwargs={"drop_path_rate": 0.5}),
    "swin-t": dict(_SPATIAL, model="swin_tiny_patch4_window7_224", timm_kwargs={"drop_path_rate": 0.2}),
    "swin-s": dict(_SPATIAL, model="swin_small_patch4_window7_224", timm_kwargs={"drop_path_rate": 0.2}),
    # The spec names 0.5 for ConvNeXt-B only; Swin-B's own fine-tuning setting is 0.5 as well.
    "swin-b": dict(_SPATIAL, model="swin_base_patch4_window7_224", timm_kwargs={"drop_path_rate": 0.5}),
}


def preset(name: str) -> dict:
    """The settings of preset `name` (a copy); a clear error for unknown names."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    values = dict(PRESETS[name])
    values["timm_kwargs"] = dict(values["timm_kwargs"])
    return values
