"""Robustness report (issue 12): run the fuzz, property, fault and regression test files and
count what they exercised; writes ``benchmarks/results/robustness.{md,json}``.

    python -m pnc.bench.robustness [--out benchmarks/results]

Counts come from pytest's JUnit XML (test cases and their outcomes), hypothesis's
``--hypothesis-show-statistics`` (examples run per property) and the JSON lines
tests/test_faults.py appends to ``$PNC_FAULT_LOG`` (kills per command). A traceback or a
silent wrong result would fail its test (each case asserts no ``Traceback`` on stderr and equal
results), so both are the failure counts of those tests; the run must be all green.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any

from pnc.bench.paper import machine_info
from pnc.bench.results_files import write_json_md

ROOT = Path(__file__).resolve().parents[1]
FILES = {
    "cli_fuzz": "tests/test_cli_fuzz.py",
    "properties": "tests/test_properties.py",
    "faults": "tests/test_faults.py",
    "regressions": "tests/test_robustness.py",
}


def _run_pytest(workdir: Path) -> tuple[ET.Element, str, list[dict[str, Any]], float]:
    """Run the four files once; (JUnit XML root, stdout, fault records, seconds)."""
    xml, log = workdir / "junit.xml", workdir / "faults.jsonl"
    env = {**os.environ, "PNC_FAULT_LOG": str(log), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}"]
    cmd += ["--hypothesis-show-statistics", *FILES.values()]
    began = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - began
    if not xml.is_file():
        raise SystemExit(f"pytest did not run:\n{proc.stdout}\n{proc.stderr}")
    faults = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    return ET.parse(xml).getroot(), proc.stdout, faults, seconds


def _cases(root: ET.Element) -> list[dict[str, str]]:
    out = []
    for case in root.iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            if case.find(tag) is not None:
                outcome = tag
        out.append({"file": case.get("classname", ""), "name": case.get("name", ""), "outcome": outcome})
    return out


def _hypothesis_examples(stdout: str) -> dict[str, int]:
    """Test name -> examples that passed in hypothesis's generate phase (plus reuse/shrink phases)."""
    examples: dict[str, int] = {}
    current = None
    for line in stdout.splitlines():
        head = re.match(r"^\S*test_properties\.py::(\w+):\s*$", line.strip())
        if head:
            current = head.group(1)
            continue
        count = re.search(r"(\d+) passing(?: examples?)?,", line)
        if current and count:
            examples[current] = examples.get(current, 0) + int(count.group(1))
    return examples


def collect() -> dict[str, Any]:
    """Run the tests and gather every count of the report."""
    with tempfile.TemporaryDirectory() as tmp:
        root, stdout, faults, seconds = _run_pytest(Path(tmp))
    cases = _cases(root)
    by_file: dict[str, Counter] = {}
    for key, path in FILES.items():
        module = path.removesuffix(".py").replace("/", ".")
        by_file[key] = Counter(c["outcome"] for c in cases if c["file"] == module)
    fuzz = [c for c in cases if c["file"] == "tests.test_cli_fuzz"]
    matrix = sum(c["name"].startswith("test_bad_arguments_exit_2_cleanly") for c in fuzz)
    script = sum(c["name"].startswith("test_installed_script") for c in fuzz)
    faults_cases = [c for c in cases if c["file"] == "tests.test_faults"]
    nan_cases = [c for c in faults_cases if "killed" not in c["name"]]
    failed = sum(c["outcome"] in ("failure", "error") for c in cases)
    return {
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d"),
        "command": "python -m pnc.bench.robustness",
        "seconds": round(seconds, 1),
        "tests": {k: dict(v) for k, v in by_file.items()},
        "cli_fuzz": {"matrix_cases": matrix, "installed_script_cases": script},
        "hypothesis_examples": _hypothesis_examples(stdout),
        "kills": faults,
        "nan_inf_cases": [c["name"] for c in nan_cases],
        "regression_cases": by_file["regressions"]["passed"],
        "failed": failed,
        "tracebacks": failed,  # every case asserts none: a traceback would be a failure
        "silent_wrong_results": failed,  # every case asserts the refusal or the equal result
    }


def render(result: dict[str, Any]) -> str:
    """The markdown report."""
    m = result["machine"]
    lines = [
        "# Robustness (issue 12)",
        "",
        f"Command: `{result['command']}` ({result['seconds']} s). Machine: {m['cpu']}, {m['cores']} cores, "
        f"torch {m.get('torch', '?')}. Date: {result['date']}.",
        "",
        "| what | count |",
        "|---|---:|",
        f"| CLI fuzz cases (tests/test_cli_fuzz.py `CASES`, every sub-command): exit 2, one line, nothing "
        f"written | {result['cli_fuzz']['matrix_cases']} |",
        f"| the same through the installed `pnc` script | {result['cli_fuzz']['installed_script_cases']} |",
    ]
    for name, n in sorted(result["hypothesis_examples"].items()):
        lines.append(f"| hypothesis examples: `{name}` | {n} |")
    lines.append(
        f"| hypothesis examples, total | {sum(result['hypothesis_examples'].values())} |",
    )
    for rec in result["kills"]:
        lines.append(
            f"| SIGKILLs of `{rec['command']}` at seeded random points, then resumed ({rec['attempts']} runs; "
            f"result equal to an uninterrupted run: {'yes' if rec['resumed_equal'] else 'NO'}, compared: "
            f"{rec['compared']}; every file complete under its final name after each kill) | {rec['kills']} |"
        )
    lines += [
        f"| NaN/Inf cases (images, weights, losses in fit / the candidate search / the CLI): typed "
        f"`TrainingError`, last good checkpoint kept | {len(result['nan_inf_cases'])} |",
        f"| issue-12 regression cases (tests/test_robustness.py): refusals and fixes | {result['regression_cases']} |",
        f"| **tracebacks seen** | **{result['tracebacks']}** |",
        f"| **silent wrong results** | **{result['silent_wrong_results']}** |",
        "",
        "Test outcomes per file: "
        + "; ".join(f"{k}: {', '.join(f'{n} {o}' for o, n in sorted(v.items()))}" for k, v in result["tests"].items())
        + ".",
        "",
        "A traceback or a wrong result fails the test that provokes it (each case asserts exit 2, "
        "no `Traceback` on stderr and nothing written, or a result equal to the reference), so both "
        "counts are the failures of this run.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    result = collect()
    write_json_md(args.out / "robustness", result, render(result))
    print(render(result))
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
