"""Training settings: `TrainConfig` (every setting of a run, from a file, a recipe or the command line)
and `RECIPES`, the authors' settings for each model of the papers."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from ..core.losses import TOKEN_TARGETS
from ..core.settings import BUDGETS, KeepRatioSampler, check_predictor_width
from ..data import BAD_IMAGE_MODES
from ..errors import ConfigError
from ..runtime.device import AMP_MODES

# The reference augmentation for ImageNet-style data (timm.data.create_transform arguments):
# RandAugment, colour jitter 0.4, random erasing of one box with probability 0.25 filled with
# per-pixel normal noise ("pixel" mode), bicubic resizing.
REFERENCE_AUGMENT = {
    "auto_augment": "rand-m9-mstd0.5-inc1",
    "color_jitter": 0.4,
    "re_prob": 0.25,
    "re_mode": "pixel",
    "re_count": 1,
    "interpolation": "bicubic",
}
# lr when none is given: 1e-3 per 1024 images of global batch.
REFERENCE_LR, REFERENCE_BATCH = 1e-3, 1024

# The authors' recipes (README training command + main.py defaults of the reference code), one per
# paper row; `--recipe NAME` / `TrainConfig.from_recipe(NAME)`. Settings given explicitly win; dict
# settings (timm_kwargs, augment) are merged key by key. lr is used as given, not scaled by batch
# (main.py does not scale it): 1e-3 at 8 GPUs x 128 images. The reference trains in full precision
# (no --use_amp), keeps an EMA of the weights (decay 0.9999), warms up from lr 0, starts its
# predictors at keep probability 0.5 and evaluates at crop 0.875 (bicubic, 256 -> 224).
_REFERENCE_RECIPE = {
    "epochs": 30,
    "batch_size": 128,
    "lr": 1e-3,
    "backbone_lr_scale": 0.01,
    "freeze_backbone_epochs": 5,
    "warmup_epochs": 5,
    "warmup_lr": 0.0,
    "min_lr": 1e-6,
    "weight_decay": 0.05,
    "clip_grad": None,
    "keep_ratio": 0.7,
    "ratio_weight": 2.0,
    "distill_weight": 0.5,
    "token_weight": 0.5,
    "smoothing": 0.1,
    "mixup": 0.8,
    "cutmix": 1.0,
    "augment": REFERENCE_AUGMENT,
    "amp": "none",
    "ema": True,
    "ema_decay": 0.9999,
    "predictor_keep_prior": 0.5,
    "eval_crop_pct": 0.875,
}
RECIPES: dict[str, dict] = {
    "deit-s": {**_REFERENCE_RECIPE, "model": "deit_small_patch16_224", "prune_locs": [3, 6, 9],
               "timm_kwargs": {"drop_path_rate": 0.0}},
    "deit-b": {**_REFERENCE_RECIPE, "model": "deit_base_patch16_224", "prune_locs": [3, 6, 9], "ratio_weight": 5.0,
               "timm_kwargs": {"drop_path_rate": 0.2}},
    # DeiT at width 256 with 4 heads (the paper's DynamicViT-256); its dense teacher comes from --teacher.
    "deit-256": {**_REFERENCE_RECIPE, "model": "deit_small_patch16_224", "prune_locs": [3, 6, 9],
                 "timm_kwargs": {"embed_dim": 256, "num_heads": 4, "drop_path_rate": 0.0}},
    "lvvit-s": {**_REFERENCE_RECIPE, "model": "lvvit_s", "prune_locs": [4, 8, 12], "timm_kwargs": {"drop_path_rate": 0.0}},
    "lvvit-m": {**_REFERENCE_RECIPE, "model": "lvvit_m", "prune_locs": [5, 10, 15], "timm_kwargs": {"drop_path_rate": 0.0}},
}
# Hierarchical models (docs/spatial.md): CE + 10 * ratio + 0.5 KL + 0.5 feature MSE; the
# predictors and fast paths at the full lr, the pretrained backbone at 0.01x and frozen for 5 epochs;
# 120 epochs; peak lr 4e-3 at an effective batch of 4096, which is the default scaling (1e-3 per 1024
# images), so `lr` stays unset; AdamW, weight decay 0.05, cosine, RandAugment, mixup 0.8 / cutmix 1.0,
# label smoothing 0.1, EMA. Predictor locations come from
# the table in docs/spatial.md (the factory's default).
_SPATIAL_RECIPE = {
    "keep_ratio": 0.7,
    "epochs": 120,
    "backbone_lr_scale": 0.01,
    "freeze_backbone_epochs": 5,
    "weight_decay": 0.05,
    "ratio_weight": 10.0,
    "distill_weight": 0.5,
    "token_weight": 0.5,  # the MSE of the final normalized feature maps, every position
    "smoothing": 0.1,
    "mixup": 0.8,
    "cutmix": 1.0,
    "ema": True,
}
RECIPES.update({
    "convnext-t": {**_SPATIAL_RECIPE, "model": "convnext_tiny", "timm_kwargs": {"drop_path_rate": 0.2}},
    "convnext-s": {**_SPATIAL_RECIPE, "model": "convnext_small", "timm_kwargs": {"drop_path_rate": 0.2}},
    "convnext-b": {**_SPATIAL_RECIPE, "model": "convnext_base", "timm_kwargs": {"drop_path_rate": 0.5}},
    "swin-t": {**_SPATIAL_RECIPE, "model": "swin_tiny_patch4_window7_224", "timm_kwargs": {"drop_path_rate": 0.2}},
    "swin-s": {**_SPATIAL_RECIPE, "model": "swin_small_patch4_window7_224", "timm_kwargs": {"drop_path_rate": 0.2}},
    # docs/spatial.md names 0.5 for ConvNeXt-B only; Swin-B's own fine-tuning setting is 0.5 as well.
    "swin-b": {**_SPATIAL_RECIPE, "model": "swin_base_patch4_window7_224", "timm_kwargs": {"drop_path_rate": 0.5}},
})


def apply_recipe(values: dict) -> dict:
    """`values` with the settings of `values["recipe"]` filled in where `values` does not give them
    (dict settings merged key by key, the explicit keys winning); unchanged without a recipe."""
    name = values.get("recipe")
    if name is None:
        return dict(values)
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in RECIPES[name].items()}
    for k, v in values.items():
        out[k] = {**out[k], **v} if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


# -- settings -----------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Everything a training run needs; loadable from YAML/JSON and the command line.

    The optimization and objective defaults are the reference DeiT-S recipe (`RECIPES["deit-s"]`) but
    for five settings: the warmup starts at `warmup_lr` 1e-6 (reference 0), `amp` is "auto" (reference:
    full precision), `ema` is off (reference: on, with `ema_decay` 0.9999 where the default here is
    0.9998), and fresh prediction modules start at keep probability rho^s (reference
    `predictor_keep_prior` 0.5). `lr` unset scales with the global batch (1e-3 per 1024 images), which
    is the reference's 1e-3 at its global batch of 1024 only. `--recipe deit-s` gives the reference
    exactly. The default dataset is Fashion-MNIST; a run on a small dataset will want fewer epochs and
    a larger learning rate.
    """

    # What to train.
    model: Optional[str] = None  # timm name, e.g. deit_small_patch16_224; None: taken from the teacher checkpoint
    dataset: str = "fashion-mnist"  # "fashion-mnist" or an ImageFolder root (train/ and val/ of class folders)
    data_dir: Optional[str] = None  # Fashion-MNIST: folder with the IDX files (default: the system package)
    output: str = "runs/dynamicvit"  # folder for checkpoints, metrics.jsonl and TensorBoard logs
    dense: bool = False  # train a plain dense ViT with CE (e.g. a teacher) instead of a DynamicViT
    teacher: Optional[str] = None  # dense checkpoint (e.g. from --dense); the student starts from its weights
    pretrained: bool = False  # no --teacher: use timm's pretrained dense model (downloads)
    init_checkpoint: Optional[str] = None  # weights to start from instead of the teacher's (or timm's when dense)
    keep_ratio: float = 0.7  # rho: stage s keeps int(N * rho^s) patch tokens
    keep_ratios: Optional[str] = None  # elastic training: "LO:HI" (e.g. "0.4:1.0") or "A,B,C", a keep ratio
    # drawn per step and targeted by the ratio loss, so one model serves every ratio in the range; None:
    # keep_ratio alone (the paper's recipe). The model's keep ratio at inference stays keep_ratio.
    fuse_dropped: bool = False  # fold each stage's dropped tokens into one extra token instead of discarding them
    merge_dropped: bool = False  # add each dropped token into its most similar kept token (excludes fuse_dropped)
    predictor_width: Optional[int] = None  # hidden width of the prediction modules (multiple of 4); None: the
    # model's width, the paper's layout. A quarter of it costs a fifth of the MACs (see PredictionModule)
    detach_predictor_input: bool = False  # ViTs: no gradient from the prediction modules into the backbone
    # (the keep-ratio loss then trains the prediction modules alone); False: the paper's method
    budget: str = "fixed"  # "per-image": the ratio loss pulls the batch's mean kept fraction to rho^s, not each
    # image's, so images may keep more or fewer tokens (calibrate thresholds afterwards: dynamicvit calibrate)
    prune_locs: Optional[list[int]] = None  # blocks before which to prune; None: three evenly spaced stages
    timm_kwargs: dict = field(default_factory=dict)  # timm.create_model arguments (drop_path_rate, ...); the
    # dataset fills in num_classes, in_chans and img_size unless given here
    recipe: Optional[str] = None  # the paper recipe these settings started from (RECIPES); applied by
    # from_recipe / from_dict / --recipe, where explicit settings win
    predictor_keep_prior: Optional[float] = None  # keep probability the fresh prediction modules start at;
    # None: rho (stage s starts at its target rho^s; see PredictionModule.reset_parameters); 0.5: the reference

    # Optimization (per-iteration schedule).
    epochs: int = 30
    batch_size: int = 128  # per process; the global batch is batch_size * world size
    lr: Optional[float] = None  # predictor lr (the whole model's when dense); None: 1e-3 * global batch / 1024
    backbone_lr_scale: float = 0.01  # backbone lr = lr * this (DynamicViT only)
    freeze_backbone_epochs: int = 5  # backbone lr is 0 for these first epochs (DynamicViT only)
    warmup_epochs: float = 5  # linear warmup from warmup_lr, then cosine down to min_lr
    warmup_lr: float = 1e-6
    min_lr: float = 1e-6
    weight_decay: float = 0.05  # AdamW; never on biases, norms, tokens and position embeddings
    clip_grad: Optional[float] = None  # max global gradient norm; None: no clipping

    # Objective.
    ratio_weight: float = 2.0  # reference: 2.0 (DeiT-B: 5.0)
    distill_weight: float = 0.5  # KL(teacher || student) on logits
    token_weight: float = 0.5  # token distillation on the tokens kept at the end: MSE to the teacher's final
    # patch tokens (ViTs), KL to its per-token aux-head distributions (LV-ViT)
    token_target: str = "position"  # merged tokens: "position" (the teacher's token where the student token
    # sits, the paper's) or "held" (the mean of the teacher's tokens over the patches it holds)
    smoothing: float = 0.1  # label smoothing (folded into the soft targets under mixup/cutmix)

    # Augmentation.
    mixup: float = 0.8  # mixup alpha; 0 disables
    cutmix: float = 1.0  # cutmix alpha; 0 disables
    augment: Optional[dict] = None  # timm create_transform arguments for training images; None: RandAugment
    # rand-m9-mstd0.5-inc1 + random erasing 0.25 ("pixel") for ImageFolder data, light crops/flips for Fashion-MNIST
    eval_crop_pct: Optional[float] = None  # ImageFolder evaluation: resize to img_size / crop_pct, center crop;
    # None: the model's pretrained config (DeiT-S: 0.9, bicubic, 248 -> 224); 384 px and up: the whole image warped

    # Precision and averaging.
    amp: str = "auto"  # "auto" (bf16, else fp16, on CUDA; none elsewhere), "none", "bf16", "fp16"
    ema: bool = False  # keep an exponential moving average of the weights (saved next to the model)
    ema_decay: float = 0.9998

    # Run.
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", "mps"
    num_workers: int = 4  # data loader processes per training process
    download: bool = False  # Fashion-MNIST: download it when missing
    subset: Optional[int] = None  # train on a fixed random subset of this many images
    val_subset: Optional[int] = None  # evaluate on a fixed random subset of this many images
    max_steps_per_epoch: Optional[int] = None  # cut epochs short (smoke tests)
    eval_every: int = 1  # evaluate every this many epochs (and after the last)
    log_every: int = 20  # steps between metric lines and progress-bar updates
    resume: Union[bool, str] = False  # True: continue from <output>/last.pth if present; a path: from that file
    overwrite: bool = False  # replace an earlier run in `output` (without it, an earlier run is an error)
    bad_images: str = "skip"  # unreadable images: "skip" (each reported by path, counted) or "abort" (every
    # image is read before training and any unreadable one stops the run)
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower; exact repeats)
    progress: bool = True  # progress bars on a terminal, a plain line per interval in a log file (rank 0)
    tensorboard: bool = True  # TensorBoard logs in <output>/tb (rank 0)

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """Build from a dict (e.g. a parsed config file); unknown keys are an error."""
        if not isinstance(values, dict):
            raise ConfigError(f"a training config must be a mapping of settings, got {type(values).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            import difflib

            hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, names, n=1)) else k for k in unknown]
            raise ConfigError(f"unknown training setting(s): {', '.join(hints)}; valid settings: {', '.join(sorted(names))}")
        types = {f.name: str(f.type).replace(" ", "") for f in dataclasses.fields(cls)}
        values = apply_recipe(values)
        cfg = cls(**{k: _coerce(k, v, types[k]) for k, v in values.items()})
        cfg.validate()
        return cfg

    @classmethod
    def from_recipe(cls, name: str, **overrides) -> "TrainConfig":
        """The paper recipe `name` (a key of `RECIPES`, e.g. "lvvit-s"); `overrides` win over it."""
        return cls.from_dict({**overrides, "recipe": name})

    @classmethod
    def from_file(cls, path: Union[str, os.PathLike], **overrides) -> "TrainConfig":
        """Read a YAML or JSON file; `overrides` (e.g. command-line flags) win over the file."""
        return cls.from_dict({**read_config_file(path), **overrides})

    def to_dict(self) -> dict:
        """JSON-serializable settings (stored with every checkpoint)."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    def validate(self) -> None:
        """Raise `ConfigError` for settings out of range."""
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(isinstance(self.epochs, int) and self.epochs >= 1, f"epochs must be a positive integer, got {self.epochs!r}")
        need(isinstance(self.batch_size, int) and self.batch_size >= 1, f"batch_size must be a positive integer, got {self.batch_size!r}")
        need(self.lr is None or self.lr > 0, f"lr must be positive, got {self.lr}")
        need(self.backbone_lr_scale >= 0, f"backbone_lr_scale must be >= 0, got {self.backbone_lr_scale}")
        need(self.freeze_backbone_epochs >= 0, f"freeze_backbone_epochs must be >= 0, got {self.freeze_backbone_epochs}")
        need(self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        need(0 <= self.min_lr and 0 <= self.warmup_lr, "min_lr and warmup_lr must be >= 0")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(self.clip_grad is None or self.clip_grad > 0, f"clip_grad must be positive (or None), got {self.clip_grad}")
        for name in ("ratio_weight", "distill_weight", "token_weight", "mixup", "cutmix"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(0 <= self.smoothing < 1, f"smoothing must be in [0, 1), got {self.smoothing}")
        need(self.token_target in TOKEN_TARGETS,
             f"token_target must be one of {', '.join(TOKEN_TARGETS)} (held: for merged tokens), got {self.token_target!r}")
        need(self.token_target == "position" or self.merge_dropped,
             "token_target 'held' is the target of merged tokens: add --merge-dropped, or drop --token-target")
        need(self.amp in AMP_MODES, f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        need(0 < self.ema_decay < 1, f"ema_decay must be in (0, 1), got {self.ema_decay}")
        need(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")
        need(self.eval_every >= 1 and self.log_every >= 1, "eval_every and log_every must be >= 1")
        need(self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1, "max_steps_per_epoch must be >= 1")
        need(isinstance(self.timm_kwargs, dict), f"timm_kwargs must be a mapping, got {self.timm_kwargs!r}")
        reserved = sorted(set(self.timm_kwargs) & set(RESERVED_TIMM_KWARGS))
        need(not reserved, f"timm_kwargs may not set {', '.join(reserved)}: "
             + "; ".join(RESERVED_TIMM_KWARGS[k] for k in reserved))
        need(self.recipe is None or self.recipe in RECIPES, f"unknown recipe {self.recipe!r}; choose one of {', '.join(RECIPES)}")
        need(self.predictor_keep_prior is None or 0 < self.predictor_keep_prior < 1,
             f"predictor_keep_prior must be in (0, 1) (or None for rho), got {self.predictor_keep_prior}")
        need(self.eval_crop_pct is None or 0 < self.eval_crop_pct <= 1, f"eval_crop_pct must be in (0, 1], got {self.eval_crop_pct}")
        need(self.bad_images in BAD_IMAGE_MODES, f"bad_images must be one of {BAD_IMAGE_MODES}, got {self.bad_images!r}")
        need(not (self.overwrite and self.resume not in (False, None, "")),
             "--overwrite replaces the earlier run and --resume continues it; pass one of them")
        if self.mixing and self.batch_size % 2:
            raise ConfigError(
                f"mixup/cutmix pair images within a batch and need an even batch_size, got {self.batch_size}; "
                "use an even batch size or pass --mixup 0 --cutmix 0"
            )
        need(self.budget in BUDGETS, f"budget must be one of {', '.join(BUDGETS)}, got {self.budget!r}")
        if self.keep_ratios is not None:
            KeepRatioSampler.parse(self.keep_ratios)
        check_predictor_width(self.predictor_width)
        need(not (self.fuse_dropped and self.merge_dropped),
             "--fuse-dropped and --merge-dropped are two homes for the dropped tokens; choose one")
        if self.dense and self.teacher:
            raise ConfigError("--dense trains with plain CE and takes no teacher; drop --teacher (or --dense)")

    @property
    def mixing(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0


# timm arguments that training sets itself, or that would make timm download or open files: a config names
# them through their own settings instead.
RESERVED_TIMM_KWARGS = {
    "pretrained": "use the setting `pretrained: true` (--pretrained), timm's pretrained dense model as the teacher",
    "checkpoint_path": "use `teacher` or `init_checkpoint` (--teacher, --init-checkpoint) for weights to start from",
    "pretrained_cfg": "name the model with `model` and its size with `timm_kwargs: {img_size: ...}`",
    "pretrained_cfg_overlay": "name the model with `model` and its size with `timm_kwargs: {img_size: ...}`",
    "cache_dir": "set HF_HOME or TORCH_HOME for where timm keeps its downloads",
}


def _coerce(name: str, value, kind: str):
    """Numbers written as strings (YAML reads `1e-3` as a string) become numbers; wrong types are errors."""
    if value is None and kind.startswith("Optional"):
        return None
    base = kind.removeprefix("Optional[").removesuffix("]")
    if base in ("int", "float"):
        try:
            number = None if isinstance(value, bool) else float(value)
        except (TypeError, ValueError):
            number = None
        if number is None or (base == "int" and not (math.isfinite(number) and number == int(number))):
            raise ConfigError(f"{name} must be {'an integer' if base == 'int' else 'a number'}, got {value!r}")
        return int(number) if base == "int" else number
    if base == "bool" and not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if base == "str" and not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, got {value!r}")
    return value


def read_config_file(path: Union[str, os.PathLike]) -> dict:
    """Settings from a YAML (.yaml/.yml) or JSON file, as a dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; pass a YAML or JSON file of training settings")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                          "save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    try:
        if path.suffix.lower() == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - JSON and YAML raise their own types
        raise ConfigError(f"cannot parse config file {path}: {e}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings (key: value), not a {type(values).__name__}")
    return values
