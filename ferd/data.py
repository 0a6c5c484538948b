"""Datasets as in-memory tensors: pixels float32 (N, C, H, W) in [0,1], labels int64 (N,).

`digits` (scikit-learn's handwritten digits, offline) is the embedded default (METHOD.md §10).
torchvision datasets are read from a data root (downloaded there when the machine is online),
Tiny-ImageNet from an ImageFolder-style folder. Decoded tensors are cached once per process; callers
must not modify them in place. The digits splits are also kept in the cache folder (`cache_dir()`), so that a
run need not import scikit-learn (about 2 s) after its first use on a machine.
"""

from __future__ import annotations

import functools
import io
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


class DataError(ValueError):
    """A dataset name is unknown or its files are missing or unreadable; the message says what to do."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    """(C, H, W) of the tensors train_split/test_split return."""
    class_names: tuple[str, ...]
    flip: bool
    """Whether horizontal flips are a valid augmentation (False for digits, where a flip changes meaning)."""


_DIGIT_NAMES = tuple(str(i) for i in range(10))
_FASHION_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot")
_CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_CIFAR100_NAMES = tuple("""
apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can castle
caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin elephant
flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree
motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate
poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake spider
squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip turtle
wardrobe whale willow_tree wolf woman worm
""".split())

DATASETS: dict[str, DatasetInfo] = {info.name: info for info in (
    DatasetInfo("digits", 10, (1, 16, 16), _DIGIT_NAMES, flip=False),
    DatasetInfo("mnist", 10, (1, 28, 28), _DIGIT_NAMES, flip=False),
    DatasetInfo("fashion-mnist", 10, (1, 28, 28), _FASHION_NAMES, flip=False),
    DatasetInfo("svhn", 10, (3, 32, 32), _DIGIT_NAMES, flip=False),
    DatasetInfo("cifar10", 10, (3, 32, 32), _CIFAR10_NAMES, flip=True),
    DatasetInfo("cifar100", 100, (3, 32, 32), _CIFAR100_NAMES, flip=True),
    # WordNet ids are only known once the folder is read; classes are numbered in sorted-wnid order.
    DatasetInfo("tiny-imagenet", 200, (3, 64, 64), tuple(str(i) for i in range(200)), flip=True),
)}


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def cache_dir() -> Path:
    """$FERD_CACHE_DIR, else the user cache dir of ferd-studio (embedded teachers, the digits splits)."""
    env = os.environ.get("FERD_CACHE_DIR", "")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("ferd-studio"))


def default_data_root() -> Path:
    """$FERD_DATA_DIR, else the user data dir / ferd-studio / data."""
    env = os.environ.get("FERD_DATA_DIR", "")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("ferd-studio")) / "data"


def train_split(name: str, root: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """The training split (x, y) exactly as training uses it; cached per process."""
    dataset_info(name)
    return _load(name, _resolve_root(root), train=True)


def test_split(name: str, root: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """The test split (x, y) exactly as evaluation uses it (Tiny-ImageNet: its val split); cached per process."""
    dataset_info(name)
    return _load(name, _resolve_root(root), train=False)


def _resolve_root(root: str) -> str:
    return str((Path(root).expanduser() if root else default_data_root()).resolve())


@functools.lru_cache(maxsize=16)
def _load(name: str, root: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if name == "digits":
        x, y = _digits(train)
    elif name in ("mnist", "fashion-mnist"):
        x, y = _mnist(name, Path(root), train)
    elif name in ("cifar10", "cifar100"):
        x, y = _cifar(name, Path(root), train)
    elif name == "svhn":
        x, y = _svhn(Path(root), train)
    else:
        x, y = _tiny_imagenet(Path(root), train)
    info = DATASETS[name]
    if tuple(x.shape[1:]) != info.image_shape or len(x) != len(y) or len(x) == 0:
        raise DataError(f"{name}: read images of shape {tuple(x.shape)} with {len(y)} labels; "
                        f"expected (N, {', '.join(map(str, info.image_shape))}) with N >= 1")
    if int(y.min()) < 0 or int(y.max()) >= info.num_classes:
        raise DataError(f"{name}: labels must lie in 0..{info.num_classes - 1}, read {int(y.min())}..{int(y.max())}")
    return x.contiguous(), y.contiguous()


# ---- digits (embedded, offline) ----
DIGITS_CACHE_VERSION = 1  # bump when _digits_from_sklearn changes what it computes


def _digits(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn digits / 16, bilinear 8x8 -> 16x16, stratified 70/30 split with seed 0 (1257 / 540).

    Read from the cache folder when an earlier process wrote them for this scikit-learn version (the same
    bits: the arrays are stored as computed); computed, then written, otherwise. A cache file that cannot be
    read is computed again and replaced."""
    arrays = _cached_digits()
    key = "train" if train else "test"
    return torch.from_numpy(arrays[f"x_{key}"]), torch.from_numpy(arrays[f"y_{key}"])


def _digits_cache_path() -> Path:
    from importlib.metadata import version

    return cache_dir() / "data" / f"digits-sklearn{version('scikit-learn')}-v{DIGITS_CACHE_VERSION}.npz"


def _cached_digits() -> dict[str, np.ndarray]:
    path = _digits_cache_path()
    names = ("x_train", "y_train", "x_test", "y_test")
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in names}
        if arrays["x_train"].shape[1:] == (1, 16, 16) and len(arrays["x_test"]) == len(arrays["y_test"]):
            return arrays
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass  # absent or unreadable: compute it
    arrays = _digits_from_sklearn()
    try:
        from ferd import atomic

        buf = io.BytesIO()
        np.savez(buf, **arrays)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_bytes(path, buf.getvalue())
    except OSError:
        pass  # a read-only or full cache folder only costs the next process the computation
    return arrays


def _digits_from_sklearn() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    y = torch.tensor(digits.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=0.3, stratify=digits.target, random_state=0)
    out = {}
    for key, idx in (("train", idx_train), ("test", idx_test)):
        out[f"x_{key}"] = x[torch.as_tensor(idx)].numpy()
        out[f"y_{key}"] = y[torch.as_tensor(idx)].numpy()
    return out


# ---- torchvision datasets ----
def _missing(name: str, folder: Path, files: str, err: BaseException) -> DataError:
    return DataError(
        f"{name}: dataset files not found under {folder} and the download failed ({type(err).__name__}: {err}). "
        f"Without internet, copy {files} into {folder} (or set the data root / FERD_DATA_DIR to a folder "
        f"that has them).")


def _download(name: str, root: Path, train: bool) -> None:
    """Let torchvision fetch the dataset into root; any failure becomes a DataError that says where files go."""
    from torchvision import datasets

    where = {
        "mnist": (root / "MNIST" / "raw", "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte "
                  "and t10k-labels-idx1-ubyte"),
        "fashion-mnist": (root / "FashionMNIST" / "raw", "train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                          "t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte"),
        "cifar10": (root / "cifar-10-batches-py", "the extracted cifar-10-python.tar.gz (data_batch_1..5, test_batch)"),
        "cifar100": (root / "cifar-100-python", "the extracted cifar-100-python.tar.gz (train, test)"),
        "svhn": (root / "svhn", "train_32x32.mat and test_32x32.mat"),
    }
    folder, files = where[name]
    try:
        if name == "mnist":
            datasets.MNIST(str(root), train=train, download=True)
        elif name == "fashion-mnist":
            datasets.FashionMNIST(str(root), train=train, download=True)
        elif name == "cifar10":
            datasets.CIFAR10(str(root), train=train, download=True)
        elif name == "cifar100":
            datasets.CIFAR100(str(root), train=train, download=True)
        else:
            datasets.SVHN(str(root / "svhn"), split="train" if train else "test", download=True)
    except (OSError, RuntimeError, ValueError) as e:  # URLError is an OSError; torchvision wraps some in RuntimeError
        raise _missing(name, folder, files, e) from e


def _mnist(name: str, root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision import datasets

    cls = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
    try:
        ds = cls(str(root), train=train, download=False)
    except RuntimeError:
        _download(name, root, train)
        ds = cls(str(root), train=train, download=False)
    return ds.data.unsqueeze(1).float() / 255.0, ds.targets.long()


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only what the CIFAR batch files hold: dicts, lists, strings, numbers and numpy arrays."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
                ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset file")
        return super().find_class(module, name)


def _read_batch(path: Path) -> dict:
    with open(path, "rb") as f:
        try:
            d = _ArrayUnpickler(f, encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, ValueError) as e:
            raise DataError(f"cannot read {path}: {e}") from e
    if not isinstance(d, dict) or "data" not in d:
        raise DataError(f"{path} is not a CIFAR batch (a dict with 'data' and labels)")
    return d


def _cifar(name: str, root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Reads the python-pickle batches directly (torchvision's loader insists on the original checksums)."""
    if name == "cifar10":
        folder, label_key = root / "cifar-10-batches-py", "labels"
        files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    else:
        folder, label_key = root / "cifar-100-python", "fine_labels"
        files = ["train" if train else "test"]
    if not all((folder / f).is_file() for f in files):
        _download(name, root, train)
    xs, ys = [], []
    for f in files:
        d = _read_batch(folder / f)
        xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[label_key], dtype=np.int64))
    x = torch.from_numpy(np.concatenate(xs)).float() / 255.0
    return x, torch.from_numpy(np.concatenate(ys))


def _svhn(root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from scipy.io import loadmat

    path = root / "svhn" / ("train_32x32.mat" if train else "test_32x32.mat")
    if not path.is_file():
        _download("svhn", root, train)
    try:
        mat = loadmat(str(path))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    x = torch.from_numpy(np.transpose(mat["X"], (3, 2, 0, 1)).copy()).float() / 255.0  # (32,32,3,N) -> (N,3,32,32)
    y = torch.from_numpy(mat["y"].astype(np.int64).reshape(-1)) % 10  # SVHN labels the digit 0 as 10
    return x, y


# ---- Tiny-ImageNet (folder only) ----
_IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)


def _tiny_imagenet(root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """root/tiny-imagenet-200/train/<wnid>/[images/]*.JPEG; val either as class subfolders or as
    val/images/*.JPEG with val/val_annotations.txt (file<TAB>wnid<TAB>...). Classes in sorted-wnid order."""
    base = root / "tiny-imagenet-200"
    train_dir = base / "train"
    if not train_dir.is_dir() or not (base / "val").is_dir():
        raise DataError(f"tiny-imagenet: no folder {base} with train/ and val/ inside. Download tiny-imagenet-200.zip "
                        f"(cs231n.stanford.edu) and extract it into {root}; it is not downloaded automatically.")
    wnids = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    index = {w: i for i, w in enumerate(wnids)}
    items: list[tuple[Path, int]] = []
    if train:
        for w in wnids:
            items += [(p, index[w]) for p in _images_in(train_dir / w)]
    else:
        val = base / "val"
        annotations = val / "val_annotations.txt"
        if annotations.is_file():
            for line in annotations.read_text().splitlines():
                parts = line.split("\t")
                if len(parts) >= 2 and parts[1] in index:
                    items.append((val / "images" / parts[0], index[parts[1]]))
        else:
            for w in wnids:
                items += [(p, index[w]) for p in _images_in(val / w)]
    if not items:
        raise DataError(f"tiny-imagenet: no images found for the {'train' if train else 'val'} split under {base}")
    return _decode(items)


def _decode(items: list[tuple[Path, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    x = np.empty((len(items), 64, 64, 3), dtype=np.uint8)
    for i, (path, _) in enumerate(items):
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB")
                if rgb.size != (64, 64):
                    rgb = rgb.resize((64, 64), Image.BILINEAR)
                x[i] = np.asarray(rgb)
        except OSError as e:
            raise DataError(f"tiny-imagenet: cannot read image {path}: {e}") from e
    y = torch.tensor([label for _, label in items], dtype=torch.int64)
    return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0, y
