"""Class splits and the clone task (target classes T_t, source classes, cloned T_s).

Label convention: a target model has ``len(target_classes)`` outputs (output j is
class ``target_classes[j]``), a source model ``len(source_classes)``, and a cloned
network outputs logits for ``target_classes + clone_classes`` in that order.

Validation split: :func:`validation_rows` sets a seeded share of each class's training images
apart, the same rows for every model and task of a dataset (the seed is fixed). A zoo model
trained with ``validation=share`` never sees them; a :class:`CloneTask` with that share
draws its training images from the other rows and chooses R on the validation rows of its
classes (images neither network was trained on).

On an image folder (splits of :class:`~pnc.zoo.images.ImageFiles`) rows are chosen from
the labels alone, exactly as in memory, and only the chosen rows are decoded: the shares
a clone trains on (:meth:`CloneTask.clone_set`, ``old_set``, ``available_set``) come back
as tensors, the rest (test sets, whole classes) as files to stream.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from numbers import Integral
from typing import Any, TypeVar

import torch

from pnc.surgery.errors import TaskError
from pnc.zoo.datasets import DEFAULT_IMAGE_SIZE, DatasetSplits, ImageData, load_dataset
from pnc.zoo.images import ImageFiles, ImageSet, decode_cache_bytes, decoded, join
from pnc.zoo.store import ModelCard

__all__ = ["parse_classes", "select_classes", "validation_rows", "shared_validation", "CloneTask", "CLONE_PRESETS"]

#: clone-set presets: the first round(p * n) source classes, at least one
CLONE_PRESETS = {"S": 0.2, "M": 0.6}
#: the seed of the validation split: fixed, so that every model and task of a dataset agree
VALIDATION_SEED = 12345
_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


def _class_id(token: str | int, class_names: list[str]) -> int:
    n = len(class_names)
    if isinstance(token, int) or (isinstance(token, str) and token.strip().isdigit()):
        idx = int(token)
        if not 0 <= idx < n:
            raise TaskError(f"class id {idx} is out of range: the dataset has classes 0-{n - 1}")
        return idx
    lowered = {name.lower(): i for i, name in enumerate(class_names)}
    idx = lowered.get(str(token).strip().lower())
    if idx is None:
        raise TaskError(
            f"unknown class {token!r}; use ids 0-{n - 1} or one of the names "
            f"{', '.join(class_names[:20])}{' ...' if n > 20 else ''}"
        )
    return idx


def parse_classes(spec: str | Sequence[int | str], class_names: list[str]) -> list[int]:
    """``"0-4"``, ``"5,7,9"``, ``"Sandal,Bag"`` or a sequence of ids/names -> class ids in the
    given order. Duplicates, unknown names and out-of-range ids raise :class:`TaskError`."""
    if isinstance(spec, str):
        ids: list[int] = []
        for part in (p for p in spec.split(",") if p.strip()):
            match = _RANGE.match(part)
            if match:
                lo, hi = (_class_id(int(g), class_names) for g in match.groups())
                if lo > hi:
                    raise TaskError(f"class range {part.strip()!r} is empty; write it low-high")
                ids.extend(range(lo, hi + 1))
            else:
                ids.append(_class_id(part, class_names))
    else:
        ids = [_class_id(t, class_names) for t in spec]
    if not ids:
        raise TaskError(f"empty class list {spec!r}; give ids like 0-4 or 5,7,9 or class names")
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise TaskError(f"class list {spec!r} names classes {dupes} more than once")
    return ids


SetT = TypeVar("SetT", ImageData, ImageFiles)


def select_classes(data: SetT, classes: Sequence[int], offset: int = 0, among: torch.Tensor | None = None) -> SetT:
    """Images of ``classes`` (dataset ids) relabelled ``offset + position in classes``
    (files stay undecoded); ``among``: sorted row indices (M,) to pick from (default: all),
    so that only the rows picked are copied."""
    wanted = torch.as_tensor(list(classes), dtype=torch.int64, device=data.y.device)
    index = torch.nonzero(torch.isin(data.y if among is None else data.y[among], wanted)).flatten()
    index = index if among is None else among[index]
    position = (data.y[index].unsqueeze(1) == wanted).to(torch.int64).argmax(dim=1)
    return data.subset(index, position + offset)


def validation_rows(train: ImageSet, share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(training rows, validation rows) of the whole training split ``train``: sorted indices,
    the validation rows a seeded ``share`` of each class's images (a fixed seed: the same rows
    for every model and task of the dataset). ``share`` 0: every row trains."""
    if not 0.0 <= share < 1.0:
        raise TaskError(f"validation share {share} must be in [0, 1)")
    reserved = _per_class_share(train.y, share, torch.Generator().manual_seed(VALIDATION_SEED), at_least_one=False)
    kept = torch.ones(len(train.y), dtype=torch.bool, device=train.y.device)
    kept[reserved] = False
    return torch.nonzero(kept).flatten(), reserved


def shared_validation(*cards: ModelCard) -> float:
    """The validation share every one of the zoo ``cards``' models was trained without (the
    ``validation`` of their recipes); 0 when they differ: then no validation row is unseen by all."""
    shares = {float(card.recipe.get("validation", 0.0)) for card in cards}
    return shares.pop() if len(shares) == 1 else 0.0


@dataclass
class CloneTask:
    """Clone ``clone_classes`` (a subset of ``source_classes``, or the preset "S"/"M") from a
    source model into a target model, with a ``fraction`` of their training images and an
    ``old_fraction`` of the target classes' training images (the paper's setting, Sec. 4.1:
    30% of each sub-dataset; 0 is the strict setting with no image of T_t).

    ``validation``: the share of each class's training images both zoo models were trained
    without (:func:`validation_rows`; :meth:`for_cards` reads it from their cards). With a
    share, the training images are the other rows, and R is chosen on the validation rows
    of the cloned classes (and of the target's, unless ``old_fraction`` is 0):
    :meth:`holdout_set`. 0 (models trained on every image): ``clone()`` holds out a share
    of the available images, which the networks were trained on."""

    dataset: DatasetSplits
    target_classes: list[int]
    source_classes: list[int]
    clone_classes: list[int] | str
    fraction: float = 0.3
    seed: int = 0
    old_fraction: float = 0.3
    validation: float = 0.0
    _clone_index: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    _old_index: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    _split: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = len(self.dataset.classes)
        for label, ids in (("target", self.target_classes), ("source", self.source_classes)):
            if not ids:
                raise TaskError(f"the {label} class set is empty")
            self._check_ids(label, ids, n)
        self.target_classes = [int(c) for c in self.target_classes]
        self.source_classes = [int(c) for c in self.source_classes]
        overlap = sorted(set(self.target_classes) & set(self.source_classes))
        if overlap:
            raise TaskError(f"target and source classes overlap in {overlap}; a clone task needs disjoint class sets")
        if isinstance(self.clone_classes, str):
            preset = self.clone_classes.upper()
            if preset not in CLONE_PRESETS:
                raise TaskError(
                    f"unknown clone preset {self.clone_classes!r}; use "
                    f"{' or '.join(CLONE_PRESETS)} or a list of source class ids"
                )
            count = max(1, round(CLONE_PRESETS[preset] * len(self.source_classes)))
            self.clone_classes = self.source_classes[:count]
        if not self.clone_classes:
            raise TaskError("the clone class set is empty; use S, M or source class ids")
        self._check_ids("clone", self.clone_classes, n)
        self.clone_classes = [int(c) for c in self.clone_classes]
        outside = [c for c in self.clone_classes if c not in self.source_classes]
        if outside:
            raise TaskError(
                f"clone classes {outside} are not source classes "
                f"{self.source_classes}; clone a subset of the source's classes"
            )
        if not 0.0 < self.fraction <= 1.0:
            raise TaskError(f"fraction {self.fraction} must be in (0, 1]")
        if not 0.0 <= self.old_fraction <= 1.0:
            raise TaskError(f"old fraction {self.old_fraction} must be in [0, 1]")
        if not 0.0 <= self.validation < 1.0:
            raise TaskError(f"validation share {self.validation} must be in [0, 1)")

    @classmethod
    def for_cards(
        cls,
        dataset: DatasetSplits,
        target_card: ModelCard,
        source_card: ModelCard,
        clone_classes: list[int] | str,
        **kwargs: Any,
    ) -> CloneTask:
        """The task of cloning ``clone_classes`` from the model of ``source_card`` into that of
        ``target_card`` (zoo cards): their classes, and the validation share both were
        trained without (0 unless their recipes name the same one)."""
        validation = shared_validation(target_card, source_card)
        return cls(dataset, target_card.classes, source_card.classes, clone_classes, validation=validation, **kwargs)

    @staticmethod
    def _check_ids(label: str, ids: Sequence[int], n: int) -> None:
        bad = [c for c in ids if not (isinstance(c, Integral) and not isinstance(c, bool) and 0 <= c < n)]
        if bad:
            raise TaskError(f"{label} classes {bad} are out of range: the dataset has classes 0-{n - 1}")
        if len(set(ids)) != len(ids):
            raise TaskError(f"{label} classes {list(ids)} contain duplicates")

    # --- per-model data (image folders: undecoded ImageFiles) ----------------------------
    def _rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._split is None:
            self._split = validation_rows(self.dataset.train, self.validation)
        return self._split

    def _training(self, classes: Sequence[int], offset: int = 0) -> ImageSet:
        """The training images of ``classes`` less the validation rows, as :func:`select_classes`."""
        return select_classes(self.dataset.train, classes, offset, among=self._rows()[0] if self.validation else None)

    def target_train(self) -> ImageSet:
        return self._training(self.target_classes)

    def target_test(self) -> ImageSet:
        return select_classes(self.dataset.test, self.target_classes)

    def source_train(self) -> ImageSet:
        return self._training(self.source_classes)

    def source_test(self) -> ImageSet:
        return select_classes(self.dataset.test, self.source_classes)

    def source_label_index(self) -> list[int]:
        """Output index in the source model of each clone class."""
        return [self.source_classes.index(c) for c in self.clone_classes]

    def _clone_rows(self) -> ImageSet:
        full = self._training(self.clone_classes, offset=len(self.target_classes))
        if self._clone_index is None:
            self._clone_index = _per_class_share(
                full.y, self.fraction, torch.Generator().manual_seed(self.seed), at_least_one=True
            )
        return full.subset(self._clone_index)

    def _old_rows(self) -> ImageSet:
        full = self.target_train()
        if self._old_index is None:
            gen = torch.Generator().manual_seed(self.seed + 7919)
            self._old_index = _per_class_share(full.y, self.old_fraction, gen, at_least_one=False)
        return full.subset(self._old_index)

    def clone_set(self) -> ImageData:
        """A seeded ``fraction`` of each clone class's training images (at least one per class),
        labelled ``len(target_classes) + position in clone_classes``."""
        return decoded(self._clone_rows(), "clone images")

    def old_set(self) -> ImageData:
        """A seeded ``old_fraction`` of each target class's training images, labelled by
        position in ``target_classes`` (empty when ``old_fraction`` is 0). Drawn with its own
        generator, so the clone set does not depend on ``old_fraction``."""
        return decoded(self._old_rows(), "old-class images")

    def available_set(self) -> ImageData:
        """Every training image available while cloning: :meth:`old_set` then :meth:`clone_set`,
        with the cloned network's labels (decoded once, into one tensor, from an image folder)."""
        return decoded(join(self._old_rows(), self._clone_rows()), "available images")

    def holdout_set(self) -> ImageData | None:
        """The validation rows R is chosen on (None without a ``validation`` share): every one
        of the cloned classes and, unless ``old_fraction`` is 0, of the target's, with the
        cloned network's labels (old-class images, then clone-class ones)."""
        if not self.validation:
            return None
        train, rows = self.dataset.train, self._rows()[1]
        held = select_classes(train, self.clone_classes, offset=len(self.target_classes), among=rows)
        if self.old_fraction:
            held = join(select_classes(train, self.target_classes, among=rows), held)
        return decoded(held, "validation images")

    def eval_sets(self) -> dict[str, ImageSet]:
        """``ori``: test images of T_t (labels 0..|T_t|-1); ``tar``: of T_s (labels |T_t|+i);
        ``avg``: both pooled. Labels index the cloned network's outputs. From an image folder
        they are undecoded :class:`ImageFiles`, streamed by ``evaluate``/``evaluate_clone``."""
        ori = self.target_test()
        tar = select_classes(self.dataset.test, self.clone_classes, offset=len(self.target_classes))
        return {"ori": ori, "tar": tar, "avg": join(ori, tar)}

    def clone_inputs(self) -> dict[str, Any]:
        """The data arguments of :func:`pnc.surgery.clone` for this task (the available images:
        :meth:`available_set`):
        ``clone(target, source, **task.clone_inputs(), config=...)``.

        From an image folder the eval sets (for the per-candidate report) are decoded only
        when they fit in ``$PNC_DECODE_CACHE_MB`` (``ori``/``tar`` are views of ``avg``), else
        left out: memory then depends on the task's share, never on the folder's size."""
        names, available, held = self.dataset.classes, self.available_set(), self.holdout_set()
        return {
            "images": available.x,
            "labels": available.y,
            "source_outputs": self.source_label_index(),
            "class_names": [names[c] for c in self.clone_classes],
            "target_classes": [names[c] for c in self.target_classes],
            "eval_sets": self._eval_tensors(),
        } | ({"holdout": (held.x, held.y)} if held is not None else {})

    def _eval_tensors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        sets = self.eval_sets()
        pooled = sets["avg"]
        if isinstance(pooled, ImageData):
            return {k: (v.x, v.y) for k, v in sets.items() if isinstance(v, ImageData)}
        if pooled.nbytes > decode_cache_bytes():
            return {}
        avg, n_ori = pooled.load("test images"), len(sets["ori"])
        return {"ori": (avg.x[:n_ori], avg.y[:n_ori]), "tar": (avg.x[n_ori:], avg.y[n_ori:]), "avg": (avg.x, avg.y)}

    def joint_train(self) -> ImageSet:
        """All training images of T_t and T_s (less the validation rows) with the cloned network's
        labels (Joint baseline; undecoded files from an image folder: ``fit`` streams them)."""
        return self._training(self.target_classes + self.clone_classes)

    @property
    def num_outputs(self) -> int:
        """Outputs of the cloned network: |T_t| + |T_s|."""
        return len(self.target_classes) + len(self.clone_classes)

    # --- serialization ------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset.name,
            "data_dir": self.dataset.data_dir,
            "input_size": list(self.dataset.input_size),
            "target_classes": self.target_classes,
            "source_classes": self.source_classes,
            "clone_classes": self.clone_classes,
            "fraction": self.fraction,
            "seed": self.seed,
            "old_fraction": self.old_fraction,
        } | ({"validation": self.validation} if self.validation else {})

    @classmethod
    def from_json(cls, text: str | dict[str, Any], dataset: DatasetSplits | None = None) -> CloneTask:
        """Rebuild a task; the dataset is reloaded unless ``dataset`` (the same one) is given.
        A description without ``old_fraction`` (written before it existed) means 0."""
        spec = json.loads(text) if isinstance(text, str) else dict(text)
        try:
            if dataset is None:
                dataset = load_dataset(
                    spec["dataset"], spec.get("data_dir"), image_size=spec.get("input_size", [DEFAULT_IMAGE_SIZE])[-1]
                )
            elif dataset.name != spec["dataset"]:
                raise TaskError(f"task is for dataset {spec['dataset']!r}, got {dataset.name!r}")
            return cls(
                dataset,
                spec["target_classes"],
                spec["source_classes"],
                spec["clone_classes"],
                fraction=spec.get("fraction", 0.3),
                seed=spec.get("seed", 0),
                old_fraction=spec.get("old_fraction", 0.0),
                validation=spec.get("validation", 0.0),
            )
        except (KeyError, TypeError) as err:
            raise TaskError(f"not a clone task description: missing or bad field {err}") from err


def _per_class_share(labels: torch.Tensor, share: float, gen: torch.Generator, at_least_one: bool) -> torch.Tensor:
    """Sorted indices (on the labels' device) of a seeded ``share`` of each label's rows; labels (N,) int64."""
    picks = [torch.zeros(0, dtype=torch.int64, device=labels.device)]
    for label in labels.unique(sorted=True).tolist():
        members = torch.nonzero(labels == label).flatten()
        keep = round(share * len(members))
        keep = max(1, keep) if at_least_one else keep
        order = torch.randperm(len(members), generator=gen, device=gen.device)
        picks.append(members[order[:keep].to(members.device)])
    return torch.cat(picks).sort().values
