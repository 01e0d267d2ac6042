"""How R would be chosen by other rules, from the committed tables' rows.

    .venv/bin/python benchmarks/selection_criteria.py [--results benchmarks/results]

Every PNC row of a Table 1/2 rows cache (``table[12]-*.rows.json``, paper setting: old
fraction > 0) holds each finalist candidate's held-out metrics on the validation rows, its
test Avg as the search left it and, in tables run with every finalist tuned for the report,
its test Avg after the same tuning as the chosen branch (reported, never used to choose). So
a rule can be tried without rerunning anything: per row, take the finalist it picks and
measure the selection regret (best finalist's test Avg minus the picked one's, in points),
before tuning and, where every finalist was tuned, after it, as the tables do for the
search's own choice. Rules: ``error`` (held-out joint error, ties: held-out cross-entropy;
the search's rule), ``ce`` (held-out cross-entropy alone) and ``earliest`` (the earliest cut
among the finalists: the largest branch, whatever the held-out metrics say). Writes
``selection_criteria.md`` / ``.json`` beside the tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pnc.bench.paper import selection_regret, tuned_regret_known
from pnc.bench.results_files import write_json_md

RESULTS = Path(__file__).resolve().parent / "results"

#: rule -> the finalist it picks (candidates are listed from the last cut to the first)
CRITERIA: dict[str, Callable[[list[dict[str, Any]]], dict[str, Any]]] = {
    "error": lambda finalists: min(finalists, key=lambda c: (c["loss"], c["holdout"].get("ce", 0.0))),
    "ce": lambda finalists: min(finalists, key=lambda c: c["holdout"]["ce"]),
    "earliest": lambda finalists: finalists[-1],
}


def picks(rows_file: Path) -> list[dict[str, Any]]:
    """Per PNC row of one rows cache with two finalists or more: each rule's pick and its
    regret before tuning and (``None`` unless every finalist was tuned) after it."""
    out = []
    for key, row in sorted(json.loads(rows_file.read_text()).items()):
        if row.get("method") != "PNC":
            continue
        finalists = [c for c in row["details"]["report"]["candidates"] if not c.get("eliminated") and c.get("accuracy")]
        if len(finalists) < 2:
            continue
        _, scale, seed = key.split("|")
        entry: dict[str, Any] = {"table": rows_file.name.removesuffix(".rows.json"), "row": f"{scale}, seed {seed}"}
        tuned = tuned_regret_known({"candidates": finalists})
        for name, pick in CRITERIA.items():
            search = {"target_cut": pick(finalists)["target_cut"], "candidates": finalists}
            entry[name] = {
                "cut": search["target_cut"],
                "regret": selection_regret(search)[1],
                "tuned_regret": selection_regret(search, "tuned_accuracy")[1] if tuned else None,
            }
        out.append(entry)
    return out


def run(results: Path) -> dict[str, Any]:
    files = [p for p in sorted(results.glob("table[12]-*.rows.json")) if "-old0" not in p.name]
    rows = [entry for path in files for entry in picks(path)]
    summary = {}
    for name in CRITERIA:
        tuned = [r[name]["tuned_regret"] for r in rows if r[name]["tuned_regret"] is not None]
        summary[name] = {
            "mean_regret": statistics.fmean(r[name]["regret"] for r in rows),
            "max_regret": max(r[name]["regret"] for r in rows),
            "mean_tuned_regret": statistics.fmean(tuned) if tuned else None,
            "max_tuned_regret": max(tuned) if tuned else None,
        }
    tuned_rows = sum(r["error"]["tuned_regret"] is not None for r in rows)  # the same rows for every rule
    return {"rows": rows, "tuned_rows": tuned_rows, "summary": summary, "tables": [p.name for p in files]}


def _points(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Selection of R by other rules (committed rows, nothing rerun)",
        "",
        f"{len(result['rows'])} PNC rows with two finalists or more, paper setting, from "
        + ", ".join(f"`{t}`" for t in result["tables"])
        + ". Regret: best finalist's test Avg minus the picked one's, in points, before the tuning"
        + f" and after it (on the {result['tuned_rows']} rows whose every finalist was tuned for the report).",
        "",
        "| rule | mean regret | max regret | mean regret, tuned | max regret, tuned |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {n} | {s['mean_regret']:.3f} | {s['max_regret']:.2f} | {_points(s['mean_tuned_regret'])} "
            f"| {_points(s['max_tuned_regret'])} |"
            for n, s in result["summary"].items()
        ),
        "",
        "Rows where the rules pick differently (regret before -> after tuning):",
        "",
        "| table | row | " + " | ".join(f"{n}: R (regret)" for n in CRITERIA) + " |",
        "|---|---|" + "---|" * len(CRITERIA),
    ]
    for r in result["rows"]:
        if len({r[n]["cut"] for n in CRITERIA}) > 1:
            cells = " | ".join(
                f"{r[n]['cut']} ({r[n]['regret']:.2f} -> {_points(r[n]['tuned_regret'])})" for n in CRITERIA
            )
            lines.append(f"| {r['table']} | {r['row']} | {cells} |")
    lines += ["", "Command: `.venv/bin/python benchmarks/selection_criteria.py`.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = run(args.results)
    text = markdown(result)
    write_json_md(args.results / "selection_criteria", result, text)
    print(text)


if __name__ == "__main__":
    main()
