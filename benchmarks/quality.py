"""Clone quality on one seed, in the paper's data setting and the strict one (issue 10).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quality.py                  # LeNet-5 pair, seed 0
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quality.py --arch resnetc20 --scales S --old-fractions 0.3

Runs Pre-trained, Direct Ensemble, Calibrated Ensemble, Continual+KD (with the old-class
replay when there is one), Joint+Full and PNC on the default Fashion-MNIST zoo pair at the
given scales, with old fraction 0.3 (30% of the target classes' training images available
while cloning, the paper's setting) and 0 (none), and writes
``benchmarks/results/quality-<arch>-seed<seed>.{md,json}``: the accuracies, PNC's chosen R
against the best R by test Avg (the selection regret), the branch fine-tuning and the
issue's goals. Rows are cached per setting (``.rows.json`` beside them), so a re-run resumes.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from pnc.bench.paper import (
    RowCache,
    TableSpec,
    budget_for,
    goal_checks,
    held_out_images,
    machine_info,
    output_class_names,
    run_table,
    selection_regret,
    summarize,
)
from pnc.bench.results_files import write_json_md
from pnc.zoo.datasets import load_dataset
from pnc.zoo.defaults import default_pair, ensure_default
from pnc.zoo.store import ZooStore, default_zoo_dir
from pnc.zoo.tasks import shared_validation

OUT = Path(__file__).resolve().parent / "results"
METHODS = ["Pre-trained", "Direct Ensemble", "Calibrated Ensemble", "Continual+KD", "Joint+Full", "PNC"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="lenet5", help="lenet5 or resnetc20 (the default Fashion-MNIST pairs)")
    parser.add_argument("--scales", default="S,M")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--old-fractions", default="0.3,0", help="the data settings to run (default 0.3,0)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"a subset of {','.join(METHODS)}")
    parser.add_argument("--zoo-dir")
    args = parser.parse_args()
    scales = [s for s in args.scales.split(",") if s]
    methods = [m for m in METHODS if m in args.methods.split(",")]
    splits = load_dataset("fashion-mnist")
    store = ZooStore(args.zoo_dir)
    target_name, source_name = default_pair(splits.name, args.arch)
    t_card = ensure_default(store, target_name, dataset=splits, progress=False)
    s_card = ensure_default(store, source_name, dataset=splits, progress=False)
    stem = f"quality-{args.arch}-seed{args.seed}"
    workdir = default_zoo_dir(args.zoo_dir).parent / "bench"
    settings = []
    for old_fraction in (float(f) for f in args.old_fractions.split(",") if f):
        tag = f"{stem}-old{round(100 * old_fraction)}"
        spec = TableSpec(
            stem=tag,
            title=tag,
            target=target_name,
            source=source_name,
            scales=scales,
            seeds=[args.seed],
            methods=methods,
            budget=budget_for(t_card, quick=False),
            old_fraction=old_fraction,
        )
        per_seed = run_table(spec, store, splits, RowCache(OUT / f"{tag}.rows.json"), workdir)
        rows = summarize(per_seed, methods, scales)
        search = []
        for r in per_seed:
            if r["method"] != "PNC":
                continue
            rep = r["details"]["report"]
            best, regret = selection_regret(rep)
            search.append(
                {
                    "method": "PNC",
                    "scale": r["scale"],
                    "seed": r["seed"],
                    "target_cut": rep["target_cut"],
                    "best_cut": best,
                    "regret": regret,
                    "profile": rep.get("profile", {}),
                    "candidates": rep["candidates"],
                    "images": rep["images"],
                    "tuning": rep["tuning"],
                    "final": {k: r[k] for k in ("ori", "tar", "avg")},
                }
            )
        names = output_class_names(splits, t_card, s_card, scales)
        checks = [] if old_fraction == 0 else goal_checks(rows, search, names, len(t_card.classes))
        settings.append(
            {
                "old_fraction": old_fraction,
                "rows": rows,
                "pnc_search": search,
                "goals": checks,
                "per_seed": [{k: v for k, v in r.items() if k not in ("details", "hparams")} for r in per_seed],
                "hparams": {r["method"]: r["hparams"] for r in per_seed},
            }
        )
    command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quality.py " + " ".join(
        shlex.quote(a) for a in sys.argv[1:]
    )
    result = {
        "dataset": splits.name,
        "arch": t_card.arch,
        "target": target_name,
        "source": source_name,
        "seed": args.seed,
        "scales": scales,
        "methods": methods,
        "validation": shared_validation(t_card, s_card),
        "settings": settings,
        "machine": machine_info(),
        "command": command.strip(),
    }
    write_json_md(OUT / stem, result, render(result))
    print(render(result))


def render(result: dict[str, Any]) -> str:
    scales = result["scales"]
    lines = [
        f"# Clone quality: {result['dataset']}, {result['arch']} pair, seed {result['seed']}",
        "",
        f"Target `{result['target']}`, source `{result['source']}`; S / M clone 20% / 60% of the source's "
        "classes from 30% of their training images. Old fraction 0.3: 30% of the target classes' training "
        "images are available too (the paper's setting; Continual+KD replays them, Calibrated Ensemble is "
        "fitted on them); old fraction 0: none (the strict setting). Joint+Full sees all training images "
        "of both sets. Accuracies in % on the test images: Ori (target's classes), Tar (cloned classes), "
        "Avg (both pooled), argmax over all outputs. At old fraction 0 the Calibrated Ensemble is fitted on "
        "clone-class images only (nothing holds the old classes) and Continual+KD has no replay.",
        "",
        "| Method | old fraction | " + " | ".join(f"Ori-{s} | Tar-{s} | Avg-{s}" for s in scales) + " |",
        "|---|---|" + "---|" * (3 * len(scales)),
    ]
    for setting in result["settings"]:
        by = {(e["method"], e["scale"]): e for e in setting["rows"]}
        for m in result["methods"]:
            label = "Continual+KD (replay)" if m == "Continual+KD" and setting["old_fraction"] > 0 else m
            cells = [
                f"{100 * by[(m, s)][f'{p}_acc']:.1f}" if (m, s) in by else "-"
                for s in scales
                for p in ("ori", "tar", "avg")
            ]
            lines.append(f"| {label} | {setting['old_fraction']:g} | " + " | ".join(cells) + " |")
    held = held_out_images(result["validation"])
    lines += [
        "",
        "## PNC: chosen R vs best R",
        "",
        f"R is chosen on {held} (never test images): held-out joint "
        "error with old-class images, held-out KD loss to the direct ensemble without. Best R = the "
        "candidate with the highest test Avg (reported only); regret = its test Avg minus the chosen one's, "
        "in points (candidate accuracies before the branch fine-tuning). Fine-tuning: held-out accuracy of "
        "the chosen branch before -> after; kept only if it rose.",
        "",
        "| old fraction | scale | chosen R | best R | regret | candidates: R -> selection loss, Ori/Tar/Avg | "
        "fine-tuning (held-out acc) | images (train old + clone, held out) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for setting in result["settings"]:
        for s in setting["pnc_search"]:
            cands = "; ".join(
                f"{c['target_cut']} -> {c['loss']:.4f}, {100 * c['accuracy']['ori']:.1f}/"
                f"{100 * c['accuracy']['tar']:.1f}/{100 * c['accuracy']['avg']:.1f}"
                for c in s["candidates"]
            )
            t = s["tuning"]
            tuning = (
                (
                    f"{100 * t['before']['acc']:.1f} -> {100 * t['after']['acc']:.1f} "
                    f"({'kept' if t['kept'] else 'dropped'})"
                )
                if t
                else "none (no old-class image)"
            )
            im = s["images"]
            lines.append(
                f"| {setting['old_fraction']:g} | {s['scale']} | {s['target_cut']} | {s['best_cut']} | "
                f"{s['regret']:.2f} | {cands} | {tuning} | {im['old_train']} + {im['clone_train']}, "
                f"{im['old_holdout'] + im['clone_holdout']} |"
            )
    lines += [
        "",
        "## Goals (old fraction 0.3)",
        "",
        "The goals of the tables (`benchmarks/paper.py: goal_checks`) on this one seed; a missed one's "
        "diagnosis is measured from the same rows.",
        "",
        "| Scale | Goal | Value | Need | Met |",
        "|---|---|---|---|---|",
    ]
    goals = [g for setting in result["settings"] for g in setting["goals"]]
    for g in goals:
        lines.append(f"| {g['scale']} | {g['goal']} | {g['value']:.2f} | {g['need']} | {'yes' if g['met'] else 'NO'} |")
    lines += [""] + [f"- {g['scale']}, {g['goal']} = {g['value']}: {g['diagnosis']}." for g in goals if g["diagnosis"]]
    m = result["machine"]
    lines += [
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores shared with other jobs, torch {m['torch']} "
        f"({m['torch_threads']} thread(s)). Command: `{result['command']}`.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
