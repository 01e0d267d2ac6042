"""Models trained elsewhere, in and out of the zoo: ``pnc zoo import`` / ``pnc zoo export``.

An exported checkpoint is one safetensors file whose metadata key ``pnc.card`` holds the
model's card (architecture, kwargs, classes, input size), so a file alone is a model spec
(``pnc cuts model.safetensors``). Weights come in as safetensors, or as a ``.pt``/``.pth``
state dict read with ``torch.load(weights_only=True)``; nothing else is unpickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle  # only for its exception type: nothing is ever unpickled
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from pnc.surgery.errors import StoreError
from pnc.surgery.io import atomic_write_bytes, tensor_bytes
from pnc.zoo import archs
from pnc.zoo.datasets import DEFAULT_IMAGE_SIZE, load_dataset
from pnc.zoo.store import ModelCard, ZooStore
from pnc.zoo.tasks import parse_classes
from pnc.zoo.train import measured_card

__all__ = ["CARD_KEY", "read_state_dict", "load_checkpoint", "import_model", "export_model"]

CARD_KEY = "pnc.card"
_TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a ``.safetensors`` file, or of a ``.pt``/``.pth``/``.bin`` state dict
    (``torch.load(weights_only=True)``; a ``{"state_dict": ...}`` or ``{"model": ...}``
    wrapper is unwrapped). Anything else raises :class:`StoreError`."""
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"{path}: no such weights file")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        if path.suffix in _TORCH_SUFFIXES:
            state: Any = torch.load(path, map_location="cpu", weights_only=True)
            for key in ("state_dict", "model"):
                if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
                    state = state[key]
            if isinstance(state, Mapping) and state and all(isinstance(v, Tensor) for v in state.values()):
                return dict(state)
            raise StoreError(
                f"{path} holds no state dict of tensors; save one with "
                "`safetensors.torch.save_file(model.state_dict(), 'model.safetensors')`"
            )
    except pickle.UnpicklingError:
        raise StoreError(
            f"{path} holds Python objects besides tensors, which pnc never unpickles; save the "
            "state dict alone (`torch.save(model.state_dict(), path)`) or as safetensors"
        ) from None
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as err:
        raise StoreError(f"{path} is not a readable weights file ({type(err).__name__}: {err})") from None
    raise StoreError(
        f"{path}: weights must be .safetensors or a .pt/.pth state dict (read with "
        "weights_only=True); other formats are refused"
    )


def _strict_model(arch: str, kwargs: dict[str, Any], state: Mapping[str, Tensor], source: str) -> nn.Module:
    model = archs.create(arch, **kwargs)
    try:
        model.load_state_dict(dict(state), strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise StoreError(
            f"{source} does not fit {arch}({json.dumps(kwargs)}): "
            f"{' '.join(line.strip() for line in first[:3])}; check --arch, --classes and "
            "--input-size (or --arch-kwargs)"
        ) from None
    return model.eval()


def load_checkpoint(path: str | Path) -> tuple[nn.Module, ModelCard]:
    """(model in eval mode, its card) of a file written by :func:`export_model`."""
    path = Path(path)
    hint = (
        f"register it first with `pnc zoo import NAME --arch ARCH --weights {path} --dataset D "
        "--classes SPEC`, then use NAME"
    )
    if path.suffix != ".safetensors":
        raise StoreError(f"{path} carries no pnc card; {hint}")
    try:
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise StoreError(f"{path} is not a readable safetensors file ({err})") from None
    if CARD_KEY not in meta:
        raise StoreError(f"{path} carries no pnc card; {hint}")
    card = ModelCard.from_json(meta[CARD_KEY])
    return _strict_model(card.arch, card.kwargs, read_state_dict(path), str(path)), card


def import_model(
    store: ZooStore,
    name: str,
    arch: str,
    weights: str | Path,
    dataset: str,
    classes: str | Sequence[int | str],
    *,
    input_size: tuple[int, int, int] | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    data_dir: str | None = None,
    force: bool = False,
) -> ModelCard:
    """Register a model trained elsewhere: build ``arch`` for ``dataset``'s input size (or
    ``input_size``) with one output per class of ``classes``, load ``weights`` strictly,
    run it and measure its accuracy on those classes' test images, save it with its card."""
    if store.exists(name) and not force:
        raise StoreError(f"the zoo already has a model named {name!r}; pick another name or pass --force")
    splits = load_dataset(
        dataset, data_dir, image_size=input_size[-1] if input_size is not None else DEFAULT_IMAGE_SIZE
    )
    class_ids = parse_classes(classes, splits.classes)
    size = tuple(input_size) if input_size is not None else splits.input_size
    if size != tuple(splits.input_size):
        raise StoreError(
            f"{dataset} images are {tuple(splits.input_size)} but --input-size says {size}; "
            "a zoo model is evaluated on its dataset's images"
        )
    kwargs = {**archs.input_kwargs(arch, splits.input_size), **(arch_kwargs or {}), "num_classes": len(class_ids)}
    model = _strict_model(arch, kwargs, read_state_dict(weights), str(weights))
    recipe = {"imported_from": str(weights), "file_sha256": hashlib.sha256(Path(weights).read_bytes()).hexdigest()}
    card = measured_card(model, name, arch, kwargs, splits, class_ids, recipe)
    store.save(name, model, card)
    return card


def export_model(store: ZooStore, name: str, out: str | Path) -> int:
    """Write zoo model ``name`` as one safetensors file with its card in the metadata
    (a model spec on its own); returns the size in bytes."""
    model, card = store.load(name)
    data = tensor_bytes(model.state_dict(), metadata={CARD_KEY: json.dumps(dataclasses.asdict(card))})
    atomic_write_bytes(out, data)
    return len(data)
