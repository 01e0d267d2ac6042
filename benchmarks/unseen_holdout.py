"""Held-out images the zoo models were trained on vs images they never saw: does the choice move?

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/unseen_holdout.py --seeds 0,1,2 --scale M \\
        --variants '[{"tune_lr": 0.006}]'

The default zoo models train on every training image of their classes, and a clone's
held-out images (which choose R and keep or drop the tuning) come from the same images
(``benchmarks/results/seen_images.md``). Here a default Fashion-MNIST pair (``--arch``:
LeNet-5 or ResNetC-20) is retrained with its zoo recipes on all but a seeded ``--reserve``
share of each class's training images (in a zoo folder of this run, never the user's),
and each clone is run twice on the
same training images (a ``CloneTask``'s available images, less the share ``clone()`` would
hold out): once with ``clone()``'s own held-out images (seen by both networks), once with as
many reserved images per class (``clone(..., holdout=...)``, seen by neither). Per seed,
variant and kind of held-out images: R, the held-out accuracy after the tuning, Ori / Tar /
Avg on the test images. Writes ``benchmarks/results/unseen_holdout-<arch>-<scale>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from pnc.bench.metrics import clone_accuracy, set_logits
from pnc.bench.paper import QUICK_BUDGET, budget_for, machine_info
from pnc.bench.results_files import write_json_md
from pnc.surgery.cloning import clone
from pnc.surgery.insertion import split_holdout
from pnc.zoo.datasets import DatasetSplits, ImageData, load_dataset
from pnc.zoo.defaults import DEFAULTS
from pnc.zoo.store import ZooStore
from pnc.zoo.tasks import CloneTask, parse_classes

OUT = Path(__file__).resolve().parent / "results"


def reserve(splits: DatasetSplits, share: float, seed: int) -> tuple[DatasetSplits, ImageData]:
    """``splits`` without a seeded ``share`` of each class's training images, and those images."""
    kept, reserved = split_holdout(splits.train.y, share, seed)
    return replace(splits, train=splits.train.subset(kept)), splits.train.subset(reserved)


def unseen_like(held_y: torch.Tensor, pool: ImageData, task: CloneTask, seed: int) -> tuple[torch.Tensor, ...]:
    """As many images per cloned-network label as ``held_y`` (N,) has, drawn (seeded) from the
    reserved ``pool`` (dataset labels), with the cloned network's labels."""
    outputs = [*task.target_classes, *task.clone_classes]  # dataset class of each output
    gen = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for label in held_y.unique(sorted=True).tolist():
        members = torch.nonzero(pool.y == outputs[label]).flatten()
        order = torch.randperm(len(members), generator=gen, device=gen.device).to(members.device)
        pick = members[order[: int((held_y == label).sum())]]
        xs.append(pool.x[pick])
        ys.append(torch.full((len(pick),), label, dtype=torch.int64, device=pool.y.device))
    return torch.cat(xs), torch.cat(ys)


def run(args: argparse.Namespace, zoo: Path) -> dict[str, Any]:
    splits, pool = reserve(load_dataset("fashion-mnist"), args.reserve, seed=12345)
    store = ZooStore(zoo)
    pair = (f"fmnist-{args.arch}-target", f"fmnist-{args.arch}-source")
    cards = []
    for name in pair:
        spec = DEFAULTS[name]
        cards.append(spec.train(store, splits, parse_classes(spec.classes, splits.classes), progress=False))
    (target, t_card), (source, s_card) = store.load(pair[0]), store.load(pair[1])
    budget = QUICK_BUDGET if args.quick else budget_for(t_card, quick=False)
    variants = [{}, *[v for v in json.loads(args.variants) if v]]
    runs = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        task = CloneTask(splits, t_card.classes, s_card.classes, args.scale, seed=seed, old_fraction=0.3)
        inputs = task.clone_inputs()
        pooled = task.eval_sets()["avg"]
        for overrides in variants:
            config = budget.search(seed, **overrides)
            train_idx, held_idx = split_holdout(inputs["labels"], config.holdout, config.seed)
            unseen = unseen_like(inputs["labels"][held_idx], pool, task, seed)
            for kind in ("seen", "unseen"):
                data = dict(inputs)
                extra: dict[str, Any] = {}
                if kind == "unseen":  # the same training images; the held-out ones from the reserve
                    data["images"], data["labels"] = inputs["images"][train_idx], inputs["labels"][train_idx]
                    extra["holdout"] = unseen
                net = clone(target, source, **data, config=config, progress=False, **extra)
                report = next(iter(net.branches.values())).report
                acc = clone_accuracy(set_logits(net, pooled), pooled.y, len(task.target_classes))
                tuning = report.tuning or {}
                runs.append(
                    {
                        "seed": seed,
                        "variant": overrides,
                        "holdout": kind,
                        "target_cut": report.target_cut,
                        "holdout_acc": 100 * tuning["after"]["acc"] if tuning else None,
                        "tuning_kept": tuning.get("kept"),
                        **{k: 100 * float(v) for k, v in acc.items()},
                    }
                )
                print(json.dumps(runs[-1]), flush=True)
    return {
        "arch": args.arch,
        "scale": args.scale,
        "reserve": args.reserve,
        "zoo_test_accuracy": {c.name: c.test_accuracy for c in cards},
        "variants": variants,
        "runs": runs,
        "machine": machine_info(),
    }


def render(result: dict[str, Any], command: str) -> str:
    lines = [
        f"# Held-out images seen by the zoo models or not: Fashion-MNIST {result['arch']} pair, {result['scale']}, "
        "old fraction 0.3",
        "",
        f"Both zoo models retrained with their recipes on all but {100 * result['reserve']:g}% of each class's "
        "training images (test accuracy: "
        + ", ".join(f"{k} {100 * v:.2f}%" for k, v in result["zoo_test_accuracy"].items())
        + "). Each clone twice on the same training images: held-out images from the available ones (`seen`: "
        "both networks trained on them, as by default) or as many from the reserved images (`unseen`). Held-out: "
        "the chosen branch's held-out accuracy after its tuning (%); Ori / Tar / Avg on the test images.",
        "",
        "| variant | seed | held-out images | R | held-out acc | Ori | Tar | Avg | held-out - Avg |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        held = r["holdout_acc"]
        lines.append(
            f"| {json.dumps(r['variant'])} | {r['seed']} | {r['holdout']} | {r['target_cut']} | "
            f"{held:.2f} | {r['ori']:.2f} | {r['tar']:.2f} | {r['avg']:.2f} | {held - r['avg']:+.2f} |"
        )
    lines += ["", "| variant | held-out images | mean held-out acc | mean Avg | mean gap |", "|---|---|---|---|---|"]
    for v in result["variants"]:
        for kind in ("seen", "unseen"):
            rows = [r for r in result["runs"] if r["variant"] == v and r["holdout"] == kind]
            held, avg = statistics.fmean(r["holdout_acc"] for r in rows), statistics.fmean(r["avg"] for r in rows)
            lines.append(f"| {json.dumps(v)} | {kind} | {held:.2f} | {avg:.2f} | {held - avg:+.2f} |")
    lines += ["", f"Machine: {result['machine']['cpu']}. Command: `{command}`.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="lenet5", choices=["lenet5", "resnetc20"], help="the default pair")
    parser.add_argument("--scale", default="M", help="S or M")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--reserve", type=float, default=0.2, help="share of each class never trained on")
    parser.add_argument("--variants", default="[]", help="a JSON list of SearchConfig overrides")
    parser.add_argument("--quick", action="store_true", help="the tiny search budget (a smoke run)")
    args = parser.parse_args()
    command = " ".join(
        ["OMP_NUM_THREADS=1 .venv/bin/python benchmarks/unseen_holdout.py", *(shlex.quote(a) for a in sys.argv[1:])]
    )
    with tempfile.TemporaryDirectory() as zoo:
        result = run(args, Path(zoo)) | {"command": command}
    stem = f"unseen_holdout-{args.arch}-{args.scale}{'-quick' if args.quick else ''}"
    write_json_md(OUT / stem, result, render(result, command))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
