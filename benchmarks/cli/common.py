"""Options, argument types and validators shared by the sub-commands.

Every sub-command checks all its arguments before any training, file or folder is
created: numbers and names at parse time (argparse types below: a usage line and exit 2),
paths and zoo names with the ``check_*`` functions (a typed :class:`PncError`, exit 2).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from pnc.surgery.devices import DEVICE_CHOICES, resolve_device
from pnc.surgery.errors import BackendError, DeviceError, OutputError, PncError

#: seeds are fed to torch.Generator.manual_seed and mixed per epoch: keep them in 32 bits
SEED_MAX = 2**32 - 1


def add_zoo_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--zoo-dir", help="zoo folder (default: $PNC_ZOO_DIR or ~/.cache/pnc/zoo)")


def add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="dataset folder (default: $PNC_DATA_DIR/<dataset> or the system one)")


def device(text: str) -> torch.device:
    """An argparse type: ``--device`` cpu, cuda, cuda:N, mps or auto, one this machine has."""
    try:
        return resolve_device(text, "--device")
    except DeviceError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_device(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--device",
        type=device,
        default=device("cpu"),
        help=f"where to {what}: {DEVICE_CHOICES} (default cpu; auto: a GPU when there is one)",
    )


def add_old_fraction(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--old-fraction",
        type=in_range(float, 0.0, 1.0),
        default=0.3,
        help="share of the target classes' training images available while cloning, in [0, 1] "
        "(default 0.3, the paper's setting; 0: none, the strict setting)",
    )


def add_force(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--force", action="store_true", help=f"replace {what}")


def add_backend(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--backend",
        choices=("inprocess", "ray"),
        default="inprocess",
        help=f"where {what} run: in this process (default) or on Ray (pip install 'pnc[ray]')",
    )
    parser.add_argument(
        "--address",
        type=ray_address,
        help="with --backend ray: the Ray cluster to join (HOST:PORT as `ray start --head` prints it, or auto); "
        "default: a local Ray on this machine's cores",
    )


def ray_address(text: str) -> str:
    """An argparse type: a Ray cluster address, ``HOST:PORT`` or ``auto``."""
    host, _, port = text.rpartition(":")
    if text != "auto" and (
        not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c.isspace() or c == "/" for c in host)
    ):
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (as `ray start --head` prints it) or auto, got {text!r}")
    return text


def check_backend(backend: str, address: str | None) -> None:
    """BackendError for ``--address`` without ``--backend ray``, or ``--backend ray`` without Ray
    installed (saying how to install it)."""
    if address is not None and backend != "ray":
        raise BackendError(f"--address {address} names a Ray cluster; add --backend ray (or drop --address)")
    if backend == "ray":
        import pnc.bench.ray_backend  # noqa: F401  # BackendError with the install line when Ray is missing


def _number(kind: type, text: str) -> float:
    try:
        value = kind(text)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
        ) from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive(kind: type) -> Callable[[str], float]:
    """An argparse type: ``kind(text)`` that must be > 0 (and finite)."""

    def parse(text: str) -> float:
        value = _number(kind, text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def in_range(kind: type, low: float, high: float, *, low_open: bool = False) -> Callable[[str], float]:
    """An argparse type: ``kind(text)`` in [low, high] (``(low, high]`` with ``low_open``)."""
    bounds = f"{'(' if low_open else '['}{low}, {high}]"

    def parse(text: str) -> float:
        try:
            value = _number(kind, text)
        except argparse.ArgumentTypeError as err:
            raise argparse.ArgumentTypeError(f"{err} (in {bounds})") from None
        if value > high or value < low or (low_open and value == low):
            raise argparse.ArgumentTypeError(f"must be in {bounds}, got {text}")
        return value

    return parse


#: a share of something: (0, 1]
share = in_range(float, 0.0, 1.0, low_open=True)
#: a random seed: 0 .. 2**32 - 1
seed_number = in_range(int, 0, SEED_MAX)


def input_size(text: str) -> tuple[int, int, int]:
    """An argparse type: ``C,H,W`` such as ``3,32,32``."""
    try:
        size = tuple(int(v) for v in text.split(","))
    except ValueError:
        size = ()
    if len(size) != 3 or min(size) <= 0 or max(size) > 1024:
        raise argparse.ArgumentTypeError(f"expected C,H,W such as 3,32,32 (each 1-1024), got {text!r}")
    return size  # type: ignore[return-value]


def json_object(text: str) -> dict:
    """An argparse type: a JSON object such as ``{"width": 16}``."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON: {err}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('expected a JSON object like {"width": 16}')
    return value


# --- paths: checked before any work, nothing created --------------------------------------


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _can_create_in(folder: Path) -> bool:
    """Whether a file can be created in ``folder``: permission bits and read-only mounts; for
    root, who ignores permission bits but still cannot write in /proc, a probe file (removed
    at once: only the folder's mtime changes)."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return False
    except OSError:
        return False
    if os.geteuid() != 0:
        return True
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".pnc-probe-")
    except OSError:
        return False
    os.close(fd)
    os.unlink(tmp)
    return True


def check_output_dir(path: str | Path, flag: str) -> Path:
    """A folder that exists or can be created and written in; OutputError otherwise."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {path} is a file, not a folder; give a folder path (it is created if missing)")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise OutputError(
            f"{flag} {path} cannot be created: {base} is a file, not a folder; choose a path that is not inside a file"
        )
    if not _can_create_in(base):
        raise OutputError(
            f"{flag} {path}: cannot write in {base} (permission denied or read-only); choose a writable folder"
        )
    return path


def check_output_file(path: str | Path, flag: str = "--out", *, not_same_as: str | Path | None = None) -> Path:
    """A file path whose folder can be created and written in, not a folder itself, and not
    the input file ``not_same_as`` (it would be lost); OutputError otherwise."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputError(f"{flag} {path} is a folder; give a file name such as {path / 'model.onnx'}")
    if not path.name or path.name in (".", ".."):
        raise OutputError(f"{flag} {str(path)!r} is not a file name; give one such as model.onnx")
    if not_same_as is not None and path.exists() and Path(not_same_as).exists() and os.path.samefile(path, not_same_as):
        raise OutputError(
            f"{flag} {path} is the input file: writing it would destroy the input; give another file name"
        )
    check_output_dir(path.parent, f"{flag} {path}: its folder")
    return path


def check_input_file(path: str | Path, what: str, hint: str, error: type[PncError] = PncError) -> Path:
    """An existing regular file; ``error`` naming ``what`` and ``hint`` otherwise."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise error(f"{path} is a folder, not {what}; {hint}")
    if not path.is_file():
        raise error(f"{path}: no such file ({what}); {hint}")
    return path


# --- one value per option ---------------------------------------------------------------


class _Once:
    """Mixin for argparse store actions: the option may be given once (argparse would keep the
    last of two silently; ``--source``/``--classes``/``--branch`` are the repeatable ones)."""

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[no-untyped-def]
        seen = namespace.__dict__.setdefault("_given", set())
        if option_string is not None and self.dest in seen:  # type: ignore[attr-defined]
            parser.error(
                f"{'/'.join(self.option_strings)} given more than once; "  # type: ignore[attr-defined]
                "give it once"
            )
        seen.add(self.dest)  # type: ignore[attr-defined]
        super().__call__(parser, namespace, values, option_string)  # type: ignore[misc]


_ONCE = {
    kind: type(f"Once{kind.__name__}", (_Once, kind), {})
    for kind in (argparse._StoreAction, argparse._StoreTrueAction, argparse._StoreConstAction)
}


def forbid_repeats(parser: argparse.ArgumentParser) -> None:
    """Make every single-valued option of ``parser`` and its sub-parsers refuse a second value."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                forbid_repeats(sub)
        elif type(action) in _ONCE:
            action.__class__ = _ONCE[type(action)]
