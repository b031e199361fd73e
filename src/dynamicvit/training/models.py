"""The models of a run: the student and its frozen dense teacher, what the student trains (frozen
tokens, AdamW parameter groups), the objective of its kind and the teacher's distillation targets."""
from __future__ import annotations

import copy
import logging
import os
from typing import Optional, Union

import torch
import torch.nn as nn

from ..core.base import SparseModel
from ..core.hosts import Host
from ..core.losses import DynamicSpatialLoss, DynamicViTLoss, LogitDistillLoss
from ..core.settings import KeepRatioSampler
from ..core.spatial import DynamicSpatial, dense_targets
from ..data import num_classes_of
from ..errors import ConfigError
from ..weights.build import create_backbone, load, sparsify
from ..weights.formats import load_weights
from ..weights.hf import hf_folder, is_hf_spec
from .config import TrainConfig

_logger = logging.getLogger(__name__)

# Learnable tokens the reference does not train when fine-tuning (and never decays): timm's names, then
# transformers' (CLIP's position table is an embedding layer's weight).
FROZEN_TOKENS = ("cls_token", "pos_embed", "dist_token", "reg_token", "position_embeddings", "distillation_token",
                 "register_tokens", "class_embedding", "position_embedding.weight")


def is_frozen_token(name: str) -> bool:
    """True for a parameter name that ends with one of `FROZEN_TOKENS`."""
    return any(name == t or name.endswith("." + t) for t in FROZEN_TOKENS)


def load_dense(path: Union[str, os.PathLike], name: Optional[str], kwargs: dict, overrides: dict, role: str) -> nn.Module:
    """A dense model from a checkpoint: ours (`save_model`, training) or plain timm / DeiT weights; or a
    transformers model from a folder ("hf:DIR").

    `weights.build.load` reads the file and checks it (a `name` that contradicts the stored settings is
    an error naming both); this adds only that the model must be dense.

    Args:
        name: the timm architecture (needed only for plain weights, which carry no settings).
        kwargs: timm arguments for plain weights (dataset defaults + user's).
        overrides: the user's timm arguments, applied over the settings stored in our checkpoints.
        role: "teacher" or "initial weights", for messages.
    """
    if is_hf_spec(path):
        model = load(path, overrides={**kwargs, **overrides})
    else:
        model = load(path, name, overrides=overrides, plain_kwargs=kwargs, role=role)
    if isinstance(model, SparseModel):
        raise ConfigError(
            f"the {role} {path} is a {type(model).__name__} (it holds prediction modules); the {role} must be a "
            "dense model (e.g. the model.safetensors of `dynamicvit train --dense`)"
        )
    return model


def build_models(cfg: TrainConfig, kwargs: dict) -> tuple[nn.Module, Optional[nn.Module]]:
    """(model to train, frozen dense teacher or None).

    Dense: a timm model from `init_checkpoint`, timm's pretrained weights or scratch.
    Sparse: the teacher from `teacher` (or timm's pretrained model); the student is a copy of it with
    fresh prediction modules, or is loaded from `init_checkpoint`.
    """
    if cfg.dense:
        if cfg.init_checkpoint:
            return load_dense(cfg.init_checkpoint, cfg.model, kwargs, cfg.timm_kwargs, "initial weights"), None
        return create_backbone(_need_model(cfg), pretrained=cfg.pretrained, **kwargs), None
    teacher = _teacher(cfg, kwargs)
    teacher.eval().requires_grad_(False)
    student = sparsify(copy.deepcopy(teacher), cfg.keep_ratio, cfg.prune_locs, fuse_dropped=cfg.fuse_dropped,
                       merge_dropped=cfg.merge_dropped, predictor_width=cfg.predictor_width)
    student.backbone.requires_grad_(True)
    if cfg.detach_predictor_input:
        if isinstance(student, DynamicSpatial):
            raise ConfigError("--detach-predictor-input is for ViTs and LV-ViTs; ConvNeXt and Swin train their "
                              "prediction modules with the backbone")
        student.detach_predictor_input = True
    if cfg.predictor_keep_prior is not None:
        for predictor in student.predictors:
            predictor.reset_parameters(cfg.predictor_keep_prior)
    if cfg.keep_ratios is not None:
        if isinstance(student, DynamicSpatial):
            raise ConfigError("--keep-ratios (elastic training) is for ViTs and LV-ViTs; ConvNeXt and Swin train at one --keep-ratio")
        student.set_keep_ratio_range(KeepRatioSampler.parse(cfg.keep_ratios).range)
        if not cfg.clip_grad:
            _logger.warning(
                "elastic training without gradient clipping: the loss can spike and the prediction modules can "
                "collapse to keeping almost no tokens; pass --clip-grad 1.0"
            )
    if cfg.init_checkpoint:
        load_weights(student, cfg.init_checkpoint)
    return student, teacher


def _teacher(cfg: TrainConfig, kwargs: dict) -> nn.Module:
    """The dense teacher: `cfg.teacher`, or timm's pretrained model with `cfg.pretrained`."""
    if cfg.teacher:
        return load_dense(cfg.teacher, cfg.model, kwargs, cfg.timm_kwargs, "teacher")
    if not (cfg.pretrained or is_hf_spec(cfg.model)):  # a transformers folder brings its weights
        raise ConfigError(
            "fine-tuning a DynamicViT needs a dense teacher: pass --teacher PATH (a dense checkpoint, e.g. the "
            "model.safetensors of `dynamicvit train --dense`) or --pretrained (timm's weights), or use --dense"
        )
    teacher = create_backbone(_need_model(cfg), pretrained=True, **kwargs)
    default_classes = teacher.pretrained_cfg.get("num_classes")
    if default_classes and default_classes != num_classes_of(teacher):
        _logger.warning(
            "the pretrained teacher's head was re-initialized for %d classes, so it teaches nothing: "
            "train a dense teacher first (dynamicvit train --dense --pretrained ...) and pass it with --teacher",
            num_classes_of(teacher),
        )
    return teacher


def _need_model(cfg: TrainConfig) -> str:
    if not cfg.model:
        raise ConfigError("no model given: pass --model NAME (a timm ViT, e.g. deit_small_patch16_224)")
    return cfg.model


def check_model_name(name: Optional[str]) -> None:
    """Fail fast on an unknown timm name (before any data is read)."""
    if name is None:
        return
    if is_hf_spec(name):
        hf_folder(name)  # raises for a missing folder or a hub name
        return
    import timm

    bare = name[len("dynamicvit_"):] if name.startswith("dynamicvit_") else name
    if not timm.is_model(bare):
        create_backbone(bare)  # raises UnsupportedModelError with suggestions


def freeze_tokens(model: nn.Module) -> list[str]:
    """Stop training the class/distillation/register tokens and the position embedding.

    The reference recipe when fine-tuning a DynamicViT; a dense model (`--dense`, possibly trained from
    scratch) trains them.
    """
    frozen = []
    for name, p in model.named_parameters():
        if is_frozen_token(name):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def param_groups(model: nn.Module, weight_decay: float, backbone_lr_scale: float) -> list[dict]:
    """AdamW parameter groups: predictors at lr, backbone at lr * backbone_lr_scale.

    Biases, norm weights, tokens and position embeddings (1-D or listed in the model's
    `no_weight_decay`) get no weight decay. A dense model is all "backbone". The groups come in the
    order their first parameter appears in `model.named_parameters()`.
    """
    skip = set()
    inner = getattr(model, "backbone", model)
    if hasattr(inner, "no_weight_decay"):
        skip = {n.split(".")[-1] for n in inner.no_weight_decay()}
    groups: dict[tuple[str, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # New parameters (prediction modules; fast paths of ConvNeXt/Swin) train at the full lr from the start.
        part = "predictors" if name.startswith(getattr(model, "new_parameter_prefixes", "predictors.")) else "backbone"
        decay = p.ndim > 1 and name.split(".")[-1] not in skip and not is_frozen_token(name)
        group = groups.setdefault(
            (part, decay),
            {
                "params": [],
                "part": part,
                "lr_scale": 1.0 if part == "predictors" else backbone_lr_scale,
                "weight_decay": weight_decay if decay else 0.0,
            },
        )
        group["params"].append(p)
    return list(groups.values())


def given_models(student: nn.Module, teacher: nn.Module) -> tuple[nn.Module, nn.Module]:
    """A caller's (student, teacher) for `train(models=...)`: the teacher frozen in eval mode, the student trainable."""
    teacher.eval().requires_grad_(False)
    student.requires_grad_(True)
    return student, teacher


def build_criterion(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """The objective of the model's kind: DynamicViT's, the hierarchical one (per-stage r_s, feature
    distillation over all positions) for ConvNeXt / Swin, or CE + KL for a student that is not sparse."""
    if not isinstance(model, SparseModel):
        return LogitDistillLoss(cfg.distill_weight, cfg.smoothing)
    if isinstance(model, DynamicSpatial):
        if cfg.budget != "fixed":
            raise ConfigError("--budget per-image is for ViTs and LV-ViTs; ConvNeXt and Swin keep their maps at a fixed "
                              "budget: drop --budget")
        return DynamicSpatialLoss(model.stage_ratios, cfg.ratio_weight, cfg.distill_weight, cfg.token_weight, cfg.smoothing)
    return DynamicViTLoss(
        model.keep_ratio, cfg.ratio_weight, cfg.distill_weight, cfg.token_weight, cfg.smoothing,
        token_distill=model.host.token_distill, budget=cfg.budget, token_target=cfg.token_target,
    )


def teacher_targets(teacher: nn.Module, host: Optional[Host], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen teacher's (logits, per-token targets) for the distillation terms.

    Token hosts (ViT, LV-ViT): the logits the student's trained logits are compared with
    (`Host.class_logits`, else `Host.logits`) and `Host.distill_targets` (final normed patch tokens for
    ViTs, aux-head logits for LV-ViT). Hierarchical teachers (`host` None): logits and the final
    normalized map, every position (`spatial.dense_targets`).
    """
    if host is None:
        return dense_targets(teacher, x)
    feats = host.features(x)  # (B, P + N, C), normed
    logits = host.class_logits(feats)
    return (host.logits(feats) if logits is None else logits), host.distill_targets(feats)
