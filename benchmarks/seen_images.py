"""How much better the zoo models are on the images they were trained on than on new ones.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/seen_images.py [--models NAME,...]

A clone's held-out images (the ones R is chosen and the tuning is kept on) are a share of
the available training images, which the default zoo models were trained on (every
training image of their classes): the frozen target and source are more accurate there
than on the test images, so a choice made on them leans on the frozen networks. Writes
``benchmarks/results/seen_images.{json,md}``: per zoo model, its accuracy on the training
images of its classes and on the test images of its classes.
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
from pnc.surgery.io import atomic_write_text
from pnc.zoo.datasets import ImageData
from pnc.zoo.store import ZooStore
from pnc.zoo.tasks import select_classes

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
def accuracy(model: torch.nn.Module, data: ImageData, classes: list[int]) -> tuple[float, int]:
    """Accuracy (%) of ``model`` (outputs: ``classes`` in order) on the images of ``classes``
    in ``data``, and how many there are."""
    mine = select_classes(data, classes)  # labels: the model's outputs
    pred = set_logits(model, mine).argmax(1)
    return 100 * float((pred == mine.y.to(pred.device)).float().mean()), len(mine.y)


def run(names: list[str], zoo_dir: str | None) -> dict[str, Any]:
    store = ZooStore(zoo_dir)
    rows = []
    for name in names:
        model, card = store.load(name)
        model.eval()
        splits = dataset_of(card)
        (train, n_train), (test, n_test) = (accuracy(model, d, card.classes) for d in (splits.train, splits.test))
        rows.append(
            {
                "model": name,
                "trained_on": card.recipe.get("train_images"),
                "train_acc": train,
                "train_images": n_train,
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
        "Accuracy (%) on the training images of the model's classes (the split a clone's available and held-out "
        "images are drawn from; `trained on`: how many training images the model's recipe used) and on the test "
        "images of its classes.",
        "",
        "| model | trained on | training images: acc | test images: acc | difference, points |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['trained_on']:,} | {r['train_acc']:.2f} ({r['train_images']:,}) | "
            f"{r['test_acc']:.2f} ({r['test_images']:,}) | {r['train_acc'] - r['test_acc']:+.2f} |"
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
    atomic_write_text(OUT / "seen_images.json", json.dumps(result, indent=1))
    atomic_write_text(OUT / "seen_images.md", render(result, command))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
