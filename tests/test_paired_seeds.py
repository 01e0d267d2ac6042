"""``benchmarks/paired_seeds.py``: PNC against another method, seed by seed, over several runs of a table."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from pnc.bench import paired_seeds

TASK = {
    "dataset": "fashion-mnist",
    "target": "t",
    "source": "s",
    "old_fraction": 0.3,
    "validation": 0.1,
    "fraction": 0.3,
}


def row(method: str, seed: int, avg: float, ori: float = 0.9, tar: float = 0.8, scale: str = "M") -> dict:
    return {"method": method, "scale": scale, "seed": seed, "ori": ori, "tar": tar, "avg": avg}


def write_table(path: Path, rows: list[dict], **task: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(TASK | task | {"per_seed": rows}))


def test_pairs_seeds_across_runs_and_summarizes_the_differences(tmp_path: Path) -> None:
    write_table(
        tmp_path / "table1-x.json",
        [
            row("PNC", 0, 0.881),
            row("Continual+KD", 0, 0.883),
            row("PNC", 1, 0.884),
            row("Continual+KD", 1, 0.880),
            row("PNC", 0, 0.5, scale="S"),
            row("Joint+Full", 0, 0.99),
        ],
    )
    write_table(
        tmp_path / "more" / "table1-x.json",
        [
            row("PNC", 2, 0.870),
            row("Continual+KD", 2, 0.875),
            row("PNC", 0, 0.1),
            row("Continual+KD", 0, 0.1),
            row("PNC", 3, 0.9),
        ],  # seed 0 is the first file's; seed 3 has no Continual+KD row
    )
    rows = paired_seeds.seed_rows(
        [tmp_path / "table1-x.json", tmp_path / "more" / "table1-x.json"], "M", ("PNC", "Continual+KD")
    )
    result = paired_seeds.paired(rows, ("PNC", "Continual+KD"))
    assert result["seeds"] == [0, 1, 2]
    diffs = [p["avg"] for p in result["per_seed"]]
    assert diffs == pytest.approx([-0.2, 0.4, -0.5])
    avg = result["summary"]["avg"]
    assert avg["mean"] == pytest.approx(-0.1)
    assert avg["std"] == pytest.approx(math.sqrt(((-0.1) ** 2 + 0.5**2 + 0.4**2) / 2))
    assert avg["se"] == pytest.approx(avg["std"] / math.sqrt(3))
    assert avg["at_least"] == 1
    assert result["summary"]["ori"]["mean"] == pytest.approx(0.0)


def test_refuses_to_pool_runs_of_another_task(tmp_path: Path) -> None:
    write_table(tmp_path / "a.json", [row("PNC", 0, 0.9), row("Continual+KD", 0, 0.9)])
    write_table(tmp_path / "b.json", [row("PNC", 1, 0.9), row("Continual+KD", 1, 0.9)], old_fraction=0.0)
    with pytest.raises(ValueError, match="differs in old_fraction"):
        paired_seeds.seed_rows([tmp_path / "a.json", tmp_path / "b.json"], "M", ("PNC", "Continual+KD"))


def test_refuses_to_pool_runs_on_other_weights(tmp_path: Path) -> None:
    """Zoo models retrained on another CPU have other weights: their seeds are another experiment."""
    write_table(tmp_path / "a.json", [row("PNC", 0, 0.9), row("Continual+KD", 0, 0.9)], target_sha256="aa")
    write_table(tmp_path / "b.json", [row("PNC", 1, 0.9), row("Continual+KD", 1, 0.9)], target_sha256="bb")
    with pytest.raises(ValueError, match="differs in target_sha256"):
        paired_seeds.seed_rows([tmp_path / "a.json", tmp_path / "b.json"], "M", ("PNC", "Continual+KD"))
    write_table(tmp_path / "c.json", [row("PNC", 1, 0.9), row("Continual+KD", 1, 0.9)], target_sha256="aa")
    rows = paired_seeds.seed_rows([tmp_path / "a.json", tmp_path / "c.json"], "M", ("PNC", "Continual+KD"))
    assert sorted(rows) == [0, 1]


def test_the_script_writes_its_files_and_names_a_missing_scale(tmp_path: Path) -> None:
    write_table(tmp_path / "table2-p.json", [row("PNC", 0, 0.94, scale="S"), row("Continual+KD", 0, 0.93, scale="S")])
    script = Path(paired_seeds.__file__)
    run = lambda *a: subprocess.run(
        [sys.executable, str(script), "--results", str(tmp_path), *a], capture_output=True, text=True
    )
    done = run("--tables", "table2-p:S", "--out", "pairs")
    assert done.returncode == 0, done.stderr
    data = json.loads((tmp_path / "pairs.json").read_text())
    assert data["tables"][0]["per_seed"][0]["avg"] == pytest.approx(1.0)
    assert "| `table2-p` | S | 1 | 0: +1.00 |" in (tmp_path / "pairs.md").read_text()
    failed = run("--tables", "table2-p")
    assert failed.returncode == 2 and "table2-p:M" in failed.stderr and "Traceback" not in failed.stderr


def test_no_common_seed_is_an_empty_pairing_not_a_crash() -> None:
    result = paired_seeds.paired({0: {"PNC": row("PNC", 0, 0.9)}}, ("PNC", "Continual+KD"))
    assert result["seeds"] == [] and math.isnan(result["summary"]["avg"]["se"])
