"""One model resolver: a name as users type it -> an ``nn.Module``.

A *model spec* is, by the first rule that applies:

1. ``package.module:factory``: a callable of your own returning an ``nn.Module``;
2. a ``.safetensors`` file written by ``pnc zoo export`` (its card in the metadata);
3. a model in the zoo store (weights loaded and hash-verified, its card's input size);
4. one of pnc's architectures (:func:`pnc.zoo.archs.list_archs`) or any timm name, built
   with random weights (never downloaded) for ``input_size`` when given.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from torch import nn

from pnc.surgery.errors import ModelNotFoundError
from pnc.zoo import archs
from pnc.zoo.checkpoints import load_checkpoint
from pnc.zoo.store import ZooStore

__all__ = ["resolve_model"]


def resolve_model(
    spec: str, input_size: tuple[int, int, int] | None = None, *, store: ZooStore | None = None
) -> tuple[nn.Module, tuple[int, int, int] | None]:
    """(model in eval mode, its (C, H, W) input size if known) for a model spec (see module doc).

    >>> model, size = resolve_model("cnn4", (1, 8, 8))
    >>> size, type(model).__name__
    ((1, 8, 8), 'CNN4')
    """
    if ":" in spec:
        return _from_factory(spec), input_size
    if spec.endswith(".safetensors") or Path(spec).suffix in (".pt", ".pth"):
        model, card = load_checkpoint(spec)
        return model, input_size or tuple(card.input_size)  # type: ignore[return-value]
    if store is not None and store.exists(spec):
        model, card = store.load(spec)
        return model, input_size or tuple(card.input_size)  # type: ignore[return-value]
    kwargs = archs.input_kwargs(spec, input_size) if input_size is not None else {}
    return archs.create(spec, **kwargs).eval(), input_size


def _from_factory(spec: str) -> nn.Module:
    """``package.module:factory()`` in eval mode; ModelNotFoundError if it cannot be imported,
    fails (any exception: it is the user's code) or returns something that is not a module."""
    module_name, _, factory = spec.partition(":")
    hint = "Use package.module:factory, a callable returning an nn.Module."
    try:
        model = getattr(importlib.import_module(module_name), factory)()
    except Exception as err:  # noqa: BLE001 - arbitrary user code: report it, never a traceback
        raise ModelNotFoundError(f"cannot load {spec!r}: {type(err).__name__}: {err}. {hint}") from err
    if not isinstance(model, nn.Module):
        raise ModelNotFoundError(
            f"cannot load {spec!r}: it returned a {type(model).__name__}, not an nn.Module. {hint}"
        )
    return model.eval()
