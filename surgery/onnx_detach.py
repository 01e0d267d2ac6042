"""Detach cloned branches from a pnc ONNX export, without PyTorch.

Detaching every branch gives back the target's own export byte for byte (its sha256 is
checked against the manifest before anything is written); detaching some gives the
graph of the cloned network with the other branches, ``cloned_logits`` (batch,
|T_t| + sum of the remaining |T_s|), byte-identical to exporting that network.

    detach_onnx("clone.onnx", ["fmnist-5"], "smaller.onnx")
    detach_onnx("clone.onnx", None, "target.onnx")   # every branch
"""

from __future__ import annotations

from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from pnc.surgery.errors import BranchError, ExportError
from pnc.surgery.io import atomic_write_bytes
from pnc.surgery.onnx_merge import merge, read_manifest, split

__all__ = ["detach_onnx", "detach_model", "branch_names", "load_onnx"]


def load_onnx(path_or_model: str | Path | onnx.ModelProto) -> onnx.ModelProto:
    """The model itself, or the one read from a file (ExportError if it is not ONNX)."""
    if isinstance(path_or_model, onnx.ModelProto):
        return path_or_model
    path = Path(path_or_model)
    try:
        return onnx.load_model_from_string(path.read_bytes())
    except FileNotFoundError:
        raise ExportError(f"{path}: no such file; make one with `pnc export`") from None
    except OSError as err:  # a folder, no permission, ...
        raise ExportError(f"{path}: cannot read it as an ONNX file ({err.strerror or err})") from None
    except (DecodeError, ValueError, RuntimeError) as err:
        raise ExportError(f"{path} is not an ONNX file: {err}") from None


def branch_names(path_or_model: str | Path | onnx.ModelProto) -> list[str]:
    """Names of the detachable branches of a pnc export, in output order."""
    return [b["name"] for b in read_manifest(load_onnx(path_or_model))["branches"]]


def detach_model(model: onnx.ModelProto, branches: list[str] | None = None) -> onnx.ModelProto:
    """``model`` without ``branches`` (None: all of them); the input is not modified."""
    base, parts, manifest = split(model)
    names = [p.name for p in parts]
    drop = names if branches is None else list(branches)
    unknown = [b for b in drop if b not in names]
    if unknown:
        raise BranchError(
            f"no branch named {', '.join(map(repr, unknown))} in this export; its branches are "
            f"{', '.join(names)} (list them with `pnc detach FILE --list`)"
        )
    if not drop:
        raise ExportError("name at least one branch to detach (--branch NAME), or --all")
    keep = [p for p in parts if p.name not in drop]
    return merge(base, keep, manifest["target_classes"]) if keep else base


def detach_onnx(path_or_model: str | Path | onnx.ModelProto, branches: list[str] | None, out: str | Path) -> Path:
    """Write ``path_or_model`` without ``branches`` (None: all) to ``out``, atomically and only
    once every check passed (unknown branch, missing manifest, modified base: ExportError).

    >>> import tempfile
    >>> from pnc.surgery import export_onnx
    >>> from pnc.surgery.examples import tiny_clone
    >>> net, target, _, images = tiny_clone()
    >>> folder = Path(tempfile.mkdtemp())
    >>> clone_onnx = export_onnx(net, folder / "clone.onnx", images[:1])
    >>> branch_names(load_onnx(clone_onnx))
    ['src']
    >>> out = detach_onnx(clone_onnx, ["src"], folder / "target.onnx")
    >>> out.read_bytes() == export_onnx(target, folder / "t.onnx", images[:1]).read_bytes()
    True
    """
    result = detach_model(load_onnx(path_or_model), branches)
    out = Path(out)
    atomic_write_bytes(out, result.SerializeToString())
    return out
