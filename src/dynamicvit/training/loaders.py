"""The data of a run: the training and validation sets, their loaders (each process reads its own
share), and what happens to unreadable images."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset

from ..data import UnreadableImages, bad_images_error, build_dataset, check_images, drop_unreadable
from ..errors import DataError
from .config import REFERENCE_AUGMENT, TrainConfig
from .distributed import DistEnv
from .safety import ResumableSampler, StopSafeLoader


def build_datasets(cfg: TrainConfig, info, img_size: int, pretrained_cfg: Optional[dict] = None) -> tuple[Dataset, Dataset]:
    """Training and validation sets of `cfg.dataset` (through `dynamicvit.data`); validation images
    are resized as the model's `pretrained_cfg` says (see `data.eval_config`)."""
    augment = cfg.augment
    if augment is None and info.name != "fashion-mnist":
        augment = dict(REFERENCE_AUGMENT)
    common = dict(img_size=img_size, data_dir=cfg.data_dir, download=cfg.download, seed=cfg.seed)
    train_set = build_dataset(cfg.dataset, "train", augment=augment, subset=cfg.subset, **common)
    val_set = build_dataset(cfg.dataset, "val", subset=cfg.val_subset, pretrained_cfg=pretrained_cfg,
                            crop_pct=cfg.eval_crop_pct, **common)
    return train_set, val_set


def build_loaders(cfg: TrainConfig, env: DistEnv, device: torch.device, train_set: Dataset, val_set: Optional[Dataset]):
    """(train sampler, train loader, validation loader or None); validation is sharded over the ranks."""
    sampler = ResumableSampler(
        train_set, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=cfg.seed, drop_last=True
    )
    pin = device.type == "cuda"
    train_loader = StopSafeLoader(
        train_set, cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers, pin_memory=pin,
        drop_last=True, persistent_workers=cfg.num_workers > 0,
    )
    val_loader = None
    if val_set is not None:
        shard = Subset(val_set, range(env.rank, len(val_set), env.world_size)) if env.distributed else val_set
        val_loader = StopSafeLoader(shard, cfg.batch_size, shuffle=False, num_workers=cfg.num_workers, pin_memory=pin)
    return sampler, train_loader, val_loader


def steps_per_epoch(cfg: TrainConfig, env: DistEnv, train_loader, train_set: Dataset) -> int:
    """Optimizer steps per epoch: the loader's batches, cut to `max_steps_per_epoch`; at least one."""
    steps = min(len(train_loader), cfg.max_steps_per_epoch or len(train_loader))
    if steps == 0:
        raise DataError(
            f"the training set has {len(train_set)} images, fewer than one batch of {cfg.batch_size} per process "
            f"({env.world_size} process(es)); lower --batch-size or use more images"
        )
    return steps


def readable(x: torch.Tensor, y: torch.Tensor, unreadable: UnreadableImages, even: bool):
    """The batch without its unreadable images (reported by path); mixup/cutmix pair images, so `even`."""
    x, y, bad = drop_unreadable(x, y)
    if not bad:
        return x, y
    unreadable.note(bad)
    if even and len(y) % 2:
        x, y = x[:-1], y[:-1]
    if not len(y):
        raise DataError(
            f"every image of a training batch was unreadable ({len(bad)} images); check the dataset, or pass "
            "--bad-images abort to list them all before training"
        )
    return x, y


def check_all_images(env: DistEnv, device: torch.device, **datasets) -> None:
    """`--bad-images abort`: read every image before training; any unreadable one stops the run."""
    bad = []
    for what, dataset in datasets.items():
        if dataset is not None:
            bad += check_images(dataset, what, env.rank, env.world_size)
    total = len(bad)
    if env.distributed:  # each rank read its share
        count = torch.tensor([total], device=device)
        dist.all_reduce(count)
        total = int(count.item())
    if total:
        raise bad_images_error(bad, total)
