"""Typed errors. Every user-facing failure in pnc raises one of these.

Each message says what was wrong and what to do instead; the CLI prints the
message (no traceback) and exits with status 2.
"""

from __future__ import annotations


class PncError(Exception):
    """Base class of every error pnc raises on bad input."""


class TraceError(PncError):
    """torch.fx could not trace a model (names the module/op and how to mark it a leaf)."""


class CutError(PncError, KeyError):
    """A cut point name that does not exist in the traced graph."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class BranchError(PncError, KeyError):
    """An unknown branch name, or a name already taken, on a cloned network or its ONNX export."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ModelNotFoundError(PncError):
    """An unknown architecture or zoo model name (lists close matches)."""


class ConfigError(PncError, ValueError):
    """A setting out of its valid range: an architecture argument, a ratio, an opset."""


class DataError(PncError):
    """Missing, corrupt or empty data (says how to get it)."""


class TaskError(PncError):
    """An invalid clone task: overlapping, empty or out-of-range class sets."""


class StoreError(PncError):
    """A zoo checkpoint that is missing, corrupt or whose sha256 does not match its card."""


class PatchError(PncError):
    """A .pnc patch that is corrupt or made for other weights."""


class OutputError(PncError):
    """An output path pnc cannot or must not write: a file where a folder is needed, a place
    with no write permission, or an existing result that only ``--force`` may replace."""


class ExportError(PncError):
    """An ONNX file that is not a pnc export, or a branch/base that does not match its manifest."""


class DeviceError(PncError, ValueError):
    """A device that is unknown or that this torch build cannot use here (names the ones it can),
    or a model split across devices."""


class TrainingError(PncError):
    """Training that went non-finite (NaN/Inf in an input image or a loss); the last good
    checkpoint is kept, so a rerun after the fix resumes from it."""


def require_finite_images(images: object, what: str) -> None:
    """TrainingError unless every value of the tensor ``images`` (N, ...) is finite; names how
    many images hold NaN/Inf and the first one's index."""
    import torch

    assert isinstance(images, torch.Tensor)
    if not images.is_floating_point() or images.numel() == 0:
        return
    bad = ~torch.isfinite(images.reshape(len(images), -1)).all(dim=1)
    if bool(bad.any()):
        first = int(bad.nonzero()[0])
        raise TrainingError(
            f"{what}: {int(bad.sum())} of {len(images)} images hold NaN or Inf values (the first is image "
            f"{first}); drop or repair them before training"
        )


def require_finite_weights(model: object, what: str) -> None:
    """TrainingError unless every floating-point parameter and buffer of the module ``model`` is
    finite (NaN/Inf weights make NaN outputs and losses everywhere downstream)."""
    import torch

    assert isinstance(model, torch.nn.Module)
    for key, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise TrainingError(f"{what}: its weights hold NaN or Inf values ({key}); retrain it")
