"""benchmarks/goals_summary.py gathers the tables' goal verdicts, counting the paper setting's only."""

from __future__ import annotations

import json

from pnc.bench.goals_summary import markdown, read_tables


def _table(path, old_fraction, verdicts):
    goals = [
        {"scale": "M", "goal": f"g{i}", "value": i, "need": ">= 0", "met": m, "diagnosis": "why-it-missed"}
        for i, m in enumerate(verdicts)
    ]
    path.write_text(
        json.dumps(
            {
                "target": "t",
                "source": "s",
                "old_fraction": old_fraction,
                "seeds": [0, 1],
                "validation": 0.1,
                "goals": goals,
            }
        )
    )


def test_summary_counts_paper_setting_goals_and_lists_strict_ones_last(tmp_path):
    _table(tmp_path / "table1-a-old0.json", 0.0, [False, False])
    _table(tmp_path / "table1-a.json", 0.3, [True, False, True])
    _table(tmp_path / "table2-b.json", 0.3, [True])
    (tmp_path / "table1-a.rows.json").write_text("[]")  # a row cache, not a table
    tables = read_tables(tmp_path)
    assert [t["file"] for t in tables] == ["table1-a-old0.md", "table1-a.md", "table2-b.md"]
    page = markdown(tables)
    assert "3 of 4 goals met" in page and "validation share 0.1, seeds 0,1: 2 of 3 met" in page
    assert page.index("table1-a.md") < page.index("table2-b.md") < page.index("table1-a-old0.md")
    assert page.count("| NO |") == 3 and "why-it-missed" not in page
