"""Datasets: Fashion-MNIST (the demo's) and any ImageFolder tree, with timm's transforms.

- Fashion-MNIST is read with torchvision's `FashionMNIST` from, in this order: the folder the user
  names (`data_dir`), the Debian package `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist),
  or a download into the cache when `download=True`. torchvision reads uncompressed files from
  `<root>/FashionMNIST/raw/`; gzipped files found elsewhere are extracted once into a cache folder
  (never next to system files).
- An ImageFolder tree follows the ImageNet convention: `<root>/train/<class>/*.jpg` and
  `<root>/val/<class>/*.jpg`.

Training images go through `timm.data.create_transform(is_training=True, ...)`; the `augment` dict
holds its keyword arguments (`auto_augment`, `re_prob`, `scale`, `hflip`, ...), on top of light
per-dataset defaults.

Evaluation images follow one rule wherever a model sees them (validation in training, `eval`,
`predict`, `visualize`, the preprocessing stored in an exported file): `eval_config` says how to
resize, crop and normalize, `eval_transform` builds the transform from that description, and
`preprocessing_config` gives the description for a model and the dataset it was trained on.
"""
from __future__ import annotations

import gzip
import hashlib
import inspect
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import torch
import torch.nn as nn
from torch.utils.data import Dataset, Subset

from .core.hosts import any_host
from .errors import ConfigError, DataError, UnsupportedModelError
from .files import PathLike, atomic_write
from .text import short_repr
from .weights.formats import MAX_IMAGE_SIDE, is_int, is_number

_logger = logging.getLogger(__name__)

Split = Literal["train", "val"]

FASHION_MNIST_NAMES = ("fashion-mnist", "fashion_mnist", "fashionmnist", "fmnist")
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# The four IDX files, by split, without the .gz suffix (torchvision's names).
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGE_FOLDER_VAL_NAMES = ("val", "validation")

FASHION_MNIST_HELP = (
    "install the Debian package: sudo apt-get install dataset-fashion-mnist "
    f"(puts the files in {FASHION_MNIST_SYSTEM_DIR}), or pass --data DIR with a folder holding "
    "{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz], or pass --download to fetch it (needs internet)"
)


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset.

    Attributes:
        name: "fashion-mnist", or the folder name of an ImageFolder tree.
        num_classes: number of classes.
        in_chans: image channels (1 for Fashion-MNIST, 3 for ImageFolder trees).
        img_size: default input resolution (28 for Fashion-MNIST, 224 for ImageFolder trees).
        mean: per-channel mean used for normalization.
        std: per-channel standard deviation used for normalization.
        classes: class names, in label order.
    """

    name: str
    num_classes: int
    in_chans: int
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] = ()


# Measured on the 60,000 training images (pixels scaled to [0, 1]).
FASHION_MNIST = DatasetInfo(
    name="fashion-mnist",
    num_classes=10,
    in_chans=1,
    img_size=28,
    mean=(0.2860,),
    std=(0.3530,),
    classes=FASHION_MNIST_CLASSES,
)

# Light augmentation by default: small crops and flips suit 28 px clothing images; a user's
# `augment` dict is merged on top (e.g. {"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25}).
DEFAULT_AUGMENT = {
    "fashion-mnist": {"scale": (0.8, 1.0), "ratio": (0.9, 1.1), "hflip": 0.5, "color_jitter": 0.0},
    "imagefolder": {},
}


def is_fashion_mnist(spec: PathLike) -> bool:
    return str(spec).strip().lower() in FASHION_MNIST_NAMES


# -- dataset description ------------------------------------------------------------------------


def dataset_normalization(spec: PathLike) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the data module normalizes `spec` with, from its name alone (no file is read)."""
    if is_fashion_mnist(spec):
        return FASHION_MNIST.mean, FASHION_MNIST.std
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)


def resolve_dataset(spec: PathLike, data_dir: Optional[PathLike] = None) -> DatasetInfo:
    """Describe a dataset without loading its images.

    Args:
        spec: "fashion-mnist" (alias "fmnist"), or the root of an ImageFolder tree
            (a folder with `train/` and `val/` subfolders of class folders).
        data_dir: for an ImageFolder tree given as "imagefolder", its root.

    Raises:
        DataError: `spec` names no known dataset, or the folder does not have the expected layout.
    """
    if is_fashion_mnist(spec):
        return FASHION_MNIST
    root = _image_folder_root(spec, data_dir)
    classes = _image_folder_classes(root)
    mean, std = dataset_normalization(spec)
    return DatasetInfo(
        name=root.name,
        num_classes=len(classes),
        in_chans=3,
        img_size=224,
        mean=mean,
        std=std,
        classes=tuple(classes),
    )


# -- datasets -----------------------------------------------------------------------------------


def build_dataset(
    spec: PathLike,
    split: Split,
    *,
    img_size: Optional[int] = None,
    data_dir: Optional[PathLike] = None,
    download: bool = False,
    augment: Optional[dict] = None,
    subset: Optional[int] = None,
    seed: int = 0,
    pretrained_cfg: Optional[dict] = None,
    crop_pct: Optional[float] = None,
) -> Dataset:
    """A dataset of (normalized image tensor (C, H, W), int label).

    Args:
        spec: "fashion-mnist" (alias "fmnist"), or the root of an ImageFolder tree.
        split: "train" (with augmentation) or "val" (resize and center crop only).
        img_size: input resolution; default the dataset's (28 for Fashion-MNIST, 224 otherwise).
        data_dir: Fashion-MNIST: a folder with the IDX files (.gz or extracted, or torchvision's
            `FashionMNIST/raw/` layout); default the Debian package's folder. ImageFolder: the root
            when `spec` is "imagefolder".
        download: Fashion-MNIST: download the files into `data_dir` (or the cache) when missing.
        augment: keyword arguments of `timm.data.create_transform` for the training split,
            merged over the dataset's light defaults; ignored for "val".
        subset: keep a fixed random subset of this many images (the same for the same `seed`).
        seed: seed of the subset.
        pretrained_cfg, crop_pct: "val": the model's timm pretrained config and a crop that replaces
            its own, for resizing and cropping (see `eval_config`).

    Raises:
        DataError: the data is missing, empty, or not laid out as expected (the message says how to fix it).
        ConfigError: a bad split, subset or augmentation setting.
    """
    if split not in ("train", "val"):
        raise ConfigError(f"split must be 'train' or 'val', got {split!r}")
    info = resolve_dataset(spec, data_dir)
    kind = "fashion-mnist" if is_fashion_mnist(spec) else "imagefolder"
    transform = build_transform(info, split, img_size=img_size, augment=augment, kind=kind,
                                pretrained_cfg=pretrained_cfg, crop_pct=crop_pct)
    if kind == "fashion-mnist":
        dataset = _fashion_mnist(split, data_dir, download, transform)
    else:
        dataset = _image_folder(_image_folder_root(spec, data_dir), split, transform, info)
    return take_subset(dataset, subset, seed)


def build_transform(
    info: DatasetInfo,
    split: Split,
    *,
    img_size: Optional[int] = None,
    augment: Optional[dict] = None,
    kind: Optional[str] = None,
    pretrained_cfg: Optional[dict] = None,
    crop_pct: Optional[float] = None,
):
    """timm's transform for `split`: augmentation for "train", `eval_transform` for "val"."""
    from timm.data import create_transform

    kind = kind or ("fashion-mnist" if info.name == FASHION_MNIST.name else "imagefolder")
    size = int(img_size or info.img_size)
    input_size = (info.in_chans, size, size)
    if split == "val":
        config = eval_config(input_size, info.mean, info.std, pretrained_cfg=pretrained_cfg, crop_pct=crop_pct,
                             whole_image=kind == "fashion-mnist")
        return eval_transform(config)
    kwargs = {**DEFAULT_AUGMENT[kind], **_check_augment(augment or {})}
    aa = kwargs.get("auto_augment")
    if aa and str(aa).startswith("rand") and "mmax" not in str(aa) and not _posterize_accepts_zero_bits():
        # RandAugment's Posterize keeps 0 bits at magnitude 10, which Pillow >= 11 rejects; capping
        # the magnitude at 9 keeps at least 1 bit (the noise of mstd0.5 would otherwise reach 10).
        kwargs["auto_augment"] = f"{aa}-mmax9"
    return create_transform(is_training=True, input_size=input_size, mean=info.mean, std=info.std, **kwargs)


# -- models and datasets ----------------------------------------------------------------------------


def check_model_fits(model: nn.Module, info: Optional[DatasetInfo]) -> None:
    """Raise `ConfigError` unless the model takes the dataset's channels and predicts its number of classes."""
    if info is None:
        return
    in_chans = any_host(model).in_chans
    if in_chans != info.in_chans or num_classes_of(model) != info.num_classes:
        raise ConfigError(
            f"the model takes {in_chans}-channel images and predicts {num_classes_of(model)} classes, but {info.name} "
            f"has {info.in_chans}-channel images and {info.num_classes} classes; use a checkpoint made for this dataset "
            "or pass matching timm_kwargs (in_chans, num_classes)"
        )


def num_classes_of(model: nn.Module) -> int:
    """Classes a model (dense or sparse, timm or transformers) predicts; 0 for a model without classifier."""
    try:
        return any_host(model).num_classes
    except UnsupportedModelError:  # a timm model of no host family
        return getattr(model, "backbone", model).num_classes


def square_img_size(model: nn.Module) -> int:
    """The square input size of a model; non-square models are refused (the data pipeline makes squares)."""
    h, w = any_host(model).img_size
    if h != w:
        raise ConfigError(f"non-square models ({h}x{w}) are not supported by the data pipeline; use img_size={h}")
    return int(h)



# -- evaluation images ----------------------------------------------------------------------------


def eval_config(
    input_size: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    *,
    pretrained_cfg: Optional[dict] = None,
    crop_pct: Optional[float] = None,
    whole_image: bool = False,
) -> dict:
    """How an evaluation image is resized, cropped and normalized for a model (the reference's rule).

    - `whole_image` (Fashion-MNIST: whole objects on a blank field): resized to the input size, no crop.
    - From 384 px on, the whole image is warped to the input size without a crop.
    - Below, the shorter side is resized to size / crop_pct and the center cropped (the reference
      recipe's crop 0.875, bicubic: 256 -> 224; DeiT-S's timm config says 0.9).

    Args:
        input_size: (C, H, W) of the model.
        mean, std: the normalization (one value per channel).
        pretrained_cfg: the model's timm pretrained config (crop_pct, interpolation); None: the defaults.
        crop_pct: replaces the config's crop_pct.

    Returns:
        {"input_size", "mean", "std", "crop_pct", "crop_mode", "interpolation"}, JSON-serializable.
    """
    C, H, W = (int(v) for v in input_size)
    config = {"input_size": [C, H, W], "mean": [float(v) for v in mean], "std": [float(v) for v in std]}
    if whole_image:
        return {**config, "crop_pct": 1.0, "crop_mode": "center", "interpolation": "bilinear"}
    cfg = pretrained_cfg or {}
    interpolation = cfg.get("interpolation") or "bicubic"
    if min(H, W) >= 384:
        return {**config, "crop_pct": 1.0, "crop_mode": "squash", "interpolation": interpolation}
    crop = crop_pct if crop_pct is not None else cfg.get("crop_pct") or 0.875
    return {**config, "crop_pct": float(crop), "crop_mode": "center", "interpolation": interpolation}


def eval_transform(config: dict):
    """The transform an `eval_config` describes: PIL image -> normalized tensor (C, H, W)."""
    from timm.data import create_transform

    keys = ("input_size", "mean", "std", "crop_pct", "crop_mode", "interpolation")
    args = {k: tuple(config[k]) if isinstance(config[k], list) else config[k] for k in keys if k in config}
    return create_transform(**args, is_training=False)


def preprocessing_config(
    model: nn.Module,
    dataset: Optional[PathLike] = None,
    *,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    crop_pct: Optional[float] = None,
) -> dict:
    """The `eval_config` of a model (dense or sparse) at its own input size.

    Normalization follows `dataset` (the one the model was trained on, as this module normalized it)
    when given, else the backbone's pretrained config; explicit `mean` / `std` win. A value for three
    channels is averaged for a one-channel model. The dataset is known by its name alone: nothing is
    read from it (a checkpoint's record of its training data never makes a command open a folder).
    A transformers model is prepared as its own image processor says (`Host.preprocessing`), with the
    same overrides.
    """
    from timm.data import resolve_data_config

    backbone = getattr(model, "backbone", model)
    host = any_host(backbone)
    C, (H, W) = host.in_chans, host.img_size
    own = host.preprocessing
    if own is not None:
        if dataset is not None:
            data_mean, data_std = dataset_normalization(dataset)
            mean, std = (data_mean if mean is None else mean), (data_std if std is None else std)
        return {**own, "mean": list(per_channel(own["mean"] if mean is None else mean, C, "mean")),
                "std": list(per_channel(own["std"] if std is None else std, C, "std")),
                **({"crop_pct": float(crop_pct)} if crop_pct is not None else {})}
    whole_image = False
    if dataset is not None and (mean is None or std is None):
        data_mean, data_std = dataset_normalization(dataset)
        mean = data_mean if mean is None else mean
        std = data_std if std is None else std
        whole_image = is_fashion_mnist(dataset)
    base = resolve_data_config({}, model=backbone)
    mean = per_channel(base["mean"] if mean is None else mean, C, "mean")
    std = per_channel(base["std"] if std is None else std, C, "std")
    return eval_config((C, H, W), mean, std, pretrained_cfg=backbone.pretrained_cfg, crop_pct=crop_pct,
                       whole_image=whole_image and crop_pct is None)


CROP_MODES = ("center", "squash", "border")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
IMAGE_CHANNELS = (1, 3)  # images are read as grayscale or RGB (`visualize.load_image`)


def check_eval_config(config: Any, where: str) -> dict:
    """Check an `eval_config` read from a file before a transform is built from it.

    Every value must have its type; the normalization is finite with std > 0, one value per channel;
    sizes are bounded: at most `MAX_IMAGE_SIDE` pixels a side, also for the resize before the crop
    (size / crop_pct), so that a crafted file cannot make a transform allocate gigabytes.

    Returns:
        The checked config (the keys of `eval_config`, plain Python values).

    Raises:
        ConfigError: naming `where`, the value and what was expected.
    """
    if not isinstance(config, dict):
        raise ConfigError(f"{where} is {short_repr(config)}; expected an object with input_size, mean and std")
    C, H, W = check_input_size(config.get("input_size"), f"{where}: input_size")
    checked: dict[str, Any] = {"input_size": [C, H, W]}
    for key in ("mean", "std"):
        values = config.get(key)
        ok = isinstance(values, list) and len(values) == C and all(is_number(v) for v in values)
        if not ok or (key == "std" and min(values) <= 0):
            raise ConfigError(f"{where}: {key} is {short_repr(values)}; expected {C} finite number(s)"
                              + (" greater than 0" if key == "std" else ""))
        checked[key] = [float(v) for v in values]
    crop = config.get("crop_pct", 1.0)
    if not is_number(crop) or not 0 < crop <= 1 or max(H, W) / crop > MAX_IMAGE_SIDE:
        raise ConfigError(f"{where}: crop_pct is {short_repr(crop)}; expected a number in (0, 1] that keeps the "
                          f"resized image within {MAX_IMAGE_SIDE} pixels a side")
    checked["crop_pct"] = float(crop)
    for key, allowed, default in (("crop_mode", CROP_MODES, "center"), ("interpolation", INTERPOLATIONS, "bicubic")):
        value = config.get(key, default)
        if value not in allowed:
            raise ConfigError(f"{where}: {key} is {short_repr(value)}; expected one of {', '.join(allowed)}")
        checked[key] = value
    return checked


def check_input_size(size: Any, where: str) -> tuple[int, int, int]:
    """(C, H, W) with C in `IMAGE_CHANNELS` and 1 <= H, W <= `MAX_IMAGE_SIDE`, else `ConfigError`."""
    if (not isinstance(size, list) or len(size) != 3 or not all(is_int(v) for v in size)
            or size[0] not in IMAGE_CHANNELS or not all(1 <= v <= MAX_IMAGE_SIDE for v in size[1:])):
        raise ConfigError(f"{where} is {short_repr(size)}; expected [channels, height, width] with 1 or 3 channels "
                          f"and sides of 1 to {MAX_IMAGE_SIDE} pixels")
    return tuple(size)


def per_channel(values: Sequence[float], channels: int, name: str) -> tuple[float, ...]:
    """`values` for `channels` channels: as given, one value repeated, or (for one channel) the average."""
    v = [float(x) for x in values]
    if len(v) == channels:
        return tuple(v)
    if len(v) == 1:
        return tuple(v * channels)
    if channels == 1:  # an RGB normalization for a grayscale model: the channel average
        return (sum(v) / len(v),)
    raise ConfigError(f"{name} has {len(v)} values but the images have {channels} channels; give 1 or {channels}")


def _check_augment(augment: dict) -> dict:
    from timm.data import create_transform

    if not isinstance(augment, dict):
        raise ConfigError(f"augment must be a dict of timm.data.create_transform arguments, got {augment!r}")
    allowed = set(inspect.signature(create_transform).parameters) - {
        "input_size", "is_training", "mean", "std", "use_prefetcher", "naflex", "separate", "normalize",
    }
    unknown = sorted(set(augment) - allowed)
    if unknown:
        raise ConfigError(
            f"unknown augmentation setting(s) {unknown}; use timm.data.create_transform arguments such as "
            "auto_augment='rand-m9-mstd0.5-inc1', re_prob=0.25, scale=(0.08, 1.0), hflip=0.5, no_aug=True"
        )
    return dict(augment)


def _posterize_accepts_zero_bits() -> bool:
    from PIL import Image, ImageOps

    try:
        ImageOps.posterize(Image.new("L", (1, 1)), 0)
    except ValueError:
        return False
    return True


def take_subset(dataset: Dataset, subset: Optional[int], seed: int = 0) -> Dataset:
    """A fixed random subset of `subset` images (all of them when `subset` is None or too large)."""
    if subset is None:
        return dataset
    if int(subset) != subset or subset < 1:
        raise ConfigError(f"subset must be a positive number of images, got {subset!r}")
    n = len(dataset)
    if subset >= n:
        return dataset
    g = torch.Generator().manual_seed(int(seed))
    indices = torch.randperm(n, generator=g)[: int(subset)].sort().values
    return Subset(dataset, indices.tolist())


# -- Fashion-MNIST ------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where extracted or downloaded data goes: $DYNAMICVIT_CACHE, else $XDG_CACHE_HOME/dynamicvit."""
    if os.environ.get("DYNAMICVIT_CACHE"):
        return Path(os.environ["DYNAMICVIT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "dynamicvit"


def fashion_mnist_root(data_dir: Optional[PathLike] = None, download: bool = False) -> Path:
    """A torchvision root holding `FashionMNIST/raw/<the four IDX files>` (torchvision needs all four).

    Looks in `data_dir` (or the Debian package's folder when None); gzipped files are extracted once
    into the cache. With `download`, missing files are fetched into `data_dir` (or the cache).

    Raises:
        DataError: the files are not there (and were not downloaded); the message says what to install.
    """
    names = sum(FASHION_MNIST_FILES.values(), ())
    source = Path(data_dir).expanduser() if data_dir is not None else FASHION_MNIST_SYSTEM_DIR
    if data_dir is not None and source.exists() and not source.is_dir():
        raise DataError(f"--data {source} is a file; pass the folder that holds the Fashion-MNIST files")
    download_root = source if data_dir is not None else cache_dir() / "fashion-mnist-download"
    # A download from an earlier run counts too when no folder was named.
    for root in (source,) if data_dir is not None else (source, download_root):
        for folder in (root / "FashionMNIST" / "raw", root / "raw", root):
            found = {name: _find_file(folder, name) for name in names}
            if all(found.values()):
                if folder == root / "FashionMNIST" / "raw" and all(p.name == n for n, p in found.items()):
                    return root
                return _extract_to_cache(found)
    if download:
        return _download_fashion_mnist(download_root)
    missing = [n for n in names if not any(_find_file(f, n) for f in (source, source / "raw", source / "FashionMNIST" / "raw"))]
    where = f"in {source}" if data_dir is not None else f"(looked in {FASHION_MNIST_SYSTEM_DIR})"
    raise DataError(
        f"Fashion-MNIST not found {where}: missing {', '.join(m + '[.gz]' for m in missing)}. "
        f"To get it, {FASHION_MNIST_HELP}"
    )


def _find_file(folder: Path, name: str) -> Optional[Path]:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file() and candidate.stat().st_size > 0:
            return candidate
    return None


def _extract_to_cache(files: dict[str, Path]) -> Path:
    """Copy (decompress) the files into a cache root keyed by their paths, sizes and dates."""
    key = hashlib.sha256()
    for name in sorted(files):
        p = files[name].resolve()
        st = p.stat()
        key.update(f"{p}:{st.st_size}:{st.st_mtime_ns};".encode())
    root = cache_dir() / f"fashion-mnist-{key.hexdigest()[:12]}"
    raw = root / "FashionMNIST" / "raw"
    for name, src in files.items():
        dst = raw / name
        if dst.is_file():
            continue
        _logger.info("extracting %s to %s", src, dst)
        try:
            atomic_write(dst, lambda tmp, src=src: _copy_maybe_gunzip(src, Path(tmp)))
        except OSError as e:
            raise DataError(
                f"cannot write the extracted Fashion-MNIST files to {raw}: {e}; set DYNAMICVIT_CACHE to a "
                "writable folder"
            ) from None
    return root


def _copy_maybe_gunzip(src: Path, dst: Path) -> None:
    opener = gzip.open if src.suffix == ".gz" else open
    try:
        with opener(src, "rb") as fin, open(dst, "wb") as fout:
            shutil.copyfileobj(fin, fout, length=1 << 20)
        os.chmod(dst, 0o644)  # the temp file is private; the cache is not
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {src}: {e}; the file is corrupt or truncated; {FASHION_MNIST_HELP}") from None


def _download_fashion_mnist(root: Path) -> Path:
    from torchvision.datasets import FashionMNIST

    _logger.info("downloading Fashion-MNIST to %s", root)
    try:
        for train in (True, False):
            FashionMNIST(str(root), train=train, download=True)
    except Exception as e:  # noqa: BLE001 - network errors come in many types
        raise DataError(
            f"could not download Fashion-MNIST to {root}: {type(e).__name__}: {e}. Without internet access, "
            "sudo apt-get install dataset-fashion-mnist, or pass --data DIR with the four IDX files"
        ) from None
    return root


def _fashion_mnist(split: Split, data_dir, download: bool, transform) -> Dataset:
    from torchvision.datasets import FashionMNIST

    root = fashion_mnist_root(data_dir, download)
    try:
        return FashionMNIST(str(root), train=split == "train", transform=transform, download=False)
    except (RuntimeError, AssertionError, ValueError, OSError) as e:
        raise DataError(
            f"cannot read the Fashion-MNIST files in {root / 'FashionMNIST' / 'raw'}: {e}; they are corrupt "
            f"or not IDX files; {FASHION_MNIST_HELP}"
        ) from None


# -- ImageFolder --------------------------------------------------------------------------------


def _image_folder_root(spec: PathLike, data_dir: Optional[PathLike]) -> Path:
    text = str(spec).strip()
    if text.lower() in ("imagefolder", "folder") and data_dir is not None:
        root = Path(data_dir).expanduser()
    else:
        root = Path(text).expanduser()
    if not root.exists():
        raise DataError(
            f"unknown dataset {text!r}: it is neither 'fashion-mnist' nor an existing folder. Pass "
            "'fashion-mnist', or an ImageFolder root with train/<class>/*.jpg and val/<class>/*.jpg"
        )
    if not root.is_dir():
        raise DataError(f"{root} is a file; an ImageFolder dataset is a folder with train/ and val/ subfolders")
    return root


def _split_dir(root: Path, split: Split) -> Path:
    names = ("train",) if split == "train" else IMAGE_FOLDER_VAL_NAMES
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise DataError(
        f"{root} has no {names[0]}/ folder; an ImageFolder dataset needs {root}/train/<class>/<images> and "
        f"{root}/val/<class>/<images> (the ImageNet layout)"
    )


def _class_dirs(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _image_folder_classes(root: Path) -> list[str]:
    splits = [root / n for n in ("train", *IMAGE_FOLDER_VAL_NAMES) if (root / n).is_dir()]
    if not splits:
        raise DataError(
            f"{root} has neither train/ nor val/; an ImageFolder dataset needs {root}/train/<class>/<images> "
            f"and {root}/val/<class>/<images> (the ImageNet layout)"
        )
    classes = _class_dirs(splits[0])
    if not classes:
        raise DataError(f"{splits[0]} holds no class folders; put the images of each class in {splits[0]}/<class>/")
    for other in splits[1:]:
        if _class_dirs(other) != classes:
            only_a = sorted(set(classes) - set(_class_dirs(other)))
            only_b = sorted(set(_class_dirs(other)) - set(classes))
            raise DataError(
                f"the class folders of {splits[0]} and {other} differ (only in {splits[0].name}: {only_a}; "
                f"only in {other.name}: {only_b}); labels would not match, give both splits the same classes"
            )
    return classes


def _image_folder(root: Path, split: Split, transform, info: DatasetInfo) -> Dataset:
    folder = _split_dir(root, split)
    try:
        dataset = CheckedImageFolder(str(folder), transform=transform)
    except FileNotFoundError as e:
        # torchvision's message names the class folder that holds no image.
        raise DataError(
            f"{folder}: {e}; every class folder needs at least one image (.jpg, .jpeg, .png, .bmp, .webp, ...)"
        ) from None
    except OSError as e:
        raise DataError(f"cannot read the ImageFolder dataset {folder}: {e}") from None
    if len(dataset) == 0:
        raise DataError(
            f"{folder} holds no images (.jpg, .jpeg, .png, .bmp, .webp, ...) in its class folders {list(info.classes)[:5]}"
        )
    if tuple(dataset.classes) != info.classes:
        raise DataError(f"the class folders of {folder} differ from those of the other split: {dataset.classes}")
    return dataset


# -- unreadable images ----------------------------------------------------------------------------
#
# An unreadable image must not end a run (it would end it again on every resume), and must not be
# skipped silently. `CheckedImageFolder` returns it as a blank image with the label -(index + 1); the
# training loop and `evaluate` drop such rows (`drop_unreadable`) and report each file once, by path,
# with the count (`UnreadableImages`). The label travels with the batch, so this works with any
# number of loader workers and processes. `check_images` reads every image up front instead, for
# runs that should rather stop before training than train without some images.

# What Pillow raises for a file it cannot decode (truncated, corrupt, not an image, too large).
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError)
BAD_IMAGE_MODES = ("skip", "abort")


class CheckedImageFolder(Dataset):
    """torchvision's ImageFolder, with unreadable images marked instead of raised (see above).

    Attributes:
        folder: the wrapped `torchvision.datasets.ImageFolder` (classes, samples, transform).
    """

    def __init__(self, root: str, transform=None):
        from torchvision.datasets import ImageFolder

        self.folder = ImageFolder(root, transform=transform)

    @property
    def classes(self) -> list[str]:
        return self.folder.classes

    @property
    def samples(self) -> list[tuple[str, int]]:
        return self.folder.samples

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int):
        path, target = self.folder.samples[index]
        try:
            image = self.folder.loader(path)
        except IMAGE_ERRORS:
            from PIL import Image

            # A black image through the same transform: the shape of a real sample, dropped by the loop.
            image, target = Image.new("RGB", (_transform_size(self.folder.transform),) * 2), -(index + 1)
        if self.folder.transform is not None:
            image = self.folder.transform(image)
        return image, target

    def describe(self, index: int) -> tuple[str, str]:
        """(path, why it cannot be read) of sample `index`."""
        path = self.folder.samples[index][0]
        try:
            self.folder.loader(path)
        except IMAGE_ERRORS as e:
            return path, _why(e)
        return path, "unreadable when it was loaded"


def _why(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}"


def _transform_size(transform) -> int:
    """The output size of a timm transform (its crop or resize), 224 if it cannot be told."""
    for t in getattr(transform, "transforms", ()):
        size = getattr(t, "size", None)
        if size is not None:
            return int(size if isinstance(size, int) else max(size))
    return 224


def drop_unreadable(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Remove the rows `CheckedImageFolder` marked unreadable: (images, labels, dataset indices of the dropped)."""
    if labels.ndim != 1 or labels.is_floating_point():  # soft or multi-label targets carry no marks
        return images, labels, []
    bad = labels < 0
    if not bool(bad.any()):
        return images, labels, []
    indices = (-labels[bad] - 1).tolist()
    return images[~bad], labels[~bad], indices


def base_dataset(dataset: Dataset):
    """The dataset under any `Subset` wrappers."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


class UnreadableImages:
    """Unreadable images met so far: each reported once by path; `count` of all skipped rows."""

    def __init__(self, dataset: Dataset, what: str):
        self.dataset = base_dataset(dataset)
        self.what = what
        self.count = 0
        self.reported: set[int] = set()

    def note(self, indices: list[int]) -> None:
        self.count += len(indices)
        for index in indices:
            if index in self.reported:
                continue
            self.reported.add(index)
            describe = getattr(self.dataset, "describe", None)
            path, why = describe(index) if describe else (f"image {index}", "unreadable")
            _logger.warning("skipping unreadable %s image %s (%s)", self.what, path, why)


def check_images(dataset: Dataset, what: str, rank: int = 0, world_size: int = 1, workers: int = 8) -> list[tuple[str, str]]:
    """Decode every image of an ImageFolder dataset (this process's share of it); (path, why) per failure.

    Datasets that are not image folders (Fashion-MNIST, tensors) have nothing to check.
    """
    from concurrent.futures import ThreadPoolExecutor

    base = base_dataset(dataset)
    samples = getattr(base, "samples", None)
    if samples is None:
        return []
    indices = getattr(dataset, "indices", range(len(samples)))
    mine = [samples[i][0] for i in list(indices)[rank::world_size]]

    def read(path: str):
        from PIL import Image

        try:
            with Image.open(path) as im:
                im.load()  # decode it all: a truncated JPEG opens fine and fails only here
        except IMAGE_ERRORS as e:
            return path, _why(e)
        return None

    _logger.info("checking %d %s images", len(mine), what)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # Pillow decodes without holding the GIL
        return [bad for bad in pool.map(read, mine) if bad is not None]


def bad_images_error(bad: list[tuple[str, str]], total: int) -> DataError:
    """The error that stops a run before training when images are unreadable (`--bad-images abort`)."""
    shown = "; ".join(f"{path} ({why})" for path, why in bad[:5])
    more = f" and {total - len(bad[:5])} more" if total > len(bad[:5]) else ""
    return DataError(
        f"{total} unreadable image(s): {shown}{more}; replace or remove them, or pass --bad-images skip to leave "
        "them out (each is reported by path)"
    )
