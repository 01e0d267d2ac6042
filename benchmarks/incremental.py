"""Table-3-style class-incremental run: the target knows half the classes; the others are
added ``step_size`` at a time, by PNC (one more branch per step on the same cloned network,
``clone(..., into=net)``) or by sequential fine-tuning (Continual, Continual + KD).

After step k the model is tested on the test images of every class seen so far (labels =
output positions: the target's classes, then the added ones in order); the average
incremental accuracy is the mean over steps 0..K, step 0 being the target alone. The
direct ensemble (target + the source's logits of the classes added so far) is the
reference that costs both networks. Each step sees the same images for every method: a
``fraction`` of its new classes' training images and an ``old_fraction`` of the target's
classes' ones (0: its new classes' only, the strict setting), with the budget of
:class:`Budget`. Continual+KD then distils, per image, the previous model's logits on
old-class images and the source's on new-class ones (the arbitrating teacher of Table 1).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pnc.bench.baselines import Budget, DirectEnsemble, budget_fields, fit_continual, search_key
from pnc.bench.metrics import inference_macs, logits_of
from pnc.bench.paper import RowCache, machine_info
from pnc.bench.results_files import write_json_md
from pnc.surgery.cloning import clone
from pnc.surgery.devices import DeviceLike, device_of
from pnc.zoo.datasets import DatasetSplits, ImageData
from pnc.zoo.store import ZooStore
from pnc.zoo.tasks import CloneTask, select_classes, shared_validation

__all__ = ["incremental_run", "run_incremental", "INCREMENTAL_METHODS"]

INCREMENTAL_METHODS = ["Direct Ensemble", "Continual", "Continual+KD", "PNC"]


def _accuracy(model: nn.Module, data: ImageData) -> float:
    predicted = logits_of(model, data.x).argmax(1)
    return float((predicted == data.y.to(predicted.device)).float().mean())


def incremental_run(
    method: str,
    splits: DatasetSplits,
    target: nn.Module,
    source: nn.Module,
    t_classes: list[int],
    s_classes: list[int],
    step_size: int,
    seed: int,
    budget: Budget,
    fraction: float = 0.3,
    old_fraction: float = 0.3,
    validation: float = 0.0,
    workdir: Path | None = None,
) -> dict[str, Any]:
    """Add ``s_classes`` to the target ``step_size`` classes at a time with ``method``.

    Returns ``{"accuracy": [step 0, step 1, ...], "seconds": [...], "macs": final MACs per image}``."""
    steps = [s_classes[i : i + step_size] for i in range(0, len(s_classes), step_size)]
    seen = list(t_classes)
    accuracy = [_accuracy(target, select_classes(splits.test, seen))]
    seconds: list[float] = []
    model: Any = target
    for k, new in enumerate(steps):
        task = CloneTask(
            splits,
            t_classes,
            s_classes,
            new,
            fraction=fraction,
            seed=seed + 1000 * k,
            old_fraction=old_fraction,
            validation=validation,
        )
        began = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + k)
            model = _step(method, model, task, target, source, len(seen), seed + k, budget, workdir, k)
        seconds.append(time.perf_counter() - began)
        seen += new
        accuracy.append(_accuracy(model, select_classes(splits.test, seen)))
    example = splits.test.x[:1]
    return {
        "accuracy": accuracy,
        "seconds": seconds,
        "macs": inference_macs(model, example),
        "steps": steps,
        "average_incremental_accuracy": statistics.fmean(accuracy),
    }


def _step(
    method: str,
    model: Any,
    task: CloneTask,
    target: nn.Module,
    source: nn.Module,
    num_seen: int,
    seed: int,
    budget: Budget,
    workdir: Path | None,
    k: int,
) -> Any:
    index = task.source_label_index()
    if method == "Direct Ensemble":  # one source pass, its logits of every class added so far
        return DirectEnsemble(target, source, [*(model.index if isinstance(model, DirectEnsemble) else []), *index])
    if method == "PNC":
        return clone(
            target,
            source,
            **task.clone_inputs(),
            config=budget.search(seed),
            into=model if k else None,
            name=f"step{k}",
            g_fraction=budget.g_fraction,
            num_masks=budget.num_masks,
            checkpoint_dir=None if workdir is None else Path(workdir) / f"step{k}",
            progress=False,
        )
    data = task.available_set()
    n_old = len(task.target_classes)
    new_y = torch.where(data.y >= n_old, data.y - n_old + num_seen, data.y)  # new classes after the seen ones
    return fit_continual(
        model, num_seen, source, index, ImageData(data.x, new_y), seed, budget, kd=method == "Continual+KD"
    )[0]


def run_incremental(
    dataset: str,
    arch: str,
    *,
    step_sizes: list[int],
    seeds: list[int],
    methods: list[str],
    old_fraction: float = 0.3,
    quick: bool = False,
    zoo_dir: str | None = None,
    data_dir: str | None = None,
    out_dir: Path = Path("benchmarks/results"),
    workdir: Path | None = None,
    fresh: bool = False,
    command: str = "",
    log: Callable[[str], None] = print,
    device: DeviceLike | None = None,
) -> Path:
    """The Table 3 analogue for the default zoo pair of ``arch``, run on ``device``; returns the
    markdown path."""
    from pnc.bench.paper import QUICK_BUDGET, budget_for, setting_suffix
    from pnc.zoo.datasets import load_dataset
    from pnc.zoo.defaults import default_pair, ensure_default
    from pnc.zoo.store import default_zoo_dir

    store = ZooStore(zoo_dir)
    splits = load_dataset(dataset, data_dir)
    target_name, source_name = default_pair(splits.name, arch)
    ensure_default(store, target_name, dataset=splits, progress=False, device=device)
    ensure_default(store, source_name, dataset=splits, progress=False, device=device)
    target, t_card = store.load(target_name, device)
    source, s_card = store.load(source_name, device)
    budget = QUICK_BUDGET if quick else budget_for(t_card, quick)
    stem = f"table3-{splits.name}-{arch}" + setting_suffix(old_fraction) + ("-quick" if quick else "")
    cache = RowCache(Path(out_dir) / f"{stem}.rows.json", fresh)
    workdir = (Path(workdir) if workdir is not None else default_zoo_dir(zoo_dir).parent / "bench") / stem
    runs = []
    for step_size in step_sizes:
        for seed in seeds:
            for method in methods:
                key = f"{method}|{step_size}|{seed}"
                fingerprint = json.dumps(
                    [
                        budget_fields(budget, method),
                        search_key(budget, method, old_fraction > 0),
                        t_card.sha256,
                        s_card.sha256,
                        old_fraction,
                    ]
                )
                row = cache.get(key, fingerprint)
                if row is None:
                    row = incremental_run(
                        method,
                        splits,
                        target,
                        source,
                        t_card.classes,
                        s_card.classes,
                        step_size,
                        seed,
                        budget,
                        old_fraction=old_fraction,
                        validation=shared_validation(t_card, s_card),
                        workdir=workdir / f"{method}-{step_size}-{seed}".replace(" ", "_"),
                    )
                    row |= {"method": method, "step_size": step_size, "seed": seed, "fingerprint": fingerprint}
                    cache.put(key, row)
                log(
                    f"{stem}: {method:>15} step {step_size} seed {seed}: "
                    + " ".join(f"{a:.3f}" for a in row["accuracy"])
                    + f"  avg inc {row['average_incremental_accuracy']:.4f}"
                )
                runs.append(row)
    result = {
        "dataset": splits.name,
        "arch": arch,
        "target": target_name,
        "source": source_name,
        "target_sha256": t_card.sha256,
        "source_sha256": s_card.sha256,
        "target_classes": t_card.classes,
        "source_classes": s_card.classes,
        "old_fraction": old_fraction,
        "budget": asdict(budget),
        "runs": runs,
        "summary": _summary(runs, methods, step_sizes),
        "machine": machine_info(),
        "device": str(device_of(target)),
        "command": command,
    }
    out_dir = Path(out_dir)
    md = write_json_md(out_dir / stem, result, _markdown(result, stem))
    _plot(result, out_dir / f"{stem}.png")
    return md


def _summary(runs: list[dict[str, Any]], methods: list[str], step_sizes: list[int]) -> list[dict[str, Any]]:
    out = []
    for step_size in step_sizes:
        for method in methods:
            rows = [r for r in runs if r["method"] == method and r["step_size"] == step_size]
            if not rows:
                continue
            curves = list(zip(*[r["accuracy"] for r in rows]))
            avgs = [r["average_incremental_accuracy"] for r in rows]
            out.append(
                {
                    "method": method,
                    "step_size": step_size,
                    "seeds": [r["seed"] for r in rows],
                    "accuracy": [statistics.fmean(c) for c in curves],
                    "average_incremental_accuracy": statistics.fmean(avgs),
                    "average_incremental_std": statistics.stdev(avgs) if len(avgs) > 1 else 0.0,
                    "seconds": statistics.fmean(sum(r["seconds"]) for r in rows),
                    "macs": rows[0]["macs"],
                }
            )
    return out


def _markdown(result: dict[str, Any], stem: str) -> str:
    lines = [
        f"# Table 3 analogue: class-incremental {result['dataset']}, {result['arch']}",
        "",
        f"![curves]({stem}.png)",
        "",
        f"Target `{result['target']}` knows classes {result['target_classes']}; classes "
        f"{result['source_classes']} are added `step` at a time from `{result['source']}`, each step from "
        f"30% of its new classes' training images and {_share(result['old_fraction'])} of the target's classes' "
        "ones, the same images for every method. Accuracy (%) on the test images of all classes "
        "seen so far, after each step (step 0 = the target alone); average incremental accuracy = mean over "
        "steps 0..K (mean ± std over seeds). PNC adds one branch per step to the same cloned network.",
        "",
    ]
    for step_size in sorted({s["step_size"] for s in result["summary"]}):
        rows = [s for s in result["summary"] if s["step_size"] == step_size]
        k = len(rows[0]["accuracy"])
        lines += [
            f"## step = {step_size} class(es)",
            "",
            "| Method | "
            + " | ".join(f"after {i}" for i in range(k))
            + " | avg incremental | seconds | MACs / image |",
            "|---|" + "---|" * (k + 3),
        ]
        for s in rows:
            lines.append(
                f"| {s['method']} | "
                + " | ".join(f"{100 * a:.1f}" for a in s["accuracy"])
                + f" | {100 * s['average_incremental_accuracy']:.1f} ± {100 * s['average_incremental_std']:.1f}"
                f" | {s['seconds']:.0f} | {s['macs']:,} |"
            )
        lines.append("")
    b = result["budget"]
    lines += [
        f"Budget per step: PNC {b['loc_epochs']}+{b['joint_epochs']}+{b['binary_epochs']} epochs per candidate "
        f"cut; Continual / Continual+KD {b['loc_epochs'] + b['joint_epochs'] + b['binary_epochs']} epochs (SGD lr "
        f"{b['lr']}); Continual+KD distils the previous model's logits on old-class images and the source's "
        "logits of the new classes on new-class ones (without old-class images: their concatenation on every "
        f"image). Machine: {result['machine']['cpu']}. Command: `{result['command']}`.",
        "",
    ]
    return "\n".join(lines)


def _share(fraction: float) -> str:
    return f"{round(100 * fraction)}%" if fraction else "none"


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pnc.bench.figures import save_figure

    sizes = sorted({s["step_size"] for s in result["summary"]})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 3.6), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for s in (s for s in result["summary"] if s["step_size"] == size):
            n = len(result["target_classes"])
            xs = [n + min(i * size, len(result["source_classes"])) for i in range(len(s["accuracy"]))]
            ax.plot(xs, [100 * a for a in s["accuracy"]], "o-", label=s["method"])
        ax.set_xlabel("classes known")
        ax.set_ylabel("accuracy on seen classes (%)")
        ax.set_title(f"step = {size}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
