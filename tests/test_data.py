import os
import pickle
import struct
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image

from ferd import data
from ferd.data import DATASETS, DataError, dataset_info, default_data_root, train_split


def test_registry_and_unknown_name() -> None:
    assert set(DATASETS) == {"digits", "mnist", "fashion-mnist", "svhn", "cifar10", "cifar100", "tiny-imagenet"}
    for name, info in DATASETS.items():
        assert info.name == name
        assert len(info.class_names) == info.num_classes
        assert len(info.image_shape) == 3
    assert dataset_info("cifar10").flip and not dataset_info("digits").flip and not dataset_info("svhn").flip
    assert list(dataset_info("cifar100").class_names) == sorted(dataset_info("cifar100").class_names)
    with pytest.raises(DataError, match="digits.*tiny-imagenet"):
        dataset_info("imagenet")
    with pytest.raises(DataError):
        train_split("imagenet")


def test_digits_splits() -> None:
    x_tr, y_tr = train_split("digits")
    x_te, y_te = data.test_split("digits")
    assert x_tr.shape == (1257, 1, 16, 16) and x_te.shape == (540, 1, 16, 16)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert float(x_tr.min()) >= 0.0 and float(x_tr.max()) <= 1.0
    assert float(x_tr.max()) > 0.9  # /16 scaling reaches the top of the range
    counts_tr = torch.bincount(y_tr, minlength=10)
    counts_te = torch.bincount(y_te, minlength=10)
    total = counts_tr + counts_te
    # stratified 70/30: each class within one sample of its share
    assert ((counts_te.float() - 0.3 * total.float()).abs() <= 1).all()
    assert int(counts_te.min()) >= 50 and int(counts_te.max()) <= 56


def test_digits_deterministic_and_cached() -> None:
    x1, y1 = data._digits(True)
    x2, y2 = data._digits(True)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert train_split("digits")[0] is train_split("digits")[0]
    assert torch.equal(train_split("digits")[0], x1)


def test_digits_cache_holds_the_computed_bits(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The digits splits are written to the cache folder on first use and read back bit for bit; a damaged cache
    file is computed again and replaced, and a cache folder that cannot be written costs nothing but the time."""
    monkeypatch.setenv("FERD_CACHE_DIR", str(tmp_path / "cache"))
    computed = data._digits_from_sklearn()
    for train in (True, False):
        x, y = data._digits(train)
        key = "train" if train else "test"
        assert np.array_equal(x.numpy(), computed[f"x_{key}"]) and np.array_equal(y.numpy(), computed[f"y_{key}"])
    path = data._digits_cache_path()
    assert path.is_file() and path.parent == tmp_path / "cache" / "data"
    with np.load(path) as f:
        assert np.array_equal(f["x_test"], computed["x_test"])
    monkeypatch.setattr(data, "_digits_from_sklearn", lambda: pytest.fail("the cache file was not used"))
    x, _ = data._digits(False)
    assert np.array_equal(x.numpy(), computed["x_test"])
    monkeypatch.undo()

    monkeypatch.setenv("FERD_CACHE_DIR", str(tmp_path / "cache"))
    path.write_bytes(b"not a zip file")
    x, _ = data._digits(True)
    assert np.array_equal(x.numpy(), computed["x_train"])
    with np.load(path) as f:  # replaced by a good file
        assert np.array_equal(f["x_train"], computed["x_train"])

    blocked = tmp_path / "file"
    blocked.write_text("")
    monkeypatch.setenv("FERD_CACHE_DIR", str(blocked))  # its data/ folder cannot be made
    x, _ = data._digits(True)
    assert np.array_equal(x.numpy(), computed["x_train"])


def test_default_root_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FERD_DATA_DIR", str(tmp_path))
    assert default_data_root() == tmp_path
    monkeypatch.delenv("FERD_DATA_DIR")
    assert default_data_root().parts[-2:] == ("ferd-studio", "data")


# ---- MNIST / Fashion-MNIST in torchvision's raw idx format ----
def _write_idx_images(path: Path, images: np.ndarray) -> None:
    n, h, w = images.shape
    path.write_bytes(struct.pack(">IIII", 0x0803, n, h, w) + images.astype(np.uint8).tobytes())


def _write_idx_labels(path: Path, labels: np.ndarray) -> None:
    path.write_bytes(struct.pack(">II", 0x0801, len(labels)) + labels.astype(np.uint8).tobytes())


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_mnist_from_raw_files(tmp_path: Path, name: str, folder: str) -> None:
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    splits = {"train": (rng.integers(0, 256, (6, 28, 28)), np.array([0, 1, 2, 3, 4, 9])),
              "t10k": (rng.integers(0, 256, (4, 28, 28)), np.array([5, 6, 7, 8]))}
    for prefix, (images, labels) in splits.items():
        _write_idx_images(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx_labels(raw / f"{prefix}-labels-idx1-ubyte", labels)
    x, y = train_split(name, root=str(tmp_path))
    assert x.shape == (6, 1, 28, 28) and x.dtype == torch.float32
    assert torch.allclose(x[:, 0], torch.tensor(splits["train"][0] / 255.0, dtype=torch.float32))
    assert y.tolist() == [0, 1, 2, 3, 4, 9] and y.dtype == torch.int64
    x_te, y_te = data.test_split(name, root=str(tmp_path))
    assert x_te.shape == (4, 1, 28, 28) and y_te.tolist() == [5, 6, 7, 8]


# ---- CIFAR-10 pickled batches ----
def _write_cifar10(folder: Path, per_batch: int = 4) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        pixels = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": pixels, "labels": labels, "filenames": ["a.png"] * per_batch}, f)
        written[name] = pixels
    return written


def test_cifar10_from_batches(tmp_path: Path) -> None:
    written = _write_cifar10(tmp_path / "cifar-10-batches-py")
    x, y = train_split("cifar10", root=str(tmp_path))
    assert x.shape == (20, 3, 32, 32) and y.shape == (20,) and y.dtype == torch.int64
    first = written["data_batch_1"][0]
    # rows hold the R plane, then G, then B, each 32x32 row-major
    assert float(x[0, 0, 0, 0]) == pytest.approx(first[0] / 255.0)
    assert float(x[0, 1, 0, 0]) == pytest.approx(first[1024] / 255.0)
    assert float(x[0, 0, 1, 0]) == pytest.approx(first[32] / 255.0)
    x_te, _ = data.test_split("cifar10", root=str(tmp_path))
    assert x_te.shape == (4, 3, 32, 32)


def test_cifar_batches_with_code_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar10(folder)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": os.getcwd, "labels": [0]}, f)
    with pytest.raises(DataError, match="refusing"):
        data.test_split("cifar10", root=str(tmp_path))


# ---- Tiny-ImageNet folder ----
def _png(path: Path, colour: tuple[int, int, int], size: int = 64) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)


@pytest.mark.parametrize("val_layout", ["annotations", "subfolders"])
def test_tiny_imagenet_from_folder(tmp_path: Path, val_layout: str) -> None:
    base = tmp_path / "tiny-imagenet-200"
    colours = {"n01": (255, 0, 0), "n02": (0, 0, 255)}
    for wnid, colour in colours.items():
        for i in range(2):
            _png(base / "train" / wnid / "images" / f"{wnid}_{i}.JPEG.png", colour)
    if val_layout == "annotations":
        _png(base / "val" / "images" / "val_0.png", colours["n02"])
        _png(base / "val" / "images" / "val_1.png", colours["n01"], size=32)  # resized to 64
        (base / "val" / "val_annotations.txt").write_text("val_0.png\tn02\t0\t0\t10\t10\nval_1.png\tn01\t0\t0\t5\t5\n")
    else:
        _png(base / "val" / "n02" / "a.png", colours["n02"])
        _png(base / "val" / "n01" / "b.png", colours["n01"], size=32)
    x, y = train_split("tiny-imagenet", root=str(tmp_path))
    assert x.shape == (4, 3, 64, 64) and y.tolist() == [0, 0, 1, 1]
    assert float(x[0, 0].mean()) == pytest.approx(1.0) and float(x[2, 2].mean()) == pytest.approx(1.0)
    x_te, y_te = data.test_split("tiny-imagenet", root=str(tmp_path))
    assert x_te.shape == (2, 3, 64, 64)
    assert sorted(y_te.tolist()) == [0, 1]
    red = x_te[y_te == 0][0]
    assert float(red[0].mean()) == pytest.approx(1.0) and float(red[2].mean()) == pytest.approx(0.0)


def test_tiny_imagenet_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="tiny-imagenet-200"):
        train_split("tiny-imagenet", root=str(tmp_path))


# ---- offline and missing ----
def _offline(*_: object, **__: object) -> None:
    raise URLError("network is unreachable")


def test_missing_mnist_offline_gives_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.mnist as tv_mnist

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", _offline)
    with pytest.raises(DataError) as err:
        train_split("mnist", root=str(tmp_path))
    message = str(err.value)
    assert str(tmp_path / "MNIST" / "raw") in message and "train-images-idx3-ubyte" in message
    assert "download failed" in message


def test_missing_cifar_offline_gives_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", _offline)
    with pytest.raises(DataError, match="cifar-10-batches-py") as err:
        data.test_split("cifar10", root=str(tmp_path))
    assert "network is unreachable" in str(err.value)


def test_missing_svhn_offline_gives_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.svhn as tv_svhn

    monkeypatch.setattr(tv_svhn, "download_url", _offline)
    with pytest.raises(DataError, match="test_32x32.mat"):
        data.test_split("svhn", root=str(tmp_path))
