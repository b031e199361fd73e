"""Accuracy of a model on a dataset: `evaluate` for any model taking image batches (a sparse model in
eval mode takes its inference path), and `onnx_accuracy` for a file in ONNX Runtime (or a torch model)
on a dataset's validation split, prepared as in training."""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .core.base import logits_of
from .data import UnreadableImages, build_dataset, drop_unreadable, resolve_dataset
from .errors import ConfigError, DataError
from .files import PathLike
from .progress import progress_bar
from .runtime.deploy import OnnxModel
from .runtime.device import amp_dtype, autocast
from .runtime.flops import default_input_size


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    device: Union[str, torch.device] = "cpu",
    amp: str = "none",
    *,
    distributed: bool = False,
    progress: bool = False,
) -> dict:
    """Top-1/top-5 accuracy (percent) and mean cross-entropy of `model` on `loader`.

    The model runs in eval mode (a DynamicViT takes its inference path: tokens removed) and is put
    back in its previous mode afterwards.

    Args:
        loader: batches of (images, integer labels).
        amp: autocast mode, as in `TrainConfig.amp`.
        distributed: sum the counts over all processes (each evaluated its own shard).
        progress: show a progress bar (plain lines when stderr is not a terminal).

    Unreadable images (see `dynamicvit.data.CheckedImageFolder`) are left out and counted; rows with a
    non-finite output count as misses and are left out of the loss.

    Returns:
        {"top1", "top5", "loss", "images", "non_finite", "unreadable"}.
    """
    device = torch.device(device)
    dtype = amp_dtype(amp, device)
    was_training = model.training
    model.eval()
    unreadable = UnreadableImages(getattr(loader, "dataset", None), "evaluation")
    # loss (finite rows), top-1 hits, top-5 hits, images, rows with a non-finite output, unreadable images
    sums = torch.zeros(6, dtype=torch.float64, device=device)
    for images, labels in progress_bar(loader, desc="eval", enabled=progress):
        images, labels, bad = drop_unreadable(images, labels)
        if bad:
            unreadable.note(bad)
            sums[5] += len(bad)
            if not len(labels):
                continue
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast(device, dtype):
            logits = logits_of(model(images))  # transformers models return an output object
        logits = logits.float()
        finite = torch.isfinite(logits).all(dim=-1)  # (B,): a NaN/Inf output counts as a miss, not as a guess
        k = min(5, logits.shape[-1])
        hits = (logits.topk(k, dim=-1).indices == labels[:, None]) & finite[:, None]  # (B, k)
        losses = F.cross_entropy(logits[finite], labels[finite], reduction="sum") if finite.any() else logits.new_zeros(())
        sums[:5] += torch.stack([
            losses.double(),
            hits[:, 0].sum().double(),
            hits.any(dim=-1).sum().double(),
            torch.tensor(float(labels.numel()), dtype=torch.float64, device=device),
            (~finite).sum().double(),
        ])
    if distributed:
        dist.all_reduce(sums)
    model.train(was_training)
    loss, top1, top5, n, non_finite, skipped = sums.tolist()
    if n == 0:
        raise DataError(
            "the evaluation set is empty" + (f" (all {int(skipped)} images unreadable)" if skipped else "")
            + "; check the dataset path and --val-subset"
        )
    return {
        "top1": 100.0 * top1 / n,
        "top5": 100.0 * top5 / n,
        "loss": loss / (n - non_finite) if n > non_finite else float("nan"),
        "images": int(n),
        "non_finite": int(non_finite),
        "unreadable": int(skipped),
    }


def onnx_accuracy(
    model: Union[OnnxModel, nn.Module],
    dataset: str = "fashion-mnist",
    *,
    data_dir: Optional[PathLike] = None,
    subset: Optional[int] = None,
    batch_size: int = 256,
    progress: bool = False,
) -> dict:
    """Top-1 / top-5 of a model (an `OnnxModel` or a torch model) on a dataset's validation split.

    The images are prepared as `dynamicvit.data` prepares them in training (the dataset's normalization).

    Returns:
        {"top1", "top5", "loss", "images"} as `evaluate` gives them.
    """
    info = resolve_dataset(dataset, data_dir)
    size = model.input_size if isinstance(model, OnnxModel) else None
    if size is None:
        size = default_input_size(model)
    C, H, W = size
    if C != info.in_chans or H != W:
        raise ConfigError(
            f"{info.name} has {info.in_chans}-channel images but the model takes {C}x{H}x{W} inputs; name a dataset "
            "the model was made for (--dataset)"
        )
    dataset_obj = build_dataset(dataset, "val", img_size=H, data_dir=data_dir, subset=subset)
    loader = torch.utils.data.DataLoader(dataset_obj, batch_size, shuffle=False, num_workers=0)
    return evaluate(model, loader, "cpu", "none", progress=progress)
