"""``benchmarks/regenerate.sh`` runs for hours: every step's command must parse before it starts.

The script is run with its ``step`` replaced by one that prints each step's name and
arguments (NUL-separated, one step per line), so the lanes' real command lines, variables
expanded, are checked without running a benchmark."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from pnc.bench.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "regenerate.sh"
RESULTS = ROOT / "benchmarks" / "results"


def steps() -> list[list[str]]:
    """[name, program, args...] of every step: lane 1's, lane 2's, then the final ones."""
    text = SCRIPT.read_text()
    body = re.search(r"^step\(\) \{.*?^\}\n", text, flags=re.S | re.M)
    assert body, "regenerate.sh defines no step()"
    dry = text.replace(body.group(0), "step() { printf '%s\\0' \"$@\"; printf '\\n'; }\n")
    dry = dry.replace('mkdir -p "$LOGS"', ":")
    lanes = "lane1 &\nlane2 &\nwait\n"
    assert lanes in dry, "regenerate.sh no longer runs two lanes: update this test"
    dry = dry.replace(lanes, "lane1\nlane2\n")  # one after the other: their lines do not interleave
    out = subprocess.run(["bash", "-c", dry, str(SCRIPT)], capture_output=True, text=True, timeout=60, check=True)
    return [line.rstrip("\0").split("\0") for line in out.stdout.splitlines() if "\0" in line]


def test_every_step_has_its_own_log_and_every_pnc_command_parses() -> None:
    found = steps()
    names = [s[0] for s in found]
    assert len(names) == len(set(names)) > 10  # one log file per step
    parser = build_parser()
    pnc_steps = [s for s in found if s[1].endswith("/pnc")]
    assert {"table1-resnetc20", "table2-resnet18-mobilenetv2", "more-seeds-lenet5"} <= {s[0] for s in pnc_steps}
    for name, _, *args in pnc_steps:
        try:
            parser.parse_args(args)
        except SystemExit as error:  # argparse's exit on an unknown flag or a bad value
            pytest.fail(f"step {name}: `pnc {' '.join(args)}` does not parse ({error})")
    scripts = [s for s in found if s[1].endswith("/python")]
    for name, _, script, *_ in scripts:
        if not script.startswith("-m"):
            assert (ROOT / script).is_file(), f"step {name}: no {script}"


def test_the_paired_seeds_step_reads_tables_the_script_writes() -> None:
    """Its ``--tables`` are among the committed tables, and their seeds 3-5 runs are steps too."""
    found = steps()
    (step,) = [s for s in found if s[0] == "paired-seeds"]
    args = step[3:]
    tables = args[args.index("--tables") + 1 :]
    assert tables and args[args.index("--extra") + 1] == "more_seeds"
    more = [s for s in found if s[0].startswith("more-seeds-")]
    assert all("benchmarks/results/more_seeds" in s and "3,4,5" in s for s in more)
    assert len(more) == len(tables)
    for spec in tables:
        stem, scale = spec.split(":")
        assert (RESULTS / f"{stem}.json").is_file() and (RESULTS / "more_seeds" / f"{stem}.json").is_file()
        assert scale in ("S", "M")
