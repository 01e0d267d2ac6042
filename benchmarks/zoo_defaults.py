"""Train the default zoo pairs one at a time and record test accuracy and wall time.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/zoo_defaults.py --zoo-dir /tmp/pnc-zoo-bench

Each model is trained from scratch (an existing model of that name in ``--zoo-dir``
is deleted first) through ``pretrain_defaults(store, only=[name])``, and timed
around that call. With ``--from-store`` nothing is trained: the rows are read from the cards
of the models in ``--zoo-dir`` (e.g. the user zoo the tables were run with), which must be
trained by the current recipes; ``train s`` is then the time their card recorded and ``total
s`` / ``load`` are not known. Writes ``benchmarks/results/zoo.json`` and ``zoo.md``; with
``--only`` the rows of the other models already there are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch

from pnc.bench.machine import cpu_name
from pnc.bench.results_files import write_json_md
from pnc.surgery.errors import StoreError
from pnc.zoo.datasets import load_dataset
from pnc.zoo.defaults import DEFAULTS, pretrain_defaults
from pnc.zoo.store import ModelCard, ZooStore, default_zoo_dir, package_versions
from pnc.zoo.tasks import parse_classes

RESULTS = Path(__file__).resolve().parent / "results"


def _row(store: ZooStore, card: ModelCard, total_seconds: float | None, load: float | None) -> dict:
    model, _ = store.load(card.name)
    return {
        "name": card.name,
        "arch": card.arch,
        "dataset": card.dataset,
        "classes": card.classes,
        "params": sum(p.numel() for p in model.parameters()),
        "epochs": card.recipe["epochs"],
        "lr": card.recipe["lr"],
        "optimizer": card.recipe["optimizer"],
        "weight_decay": card.recipe["weight_decay"],
        "seed": card.recipe["seed"],
        "validation": card.recipe.get("validation", 0.0),
        "train_images": card.recipe["train_images"],
        "test_accuracy": card.test_accuracy,
        "train_seconds": card.recipe["train_seconds"],
        "total_seconds": total_seconds,
        "load_avg_before": load,
        "sha256": card.sha256,
        "zoo_dir": str(store.root),
        "cpu": cpu_name(),
    }


def run(zoo_dir: str, names: list[str], data_dir: str | None) -> dict:
    store = ZooStore(zoo_dir)
    rows = []
    for name in names:
        shutil.rmtree(store.path(name), ignore_errors=True)
        load = os.getloadavg()[0]
        began = time.perf_counter()
        cards = pretrain_defaults(store, data_dir, only=[name], progress=False)
        seconds = time.perf_counter() - began
        if not cards:
            rows.append({"name": name, "skipped": "data missing"})
            continue
        rows.append(_row(store, cards[0], round(seconds, 1), round(load, 2)))
        print(f"{name}: acc {cards[0].test_accuracy:.4f}, {seconds:.1f} s", flush=True)
    return {"machine": _machine(), "models": rows}


def from_store(zoo_dir: str, names: list[str], data_dir: str | None = None) -> dict:
    """The rows of the models ``names`` as ``zoo_dir`` holds them, each checked against its
    current recipe, classes included (raises ``StoreError`` naming the model otherwise)."""
    store = ZooStore(zoo_dir)
    class_names: dict[str, list[str]] = {}
    rows = []
    for name in names:
        spec = DEFAULTS[name]
        if not store.exists(name):
            rows.append({"name": name, "skipped": f"not in {zoo_dir}"})
            continue
        if spec.dataset not in class_names:
            class_names[spec.dataset] = load_dataset(spec.dataset, data_dir).classes
        card = spec.stored(store, parse_classes(spec.classes, class_names[spec.dataset]))
        if card is None:
            raise StoreError(
                f"{name} in {zoo_dir} is corrupt or was trained by another recipe; "
                f"retrain it (`pnc zoo pretrain-defaults --only {name}`) or run without --from-store"
            )
        rows.append(_row(store, card, None, None))
    return {"machine": _machine(), "models": rows}


def _machine() -> dict:
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        **package_versions(),
    }


def merged_rows(path: Path, rows: list[dict]) -> list[dict]:
    """``rows`` replacing the rows of the same models in the results file ``path`` (if any),
    in the order of :data:`DEFAULTS`."""
    old_result = json.loads(path.read_text()) if path.is_file() else {"models": []}
    machine = old_result.get("machine", {})
    old = [{"zoo_dir": old_result.get("zoo_dir"), "cpu": machine.get("cpu"), **r} for r in old_result["models"]]
    by_name = {r["name"]: r for r in old} | {r["name"]: r for r in rows}
    order = list(DEFAULTS)
    return sorted(by_name.values(), key=lambda r: order.index(r["name"]) if r["name"] in order else len(order))


def markdown(result: dict) -> str:
    m = result["machine"]
    cpus = sorted({r.get("cpu") or m["cpu"] for r in result["models"]})
    lines = [
        "# Default zoo models: accuracy and training time",
        "",
        f"Written by `benchmarks/zoo_defaults.py` on {' and '.join(cpus)} (rows: `cpu`; {m['cores']} cores, "
        f"torch {m['torch']} with {m['torch_threads']} intra-op thread(s), timm {m['timm']}). "
        "The CPU was shared with other jobs; `load` is the 1-minute load average before each run "
        "(`-`: the row was read from the card of a model trained elsewhere, `--from-store`).",
        "",
        "Recipe: SGD with Nesterov momentum 0.9 or AdamW (betas 0.9, 0.999), the weight decay in "
        "the table, cosine learning rate per step from the start (no warm-up), batch 128, no "
        "augmentation, cross-entropy. Target = classes 0-4 (seed 0), source = classes 5-9 (seed 1). "
        "Accuracy is on the test images of the model's own classes. The ViT is timm's "
        "VisionTransformer (the `vit_tiny_patch16_224` entry) with patch 4, width 96, depth 4, "
        "3 heads on 28 px (49 patch tokens + a class token). `held out`: the share of each "
        "class's training images the model never trained on (the validation rows a clone "
        "chooses its cut on); `train images` are the others.",
        "",
        "| model | arch | params | dataset | classes | optimizer | epochs | lr | wd | held out | train images "
        "| test acc | train s | total s | load | cpu |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["models"]:
        if "skipped" in r:
            lines.append(f"| {r['name']} | skipped: {r['skipped']} |||||||||||||||")
            continue
        classes = f"{r['classes'][0]}-{r['classes'][-1]}"
        lines.append(
            f"| {r['name']} | {r['arch']} | {r['params']:,} | {r['dataset']} | {classes} | "
            f"{r.get('optimizer', 'sgd')} | {r['epochs']} | {r['lr']} | {r.get('weight_decay', 5e-4):g} | "
            f"{r.get('validation', 0.0):g} | {r['train_images']:,} | {100 * r['test_accuracy']:.2f}% | "
            f"{r['train_seconds']:.1f} | {_or_dash(r['total_seconds'])} | {_or_dash(r['load_avg_before'])} | "
            f"{r.get('cpu') or m['cpu']} |"
        )
    lines += ["", "`train s` is `fit` alone; `total s` adds loading the dataset, evaluation and saving.", ""]
    return "\n".join(lines)


def _or_dash(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo-dir", help="default: /tmp/pnc-zoo-bench, or the user zoo with --from-store")
    parser.add_argument(
        "--from-store", action="store_true", help="read the rows from the models --zoo-dir holds; train nothing"
    )
    parser.add_argument("--data-dir")
    parser.add_argument("--only", nargs="+", choices=list(DEFAULTS), default=list(DEFAULTS))
    args = parser.parse_args()
    if args.from_store:
        result = from_store(args.zoo_dir or str(default_zoo_dir()), args.only, args.data_dir)
    else:
        result = run(args.zoo_dir or "/tmp/pnc-zoo-bench", args.only, args.data_dir)
    result["models"] = merged_rows(RESULTS / "zoo.json", result["models"])
    write_json_md(RESULTS / "zoo", result, markdown(result))


if __name__ == "__main__":
    main()
