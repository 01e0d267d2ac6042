"""Options and argument types shared by the sub-commands: one ``--zoo-dir``, one ``--data-dir``."""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable


def add_zoo_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--zoo-dir", help="zoo folder (default: $PNC_ZOO_DIR or ~/.cache/pnc/zoo)")


def add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="dataset folder (default: $PNC_DATA_DIR/<dataset> or the system one)")


def positive(kind: type) -> Callable[[str], float]:
    """An argparse type: ``kind(text)`` that must be > 0."""
    def parse(text: str) -> float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def input_size(text: str) -> tuple[int, int, int]:
    """An argparse type: ``C,H,W`` such as ``3,32,32``."""
    try:
        size = tuple(int(v) for v in text.split(","))
    except ValueError:
        size = ()
    if len(size) != 3 or min(size) <= 0:
        raise argparse.ArgumentTypeError(f"expected C,H,W such as 3,32,32, got {text!r}")
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
