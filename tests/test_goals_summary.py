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


def test_recheck_recomputes_the_goals_from_the_rows_and_keeps_the_rest(tmp_path):
    """recheck_goals: the rows stay, the goals are those goal_checks gives them now, with the
    class names of the dataset's indices."""
    from pnc.bench.paper import recheck_goals

    def row(method, ori, tar, seconds):
        return {
            "method": method, "scale": "S", "ori_acc": ori, "tar_acc": tar, "avg_acc": (2 * ori + tar) / 3,
            "ori_std": 0.0, "tar_std": 0.0, "avg_std": 0.0, "per_class": [ori, ori, tar], "macs": 1,
            "seconds": seconds, "peak_mb": 1,
        }  # fmt: skip

    result = {
        "target_classes": [3, 1],
        "clone_classes": {"S": [0]},
        "rows": [row("Continual+KD", 0.9, 0.9, 100.0), row("Joint+Full", 0.9, 0.9, 100.0), row("PNC", 0.9, 0.6, 50.0)],
        "pnc_search": [],
        "goals": [{"goal": "stale"}],
        "command": "pnc bench paper",
    }
    out = recheck_goals(result, ["zero", "one", "two", "three"])
    assert out["rows"] == result["rows"] and out["command"] == result["command"]
    goals = {g["goal"]: g for g in out["goals"]}
    assert "stale" not in goals and not goals["Avg(PNC) - Avg(Continual+KD), points"]["met"]
    assert "zero -30.0" in goals["Avg(PNC) - Avg(Continual+KD), points"]["diagnosis"]  # index 0 is named "zero"
    assert goals["seconds(PNC) / seconds(Joint+Full), same run"]["value"] == 0.5
