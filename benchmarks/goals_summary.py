"""Every goal of the committed Table 1 and Table 2 results on one page.

    .venv/bin/python benchmarks/goals_summary.py [--results benchmarks/results] [--recheck]

Reads each ``table1-*.json`` / ``table2-*.json`` (not the ``.rows.json`` caches) and writes
``goals.md`` / ``goals.json`` beside them: per table its models, data setting and validation
share, then each goal with its measured value and whether it is met. The tables' own Goals
sections hold the diagnoses; this page only gathers the verdicts, so nothing here is measured.
``--recheck`` first recomputes every table's goals from its rows with the current checks and
diagnoses and rewrites the table (:func:`pnc.bench.paper.recheck_goals`; no row is rerun).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pnc.bench.results_files import write_json_md

RESULTS = Path(__file__).resolve().parent / "results"


def table_files(results: Path) -> list[Path]:
    """Every Table 1/2 result file in ``results`` (not the ``.rows.json`` caches), by name."""
    return [p for p in sorted(results.glob("table[12]-*.json")) if not p.name.endswith(".rows.json")]


def read_tables(results: Path) -> list[dict[str, Any]]:
    """The goal verdicts of every Table 1/2 result file in ``results``, sorted by file name."""
    tables = []
    for path in table_files(results):
        table = json.loads(path.read_text())
        tables.append(
            {
                "file": path.with_suffix(".md").name,
                "target": table.get("target"),
                "source": table.get("source"),
                "old_fraction": table.get("old_fraction"),
                "validation": table.get("validation", 0.0),
                "seeds": table.get("seeds"),
                "goals": [{k: g[k] for k in ("scale", "goal", "value", "need", "met")} for g in table.get("goals", [])],
            }
        )
    return tables


def recheck(results: Path) -> None:
    """Every Table 1/2 result in ``results`` with its goals recomputed, rewritten in place."""
    from pnc.bench.hetero import dataset_named
    from pnc.bench.paper import recheck_goals, write_result

    classes: dict[str, list[str]] = {}
    for path in table_files(results):
        result = json.loads(path.read_text())
        if result["dataset"] not in classes:
            classes[result["dataset"]] = dataset_named(result["dataset"]).classes
        write_result(results, path.stem, recheck_goals(result, classes[result["dataset"]]))


def markdown(tables: list[dict[str, Any]]) -> str:
    paper = [t for t in tables if t["old_fraction"]]
    met = sum(g["met"] for t in paper for g in t["goals"])
    total = sum(len(t["goals"]) for t in paper)
    lines = [
        "# Goals of the Table 1 and Table 2 results",
        "",
        f"Written by `benchmarks/goals_summary.py` from the result files beside it: in the paper's data "
        f"setting (old fraction > 0) {met} of {total} goals met. The goals are set for that setting; the "
        "strict tables (old fraction 0, listed last) must only do no worse than the earlier search, and their "
        "checks are for reference. Each table's own Goals section gives the diagnosis of every missed goal.",
        "",
    ]
    for t in sorted(tables, key=lambda t: not t["old_fraction"]):
        seeds = ",".join(str(s) for s in t["seeds"] or [])
        lines += [
            f"## `{t['file']}`",
            "",
            f"`{t['target']}` <- `{t['source']}`, old fraction {t['old_fraction']}, "
            f"validation share {t['validation']:g}, seeds {seeds}: "
            f"{sum(g['met'] for g in t['goals'])} of {len(t['goals'])} met.",
            "",
            "| scale | goal | value | need | met |",
            "|---|---|---:|---|---|",
            *(
                f"| {g['scale']} | {g['goal']} | {g['value']} | {g['need']} | {'yes' if g['met'] else 'NO'} |"
                for g in t["goals"]
            ),
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--recheck", action="store_true", help="recompute each table's goals from its rows first")
    args = parser.parse_args()
    if args.recheck:
        recheck(args.results)
    tables = read_tables(args.results)
    write_json_md(args.results / "goals", tables, markdown(tables))
    print(markdown(tables).splitlines()[2])


if __name__ == "__main__":
    main()
