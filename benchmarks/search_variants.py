"""PNC on one zoo pair with search settings changed, per seed, beside the defaults.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/search_variants.py \\
        --target fmnist-lenet5-target --source fmnist-lenet5-source --scale M --seeds 0,1,2 \\
        --variants '[{"tune_epochs": 20}, {"ce_weight": 3.0}]'

Each variant is a dict of :class:`pnc.surgery.insertion.SearchConfig` overrides; ``{}`` (the
defaults) runs first unless ``--skip-defaults``. The search is seeded, so overrides of the tuning alone
(``tune_epochs``, ``tune_lr``, ``ce_weight`` affects both) give the same R and the same branch
before its tuning as the defaults. The target's dataset is loaded as it was trained on
(:func:`pnc.bench.hetero.dataset_of`: Fashion-MNIST padded to 32 px for Table 2's
resnet18 -> mobilenetv2_050 pair). Writes
``benchmarks/results/variants-<target>-<source>-<scale>[-<tag>].{json,md}``: per seed and variant the
chosen R and kept share, Ori/Tar/Avg on the test images, the tuning's held-out accuracy before -> after and
whether it was kept, and the seconds.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pnc.bench.baselines import Budget, _clone
from pnc.bench.hetero import dataset_of
from pnc.bench.metrics import clone_accuracy, set_logits
from pnc.bench.paper import budget_for, machine_info
from pnc.bench.results_files import write_json_md
from pnc.zoo.datasets import DatasetSplits
from pnc.zoo.store import ModelCard, ZooStore
from pnc.zoo.tasks import CloneTask, shared_validation

OUT = Path(__file__).resolve().parent / "results"


def zoo_pair(
    zoo_dir: str | None, target_name: str, source_name: str
) -> tuple[nn.Module, ModelCard, nn.Module, ModelCard, DatasetSplits, Budget]:
    """(target, its card, source, its card, the target's dataset as it was trained on, the
    tables' budget for it) of two zoo models."""
    store = ZooStore(zoo_dir)
    target, t_card = store.load(target_name)
    source, s_card = store.load(source_name)
    return target, t_card, source, s_card, dataset_of(t_card), budget_for(t_card, quick=False)


def run(args: argparse.Namespace) -> dict[str, Any]:
    target, t_card, source, s_card, splits, budget = zoo_pair(args.zoo_dir, args.target, args.source)
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = [*([] if args.skip_defaults else [{}]), *[v for v in json.loads(args.variants) if v]]
    # --seen-holdout: the models' validation rows left unused, held out from the available images
    validation = 0.0 if args.seen_holdout else shared_validation(t_card, s_card)
    runs = []
    for seed in seeds:
        task = CloneTask(
            splits, t_card.classes, s_card.classes, args.scale, seed=seed, old_fraction=args.old, validation=validation
        )
        pooled = task.eval_sets()["avg"]
        for overrides in variants:
            start = time.perf_counter()
            net, _, details = _clone(task, target, source, seed, budget, None, **overrides)
            seconds = time.perf_counter() - start
            acc = clone_accuracy(set_logits(net, pooled), pooled.y, len(task.target_classes))
            report = details["report"]
            tuning = report.get("tuning") or {}
            runs.append(
                {
                    "seed": seed,
                    "variant": overrides,
                    "target_cut": report["target_cut"],
                    "kept_fraction": report["kept_fraction"],
                    **{k: 100 * float(v) for k, v in acc.items()},
                    "tuning": {
                        k: tuning[k]
                        for k in ("before", "after", "kept", "epochs", "tried", "contenders")
                        if k in tuning
                    },
                    "seconds": seconds,
                }
            )
            print(json.dumps(runs[-1]), flush=True)
    return {
        "target": args.target,
        "source": args.source,
        "scale": args.scale,
        "old_fraction": args.old,
        "validation": validation,
        "seeds": seeds,
        "variants": variants,
        "runs": runs,
        "machine": machine_info(),
    }


def render(result: dict[str, Any], command: str) -> str:
    lines = [
        f"# Search variants: `{result['target']}` <- `{result['source']}`, {result['scale']}, "
        f"old fraction {result['old_fraction']:g}"
        + (
            f", R chosen on the {100 * result['validation']:g}% validation rows"
            if result.get("validation")
            else ", R chosen on held-out available images"
        ),
        "",
        "Test accuracy in %; tuning: held-out accuracy of the chosen branch before -> after its tuning "
        "(kept only if it rose).",
        "",
        "| variant | seed | R | kept | Ori | Tar | Avg | tuning (held-out) | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        t = r["tuning"]
        tuned = (
            f"{100 * t['before']['acc']:.2f} -> {100 * t['after']['acc']:.2f} ({'kept' if t['kept'] else 'dropped'}"
            + (f", {t['epochs']} of {'/'.join(map(str, t['tried']))} epochs" if "tried" in t else "")
            + ")"
        )
        lines.append(
            f"| {json.dumps(r['variant'])} | {r['seed']} | {r['target_cut']} | {r.get('kept_fraction', 0):.2f} | "
            f"{r['ori']:.2f} | {r['tar']:.2f} | "
            f"{r['avg']:.2f} | {tuned if t else '-'} | {r['seconds']:.0f} |"
        )
    lines += ["", "| variant | mean Avg over seeds |", "|---|---|"]
    for v in result["variants"]:
        avgs = [r["avg"] for r in result["runs"] if r["variant"] == v]
        lines.append(f"| {json.dumps(v)} | {statistics.fmean(avgs):.2f} |")
    lines += ["", f"Machine: {result['machine']['cpu']}. Command: `{command}`.", ""]
    return "\n".join(lines)


def add_pair_arguments(parser: argparse.ArgumentParser) -> None:
    """--target, --source (zoo model names), --scale and --zoo-dir: the pair a script clones."""
    parser.add_argument("--target", required=True, help="a zoo model name")
    parser.add_argument("--source", required=True, help="a zoo model name")
    parser.add_argument("--scale", default="S", help="S or M")
    parser.add_argument("--zoo-dir")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_pair_arguments(parser)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--old", type=float, default=0.3, help="old fraction (default 0.3)")
    parser.add_argument("--variants", default="[]", help="a JSON list of SearchConfig overrides")
    parser.add_argument(
        "--skip-defaults", action="store_true", help="do not rerun {} (its rows are in an earlier run's file)"
    )
    parser.add_argument(
        "--seen-holdout",
        action="store_true",
        help="for models trained with a validation share: hold out available images instead (as for models without)",
    )
    parser.add_argument("--tag", default="", help="appended to the results' file names (keeps other runs' files)")
    args = parser.parse_args()
    command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/search_variants.py " + " ".join(
        shlex.quote(a) for a in sys.argv[1:]
    )
    result = run(args) | {"command": command}
    stem = f"variants-{args.target}-{args.source}-{args.scale}" + (f"-{args.tag}" if args.tag else "")
    write_json_md(OUT / stem, result, render(result, command))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
