"""How much better the zoo models are on the images they were trained on than on new ones.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/seen_images.py [--models NAME,...]

A clone's held-out images (the ones R is chosen and the tuning is kept on) are its task's
validation rows when the zoo models were trained without them (a ``validation`` share in
their recipes), else a share of the available training images, which the models were
trained on: the frozen target and source are more accurate there than on the test images,
so a choice made on them leans on the frozen networks. Writes
``benchmarks/results/seen_images.{json,md}``: per zoo model, its accuracy on the training
rows it was trained on, on the validation rows it was trained without (none with a share
of 0), and on the test images, each over the images of its classes.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from pnc.bench.hetero import dataset_of
from pnc.bench.metrics import set_logits
from pnc.bench.paper import machine_info
from pnc.bench.results_files import write_json_md
from pnc.zoo.datasets import ImageData
from pnc.zoo.store import ZooStore
from pnc.zoo.tasks import select_classes, validation_rows

OUT = Path(__file__).resolve().parent / "results"
#: the models of Tables 1 and 2
MODELS = ",".join(
    [
        "fmnist-lenet5-target",
        "fmnist-lenet5-source",
        "fmnist-resnetc20-target",
        "fmnist-resnetc20-source",
        "fmnist-cnn4-target",
        "fmnist-vit-target",
        "fmnist-vit-source",
        "fmnist32-mobilenetv2_050-target",
        "fmnist32-resnet18-source",
    ]
)


@torch.no_grad()
def accuracy(
    model: torch.nn.Module, data: ImageData, classes: list[int], among: torch.Tensor | None = None
) -> tuple[float, int]:
    """Accuracy (%) of ``model`` (outputs: ``classes`` in order) on the images of ``classes``
    in ``data`` (``among``: only those rows), and how many there are."""
    mine = select_classes(data, classes, among=among)  # labels: the model's outputs
    pred = set_logits(model, mine).argmax(1)
    return 100 * float((pred == mine.y.to(pred.device)).float().mean()), len(mine.y)


def run(names: list[str], zoo_dir: str | None) -> dict[str, Any]:
    store = ZooStore(zoo_dir)
    rows = []
    for name in names:
        model, card = store.load(name)
        model.eval()
        splits = dataset_of(card)
        share = float(card.recipe.get("validation", 0.0))
        trained_rows, validation = validation_rows(splits.train, share)
        train, n_train = accuracy(model, splits.train, card.classes, trained_rows)
        valid, n_valid = accuracy(model, splits.train, card.classes, validation) if share else (None, 0)
        test, n_test = accuracy(model, splits.test, card.classes)
        rows.append(
            {
                "model": name,
                "trained_on": card.recipe.get("train_images"),
                "validation_share": share,
                "train_acc": train,
                "train_images": n_train,
                "validation_acc": valid,
                "validation_images": n_valid,
                "test_acc": test,
                "test_images": n_test,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows, "machine": machine_info()}


def render(result: dict[str, Any], command: str) -> str:
    lines = [
        "# Zoo models on the images they were trained on and on new ones",
        "",
        "Accuracy (%) over the images of the model's classes: on the training rows it was trained on (a clone's "
        "available images are drawn from them; `trained on`: how many training images the model's recipe used), "
        "on the validation rows its recipe left out (a clone's held-out images when both models left them out; "
        "`-`: a recipe without a validation share, whose clones hold out trained-on images) and on the test "
        "images. Each difference is to the test accuracy.",
        "",
        "| model | trained on | trained-on rows: acc | difference, points | validation rows: acc | difference, points "
        "| test images: acc |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        test = r["test_acc"]
        valid = (
            f"{r['validation_acc']:.2f} ({r['validation_images']:,}) | {r['validation_acc'] - test:+.2f}"
            if r["validation_acc"] is not None
            else "- | -"
        )
        lines.append(
            f"| {r['model']} | {r['trained_on']:,} | {r['train_acc']:.2f} ({r['train_images']:,}) | "
            f"{r['train_acc'] - test:+.2f} | {valid} | {test:.2f} ({r['test_images']:,}) |"
        )
    lines += ["", f"Machine: {result['machine']['cpu']}. Command: `{command}`.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=MODELS, help="zoo model names, comma-separated")
    parser.add_argument("--zoo-dir")
    args = parser.parse_args()
    command = " ".join(
        ["OMP_NUM_THREADS=1 .venv/bin/python benchmarks/seen_images.py", *(shlex.quote(a) for a in sys.argv[1:])]
    )
    result = run(args.models.split(","), args.zoo_dir) | {"command": command}
    write_json_md(OUT / "seen_images", result, render(result, command))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
