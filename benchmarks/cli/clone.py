"""``pnc clone``, ``pnc eval`` and ``pnc demo``: cloning between zoo models from the shell.

pnc clone --target fmnist-lenet5-target --source fmnist-lenet5-source --classes S --out runs/x
pnc eval runs/x/clone.pnc
pnc demo                      # the embedded default, end to end
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from pnc.bench.metrics import clone_accuracy, logits_of
from pnc.surgery.cloned import ClonedNetwork
from pnc.surgery.cloning import clone
from pnc.surgery.cut_search import Backend
from pnc.surgery.devices import DeviceLike, device_of
from pnc.surgery.errors import OutputError, PatchError, PncError, TaskError
from pnc.surgery.insertion import CHOOSE_RULES, SearchConfig
from pnc.surgery.io import atomic_write_text, file_sha256
from pnc.surgery.onnx_detach import detach_onnx
from pnc.surgery.onnx_export import export_onnx
from pnc.surgery.patch import save_patch
from pnc.zoo.datasets import DatasetSplits, load_dataset
from pnc.zoo.images import ImageSet, iter_batches, join
from pnc.zoo.store import WEIGHTS_FILE, ModelCard, ZooStore
from pnc.zoo.tasks import CloneTask

from .common import (
    add_backend,
    add_data_dir,
    add_device,
    add_force,
    add_old_fraction,
    add_zoo_dir,
    check_backend,
    check_input_file,
    check_output_dir,
    in_range,
    positive,
    seed_number,
    share,
)
from .zoo import writable_zoo


def eval_set(tasks: list[CloneTask]) -> ImageSet:
    """Test images of T_t and of every branch's T_s, labelled by the multi-branch clone's outputs
    (undecoded files for an image folder)."""
    data = tasks[0].eval_sets()["ori"]
    offset = 0
    for task in tasks:
        tar = task.eval_sets()["tar"]
        data = join(data, dataclasses.replace(tar, y=tar.y + offset))
        offset += len(task.clone_classes)
    return data


@torch.no_grad()
def compare(
    net: ClonedNetwork, target: nn.Module, sources: list[tuple[nn.Module, list[int]]], tasks: list[CloneTask]
) -> dict[str, dict[str, float]]:
    """Ori/Tar/Avg of the target alone, the clone and the direct ensemble on the same images
    (each model run on its device), each image decoded once (one pass over the test set,
    batch by batch)."""
    data = eval_set(tasks)
    n_old, n_all = len(tasks[0].target_classes), len(net.classes)
    parts: dict[str, list[Tensor]] = {"target": [], "clone": [], "ensemble": []}
    for x, _ in iter_batches(data):
        target_logits = logits_of(target, x)
        parts["target"].append(
            torch.cat([target_logits, target_logits.new_full((len(x), n_all - n_old), -torch.inf)], 1)
        )
        parts["ensemble"].append(
            torch.cat([target_logits] + [logits_of(s, x)[:, idx].to(target_logits.device) for s, idx in sources], 1)
        )
        parts["clone"].append(logits_of(net, x))
    return {k: clone_accuracy(torch.cat(v), data.y, n_old) for k, v in parts.items()}


@dataclass
class ClonePlan:
    """A validated ``pnc clone`` request: every model (on the device to clone on), card, dataset
    and task loaded and checked, nothing written yet. ``run`` identifies it (a rerun with the
    same ``run`` resumes, on any device)."""

    target_name: str
    target: nn.Module
    t_card: ModelCard
    dataset: DatasetSplits
    sources: list[tuple[str, nn.Module, CloneTask]]
    run: dict


def plan_clone(
    store: ZooStore,
    target_name: str,
    sources: list[tuple[str, str]],
    *,
    seed: int = 0,
    data_dir: str | None = None,
    fraction: float = 0.3,
    old_fraction: float = 0.3,
    config: SearchConfig | None = None,
    device: DeviceLike | None = None,
) -> ClonePlan:
    """Load and check everything a clone needs (TaskError/StoreError/DataError), writing nothing;
    the models are loaded onto ``device`` (default: torch's default device), where
    :func:`pnc.surgery.clone` then runs.

    Every dataset class is cloned at most once over all (source, class spec) pairs: the same
    class from two branches would make two outputs for one class."""
    if not sources:
        raise TaskError("give at least one --source NAME --classes SPEC pair")
    target, t_card = store.load(target_name, device)
    dataset = load_dataset(t_card.dataset, data_dir, image_size=t_card.input_size[-1])
    planned: list[tuple[str, nn.Module, CloneTask]] = []
    cloned_by: dict[int, str] = {}
    for source_name, spec in sources:
        source, s_card = store.load(source_name, device)
        if s_card.dataset != t_card.dataset:
            raise TaskError(
                f"target {target_name!r} is on {t_card.dataset} but source {source_name!r} on "
                f"{s_card.dataset}; clone between models of the same dataset"
            )
        task = CloneTask.for_cards(
            dataset,
            t_card,
            s_card,
            spec if spec in ("S", "M") else _class_spec(spec, dataset.classes),
            fraction=fraction,
            seed=seed,
            old_fraction=old_fraction,
        )
        pair = f"--source {source_name} --classes {spec}"
        for c in task.clone_classes:
            if c in cloned_by:
                raise TaskError(
                    f"class {dataset.classes[c]!r} (id {c}) would be cloned twice: by "
                    f"`{cloned_by[c]}` and by `{pair}`; clone each class once (drop the repeated "
                    "pair, or give disjoint class specs)"
                )
            cloned_by[c] = pair
        planned.append((source_name, source, task))
    run = {
        "target": [target_name, t_card.sha256],
        "sources": [[n, spec, store.card(n).sha256] for n, spec in sources],
        "seed": seed,
        "fraction": fraction,
        "old_fraction": old_fraction,
        "config": (config or SearchConfig(seed=seed)).key(),
    }
    return ClonePlan(target_name, target, t_card, dataset, planned, run)


RUN_FILE, ELAPSED_FILE = "run.json", "elapsed.json"


def _recorded_run(out: Path) -> dict | None:
    """The run a clone folder was made by (DIR/.ckpt/run.json, else report.json's "run")."""
    for path, key in ((out / ".ckpt" / RUN_FILE, None), (out / "report.json", "run")):
        try:
            doc = json.loads(path.read_text())
            return doc if key is None else doc[key]
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def check_clone_out(out: Path, run: dict, force: bool) -> bool:
    """OutputError unless ``out`` can take this run's results: a creatable writable folder that
    holds no clone (or an interrupted clone) of another run, unless ``force``. Returns whether
    the previous contents are to be replaced (``force`` over another run)."""
    check_output_dir(out, "--out")
    for name in ("clone.pnc", "report.json", ".ckpt"):
        if (out / name).exists() and (name == ".ckpt") != (out / name).is_dir():
            raise OutputError(
                f"--out {out}: {out / name} is in the way (wrong kind of file); remove it or choose another --out"
            )
    recorded = _recorded_run(out)
    if recorded == run or not ((out / "clone.pnc").exists() or recorded is not None):
        return False
    if force:
        return True
    what = (
        "a clone.pnc of unknown origin"
        if recorded is None
        else f"a clone of another run ({', '.join(k for k in run if recorded.get(k) != run[k]) or 'settings'} differ)"
    )
    raise OutputError(
        f"--out {out} already holds {what}; pass --force to replace it, or choose another --out "
        "(rerunning the same command resumes or repeats that run)"
    )


def precheck_clone_out(out: Path, target: str, sources: list[tuple[str, str]], seed: int, force: bool) -> None:
    """:func:`check_clone_out` by names only, for when the models may not be trained yet
    (``pnc demo``): refuse early a folder holding a clone of other models, classes or seed."""
    check_output_dir(out, "--out")
    recorded = _recorded_run(out)
    if force or not ((out / "clone.pnc").exists() or recorded is not None):
        return
    same = (
        recorded is not None
        and recorded.get("target", [None])[0] == target
        and recorded.get("seed") == seed
        and [list(s[:2]) for s in recorded.get("sources", [])] == [list(s) for s in sources]
    )
    if not same:
        raise OutputError(
            f"--out {out} already holds a clone of another run; pass --force to replace it, or choose another --out"
        )


class _Stopwatch:
    """Seconds spent on a run over all its attempts, kept in DIR/.ckpt/elapsed.json (written every
    few seconds and at the end, so a killed attempt still counts up to its last beat)."""

    def __init__(self, folder: Path, resume: bool, beat: float = 5.0) -> None:
        self.path, self.beat = folder / ELAPSED_FILE, beat
        self.before = self._previous() if resume else 0.0
        self.start = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _previous(self) -> float:
        try:
            doc = json.loads(self.path.read_text())
            return 0.0 if doc.get("finished") else max(0.0, float(doc["seconds"]))
        except (OSError, ValueError, KeyError, TypeError):
            return 0.0

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.start

    def save(self, finished: bool = False) -> None:
        atomic_write_text(self.path, json.dumps({"seconds": round(self.seconds(), 3), "finished": finished}))

    def _loop(self) -> None:
        while not self._stop.wait(self.beat):
            try:
                self.save()
            except OSError:
                return

    def __enter__(self) -> _Stopwatch:
        self.save()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if exc[0] is not None:
            self.save()


def run_clone(
    store: ZooStore,
    target_name: str,
    sources: list[tuple[str, str]],
    out: Path,
    *,
    seed: int = 0,
    data_dir: str | None = None,
    fraction: float = 0.3,
    old_fraction: float = 0.3,
    config: SearchConfig | None = None,
    progress: bool = True,
    force: bool = False,
    plan: ClonePlan | None = None,
    time_budget: float | None = None,
    device: DeviceLike | None = None,
    backend: Backend | None = None,
) -> tuple[ClonedNetwork, dict]:
    """Clone each (source name, class spec) into the target; write DIR/clone.pnc and DIR/report.json.

    ``fraction`` / ``old_fraction``: shares of the clone classes' / the target classes'
    training images available while cloning. report.json's ``images`` counts the images
    of each kind the (first) branch trained and selected R on. ``backend`` runs the
    candidates' stages (default: in this process); it is not part of the run's identity:
    both backends give the same clone, so a run may resume on either.

    The clone runs on ``device`` (``plan``'s models' device when a plan is given); report.json
    records it. Returns (the cloned network, the report). Everything is checked before anything is
    written (:func:`plan_clone`, :func:`check_clone_out`); an interrupted run resumes from the
    checkpoints in DIR/.ckpt, and report.json's ``seconds`` counts every attempt.
    ``time_budget``: seconds for the searches of all sources together; once spent, no new
    search stage starts and each branch keeps its best candidate so far (``budget_stopped``)."""
    config = config or SearchConfig(seed=seed)
    plan = plan or plan_clone(
        store,
        target_name,
        sources,
        seed=seed,
        data_dir=data_dir,
        fraction=fraction,
        old_fraction=old_fraction,
        config=config,
        device=device,
    )
    out = Path(out)
    replace = check_clone_out(out, plan.run, force)
    if replace:
        shutil.rmtree(out / ".ckpt", ignore_errors=True)
    resume = _recorded_run(out) == plan.run
    atomic_write_text(out / ".ckpt" / RUN_FILE, json.dumps(plan.run, indent=2))
    with _Stopwatch(out / ".ckpt", resume) as watch:
        net, report = _execute(plan, store, out, config, progress, time_budget, backend)
        report["seconds"] = round(watch.seconds(), 2)
        atomic_write_text(out / "report.json", json.dumps(report, indent=2))
        watch.save(finished=True)
    return net, report


def _execute(
    plan: ClonePlan,
    store: ZooStore,
    out: Path,
    config: SearchConfig,
    progress: bool,
    time_budget: float | None,
    backend: Backend | None,
) -> tuple[ClonedNetwork, dict]:
    """The clone itself (after every check): branches, clone.pnc, and the report (without seconds)."""
    net, tasks, models, branches = None, [], [], []
    began = time.perf_counter()
    for k, (source_name, source, task) in enumerate(plan.sources):
        left = None if time_budget is None else max(0.0, time_budget - (time.perf_counter() - began))
        name = source_name if source_name not in (b["name"] for b in branches) else f"{source_name}-{k}"
        net = clone(
            plan.target,
            source,
            **task.clone_inputs(),
            config=config,
            into=net,
            name=name,
            source_name=source_name,
            checkpoint_dir=out / ".ckpt" / name,
            cache_dir=out / ".cache",
            progress=progress,
            time_budget=left,
            backend=backend,
        )
        rep = net.branches[name].report
        branches.append({"name": name, "source": source_name, "classes": net.branches[name].classes, **asdict(rep)})
        tasks.append(task)
        models.append((source, task.source_label_index()))
    assert net is not None  # plan_clone refuses an empty source list
    patch_bytes = save_patch(
        net,
        out / "clone.pnc",
        target_name=plan.target_name,
        input_size=plan.t_card.input_size,
        tasks={b["name"]: t.to_dict() for b, t in zip(branches, tasks)},
    )
    acc = compare(net, plan.target, models, tasks)
    report = {
        "target": plan.target_name,
        "ori_acc": acc["clone"]["ori"],
        "tar_acc": acc["clone"]["tar"],
        "avg_acc": acc["clone"]["avg"],
        "target_acc": acc["target"],
        "ensemble_acc": acc["ensemble"],
        "target_cut": branches[0]["target_cut"],
        "source_cut": branches[0]["source_cut"],
        "fraction": plan.run["fraction"],
        "old_fraction": plan.run["old_fraction"],
        "validation": tasks[0].validation,
        "images": branches[0]["images"],
        "patch_bytes": patch_bytes,
        "source_bytes": sum(os.path.getsize(store.path(s) / WEIGHTS_FILE) for s, _, _ in plan.sources),
        "seconds": None,
        "device": str(device_of(plan.target)),
        "branches": branches,
        "run": plan.run,
    }
    return net, report


def _class_spec(spec: str, names: list[str]) -> list[int]:
    from pnc.zoo.tasks import parse_classes

    return parse_classes(spec, names)


def patch_path(path: str | Path) -> Path:
    """The patch file a user named: a .pnc file, or the ``pnc clone --out`` folder holding clone.pnc."""
    path = Path(path).expanduser()
    if path.is_dir():
        if (path / "clone.pnc").is_file():
            return path / "clone.pnc"
        raise PatchError(
            f"{path} is a folder without a clone.pnc; give the patch file, e.g. the "
            "DIR/clone.pnc that `pnc clone --out DIR` wrote"
        )
    return check_input_file(path, "a .pnc patch", "make one with `pnc clone ... --out DIR`", PatchError)


def _branch_task(branch: dict, t_card: ModelCard, s_card: ModelCard, dataset: DatasetSplits) -> CloneTask:
    """The clone task a patch records for a branch; for a patch saved without ``tasks=``, the one
    its zoo cards imply (target and source classes from the cards, the cloned classes from the
    branch's source outputs): enough to evaluate, since evaluation uses test images only."""
    if branch.get("task") is not None:
        return CloneTask.from_json(branch["task"], dataset=dataset)
    try:
        clone_classes = [s_card.classes[i] for i in branch["source_outputs"]]
    except (IndexError, TypeError) as err:
        raise PatchError(
            f"branch {branch['name']!r} records no clone task and its source outputs "
            f"{branch.get('source_outputs')} do not fit source {s_card.name!r} ({err}); save "
            "the patch with save_patch(..., tasks={name: task.to_dict()})"
        ) from None
    return CloneTask(dataset, t_card.classes, s_card.classes, clone_classes)


def evaluate_patch(path: Path, store: ZooStore, data_dir: str | None = None, device: DeviceLike | None = None) -> dict:
    """Rebuild a patch's clone from the zoo on ``device`` and measure it like ``pnc clone`` did."""
    path = patch_path(path)
    net, meta = store.load_patch(path, device)
    target, t_card = store.load(meta["target"]["name"], device)
    dataset = load_dataset(t_card.dataset, data_dir, image_size=t_card.input_size[-1])
    tasks, models = [], []
    for b in meta["branches"]:
        source, s_card = store.load(b["source"]["name"], device)
        if s_card.dataset != t_card.dataset:
            raise PatchError(
                f"{path}: branch {b['name']!r} clones from {s_card.dataset} into a "
                f"{t_card.dataset} target; pnc eval measures clones within one dataset"
            )
        tasks.append(_branch_task(b, t_card, s_card, dataset))
        models.append((source, b["source_outputs"]))
    acc = compare(net, target, models, tasks)
    return {
        "patch": str(path),
        "ori_acc": acc["clone"]["ori"],
        "tar_acc": acc["clone"]["tar"],
        "avg_acc": acc["clone"]["avg"],
        "target_acc": acc["target"],
        "ensemble_acc": acc["ensemble"],
    }


def print_table(report: dict) -> None:
    """The Ori / Tar / Avg summary table (rich)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Ori / Tar / Avg accuracy (%) on the test images")
    for col in ("model", "Ori", "Tar", "Avg"):
        table.add_column(col, justify="left" if col == "model" else "right")
    rows = (
        ("target alone", report["target_acc"]),
        ("PNC clone", {"ori": report["ori_acc"], "tar": report["tar_acc"], "avg": report["avg_acc"]}),
        ("direct ensemble", report["ensemble_acc"]),
    )
    for label, acc in rows:
        table.add_row(label, *(f"{100 * acc[k]:.2f}" for k in ("ori", "tar", "avg")))
    Console().print(table)


def _store(args) -> ZooStore:
    return ZooStore(args.zoo_dir)


def _cmd_clone(args) -> int:
    if len(args.source) != len(args.classes):
        raise TaskError("give one --classes per --source (e.g. --source A --classes S --source B --classes 7)")
    if any(r >= args.mask_ratio for r in args.smaller_mask_ratios):
        raise TaskError(
            f"--smaller-mask-ratios {' '.join(map(str, args.smaller_mask_ratios))}: each must be below --mask-ratio "
            f"({args.mask_ratio:g}), e.g. --smaller-mask-ratios 0.25"
        )
    config = SearchConfig(
        seed=args.seed,
        mask_ratio=args.mask_ratio,
        choose=args.choose,
        smaller_branch_within_se=args.prefer_smaller_branch,
        smaller_mask_ratios=tuple(args.smaller_mask_ratios),
        tune_epochs_choices=tuple(args.tune_epochs_choices),
        tune_runners_up=args.tune_runners_up,
        cache_mb=args.cache_mb,
    )
    config.resolved(tuned=True)  # a rule at odds with the other settings: refused before anything loads
    store, sources, out = _store(args), list(zip(args.source, args.classes)), Path(args.out)
    check_output_dir(out, "--out")  # before loading anything: the cheapest check first
    check_backend(args.backend, args.address)
    plan = plan_clone(
        store,
        args.target,
        sources,
        seed=args.seed,
        data_dir=args.data_dir,
        fraction=args.fraction,
        old_fraction=args.old_fraction,
        config=config,
        device=args.device,
    )
    seen = [name for name, _, task in plan.sources if not task.validation]
    if args.tune_epochs_choices and seen:
        raise TaskError(
            f"--tune-epochs-choices chooses on held-out images neither network was trained on, and target "
            f"{args.target!r} and source(s) {', '.join(map(repr, seen))} share no validation share: train both with "
            "`pnc zoo train --validation F` (the same F), or drop --tune-epochs-choices"
        )
    backend = None
    if args.backend == "ray":
        from pnc.bench.ray_backend import RayBackend, connect

        connect(args.address)  # before anything is written: an unreachable cluster leaves no trace
        backend = RayBackend(args.address)
    _, report = run_clone(
        store,
        args.target,
        sources,
        out,
        seed=args.seed,
        data_dir=args.data_dir,
        fraction=args.fraction,
        old_fraction=args.old_fraction,
        config=config,
        progress=not args.json,
        force=args.force,
        plan=plan,
        time_budget=args.time_budget,
        backend=backend,
    )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
        for b in report["branches"]:
            print(
                f"branch {b['name']!r}: R = {b['target_cut']} (target) <- R' = {b['source_cut']} (source); "
                f"transferable module {b['params_before']:,} -> {b['params_after']:,} params, "
                f"{b['macs_before']:,} -> {b['macs_after']:,} MACs"
            )
            if b.get("chosen_because"):
                print(f"  chosen: {b['chosen_because']}")
            for reason in b.get("skipped", []):
                print(f"  skipped {reason}")
            for c in b.get("candidates", []):
                if c.get("eliminated"):
                    print(f"  dropped R={c['target_cut']} {c['eliminated']}")
            if b.get("budget_stopped"):
                print("  --time-budget spent: the search stopped early; this is the best candidate so far")
        im = report["images"]
        held = (
            f"{report['validation']:g} validation share, never trained on"
            if report["validation"]
            else "from the available images, which the zoo models were trained on"
        )
        print(
            f"images: {im['old_train']} of the target's classes + {im['clone_train']} of the cloned classes "
            f"to train, {im['old_holdout'] + im['clone_holdout']} held out to choose R ({held})"
        )
        print(
            f"patch {report['patch_bytes']:,} bytes vs source checkpoint {report['source_bytes']:,} bytes; "
            f"{report['seconds']:.0f} s; wrote {args.out}/clone.pnc and report.json"
        )
    return 0


def _cmd_eval(args) -> int:
    report = evaluate_patch(patch_path(args.patch), _store(args), args.data_dir, args.device)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0


def _cmd_demo(args) -> int:
    from pnc.zoo.defaults import default_pair, ensure_default

    store = writable_zoo(args.zoo_dir)
    check_output_dir(Path(args.out), "--out")
    try:
        load_dataset("fashion-mnist", args.data_dir)
        dataset, arch = "fashion-mnist", "lenet5"
    except PncError:
        print("Fashion-MNIST not found (apt-get install dataset-fashion-mnist); using sklearn's digits.")
        dataset, arch = "digits", "cnn4"
    start = time.perf_counter()
    target, source = default_pair(dataset, arch)
    precheck_clone_out(Path(args.out), target, [(source, "S")], args.seed, args.force)
    for name in (target, source):
        card = ensure_default(store, name, args.data_dir, device=args.device)
        print(
            f"zoo: {name} ({card.arch} on {card.dataset}, classes {card.classes}, "
            f"test accuracy {100 * card.test_accuracy:.2f}%)"
        )
    out = Path(args.out)
    net, report = run_clone(
        store,
        target,
        [(source, "S")],
        out,
        seed=args.seed,
        data_dir=args.data_dir,
        force=args.force,
        device=args.device,
    )
    print_table(report)
    print(
        f"cloned {report['branches'][0]['classes']} from {source} into {target} at R = {report['target_cut']}; "
        f"patch {report['patch_bytes']:,} bytes (source checkpoint {report['source_bytes']:,})"
    )
    example = torch.zeros(1, *store.card(target).input_size, device=args.device)
    export_onnx(net, out / "clone.onnx", example)
    export_onnx(net.target, out / "target.onnx", example)
    detach_onnx(out / "clone.onnx", None, out / "detached.onnx")
    same = file_sha256(out / "detached.onnx") == file_sha256(out / "target.onnx")
    print(
        f"ONNX: {out}/clone.onnx (detachable branch); detaching it gives a file "
        f"{'byte-identical to' if same else 'DIFFERENT from'} {out}/target.onnx"
    )
    print(f"demo {time.perf_counter() - start:.0f} s (clone {report['seconds']:.0f} s); wrote {out}")
    return 0 if same else 1


def add_cli(sub: argparse._SubParsersAction) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        add_zoo_dir(p)
        add_data_dir(p)

    p = sub.add_parser("clone", help="clone classes of source zoo models into a target zoo model")
    p.add_argument("--target", required=True, help="the target's zoo name")
    p.add_argument("--source", action="append", required=True, help="a source's zoo name (repeatable)")
    p.add_argument(
        "--classes",
        action="append",
        required=True,
        help="classes to clone from that source: S (20%%), M (60%%), 5-6, 5,7 or names",
    )
    p.add_argument("--out", required=True, help="output folder for clone.pnc and report.json")
    p.add_argument("--seed", type=seed_number, default=0)
    p.add_argument("--fraction", type=share, default=0.3, help="share of the clone classes' training images, in (0, 1]")
    add_old_fraction(p)
    p.add_argument("--mask-ratio", type=share, default=0.5, help="kept share of each channel group, in (0, 1]")
    p.add_argument(
        "--choose",
        choices=CHOOSE_RULES,
        default=None,
        help="how R is chosen: 'loss' (the lowest held-out selection loss, every candidate cut trained) or "
        "'earliest' (the earliest cut, the largest branch, the only one trained); default: 'earliest' when the "
        "branch is tuned on old-class images (--old-fraction > 0), else 'loss'",
    )
    p.add_argument(
        "--prefer-smaller-branch",
        action="store_true",
        help="choose the latest cut (the smallest branch, the fastest clone) whose held-out loss is within one "
        "paired standard error of the best (the loss rule; not with --choose earliest)",
    )
    p.add_argument(
        "--smaller-mask-ratios",
        nargs="+",
        type=share,
        default=[],
        metavar="RATIO",
        help="kept shares below --mask-ratio to try on the chosen R (its last stage re-run at each, smallest first); "
        "the first that loses nothing on the held-out images is kept: a smaller, faster branch",
    )
    p.add_argument(
        "--tune-epochs-choices",
        nargs="+",
        type=positive(int),
        default=[],
        metavar="EPOCHS",
        help="other lengths of the chosen branch's tuning (default length 10), each tried from the same start; the "
        "best on the validation images is kept (needs models trained with `pnc zoo train --validation F`)",
    )
    p.add_argument(
        "--tune-runners-up",
        type=in_range(int, 0, 100),
        default=0,
        metavar="N",
        help="also build and tune the N next-best finalists and keep the branch with the best held-out accuracy "
        "after tuning (default 0: only the chosen R is tuned; each one more costs one tuning; the loss rule, "
        "not with --choose earliest)",
    )
    p.add_argument(
        "--time-budget",
        type=positive(float),
        metavar="SECONDS",
        help="stop the search early once SECONDS are spent, keeping the best candidate so far (reported)",
    )
    p.add_argument(
        "--cache-mb",
        type=in_range(float, 0.0, float("inf")),
        default=SearchConfig().cache_mb,
        metavar="MIB",
        help="memory for the frozen networks' activations at the cuts, kept once instead of recomputed at every "
        f"step (default {SearchConfig().cache_mb:g}; 0: recompute, the least memory)",
    )
    p.add_argument("--json", action="store_true", help="print report.json instead of a table")
    add_backend(p, "the candidates' stages")
    add_force(p, "a clone of another run in --out (rerunning the same command resumes without it)")
    add_device(p, "clone")
    common(p)
    p.set_defaults(func=_cmd_clone)

    p = sub.add_parser("eval", help="rebuild a .pnc patch from the zoo and measure Ori / Tar / Avg")
    p.add_argument("patch", help="a .pnc patch, or the folder `pnc clone --out` wrote it in")
    p.add_argument("--json", action="store_true")
    add_device(p, "evaluate")
    common(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("demo", help="the main job on the embedded default pair, end to end")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--seed", type=seed_number, default=0)
    add_force(p, "a clone of another run in --out")
    add_device(p, "train and clone")
    common(p)
    p.set_defaults(func=_cmd_demo)
