"""The ``pnc`` command. Each sub-command lives next to the code it drives and
registers itself through an ``add_cli(subparsers)`` function listed here."""
from __future__ import annotations

import argparse
import importlib
import sys

from pnc.surgery.errors import PncError

#: modules whose ``add_cli(subparsers)`` adds sub-commands, in help order
COMMAND_MODULES = (
    "pnc.surgery.cut_points",
    "pnc.zoo.cli",
    "pnc.surgery.clone_cli",
    "pnc.surgery.onnx_cli",
    "pnc.surgery.bench_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pnc", description="Partial network cloning.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: each sub-parser sets ``func(args) -> int``."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except PncError as err:
        print(f"pnc {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
