"""The zoo's checkpoint store: ``<root>/<name>/model.safetensors`` + ``card.json``.

The card records how to rebuild the model (architecture and kwargs), what its
outputs mean (dataset class ids), how it was trained, and the sha256 of the
weights file; :meth:`ZooStore.load` refuses weights whose hash does not match.
Nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model
from torch import nn

from pnc.surgery.cloned import ClonedNetwork
from pnc.surgery.devices import DeviceLike
from pnc.surgery.errors import PatchError, StoreError, require_finite_weights
from pnc.surgery.io import atomic_write_bytes, atomic_write_text, file_sha256, state_dict_sha256, tensor_bytes
from pnc.surgery.patch import load_patch, read_patch

__all__ = ["default_zoo_dir", "ModelCard", "ZooStore", "package_versions"]

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "card.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def default_zoo_dir(zoo_dir: str | Path | None = None) -> Path:
    """``zoo_dir``, else ``$PNC_ZOO_DIR``, else ``$XDG_CACHE_HOME`` (or ``~/.cache``) ``/pnc/zoo``."""
    if zoo_dir is not None:
        return Path(zoo_dir).expanduser()
    if os.environ.get("PNC_ZOO_DIR"):
        return Path(os.environ["PNC_ZOO_DIR"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "pnc" / "zoo"


def package_versions() -> dict[str, str]:
    """Versions of torch, timm and pnc, recorded in every card."""
    versions = {"torch": torch.__version__}
    for pkg in ("timm", "pnc"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "unknown"
    return versions


@dataclass
class ModelCard:
    """What a zoo model is: rebuild recipe, output classes, training recipe, weights hash."""

    name: str
    arch: str
    kwargs: dict[str, Any]  # archs.create kwargs, incl. in_chans and num_classes
    dataset: str
    classes: list[int]  # original dataset class ids = the model's outputs, in order
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: tuple[int, int, int]
    test_accuracy: float
    recipe: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""  # of model.safetensors bytes
    versions: dict[str, str] = field(default_factory=package_versions)
    #: pnc.surgery.io.state_dict_sha256 of the weights: what .pnc patches record
    state_dict_sha256: str = ""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        """Parse a card; StoreError naming the first missing or bad field."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise StoreError(f"not a pnc model card: not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise StoreError(f"not a pnc model card: expected a JSON object, got a {type(data).__name__}")
        _check_card_fields(data)
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k in known}  # fields of newer versions are ignored
        data["mean"], data["std"] = tuple(data["mean"]), tuple(data["std"])
        data["input_size"] = tuple(data["input_size"])
        return cls(**data)


def _is_list_of(value: Any, kind: type | tuple[type, ...]) -> bool:
    return isinstance(value, list) and all(isinstance(v, kind) and not isinstance(v, bool) for v in value)


#: card field -> (check, what it must be); the optional ones may be missing
_CARD_FIELDS: dict[str, tuple[Any, str]] = {
    "name": (lambda v: isinstance(v, str), "a string"),
    "arch": (lambda v: isinstance(v, str) and bool(v), "an architecture name"),
    "kwargs": (lambda v: isinstance(v, dict), "an object of constructor arguments"),
    "dataset": (lambda v: isinstance(v, str) and bool(v), "a dataset name"),
    "classes": (lambda v: _is_list_of(v, int) and bool(v), "a non-empty list of class ids"),
    "class_names": (lambda v: _is_list_of(v, str), "a list of class names"),
    "mean": (lambda v: _is_list_of(v, (int, float)) and bool(v), "a list of per-channel numbers"),
    "std": (lambda v: _is_list_of(v, (int, float)) and bool(v), "a list of per-channel numbers"),
    "input_size": (lambda v: _is_list_of(v, int) and len(v) == 3 and min(v) > 0, "[C, H, W]"),
    "test_accuracy": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
}
_OPTIONAL_CARD_FIELDS: dict[str, tuple[Any, str]] = {
    "recipe": (lambda v: isinstance(v, dict), "an object"),
    "sha256": (lambda v: isinstance(v, str), "a hex string"),
    "versions": (lambda v: isinstance(v, dict), "an object"),
    "state_dict_sha256": (lambda v: isinstance(v, str), "a hex string"),
}


def _check_card_fields(data: dict[str, Any]) -> None:
    missing = [k for k in _CARD_FIELDS if k not in data]
    if missing:
        raise StoreError(
            f"not a pnc model card: missing field{'s' * (len(missing) > 1)} {', '.join(map(repr, missing))}"
        )
    for table in (_CARD_FIELDS, _OPTIONAL_CARD_FIELDS):
        for key, (ok, what) in table.items():
            if key in data and not ok(data[key]):
                raise StoreError(
                    f"bad field {key!r} in the model card: expected {what}, got {json.dumps(data[key])[:60]}"
                )
    if len(data["class_names"]) != len(data["classes"]):
        raise StoreError(
            f"bad field 'class_names' in the model card: {len(data['class_names'])} names "
            f"for {len(data['classes'])} classes"
        )


class ZooStore:
    """A folder of zoo models, ``<root>/<name>/{model.safetensors,card.json}``."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = default_zoo_dir(root)
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"the zoo folder {self.root} is a file; point --zoo-dir or $PNC_ZOO_DIR at a folder")

    def __repr__(self) -> str:
        return f"ZooStore({str(self.root)!r})"

    def path(self, name: str) -> Path:
        if not _NAME.match(name):
            raise StoreError(f"bad model name {name!r}: use letters, digits, '.', '_' and '-'")
        return self.root / name

    def names(self) -> list[str]:
        """Names of the models that have a card, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.parent.name for p in self.root.glob(f"*/{CARD_FILE}"))

    def exists(self, name: str) -> bool:
        return (self.path(name) / CARD_FILE).is_file()

    def save(self, name: str, model: nn.Module, card: ModelCard) -> Path:
        """Write the weights then the card (each atomically); fills ``card.sha256``."""
        folder = self.path(name)
        data = tensor_bytes(model.state_dict())
        card.sha256 = hashlib.sha256(data).hexdigest()
        card.state_dict_sha256 = state_dict_sha256(model)
        atomic_write_bytes(folder / WEIGHTS_FILE, data)
        card.name = name
        atomic_write_text(folder / CARD_FILE, card.to_json())
        return folder

    def _missing(self, name: str, what: str) -> StoreError:
        have = ", ".join(self.names()) or "none"
        return StoreError(
            f"zoo model {name!r} {what} in {self.root} (models there: {have}); train it "
            f"with `pnc zoo train --name {name} ...` or `pnc zoo pretrain-defaults`"
        )

    def card(self, name: str) -> ModelCard:
        path = self.path(name) / CARD_FILE
        if not path.is_file():
            raise self._missing(name, "does not exist")
        try:
            return ModelCard.from_json(path.read_text(encoding="utf-8"))
        except (StoreError, OSError, UnicodeDecodeError) as err:
            raise StoreError(
                f"{path}: {err}; retrain the model (`pnc zoo train --name {name} --force ...`) or delete {path.parent}"
            ) from None

    def broken(self) -> dict[str, str]:
        """Name -> reason of each model whose card cannot be read (the rest of the zoo still works)."""
        bad = {}
        for name in self.names():
            try:
                self.card(name)
            except StoreError as err:
                bad[name] = str(err)
        return bad

    def verify(self, name: str) -> bool:
        """True iff the weights file exists and its sha256 equals the card's."""
        card = self.card(name)
        weights = self.path(name) / WEIGHTS_FILE
        return weights.is_file() and file_sha256(weights) == card.sha256

    def load(self, name: str, device: DeviceLike | None = None) -> tuple[nn.Module, ModelCard]:
        """Rebuild ``card.arch`` on ``device`` (default: torch's default device) and load the
        verified weights; the model is in eval mode."""
        from pnc.zoo import archs

        card = self.card(name)
        weights = self.path(name) / WEIGHTS_FILE
        if not weights.is_file():
            raise self._missing(name, f"has a card but no {WEIGHTS_FILE}")
        actual = file_sha256(weights)
        if actual != card.sha256:
            raise StoreError(
                f"{weights} has sha256 {actual[:16]}..., its card says {card.sha256[:16]}...: "
                f"the weights were modified or corrupted; retrain with `pnc zoo train "
                f"--name {name} ...` (or `pnc zoo pretrain-defaults` for a default model)"
            )
        with torch.device(device if device is not None else torch.get_default_device()):
            model = archs.create(card.arch, **card.kwargs)
        try:
            load_model(model, weights, strict=True)
        except (SafetensorError, RuntimeError) as err:
            raise StoreError(f"{weights} does not fit {card.arch}({card.kwargs}): {err}") from err
        require_finite_weights(model, f"zoo model {name!r} ({weights})")
        return model.eval(), card

    def load_patch(self, path: str | Path, device: DeviceLike | None = None) -> tuple[ClonedNetwork, dict]:
        """A ``.pnc`` patch rebuilt on the zoo models it names, loaded on ``device``: (network,
        metadata). Weights whose hash differs from the patch's are refused (:class:`PatchError`)."""
        meta, _ = read_patch(path)
        target = self._patch_model(path, meta["target"], "target", device)
        return load_patch(
            path,
            target,
            lambda name: self._patch_model(
                path,
                {
                    "name": name,
                    "sha256": next(b["source"]["sha256"] for b in meta["branches"] if b["source"]["name"] == name),
                },
                "source",
                device,
            ),
        )

    def _patch_model(self, patch: str | Path, wanted: dict, role: str, device: DeviceLike | None) -> nn.Module:
        """The zoo model a patch names; PatchError in the zoo's terms if its weights are not the
        ones the patch was made for (the hash printed is what `pnc zoo show` prints)."""
        name = wanted["name"]
        model, _ = self.load(name, device)
        actual = state_dict_sha256(model)  # == card.state_dict_sha256 (cards older than it lack it)
        if actual != wanted["sha256"]:
            raise PatchError(
                f"{patch} was made for other weights of {role} {name!r}: the patch expects state_dict_sha256 "
                f"{wanted['sha256']}, the zoo's {name!r} has {actual} (see `pnc zoo show {name}`). The model "
                f"was retrained after the patch was made: re-run `pnc clone` on the current model, or restore "
                f"the weights the patch was made for"
            )
        return model
