"""Where pnc computes: the device of a model, the device a user asked for, and the Adam
that runs best there (:func:`adam`, fused where the device has the kernel).

pnc runs where the models are. Every function that takes a model computes on
:func:`device_of` it, moves the batches it consumes there (datasets stay on the CPU) and
creates its tensors there. Seeded sampling keeps a CPU :class:`torch.Generator` and moves
what it drew, so a seed gives the same images, masks and initial weights on every device.
Files (safetensors, patches, ONNX) hold CPU tensors, whatever the device.
What a large finished candidate freed goes back to the system (:func:`release_freed_memory`).

    >>> resolve_device("cpu"), device_of(torch.nn.Linear(2, 2))
    (device(type='cpu'), device(type='cpu'))
"""

from __future__ import annotations

import copy
import ctypes
import functools
import gc
import re
from collections.abc import Callable, Iterable

import torch
from torch import nn

from pnc.surgery.errors import DeviceError

__all__ = [
    "DeviceLike",
    "DEVICE_CHOICES",
    "available_devices",
    "resolve_device",
    "device_of",
    "float64_device",
    "cpu_copy",
    "adam",
    "release_freed_memory",
]

DeviceLike = str | torch.device
#: what ``--device`` accepts
DEVICE_CHOICES = "cpu, cuda, cuda:N, mps or auto"
_SPEC = re.compile(r"^(cpu|mps|auto|cuda(:\d+)?)$")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def available_devices() -> list[str]:
    """The devices this torch build can use here: ``cpu``, then ``cuda:0`` .. and ``mps``."""
    cuda = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return ["cpu", *cuda, *(["mps"] if _mps_available() else [])]


def resolve_device(name: DeviceLike, option: str | None = None) -> torch.device:
    """The :class:`torch.device` for ``name``: "cpu", "cuda", "cuda:N", "mps", or "auto" (the
    first CUDA device, else MPS, else the CPU). A ``torch.device`` is returned as it is.

    Raises :class:`DeviceError` for a name that is none of those, or a device this torch build
    cannot use here, naming the ones it can (as values of ``option``, e.g. "--device", when the
    name came from the command line).
    """
    if isinstance(name, torch.device):
        return name
    text = str(name).strip().lower()
    available = available_devices()
    use = f"use {option} {' or '.join(available)}" if option else f"use one of {', '.join(available)}"
    what = f"{name!r}" if option else f"device {name!r}"
    if not _SPEC.match(text):
        raise DeviceError(f"{what}: expected {DEVICE_CHOICES}; {use}")
    if text == "auto":
        return torch.device(available[1] if len(available) > 1 else "cpu")
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            built = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise DeviceError(f"{what}: this torch build ({built}) sees no CUDA device; {use}")
        index = int(text.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise DeviceError(f"{what}: this machine has {torch.cuda.device_count()} CUDA device(s); {use}")
        return torch.device("cuda", index)
    if text == "mps" and not _mps_available():
        raise DeviceError(f"{what}: this torch build sees no Apple MPS device; {use}")
    return torch.device(text)


def device_of(module: nn.Module) -> torch.device:
    """The one device holding every parameter and buffer of ``module``; torch's default device
    (the CPU unless ``torch.set_default_device`` changed it) for a module without any.

    Raises :class:`DeviceError` if they are split across devices."""
    devices = {t.device for t in (*module.parameters(), *module.buffers())}
    if len(devices) > 1:
        names = ", ".join(sorted(str(d) for d in devices))
        raise DeviceError(
            f"{type(module).__name__} is split across devices ({names}); move it to one with "
            "model.to(device) (pnc runs a model on one device)"
        )
    return devices.pop() if devices else torch.get_default_device()


def float64_device(device: torch.device) -> torch.device:
    """Where a float64 computation for ``device`` runs: ``device`` itself, or the CPU for Apple
    MPS, which has no float64 (pnc's least-squares solves are in float64)."""
    return torch.device("cpu") if device.type == "mps" else device


#: device types whose torch build has a fused Adam kernel
_FUSED_ADAM = frozenset({"cpu", "cuda", "mps"})


def adam(params: Iterable[nn.Parameter], lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """Adam over ``params`` (pnc's optimizer for masks, adapters, heads and branches), with
    decoupled ``weight_decay`` (AdamW; 0: exactly Adam's update) and torch's fused kernel
    where their device has one: one kernel per step instead of about ten per tensor, the same
    update up to float rounding (a LeNet-5 branch's training step 15% faster on the CPU,
    ``benchmarks/results/clone_cost.md``); the per-tensor loop elsewhere."""
    params = list(params)
    fused = bool(params) and all(p.device.type in _FUSED_ADAM and p.dtype.is_floating_point for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True if fused else None)


def cpu_copy(module: nn.Module) -> nn.Module:
    """``module`` itself when it is on the CPU, else a deep copy moved there (``module`` stays
    where it is): what is exported or written is made from CPU tensors, whatever the device."""
    if device_of(module).type == "cpu":
        return module
    return copy.deepcopy(module).to("cpu")


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl, Windows)."""
    try:
        libc = ctypes.CDLL(None)  # the symbols already loaded into this process
    except (OSError, TypeError):  # TypeError: Windows has no handle for "this process"
        return None
    return getattr(libc, "malloc_trim", None)


def release_freed_memory() -> None:
    """Collect unreachable objects (a candidate's masked copy of the source holds its own
    forward hooks: a reference cycle) and hand the C heap's free pages back to the system
    (glibc's ``malloc_trim``; nothing more elsewhere).

    The search builds one trainer per candidate and stage, each with deep copies of the
    source's layers after R'; glibc kept the freed copies instead of reusing them, so the
    process grew by 80-140 MiB per trainer: a clone of resnet18 -> mobilenetv2_050 at 32 px
    (S, seed 0: 12 stages, then 6 finalists evaluated) peaked 1,854 MiB above its start
    without this call after each trainer, 620 MiB with it, in about the same time
    (``benchmarks/results/clone_memory-*.md``). A full collection costs about 0.2 s, so the
    search calls it only for trainers whose copies exceed ``cut_search.RELEASE_BYTES``."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
