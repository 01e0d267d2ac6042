"""Image classification datasets: normalized tensors in memory, or image folders decoded on demand.

One registry maps a dataset name to its loader. Every loader returns images in
[0, 1] as float32 (N, C, H, W) and int64 labels; :func:`load_dataset` then
normalizes both splits with the per-channel mean/std of the training split.
Nothing is unpickled: CIFAR is read from its binary (not its python) version.
``imagefolder:PATH`` is only indexed (:mod:`pnc.zoo.imagefolder`): its splits are
:class:`~pnc.zoo.images.ImageFiles`, decoded when a task reads them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pnc.surgery.errors import DataError
from pnc.zoo.idx import read_idx
from pnc.zoo.imagefolder import index_image_folder
from pnc.zoo.images import ImageData, ImageFiles, ImageSet

__all__ = [
    "ImageData",
    "ImageFiles",
    "ImageSet",
    "DatasetSplits",
    "load_dataset",
    "list_datasets",
    "FASHION_MNIST_CLASSES",
]

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
IMAGEFOLDER_PREFIX = "imagefolder:"
#: side in pixels image folders are resized to unless told otherwise
DEFAULT_IMAGE_SIZE = 64


@dataclass
class DatasetSplits:
    """A dataset's train and test splits; ``y`` holds the dataset's own class ids. Image
    folders' splits are :class:`ImageFiles` (decoded on demand), the others' :class:`ImageData`."""

    name: str
    train: ImageSet
    test: ImageSet
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: tuple[int, int, int]
    data_dir: str | None = None  # the folder the files were read from (None: bundled)


@dataclass
class _Raw:
    """Unnormalized splits: images in [0, 1], float32 (N, C, H, W); labels int64 (N,)."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: list[str]


@dataclass(frozen=True)
class _Loader:
    read: Callable[[Path | None], _Raw]
    present: Callable[[Path], bool]  # does this folder hold the data?
    how_to_get: str
    fetch: Callable[[Path], None] | None = None  # download into a folder
    default_dir: str | None = None
    needs_folder: bool = True


def _images(array: np.ndarray, scale: float) -> Tensor:
    """(N, H, W) or (N, C, H, W) array -> float32 tensor in [0, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(array)).float().div_(scale)
    return x.unsqueeze(1) if x.ndim == 3 else x


# --- MNIST-format IDX folders (MNIST, Fashion-MNIST) ---------------------------------

_IDX_STEMS = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
_IDX_SUBDIRS = ("", "raw", "MNIST/raw", "FashionMNIST/raw")


def _idx_file(folder: Path, stem: str) -> Path | None:
    for sub in _IDX_SUBDIRS:
        for suffix in ("", ".gz"):
            path = folder / sub / (stem + suffix)
            if path.is_file():
                return path
    return None


def _idx_present(folder: Path) -> bool:
    return all(_idx_file(folder, stem) is not None for stem in _IDX_STEMS.values())


def _read_idx_folder(folder: Path, classes: list[str]) -> _Raw:
    arrays = {key: read_idx(_idx_file(folder, stem)) for key, stem in _IDX_STEMS.items()}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(
                f"IDX files in {folder}: {split} images {x.shape} and labels {y.shape} "
                "do not match (expected (N, H, W) and (N,))"
            )
        if y.size and int(y.max()) >= len(classes):
            raise DataError(
                f"IDX labels in {folder} go up to {int(y.max())}, but the dataset has {len(classes)} classes"
            )
    return _Raw(
        _images(arrays["train_x"], 255.0),
        torch.from_numpy(arrays["train_y"].astype(np.int64)),
        _images(arrays["test_x"], 255.0),
        torch.from_numpy(arrays["test_y"].astype(np.int64)),
        list(classes),
    )


def _torchvision_fetch(dataset_cls: str) -> Callable[[Path], None]:
    def fetch(folder: Path) -> None:
        import torchvision.datasets as tvd

        getattr(tvd, dataset_cls)(str(folder), train=True, download=True)
        getattr(tvd, dataset_cls)(str(folder), train=False, download=True)

    return fetch


def _idx_how_to_get(name: str) -> str:
    files = ", ".join(f"{stem}[.gz]" for stem in _IDX_STEMS.values())
    return f"pass --data-dir FOLDER (or set PNC_DATA_DIR, with a '{name}' subfolder) holding {files}"


# --- CIFAR binary version --------------------------------------------------------------


def _read_cifar_bin(files: list[Path], label_bytes: int, label_at: int) -> tuple[Tensor, Tensor]:
    record = label_bytes + 3 * 32 * 32
    chunks = []
    for path in files:
        raw = np.fromfile(path, dtype=np.uint8)
        if raw.size == 0 or raw.size % record:
            raise DataError(
                f"CIFAR file {path} has {raw.size} bytes, not a multiple of the {record}-byte record; download it again"
            )
        chunks.append(raw.reshape(-1, record))
    rows = np.concatenate(chunks)
    return _images(rows[:, label_bytes:].reshape(-1, 3, 32, 32), 255.0), torch.from_numpy(
        rows[:, label_at].astype(np.int64)
    )


def _cifar_dir(folder: Path, sub: str, probe: str) -> Path | None:
    for candidate in (folder / sub, folder):
        if (candidate / probe).is_file():
            return candidate
    return None


def _read_cifar10(folder: Path | None) -> _Raw:
    root = _cifar_dir(folder, "cifar-10-batches-bin", "test_batch.bin")
    train_x, train_y = _read_cifar_bin([root / f"data_batch_{i}.bin" for i in range(1, 6)], 1, 0)
    test_x, test_y = _read_cifar_bin([root / "test_batch.bin"], 1, 0)
    classes = (root / "batches.meta.txt").read_text().split()
    return _Raw(train_x, train_y, test_x, test_y, classes)


def _read_cifar100(folder: Path | None) -> _Raw:
    root = _cifar_dir(folder, "cifar-100-binary", "test.bin")
    train_x, train_y = _read_cifar_bin([root / "train.bin"], 2, 1)
    test_x, test_y = _read_cifar_bin([root / "test.bin"], 2, 1)
    classes = (root / "fine_label_names.txt").read_text().split()
    return _Raw(train_x, train_y, test_x, test_y, classes)


def _archive_fetch(url: str, md5: str) -> Callable[[Path], None]:
    def fetch(folder: Path) -> None:
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(url, str(folder), md5=md5)

    return fetch


# --- scikit-learn digits ---------------------------------------------------------------


def _read_digits(_: Path | None) -> _Raw:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        digits.images, digits.target, test_size=0.3, stratify=digits.target, random_state=0
    )
    return _Raw(
        _images(x_tr, 16.0),
        torch.from_numpy(y_tr.astype(np.int64)),
        _images(x_te, 16.0),
        torch.from_numpy(y_te.astype(np.int64)),
        [str(i) for i in range(10)],
    )


# --- registry --------------------------------------------------------------------------

_REGISTRY: dict[str, _Loader] = {
    "digits": _Loader(
        read=_read_digits, present=lambda _: True, how_to_get="bundled with scikit-learn", needs_folder=False
    ),
    "fashion-mnist": _Loader(
        read=lambda folder: _read_idx_folder(folder, FASHION_MNIST_CLASSES),
        present=_idx_present,
        how_to_get="apt-get install dataset-fashion-mnist (Debian/Ubuntu), or "
        + _idx_how_to_get("fashion-mnist")
        + ", or add --download",
        fetch=_torchvision_fetch("FashionMNIST"),
        default_dir="/usr/share/datasets/fashion-mnist",
    ),
    "mnist": _Loader(
        read=lambda folder: _read_idx_folder(folder, [str(i) for i in range(10)]),
        present=_idx_present,
        how_to_get=_idx_how_to_get("mnist") + ", or add --download",
        fetch=_torchvision_fetch("MNIST"),
    ),
    "cifar10": _Loader(
        read=_read_cifar10,
        present=lambda f: _cifar_dir(f, "cifar-10-batches-bin", "test_batch.bin") is not None,
        how_to_get="pass --data-dir FOLDER holding the CIFAR-10 binary version (cifar-10-batches-bin/"
        "data_batch_1..5.bin, test_batch.bin, batches.meta.txt), or add --download",
        fetch=_archive_fetch(
            "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530"
        ),
    ),
    "cifar100": _Loader(
        read=_read_cifar100,
        present=lambda f: _cifar_dir(f, "cifar-100-binary", "test.bin") is not None,
        how_to_get="pass --data-dir FOLDER holding the CIFAR-100 binary version (cifar-100-binary/"
        "train.bin, test.bin, fine_label_names.txt), or add --download",
        fetch=_archive_fetch(
            "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz", "03b5dce01913d631647c71ecec9e9cb8"
        ),
    ),
}


#: other names users type for a registered dataset
DATASET_ALIASES = {"fmnist": "fashion-mnist"}


def canonical_dataset(name: str) -> str:
    """The registered name of a dataset name or alias (``"fmnist"`` -> ``"fashion-mnist"``)."""
    return DATASET_ALIASES.get(name, name)


def list_datasets() -> list[str]:
    """Registered dataset names (plus ``imagefolder:PATH`` for any folder tree)."""
    return sorted(_REGISTRY)


def _candidates(name: str, loader: _Loader, data_dir: str | None) -> list[Path]:
    if data_dir is not None:
        return [Path(data_dir), Path(data_dir) / name]
    env = os.environ.get("PNC_DATA_DIR")
    return ([Path(env) / name] if env else []) + ([Path(loader.default_dir)] if loader.default_dir else [])


def _normalize(name: str, raw: _Raw, data_dir: str | None) -> DatasetSplits:
    if len(raw.train_y) == 0 or len(raw.test_y) == 0:
        raise DataError(f"dataset {name} has an empty train or test split")
    dims = (0, 2, 3)
    mean = raw.train_x.mean(dim=dims)
    std = raw.train_x.std(dim=dims).clamp_min(1e-6)
    shift, scale = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)
    train = ImageData(raw.train_x.sub_(shift).div_(scale), raw.train_y)
    test = ImageData(raw.test_x.sub_(shift).div_(scale), raw.test_y)
    return DatasetSplits(
        name=name,
        train=train,
        test=test,
        classes=raw.classes,
        mean=tuple(round(v, 6) for v in mean.tolist()),
        std=tuple(round(v, 6) for v in std.tolist()),
        input_size=tuple(raw.train_x.shape[1:]),
        data_dir=data_dir,
    )


def load_dataset(
    name: str, data_dir: str | None = None, download: bool = False, image_size: int = DEFAULT_IMAGE_SIZE
) -> DatasetSplits:
    """Load ``name`` (see :func:`list_datasets`, or ``imagefolder:PATH``) normalized by the
    training split's per-channel mean/std. ``data_dir`` is the dataset's folder (or a
    parent holding a ``<name>`` subfolder); without it ``$PNC_DATA_DIR/<name>`` and then
    the system default are tried. ``image_size`` applies to image folders only, which are
    indexed, not read: see :mod:`pnc.zoo.imagefolder`."""
    name = canonical_dataset(name)
    if name.startswith(IMAGEFOLDER_PREFIX):
        root = name[len(IMAGEFOLDER_PREFIX) :]
        index = index_image_folder(root, image_size)
        return DatasetSplits(
            name=name,
            train=index.train,
            test=index.test,
            classes=index.classes,
            mean=tuple(round(v, 6) for v in index.mean.tolist()),
            std=tuple(round(v, 6) for v in index.std.tolist()),
            input_size=(3, image_size, image_size),
            data_dir=root,
        )
    loader = _REGISTRY.get(name)
    if loader is None:
        raise DataError(
            f"unknown dataset {name!r}; choose one of {', '.join(list_datasets())} or {IMAGEFOLDER_PREFIX}PATH"
        )
    if not loader.needs_folder:
        return _normalize(name, loader.read(None), None)
    candidates = _candidates(name, loader, data_dir)
    folder = next((c for c in candidates if c.is_dir() and loader.present(c)), None)
    if folder is None and download and loader.fetch is not None:
        if not candidates:
            raise DataError(f"--download needs a folder for {name}: pass --data-dir FOLDER or set PNC_DATA_DIR")
        folder = candidates[0]
        folder.mkdir(parents=True, exist_ok=True)
        try:
            loader.fetch(folder)
        except (OSError, RuntimeError) as err:
            raise DataError(
                f"downloading {name} into {folder} failed ({err}); "
                f"without a network, {loader.how_to_get.removesuffix(', or add --download')}"
            ) from err
    if folder is None:
        tried = ", ".join(str(c) for c in candidates) or "no folder given"
        raise DataError(f"dataset {name} not found (looked in: {tried}); {loader.how_to_get}")
    return _normalize(name, loader.read(folder), str(folder))
