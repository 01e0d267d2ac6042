"""Pieces of a network cut at cut points, saved for deployment and proven equal to it.

:func:`~pnc.surgery.splitting.split` and :func:`~pnc.surgery.splitting.extract` make the
pieces; :func:`save_pieces` checks that running them one after another reproduces the
reference in PyTorch, exports each to ONNX (input and output named after the tensors they
carry, dynamic batch axis), checks the same composition in onnxruntime, and only then
writes, per piece, ``<name>.onnx`` and ``<name>.safetensors`` (its parameters and buffers),
plus ``pieces.json`` (the spec that rebuilds them and what was checked).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.fx as fx
from torch import Tensor, nn

from pnc.surgery.errors import ExportError
from pnc.surgery.io import atomic_write_bytes, atomic_write_text, state_dict_sha256, tensor_bytes
from pnc.surgery.onnx_export import OPSET, session, torch_to_onnx

__all__ = ["Piece", "PieceCheck", "save_pieces"]

#: tolerance of the ONNX composition against the PyTorch model
RTOL, ATOL = 1e-5, 1e-5


@dataclass
class Piece:
    """One piece: ``module`` maps the tensor named ``input_name`` to the one named ``output_name``."""

    name: str
    module: fx.GraphModule
    input_name: str
    output_name: str


@dataclass
class PieceCheck:
    """How far the composed pieces are from the reference, in PyTorch and in onnxruntime."""

    torch_equal: bool
    torch_max_abs: float
    onnx_max_abs: float
    batch: int


def _run_torch(pieces: Sequence[Piece], x: Tensor) -> Tensor:
    with torch.no_grad():
        for piece in pieces:
            x = piece.module(x)
    return x


def _run_onnx(models: Sequence[onnx.ModelProto], x: np.ndarray) -> np.ndarray:
    for model in models:
        sess = session(model)
        x = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    return x


def save_pieces(
    pieces: Sequence[Piece], x: Tensor, reference: Tensor, folder: str | Path, spec: dict[str, Any], opset: int = OPSET
) -> PieceCheck:
    """Check, export and write ``pieces`` (run in order on x, the first piece's input,
    they must give ``reference``); raise :class:`ExportError` and write nothing if the
    composition differs (PyTorch: allclose; onnxruntime: within 1e-5).

    >>> import tempfile
    >>> from pnc.surgery import split
    >>> from pnc.surgery.examples import tiny_cnn
    >>> model, x = tiny_cnn(3, seed=0), torch.randn(3, 1, 8, 8)
    >>> prefix, suffix = split(model, "conv2", x)
    >>> check = save_pieces([Piece("prefix", prefix, "input", "conv2"), Piece("suffix", suffix, "conv2", "logits")],
    ...                     x, model(x), tempfile.mkdtemp(), {"model": "tiny"})
    >>> check.torch_equal, check.onnx_max_abs < 1e-5
    (True, True)
    """
    reference = reference.detach()
    out = _run_torch(pieces, x)
    torch_max = float((out - reference).abs().max())
    if out.shape != reference.shape or not torch.allclose(out, reference, rtol=RTOL, atol=ATOL):
        raise ExportError(f"the pieces do not reproduce the model in PyTorch (max |diff| {torch_max:.3g})")
    models, inputs = [], x
    for piece in pieces:
        with torch.no_grad():
            models.append(torch_to_onnx(piece.module, (inputs,), [piece.input_name], [piece.output_name], opset))
            inputs = piece.module(inputs)
        onnx.checker.check_model(models[-1])
    onnx_out = _run_onnx(models, x.numpy())
    onnx_max = float(np.abs(onnx_out - reference.numpy()).max())
    if onnx_out.shape != tuple(reference.shape) or not np.allclose(onnx_out, reference.numpy(), rtol=RTOL, atol=ATOL):
        raise ExportError(
            f"the ONNX pieces do not reproduce the model in onnxruntime (max |diff| {onnx_max:.3g} "
            f"at opset {opset}); try another --opset"
        )
    check = PieceCheck(
        torch_equal=bool(torch.equal(out, reference)), torch_max_abs=torch_max, onnx_max_abs=onnx_max, batch=len(x)
    )
    folder = Path(folder)
    entries = []
    for piece, model in zip(pieces, models):
        state = _own_state(piece.module)
        atomic_write_bytes(folder / f"{piece.name}.onnx", model.SerializeToString())
        atomic_write_bytes(folder / f"{piece.name}.safetensors", tensor_bytes(state))
        entries.append(
            {
                "name": piece.name,
                "input": piece.input_name,
                "output": piece.output_name,
                "onnx": f"{piece.name}.onnx",
                "weights": f"{piece.name}.safetensors",
                "state_dict_sha256": state_dict_sha256(state),
                "params": sum(v.numel() for v in state.values()),
            }
        )
    doc = {**spec, "opset": opset, "pieces": entries, "check": vars(check)}
    atomic_write_text(folder / "pieces.json", json.dumps(doc, indent=2))
    return check


def _own_state(module: nn.Module) -> dict[str, Tensor]:
    """The parameters and buffers a piece uses (a GraphModule keeps only what its graph reads)."""
    return {k: v.detach() for k, v in module.state_dict().items()}
