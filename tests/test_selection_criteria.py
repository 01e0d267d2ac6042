"""benchmarks/selection_criteria.py re-ranks the committed finalists by other rules."""

from __future__ import annotations

import json

import pytest

from pnc.bench.selection_criteria import markdown, run


def _candidate(cut, error, ce, test_avg, tuned_avg=None):
    holdout = {"acc": 1 - error, "ce": ce}
    tuned = {"tuned_accuracy": {"avg": tuned_avg}} if tuned_avg is not None else {}
    return {
        "target_cut": cut,
        "loss": error,
        "holdout": holdout,
        "accuracy": {"avg": test_avg},
        "eliminated": "",
    } | tuned


def test_each_criterion_picks_its_finalist_and_its_regret_is_measured_against_the_best(tmp_path):
    near_tie = [_candidate("late", 0.141, 0.397, 0.850), _candidate("early", 0.144, 0.390, 0.859)]
    clear = [_candidate("late", 0.10, 0.30, 0.90, 0.905), _candidate("early", 0.12, 0.35, 0.88, 0.911)]
    dropped = {**_candidate("stem", 0.05, 0.1, 0.99), "eliminated": "after stage 'search'"}
    rows = {
        "PNC|M|1": {"method": "PNC", "details": {"report": {"candidates": near_tie}}},
        "PNC|S|0": {"method": "PNC", "details": {"report": {"candidates": [*clear, dropped]}}},
        "Continual|S|0": {"method": "Continual"},
    }
    (tmp_path / "table1-x.rows.json").write_text(json.dumps(rows))
    (tmp_path / "table1-x-old0.rows.json").write_text(json.dumps(rows))  # strict setting: not read
    result = run(tmp_path)
    assert [r["row"] for r in result["rows"]] == ["M, seed 1", "S, seed 0"]
    tie, plain = result["rows"]
    assert tie["error"] == {"cut": "late", "regret": pytest.approx(0.9), "tuned_regret": None}  # no tuned finalists
    assert tie["ce"] == tie["earliest"] == {"cut": "early", "regret": pytest.approx(0.0), "tuned_regret": None}
    assert plain["error"]["cut"] == plain["ce"]["cut"] == "late"
    assert plain["earliest"]["cut"] == "early"  # the eliminated (earlier) candidate is never picked
    assert plain["error"]["tuned_regret"] == pytest.approx(0.6) and plain["earliest"]["tuned_regret"] == 0
    assert plain["earliest"]["regret"] == pytest.approx(2.0)
    summary = result["summary"]
    assert summary["error"]["mean_regret"] == pytest.approx(0.45)
    assert result["tuned_rows"] == 1 and summary["error"]["mean_tuned_regret"] == pytest.approx(0.6)
    page = markdown(result)
    assert "| table1-x | M, seed 1 | late (0.90 -> —) | early (0.00 -> —) | early (0.00 -> —) |" in page
    assert "| table1-x | S, seed 0 | late (0.00 -> 0.60) | late (0.00 -> 0.60) | early (2.00 -> 0.00) |" in page
