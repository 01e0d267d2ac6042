"""``write_json_md``: every benchmark's ``<stem>.json`` + ``<stem>.md`` pair."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pnc.bench.results_files import write_json_md


def test_writes_both_files_with_tensors_tuples_and_sets_as_lists(tmp_path: Path) -> None:
    result = {"logits": torch.tensor([[1.5, -2.0]]), "cuts": ("stem_2", "block1_2"), "seeds": {3}, "cpu": "x"}
    md = write_json_md(tmp_path / "new" / "table1-v0.3", result, "| a |\n|---|")
    assert md == tmp_path / "new" / "table1-v0.3.md"  # a dot in the stem is not a suffix
    assert md.read_text() == "| a |\n|---|\n"  # one trailing newline added
    data = json.loads((tmp_path / "new" / "table1-v0.3.json").read_text())
    assert data == {"logits": [[1.5, -2.0]], "cuts": ["stem_2", "block1_2"], "seeds": [3], "cpu": "x"}
    assert sorted(p.name for p in md.parent.iterdir()) == ["table1-v0.3.json", "table1-v0.3.md"]  # no temp left


def test_a_failed_write_keeps_the_previous_result(tmp_path: Path) -> None:
    write_json_md(tmp_path / "r", {"v": 1}, "one\n")
    with pytest.raises(ZeroDivisionError):
        write_json_md(tmp_path / "r", {"v": object.__new__(type("Bad", (), {"__str__": lambda s: 1 / 0}))}, "two\n")
    assert json.loads((tmp_path / "r.json").read_text()) == {"v": 1}
    assert (tmp_path / "r.md").read_text() == "one\n"


def test_importing_it_loads_no_torch() -> None:
    code = "import sys, pnc.bench.results_files; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
