"""Image sets: decoded tensors in memory (:class:`ImageData`) or image files decoded on demand
(:class:`ImageFiles`).

An :class:`ImageFiles` is an index of image files (paths + labels): ``subset`` and
:func:`join` pick rows without decoding anything; ``load`` decodes the picked rows into an
:class:`ImageData`, ``batches`` streams them through a torch ``DataLoader`` (worker
processes for reads of :data:`PARALLEL_ROWS` images or more). Decoding: RGB, bilinear
resize to ``size`` x ``size``, / 255, minus ``mean``, over ``std`` (per channel, float32).
:func:`iter_batches` and :func:`decoded` take either kind.

Two environment variables tune it: ``PNC_DATA_WORKERS`` (decoding processes, default
``min(4, CPUs)``; 0 decodes in the calling process) and ``PNC_DECODE_CACHE_MB`` (how
much decoded training data ``fit`` keeps in memory instead of decoding every epoch,
default 1024).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from pnc.surgery.errors import DataError

__all__ = ["ImageData", "ImageFiles", "ImageSet", "decoded", "iter_batches", "join", "decode_cache_bytes"]

#: reads of at least this many images use DataLoader worker processes
PARALLEL_ROWS = 256
#: images per decoded batch when streaming files for evaluation (bounds memory at any image size)
STREAM_ROWS = 32


@dataclass
class ImageData:
    """Images ``x`` (N, C, H, W) float32, already normalized, and labels ``y`` (N,) int64."""

    x: Tensor
    y: Tensor

    def __post_init__(self) -> None:
        if self.x.ndim != 4 or self.y.ndim != 1 or len(self.x) != len(self.y):
            raise DataError(
                f"ImageData needs x of shape (N, C, H, W) and y of shape (N,), "
                f"got {tuple(self.x.shape)} and {tuple(self.y.shape)}"
            )

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: Tensor, labels: Tensor | None = None) -> ImageData:
        """Rows ``index`` (1-D long tensor), optionally with new labels."""
        return ImageData(self.x[index], self.y[index] if labels is None else labels)


@dataclass
class ImageFiles:
    """Image files decoded on demand: ``paths`` (N,), labels ``y`` (N,) int64, decoded to
    (3, ``size``, ``size``) and normalized by ``mean`` / ``std`` (3,) float32."""

    paths: list[str]
    y: Tensor
    size: int
    mean: Tensor
    std: Tensor

    def __post_init__(self) -> None:
        if self.y.ndim != 1 or len(self.paths) != len(self.y):
            raise DataError(
                f"ImageFiles needs one label per path, got {len(self.paths)} paths and {tuple(self.y.shape)}"
            )

    def __len__(self) -> int:
        return len(self.y)

    @property
    def nbytes(self) -> int:
        """Bytes the decoded images take as float32."""
        return len(self) * 3 * self.size * self.size * 4

    def subset(self, index: Tensor, labels: Tensor | None = None) -> ImageFiles:
        """Rows ``index`` (1-D long tensor), optionally with new labels; nothing is decoded."""
        rows = index.tolist()
        return ImageFiles(
            [self.paths[i] for i in rows], self.y[index] if labels is None else labels, self.size, self.mean, self.std
        )

    def batches(self, batch_size: int = 64, order: Sequence[Tensor] | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """Decoded (x (B, 3, size, size), y (B,)) batches: rows ``order`` (a list of index
        tensors), or all rows in order. DataError names the first file that cannot be read."""
        if order is None:
            order = list(torch.arange(len(self), device=self.y.device).split(batch_size))
        rows = sum(len(index) for index in order)
        workers = data_workers() if rows >= PARALLEL_ROWS else 0
        loader = DataLoader(
            _Decoder(self.paths, self.size, self.mean, self.std),
            batch_sampler=[index.tolist() for index in order],
            num_workers=workers,
            collate_fn=_collate,
            prefetch_factor=1 if workers else None,
            generator=torch.Generator().manual_seed(0),  # its seed draw must not move the global RNG
        )
        for index, x in zip(order, loader):
            if isinstance(x, str):
                raise DataError(x)
            yield x, self.y[index]

    def load(self, desc: str = "images") -> ImageData:
        """Decode every row into one :class:`ImageData` (a progress bar from 500 images)."""
        from rich.progress import track

        out = torch.empty(len(self), 3, self.size, self.size, device=self.y.device)
        chunks = list(torch.arange(len(self), device=self.y.device).split(STREAM_ROWS))
        done = 0
        for x, _ in track(
            self.batches(order=chunks), description=desc, total=len(chunks), disable=len(self) < 500, transient=True
        ):
            out[done : done + len(x)] = x
            done += len(x)
        return ImageData(out, self.y.clone())


#: either kind of image set
ImageSet = ImageData | ImageFiles


def decode_image(path: str, size: int) -> np.ndarray:
    """One image file -> (size, size, 3) uint8 RGB, bilinear resize; DataError if unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(rgb).copy()
    except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, ... on a broken file
        raise DataError(f"cannot read image {path}: {err}; replace or delete the file") from err


class _Decoder(Dataset):
    """``paths[i]`` -> normalized (3, size, size) float32, or the DataError message as a str
    (so that a worker's error reaches the caller as one line, not a wrapped traceback)."""

    def __init__(self, paths: list[str], size: int, mean: Tensor, std: Tensor) -> None:
        self.paths, self.size = paths, size
        self.mean, self.std = mean.view(3, 1, 1), std.view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tensor | str:
        try:
            pixels = decode_image(self.paths[i], self.size)
        except DataError as err:
            return str(err)
        x = torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255.0)
        return x.sub_(self.mean).div_(self.std)


def _collate(items: list[Tensor | str]) -> Tensor | str:
    errors = [item for item in items if isinstance(item, str)]
    return errors[0] if errors else torch.stack(items)  # type: ignore[arg-type]


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise DataError(f"${name}={raw!r} is not a whole number >= 0; unset it or give e.g. {default}")
    return value


def data_workers() -> int:
    """DataLoader worker processes for large reads: ``$PNC_DATA_WORKERS``, default min(4, CPUs)."""
    return _env_int("PNC_DATA_WORKERS", min(4, len(os.sched_getaffinity(0))))


def decode_cache_bytes() -> int:
    """How many bytes of decoded training images may stay in memory: ``$PNC_DECODE_CACHE_MB``."""
    return _env_int("PNC_DECODE_CACHE_MB", 1024) * 2**20


def decoded(data: ImageSet, desc: str = "images") -> ImageData:
    """``data`` as tensors: an :class:`ImageData` as it is, an :class:`ImageFiles` decoded."""
    return data if isinstance(data, ImageData) else data.load(desc)


def iter_batches(data: ImageSet, batch_size: int = 512) -> Iterator[tuple[Tensor, Tensor]]:
    """(x, y) batches of ``data`` in order; files are decoded :data:`STREAM_ROWS` at a time."""
    if isinstance(data, ImageData):
        yield from zip(data.x.split(batch_size), data.y.split(batch_size))
    else:
        yield from data.batches(min(batch_size, STREAM_ROWS))


def join(first: ImageSet, second: ImageSet) -> ImageSet:
    """The rows of ``first`` then those of ``second`` (of the same kind; files stay undecoded)."""
    if isinstance(first, ImageData) and isinstance(second, ImageData):
        return ImageData(torch.cat([first.x, second.x]), torch.cat([first.y, second.y]))
    if isinstance(first, ImageFiles) and isinstance(second, ImageFiles):
        return ImageFiles(first.paths + second.paths, torch.cat([first.y, second.y]), first.size, first.mean, first.std)
    raise DataError("cannot join decoded images with image files; decode both or neither")
