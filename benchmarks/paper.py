"""Table-1-style benchmark: every method of :mod:`pnc.bench.baselines` on one (target, source)
pair of zoo models, at the "S" and "M" clone scales, over several seeds.

A *row* is one (method, scale, seed); each finished row is written at once to a JSON
cache (``<stem>.rows.json`` beside the tables), keyed by the row and a fingerprint of
its settings and model hashes, so a re-run resumes where it stopped and an edited
setting recomputes only the rows it touches. PNC's searches also checkpoint each
candidate under ``workdir``. The seed picks the task's clone subset and every training
seed; the zoo models are the same for every seed.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import math
import os
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pnc.bench.baselines import METHODS, Budget, budget_fields, run_method, search_key
from pnc.bench.machine import cpu_name
from pnc.bench.metrics import clone_accuracy, per_class_accuracy, set_logits
from pnc.bench.results_files import jsonable, write_json_md
from pnc.surgery.devices import DeviceLike, device_of
from pnc.surgery.errors import ConfigError, TaskError
from pnc.surgery.insertion import SearchConfig
from pnc.surgery.io import atomic_write_text
from pnc.zoo.datasets import DatasetSplits
from pnc.zoo.store import ModelCard, ZooStore, package_versions
from pnc.zoo.tasks import CloneTask, shared_validation

__all__ = [
    "TableSpec",
    "RowCache",
    "run_table",
    "summarize",
    "write_table",
    "goal_checks",
    "machine_info",
    "QUICK_BUDGET",
]

#: the tiny budget of ``--quick`` runs (tests, smoke checks)
QUICK_BUDGET = Budget(loc_epochs=1, joint_epochs=1, binary_epochs=1, scratch_epochs=2, num_masks=20)
#: the reference method of the paper's deltas
REFERENCE = "Continual+KD"
#: rows printed without a delta, as in the paper (the reference itself and the upper references)
NO_DELTA = (REFERENCE, "Pre-trained", "Joint+Full")
#: execution order: cheap rows first, PNC before PNC-F (which resumes PNC's search), Joint last
RUN_ORDER = [
    "Pre-trained",
    "Direct Ensemble",
    "Calibrated Ensemble",
    "Continual",
    "Continual+KD",
    "Continual+KD (no CE)",
    "PNC",
    "PNC-F",
    "PNC (w/o Local)",
    "PNC (w/o Insert)",
    "Joint+Full",
]


@dataclass
class TableSpec:
    """One table: zoo models ``target`` / ``source`` (names) on ``dataset``, and what to run."""

    stem: str
    title: str
    target: str
    source: str
    scales: list[str]
    seeds: list[int]
    methods: list[str]
    budget: Budget
    fraction: float = 0.3
    old_fraction: float = 0.3

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise TaskError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
        bad = [s for s in self.scales if s not in ("S", "M")]
        if bad:
            raise TaskError(f"unknown scales {bad}; use S and/or M")


class RowCache:
    """Finished rows in one JSON file, written atomically after every row.

    ``fresh`` (``--fresh``): the rows the file holds so far are not read; those of the cells
    this process asks for (:meth:`claim`, :meth:`get`) leave the file at its next write, the
    rest stay, so recomputing some methods or one scale keeps the other rows of the table::

        cache = RowCache(path, fresh=True)   # the file holds PNC|S|0 and PNC|M|0
        cache.claim(["PNC|S|0"])
        cache.put("PNC|S|0", row)            # the file: the new PNC|S|0 and the old PNC|M|0
    """

    def __init__(self, path: Path, fresh: bool = False):
        self.path = Path(path)
        self.stale: dict[str, str] = {}  # rows :meth:`clear` dropped, as JSON: not read back from the file
        self.claimed: set[str] = set()  # keys whose stale rows leave the file at the next write
        self.written: set[str] = set()  # keys this process put: its rows win over the file's
        self.rows: dict[str, dict[str, Any]] = self._on_disk()
        if fresh:
            self.clear()

    def clear(self) -> None:
        """Forget every row cached so far (``--fresh``); rows other processes add later still count."""
        self.stale = {k: json.dumps(v, sort_keys=True) for k, v in self.rows.items()}
        self.rows = {}

    def claim(self, keys: Iterable[str]) -> None:
        """The cells this process will fill: their stale rows leave the file at its next write
        (a stopped ``--fresh`` run resumed without it recomputes them instead of reading them)."""
        self.claimed.update(keys)

    def _on_disk(self) -> dict[str, dict[str, Any]]:
        """The rows in the file now ({} without one, or for a truncated file from a killed run)."""
        if not self.path.is_file():
            return {}
        try:
            return json.loads(self.path.read_text())
        except json.JSONDecodeError:
            return {}

    def _is_stale(self, key: str, row: dict[str, Any]) -> bool:
        return self.stale.get(key) == json.dumps(row, sort_keys=True)

    def _read_others(self) -> dict[str, dict[str, Any]]:
        """Take the rows other processes wrote to the file since (not those :meth:`clear`
        dropped): the file's row of a key wins over the copy read earlier, except for the rows
        this process put. Returns the file's rows as read."""
        on_disk = self._on_disk()
        newer = {k: v for k, v in on_disk.items() if not self._is_stale(k, v)}
        self.rows = self.rows | newer | {k: self.rows[k] for k in self.written}
        return on_disk

    def get(self, key: str, fingerprint: str) -> dict[str, Any] | None:
        self.claimed.add(key)
        if key not in self.rows:  # another process may have added it
            self._read_others()
        row = self.rows.get(key)
        return row if row is not None and row.get("fingerprint") == fingerprint else None

    def put(self, key: str, row: dict[str, Any]) -> None:
        on_disk = self._read_others()  # two processes filling one table (e.g. one per scale) keep each other's rows
        self.rows[key] = row
        self.written.add(key)
        kept = {k: v for k, v in on_disk.items() if not (k in self.claimed and self._is_stale(k, v))}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(kept | self.rows, indent=1, default=jsonable))


@functools.lru_cache(maxsize=1)
def _git_commit() -> str:
    """The commit of the code this process runs (read once: later commits do not relabel its rows)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info() -> dict[str, Any]:
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), **package_versions()}


def run_table(
    spec: TableSpec,
    store: ZooStore,
    splits: DatasetSplits,
    cache: RowCache,
    workdir: Path,
    log: Callable[[str], None] = print,
    shared: RowCache | None = None,
    device: DeviceLike | None = None,
    *,
    backend: str = "inprocess",
    address: str | None = None,
) -> list[dict[str, Any]]:
    """Run (or reuse from ``cache``) every row of ``spec`` on ``device`` (default: torch's
    default device; each row records it); returns the per-seed rows.

    In process, rows run seed by seed, then scale by scale, so that a full first seed of the
    table exists early. With ``backend="ray"`` the rows not cached run as Ray tasks, in
    parallel on the cluster at ``address`` (default: a local Ray), each cached as it returns;
    PNC-F starts after PNC of its scale and seed (it resumes PNC's search). Rows of methods
    that never see the available images (:data:`SETTING_FREE`) are also looked up in
    ``shared`` (the same table in the other data setting)."""
    if backend not in ("inprocess", "ray"):
        raise ConfigError(f"unknown backend {backend!r}; use 'inprocess' or 'ray'")
    target, t_card = store.load(spec.target, device)
    source, s_card = store.load(spec.source, device)
    cells = []  # (key, (method, scale, seed, fingerprint))
    for seed in spec.seeds:
        for scale in spec.scales:
            task = _task(spec, splits, t_card, s_card, scale, seed)
            for method in sorted(spec.methods, key=RUN_ORDER.index):
                key = f"{method}|{scale}|{seed}"
                cells.append((key, (method, scale, seed, _fingerprint(spec, method, task, t_card, s_card))))
    cache.claim(key for key, _ in cells)

    def report(key: str, row: dict[str, Any], status: str) -> None:
        log(
            f"{spec.stem}: {row['method']:>20} {row['scale']} seed {row['seed']}: ori {row['ori']:.4f} "
            f"tar {row['tar']:.4f} avg {row['avg']:.4f}  {row['seconds']:.1f} s  {row['peak_mb']:.0f} MiB  ({status})"
        )

    def finished(key: str, row: dict[str, Any]) -> None:
        cache.put(key, row)
        report(key, row, "done")

    context = {"spec": spec, "workdir": Path(workdir), "target": target, "source": source, "splits": splits}
    context |= {"t_card": t_card, "s_card": s_card}

    def cached(key: str, method: str, fingerprint: str) -> dict[str, Any] | None:
        row = cache.get(key, fingerprint)
        if row is None and shared is not None and method in SETTING_FREE:
            row = shared.get(key, fingerprint)
            if row is not None:
                cache.put(key, row)
        return row

    if backend == "ray":
        from pnc.bench.ray_backend import run_cells

        todo = []
        for key, (method, scale, seed, fingerprint) in cells:
            if (row := cached(key, method, fingerprint)) is not None:
                report(key, row, "cached")
            else:
                after = [f"PNC|{scale}|{seed}"] if method == "PNC-F" else []
                todo.append((key, (method, scale, seed, fingerprint), after))
        run_cells(run_cell, todo, context, finished, address=address)
    else:
        for key, (method, scale, seed, fingerprint) in cells:
            if (row := cached(key, method, fingerprint)) is not None:
                report(key, row, "cached")
            else:
                finished(key, run_cell(method, scale, seed, fingerprint, **context))
    return [cache.rows[key] for key, _ in cells]


def _task(
    spec: TableSpec, splits: DatasetSplits, t_card: ModelCard, s_card: ModelCard, scale: str, seed: int
) -> CloneTask:
    return CloneTask.for_cards(
        splits,
        t_card,
        s_card,
        scale,
        fraction=spec.fraction,
        seed=seed,
        old_fraction=spec.old_fraction,
    )


def run_cell(
    method: str,
    scale: str,
    seed: int,
    fingerprint: str,
    *,
    spec: TableSpec,
    workdir: Path,
    target: torch.nn.Module,
    source: torch.nn.Module,
    splits: DatasetSplits,
    t_card: ModelCard,
    s_card: ModelCard,
) -> dict[str, Any]:
    """One row of the table: ``method`` on the clone task of (``scale``, ``seed``), measured."""
    began = time.perf_counter()
    task = _task(spec, splits, t_card, s_card, scale, seed)
    run = run_method(
        method, task, target, source, seed, spec.budget, workdir=Path(workdir) / spec.stem / f"{scale}-{seed}"
    )
    pooled = task.eval_sets()["avg"]
    logits = set_logits(run.model, pooled)
    acc = clone_accuracy(logits, pooled.y, len(task.target_classes))
    return {
        "method": method,
        "scale": scale,
        "seed": seed,
        "clone_classes": task.clone_classes,
        "ori": acc["ori"],
        "tar": acc["tar"],
        "avg": acc["avg"],
        "seconds": run.seconds,
        "peak_mb": run.peak_mb,
        "peak_without_reporting": run.peak_without_reporting,
        "macs": run.macs,
        "params": run.params,
        "per_class": per_class_accuracy(logits, pooled.y, task.num_outputs).tolist(),
        "hparams": run.hparams,
        "details": run.details,
        "fingerprint": fingerprint,
        "commit": _git_commit(),
        "load_avg": os.getloadavg()[0],
        "row_seconds": time.perf_counter() - began,
        "device": str(device_of(target)),
        "cpu": cpu_name(),
    }


#: methods whose rows do not depend on the old fraction (they never see the available images)
SETTING_FREE = ("Pre-trained", "Direct Ensemble", "Joint+Full")
UNRECORDED_CPU = "unrecorded"  # rows cached before rows recorded their CPU


def _cpu_of(row: dict[str, Any]) -> str:
    """The CPU a row ran on (:data:`UNRECORDED_CPU` for rows from before it was recorded)."""
    return row.get("cpu", UNRECORDED_CPU)


def _fingerprint(spec: TableSpec, method: str, task: CloneTask, t_card: ModelCard, s_card: ModelCard) -> str:
    described = task.to_dict()
    if method in SETTING_FREE:
        described.pop("old_fraction")
    fields = {
        "method": method,
        "budget": budget_fields(spec.budget, method),
        "task": described,
        "target": t_card.sha256,
        "source": s_card.sha256,
    }
    if (search := search_key(spec.budget, method, task.old_fraction > 0)) is not None:
        fields["search"] = search
    blob = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _row_cpus(result: dict[str, Any]) -> str:
    """'' when every row ran on the table's machine, else how many rows each CPU ran (rows
    are cached across runs, so a table can mix machines: its seconds then do not compare)."""
    counts = collections.Counter(_cpu_of(r) for r in result["per_seed"])
    if len(counts) == 1 and set(counts) & {result["machine"]["cpu"], UNRECORDED_CPU}:
        return ""
    listed = ", ".join(f"{cpu} ({n})" for cpu, n in sorted(counts.items()))
    return f" Rows cached from other runs: the rows ran on {listed}."


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(per_seed: list[dict[str, Any]], methods: list[str], scales: list[str]) -> list[dict[str, Any]]:
    """Mean and (sample) standard deviation over seeds of every (method, scale)."""
    out = []
    for scale in scales:
        for method in methods:
            rows = [r for r in per_seed if r["method"] == method and r["scale"] == scale]
            if not rows:
                continue
            entry: dict[str, Any] = {"method": method, "scale": scale, "seeds": [r["seed"] for r in rows]}
            for part in ("ori", "tar", "avg"):
                entry[f"{part}_acc"], entry[f"{part}_std"] = _mean_std([r[part] for r in rows])
            for cost in ("seconds", "peak_mb"):
                entry[cost], entry[f"{cost}_std"] = _mean_std([r[cost] for r in rows])
            entry["cpus"] = sorted({_cpu_of(r) for r in rows})
            entry["macs"], entry["params"] = rows[0]["macs"], rows[0]["params"]
            per_class = [r["per_class"] for r in rows if r.get("per_class")]
            if len(per_class) == len(rows) and len({len(c) for c in per_class}) == 1:
                entry["per_class"] = [statistics.fmean(c) for c in zip(*per_class)]
            if method.startswith("PNC"):
                entry["macs"] = statistics.fmean(r["macs"] for r in rows)
                entry["params"] = statistics.fmean(r["params"] for r in rows)
                entry["cuts"] = [r["details"]["report"]["target_cut"] for r in rows]
            trained = [_trained_macs(r) for r in rows]
            if all(t is not None for t in trained):
                entry["trained_macs"] = statistics.fmean(t for t in trained if t is not None)
            out.append(entry)
    for entry in out:
        ref = next((e for e in out if e["method"] == REFERENCE and e["scale"] == entry["scale"]), None)
        if ref is not None:
            entry[f"delta_vs_{REFERENCE}"] = {p: entry[f"{p}_acc"] - ref[f"{p}_acc"] for p in ("ori", "tar", "avg")}
    return out


def _trained_macs(row: dict[str, Any]) -> float | None:
    """Forward MACs a row's training (or, for PNC, its branch's tuning) went through: image
    passes x MACs per image of what trained, or None when the row does not say. PNC: the
    training images x the tuning passes (every length tried, every contender tuned) x the
    branch's MACs (pruned M_f, A, F_c); others: their training images x epochs x their MACs."""
    details = row.get("details", {})
    report = details.get("report")
    if report is not None:
        tuning, images = report.get("tuning") or {}, report.get("images", {})
        if "epochs" not in tuning:
            return None
        lengths = [int(e) for e in tuning.get("tried", {})] or [tuning["epochs"]]
        contenders = max(1, len(tuning.get("contenders", {})))
        passes = (images.get("old_train", 0) + images.get("clone_train", 0)) * sum(lengths) * contenders
        return float(passes * report["macs_after"])
    epochs = row.get("hparams", {}).get("epochs")
    if "train_images" not in details or not isinstance(epochs, int):
        return None
    return float(details["train_images"] * epochs * row["macs"])


def _at_least(gap: float, bound: float) -> bool:
    """gap >= bound in points, a tie counted as a tie: the means of float32 accuracies of the
    same image counts can differ by ~1e-6 points."""
    return round(gap, 4) >= bound


def goal_checks(
    rows: list[dict[str, Any]],
    search: list[dict[str, Any]] | None = None,
    class_names: dict[str, list[str]] | None = None,
    num_old: int | None = None,
) -> list[dict[str, Any]]:
    """Clone-quality goals for PNC, per scale, on the seed means (points = percent): Avg at
    least both ensembles' and Continual+KD's (with replay), Ori within 1 point of the
    pre-trained target at S and of Joint+Full at M, Avg within 2 points of Joint+Full at M,
    mean selection regret at most 0.5 point, and fewer MACs than the direct ensemble; and
    the cost goals: at most 0.25x Joint+Full's wall time and 2x its peak memory.

    A missed goal gets a ``diagnosis`` measured from the same rows: where the accuracy gap
    lies (Ori / Tar, the classes that trail most, whether it is within the seeds' spread),
    which seeds chose a worse R, where PNC's time goes. ``class_names``: scale -> the
    output classes' names (the rows' ``per_class`` order), the first ``num_old`` the
    target's."""
    checks = []
    for scale in dict.fromkeys(r["scale"] for r in rows):
        at = {r["method"]: r for r in rows if r["scale"] == scale}
        if "PNC" in at:
            records = [s for s in search or [] if s["scale"] == scale and s["method"] == "PNC"]
            checks += _goals_at(scale, at, records, (class_names or {}).get(scale), num_old)
    return checks


def _goals_at(
    scale: str,
    at: dict[str, dict[str, Any]],
    records: list[dict[str, Any]],
    names: list[str] | None,
    num_old: int | None,
) -> list[dict[str, Any]]:
    """:func:`goal_checks` at one scale: ``at`` maps each method to its summary row."""
    checks: list[dict[str, Any]] = []
    p = at["PNC"]

    def add(goal: str, value: float, need: str, met: bool, why: Callable[[], str]) -> None:
        checks.append(
            {
                "scale": scale,
                "goal": goal,
                "value": round(value, 3),
                "need": need,
                "met": bool(met),
                "diagnosis": "" if met else why(),
            }
        )

    def behind(ref: dict[str, Any], part: str = "avg") -> Callable[[], str]:
        return lambda: _accuracy_diagnosis(p, ref, part, names, num_old, at.get("Pre-trained"))

    ensembles = [m for m in ("Direct Ensemble", "Calibrated Ensemble") if m in at]
    if ensembles:
        best = max((at[m] for m in ensembles), key=lambda e: e["avg_acc"])
        gap = 100 * (p["avg_acc"] - best["avg_acc"])
        add(f"Avg(PNC) - max Avg({', '.join(ensembles)}), points", gap, ">= 0", _at_least(gap, 0), behind(best))
    if REFERENCE in at:
        gap = 100 * (p["avg_acc"] - at[REFERENCE]["avg_acc"])
        add("Avg(PNC) - Avg(Continual+KD), points", gap, ">= 0", _at_least(gap, 0), behind(at[REFERENCE]))
    if scale == "S" and "Pre-trained" in at:
        gap = 100 * (p["ori_acc"] - at["Pre-trained"]["ori_acc"])
        add(
            "Ori(PNC) - Ori(Pre-trained), points",
            gap,
            ">= -1",
            _at_least(gap, -1),
            behind(at["Pre-trained"], "ori"),
        )
    if scale == "M" and "Joint+Full" in at:
        gap = 100 * (p["ori_acc"] - at["Joint+Full"]["ori_acc"])
        add("Ori(PNC) - Ori(Joint+Full), points", gap, ">= -1", _at_least(gap, -1), behind(at["Joint+Full"], "ori"))
        gap = 100 * (p["avg_acc"] - at["Joint+Full"]["avg_acc"])
        add("Avg(PNC) - Avg(Joint+Full), points", gap, ">= -2", _at_least(gap, -2), behind(at["Joint+Full"]))
    if records:
        mean = sum(s["regret"] for s in records) / len(records)
        tuned = all(s.get("regret_basis") == "tuned" for s in records)
        add(
            f"mean selection regret (finalists{', tuned' if tuned else ''}), points",
            mean,
            "<= 0.5",
            mean <= 0.5,
            lambda: _regret_diagnosis(records),
        )
    if "Direct Ensemble" in at:
        ratio = p["macs"] / at["Direct Ensemble"]["macs"]
        add("MACs(PNC) / MACs(Direct Ensemble)", ratio, "< 1", ratio < 1, lambda: "")
    if "Joint+Full" in at and at["Joint+Full"]["seconds"] > 0 and at["Joint+Full"]["peak_mb"] > 0:
        jf = at["Joint+Full"]
        ratio = p["seconds"] / jf["seconds"]
        comparable = p.get("cpus") == jf.get("cpus")  # rows cached from runs on other CPUs do not compare
        add(
            "seconds(PNC) / seconds(Joint+Full), same run",
            ratio if comparable else math.nan,
            "<= 0.25",
            comparable and ratio <= 0.25,
            lambda: (
                _time_diagnosis(p, jf, records)
                if comparable
                else f"not comparable: PNC's rows ran on {', '.join(p['cpus'])} and Joint+Full's on "
                f"{', '.join(jf['cpus'])}; rerun the table with --fresh on one machine"
            ),
        )
        ratio = p["peak_mb"] / jf["peak_mb"]
        add(
            "peak MiB(PNC) / peak MiB(Joint+Full)",
            ratio,
            "<= 2",
            ratio <= 2,
            lambda: f"PNC {p['peak_mb']:.0f} MiB vs Joint+Full {jf['peak_mb']:.0f} MiB",
        )
    return checks


def _accuracy_diagnosis(
    p: dict[str, Any],
    ref: dict[str, Any],
    part: str,
    names: list[str] | None,
    num_old: int | None,
    pretrained: dict[str, Any] | None,
) -> str:
    """Where PNC's ``part`` accuracy trails ``ref``'s: Ori and Tar side by side, the share
    of an Avg gap each gives (the pooled weight of Ori is the pre-trained target's Avg/Ori,
    its Tar being 0), the classes that trail most (the target's first ``num_old`` only, for
    Ori), and the seeds' spread."""
    pct = {k: 100 * p.get(f"{k}_acc", math.nan) for k in ("ori", "tar", "avg")}
    ref_pct = {k: 100 * ref.get(f"{k}_acc", math.nan) for k in ("ori", "tar", "avg")}
    text = [
        f"vs {ref['method']}: Ori {pct['ori']:.2f} vs {ref_pct['ori']:.2f}, "
        f"Tar {pct['tar']:.2f} vs {ref_pct['tar']:.2f}"
    ]
    if part == "avg" and pretrained is not None and pretrained.get("ori_acc"):
        w = pretrained["avg_acc"] / pretrained["ori_acc"]
        ori, tar = w * (pct["ori"] - ref_pct["ori"]), (1 - w) * (pct["tar"] - ref_pct["tar"])
        text.append(f"of the Avg gap, Ori gives {ori:+.2f} and Tar {tar:+.2f} points")
    if names and p.get("per_class") and ref.get("per_class") and len(names) == len(p["per_class"]):
        count = num_old if part == "ori" and num_old else len(names)
        deltas = sorted((100 * (a - b), n) for a, b, n in list(zip(p["per_class"], ref["per_class"], names))[:count])
        trailing = [f"{n} {d:+.1f}" for d, n in deltas[:3] if d < -0.05]
        if trailing:
            text.append("classes trailing most: " + ", ".join(trailing))
    spread = 100 * max(p.get(f"{part}_std", 0.0), ref.get(f"{part}_std", 0.0))
    if abs(pct[part] - ref_pct[part]) <= spread:
        text.append(f"within the seeds' spread ({part.capitalize()} std up to {spread:.2f})")
    return "; ".join(text)


def _regret_diagnosis(records: list[dict[str, Any]]) -> str:
    """The seeds whose chosen R is not the best finalist by test Avg."""
    return "; ".join(
        f"seed {s['seed']} chose {s['target_cut']}, best {s['best_cut']} (+{s['regret']:.2f})"
        for s in records
        if s["regret"] > 0
    )


def _time_diagnosis(p: dict[str, Any], jf: dict[str, Any], records: list[dict[str, Any]]) -> str:
    """PNC's seconds per phase of its profile and per candidate (means over seeds) against
    Joint+Full's, and the training MACs of its tuning against Joint+Full's training."""
    text = f"PNC {p['seconds']:.0f} s vs Joint+Full {jf['seconds']:.0f} s"
    if p.get("trained_macs") and jf.get("trained_macs"):
        text += (
            f"; the tuning alone trains {p['trained_macs'] / jf['trained_macs']:.2f}x the forward MACs of "
            f"Joint+Full's training ({p['trained_macs'] / 1e12:.2f} vs {jf['trained_macs'] / 1e12:.2f} TMAC: "
            "image passes x MACs of what trains)"
        )
    profiles = [s["profile"] for s in records if s.get("profile")]
    if not profiles:
        return text
    phases = {"search": "search", "tune_branch": "tuning", "frozen_outputs": "frozen outputs", "local_models": "G"}
    mean = {k: statistics.fmean(pr.get(k, 0.0) for pr in profiles) for k in phases}
    per_cut: dict[str, list[float]] = {}
    for s in records:
        for c in s["candidates"]:
            per_cut.setdefault(c["target_cut"], []).append(sum(c.get("phase_seconds", {}).values()))
    cuts = ", ".join(f"{cut} {statistics.fmean(v):.0f} s" for cut, v in per_cut.items())
    floor = p["seconds"] - statistics.fmean(other_candidates_seconds(s) for s in records)
    return (
        f"{text}; PNC per phase (mean of seeds): "
        + ", ".join(f"{label} {mean[k]:.0f} s" for k, label in phases.items())
        + (f"; the search per candidate R: {cuts}" if cuts else "")
        + (
            f"; with R known in advance (only the chosen candidate trained) {floor:.0f} s, "
            f"{floor / jf['seconds']:.2f}x Joint+Full"
            if cuts
            else ""
        )
    )


def _cell(entry: dict[str, Any] | None, part: str) -> str:
    if entry is None:
        return "-"
    mean, std = 100 * entry[f"{part}_acc"], 100 * entry[f"{part}_std"]
    text = f"{mean:.1f} ± {std:.1f}"
    delta = entry.get(f"delta_vs_{REFERENCE}")
    if delta is not None and entry["method"] not in NO_DELTA:
        text += f" ({100 * delta[part]:+.1f})"
    return text


def _old_images(old_fraction: float) -> str:
    if old_fraction <= 0:
        return "no image of the target's classes (strict setting, old fraction 0)"
    return f"{round(100 * old_fraction)}% of the target classes' training images (old fraction {old_fraction:g})"


def other_candidates_seconds(search: dict[str, Any]) -> float:
    """Seconds the candidates other than the chosen one took (their stages and held-out
    evaluations) in one search record (``target_cut`` and ``candidates`` with ``seconds``):
    what a search that knew R in advance would not spend. 0 when they were trained for the
    report only (``SearchConfig.choose="earliest"``: the row's seconds already leave them out)."""
    if "report_candidates" in search.get("profile", {}):
        return 0.0
    return sum(c["seconds"] for c in search["candidates"] if c["target_cut"] != search["target_cut"])


def selection_regret(search: dict[str, Any], accuracy: str = "accuracy") -> tuple[str, float]:
    """(best candidate's target cut by test Avg, regret in points = its test Avg minus the
    chosen candidate's) of one search record (``target_cut`` and ``candidates``), over the
    finalists (candidates dropped by successive halving have no test accuracy).

    accuracy: ``"accuracy"`` (the candidates as the search left them) or
    ``"tuned_accuracy"`` (each built and tuned as the chosen one is: the clones as they
    would ship, when the record has them; see :func:`tuned_regret_known`)."""
    cands = [c for c in search["candidates"] if c.get(accuracy)]
    best = max(cands, key=lambda c: c[accuracy]["avg"])
    chosen = next(c for c in cands if c["target_cut"] == search["target_cut"])
    return best["target_cut"], 100 * (best[accuracy]["avg"] - chosen[accuracy]["avg"])


def tuned_regret_known(search: dict[str, Any]) -> bool:
    """Whether every finalist of a search record was also tuned and tested (``tuned_accuracy``)."""
    finalists = [c for c in search["candidates"] if c["accuracy"]]
    return all(c.get("tuned_accuracy") for c in finalists)


def render_markdown(result: dict[str, Any]) -> str:
    """The Table-1-style markdown of a :func:`write_table` result: the accuracy table, costs,
    budget, PNC's per-seed search, goals and where it ran."""
    by = {(r["method"], r["scale"]): r for r in result["rows"]}
    lines = [
        *_accuracy_section(result, by),
        *_cost_section(result, by),
        *_budget_section(result["budget"]),
        *_search_section(result.get("pnc_search", []), result.get("validation", 0.0)),
        *_goals_section(result.get("goals", []), result.get("old_fraction", 0.3)),
    ]
    commits = sorted({r["commit"] for r in result["per_seed"]})
    devices = sorted({r.get("device", "cpu") for r in result["per_seed"]})  # rows before --device ran on the CPU
    lines += [
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores shared with other jobs, "
        f"torch {result['machine']['torch']} ({result['machine']['torch_threads']} thread(s)), "
        f"device {', '.join(devices)}.{_row_cpus(result)} "
        f"Code: commit(s) {', '.join(commits)}. Command: `{result['command']}`.",
        "",
    ]
    return "\n".join(lines)


def _accuracy_section(result: dict[str, Any], by: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    scales, methods = result["scales"], result["methods"]
    lines = [
        f"# {result['title']}",
        "",
        f"Target `{result['target']}` (classes {result['target_classes']}), source `{result['source']}` "
        f"(classes {result['source_classes']}); S clones {result['clone_classes'].get('S', '-')}, "
        f"M clones {result['clone_classes'].get('M', '-')}, from {round(100 * result['fraction'])}% of their "
        f"training images and {_old_images(result.get('old_fraction', 0.0))} (Joint+Full sees all training "
        f"images of both sets){_validation_note(result.get('validation', 0.0))}. Accuracies in %, mean ± "
        f"sample std over seeds {result['seeds']}; in "
        f"brackets the difference to {REFERENCE}, in points, as the paper prints it (not for the reference "
        "rows). Ori/Tar/Avg: test images of the target's / the cloned classes / both pooled, argmax over all "
        "outputs.",
        "",
        "| Method | " + " | ".join(f"Ori-{s} | Tar-{s} | Avg-{s}" for s in scales) + " |",
        "|---|" + "---|" * (3 * len(scales)),
    ]
    for m in methods:
        cells = [_cell(by.get((m, s)), p) for s in scales for p in ("ori", "tar", "avg")]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def _reporting_memory(result: dict[str, Any]) -> str:
    """Whether the PNC rows' peak memory covers the work done only to report the finalists'
    accuracy (rows written before ``peak_without_reporting`` was recorded do)."""
    pnc_rows = [r for r in result.get("per_seed", []) if r["method"].startswith("PNC")]
    if pnc_rows and all(r.get("peak_without_reporting") for r in pnc_rows):
        return "PNC's leave out the finalists' accuracy, computed only for the selection regret, as its seconds do"
    return "PNC's include the finalists' accuracy, computed only for the selection regret, which its seconds leave out"


def _cost_section(result: dict[str, Any], by: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    lines = [
        "",
        "## Cost",
        "",
        "Wall time of building/training the model (seconds, mean over seeds) and peak resident memory "
        "above the level at the method's start (MiB, sampled every 5 ms from /proc/self/statm; "
        f"{_reporting_memory(result)}); "
        "inference MACs per image (torch FlopCounterMode, convolutions and matrix products, / 2) "
        "and parameters used at inference.",
        "",
        "| Method | Scale | seconds | peak MiB | MACs / image | params |",
        "|---|---|---|---|---|---|",
    ]
    for s in result["scales"]:
        for m in result["methods"]:
            e = by.get((m, s))
            if e is not None:
                lines.append(
                    f"| {m} | {s} | {e['seconds']:.1f} | {e['peak_mb']:.0f} | {e['macs']:,.0f} | {e['params']:,.0f} |"
                )
    return lines


def _budget_section(budget: dict[str, Any]) -> list[str]:
    per_candidate = budget["loc_epochs"] + budget["joint_epochs"] + budget["binary_epochs"]
    halving = (
        "every candidate trains to the end (successive halving is opt-in)"
        if SearchConfig().keep_fraction >= 1
        else "after localize + joint the candidates clearly worse than the best are dropped"
    )
    return [
        "",
        f"Budget: PNC trains {budget['loc_epochs']} + {budget['joint_epochs']} + {budget['binary_epochs']} "
        f"(localize + joint + binary) epochs per candidate cut R (an epoch: a pass over the clone classes' "
        f"images, batches drawn from all available images; {halving}), then fine-tunes the chosen branch for "
        f"{SearchConfig().tune_epochs} passes over all available images; Continual, Continual+KD (with and without "
        f"its cross-entropy term) and PNC-F's "
        f"fine-tuning run the same {per_candidate} epochs over the available images "
        f"(SGD, batch {budget['batch_size']}, "
        f"Nesterov 0.9, wd 5e-4, cosine; lr {budget['lr']}, PNC-F lr {budget['finetune_lr']} with BatchNorm "
        f"frozen); KD temperature {budget['kd_temperature']}. Joint+Full: the target architecture from scratch, "
        f"the target's zoo recipe ({budget['scratch_epochs']} epochs, lr {budget['scratch_lr']}). G: "
        f"{budget['num_masks']} masks on {int(100 * budget['g_fraction'])}% of the clone set, at most the "
        f"{math.ceil(SearchConfig().loc_pool / budget['num_masks'])} images whose pairs L_loc draws. PNC-F resumes "
        "PNC's checkpointed search, so its time is mostly G and the fine-tuning.",
        "",
    ]


def _validation_note(validation: float) -> str:
    if not validation:
        return ""
    return (
        f"; training images are those left after the validation rows, {round(100 * validation)}% of each "
        "class's, which neither zoo model was trained on and PNC chooses R on"
    )


def held_out_images(validation: float) -> str:
    """What PNC chose R on, for a table's text: the validation rows of a ``validation`` share,
    else (0) held-out available images."""
    if validation:
        return (
            f"the validation rows of the task's classes ({round(100 * validation)}% of each class's training "
            "images, never trained on by either zoo model)"
        )
    return "held-out available images"


def _search_section(search: list[dict[str, Any]], validation: float = 0.0) -> list[str]:
    if not search:
        return []
    held = held_out_images(validation)
    rules = {s.get("choose", "loss") for s in search}
    chosen_how = []
    if "earliest" in rules:
        chosen_how.append(
            "R is the earliest cut an adapter maps, the largest branch (`SearchConfig.choose='earliest'`, the "
            f"default with old-class images{'' if rules == {'earliest'} else ', in the rows that say so'}): a "
            f"clone trains only that candidate, and {held} only decide whether its tuning is kept (never test "
            "images); here every other candidate is trained after it too, for the report only (left out of "
            "PNC's seconds and of its peak memory's samples). "
        )
    if "loss" in rules:
        chosen_how.append(
            f"{'Elsewhere ' if len(rules) > 1 else ''}R is chosen by the least selection loss on {held} (never "
            "test images): held-out joint error with old-class images, held-out KD to the direct ensemble "
            "without. With successive halving (`keep_fraction` < 1) the candidates clearly worse after the "
            "first stage are dropped. "
        )
    lines = [
        "## PNC's search (per seed)",
        "",
        "".join(chosen_how) + "Regret = test Avg of the best finalist minus that of the chosen one, in points: "
        "with every finalist built and tuned as the chosen one is (`tuned`: the clones as they would ship; "
        "their test accuracy after `->`), else as the search left them; `before tuning`: the latter.",
        "",
        "| Method | Scale | seed | chosen R (target) | R' (source) | kept | best R (test Avg) | regret | "
        "regret before tuning | candidates: R -> selection loss, Ori/Tar/Avg % [-> tuned] |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def accuracies(acc: dict[str, float]) -> str:
        return f"{100 * acc['ori']:.1f}/{100 * acc['tar']:.1f}/{100 * acc['avg']:.1f}"

    for s in search:
        cands = "; ".join(
            f"{c['target_cut']} -> {c['loss']:.4f}, "
            + (
                accuracies(c["accuracy"])
                + (f" -> {accuracies(c['tuned_accuracy'])}" if c.get("tuned_accuracy") else "")
                if c["accuracy"]
                else f"dropped after {c.get('stage', '?')}"
            )
            for c in s["candidates"]
        )
        basis = s.get("regret_basis", "before tuning")
        lines.append(
            f"| {s['method']} | {s['scale']} | {s['seed']} | {s['target_cut']} | {s['source_cut']} | "
            f"{s['kept_fraction']:.2f} | {s['best_cut']} | {s['regret']:.2f} ({basis}) | "
            f"{s.get('regret_before_tuning', s['regret']):.2f} | {cands} |"
        )
    skipped = [(s, reason.split(";")[0]) for s in search for reason in s.get("skipped", [])]
    if skipped:
        lines += [
            "",
            "Candidate pairs skipped (no adapter maps their layouts, or R' leaves nothing of the source to clone):",
            "",
        ]
        lines += [f"- {s['method']} {s['scale']} seed {s['seed']}: {reason}" for s, reason in skipped]
    lines.append("")
    return lines


def _goals_section(goals: list[dict[str, Any]], old_fraction: float = 0.3) -> list[str]:
    if not goals:
        return []
    lines = ["## Goals", ""]
    if old_fraction <= 0:
        lines += [
            "The clone-quality goals are set for the paper's setting (old fraction 0.3); without any "
            "image of the target's classes no method can tell them from the source's confusions, and the "
            "goal here is only that PNC does no worse than the earlier search did. The checks are listed "
            "for reference.",
            "",
        ]
    lines += ["| Scale | Goal | Value | Need | Met |", "|---|---|---|---|---|"]
    for g in goals:
        lines.append(f"| {g['scale']} | {g['goal']} | {g['value']} | {g['need']} | {'yes' if g['met'] else 'NO'} |")
    lines.append("")
    missed = [g for g in goals if not g["met"] and g.get("diagnosis")]
    if missed:
        lines += ["Missed goals, measured on the same rows (means over seeds, in points or seconds):", ""]
        lines += [f"- {g['scale']}, {g['goal']} = {g['value']}: {g['diagnosis']}." for g in missed]
        lines.append("")
    return lines


def write_table(
    spec: TableSpec,
    per_seed: list[dict[str, Any]],
    t_card: ModelCard,
    s_card: ModelCard,
    splits: DatasetSplits,
    out_dir: Path,
    command: str,
) -> dict[str, Any]:
    """Write ``<stem>.json`` and ``<stem>.md`` under ``out_dir``; returns the JSON object."""
    rows = summarize(per_seed, spec.methods, spec.scales)
    clone_classes = {s: CloneTask(splits, t_card.classes, s_card.classes, s).clone_classes for s in spec.scales}
    class_names = output_class_names(splits, t_card, s_card, spec.scales)
    search = [
        {
            "method": r["method"],
            "scale": r["scale"],
            "seed": r["seed"],
            **{k: r["details"]["report"][k] for k in ("target_cut", "source_cut", "kept_fraction", "candidates")},
            "skipped": r["details"]["report"].get("skipped", []),
            "profile": r["details"]["report"].get("profile", {}),
            "choose": r["details"]["report"]["settings"]["search"].get("choose") or "loss",
        }
        for r in per_seed
        if r["method"].startswith("PNC") and "report" in r["details"]
    ]
    for s in search:
        s["regret_before_tuning"] = selection_regret(s)[1]
        s["regret_basis"] = "tuned" if tuned_regret_known(s) else "before tuning"
        s["best_cut"], s["regret"] = selection_regret(
            s, "tuned_accuracy" if s["regret_basis"] == "tuned" else "accuracy"
        )
    result = {
        "title": spec.title,
        "dataset": splits.name,
        "arch": t_card.arch,
        "source_arch": s_card.arch,
        "target": spec.target,
        "source": spec.source,
        "target_sha256": t_card.sha256,  # the weights every row ran on (rows of other weights are not reused)
        "source_sha256": s_card.sha256,
        "target_classes": t_card.classes,
        "source_classes": s_card.classes,
        "clone_classes": clone_classes,
        "fraction": spec.fraction,
        "old_fraction": spec.old_fraction,
        "validation": shared_validation(t_card, s_card),
        "stem": spec.stem,
        "scales": spec.scales,
        "seeds": spec.seeds,
        "methods": spec.methods,
        "budget": asdict(spec.budget),
        "rows": rows,
        "goals": goal_checks(rows, search, class_names, len(t_card.classes)),
        "pnc_search": search,
        "per_seed": [{k: v for k, v in r.items() if k not in ("details", "hparams")} for r in per_seed],
        "hparams": {r["method"]: r["hparams"] for r in per_seed},
        "machine": machine_info(),
        "command": command,
    }
    write_result(Path(out_dir), spec.stem, result)
    return result


def write_result(out_dir: Path, stem: str, result: dict[str, Any]) -> None:
    """``<stem>.json`` and ``<stem>.md`` of a table's ``result`` under ``out_dir``."""
    write_json_md(out_dir / stem, result, render_markdown(result))


def recheck_goals(result: dict[str, Any], classes: Sequence[str]) -> dict[str, Any]:
    """A written table's ``result`` with its goals recomputed from its rows by this code's
    checks and diagnoses (no row is rerun): for a change in what a Goals section says.
    classes: the dataset's class names, by class index."""
    names = {
        scale: [classes[c] for c in [*result["target_classes"], *clone]]
        for scale, clone in result["clone_classes"].items()
    }
    goals = goal_checks(result["rows"], result["pnc_search"], names, len(result["target_classes"]))
    return result | {"goals": goals}


def setting_suffix(old_fraction: float) -> str:
    """What a table's stem adds for its data setting: nothing for the paper's (0.3),
    ``-old<percent>`` otherwise (``-old0``: the strict setting)."""
    return "" if old_fraction == 0.3 else f"-old{round(100 * old_fraction)}"


def output_class_names(
    splits: DatasetSplits, t_card: ModelCard, s_card: ModelCard, scales: Sequence[str]
) -> dict[str, list[str]]:
    """Scale -> the cloned network's output class names: the target's classes, then the
    clone classes of that scale (the order of a row's ``per_class``)."""
    return {
        s: [
            splits.classes[c]
            for c in [*t_card.classes, *CloneTask(splits, t_card.classes, s_card.classes, s).clone_classes]
        ]
        for s in scales
    }


def budget_for(card: ModelCard, quick: bool) -> Budget:
    """The default budget, Joint+Full on the target's own zoo recipe (tiny with ``quick``)."""
    base = QUICK_BUDGET if quick else Budget()
    if quick:
        return base
    recipe = card.recipe
    return Budget(
        **{
            **asdict(base),
            "scratch_epochs": int(recipe.get("epochs", base.scratch_epochs)),
            "scratch_lr": float(recipe.get("lr", base.scratch_lr)),
            "scratch_batch_size": int(recipe.get("batch_size", base.scratch_batch_size)),
        }
    )


def run_paper(
    dataset: str,
    arch: str,
    *,
    scales: list[str],
    seeds: list[int],
    methods: list[str],
    quick: bool = False,
    old_fraction: float = 0.3,
    zoo_dir: str | None = None,
    data_dir: str | None = None,
    out_dir: Path = Path("benchmarks/results"),
    workdir: Path | None = None,
    fresh: bool = False,
    command: str = "",
    log: Callable[[str], None] = print,
    pair: tuple[str, str] | None = None,
    device: DeviceLike | None = None,
    backend: str = "inprocess",
    address: str | None = None,
) -> dict[str, Any]:
    """Table 1 on ``dataset`` with the default (target, source) zoo pair of ``arch``, or on
    the zoo models ``pair`` = (target, source) (any dataset the zoo can load; ``dataset`` and
    ``arch`` then come from their cards). An ``old_fraction`` other than the default 0.3 is
    named in the stem (``-old0`` for 0). Every method trains and is evaluated on ``device``.
    ``backend="ray"``: the rows run as Ray tasks (:func:`run_table`), on the cluster at
    ``address`` or a local Ray."""
    from pnc.zoo.datasets import load_dataset
    from pnc.zoo.defaults import default_pair, ensure_default
    from pnc.zoo.store import default_zoo_dir

    store = ZooStore(zoo_dir)
    if pair is not None:
        target_name, source_name = pair
        t_card, s_card = store.card(target_name), store.card(source_name)
        if t_card.dataset != s_card.dataset:
            raise TaskError(
                f"target {target_name!r} is on {t_card.dataset} but source {source_name!r} on "
                f"{s_card.dataset}; benchmark a pair of the same dataset"
            )
        splits = load_dataset(t_card.dataset, data_dir)
        arch = f"{target_name}-{source_name}"
    else:
        splits = load_dataset(dataset, data_dir)
        target_name, source_name = default_pair(splits.name, arch)
        t_card = ensure_default(store, target_name, dataset=splits, progress=False, device=device)
        s_card = ensure_default(store, source_name, dataset=splits, progress=False, device=device)
    base = f"table1-{splits.name}-{arch}"
    stem = base + setting_suffix(old_fraction) + ("-quick" if quick else "")
    spec = TableSpec(
        stem=stem,
        title=f"Table 1 analogue: {splits.name}, {arch} target and source" + (" (quick budget)" if quick else ""),
        target=target_name,
        source=source_name,
        scales=scales,
        seeds=seeds,
        methods=methods,
        budget=budget_for(t_card, quick),
        old_fraction=old_fraction,
    )
    cache = RowCache(Path(out_dir) / f"{stem}.rows.json", fresh)
    workdir = Path(workdir) if workdir is not None else default_zoo_dir(zoo_dir).parent / "bench"
    shared = None
    if old_fraction != 0.3:  # the paper's setting's table holds the setting-free rows
        shared = RowCache(Path(out_dir) / f"{base}{'-quick' if quick else ''}.rows.json")
    per_seed = run_table(
        spec, store, splits, cache, workdir, log=log, shared=shared, device=device, backend=backend, address=address
    )
    return write_table(spec, per_seed, t_card, s_card, splits, out_dir, command)
