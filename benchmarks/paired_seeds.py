"""PNC against another method seed by seed, over the seeds of several runs of one table.

    .venv/bin/python benchmarks/paired_seeds.py \\
        --tables table1-fashion-mnist-lenet5:M table2-resnetc20-cnn4:S --extra more_seeds

A table's goal "Avg(PNC) >= Avg(Continual+KD)" is read on its 3 seeds' means. This reads the
same table run on other seeds too (e.g. ``pnc bench paper --arch lenet5 --scales M --methods
"Continual+KD,PNC" --seeds 3,4,5 --out benchmarks/results/more_seeds``): for each ``stem:scale``
it pairs PNC's per-seed row with the other method's of the same seed, from ``<stem>.json`` in
the results folder and in each ``--extra`` folder below it, and reports per seed the difference
in Ori / Tar / Avg (points), then their mean, sample std, standard error of the mean and on how
many seeds PNC is at least as high. A mean within two standard errors of 0 is not a measured gap.
Writes ``paired_seeds.{json,md}``; runs nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

from pnc.bench.results_files import write_json_md

RESULTS = Path(__file__).resolve().parent / "results"
#: what must agree between two runs of a table for their seeds to be pooled
#: (the weights' hashes: a table written before they were recorded pools only with another such table)
SAME_TASK = ("dataset", "target", "source", "target_sha256", "source_sha256", "old_fraction", "validation", "fraction")
METRICS = ("ori", "tar", "avg")


def seed_rows(paths: list[Path], scale: str, methods: tuple[str, str]) -> dict[int, dict[str, dict]]:
    """{seed: {method: per-seed row}} of ``methods`` at ``scale`` over the table files ``paths``
    (the first file's row wins on a seed two files hold). ValueError when the files are runs
    of different tasks (:data:`SAME_TASK`)."""
    tables = [json.loads(p.read_text()) for p in paths]
    for path, table in zip(paths[1:], tables[1:]):
        differ = [k for k in SAME_TASK if table.get(k) != tables[0].get(k)]
        if differ:
            raise ValueError(
                f"{path} is another task than {paths[0]} (differs in {', '.join(differ)}): pool only runs of "
                "the same table, made with the same models (the same weights) and data setting"
            )
    rows: dict[int, dict[str, dict]] = {}
    for table in tables:
        for row in table["per_seed"]:
            if row["scale"] == scale and row["method"] in methods:
                rows.setdefault(row["seed"], {}).setdefault(row["method"], row)
    return rows


def paired(rows: dict[int, dict[str, dict]], methods: tuple[str, str]) -> dict[str, Any]:
    """Per seed holding both ``methods``: the first's Ori/Tar/Avg minus the second's, in points;
    then per metric the mean, sample std, standard error and the count of seeds >= 0."""
    first, second = methods
    seeds = sorted(s for s, by in rows.items() if first in by and second in by)
    per_seed = [
        {
            "seed": s,
            **{m: 100 * (rows[s][first][m] - rows[s][second][m]) for m in METRICS},
            "avg_of": {first: 100 * rows[s][first]["avg"], second: 100 * rows[s][second]["avg"]},
        }
        for s in seeds
    ]
    summary: dict[str, dict[str, float]] = {}
    for m in METRICS:
        values = [r[m] for r in per_seed]
        std = statistics.stdev(values) if len(values) > 1 else math.nan
        summary[m] = {
            "mean": statistics.fmean(values) if values else math.nan,
            "std": std,
            "se": std / math.sqrt(len(values)) if values else math.nan,
            "at_least": sum(v >= 0 for v in values),
        }
    return {"seeds": seeds, "per_seed": per_seed, "summary": summary}


def markdown(results: list[dict[str, Any]], against: str, command: str) -> str:
    lines = [
        f"# PNC against {against}, seed by seed",
        "",
        f"PNC's Ori / Tar / Avg minus {against}'s on the same seed (same task, images and models), in points, "
        "from each table and its runs on other seeds. Mean ± sample std; SE: standard error of the mean; "
        "`>= 0`: seeds where PNC is at least as high. A mean within two SE of 0 is not a measured gap.",
        "",
        "| table | scale | seeds | per seed: Avg difference | Ori | Tar | Avg | SE (Avg) | Avg >= 0 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r["summary"]
        cells = [f"{s[m]['mean']:+.2f} ± {s[m]['std']:.2f}" for m in METRICS]
        per_seed = ", ".join(f"{p['seed']}: {p['avg']:+.2f}" for p in r["per_seed"])
        lines.append(
            f"| `{r['table']}` | {r['scale']} | {len(r['seeds'])} | {per_seed} | {' | '.join(cells)} | "
            f"{s['avg']['se']:.2f} | {s['avg']['at_least']} of {len(r['seeds'])} |"
        )
    lines += ["", f"Files: {'; '.join(', '.join(r['files']) for r in results)}.", "", f"Command: `{command}`.", ""]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    methods = ("PNC", args.against)
    results = []
    for spec in args.tables:
        stem, _, scale = spec.partition(":")
        if not scale:
            raise ValueError(f"{spec!r}: name a table and a scale, e.g. {stem}:M")
        paths = [
            p
            for p in [args.results / f"{stem}.json", *(args.results / e / f"{stem}.json" for e in args.extra)]
            if p.exists()
        ]
        if not paths:
            raise FileNotFoundError(f"no {stem}.json in {args.results} or its --extra folders")
        result = paired(seed_rows(paths, scale, methods), methods)
        if not result["seeds"]:
            raise ValueError(f"{stem} at {scale}: no seed has both {methods[0]} and {methods[1]}")
        results.append(
            {"table": stem, "scale": scale, "files": [str(p.relative_to(args.results)) for p in paths], **result}
        )
    return {"against": args.against, "tables": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", nargs="+", required=True, help="STEM:SCALE, e.g. table1-fashion-mnist-lenet5:M")
    parser.add_argument("--against", default="Continual+KD", help="the method PNC is paired with")
    parser.add_argument(
        "--extra", nargs="*", default=[], help="folders below --results with the same tables on other seeds"
    )
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--out", default="paired_seeds", help="the result files' stem in --results")
    args = parser.parse_args()
    try:
        result = run(args)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    command = ".venv/bin/python benchmarks/paired_seeds.py " + shlex.join(sys.argv[1:])
    text = markdown(result["tables"], args.against, command)
    write_json_md(args.results / args.out, result | {"command": command}, text)
    print(text)


if __name__ == "__main__":
    main()
