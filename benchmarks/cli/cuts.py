"""``pnc cuts MODEL``: the verified cut points of any model spec (timm name, zoo name,
pnc architecture or ``package.module:factory``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict

import torch

from pnc.surgery.branch import module_cost
from pnc.surgery.cuts import CutPoint, cut_points
from pnc.surgery.splitting import extract
from pnc.surgery.tracing import TracedModel, default_input, trace
from pnc.zoo.resolve import resolve_model
from pnc.zoo.store import ZooStore

from .common import add_zoo_dir, input_size

COLUMNS = ("block", "node", "module", "shape", "layout", "depth", "stage", "params_after", "macs_after", "ok")


def _rows(cuts: Sequence[CutPoint], costs: dict[str, tuple[int, int]]) -> list[tuple[str, ...]]:
    return [
        (
            "" if c.block is None else str(c.block),
            c.node,
            c.module,
            str(c.shape),
            c.layout,
            f"{c.depth:.2f}",
            "" if c.stage is None else str(c.stage),
            f"{costs[c.node][1]:,}",
            f"{costs[c.node][0]:,}",
            "yes" if c.verified else f"no: {c.reason}",
        )
        for c in cuts
    ]


def suffix_costs(traced: TracedModel, cuts: Sequence[CutPoint]) -> dict[str, tuple[int, int]]:
    """(MACs, params) per image of the part of the model after each cut."""
    with torch.no_grad():
        inputs = extract(traced, None, [c.node for c in cuts])(traced.example_input[:1]) if cuts else ()
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    return {c.node: module_cost(extract(traced, c.node, [traced.output_node]), x) for c, x in zip(cuts, inputs)}


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(stderr=True)
    with console.status(
        f"tracing {args.model} and verifying every cut (large models take a while)", spinner="dots"
    ) as status:
        if args.plain or args.json:
            status.stop()
        model, size = resolve_model(args.model, args.input_size, store=ZooStore(args.zoo_dir))
        x = default_input(model, size)
        traced = trace(model, x)
        cuts = cut_points(traced, blocks=args.blocks)
        costs = suffix_costs(traced, cuts)
    verified = all(c.verified for c in cuts)
    if args.json:
        doc = {
            "model": args.model,
            "input_size": list(x.shape[1:]),
            "blocks": args.blocks,
            "verified": verified,
            "cuts": [asdict(c) | {"params_after": costs[c.node][1], "macs_after": costs[c.node][0]} for c in cuts],
        }
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif args.plain:  # one tab-separated line per cut: never wrapped, easy to grep and cut
        print("\t".join(COLUMNS))
        for row in _rows(cuts, costs):
            print("\t".join(row))
    else:
        _print_table(args.model, tuple(x.shape[1:]), _rows(cuts, costs))
    return 0 if verified else 1


def _print_table(name: str, size: tuple[int, ...], rows: list[tuple[str, ...]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{name} cut points at input {size} (params/MACs: the model after the cut, per image)")
    for column in COLUMNS:
        table.add_column(column, no_wrap=True)  # node names are what users type: never wrap or elide them
    for row in rows:
        table.add_row(*row)
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(COLUMNS)]
    console = Console()
    console.width = max(console.width, sum(widths) + 3 * len(widths) + 1)
    console.print(table)


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register ``pnc cuts MODEL [--input-size C,H,W] [--blocks] [--json]``."""
    parser = sub.add_parser(
        "cuts",
        help="list the valid cut points of a model (each split-verified)",
        description="Trace MODEL, list the nodes every input-to-output path goes through, and verify "
        "that splitting at each one reproduces the model's output exactly. Exit status 1 if a cut fails.",
    )
    parser.add_argument(
        "model", help="timm name (built without weights), zoo name, pnc architecture, or package.module:factory"
    )
    parser.add_argument("--input-size", type=input_size, default=None, help="C,H,W (default: the model's own)")
    parser.add_argument("--blocks", action="store_true", help="only the block-level cut points")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--plain", action="store_true", help="tab-separated lines instead of a table (never wraps)")
    add_zoo_dir(parser)
    parser.set_defaults(func=_run)
