"""Datasets: Fashion-MNIST from the Debian files or a user folder, ImageFolder trees, clear errors."""
from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dynamicvit.data import (
    FASHION_MNIST,
    FASHION_MNIST_SYSTEM_DIR,
    build_dataset,
    fashion_mnist_root,
    resolve_dataset,
    take_subset,
)
from dynamicvit.errors import ConfigError, DataError

HAVE_FMNIST = (FASHION_MNIST_SYSTEM_DIR / "t10k-images-idx3-ubyte.gz").is_file()
needs_fmnist = pytest.mark.skipif(
    not HAVE_FMNIST, reason=f"Fashion-MNIST not installed in {FASHION_MNIST_SYSTEM_DIR} (apt-get install dataset-fashion-mnist)"
)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Extracted copies go to a per-test cache, never to the user's."""
    monkeypatch.setenv("DYNAMICVIT_CACHE", str(tmp_path / "cache"))


def write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool = True) -> None:
    """Write IDX files (the MNIST format: big-endian magic, dims, then uint8 data)."""
    folder.mkdir(parents=True, exist_ok=True)
    n, h, w = images.shape
    img = np.array([0x00000803, n, h, w], dtype=">i4").tobytes() + images.astype(np.uint8).tobytes()
    lab = np.array([0x00000801, n], dtype=">i4").tobytes() + labels.astype(np.uint8).tobytes()
    for name, data in ((f"{prefix}-images-idx3-ubyte", img), (f"{prefix}-labels-idx1-ubyte", lab)):
        if gz:
            with gzip.open(folder / f"{name}.gz", "wb") as f:
                f.write(data)
        else:
            (folder / name).write_bytes(data)


def fake_fmnist(folder: Path, n_train: int = 12, n_test: int = 6, gz: bool = True) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (n_train, 28, 28))
    test = rng.integers(0, 256, (n_test, 28, 28))
    write_idx(folder, "train", train, np.arange(n_train) % 10, gz)
    write_idx(folder, "t10k", test, (np.arange(n_test) + 3) % 10, gz)
    return train, test


# -- Fashion-MNIST ------------------------------------------------------------------------------


def test_fashion_mnist_info():
    info = resolve_dataset("fmnist")
    assert info == resolve_dataset("fashion-mnist") == FASHION_MNIST
    assert (info.num_classes, info.in_chans, info.img_size) == (10, 1, 28)
    assert len(info.classes) == 10
    assert info.mean[0] == pytest.approx(0.286, abs=1e-3) and info.std[0] == pytest.approx(0.353, abs=1e-3)


@needs_fmnist
@pytest.mark.fashion_mnist
def test_fashion_mnist_from_debian_files(tmp_path):
    val = build_dataset("fashion-mnist", "val")
    assert len(val) == 10_000
    x, y = val[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert 0 <= y < 10
    # The stated mean/std are those of the training images: normalized pixels average ~0, spread ~1.
    train = build_dataset("fashion-mnist", "train")
    assert len(train) == 60_000
    pixels = train.data[:5000].float() / 255
    assert pixels.mean().item() == pytest.approx(FASHION_MNIST.mean[0], abs=0.01)
    assert pixels.std().item() == pytest.approx(FASHION_MNIST.std[0], abs=0.01)
    # Extracted into the cache, never next to the system files.
    assert list((tmp_path / "cache").glob("fashion-mnist-*/FashionMNIST/raw/t10k-images-idx3-ubyte"))
    assert not (FASHION_MNIST_SYSTEM_DIR / "FashionMNIST").exists()


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_fashion_mnist_from_user_folder(tmp_path, gz, layout):
    folder = tmp_path / "data"
    files = folder / "FashionMNIST" / "raw" if layout == "torchvision" else folder
    train, test = fake_fmnist(files, gz=gz)
    val = build_dataset("fashion-mnist", "val", data_dir=folder)
    assert len(val) == len(test)
    x, y = val[1]
    expected = (torch.from_numpy(test[1]).float() / 255 - FASHION_MNIST.mean[0]) / FASHION_MNIST.std[0]
    torch.testing.assert_close(x[0], expected, atol=1e-5, rtol=0)
    assert y == 4
    assert len(build_dataset("fashion-mnist", "train", data_dir=folder)) == len(train)
    if layout == "torchvision" and not gz:
        assert fashion_mnist_root(folder) == folder  # used in place, nothing copied
    else:
        assert fashion_mnist_root(folder).parent == tmp_path / "cache"


def test_fashion_mnist_missing_says_what_to_install(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as e:
        build_dataset("fashion-mnist", "val", data_dir=empty)
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "--data" in msg and "--download" in msg
    assert str(empty) in msg and "t10k-images-idx3-ubyte" in msg


def test_fashion_mnist_partial_folder_names_missing_files(tmp_path):
    folder = tmp_path / "data"
    fake_fmnist(folder)
    (folder / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="missing train-labels-idx1-ubyte"):
        build_dataset("fmnist", "train", data_dir=folder)


def test_fashion_mnist_corrupt_file(tmp_path):
    folder = tmp_path / "data"
    fake_fmnist(folder)
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="corrupt"):
        build_dataset("fmnist", "val", data_dir=folder)


def test_training_augmentation(tmp_path):
    folder = tmp_path / "data"
    fake_fmnist(folder)
    plain = build_dataset("fmnist", "train", data_dir=folder, augment={"no_aug": True})
    strong = build_dataset(
        "fmnist", "train", data_dir=folder, augment={"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25}
    )
    torch.manual_seed(0)
    for i in range(len(strong)):  # RandAugment on 1-channel images, every op, no crash
        for _ in range(20):
            x, _ = strong[i]
            assert x.shape == (1, 28, 28) and torch.isfinite(x).all()
    # Augmented training images vary from draw to draw; the plain ones do not.
    assert not all(torch.equal(strong[0][0], strong[0][0]) for _ in range(5))
    assert torch.equal(plain[0][0], plain[0][0])
    with pytest.raises(ConfigError, match="unknown augmentation"):
        build_dataset("fmnist", "train", data_dir=folder, augment={"randaug": 9})


def test_img_size_resizes(tmp_path):
    folder = tmp_path / "data"
    fake_fmnist(folder)
    x, _ = build_dataset("fmnist", "val", data_dir=folder, img_size=32)[0]
    assert x.shape == (1, 32, 32)


# -- subsets ------------------------------------------------------------------------------------


def test_subset_is_fixed_by_seed():
    data = list(range(100))
    a, b = take_subset(data, 10, seed=1), take_subset(data, 10, seed=1)
    c = take_subset(data, 10, seed=2)
    assert len(a) == 10 and a.indices == b.indices and a.indices != c.indices
    assert len(set(a.indices)) == 10
    assert take_subset(data, 1000) is data and take_subset(data, None) is data
    with pytest.raises(ConfigError):
        take_subset(data, 0)


def test_subset_through_build_dataset(tmp_path):
    folder = tmp_path / "data"
    fake_fmnist(folder, n_train=40)
    a = build_dataset("fmnist", "train", data_dir=folder, subset=7, seed=5, augment={"no_aug": True})
    b = build_dataset("fmnist", "train", data_dir=folder, subset=7, seed=5, augment={"no_aug": True})
    assert len(a) == 7
    assert [b[i][1] for i in range(7)] == [a[i][1] for i in range(7)]
    assert all(torch.equal(a[i][0], b[i][0]) for i in range(7))


# -- ImageFolder --------------------------------------------------------------------------------


def make_image_folder(root: Path, classes=("cat", "dog", "fox"), per_class: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    return root


def test_image_folder(tmp_path):
    root = make_image_folder(tmp_path / "pets")
    info = resolve_dataset(str(root))
    assert (info.name, info.num_classes, info.in_chans, info.classes) == ("pets", 3, 3, ("cat", "dog", "fox"))
    val = build_dataset(str(root), "val", img_size=32)
    assert len(val) == 9
    x, y = val[4]
    assert x.shape == (3, 32, 32) and y == 1
    train = build_dataset(root, "train", img_size=32, augment={"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25})
    for i in range(len(train)):
        x, _ = train[i]
        assert x.shape == (3, 32, 32)
    assert resolve_dataset("imagefolder", data_dir=root) == info


def test_image_folder_validation_name(tmp_path):
    root = make_image_folder(tmp_path / "pets")
    (root / "val").rename(root / "validation")
    assert len(build_dataset(root, "val", img_size=16)) == 9


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda r: shutil.rmtree(r / "train") or shutil.rmtree(r / "val"), "neither train/ nor val/"),
        (lambda r: shutil.rmtree(r / "val" / "fox") or (r / "val" / "wolf").mkdir(), "differ"),
        (lambda r: [p.unlink() for p in (r / "train" / "dog").iterdir()], "at least one image"),
        (lambda r: shutil.rmtree(r / "val"), "no val/ folder"),
    ],
    ids=["no-splits", "class-mismatch", "empty-class", "no-val"],
)
def test_image_folder_layout_errors(tmp_path, damage, match):
    root = make_image_folder(tmp_path / "pets")
    damage(root)
    with pytest.raises(DataError, match=match):
        build_dataset(root, "train", img_size=16)
        build_dataset(root, "val", img_size=16)


def test_unknown_dataset(tmp_path):
    with pytest.raises(DataError, match="fashion-mnist"):
        resolve_dataset("mnistt")
    with pytest.raises(DataError, match="is a file"):
        f = tmp_path / "f.txt"
        f.write_text("x")
        resolve_dataset(str(f))
    with pytest.raises(ConfigError, match="split"):
        build_dataset("fmnist", "test")


def test_download_goes_to_the_cache(tmp_path, monkeypatch):
    """--download fetches with torchvision into the cache (network replaced by a fake here)."""
    import torchvision.datasets

    import dynamicvit.data as data

    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "not-installed")
    calls = []

    class FakeFashionMNIST:
        def __init__(self, root, train=True, download=False, transform=None):
            calls.append((Path(root), train, download))
            if download:
                fake_fmnist(Path(root) / "FashionMNIST" / "raw", gz=False)

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeFashionMNIST)
    with pytest.raises(DataError, match="apt-get install"):
        fashion_mnist_root(download=False)
    root = fashion_mnist_root(download=True)
    assert root == tmp_path / "cache" / "fashion-mnist-download"
    assert calls and all(download for _, _, download in calls)
    assert fashion_mnist_root() == root  # found again without downloading

    class Offline(FakeFashionMNIST):
        def __init__(self, *args, **kwargs):
            raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", Offline)
    with pytest.raises(DataError, match="could not download.*apt-get install dataset-fashion-mnist"):
        fashion_mnist_root(tmp_path / "elsewhere", download=True)
