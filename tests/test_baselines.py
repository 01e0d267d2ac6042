"""Every Table 1 method on digits with the quick budget, through ``pnc bench paper --quick``
(pnc.bench.baselines, pnc.bench.paper, pnc.bench.cli.bench)."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import random
import shutil
import time

import pytest
import torch
import torch.nn.functional as F

from pnc.bench.baselines import METHODS, CalibratedEnsemble, PeakMemory, extend_classifier, run_method
from pnc.bench.cli import main
from pnc.bench.metrics import evaluate_clone, logits_of
from pnc.bench.paper import QUICK_BUDGET
from pnc.surgery.io import state_dict_sha256
from pnc.surgery.reporting import reporting_only
from pnc.zoo.datasets import load_dataset
from pnc.zoo.store import ZooStore
from pnc.zoo.tasks import CloneTask
from pnc.zoo.train import evaluate

STEM = "table1-digits-cnn4-quick"


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One quick run of all methods, then a second run that must come from the cache."""
    root = tmp_path_factory.mktemp("bench")
    argv = [
        "bench",
        "paper",
        "--quick",
        "--zoo-dir",
        str(root / "zoo"),
        "--out",
        str(root / "out"),
        "--workdir",
        str(root / "work"),
    ]
    assert main(argv) == 0
    first = json.loads((root / "out" / f"{STEM}.json").read_text())
    store = ZooStore(root / "zoo")
    hashes = {n: state_dict_sha256(store.load(n)[0]) for n in ("digits-cnn4-target", "digits-cnn4-source")}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    second = json.loads((root / "out" / f"{STEM}.json").read_text())
    cache = json.loads((root / "out" / f"{STEM}.rows.json").read_text())
    return {
        "root": root,
        "first": first,
        "second": second,
        "cache": cache,
        "store": store,
        "hashes": hashes,
        "rerun_log": out.getvalue(),
        "argv": argv,
    }


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _row(result, method):
    return next(r for r in result["rows"] if r["method"] == method)


def test_table_json_has_every_method_with_fractions_and_costs(bench):
    result = bench["first"]
    assert result["dataset"] == "digits" and result["arch"] == "cnn4"
    assert result["old_fraction"] == 0.3  # the paper's setting by default
    assert [r["method"] for r in result["rows"]] == list(METHODS)
    for r in result["rows"]:
        assert r["scale"] == "S" and r["seeds"] == [0]
        for part in ("ori", "tar", "avg"):
            assert 0.0 <= r[f"{part}_acc"] <= 1.0 and r[f"{part}_std"] == 0.0
        assert r["seconds"] >= 0 and r["peak_mb"] >= 0 and r["macs"] > 0 and r["params"] > 0
        assert set(r["delta_vs_Continual+KD"]) == {"ori", "tar", "avg"}
    assert _row(result, "Continual+KD")["delta_vs_Continual+KD"]["avg"] == 0.0
    md = (bench["root"] / "out" / f"{STEM}.md").read_text()
    assert "| PNC (w/o Insert) |" in md and "## Goals" in md
    assert "| Calibrated Ensemble |" in md and "regret" in md
    assert all(r["peak_without_reporting"] for r in result["per_seed"])  # /proc sampled here
    assert "PNC's leave out the finalists' accuracy" in md
    goals = {g["goal"]: g for g in result["goals"]}
    at = {r["method"]: r for r in result["rows"]}
    cost = goals["seconds(PNC) / seconds(Joint+Full), same run"]
    assert cost["value"] == round(at["PNC"]["seconds"] / at["Joint+Full"]["seconds"], 3)
    assert cost["met"] == (cost["value"] <= 0.25) and cost["value"] > 0
    assert goals["peak MiB(PNC) / peak MiB(Joint+Full)"]["need"] == "<= 2"
    for s in result["pnc_search"]:
        chosen = next(c for c in s["candidates"] if c["target_cut"] == s["target_cut"])
        finalists = [c for c in s["candidates"] if not c["eliminated"]]
        assert all(bool(c["accuracy"]) != bool(c["eliminated"]) for c in s["candidates"])
        best = max(c["accuracy"]["avg"] for c in finalists)
        assert s["regret_before_tuning"] == pytest.approx(100 * (best - chosen["accuracy"]["avg"]))
        # the paper setting tunes the chosen branch: PNC's finalists are all tuned to report the regret
        if s["method"] != "PNC":  # the ablations report the search's finalists only
            assert s["regret_basis"] == "before tuning" and s["regret"] == s["regret_before_tuning"]
            continue
        assert s["regret_basis"] == "tuned" and all(c["tuned_accuracy"] for c in finalists)
        best = max(c["tuned_accuracy"]["avg"] for c in finalists)
        assert s["regret"] == pytest.approx(100 * (best - chosen["tuned_accuracy"]["avg"]))
        assert chosen["tuned_accuracy"]["avg"] == pytest.approx(_row(result, "PNC")["avg_acc"], abs=0.002)
    assert "mean selection regret (finalists, tuned), points" in goals


def test_pretrained_and_ensemble_match_independent_computations(bench, digits):
    store = bench["store"]
    target, _ = store.load("digits-cnn4-target")
    source, _ = store.load("digits-cnn4-source")
    task = CloneTask(digits, list(range(5)), list(range(5, 10)), "S", seed=0)
    pre = _row(bench["first"], "Pre-trained")
    assert pre["tar_acc"] == 0.0
    assert pre["ori_acc"] == pytest.approx(evaluate(target, task.target_test()), abs=1e-7)
    sets = task.eval_sets()
    x, y = sets["avg"].x, sets["avg"].y
    with torch.no_grad():
        pred = torch.cat([target(x), source(x)[:, [0]]], 1).argmax(1)
    old = y < 5
    ens = _row(bench["first"], "Direct Ensemble")
    assert ens["avg_acc"] == pytest.approx(float((pred == y).float().mean()), abs=1e-7)
    assert ens["tar_acc"] == pytest.approx(float((pred[~old] == y[~old]).float().mean()), abs=1e-7)
    assert ens["macs"] == 2 * pre["macs"] and ens["params"] == 2 * pre["params"]


def test_methods_learn_the_new_class_and_pnc_costs_less_than_the_ensemble(bench):
    result = bench["first"]
    assert _row(result, "Continual")["tar_acc"] > 0.8  # fine-tuning learns the new class ...
    pnc, ens, pre = (_row(result, m) for m in ("PNC", "Direct Ensemble", "Pre-trained"))
    assert pre["macs"] < pnc["macs"] < ens["macs"]  # ... PNC adds a pruned branch, not a network
    assert pre["params"] < pnc["params"] < ens["params"]


def test_ablations_are_what_they_claim(bench):
    search = {s["method"]: s for s in bench["first"]["pnc_search"]}
    assert search["PNC (w/o Local)"]["kept_fraction"] == 1.0
    assert all(c["kept_fraction"] == 1.0 for c in search["PNC (w/o Local)"]["candidates"])
    full = [c["target_cut"] for c in search["PNC"]["candidates"]]
    assert len(full) > 1 and [c["target_cut"] for c in search["PNC (w/o Insert)"]["candidates"]] == [full[-1]]
    # PNC-F starts from PNC's very search: its one candidate, the earliest cut (PNC trained the others
    # for the report only)
    untuned = [{**c, "tuned_accuracy": {}} for c in search["PNC"]["candidates"]]  # only PNC reports them
    assert search["PNC"]["choose"] == search["PNC-F"]["choose"] == "earliest"
    assert search["PNC-F"]["candidates"] == untuned[-1:] and search["PNC"]["target_cut"] == full[-1]
    hp = bench["first"]["hparams"]
    assert hp["Continual"]["epochs"] == QUICK_BUDGET.epochs == 3
    assert hp["Joint+Full"]["epochs"] == QUICK_BUDGET.scratch_epochs


def test_zoo_models_untouched_and_rerun_resumes_from_cache(bench):
    store = bench["store"]
    for name, digest in bench["hashes"].items():
        assert store.verify(name)
        assert state_dict_sha256(store.load(name)[0]) == digest
    assert len(bench["cache"]) == len(METHODS)
    assert bench["second"]["rows"] == bench["first"]["rows"]
    assert bench["rerun_log"].count("(cached)") == len(METHODS) and "(done)" not in bench["rerun_log"]


def test_pnc_f_changes_the_clone_and_leaves_the_target(bench, digits):
    store = bench["store"]
    target, _ = store.load("digits-cnn4-target")
    source, _ = store.load("digits-cnn4-source")
    before = state_dict_sha256(target)
    task = CloneTask(digits, list(range(5)), list(range(5, 10)), "S", seed=0)
    work = bench["root"] / "work" / STEM / "S-0"  # resumes the fixture's checkpointed search
    pnc = run_method("PNC", task, target, source, 0, QUICK_BUDGET, workdir=work)
    tuned = run_method("PNC-F", task, target, source, 0, QUICK_BUDGET, workdir=work)
    x = task.eval_sets()["avg"].x
    assert not torch.allclose(logits_of(pnc.model, x), logits_of(tuned.model, x))
    assert state_dict_sha256(target) == before
    assert evaluate_clone(pnc.model, task.eval_sets())["avg"] == pytest.approx(_row(bench["first"], "PNC")["avg_acc"])


def test_a_pnc_row_trains_its_whole_search_and_pnc_f_resumes_it(bench, digits, tmp_path, monkeypatch):
    import pnc.surgery.cut_search as cut_search

    stages = []
    real = cut_search.run_job
    monkeypatch.setattr(cut_search, "run_job", lambda *args, **kw: stages.append(1) or real(*args, **kw))
    target, _ = bench["store"].load("digits-cnn4-target")
    source, _ = bench["store"].load("digits-cnn4-source")
    task = CloneTask(digits, list(range(5)), list(range(5, 10)), "S", seed=0)
    run_method("PNC", task, target, source, 0, QUICK_BUDGET, workdir=tmp_path)
    first = len(stages)
    assert first > 0
    run_method("PNC", task, target, source, 0, QUICK_BUDGET, workdir=tmp_path)  # a recomputed row: from scratch
    assert len(stages) == 2 * first
    run_method("PNC-F", task, target, source, 0, QUICK_BUDGET, workdir=tmp_path)  # resumes PNC's search
    assert len(stages) == 2 * first


def test_extend_classifier_keeps_old_outputs(bench, digits):
    target, _ = bench["store"].load("digits-cnn4-target")
    x = digits.test.x[:16]
    wide = extend_classifier(copy.deepcopy(target), 2, x, seed=0)
    out = wide(x)
    assert out.shape == (16, 7)
    assert torch.allclose(out[:, :5], target(x), atol=1e-6)
    assert target.head.out_features == 5


def test_peak_memory_sees_a_large_allocation():
    with PeakMemory() as small:
        time.sleep(0.03)
    with PeakMemory() as big:
        block = torch.ones(32 * 2**20 // 4 * 4)  # 128 MiB of float32, written
        time.sleep(0.05)
        del block
    assert big.peak_mb > 100 and small.peak_mb < 20


def test_peak_memory_leaves_out_reporting_only_work():
    with PeakMemory() as memory:
        with reporting_only():
            block = torch.ones(32 * 2**20 // 4 * 4)  # 128 MiB, as the test above sees
            time.sleep(0.05)
            del block
        time.sleep(0.03)
    assert memory.peak_mb < 20 and memory.without_reporting


def test_peak_memory_sees_a_block_that_reuses_memory_an_earlier_one_freed():
    """Fragmented frees (a few survivors among many tensors) leave pages the allocator keeps;
    a block allocating the same again must still read its own memory, not 0."""

    def churn() -> list[torch.Tensor]:
        rnd, live = random.Random(0), []
        for _ in range(20000):
            live.append(torch.ones(rnd.choice([256, 4096, 16384, 30000])))
            if len(live) > 4000:
                live.pop(rnd.randrange(len(live)))
        return live

    survivors = churn()[::50]
    with PeakMemory() as again:
        block = churn()
        time.sleep(0.05)
    del block
    assert len(survivors) == 80 and again.peak_mb > 150


def test_unknown_method_and_scale_are_rejected(bench, capsys):
    assert main([*bench["argv"], "--methods", "PNC,Nope"]) == 2
    assert "unknown methods ['Nope']" in capsys.readouterr().err
    assert main([*bench["argv"], "--scales", "L"]) == 2


def test_calibrated_ensemble_fits_temperatures_and_biases_on_the_available_images(bench, digits):
    store = bench["store"]
    target, _ = store.load("digits-cnn4-target")
    source, _ = store.load("digits-cnn4-source")
    before = state_dict_sha256(target), state_dict_sha256(source)
    task = CloneTask(digits, list(range(5)), list(range(5, 10)), "M", seed=0)
    data = task.available_set()
    assert (data.y < 5).any() and (data.y >= 5).any()  # old-class replay and the clone set
    model = CalibratedEnsemble(target, source, task.source_label_index(), 5)
    with torch.no_grad():
        direct = torch.cat([target(data.x), source(data.x)[:, task.source_label_index()]], 1)
        assert torch.equal(model(data.x), direct)  # starts as the direct ensemble
        direct_ce = float(F.cross_entropy(direct, data.y))
    model.fit(data.x, data.y)
    with torch.no_grad():
        fitted_ce = float(F.cross_entropy(model(data.x), data.y))
    assert fitted_ce < direct_ce
    assert model.bias.abs().max() > 0 and not torch.allclose(model.log_temperature, torch.zeros(2))
    assert len(list(model.parameters())) == 2  # the target and the source are not its parameters
    assert (state_dict_sha256(target), state_dict_sha256(source)) == before
    row = _row(bench["first"], "Calibrated Ensemble")
    assert row["avg_acc"] > 0.8 and row["params"] == _row(bench["first"], "Direct Ensemble")["params"] + 8


def test_bench_paper_on_any_zoo_pair(tiny_zoo, tmp_path, capsys):
    """`pnc bench paper --target NAME --source NAME`: the same table and JSON schema on a pair
    the user trained (here the tiny digits pair), the dataset read from their cards."""
    zoo = tmp_path / "zoo"
    shutil.copytree(tiny_zoo, zoo)
    out = tmp_path / "results"
    argv = ["bench", "paper", "--quick", "--target", "t", "--source", "s", "--methods", "Pre-trained,Direct Ensemble"]
    assert main([*argv, "--out", str(out), "--workdir", str(tmp_path / "w"), "--zoo-dir", str(zoo)]) == 0
    doc = json.loads((out / "table1-digits-t-s-quick.json").read_text())
    assert doc["dataset"] == "digits" and doc["old_fraction"] == 0.3 and doc["target"] == "t"
    rows = {(r["method"], r["scale"]): r for r in doc["rows"]}
    assert set(rows) == {("Pre-trained", "S"), ("Direct Ensemble", "S")}
    assert {"method", "scale", "ori_acc", "tar_acc", "avg_acc", "seconds", "peak_mb"} <= set(rows["Pre-trained", "S"])
    assert rows["Pre-trained", "S"]["tar_acc"] == 0.0 and rows["Direct Ensemble", "S"]["tar_acc"] > 0.5
    capsys.readouterr()
    assert main(["bench", "paper", "--quick", "--target", "t", "--out", str(out), "--zoo-dir", str(zoo)]) == 2
    assert (
        main(
            ["bench", "paper", "--quick", "--target", "t", "--source", "nope", "--out", str(out), "--zoo-dir", str(zoo)]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "together" in err and "nope" in err


def test_bench_paper_on_a_pair_trained_with_a_validation_share_chooses_r_on_it(tmp_path):
    """Models trained without the same validation rows: the table says R is chosen on them and
    its JSON records the share; every method's images come from the other rows."""
    from conftest import _train

    zoo, out = tmp_path / "zoo", tmp_path / "results"
    _train(zoo, "t", "0-4", 1, "--validation", "0.2")
    _train(zoo, "s", "5-9", 2, "--validation", "0.2")
    argv = ["bench", "paper", "--quick", "--target", "t", "--source", "s", "--methods", "Pre-trained,PNC"]
    assert main([*argv, "--out", str(out), "--workdir", str(tmp_path / "w"), "--zoo-dir", str(zoo)]) == 0
    doc = json.loads((out / "table1-digits-t-s-quick.json").read_text())
    assert doc["validation"] == 0.2
    store = ZooStore(zoo)  # the weights the rows ran on, as the cards hash them
    assert (doc["target_sha256"], doc["source_sha256"]) == (store.card("t").sha256, store.card("s").sha256)
    text = (out / "table1-digits-t-s-quick.md").read_text()
    assert "R is the earliest cut an adapter maps" in text  # the default rule with old-class images
    assert "the validation rows of the task's classes (20% of each class's training images" in text
    assert "only decide whether its tuning is kept" in text and "least selection loss" not in text
    assert "the validation rows, 20% of each class's, which neither zoo model was trained on" in text
    assert {r["method"] for r in doc["rows"]} == {"Pre-trained", "PNC"}


def test_a_cached_pnc_row_is_recomputed_when_a_search_default_changes(monkeypatch, digits):
    from pnc.bench import paper
    from pnc.surgery.insertion import SearchConfig

    task = CloneTask(digits, [0, 1, 2, 3, 4], [5, 6, 7, 8, 9], clone_classes=[5], seed=0)
    spec = paper.TableSpec("t", "t", "t", "s", ["S"], [0], ["PNC"], QUICK_BUDGET)
    card = type("Card", (), {"sha256": "x"})()
    before = {m: paper._fingerprint(spec, m, task, card, card) for m in ("PNC", "PNC-F", "Joint+Full", "Continual")}
    changed = SearchConfig(smaller_branch_within_se=not SearchConfig().smaller_branch_within_se)
    monkeypatch.setattr(type(QUICK_BUDGET), "search", lambda self, seed, **overrides: changed)
    after = {m: paper._fingerprint(spec, m, task, card, card) for m in before}
    assert after["PNC"] != before["PNC"] and after["PNC-F"] != before["PNC-F"]
    assert after["Joint+Full"] == before["Joint+Full"] and after["Continual"] == before["Continual"]


def test_a_cached_figure_point_is_recomputed_when_a_search_default_changes(monkeypatch, tiny_zoo, digits, tmp_path):
    from pnc.bench import figures
    from pnc.bench.paper import RowCache
    from pnc.surgery.insertion import SearchConfig
    from pnc.zoo.store import ZooStore

    computed = []

    def point(task, target, source, budget, seed, workdir, tag, **overrides):
        computed.append(tag)
        row = {"ori": 0.9, "tar": 0.8, "avg": 0.85, "target_cut": "c", "module_params": 1}
        return None, row | {"cut": overrides.get("candidates", ["c"])[0]}

    monkeypatch.setattr(figures, "_clone_point", point)
    cache = RowCache(tmp_path / "fig.rows.json")
    kwargs = {"ratios": (0.5,), "budget": QUICK_BUDGET, "cache": cache, "workdir": tmp_path, "log": lambda _: None}
    figures.figure3(ZooStore(tiny_zoo), digits, "t", "s", **kwargs)
    first = len(computed)
    figures.figure3(ZooStore(tiny_zoo), digits, "t", "s", **kwargs)
    assert first > 1 and len(computed) == first  # every point read back from the cache
    changed = SearchConfig(smaller_branch_within_se=not SearchConfig().smaller_branch_within_se)
    monkeypatch.setattr(type(QUICK_BUDGET), "search", lambda self, seed, **overrides: changed)
    figures.figure3(ZooStore(tiny_zoo), digits, "t", "s", **kwargs)
    assert len(computed) == 2 * first  # a new search default: every point recomputed


def test_fresh_cache_recomputes_rows_already_on_disk_but_reads_rows_added_later(tmp_path):
    from pnc.bench.paper import RowCache

    path = tmp_path / "t.rows.json"
    RowCache(path).put("PNC|S|0", {"fingerprint": "f", "avg": 0.5})
    cache = RowCache(path, fresh=True)
    assert cache.get("PNC|S|0", "f") is None  # the row on disk is the one --fresh recomputes
    RowCache(path).put("PNC|S|1", {"fingerprint": "f", "avg": 0.7})  # another process adds a row
    assert cache.get("PNC|S|1", "f") == {"fingerprint": "f", "avg": 0.7}
    assert cache.get("PNC|S|0", "f") is None


def test_fresh_cache_keeps_the_rows_of_cells_it_does_not_recompute(tmp_path):
    """`--fresh --scales S` rewrites S's rows and keeps M's; a stopped fresh run leaves none
    of its own cells' old rows behind for a resume without --fresh to read."""
    from pnc.bench.paper import RowCache

    path = tmp_path / "t.rows.json"
    old = RowCache(path)
    for key in ("PNC|S|0", "PNC|S|1", "PNC|M|0"):
        old.put(key, {"fingerprint": "f", "avg": 0.1})
    fresh = RowCache(path, fresh=True)
    fresh.claim(["PNC|S|0", "PNC|S|1"])
    assert fresh.get("PNC|S|0", "f") is None
    fresh.put("PNC|S|0", {"fingerprint": "f", "avg": 0.9})  # then the run is stopped
    on_disk = json.loads(path.read_text())
    assert on_disk == {"PNC|S|0": {"fingerprint": "f", "avg": 0.9}, "PNC|M|0": {"fingerprint": "f", "avg": 0.1}}
    assert RowCache(path).get("PNC|S|1", "f") is None  # the resume recomputes it
    assert RowCache(path).get("PNC|M|0", "f") == {"fingerprint": "f", "avg": 0.1}


def test_two_processes_recomputing_different_seeds_keep_each_others_new_rows(tmp_path):
    """Two processes opened on one file (one per seed) each recompute one cell: the row one
    put is not written back over by the other's copy read at its start (a rerun of Table 2
    per seed had lost seed 1's new row that way)."""
    from pnc.bench.paper import RowCache

    path = tmp_path / "t.rows.json"
    first = RowCache(path)
    for key in ("PNC|S|1", "PNC|S|2"):
        first.put(key, {"fingerprint": "old", "avg": 0.1})
    one, two = RowCache(path), RowCache(path)  # both hold the old rows
    one.put("PNC|S|1", {"fingerprint": "new", "avg": 0.8})
    two.put("PNC|S|2", {"fingerprint": "new", "avg": 0.9})
    on_disk = json.loads(path.read_text())
    assert on_disk == {"PNC|S|1": {"fingerprint": "new", "avg": 0.8}, "PNC|S|2": {"fingerprint": "new", "avg": 0.9}}
    one.put("PNC|S|1", {"fingerprint": "new", "avg": 0.7})  # a process's own row still wins
    assert json.loads(path.read_text())["PNC|S|1"]["avg"] == 0.7


@pytest.mark.parametrize(
    ("command", "module", "runner"),
    [
        (["paper"], "pnc.bench.paper", "run_paper"),
        (["hetero", "--pairs", "resnetc20-cnn4"], "pnc.bench.hetero", "run_hetero"),
        (["incremental"], "pnc.bench.incremental", "run_incremental"),
        (["figures"], "pnc.bench.figures", "run_figures"),
    ],
)
def test_every_bench_command_takes_fresh_to_its_rows_cache(monkeypatch, tmp_path, command, module, runner):
    """`pnc bench paper|hetero|incremental|figures --fresh` recompute every row; without it
    cached rows are read."""
    import importlib

    calls = []

    def fake(*args, **kwargs):
        calls.append(kwargs["fresh"])
        raise SystemExit(0)

    monkeypatch.setattr(importlib.import_module(module), runner, fake)
    argv = ["bench", *command, "--quick", "--zoo-dir", str(tmp_path / "zoo"), "--out", str(tmp_path / "out")]
    for extra in ([], ["--fresh"]):
        with pytest.raises(SystemExit):
            main([*argv, *extra])
    assert calls == [False, True]


def test_two_processes_filling_one_table_keep_each_others_rows(tmp_path):
    from pnc.bench.paper import RowCache

    path = tmp_path / "t.rows.json"
    one, other = RowCache(path), RowCache(path)  # e.g. `--scales S` and `--scales M` at once
    one.put("PNC|S|0", {"fingerprint": "f", "avg": 0.5})
    other.put("PNC|M|0", {"fingerprint": "f", "avg": 0.4})
    one.put("PNC|S|1", {"fingerprint": "f", "avg": 0.6})
    assert set(json.loads(path.read_text())) == {"PNC|S|0", "PNC|M|0", "PNC|S|1"}


def test_goal_checks_count_a_float_tie_as_met_and_a_real_gap_as_missed():
    from pnc.bench.paper import goal_checks

    def row(method, avg):
        return {"method": method, "scale": "S", "avg_acc": avg, "ori_acc": 0.93, "macs": 1, "seconds": 1, "peak_mb": 1}

    # the seed means of the same image counts, as float32 accuracies give them
    tie = goal_checks([row("PNC", 0.9428333242734274), row("Continual+KD", 0.9428333441416422)])
    assert [c["met"] for c in tie if "Continual+KD" in c["goal"]] == [True]
    short = goal_checks([row("PNC", 0.9425), row("Continual+KD", 0.9428333441416422)])
    assert [c["met"] for c in short if "Continual+KD" in c["goal"]] == [False]


def test_bench_incremental_gives_every_method_the_same_images_in_both_settings(bench):
    """`pnc bench incremental --quick` in the paper's setting and the strict one: with the
    target's classes' images every method keeps them (replay), without them sequential
    fine-tuning forgets; each table records its setting."""
    root = bench["root"]
    curves = {}
    for old, stem in ((0.3, "table3-digits-cnn4-quick"), (0.0, "table3-digits-cnn4-old0-quick")):
        argv = ["bench", "incremental", "--quick", "--old-fraction", str(old), "--zoo-dir", str(root / "zoo")]
        assert main([*argv, "--out", str(root / "inc"), "--workdir", str(root / "inc-work")]) == 0
        result = json.loads((root / "inc" / f"{stem}.json").read_text())
        assert result["old_fraction"] == old
        assert len(result["target_sha256"]) == len(result["source_sha256"]) == 64  # the weights the runs used
        assert {s["method"] for s in result["summary"]} == {"Direct Ensemble", "Continual", "Continual+KD", "PNC"}
        curves[old] = {s["method"]: s["accuracy"] for s in result["summary"]}
        assert all(len(c) == 6 and c[0] == curves[old]["PNC"][0] for c in curves[old].values())
    for method in ("Continual", "Continual+KD"):  # the replayed images keep the target's classes
        assert curves[0.3][method][-1] > curves[0.0][method][-1] + 0.1
    assert curves[0.3]["Direct Ensemble"] == curves[0.0]["Direct Ensemble"]  # it never sees an image


def test_a_missed_goal_is_diagnosed_from_the_rows_and_a_met_one_is_not():
    from pnc.bench.paper import _goals_section, goal_checks

    def row(method, ori, tar, per_class, seconds=10.0):
        avg = (2 * ori + tar) / 3
        return {
            "method": method, "scale": "S", "ori_acc": ori, "tar_acc": tar, "avg_acc": avg, "ori_std": 0.0,
            "tar_std": 0.0, "avg_std": 0.0, "per_class": per_class, "macs": 1, "seconds": seconds, "peak_mb": 1,
        }  # fmt: skip

    rows = [
        row("Pre-trained", 0.9, 0.0, [0.9, 0.9, 0.0]),
        row("Continual+KD", 0.9, 0.9, [0.9, 0.9, 0.9], seconds=100.0),
        row("Joint+Full", 0.9, 0.9, [0.9, 0.9, 0.9], seconds=100.0),
        row("PNC", 0.9, 0.6, [0.95, 0.85, 0.6], seconds=50.0),
    ]
    search = [
        {
            "method": "PNC", "scale": "S", "seed": 0, "target_cut": "late", "best_cut": "early", "regret": 1.5,
            "profile": {"search": 30.0, "tune_branch": 15.0, "frozen_outputs": 4.0, "local_models": 1.0},
            "candidates": [
                {"target_cut": "late", "seconds": 8.0, "phase_seconds": {"joint": 5.0, "binary": 3.0}},
                {"target_cut": "early", "seconds": 22.0, "phase_seconds": {"joint": 15.0, "binary": 7.0}},
            ],
        }
    ]  # fmt: skip
    checks = {c["goal"]: c for c in goal_checks(rows, search, {"S": ["a", "b", "new"]}, num_old=2)}
    kd = checks["Avg(PNC) - Avg(Continual+KD), points"]
    assert not kd["met"] and "Tar 60.00 vs 90.00" in kd["diagnosis"] and "new -30.0" in kd["diagnosis"]
    assert "Ori gives +0.00 and Tar -10.00 points" in kd["diagnosis"]
    assert checks["Ori(PNC) - Ori(Pre-trained), points"]["diagnosis"] == ""  # met
    regret = checks["mean selection regret (finalists), points"]
    assert not regret["met"] and "seed 0 chose late, best early" in regret["diagnosis"]
    time = checks["seconds(PNC) / seconds(Joint+Full), same run"]
    assert not time["met"] and "tuning 15 s" in time["diagnosis"] and "early 22 s" in time["diagnosis"]
    assert "with R known in advance (only the chosen candidate trained) 28 s, 0.28x Joint+Full" in time["diagnosis"]
    text = "\n".join(_goals_section(list(checks.values())))
    assert "Missed goals" in text and kd["diagnosis"] in text


def test_seconds_from_rows_of_other_machines_are_not_compared_and_the_table_says_so():
    """Rows are cached across runs: a table whose PNC rows were rerun on another CPU than its
    Joint+Full rows gets no time ratio (a missed goal saying why) and names each row's CPU."""
    from pnc.bench.paper import _row_cpus, goal_checks, summarize

    def row(method, seed, cpu=None):
        r = {"method": method, "scale": "S", "seed": seed, "ori": 0.9, "tar": 0.9, "avg": 0.9, "seconds": 10.0}
        return (
            r
            | {"peak_mb": 1.0, "macs": 1, "params": 1, "details": {"report": {"target_cut": "c"}}}
            | ({"cpu": cpu} if cpu else {})
        )

    methods = ["Joint+Full", "PNC"]
    same = summarize([row("Joint+Full", 0, "Intel"), row("PNC", 0, "Intel")], methods, ["S"])
    mixed = summarize([row("Joint+Full", 0), row("PNC", 0, "Intel")], methods, ["S"])
    goal = "seconds(PNC) / seconds(Joint+Full), same run"
    assert {c["goal"]: c for c in goal_checks(same)}[goal]["value"] == 1.0
    check = {c["goal"]: c for c in goal_checks(mixed)}[goal]
    assert not check["met"] and math.isnan(check["value"])
    assert "PNC's rows ran on Intel and Joint+Full's on unrecorded" in check["diagnosis"]
    machine = {"cpu": "Intel"}
    assert _row_cpus({"machine": machine, "per_seed": [row("PNC", 0, "Intel")]}) == ""
    assert _row_cpus({"machine": machine, "per_seed": [row("PNC", 0)]}) == ""  # a table from before: one run
    said = _row_cpus({"machine": machine, "per_seed": [row("Joint+Full", 0), row("PNC", 0, "Intel")]})
    assert said == " Rows cached from other runs: the rows ran on Intel (1), unrecorded (1)."


def test_the_time_diagnosis_compares_the_tunings_training_macs_with_joint_full():
    """PNC's tuning: training images x passes (every length tried) x the branch's MACs;
    Joint+Full: its training images x epochs x its MACs; rows that do not say get none."""
    from pnc.bench.paper import goal_checks, summarize

    def row(method, details, hparams, macs):
        return {
            "method": method, "scale": "S", "seed": 0, "ori": 0.9, "tar": 0.9, "avg": 0.9, "peak_mb": 1.0,
            "seconds": 80.0 if method == "PNC" else 100.0, "macs": macs, "params": 1, "details": details,
            "hparams": hparams, "cpu": "Intel",
        }  # fmt: skip

    report = {
        "target_cut": "c", "macs_after": 1_000, "images": {"old_train": 70, "clone_train": 30},
        "tuning": {"epochs": 4, "tried": {"4": 0.9, "2": 0.8}},
    }  # fmt: skip
    per_seed = [
        row("PNC", {"report": report}, {}, 5_000),
        row("Joint+Full", {"train_images": 200}, {"epochs": 3}, 4_000),
        row("Continual", {"train_images": 200}, {}, 4_000),  # no epochs: not counted
    ]
    rows = {r["method"]: r for r in summarize(per_seed, ["PNC", "Joint+Full", "Continual"], ["S"])}
    assert rows["PNC"]["trained_macs"] == 100 * (4 + 2) * 1_000
    assert rows["Joint+Full"]["trained_macs"] == 200 * 3 * 4_000
    assert "trained_macs" not in rows["Continual"]
    check = {c["goal"]: c for c in goal_checks(list(rows.values()))}["seconds(PNC) / seconds(Joint+Full), same run"]
    assert not check["met"]
    assert "the tuning alone trains 0.25x the forward MACs of Joint+Full's training" in check["diagnosis"]
