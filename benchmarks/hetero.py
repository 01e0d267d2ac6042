"""Table-2-style benchmark: cloning between heterogeneous architectures on Fashion-MNIST.

Pairs (source -> target), each target on classes 0-4 and source on 5-9, from different
seeds, cloning the "S" set (20% of the source's classes):

* ``resnetc20-cnn4``: the default ResNetC-20 source into a plain 4-conv CNN target;
* ``resnet18-mobilenetv2``: timm ``resnet18`` into timm ``mobilenetv2_050`` (both
  ``pretrained=False``, ``in_chans=1``), on Fashion-MNIST padded to 32x32 with black
  borders (the paper's 32 px input), each trained briefly here;
* ``vit-lenet5`` and ``lenet5-vit``: CNN <-> ViT both ways between the default LeNet-5
  pair and the default small timm ViT pair (patch 4 on 28 px, ``fmnist-vit-*``). LeNet-5's
  last block cut is flat (NC), which no adapter maps to tokens: the search skips that
  candidate and says so in the PNC rows' reports.

The zoo models these pairs need beyond the defaults are trained by the recipes in
:data:`EXTRA_MODELS` on first use and reused after (same store checks as the defaults).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pnc.bench.paper import RowCache, TableSpec, budget_for, run_table, write_table
from pnc.surgery.devices import DeviceLike
from pnc.surgery.errors import TaskError
from pnc.zoo.datasets import DatasetSplits, ImageData, load_dataset
from pnc.zoo.defaults import DEFAULTS, FMNIST_VALIDATION, DefaultModel, ensure_default
from pnc.zoo.store import ModelCard, ZooStore
from pnc.zoo.tasks import parse_classes

__all__ = ["EXTRA_MODELS", "PAIRS", "HeteroPair", "dataset_of", "dataset_named", "padded", "ensure_model", "run_hetero"]

PADDED_NAME = "fashion-mnist-32"

EXTRA_MODELS: dict[str, DefaultModel] = {
    m.name: m
    for m in [
        DefaultModel(
            "fmnist-cnn4-target",
            "cnn4",
            "fashion-mnist",
            "0-4",
            epochs=3,
            lr=0.05,
            seed=0,
            validation=FMNIST_VALIDATION,
        ),
        DefaultModel(
            "fmnist32-mobilenetv2_050-target",
            "mobilenetv2_050",
            PADDED_NAME,
            "0-4",
            epochs=3,
            lr=0.05,
            seed=0,
            validation=FMNIST_VALIDATION,
        ),
        DefaultModel(
            "fmnist32-resnet18-source",
            "resnet18",
            PADDED_NAME,
            "5-9",
            epochs=2,
            lr=0.05,
            seed=1,
            validation=FMNIST_VALIDATION,
        ),
    ]
}


@dataclass(frozen=True)
class HeteroPair:
    key: str
    title: str
    target: str
    source: str
    padded: bool


PAIRS: dict[str, HeteroPair] = {
    p.key: p
    for p in [
        HeteroPair(
            "resnetc20-cnn4",
            "ResNetC-20 source -> CNN4 target",
            "fmnist-cnn4-target",
            "fmnist-resnetc20-source",
            padded=False,
        ),
        HeteroPair(
            "resnet18-mobilenetv2",
            "timm resnet18 source -> timm mobilenetv2_050 target, 32 px",
            "fmnist32-mobilenetv2_050-target",
            "fmnist32-resnet18-source",
            padded=True,
        ),
        HeteroPair(
            "vit-lenet5",
            "timm ViT source -> LeNet-5 target",
            "fmnist-lenet5-target",
            "fmnist-vit-source",
            padded=False,
        ),
        HeteroPair(
            "lenet5-vit",
            "LeNet-5 source -> timm ViT target",
            "fmnist-vit-target",
            "fmnist-lenet5-source",
            padded=False,
        ),
    ]
}

#: Table 2's methods (the paper shows Pre-train, Continual and PNC; the others are cheap context)
HETERO_METHODS = ["Pre-trained", "Continual", "Continual+KD", "Direct Ensemble", "Calibrated Ensemble", "PNC"]


def padded(splits: DatasetSplits, size: int = 32) -> DatasetSplits:
    """The dataset zero-padded (black, i.e. -mean/std after normalization) to ``size`` px."""
    h = splits.input_size[-1]
    if size < h:
        raise TaskError(f"cannot pad {h} px images to {size} px")
    lo, hi = (size - h) // 2, size - h - (size - h) // 2
    black = [-m / s for m, s in zip(splits.mean, splits.std)]

    def pad(data: ImageData) -> ImageData:
        x = torch.stack([F.pad(data.x[:, c], (lo, hi, lo, hi), value=black[c]) for c in range(data.x.shape[1])], 1)
        return ImageData(x, data.y)

    return replace(
        splits,
        name=PADDED_NAME,
        train=pad(splits.train),
        test=pad(splits.test),
        input_size=(splits.input_size[0], size, size),
    )


def dataset_of(card: ModelCard, data_dir: str | None = None) -> DatasetSplits:
    """The dataset a zoo model was trained on (:func:`dataset_named` its card's)."""
    return dataset_named(card.dataset, data_dir)


def dataset_named(name: str, data_dir: str | None = None) -> DatasetSplits:
    """A dataset by the name a card or a table records: :data:`PADDED_NAME` is Fashion-MNIST
    padded to 32 px (Table 2's 32 px models), any other name is loaded as it is."""
    if name == PADDED_NAME:
        return padded(load_dataset("fashion-mnist", data_dir))
    return load_dataset(name, data_dir)


def ensure_model(store: ZooStore, name: str, splits: DatasetSplits, device: DeviceLike | None = None) -> ModelCard:
    """A default or :data:`EXTRA_MODELS` model: reused when intact and of its recipe, else trained
    on ``device``."""
    if name in DEFAULTS:
        return ensure_default(store, name, dataset=splits, progress=False, device=device)
    spec = EXTRA_MODELS[name]
    class_ids = parse_classes(spec.classes, splits.classes)
    if store.exists(name) and store.verify(name) and spec.matches(store.card(name), class_ids):
        return store.card(name)
    return spec.train(store, splits, class_ids, progress=False, device=device)


def run_hetero(
    pair_keys: list[str],
    *,
    seeds: list[int],
    methods: list[str] | None = None,
    quick: bool = False,
    zoo_dir: str | None = None,
    data_dir: str | None = None,
    out_dir: Path = Path("benchmarks/results"),
    workdir: Path | None = None,
    fresh: bool = False,
    command: str = "",
    log: Callable[[str], None] = print,
    device: DeviceLike | None = None,
) -> list[dict[str, Any]]:
    """Table 2 rows for each pair in ``pair_keys`` (scale S), run on ``device``; one
    markdown/JSON per pair, ``table2-<key>`` (``-quick`` with the tiny budget of ``quick``, a smoke run)."""
    from pnc.zoo.store import default_zoo_dir

    unknown = [k for k in pair_keys if k not in PAIRS]
    if unknown:
        raise TaskError(f"unknown pairs {unknown}; choose from {', '.join(PAIRS)}")
    store = ZooStore(zoo_dir)
    base = load_dataset("fashion-mnist", data_dir)
    workdir = Path(workdir) if workdir is not None else default_zoo_dir(zoo_dir).parent / "bench"
    results = []
    for key in pair_keys:
        pair = PAIRS[key]
        splits = padded(base) if pair.padded else base
        t_card = ensure_model(store, pair.target, splits if pair.target not in DEFAULTS else base, device)
        s_card = ensure_model(store, pair.source, splits if pair.source not in DEFAULTS else base, device)
        stem = f"table2-{key}" + ("-quick" if quick else "")
        spec = TableSpec(
            stem=stem,
            title=f"Table 2 analogue: {pair.title}, Fashion-MNIST" + (" (quick budget)" if quick else ""),
            target=pair.target,
            source=pair.source,
            scales=["S"],
            seeds=seeds,
            methods=methods or HETERO_METHODS,
            budget=budget_for(t_card, quick),
        )
        cache = RowCache(Path(out_dir) / f"{stem}.rows.json", fresh)
        per_seed = run_table(spec, store, splits, cache, workdir, log=log, device=device)
        results.append(write_table(spec, per_seed, t_card, s_card, splits, out_dir, command))
    return results
