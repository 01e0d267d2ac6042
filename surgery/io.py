"""Content hashes and atomic file writes: the one leaf every layer of pnc writes through.

Nothing here imports the rest of pnc, nor torch until a tensor function is called (so
writing ONNX files needs no torch). Every file pnc writes goes through
:func:`atomic_write_bytes` (a temp file next to the target, fsync, ``os.replace``), so an
interrupted run never leaves a half-written file; tensors are written with
:func:`save_tensors` (safetensors, contiguous copies, never pickle).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: writing ONNX files (pnc attach) needs no torch
    from torch import Tensor, nn

__all__ = [
    "state_dict_sha256",
    "file_sha256",
    "atomic_write_bytes",
    "atomic_write_text",
    "save_tensors",
    "tensor_bytes",
]


def state_dict_sha256(module_or_state_dict: nn.Module | Mapping[str, Tensor]) -> str:
    """Content hash of a state dict: for each key in sorted order, its name, dtype, shape and
    the raw bytes of the contiguous CPU tensor. Equal iff every tensor is bitwise equal.

    >>> import torch
    >>> state_dict_sha256(torch.nn.Linear(2, 2)) == state_dict_sha256(torch.nn.Linear(2, 2))
    False
    """
    import torch

    state = (
        module_or_state_dict.state_dict() if isinstance(module_or_state_dict, torch.nn.Module) else module_or_state_dict
    )
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temp file next to ``path``, then ``os.replace`` it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    atomic_write_bytes(path, text.encode())


def tensor_bytes(tensors: Mapping[str, Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """``tensors`` serialized as safetensors. Strided views (a transposed solve, a sliced
    weight) are packed, and tensors that share memory (tied weights) are copied apart."""
    from safetensors.torch import save

    packed, seen = {}, set()
    for key, value in tensors.items():
        value = value.detach().cpu().contiguous()
        if value.numel() and value.untyped_storage().data_ptr() in seen:
            value = value.clone()
        seen.add(value.untyped_storage().data_ptr())
        packed[key] = value
    return save(packed, metadata=metadata)


def save_tensors(path: str | Path, tensors: Mapping[str, Tensor], metadata: dict[str, str] | None = None) -> int:
    """Write :func:`tensor_bytes` of ``tensors`` to ``path`` atomically; return its size in bytes."""
    data = tensor_bytes(tensors, metadata)
    atomic_write_bytes(path, data)
    return len(data)
