"""The default target/source pairs: trained here, on the CPU, in a few minutes.

Target and source of a pair see disjoint class halves and start from different
seeds (with the same seed their features line up by accident, see docs/design.md).
Recipes are SGD + Nesterov momentum with a cosine schedule (see ``train.fit``), AdamW for
the ViT pair; their accuracies and times on a 2-core CPU are in ``benchmarks/results/zoo.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.console import Console

from pnc.surgery.devices import DeviceLike
from pnc.surgery.errors import DataError, ModelNotFoundError, StoreError
from pnc.zoo.datasets import DatasetSplits, canonical_dataset, load_dataset
from pnc.zoo.store import ModelCard, ZooStore
from pnc.zoo.tasks import parse_classes
from pnc.zoo.train import train_zoo_model

__all__ = ["DefaultModel", "DEFAULTS", "FMNIST_VALIDATION", "default_pair", "ensure_default", "pretrain_defaults"]


@dataclass(frozen=True)
class DefaultModel:
    """How one default zoo model is trained (``optimizer``: a key of ``train.OPTIMIZERS``)."""

    name: str
    arch: str
    dataset: str
    classes: str
    epochs: int
    lr: float
    seed: int
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 128
    optimizer: str = "sgd"
    weight_decay: float = 5e-4
    validation: float = 0.0

    def matches(self, card: ModelCard, class_ids: list[int]) -> bool:
        """Was ``card`` trained by this recipe (architecture settings included)?"""
        recipe = card.recipe
        kwargs = {k: card.kwargs.get(k) for k in self.arch_kwargs}
        return (card.arch, card.dataset, card.classes, kwargs) == (
            self.arch,
            self.dataset,
            class_ids,
            self.arch_kwargs,
        ) and (
            recipe.get("epochs"),
            recipe.get("lr"),
            recipe.get("seed"),
            recipe.get("batch_size"),
            recipe.get("optimizer", "sgd"),
            recipe.get("weight_decay", 5e-4),
            recipe.get("validation", 0.0),
        ) == (self.epochs, self.lr, self.seed, self.batch_size, self.optimizer, self.weight_decay, self.validation)

    def stored(self, store: ZooStore, class_ids: list[int]) -> ModelCard | None:
        """Its card in ``store`` when the model is there, intact and trained by this recipe on
        ``class_ids``; None otherwise (an unreadable card raises ``StoreError``)."""
        if store.exists(self.name) and store.verify(self.name):
            card = store.card(self.name)
            if self.matches(card, class_ids):
                return card
        return None

    def train(
        self,
        store: ZooStore,
        splits: DatasetSplits,
        class_ids: list[int],
        progress: bool = True,
        device: DeviceLike | None = None,
    ) -> ModelCard:
        """Train this recipe on ``splits`` into ``store`` (replacing a model of that name), on ``device``."""
        return train_zoo_model(
            store,
            self.name,
            self.arch,
            splits,
            class_ids,
            self.epochs,
            self.lr,
            self.seed,
            arch_kwargs=self.arch_kwargs,
            batch_size=self.batch_size,
            optimizer=self.optimizer,
            weight_decay=self.weight_decay,
            validation=self.validation,
            progress=progress,
            device=device,
        )


def _pair(prefix: str, arch: str, dataset: str, epochs: int, lr: float, validation: float = 0.0) -> list[DefaultModel]:
    return [
        DefaultModel(f"{prefix}-{arch}-target", arch, dataset, "0-4", epochs, lr, seed=0, validation=validation),
        DefaultModel(f"{prefix}-{arch}-source", arch, dataset, "5-9", epochs, lr, seed=1, validation=validation),
    ]


#: the share of each Fashion-MNIST class's training images no default model trains on: a
#: clone chooses its cut R (and keeps or drops its tuning) on these rows, images neither
#: network has seen (see ``pnc.zoo.tasks.validation_rows``); the small digits set keeps all
FMNIST_VALIDATION = 0.1


#: the small ViT: timm's VisionTransformer (the ``vit_tiny_patch16_224`` entry, every size
#: overridden) with 4x4 patches of a 28 px image, 49 patch tokens + a class token of width 96
VIT_KWARGS: dict[str, Any] = {"patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 3}
_VIT = dict(
    arch="vit_tiny_patch16_224",
    dataset="fashion-mnist",
    epochs=6,
    lr=3e-3,
    arch_kwargs=VIT_KWARGS,
    validation=FMNIST_VALIDATION,
)

DEFAULTS: dict[str, DefaultModel] = {
    m.name: m
    for m in [
        *_pair("digits", "cnn4", "digits", epochs=10, lr=0.05),
        *_pair("fmnist", "lenet5", "fashion-mnist", epochs=15, lr=0.05, validation=FMNIST_VALIDATION),
        *_pair("fmnist", "resnetc20", "fashion-mnist", epochs=3, lr=0.1, validation=FMNIST_VALIDATION),
        DefaultModel("fmnist-vit-target", classes="0-4", seed=0, optimizer="adamw", weight_decay=0.05, **_VIT),
        DefaultModel("fmnist-vit-source", classes="5-9", seed=1, optimizer="adamw", weight_decay=0.05, **_VIT),
    ]
}


def default_pair(dataset: str, arch: str) -> tuple[str, str]:
    """Names of the default (target, source) zoo models for ``dataset`` and ``arch``."""
    dataset = canonical_dataset(dataset)
    names = [m.name for m in DEFAULTS.values() if (m.dataset, m.arch) == (dataset, arch)]
    if len(names) != 2:
        pairs = sorted({f"{m.dataset}/{m.arch}" for m in DEFAULTS.values()})
        raise ModelNotFoundError(
            f"no default pair for dataset {dataset!r} and arch {arch!r}; "
            f"defaults exist for {', '.join(pairs)}; train your own with "
            "`pnc zoo train`"
        )
    target, source = sorted(names, key=lambda n: not n.endswith("-target"))
    return target, source


def _spec(name: str) -> DefaultModel:
    if name not in DEFAULTS:
        raise ModelNotFoundError(f"{name!r} is not a default zoo model; defaults: {', '.join(DEFAULTS)}")
    return DEFAULTS[name]


def ensure_default(
    store: ZooStore,
    name: str,
    data_dir: str | None = None,
    dataset: DatasetSplits | None = None,
    progress: bool = True,
    device: DeviceLike | None = None,
) -> ModelCard:
    """The card of default model ``name``: reused when the store holds it, intact and trained
    by the current recipe; trained (and saved) on ``device`` otherwise."""
    spec = _spec(name)
    splits = dataset if dataset is not None else load_dataset(spec.dataset, data_dir)
    class_ids = parse_classes(spec.classes, splits.classes)
    if store.exists(name):
        try:
            card = spec.stored(store, class_ids)
            if card is not None:
                return card
        except StoreError as err:  # an unreadable card: a default model is rebuilt, like corrupt weights
            Console(stderr=True).print(f"{name}: {err}")
        Console(stderr=True).print(f"{name}: stored model is corrupt or from another recipe; retraining")
    return spec.train(store, splits, class_ids, progress, device)


def pretrain_defaults(
    store: ZooStore,
    data_dir: str | None = None,
    only: list[str] | None = None,
    progress: bool = True,
    device: DeviceLike | None = None,
) -> list[ModelCard]:
    """Train (or reuse) every default model, or those in ``only``, whose data is present, on
    ``device``; the others are skipped with a message saying how to get their data."""
    console = Console(stderr=True)
    specs = [_spec(n) for n in only] if only else list(DEFAULTS.values())
    loaded: dict[str, DatasetSplits | DataError] = {}
    cards = []
    for spec in specs:
        if spec.dataset not in loaded:
            try:
                loaded[spec.dataset] = load_dataset(spec.dataset, data_dir)
            except DataError as err:
                loaded[spec.dataset] = err
        splits = loaded[spec.dataset]
        if isinstance(splits, DataError):
            console.print(f"skipping {spec.name}: {splits}")
            continue
        cards.append(ensure_default(store, spec.name, dataset=splits, progress=progress, device=device))
    return cards
