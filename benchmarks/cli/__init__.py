"""The ``pnc`` command. Each sub-command group is a module of this package with an
``add_cli(subparsers)`` function; :data:`COMMANDS` lists them in help order."""
from __future__ import annotations

import argparse
import sys

from pnc.adapters import AdapterError
from pnc.surgery.errors import PncError

from . import bench, clone, cuts, onnx, prune, zoo

#: sub-command groups, in help order
COMMANDS = (cuts, zoo, clone, prune, onnx, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pnc", description="Partial network cloning.")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in COMMANDS:
        group.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: each sub-parser sets ``func(args) -> int``."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (PncError, AdapterError) as err:
        print(f"pnc {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
