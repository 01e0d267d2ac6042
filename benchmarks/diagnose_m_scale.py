"""Where the target's classes' test images go at the "M" scale on Fashion-MNIST.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/diagnose_m_scale.py

For the default LeNet-5 pair, seed 0, in the paper's setting (old fraction 0.3): where the
target's test images go (row = target class, columns = the target's own classes pooled and
each cloned class) for the direct ensemble, Continual+KD, Joint+Full and PNC cloning
M = [Sandal, Shirt, Sneaker]; then the same methods on a control 3-class set without Shirt,
[Sandal, Sneaker, Bag]. Writes benchmarks/results/diagnose-m-scale.{md,json}.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pnc.bench.baselines import run_method
from pnc.bench.metrics import confusion_matrix, evaluate_clone, logits_of
from pnc.bench.paper import budget_for, machine_info
from pnc.bench.results_files import write_json_md
from pnc.zoo.datasets import load_dataset
from pnc.zoo.store import ZooStore
from pnc.zoo.tasks import CloneTask

OUT = Path(__file__).resolve().parent / "results"


def main() -> None:
    splits = load_dataset("fashion-mnist")
    store = ZooStore()
    target, t_card = store.load("fmnist-lenet5-target")
    source, s_card = store.load("fmnist-lenet5-source")
    names = splits.classes
    budget = budget_for(t_card, quick=False)
    result = {}
    lines = [
        "# Diagnosis: the M scale on Fashion-MNIST (LeNet-5 pair, seed 0, old fraction 0.3)",
        "",
        "30% of each class's training images available (Joint+Full: all of them), as in Table 1.",
        "",
    ]
    for label, clone_classes in (("M (preset)", [5, 6, 7]), ("control", [5, 7, 8])):
        task = CloneTask.for_cards(splits, t_card, s_card, clone_classes, seed=0)
        outputs = [names[c] for c in task.target_classes + clone_classes]
        lines += [f"## {label}: clone {', '.join(names[c] for c in clone_classes)}", ""]
        for method in ("Direct Ensemble", "Continual+KD", "Joint+Full", "PNC"):
            run = run_method(method, task, target, source, 0, budget)
            acc = evaluate_clone(run.model, task.eval_sets())
            ori = task.eval_sets()["ori"]
            cm = confusion_matrix(logits_of(run.model, ori.x), ori.y, len(outputs))[: len(task.target_classes)]
            share = cm.double() / cm.sum(1, keepdim=True)
            result[f"{label}|{method}"] = {"accuracy": acc, "target_rows_share": share.tolist(), "outputs": outputs}
            lines += [
                f"**{method}**: Ori {100 * acc['ori']:.1f}, Tar {100 * acc['tar']:.1f}, Avg {100 * acc['avg']:.1f}. "
                "Share (%) of each target class's test images predicted as:",
                "",
                "| target class | any target class | " + " | ".join(names[c] for c in clone_classes) + " |",
                "|---|---|" + "---|" * len(clone_classes),
            ]
            k = len(task.target_classes)
            for i, c in enumerate(task.target_classes):
                lines.append(
                    f"| {names[c]} | {100 * float(share[i, :k].sum()):.1f} | "
                    + " | ".join(f"{100 * float(v):.1f}" for v in share[i, k:])
                    + " |"
                )
            lines.append("")
    machine = machine_info()
    lines += [
        f"Machine: {machine['cpu']}. Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/diagnose_m_scale.py`",
        "",
    ]
    write_json_md(OUT / "diagnose-m-scale", result, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
