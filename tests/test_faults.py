"""Issue 12, item 5: faults. SIGKILL `pnc clone` and `pnc zoo train` at seeded random points and
rerun the same command: the result equals an uninterrupted run's, and after every kill each file
under its final name is complete (temp files only as ``.name.*.tmp``). NaN/Inf in images, weights
or losses stop training with one typed error, keeping the last good checkpoint.

With ``$PNC_FAULT_LOG`` set, each kill test appends a JSON line of its counts there
(benchmarks/robustness.py reads them)."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from pnc.bench.cli import main
from pnc.surgery.cloning import clone
from pnc.surgery.errors import TrainingError
from pnc.surgery.examples import tiny_pair
from pnc.surgery.insertion import SearchConfig
from pnc.surgery.patch import read_patch
from pnc.zoo.datasets import ImageData
from pnc.zoo.store import ZooStore
from pnc.zoo.train import STATE_FILE, fit

TEMP = re.compile(r"^\..+\..+\.tmp$")


# --- helpers ---------------------------------------------------------------------------------


def _scan(root: Path) -> int:
    """Assert every file under ``root`` is complete under its final name; return the temp files."""
    temps = 0
    for path in sorted(root.rglob("*")):
        if path.is_dir():
            continue
        if TEMP.match(path.name):
            temps += 1
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            load_file(path)
        elif path.suffix == ".pnc":
            read_patch(path)
        else:
            raise AssertionError(f"unexpected file {path}")
    return temps


def _touched_since(root: Path, t0: float) -> bool:
    """True once this attempt wrote something under ``root`` (its work has started)."""
    return root.exists() and any(p.stat().st_mtime >= t0 for p in root.rglob("*") if p.is_file())


def _kill_and_resume(
    argv: list[str], root: Path, seed: int, kills: int, window: float, done: Callable[[str], bool] = lambda err: False
) -> dict:
    """Run ``pnc argv`` in a subprocess and SIGKILL it a seeded random time (0..``window`` s)
    after it first writes under ``root``, until ``kills`` kills landed (scanning ``root`` after
    each), then rerun it to the end; an attempt that ends on its own ends the loop. ``done(stderr)``
    accepts a refusal that says the work is already complete. Returns the counts."""
    rng = random.Random(seed)
    cmd = [sys.executable, "-c", "import sys; from pnc.bench.cli import main; sys.exit(main(sys.argv[1:]))", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    landed = attempts = temps = 0
    while landed < kills and attempts < 3 * kills:
        attempts += 1
        delay = rng.uniform(0.0, window)
        t0 = time.time() - 0.01
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while proc.poll() is None and not _touched_since(root, t0):
            time.sleep(0.01)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            landed += 1
        _, err = proc.communicate()
        assert b"Traceback" not in err, err.decode()
        assert proc.returncode in (0, -signal.SIGKILL) or done(err.decode()), err.decode()
        temps += _scan(root)
        if proc.returncode != -signal.SIGKILL:
            return {"kills": landed, "attempts": attempts, "temp_files_seen": temps}
    final = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0 or done(final.stderr), final.stderr
    assert "Traceback" not in final.stderr
    _scan(root)
    return {"kills": landed, "attempts": attempts + 1, "temp_files_seen": temps}


def _log(record: dict) -> None:
    if os.environ.get("PNC_FAULT_LOG"):
        with open(os.environ["PNC_FAULT_LOG"], "a") as fh:
            fh.write(json.dumps(record) + "\n")


def _same_patch(a: Path, b: Path) -> bool:
    """Same tensors and metadata except the timing fields (``seconds`` of the branch report and
    of each candidate: they differ between two uninterrupted runs too)."""
    (meta_a, ta), (meta_b, tb) = read_patch(a), read_patch(b)
    for meta in (meta_a, meta_b):
        for branch in meta["branches"]:
            report = branch["report"]
            for timing in ("seconds", "profile"):
                report.pop(timing)
            report["tuning"].pop("seconds", None)
            for candidate in report["candidates"]:
                candidate.pop("seconds")
                candidate.pop("phase_seconds")
    return meta_a == meta_b and ta.keys() == tb.keys() and all(ta[k].equal(tb[k]) for k in ta)


# --- SIGKILL then resume ----------------------------------------------------------------------


def test_clone_killed_at_random_points_resumes_to_the_same_patch(tiny_zoo, tiny_run, tmp_path):
    out = tmp_path / "run"
    argv = ["clone", "--target", "t", "--source", "s", "--classes", "7", "--out", str(out), "--zoo-dir", str(tiny_zoo)]
    counts = _kill_and_resume(argv, out, seed=12, kills=3, window=2.0)
    assert counts["kills"] >= 2, counts
    assert _same_patch(out / "clone.pnc", tiny_run / "clone.pnc")
    report = json.loads((out / "report.json").read_text())
    reference = json.loads((tiny_run / "report.json").read_text())
    assert report["avg_acc"] == reference["avg_acc"] and report["target_cut"] == reference["target_cut"]
    _log(
        {"command": "pnc clone", **counts, "resumed_equal": True, "compared": "tensors + metadata except timing fields"}
    )


def test_zoo_train_killed_at_random_points_resumes_to_the_same_weights(tmp_path):
    zoo, ref = tmp_path / "zoo", tmp_path / "ref"
    argv = ["zoo", "train", "--arch", "cnn4", "--dataset", "digits", "--classes", "0-4", "--name", "k"]
    argv += ["--epochs", "60", "--seed", "3"]
    assert main([*argv, "--zoo-dir", str(ref)]) == 0
    finished = lambda err: "already exists" in err and ZooStore(zoo).verify("k")  # noqa: E731
    counts = _kill_and_resume([*argv, "--zoo-dir", str(zoo)], zoo, seed=5, kills=3, window=1.0, done=finished)
    assert counts["kills"] >= 2, counts
    weights = (zoo / "k" / "model.safetensors").read_bytes()
    assert weights == (ref / "k" / "model.safetensors").read_bytes()
    assert ZooStore(zoo).verify("k")
    _log({"command": "pnc zoo train", **counts, "resumed_equal": True, "compared": "model.safetensors bytes"})


# --- NaN / Inf ----------------------------------------------------------------------------------


def _data(n: int = 48, seed: int = 0) -> ImageData:
    gen = torch.Generator().manual_seed(seed)
    return ImageData(torch.randn(n, 1, 4, 4, generator=gen), torch.randint(0, 3, (n,), generator=gen))


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_fit_refuses_non_finite_images_before_any_work(tmp_path, value):
    data = _data()
    data.x[5, 0, 1, 2] = value
    with pytest.raises(TrainingError, match=r"1 of 48 images hold NaN or Inf values \(the first is image 5\)"):
        fit(_model(), data, epochs=2, lr=0.1, seed=0, batch_size=16, checkpoint=tmp_path / "ck", progress=False)
    assert not (tmp_path / "ck").exists()


def test_fit_nan_loss_stops_and_keeps_the_last_finite_epoch(tmp_path):
    """A loss that turns NaN in epoch 2: TrainingError naming it; the checkpoint on disk is epoch
    1's, and rerunning with a finite loss resumes there and ends as an uninterrupted run."""
    data, ck = _data(), tmp_path / "ck"
    steps_per_epoch = len(data) // 16
    calls = {"n": 0}
    epoch_one: dict[str, Tensor] = {}
    model = _model()

    def poisoned(m: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        calls["n"] += 1
        loss = nn.functional.cross_entropy(m(x), y)
        return loss * float("nan") if calls["n"] == steps_per_epoch + 2 else loss

    def snapshot(epoch: int, _loss: float) -> None:
        if epoch == 1:
            epoch_one.update({k: v.clone() for k, v in model.state_dict().items()})

    kwargs = {"epochs": 3, "lr": 0.1, "seed": 0, "batch_size": 16, "checkpoint": ck, "progress": False}
    with pytest.raises(TrainingError, match=r"loss became nan at epoch 2, step 2.*checkpoint of epoch 1"):
        fit(model, data, loss_fn=poisoned, on_epoch_end=snapshot, **kwargs)
    state = json.loads((ck / STATE_FILE).read_text())
    assert state["epoch"] == 1
    saved = load_file(ck / state["weights"])
    assert all(saved[f"model/{k}"].equal(v) for k, v in epoch_one.items())
    resumed = fit(_model(seed=9), data, **kwargs)  # other init: the checkpoint must overwrite it
    plain = fit(_model(), data, **{**kwargs, "checkpoint": None})
    assert all(a.equal(b) for a, b in zip(resumed.state_dict().values(), plain.state_dict().values()))


def test_fit_inf_loss_in_epoch_1_saves_nothing(tmp_path):
    def inf_loss(m: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return nn.functional.cross_entropy(m(x), y) + float("inf")

    with pytest.raises(TrainingError, match=r"loss became inf at epoch 1, step 1.*nothing was saved"):
        fit(_model(), _data(), epochs=2, lr=0.1, seed=0, batch_size=16, checkpoint=tmp_path / "ck", loss_fn=inf_loss)
    assert not (tmp_path / "ck" / STATE_FILE).exists()


def test_clone_refuses_non_finite_images_and_weights(tmp_path):
    target, source, images, labels = tiny_pair()
    config = SearchConfig(loc_epochs=1, joint_epochs=1, binary_epochs=1, min_steps_per_epoch=2)
    bad = images.clone()
    bad[3, 0, 0, 0] = float("nan")
    with pytest.raises(TrainingError, match=r"clone: 1 of 16 images hold NaN or Inf values \(the first is image 3\)"):
        clone(target, source, bad, labels, [1], config=config, checkpoint_dir=tmp_path / "ck", progress=False)
    with torch.no_grad():
        next(source.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(TrainingError, match=r"the source: its weights hold NaN or Inf values"):
        clone(target, source, images, labels, [1], config=config, checkpoint_dir=tmp_path / "ck", progress=False)
    assert not (tmp_path / "ck").exists()


def test_candidate_training_stops_on_a_non_finite_loss(tmp_path):
    """A diverging search (absurd learning rate): the loss check names the candidate and phase;
    no checkpoint of the failed stage is written (stages finished before it are kept)."""
    target, source, images, labels = tiny_pair()
    config = SearchConfig(loc_epochs=1, joint_epochs=1, binary_epochs=1, min_steps_per_epoch=2, lr=1e30)
    with pytest.raises(
        TrainingError, match=r"candidate R=(\S+) <- R'=\S+: the (\w+) loss became nan at epoch 1"
    ) as err:
        clone(target, source, images, labels, [1], config=config, num_masks=8, checkpoint_dir=tmp_path / "ck",
              progress=False)  # fmt: skip
    cut, phase = re.search(r"R=(\S+) <- R'=\S+: the (\w+) loss", str(err.value)).groups()
    stage = "binary" if phase == "binary" else "search"
    assert not list(tmp_path.rglob(f"candidate-*-{cut}-{stage}.safetensors"))


def test_cli_clone_with_nan_weights_is_one_line_exit_2(tiny_zoo, tmp_path, capsys):
    zoo = Path(shutil.copytree(tiny_zoo, tmp_path / "zoo"))
    store = ZooStore(zoo)
    model, card = store.load("t")
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    store.save("t", model, card)
    out = tmp_path / "run"
    code = main(["clone", "--target", "t", "--source", "s", "--classes", "7", "--out", str(out), "--zoo-dir", str(zoo)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("pnc clone: error: zoo model 't'")
    assert "NaN or Inf" in err and not out.exists()
