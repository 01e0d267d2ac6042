"""Where a clone's time goes, before and after the search speed-up, against Joint+Full.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/clone_cost.py --label after
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/clone_cost.py --label before \\
        --python /work/before/.venv/bin/python --cells lenet5:S:0.3,lenet5:M:0.3
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/clone_cost.py --joint      # Joint+Full cells

Each cell (Fashion-MNIST default pair ``arch``, clone scale, old fraction; seed 0) runs in
a fresh subprocess of ``--python`` (a venv of any pnc commit: ``before`` is the search as
it stood before the speed-up, in a worktree of that commit), which clones with the default
search under :class:`~pnc.bench.baselines.PeakMemory`, timing phases by wrapping the
functions that hold them (those a commit lacks are absent from its row), and measures the
clone's Ori/Tar/Avg on the test images. ``--joint`` runs Joint+Full (the retraining PNC is
measured against) per (arch, scale) the same way. Rows accumulate in
``benchmarks/results/clone_cost.json`` (a re-run replaces its own cells) and the markdown
``clone_cost.md`` is rendered from all of them: the wall-time and peak-memory table,
per-phase seconds, and a cost model extrapolated from the per-step costs measured here.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
CELLS = [f"{a}:{s}:{o}" for a in ("lenet5", "resnetc20") for o in ("0.3", "0") for s in ("S", "M")]

#: (module, attribute, phase name): functions wrapped with a timer in the child
TIMED = [
    ("pnc.surgery.cloning", "fit_local_models", "local_models"),
    ("pnc.surgery.cloning", "SearchContext", "frozen_outputs"),
    ("pnc.surgery.cloning", "search", "search"),
    ("pnc.surgery.cloning", "build_branch", "build_branch"),
    ("pnc.surgery.cloning", "tune_branch", "tune_branch"),
    ("pnc.surgery.cloning", "finalist_accuracy", "report_accuracy"),
]
METHOD_TIMED = [
    ("pnc.surgery.insertion", "CandidateTrainer", "run_phase", "phase"),
    ("pnc.surgery.insertion", "CandidateTrainer", "accuracy", "test_eval"),
    ("pnc.surgery.insertion", "CandidateTrainer", "holdout_logits", "holdout_eval"),
]


def _install_timers(seconds: dict[str, float]) -> None:
    import importlib

    def timed(fn, name_of):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                name = name_of(args)
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start

        return wrapper

    for module, attr, name in TIMED:
        mod = importlib.import_module(module)
        if hasattr(mod, attr):
            setattr(mod, attr, timed(getattr(mod, attr), lambda args, name=name: name))
    for module, cls, method, name in METHOD_TIMED:
        owner = getattr(importlib.import_module(module), cls)
        if not hasattr(owner, method):
            continue
        if name == "phase":
            setattr(owner, method, timed(getattr(owner, method), lambda args: f"phase:{args[1]}"))
        else:
            setattr(owner, method, timed(getattr(owner, method), lambda args, name=name: name))


def child(arch: str, scale: str, old_fraction: float, joint: bool) -> dict[str, Any]:
    """One cell in this process: the clone (or Joint+Full) timed, memory-sampled, evaluated."""
    import torch

    torch.set_num_threads(1)
    from pnc.bench.baselines import PeakMemory
    from pnc.bench.machine import speed_probe
    from pnc.zoo import CloneTask, ZooStore, load_dataset
    from pnc.zoo.defaults import default_pair

    splits = load_dataset("fashion-mnist")
    store = ZooStore()
    t_name, s_name = default_pair(splits.name, arch)
    (target, t_card), (source, s_card) = store.load(t_name), store.load(s_name)
    task = CloneTask.for_cards(splits, t_card, s_card, scale, seed=0, old_fraction=old_fraction)
    probe = speed_probe()
    if joint:
        from pnc.bench.baselines import run_method
        from pnc.bench.paper import budget_for

        run = run_method("Joint+Full", task, target, source, 0, budget_for(t_card, quick=False))
        return {"seconds": run.seconds, "peak_mb": run.peak_mb, "probe_ms": probe}
    from pnc.surgery import clone

    seconds: dict[str, float] = {}
    _install_timers(seconds)
    inputs = task.clone_inputs()
    with PeakMemory() as memory:
        start = time.perf_counter()
        net = clone(target, source, **inputs, progress=False)
        total = time.perf_counter() - start
    report = next(iter(net.branches.values())).report
    acc = {}
    with torch.no_grad():
        for name, (x, y) in inputs["eval_sets"].items():
            pred = torch.cat([net(xb).argmax(1) for xb in x.split(500)])
            acc[name] = float((pred == y).float().mean())
    return {
        "seconds": total,
        "peak_mb": memory.peak_mb,
        "probe_ms": probe,
        "phases": seconds,
        "accuracy": acc,
        "target_cut": report.target_cut,
        "candidates": [
            {k: c.get(k) for k in ("target_cut", "loss", "stage", "eliminated", "accuracy", "seconds")}
            for c in report.candidates
        ],
        "images": report.images,
    }


def _commit(python: str) -> str:
    code = "import pnc.surgery, pathlib; print(pathlib.Path(pnc.surgery.__path__[0]).parent)"
    root = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    out = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="after", help="row label, e.g. before / after")
    parser.add_argument("--python", default=sys.executable, help="the interpreter (venv) of the pnc to measure")
    parser.add_argument("--cells", default=",".join(CELLS), help="arch:scale:old_fraction,...")
    parser.add_argument("--joint", action="store_true", help="measure Joint+Full per (arch, scale) instead")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        arch, scale, old = args.child.split(":")
        print("RESULT " + json.dumps(child(arch, scale, float(old), args.joint)))
        return
    from pnc.bench.paper import machine_info
    from pnc.surgery.io import atomic_write_text

    path = RESULTS / "clone_cost.json"
    data = json.loads(path.read_text()) if path.exists() else {"rows": []}
    machine = machine_info()
    for r in data["rows"]:  # rows of an earlier run keep the machine they were measured on
        r.setdefault("cpu", data.get("machine", {}).get("cpu", "?"))
    cells = [c for c in args.cells.split(",") if c]
    if args.joint:
        cells = sorted({f"{c.split(':')[0]}:{c.split(':')[1]}:0.3" for c in cells})
    label = "Joint+Full" if args.joint else args.label
    commit = _commit(args.python)
    for cell in cells:
        cmd = [args.python, __file__, "--child", cell] + (["--joint"] if args.joint else [])
        done = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"cell {cell} failed:\n{done.stderr[-3000:]}")
        arch, scale, old = cell.split(":")
        row = {
            "label": label,
            "commit": commit,
            "cpu": machine["cpu"],
            "arch": arch,
            "scale": scale,
            "old_fraction": float(old),
        }
        row |= json.loads(line[len("RESULT ") :])
        key = (label, arch, scale, None if args.joint else float(old))

        def same(r: dict[str, Any], key: tuple = key) -> bool:
            return (r["label"], r["arch"], r["scale"], None if r["label"] == "Joint+Full" else r["old_fraction"]) == key

        data["rows"] = [r for r in data["rows"] if not same(r)] + [row]
        data["machine"] = machine
        atomic_write_text(path, json.dumps(data, indent=2))
        print(f"{label} {cell}: {row['seconds']:.1f} s, {row['peak_mb']:.0f} MiB", flush=True)
    atomic_write_text(RESULTS / "clone_cost.md", render(data))


def _commits(rows: list[dict[str, Any]], labels: tuple[str, ...]) -> list[str]:
    """The commits of the rows labelled ``labels``, in the order first measured."""
    return list(dict.fromkeys(r["commit"] for r in rows if r["label"] in labels))


def short_cpu(cpu: str) -> str:
    """'Intel(R) Xeon(R) Processor @ 2.50GHz' -> 'Intel Xeon', 'AMD EPYC 7B13' -> 'AMD EPYC'."""
    words = cpu.replace("(R)", "").replace("(TM)", "").split()
    return " ".join(words[:2]) or "?"


#: the most two rows' speed probes may differ for a ratio of their seconds
PROBE_TOLERANCE = 0.15


def comparable(row: dict[str, Any], other: dict[str, Any]) -> bool:
    """May ``row``'s seconds be put in a ratio with ``other``'s? Same CPU model, and speed probes
    (:func:`pnc.bench.machine.speed_probe`, when both rows have one) within
    :data:`PROBE_TOLERANCE` of each other."""
    if row["cpu"] != other["cpu"]:
        return False
    a, b = row.get("probe_ms"), other.get("probe_ms")
    return a is None or b is None or abs(a - b) <= PROBE_TOLERANCE * min(a, b)


def render(data: dict[str, Any]) -> str:
    """The markdown report of every row."""
    from pnc.bench.clone_cost_model import cost_model_section

    rows = data["rows"]
    joint = {(r["arch"], r["scale"]): r for r in rows if r["label"] == "Joint+Full"}
    m = data.get("machine", {})
    lines = [
        "# Clone cost: where the time goes, before and after the search speed-up",
        "",
        f"Written by `benchmarks/clone_cost.py`, last on {m.get('cpu', '?')} ({m.get('cores', '?')} cores, "
        f"torch {m.get('torch', '?')}, one intra-op thread; `cpu`: the machine of each row, ratios only "
        "between rows of one machine; `probe ms`: the speed probe run just before the cell, "
        f"`pnc.bench.machine.speed_probe`, and no ratio between rows whose probes differ by more than "
        f"{PROBE_TOLERANCE:.0%}: a VM's speed can drift within a run), Fashion-MNIST default pairs, seed 0, "
        "each cell in a fresh process, the zoo models as the store on that machine holds them. "
        "The `after` and Joint+Full rows (commits "
        f"{', '.join(_commits(rows, ('after', 'Joint+Full')))}) ran one cell at a time with nothing else on "
        "the machine (beside a second benchmark process, as in the paper tables, Joint+Full's ResNetC-20 "
        "cells take 1.5x longer and the clone's about 1.1x, so ratios of such runs read lower); the "
        "`before` rows ran in an earlier run on a machine shared with other jobs (upper bounds, and no "
        "ratio to this run's Joint+Full). `before` is the search at the commit in its row (every "
        "candidate trained 2+3+3 epochs over all available images, the frozen networks re-run at every "
        "step, every candidate evaluated on the test set); `after` the search at the commit in its row "
        "(frozen outputs computed once, the frozen networks' activations at the cuts cached once per "
        "clone in float16 within `cache_mb`, epochs over the clone images, every candidate trained to the"
        " end, the chosen branch tuned, finalists' test accuracy reported apart). Joint+Full: the target "
        "retrained on all images of both class sets, the same run's machine.",
        "",
        "| pair, scale, old fraction | label | commit | cpu | probe ms | seconds | Joint+Full s | ratio | "
        "peak MiB | Joint+Full MiB | ratio | Ori / Tar / Avg % | R |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    clones = sorted(
        (r for r in rows if r["label"] != "Joint+Full"),
        key=lambda r: (r["arch"], r["scale"], -r["old_fraction"], r["label"] != "before"),
    )
    for r in clones:
        j = joint.get((r["arch"], r["scale"])) if r["label"] != "before" else None
        if j is not None and not comparable(r, j):
            j = None  # no ratio across machines, or across speeds of one
        acc = r.get("accuracy", {})
        accs = " / ".join(f"{100 * acc[k]:.2f}" for k in ("ori", "tar", "avg")) if acc else "-"
        seconds = clone_seconds(r)
        lines.append(
            f"| {r['arch']} {r['scale']} {r['old_fraction']:g} | {r['label']} | {r['commit']} | "
            f"{short_cpu(r['cpu'])} | {_probe(r)} | {seconds:.1f} | "
            + (f"{j['seconds']:.1f} | {seconds / j['seconds']:.2f} | " if j else "- | - | ")
            + f"{r['peak_mb']:.0f} | "
            + (f"{j['peak_mb']:.0f} | {r['peak_mb'] / max(j['peak_mb'], 1):.2f} | " if j else "- | - | ")
            + f"{accs} | {r.get('target_cut', '-')} |"
        )
    lines += [
        "",
        "Successive halving (`keep_fraction` < 1) is off by default: ranking the candidates after the "
        "first stage dropped the best final R on ResNetC-20 (strict S, and M seed 0 with old fraction 0.3: "
        "Avg 87.40 against 88.24), so every candidate of these `after` rows trains to the end.",
        "",
        "Seconds exclude `report_accuracy` (the test accuracy of the finalists, reported for the "
        "selection regret, after R is chosen); `before` evaluated every candidate on the test set inside "
        "its search (`test_eval`, included, as it was part of the search then).",
        "",
        "## Seconds per phase",
        "",
        "`phase:*` are the candidates' training phases (summed over candidates) and `test_eval` / "
        "`holdout_eval` the evaluations; they are parts of `search` (`test_eval` after it, in "
        "`report_accuracy`, for `after`).",
        "",
    ]
    names = sorted({k for r in clones for k in r.get("phases", {})})
    lines.append("| cell | label | " + " | ".join(names) + " |")
    lines.append("|---|---|" + "---:|" * len(names))
    for r in clones:
        ph = r.get("phases", {})
        lines.append(
            f"| {r['arch']} {r['scale']} {r['old_fraction']:g} | {r['label']} | "
            + " | ".join(f"{ph[n]:.1f}" if n in ph else "-" for n in names)
            + " |"
        )
    lines += ["", *_floor_section(clones, joint), *cost_model_section(rows), ""]
    return "\n".join(lines)


def clone_seconds(row: dict[str, Any]) -> float:
    """A row's seconds without ``report_accuracy`` (the finalists' test accuracy, reported
    after R is chosen)."""
    return row["seconds"] - row.get("phases", {}).get("report_accuracy", 0.0)


def _probe(row: dict[str, Any]) -> str:
    return f"{row['probe_ms']:.2f}" if row.get("probe_ms") is not None else "-"


def _floor_section(clones: list[dict[str, Any]], joint: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    """The clone's seconds with R known in advance: everything but the other candidates'
    training and held-out evaluation (rows whose candidates carry their ``seconds``)."""
    from pnc.bench.paper import other_candidates_seconds

    lines = [
        "## R known in advance: the floor of any faster search",
        "",
        "What each `after` clone would take had the search known R and trained only that candidate: its "
        "seconds minus the other candidates' (their stages and held-out evaluations); the frozen outputs, "
        "G, the chosen candidate's stages and the tuning stay. No ordering, halving or early stopping of "
        "the candidates can go below it on one worker without a shorter recipe.",
        "",
        "| pair, scale, old fraction | seconds | chosen R: its s | other candidates s | floor s | "
        "Joint+Full s | floor / Joint+Full |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    timed = [
        r
        for r in clones
        if r["label"] == "after" and r.get("candidates") and all("seconds" in c for c in r["candidates"])
    ]
    for r in timed:
        seconds = clone_seconds(r)
        chosen = [c for c in r["candidates"] if c["target_cut"] == r["target_cut"]]
        others = other_candidates_seconds(r)
        floor = seconds - others
        j = joint.get((r["arch"], r["scale"]))
        ratio = f"{j['seconds']:.1f} | {floor / j['seconds']:.2f}" if j and comparable(r, j) else "- | -"
        lines.append(
            f"| {r['arch']} {r['scale']} {r['old_fraction']:g} | {seconds:.1f} | "
            f"{r['target_cut']}: {sum(c['seconds'] for c in chosen):.1f} | {others:.1f} | {floor:.1f} | {ratio} |"
        )
    return [*lines, ""] if timed else []


if __name__ == "__main__":
    main()
