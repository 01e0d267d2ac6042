"""How R would be chosen by other held-out criteria, from the committed tables' rows.

    .venv/bin/python benchmarks/selection_criteria.py [--results benchmarks/results]

Every PNC row of a Table 1/2 rows cache (``table[12]-*.rows.json``, paper setting: old
fraction > 0) holds each finalist candidate's held-out metrics on the validation rows and
its test Avg *before* the tuning (reported, never used to choose). So a criterion can be
tried without rerunning anything: per row, pick the finalist it ranks first and measure the
selection regret (best finalist's test Avg minus the picked one's, in points), as the tables
do for the search's own choice. Criteria: ``error`` (held-out joint error, ties: held-out
cross-entropy; the search's rule) and ``ce`` (held-out cross-entropy alone). Writes
``selection_criteria.md`` / ``.json`` beside the tables. The tuned Avg of a candidate the
search did not choose is not in the rows: ``benchmarks/search_variants.py`` with
``{"candidates": [R]}`` measures it (on the committed tables five of the cross-entropy's seven
other picks, rerun, gained +0.40, +0.07, +0.25 and lost 0.07 and 0.65 after tuning).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pnc.bench.paper import selection_regret
from pnc.surgery.io import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"

#: criterion -> sort key of a finalist (lowest first), from its held-out metrics
CRITERIA: dict[str, Callable[[dict[str, Any]], tuple[float, ...]]] = {
    "error": lambda c: (c["loss"], c["holdout"].get("ce", 0.0)),
    "ce": lambda c: (c["holdout"]["ce"],),
}


def picks(rows_file: Path) -> list[dict[str, Any]]:
    """Per PNC row of one rows cache with two finalists or more: each criterion's pick and regret."""
    out = []
    for key, row in sorted(json.loads(rows_file.read_text()).items()):
        if row.get("method") != "PNC":
            continue
        finalists = [c for c in row["details"]["report"]["candidates"] if not c.get("eliminated") and c.get("accuracy")]
        if len(finalists) < 2:
            continue
        _, scale, seed = key.split("|")
        entry: dict[str, Any] = {"table": rows_file.name.removesuffix(".rows.json"), "row": f"{scale}, seed {seed}"}
        for name, rank in CRITERIA.items():
            cut = min(finalists, key=rank)["target_cut"]
            entry[name] = {"cut": cut, "regret": selection_regret({"target_cut": cut, "candidates": finalists})[1]}
        out.append(entry)
    return out


def run(results: Path) -> dict[str, Any]:
    files = [p for p in sorted(results.glob("table[12]-*.rows.json")) if "-old0" not in p.name]
    rows = [entry for path in files for entry in picks(path)]
    summary = {
        name: {
            "mean_regret": statistics.fmean(r[name]["regret"] for r in rows),
            "max_regret": max(r[name]["regret"] for r in rows),
        }
        for name in CRITERIA
    }
    return {"rows": rows, "summary": summary, "tables": [p.name for p in files]}


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Selection of R by other held-out criteria (committed rows, nothing rerun)",
        "",
        f"{len(result['rows'])} PNC rows with two finalists or more, paper setting, from "
        + ", ".join(f"`{t}`" for t in result["tables"])
        + ". Regret: best finalist's test Avg minus the picked one's, before the tuning, in points.",
        "",
        "| criterion | mean regret | max regret |",
        "|---|---:|---:|",
        *(f"| {n} | {s['mean_regret']:.3f} | {s['max_regret']:.2f} |" for n, s in result["summary"].items()),
        "",
        "Rows where the criteria pick differently:",
        "",
        "| table | row | " + " | ".join(f"{n}: R (regret)" for n in CRITERIA) + " |",
        "|---|---|" + "---|" * len(CRITERIA),
    ]
    for r in result["rows"]:
        if len({r[n]["cut"] for n in CRITERIA}) > 1:
            cells = " | ".join(f"{r[n]['cut']} ({r[n]['regret']:.2f})" for n in CRITERIA)
            lines.append(f"| {r['table']} | {r['row']} | {cells} |")
    lines += ["", "Command: `.venv/bin/python benchmarks/selection_criteria.py`.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = run(args.results)
    atomic_write_text(args.results / "selection_criteria.json", json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    atomic_write_text(args.results / "selection_criteria.md", text)
    print(text)


if __name__ == "__main__":
    main()
