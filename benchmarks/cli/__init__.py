"""The ``pnc`` command. Each sub-command group is a module of this package with an
``add_cli(subparsers)`` function; :data:`COMMANDS` lists them in help order."""

from __future__ import annotations

import argparse
import sys

from pnc.adapters import AdapterError
from pnc.surgery.errors import PncError

from . import bench, clone, cuts, onnx, pieces, prune, zoo
from .common import forbid_repeats

#: sub-command groups, in help order
COMMANDS = (cuts, pieces, zoo, clone, prune, onnx, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pnc", description="Partial network cloning.")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in COMMANDS:
        group.add_cli(sub)
    forbid_repeats(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: each sub-parser sets ``func(args) -> int``."""
    args = build_parser().parse_args(argv)
    args.__dict__.pop("_given", None)
    try:
        return int(args.func(args) or 0)
    except (PncError, AdapterError) as err:
        words = (args.command, getattr(args, "zoo_command", None), getattr(args, "bench_command", None))
        print(f"pnc {' '.join(w for w in words if w)}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
