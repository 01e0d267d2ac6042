"""Image folders indexed without decoding: ``root/train/<class>/**`` and ``root/val`` (or
``test``) as ``<class>/**`` or Tiny-ImageNet's ``val/images/*`` + ``val_annotations.txt``.

:func:`index_image_folder` lists the files (torchvision's ``find_classes`` /
``make_dataset``, sorted paths) and estimates the per-channel mean/std of the training
images from a seeded sample of at most :data:`STATS_IMAGES` of them (every one when there
are fewer), streamed in batches; no other image is decoded until a task asks for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from pnc.surgery.errors import DataError
from pnc.zoo.images import ImageFiles

__all__ = ["FolderIndex", "index_image_folder", "STATS_IMAGES"]

#: training images the normalization statistics are estimated from (seeded sample)
STATS_IMAGES = 1024


@dataclass
class FolderIndex:
    """An indexed image folder: both splits as :class:`ImageFiles`, the class names (sorted
    folder names), and the unrounded training mean/std (3,) they are normalized with."""

    train: ImageFiles
    test: ImageFiles
    classes: list[str]
    mean: Tensor
    std: Tensor


def _eval_split(root: Path, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    for split in ("val", "test"):
        folder = root / split
        annotations = folder / "val_annotations.txt"  # Tiny-ImageNet: val/images/* + table
        if annotations.is_file():
            rows = [line.split("\t") for line in annotations.read_text().splitlines() if line.strip()]
            unknown = sorted({r[1] for r in rows} - set(class_to_idx))
            if unknown:
                raise DataError(f"{annotations} names classes absent from {root / 'train'}: {unknown[:5]}")
            return [(str(folder / "images" / r[0]), class_to_idx[r[1]]) for r in rows]
        if folder.is_dir():
            return make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    raise DataError(
        f"{root} has no val/ or test/ folder; expected val/<class>/* or Tiny-ImageNet's "
        "val/images/* with val/val_annotations.txt"
    )


def _train_split(root: Path) -> tuple[list[str], dict[str, int], list[tuple[str, int]]]:
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    if not (root / "train").is_dir():
        raise DataError(
            f"image folder {root} has no train/ subfolder; expected train/<class>/*.JPEG "
            "(or Tiny-ImageNet's train/<wnid>/images/*.JPEG) and val/"
        )
    try:
        classes, class_to_idx = find_classes(str(root / "train"))
        rows = make_dataset(str(root / "train"), class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as err:
        raise DataError(
            f"image folder {root}: {err}; every class folder under train/ needs at least one image "
            f"({', '.join(IMG_EXTENSIONS)}): add images or remove the empty folder"
        ) from err
    return classes, class_to_idx, rows


def _sample_stats(raw: ImageFiles, count: int) -> tuple[Tensor, Tensor]:
    """Per-channel mean and (unbiased) std (3,) of a seeded sample of ``count`` rows of
    ``raw`` (unnormalized files: mean 0, std 1; all rows when fewer), in float64."""
    n = len(raw)
    gen, where = torch.Generator().manual_seed(0), raw.y.device
    rows = torch.arange(n, device=where) if n <= count else torch.randperm(n, generator=gen, device=where)[:count]
    raw = raw.subset(rows.sort().values)
    total = torch.zeros(3, dtype=torch.float64, device=where)
    squares, pixels = torch.zeros_like(total), 0
    for x, _ in raw.batches(32):
        x = x.double()
        total += x.sum(dim=(0, 2, 3))
        squares += x.square().sum(dim=(0, 2, 3))
        pixels += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / pixels
    var = (squares - pixels * mean.square()) / max(pixels - 1, 1)
    return mean.float(), var.clamp_min(0).sqrt().float().clamp_min(1e-6)


def index_image_folder(root: str | Path, image_size: int) -> FolderIndex:
    """Index ``root``'s train and val/test splits for images of ``image_size`` px (DataError
    on a missing split, an empty class folder or an unreadable sampled image)."""
    if image_size < 1:
        raise DataError(f"image size {image_size} must be a positive number of pixels")
    root = Path(root)
    classes, class_to_idx, train_rows = _train_split(root)
    test_rows = _eval_split(root, class_to_idx)
    if not test_rows:
        raise DataError(f"image folder {root} has no evaluation images under val/ or test/")

    def files(rows: list[tuple[str, int]], mean: Tensor, std: Tensor) -> ImageFiles:
        return ImageFiles(
            [p for p, _ in rows], torch.tensor([c for _, c in rows], dtype=torch.int64), image_size, mean, std
        )

    mean, std = _sample_stats(files(train_rows, torch.zeros(3), torch.ones(3)), STATS_IMAGES)
    return FolderIndex(files(train_rows, mean, std), files(test_rows, mean, std), classes, mean, std)
