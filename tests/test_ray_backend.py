"""The Ray backend (``pnc.bench.ray_backend``) on a local Ray started here (2 CPUs): the same R
and patch as in process, a worker killed mid-trial retried, a trial that keeps failing named,
``pnc clone --backend ray``, benchmark cells as Ray tasks, and the install line without Ray.

Faults are injected through Ray's per-worker setup hook: every worker of this Ray wraps
``CandidateTrainer.run_stage`` so that, once the test creates FAULTS/kill-next, the next stage
to start in any worker exits its process, as a killed worker would (the file is renamed to
kill-next-fired first, so exactly one worker dies per arming).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import ray
import torch
from ray import cloudpickle

from pnc.bench.cli import main
from pnc.bench.paper import QUICK_BUDGET, RowCache, TableSpec, run_table
from pnc.bench.ray_backend import RayBackend
from pnc.surgery.cloning import clone
from pnc.surgery.errors import BackendError
from pnc.surgery.insertion import SearchConfig
from pnc.surgery.patch import read_patch
from pnc.zoo.datasets import load_dataset
from pnc.zoo.store import ZooStore
from pnc.zoo.tasks import CloneTask

# one xdist worker runs this whole module (`make test` uses --dist loadgroup): one local Ray at a time
pytestmark = pytest.mark.xdist_group("ray")

QUICK = dict(loc_epochs=1, joint_epochs=1, binary_epochs=2, min_steps_per_epoch=10)


def _fault_hook() -> None:
    """Run by every Ray worker as it starts (see the module docstring)."""
    import os

    from pnc.surgery import insertion

    real = insertion.CandidateTrainer.run_stage

    def run_stage(self, stage, tick=lambda: None):
        arm = os.path.join(os.environ["PNC_TEST_FAULTS"], "kill-next")
        try:
            os.rename(arm, arm + "-fired")  # atomic: one worker takes it
        except FileNotFoundError:
            return real(self, stage, tick)
        os._exit(1)

    insertion.CandidateTrainer.run_stage = run_stage


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    """A local Ray with 2 CPUs whose workers run :func:`_fault_hook`; yields the FAULTS folder."""
    folder = tmp_path_factory.mktemp("faults")
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the hook is shipped by value
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"worker_process_setup_hook": _fault_hook, "env_vars": {"PNC_TEST_FAULTS": str(folder)}},
    )
    yield folder
    ray.shutdown()
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def pair(tiny_zoo):
    """The tiny digits zoo's target t (0-4) and source s (5-9), and the inputs of cloning 7."""
    store = ZooStore(tiny_zoo)
    (target, t_card), (source, s_card) = store.load("t"), store.load("s")
    task = CloneTask(load_dataset("digits"), t_card.classes, s_card.classes, clone_classes=[7], fraction=0.3, seed=0)
    return target, source, task.clone_inputs()


def test_a_trial_that_keeps_failing_is_named_and_the_finished_one_kept(faults, pair, tmp_path):
    target, source, inputs = pair
    (faults / "kill-next").touch()
    config = SearchConfig(seed=0, candidates=["last", "first"], choose="loss", **QUICK)
    with pytest.raises(BackendError) as failed:
        clone(
            target,
            source,
            **inputs,
            config=config,
            progress=False,
            checkpoint_dir=tmp_path,
            backend=RayBackend(max_failures=0),
        )
    assert (faults / "kill-next-fired").exists()
    (faults / "kill-next-fired").unlink()
    kept = list(tmp_path.glob("candidate-*-search.safetensors"))  # candidate-<i>-<R>-<stage>
    assert len(kept) == 1, kept
    message = str(failed.value)
    named = re.findall(r"R=(\S+) <- R'=\S+ \(stage 'search'\)", message)
    assert len(named) == 1 and named[0] != kept[0].name.split("-")[2], message
    assert "failed after 1 attempt" in message


def test_pnc_clone_backend_ray_picks_the_in_process_r_and_patch_though_a_worker_dies(
    faults, tiny_zoo, tiny_run, tmp_path, capsys
):
    """`pnc clone --backend ray` on the digits pair, one worker killed mid-trial: the trial is
    retried (the search could not end otherwise) and R and the patch are the in-process run's."""
    (faults / "kill-next").touch()
    out = tmp_path / "run"
    argv = ["clone", "--target", "t", "--source", "s", "--classes", "7", "--out", str(out)]
    assert main([*argv, "--zoo-dir", str(tiny_zoo), "--backend", "ray", "--json"]) == 0
    assert (faults / "kill-next-fired").exists()
    (faults / "kill-next-fired").unlink()
    report = json.loads(capsys.readouterr().out)  # stdout holds only the report: Tune's banner goes to stderr
    reference = json.loads((tiny_run / "report.json").read_text())
    assert (report["target_cut"], report["source_cut"]) == (reference["target_cut"], reference["source_cut"])
    ours, theirs = (r["branches"][0]["candidates"] for r in (reference, report))
    assert [c["target_cut"] for c in theirs] == [c["target_cut"] for c in ours]
    assert [bool(c["eliminated"]) for c in theirs] == [bool(c["eliminated"]) for c in ours]
    assert [c["loss"] for c in theirs] == pytest.approx([c["loss"] for c in ours], abs=1e-6)
    (_, mine), (_, yours) = read_patch(tiny_run / "clone.pnc"), read_patch(out / "clone.pnc")
    assert mine.keys() == yours.keys()
    for key in mine:
        torch.testing.assert_close(yours[key], mine[key], rtol=1e-5, atol=1e-6, msg=key)


def test_benchmark_cells_as_ray_tasks_give_the_in_process_rows(faults, tiny_zoo, tmp_path):
    spec = TableSpec(
        stem="cells",
        title="",
        target="t",
        source="s",
        scales=["S"],
        seeds=[0, 1],
        methods=["Pre-trained", "Direct Ensemble"],
        budget=QUICK_BUDGET,
    )
    store, splits = ZooStore(tiny_zoo), load_dataset("digits")
    here = run_table(spec, store, splits, RowCache(tmp_path / "here.json"), tmp_path / "w1", log=lambda line: None)
    lines: list[str] = []
    cache = RowCache(tmp_path / "ray.json")
    there = run_table(spec, store, splits, cache, tmp_path / "w2", log=lines.append, backend="ray")
    assert len(lines) == 4 and all(line.endswith("(done)") for line in lines)
    assert len(RowCache(tmp_path / "ray.json").rows) == 4  # each cached as it returned
    same = ("method", "scale", "seed", "clone_classes", "ori", "tar", "avg", "per_class", "macs", "params")
    assert [{k: r[k] for k in same} for r in there] == [{k: r[k] for k in same} for r in here]
    again: list[str] = []
    run_table(spec, store, splits, cache, tmp_path / "w2", log=again.append, backend="ray")
    assert all(line.endswith("(cached)") for line in again)


def test_backend_ray_without_ray_says_how_to_install_it(tiny_zoo, tmp_path):
    """Ray made unimportable (sys.modules["ray"] = None): `pnc clone` and `pnc bench paper` with
    --backend ray each print one error line naming the install command, exit 2, write nothing."""
    out, zoo = str(tmp_path / "out"), ["--zoo-dir", str(tiny_zoo), "--backend", "ray"]
    commands = [
        ["clone", "--target", "t", "--source", "s", "--classes", "7", "--out", out, *zoo],
        ["bench", "paper", "--quick", "--out", out, *zoo],
    ]
    code = (
        "import json, sys; sys.modules['ray'] = None; from pnc.bench.cli import main; "
        "print(json.dumps([main(argv) for argv in json.loads(sys.argv[1])]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(commands)], capture_output=True, text=True, timeout=300
    )
    assert json.loads(done.stdout) == [2, 2], done.stderr
    lines = done.stderr.strip().splitlines()
    assert [line.split(": error: ")[0] for line in lines] == ["pnc clone", "pnc bench paper"], done.stderr
    assert all("pip install 'pnc[ray]'" in line for line in lines)
    assert not (tmp_path / "out").exists()
