"""``pnc cuts MODEL``: the verified cut points of any model spec (timm name, zoo name,
pnc architecture or ``package.module:factory``)."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict

from pnc.surgery.cuts import CutPoint, cut_points
from pnc.surgery.tracing import default_input
from pnc.zoo.resolve import resolve_model
from pnc.zoo.store import ZooStore

from .common import add_zoo_dir, input_size


def _run(args: argparse.Namespace) -> int:
    model, size = resolve_model(args.model, args.input_size, store=ZooStore(args.zoo_dir))
    x = default_input(model, size)
    cuts = cut_points(model, example_input=x, blocks=args.blocks)
    verified = all(c.verified for c in cuts)
    if args.json:
        doc = {"model": args.model, "input_size": list(x.shape[1:]), "blocks": args.blocks, "verified": verified,
               "cuts": [asdict(c) for c in cuts]}
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print_table(args.model, tuple(x.shape[1:]), cuts)
    return 0 if verified else 1


def _print_table(name: str, size: tuple[int, ...], cuts: Sequence[CutPoint]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{name} cut points at input {size}")
    for column in ("block", "node", "module", "shape", "layout", "depth", "stage", "ok"):
        table.add_column(column, overflow="fold")  # node names are what users type: never elide them
    for c in cuts:
        table.add_row(
            "" if c.block is None else str(c.block), c.node, c.module, str(c.shape), c.layout,
            f"{c.depth:.2f}", "" if c.stage is None else str(c.stage), "yes" if c.verified else f"no: {c.reason}",
        )
    Console().print(table)


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register ``pnc cuts MODEL [--input-size C,H,W] [--blocks] [--json]``."""
    parser = sub.add_parser(
        "cuts",
        help="list the valid cut points of a model (each split-verified)",
        description="Trace MODEL, list the nodes every input-to-output path goes through, and verify "
        "that splitting at each one reproduces the model's output exactly. Exit status 1 if a cut fails.",
    )
    parser.add_argument("model", help="timm name (built without weights), zoo name, pnc architecture, "
                                      "or package.module:factory")
    parser.add_argument("--input-size", type=input_size, default=None, help="C,H,W (default: the model's own)")
    parser.add_argument("--blocks", action="store_true", help="only the block-level cut points")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_zoo_dir(parser)
    parser.set_defaults(func=_run)
