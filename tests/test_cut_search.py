"""The search over cuts: frozen outputs cached once, successive halving, time budget, checkpoints."""

import gc
import json
import math
from types import SimpleNamespace

import pytest
import torch

from pnc.bench.cli import main
from pnc.surgery import clone, cloning, cut_search
from pnc.surgery.channel_groups import MaskedBody
from pnc.surgery.cut_search import SearchOutcome, choose_by_loss, survivors
from pnc.surgery.errors import ConfigError, DataError, TaskError
from pnc.surgery.frozen_pool import cut_activations
from pnc.surgery.insertion import CandidateResult, SearchConfig, SearchContext
from pnc.surgery.reporting import is_reporting
from pnc.zoo import CloneTask, ZooStore, load_dataset

QUICK = dict(loc_epochs=1, joint_epochs=1, binary_epochs=1, min_steps_per_epoch=6, tune_epochs=1)


@pytest.fixture(scope="module")
def pair(tiny_zoo):
    store = ZooStore(tiny_zoo)
    (target, t_card), (source, s_card) = store.load("t"), store.load("s")
    task = CloneTask(load_dataset("digits"), t_card.classes, s_card.classes, clone_classes=[7], seed=0)
    return target, source, task


def _result(cut: str, loss: float, ce: float, se: float = 0.0) -> CandidateResult:
    return CandidateResult(cut, cut, loss, {}, 0.5, 0.0, {}, holdout={"ce": ce, "se": se}, stage="search")


def test_survivors_keep_the_best_share_and_say_why_the_others_went():
    results = {0: _result("a", 0.30, 1.0), 1: _result("b", 0.10, 1.0), 2: _result("c", 0.10, 0.5)}
    kept, reasons = survivors(results, 0.5)
    assert kept == [1, 2]  # ceil(0.5 * 3) = 2: c (tie on loss, lower ce) and b
    assert set(reasons) == {0} and "0.3000 vs 0.1000 (+- 0.0000) of R=c" in reasons[0]
    assert survivors(results, 0.01)[0] == [1, 2]  # b is within 0 of c: a tie is never dropped
    assert survivors(results, 1.0) == ([0, 1, 2], {})


def test_survivors_never_drop_a_candidate_within_one_standard_error_of_the_best():
    results = {0: _result("a", 0.12, 1.0), 1: _result("b", 0.10, 1.0, se=0.03), 2: _result("c", 0.20, 1.0)}
    kept, reasons = survivors(results, 0.34)
    assert kept == [0, 1] and set(reasons) == {2}  # a: 0.12 <= 0.10 + 0.03


def _scored(cut: str, errors: list[int]) -> CandidateResult:
    losses = torch.tensor(errors, dtype=torch.float32)
    result = _result(cut, float(losses.mean()), 1.0)
    result.holdout_losses = losses
    return result


def test_choose_prefers_the_later_cut_within_one_paired_standard_error():
    # index 0 is the latest cut (the smallest branch); 2 has the lowest held-out error
    later, middle, best = [0, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0, 0, 0]
    results = {0: _scored("late", later), 1: _scored("mid", middle), 2: _scored("early", best)}
    chosen, why = choose_by_loss(results, smaller_branch_within_se=True)
    assert chosen == 0 and "within one paired standard error" in why and "R=early" in why
    assert choose_by_loss(results, smaller_branch_within_se=False)[0] == 2
    # a later cut clearly worse on the same images is not chosen: differences 1 on 4 of 8 images
    results[0] = _scored("late", [1, 1, 1, 1, 1, 0, 0, 0])
    assert choose_by_loss(results, smaller_branch_within_se=True)[0] == 2
    # without per-image losses (nothing held out) the lowest loss wins
    for r in results.values():
        r.holdout_losses = None
    assert choose_by_loss(results, smaller_branch_within_se=True) == (2, "lowest held-out selection loss (0.1250)")


def _branch(net):
    return next(iter(net.branches.values()))


def test_cached_and_recomputed_activations_give_the_same_clone(pair):
    target, source, task = pair
    x = task.eval_sets()["avg"].x[:64]
    nets = [
        clone(target, source, **task.clone_inputs(), config=SearchConfig(**QUICK, cache_mb=mb), progress=False)
        for mb in (0.0, 512.0)
    ]
    assert _branch(nets[0]).target_cut == _branch(nets[1]).target_cut
    with torch.no_grad():  # the cache holds float16: the trainings differ by its rounding only
        recomputed, cached = nets[0](x), nets[1](x)
    torch.testing.assert_close(recomputed, cached, rtol=0.0, atol=0.1)
    assert float((recomputed.argmax(1) == cached.argmax(1)).float().mean()) >= 0.98


def test_cut_activations_are_float16_within_rounding_and_skipped_when_they_do_not_fit():
    torch.manual_seed(0)
    prefix = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU())
    x = torch.randn(10, 1, 8, 8)
    images = lambda rows: x[rows]  # noqa: E731
    cached = cut_activations(prefix, images, 10, 1.0, torch.device("cpu"))
    assert cached is not None and cached.dtype == torch.float16
    with torch.no_grad():
        exact = prefix(x)
    torch.testing.assert_close(cached.float(), exact, rtol=2**-11, atol=1e-7)
    assert cut_activations(prefix, images, 10, 1e-4, torch.device("cpu")) is None  # over the budget
    huge = lambda rows: x[rows] * 1e6  # noqa: E731  (beyond float16's range: not cached, recomputed)
    assert cut_activations(prefix, huge, 10, 1.0, torch.device("cpu")) is None


def test_halving_drops_candidates_with_a_reason_and_keep_fraction_one_trains_all(pair):
    target, source, task = pair
    reports = {
        keep: _branch(
            clone(
                target,
                source,
                **task.clone_inputs(),
                config=SearchConfig(**QUICK, choose="loss", keep_fraction=keep),
                progress=False,
            )
        ).report
        for keep in (0.5, 1.0)
    }
    halved, full = reports[0.5].candidates, reports[1.0].candidates
    assert len(halved) == len(full) >= 2
    dropped = [c for c in halved if c["eliminated"]]
    assert len(dropped) == len(halved) - math.ceil(len(halved) / 2)
    assert all(c["stage"] == "search" and not c["accuracy"] and "selection loss" in c["eliminated"] for c in dropped)
    assert all(c["stage"] == "binary" and c["accuracy"] for c in halved if not c["eliminated"])
    assert all(c["stage"] == "binary" and not c["eliminated"] for c in full)
    profile = reports[0.5].profile
    assert {"local_models", "frozen_outputs", "search", "tune_branch"} <= set(profile)
    assert all(v >= 0 for v in profile.values())


def test_every_finished_candidate_is_freed_at_once(pair, monkeypatch):
    """A candidate's masked copy of the source's layers is a reference cycle (its forward
    hooks hold it): with the automatic collector off, none whose copies exceed
    RELEASE_BYTES (here: any) may outlive its stage, or the process grows by one copy per
    stage (resnet18: 80-140 MiB each)."""
    monkeypatch.setattr(cut_search, "RELEASE_BYTES", 0)
    target, source, task = pair
    gc.collect()
    gc.disable()
    try:
        clone(target, source, **task.clone_inputs(), config=SearchConfig(**QUICK), progress=False)
        alive = sum(type(o) is MaskedBody for o in gc.get_objects())
    finally:
        gc.enable()
    assert alive == 0


def test_a_spent_time_budget_keeps_the_best_candidate_of_the_first_stage(pair):
    target, source, task = pair
    config = SearchConfig(**QUICK, smaller_branch_within_se=False)  # the lowest loss wins
    net = clone(target, source, **task.clone_inputs(), config=config, time_budget=0.0, progress=False)
    report = _branch(net).report
    assert report.budget_stopped
    assert all(c["stage"] == "search" for c in report.candidates)
    best = min(report.candidates, key=lambda c: (c["loss"], c["holdout"]["ce"]))
    assert report.target_cut == best["target_cut"]
    x = task.eval_sets()["avg"].x[:32]
    with torch.no_grad(), net.disabled():
        assert torch.equal(net(x), target(x))


def _cli_clone(tiny_zoo, out, *flags: str) -> dict:
    """`pnc clone` of class 7 on the tiny zoo with a spent time budget; report.json's branch."""
    argv = ["clone", "--target", "t", "--source", "s", "--classes", "7", "--out", str(out)]
    assert main([*argv, "--zoo-dir", str(tiny_zoo), "--time-budget", "0.001", *flags]) == 0
    return json.loads((out / "report.json").read_text())["branches"][0]


def test_cli_time_budget_reports_an_early_stop(tiny_zoo, tmp_path, capsys):
    branch = _cli_clone(tiny_zoo, tmp_path / "run")
    printed = capsys.readouterr()
    assert "--time-budget spent" in printed.out
    assert branch["budget_stopped"] is True
    # progress bars on stderr: the first stage's, named with its stage, and the chosen branch's tuning
    assert f"R={branch['target_cut']} <- R'={branch['source_cut']} [search]" in printed.err
    assert f"tuning the branch at R={branch['target_cut']}" in printed.err


@pytest.mark.parametrize("flag", [["--choose", "loss"], ["--prefer-smaller-branch"]])
def test_cli_says_which_rule_chose_r(tiny_zoo, tmp_path, capsys, flag):
    branch = _cli_clone(tiny_zoo, tmp_path / "run", *flag)
    assert branch["settings"]["search"]["smaller_branch_within_se"] is (flag == ["--prefer-smaller-branch"])
    assert branch["settings"]["search"]["choose"] == "loss"  # what --prefer-smaller-branch implies
    rule = branch["chosen_because"]
    assert rule.startswith("lowest held-out") or "within one paired standard error" in rule
    assert f"chosen: {rule}" in capsys.readouterr().out
    cuts = [c["target_cut"] for c in branch["candidates"]]
    best = min(branch["candidates"], key=lambda c: (c["loss"], c["holdout"]["ce"]))
    if flag == ["--choose", "loss"]:
        assert branch["target_cut"] == best["target_cut"]
    else:  # the same cut, or a later one (listed first)
        assert cuts.index(branch["target_cut"]) <= cuts.index(best["target_cut"])


def test_cli_chooses_the_earliest_cut_alone_by_default_with_old_class_images(tiny_zoo, tmp_path, capsys):
    by_loss = _cli_clone(tiny_zoo, tmp_path / "loss", "--choose", "loss")
    for flags in ([], ["--choose", "earliest"]):
        branch = _cli_clone(tiny_zoo, tmp_path / f"run{len(flags)}", *flags)
        assert branch["settings"]["search"]["choose"] == "earliest"
        assert "earliest cut an adapter maps" in branch["chosen_because"]
        assert f"chosen: {branch['chosen_because']}" in capsys.readouterr().out
        # the one candidate trained: the earliest cut the loss rule trained (listed last)
        assert [c["target_cut"] for c in branch["candidates"]] == [by_loss["candidates"][-1]["target_cut"]]
        assert branch["target_cut"] == by_loss["candidates"][-1]["target_cut"]
    strict = _cli_clone(tiny_zoo, tmp_path / "strict", "--old-fraction", "0")  # no tuning: the loss rule
    assert strict["settings"]["search"]["choose"] == "loss" and len(strict["candidates"]) > 1
    argv = ["clone", "--target", "t", "--source", "s", "--classes", "7", "--zoo-dir", str(tiny_zoo)]
    for clash in (["--prefer-smaller-branch"], ["--tune-runners-up", "1"]):
        assert main([*argv, "--out", str(tmp_path / "bad"), "--choose", "earliest", *clash]) == 2
        assert "use choose='loss' (--choose loss)" in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()


def test_search_config_resolves_the_rule_from_the_tuning_and_keys_it_only_when_new():
    assert SearchConfig().resolved(tuned=True).choose == "earliest"
    assert SearchConfig().resolved(tuned=False).choose == "loss"
    assert SearchConfig(smaller_branch_within_se=True).resolved(tuned=True).choose == "loss"
    assert SearchConfig(tune_runners_up=1).resolved(tuned=True).choose == "loss"
    assert SearchConfig(choose="earliest").resolved(tuned=False).choose == "earliest"  # asked for: kept
    with pytest.raises(ConfigError, match="choose must be one of 'loss', 'earliest' or None, got 'best'"):
        SearchConfig(choose="best").resolved(tuned=True)
    with pytest.raises(ConfigError, match="compare candidates"):
        SearchConfig(choose="earliest", tune_runners_up=1).resolved(tuned=True)
    # the loss rule is the search rows were cached with before the rule existed: left out of the key
    assert "choose" not in json.loads(SearchConfig(choose="loss").key())
    assert json.loads(SearchConfig(choose="earliest").key())["choose"] == "earliest"


def test_cli_cache_mb_sets_the_activation_cache_and_refuses_a_negative_size(tiny_zoo, tmp_path, capsys):
    assert _cli_clone(tiny_zoo, tmp_path / "run", "--cache-mb", "0")["settings"]["search"]["cache_mb"] == 0.0
    with pytest.raises(SystemExit) as exit_info:
        _cli_clone(tiny_zoo, tmp_path / "bad", "--cache-mb", "-1")
    assert exit_info.value.code == 2 and "--cache-mb" in capsys.readouterr().err


def test_block_cuts_with_nothing_to_clone_are_listed_as_skipped(tiny_zoo, tmp_path):
    branch = _cli_clone(tiny_zoo, tmp_path / "run")
    tried = {c["target_cut"] for c in branch["candidates"]}
    empty = [line for line in branch["skipped"] if "nothing to clone" in line]
    assert empty, "cnn4's last block cut leaves only pooling in the source"
    assert all(line.split(" <- ")[0].removeprefix("R=") not in tried for line in empty)


def test_the_context_caches_each_activation_once_within_one_shared_budget():
    calls = []

    def prefix(x):
        calls.append(len(x))
        return x * 2.0

    x = torch.rand(64, 1, 16, 16)  # 32 KiB per cached copy in float16
    ctx = SimpleNamespace(_activations={}, cache_mb=80 / 1024, device=torch.device("cpu"))
    first = SearchContext.activations(ctx, "target:a:pool", prefix, x.__getitem__, 64)
    again = SearchContext.activations(ctx, "target:a:pool", prefix, x.__getitem__, 64)
    assert first is again and first.cached is not None and sum(calls) == 2 + 64  # a probe of 2, then once
    torch.testing.assert_close(first.cached.float(), x * 2.0, rtol=2**-11, atol=0.0)
    rows = torch.tensor([3, 0, 7])
    torch.testing.assert_close(first(rows), x[rows] * 2.0, rtol=2**-11, atol=0.0)  # read back as float32
    assert sum(calls) == 2 + 64  # from the cache
    # 32 KiB of the 80 are used: a second 32 KiB fits, a third does not (the budget is shared)
    assert SearchContext.activations(ctx, "target:b:pool", prefix, x.__getitem__, 64).cached is not None
    uncached = SearchContext.activations(ctx, "target:c:pool", prefix, x.__getitem__, 64)
    assert uncached.cached is None
    assert SearchContext.activations(ctx, "target:d:pool", prefix, x.__getitem__, 8).cached is not None
    calls.clear()
    torch.testing.assert_close(uncached(rows), x[rows] * 2.0)  # recomputed, exactly
    assert calls == [3]


def test_a_smaller_kept_share_replaces_the_chosen_one_only_where_the_held_out_images_see_no_loss(pair):
    target, source, task = pair
    base, tried = (
        _branch(clone(target, source, **task.clone_inputs(), config=SearchConfig(**QUICK, **extra), progress=False))
        for extra in ({}, {"smaller_mask_ratios": (0.4, 0.25, 0.75)})  # 0.75 is above mask_ratio: not tried
    )
    b, t = base.report, tried.report
    assert t.target_cut == b.target_cut  # R is chosen first, at mask_ratio
    base_loss, tried_loss = (next(c["loss"] for c in r.candidates if c["target_cut"] == r.target_cut) for r in (b, t))
    # on this pair 0.25 loses on the held-out images and 0.4 does not: smallest first, both paths taken
    why = t.chosen_because
    assert f"kept share 0.4 instead of 0.5 (held-out selection loss {tried_loss:.4f} <= {base_loss:.4f}; 0.25: " in why
    assert float(why.split("; 0.25: ")[1].split(" ")[0]) > base_loss and "0.75" not in why
    assert t.kept_fraction < b.kept_fraction and t.params_after < b.params_after  # the branch built is the 0.4 one


def test_settings_added_later_are_keyed_only_when_set():
    assert "smaller_mask_ratios" not in json.loads(SearchConfig().key())
    assert json.loads(SearchConfig(smaller_mask_ratios=(0.25,)).key())["smaller_mask_ratios"] == [0.25]


def test_cli_smaller_mask_ratios_are_tried_on_the_chosen_r_and_must_be_below_mask_ratio(tiny_zoo, tmp_path, capsys):
    argv = ["clone", "--target", "t", "--source", "s", "--classes", "7", "--zoo-dir", str(tiny_zoo)]
    assert main([*argv, "--out", str(tmp_path / "run"), "--smaller-mask-ratios", "0.25", "0.4"]) == 0
    branch = json.loads((tmp_path / "run" / "report.json").read_text())["branches"][0]
    assert branch["settings"]["search"]["smaller_mask_ratios"] == [0.25, 0.4]
    why = branch["chosen_because"]
    assert "kept share 0.25 instead of 0.5" in why or "; 0.25: " in why  # tried first, and said
    assert ("kept share" in why and branch["kept_fraction"] < 0.5) or "smaller kept shares lost" in why
    assert main([*argv, "--out", str(tmp_path / "bad"), "--smaller-mask-ratios", "0.5"]) == 2
    assert "each must be below --mask-ratio (0.5)" in capsys.readouterr().err


def test_given_held_out_images_choose_r_and_every_available_image_trains(pair):
    target, source, task = pair
    inputs = task.clone_inputs()
    test = task.eval_sets()["avg"]  # stands in for images no network saw (a test of the API, not a benchmark)
    config = SearchConfig(**QUICK)
    report = _branch(clone(target, source, **inputs, config=config, holdout=(test.x, test.y), progress=False)).report
    labels = inputs["labels"]
    assert report.images["old_train"] + report.images["clone_train"] == len(labels)  # none held out of training
    assert report.images["old_holdout"] + report.images["clone_holdout"] == len(test.y)
    assert all(c["holdout"]["images"] == len(test.y) for c in report.candidates)
    with pytest.raises(DataError, match=r"holdout has no image of class\(es\) \[5\]"):
        clone(target, source, **inputs, config=config, holdout=(test.x[test.y < 5], test.y[test.y < 5]), progress=False)
    with pytest.raises(TaskError, match="holdout labels must lie in 0..5"):
        clone(target, source, **inputs, config=config, holdout=(test.x, test.y + 1), progress=False)
    with pytest.raises(DataError, match=r"holdout images are \(1, 8, 7\), the training images \(1, 8, 8\)"):
        clone(target, source, **inputs, config=config, holdout=(test.x[..., :7], test.y), progress=False)


def test_contenders_are_the_chosen_one_then_the_next_best_finalists():
    chosen, near, far, dropped, early = (
        _result(c, loss, 1.0) for c, loss in [("a", 0.2), ("b", 0.3), ("c", 0.4), ("d", 0.1), ("e", 0.0)]
    )
    dropped.eliminated = "after stage 'search': ..."
    early.stage = "localize"  # stopped by a time budget one stage before the others
    for r in (chosen, near, far, dropped):
        r.stage = "binary"
    outcome = SearchOutcome(best=chosen, results=[far, dropped, near, early, chosen], skipped=[])
    assert outcome.contenders(0) == [chosen]
    assert outcome.contenders(1) == [chosen, near]
    assert outcome.contenders(5) == [chosen, near, far]


def test_tuned_runners_up_keep_the_best_held_out_accuracy_after_tuning(pair):
    target, source, task = pair
    inputs = task.clone_inputs()
    one = _branch(clone(target, source, **inputs, config=SearchConfig(**QUICK, choose="loss"), progress=False))
    two = _branch(clone(target, source, **inputs, config=SearchConfig(**QUICK, tune_runners_up=1), progress=False))
    report = two.report
    contenders = report.tuning["contenders"]
    finalists = sorted(
        (c for c in report.candidates if not c["eliminated"]), key=lambda c: (c["loss"], c["holdout"]["ce"])
    )
    assert list(contenders) == [one.report.target_cut, finalists[1]["target_cut"]]  # the search's choice first
    assert report.target_cut == max(contenders, key=lambda cut: (contenders[cut], cut == one.report.target_cut))
    assert two.target_cut == report.target_cut and f"R={report.target_cut} kept" in report.chosen_because
    kept = report.tuning["after" if report.tuning["kept"] else "before"]["acc"]
    assert kept == contenders[report.target_cut]
    if report.target_cut == one.report.target_cut:  # the same branch, tuned the same way
        assert all(torch.equal(v, one.state_dict()[k]) for k, v in two.state_dict().items())
    assert "contenders" not in one.report.tuning and "tune_runners_up" not in json.loads(SearchConfig().key())


def test_cli_tune_runners_up_tunes_the_next_best_finalist_too(tiny_zoo, tmp_path, capsys):
    branch = _cli_clone(tiny_zoo, tmp_path / "run", "--tune-runners-up", "1")
    assert branch["settings"]["search"]["tune_runners_up"] == 1
    contenders = branch["tuning"]["contenders"]
    assert len(contenders) == 2 and branch["target_cut"] in contenders
    assert contenders[branch["target_cut"]] == max(contenders.values())
    assert f"chosen: {branch['chosen_because']}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        _cli_clone(tiny_zoo, tmp_path / "bad", "--tune-runners-up", "-1")
    assert exit_info.value.code == 2 and "--tune-runners-up: must be in [0, 100]" in capsys.readouterr().err


def test_report_tuned_tests_every_finalist_built_and_tuned_and_changes_nothing_else(pair, monkeypatch):
    target, source, task = pair
    inputs = task.clone_inputs()
    config = SearchConfig(**QUICK, choose="loss")
    plain = _branch(clone(target, source, **inputs, config=config, progress=False))
    marked: list[bool] = []  # per tuning: was it marked reporting-only (left out of the peak memory)?
    real_tune = cloning.tune_branch

    def tune_branch(*args, **kwargs):
        marked.append(is_reporting())
        return real_tune(*args, **kwargs)

    monkeypatch.setattr(cloning, "tune_branch", tune_branch)
    net = clone(target, source, **inputs, config=config, progress=False, report_tuned=True)
    monkeypatch.undo()
    branch = _branch(net)
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in branch.state_dict().items())  # the same clone
    finalists = [c for c in branch.report.candidates if not c["eliminated"]]
    assert len(finalists) >= 2 and all(not c["tuned_accuracy"] for c in plain.report.candidates)
    for c in finalists:
        assert set(c["tuned_accuracy"]) == set(inputs["eval_sets"]) == {"ori", "tar", "avg"}
        assert all(0.0 <= a <= 1.0 for a in c["tuned_accuracy"].values())
    chosen = next(c for c in finalists if c["target_cut"] == branch.target_cut)
    with torch.no_grad():
        for name, (x, y) in inputs["eval_sets"].items():  # the chosen one's is the shipped clone's accuracy
            shipped = float((net(x).argmax(1) == y).float().mean())
            assert chosen["tuned_accuracy"][name] == pytest.approx(shipped, abs=1.5 / len(y))
    others = [c for c in finalists if c is not chosen]  # each tuned from its own search state, as the chosen one
    assert any(c["tuned_accuracy"] != c["accuracy"] for c in others)
    assert branch.report.profile["report_accuracy"] > plain.report.profile["report_accuracy"] > 0
    assert marked == [False] + [True] * len(others) and not is_reporting()  # the shipped one's tuning counts


def test_report_tuned_trains_the_other_cuts_after_the_earliest_one_for_the_report_only(pair, monkeypatch):
    target, source, task = pair
    inputs = task.clone_inputs()
    config = SearchConfig(**QUICK)  # the default rule with old-class images (tuned): the earliest cut
    plain = _branch(clone(target, source, **inputs, config=config, progress=False))
    assert plain.report.settings["search"]["choose"] == "earliest" and len(plain.report.candidates) == 1
    assert "report_candidates" not in plain.report.profile
    trained: list[tuple[int, bool]] = []  # per stage job: (candidate, marked reporting-only?)
    real_run_job = cut_search.run_job

    def run_job(ctx, config, job, *args):
        trained.append((job.index, is_reporting()))
        return real_run_job(ctx, config, job, *args)

    monkeypatch.setattr(cut_search, "run_job", run_job)
    net = clone(target, source, **inputs, config=config, progress=False, report_tuned=True)
    monkeypatch.undo()
    branch = _branch(net)
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in branch.state_dict().items())  # the same clone
    cuts = [c["target_cut"] for c in branch.report.candidates]
    assert len(cuts) >= 2 and branch.report.target_cut == plain.report.target_cut == cuts[-1]  # the earliest
    chosen = len(cuts) - 1
    for stage in range(2):  # per stage: the chosen one first, unmarked; then the others, reporting only
        jobs = trained[stage * len(cuts) : (stage + 1) * len(cuts)]
        assert jobs[0] == (chosen, False) and sorted(jobs[1:]) == [(i, True) for i in range(chosen)]
    assert all(c["tuned_accuracy"] and c["accuracy"] for c in branch.report.candidates)
    others = sum(c["seconds"] for c in branch.report.candidates if c["target_cut"] != branch.report.target_cut)
    assert branch.report.profile["report_candidates"] == pytest.approx(others) and others > 0
    assert f"the {chosen} other candidates trained for the report only" in branch.report.chosen_because


def test_report_tuned_reports_nothing_more_without_the_tuning(pair):
    target, source, task = pair
    inputs = task.clone_inputs()
    strict = inputs["labels"] >= 5  # no old-class image: no tuning, nothing tuned to report
    inputs = inputs | {"images": inputs["images"][strict], "labels": inputs["labels"][strict]}
    inputs.pop("holdout", None)
    net = clone(target, source, **inputs, config=SearchConfig(**QUICK), progress=False, report_tuned=True)
    assert all(not c["tuned_accuracy"] and c["accuracy"] for c in _branch(net).report.candidates)


def test_tuning_lengths_are_each_tried_from_the_same_start_and_the_best_held_out_one_kept(pair):
    target, source, task = pair
    inputs = task.clone_inputs()
    test = task.eval_sets()["avg"]  # stands in for validation images (a test of the API, not a benchmark)
    config = SearchConfig(**QUICK)
    tried = _branch(
        clone(
            target,
            source,
            **inputs,
            config=SearchConfig(**QUICK, tune_epochs_choices=(3, 2)),
            holdout=(test.x, test.y),
            progress=False,
        )
    )
    tuning = tried.report.tuning
    assert sorted(tuning["tried"]) == [1, 2, 3]  # tune_epochs and the choices
    best = tuning["epochs"]
    assert tuning["tried"][best] == max(tuning["tried"].values()) == tuning["after"]["acc"]
    assert all(acc < tuning["tried"][best] for e, acc in tuning["tried"].items() if e < best)  # ties: the shorter
    alone = _branch(
        clone(
            target,
            source,
            **inputs,
            config=SearchConfig(**QUICK | {"tune_epochs": best}),
            holdout=(test.x, test.y),
            progress=False,
        )
    )
    assert alone.report.tuning["after"] == tuning["after"]  # each length from the same start, the same seeded order
    assert all(torch.equal(v, alone.state_dict()[k]) for k, v in tried.state_dict().items())
    assert "tried" not in _branch(clone(target, source, **inputs, config=config, progress=False)).report.tuning
    assert json.loads(SearchConfig().key()).keys().isdisjoint({"tune_epochs_choices"})


def test_cli_tuning_lengths_need_models_trained_without_the_same_validation_rows(tiny_zoo, tmp_path, capsys):
    argv = ["clone", "--target", "t", "--source", "s", "--classes", "7", "--zoo-dir", str(tiny_zoo)]
    assert main([*argv, "--out", str(tmp_path / "run"), "--tune-epochs-choices", "16"]) == 2
    err = capsys.readouterr().err
    assert "neither network was trained on" in err and "pnc zoo train --validation F" in err
    assert not (tmp_path / "run").exists()  # refused before anything was written
