"""``pnc clone``, ``pnc eval`` and ``pnc demo``: cloning between zoo models from the shell.

    pnc clone --target fmnist-lenet5-target --source fmnist-lenet5-source --classes S --out runs/x
    pnc eval runs/x/clone.pnc
    pnc demo                      # the embedded default, end to end
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor, nn

from pnc.surgery.clone import clone
from pnc.surgery.cloned import ClonedNetwork
from pnc.surgery.errors import PncError, TaskError
from pnc.surgery.insertion import SearchConfig
from pnc.surgery.onnx_detach import detach_onnx
from pnc.surgery.onnx_export import export_onnx
from pnc.surgery.patch import load_patch, save_patch
from pnc.zoo.datasets import ImageData, load_dataset
from pnc.zoo.store import WEIGHTS_FILE, ZooStore, atomic_write_text, file_sha256
from pnc.zoo.tasks import CloneTask


def accuracies(logits: Tensor, labels: Tensor, num_old: int) -> dict[str, float]:
    """Ori (labels < num_old), Tar (the others) and Avg (pooled) accuracy, as fractions."""
    right = logits.argmax(1) == labels
    old = labels < num_old
    return {"ori": float(right[old].float().mean()), "tar": float(right[~old].float().mean()),
            "avg": float(right.float().mean())}


def eval_set(tasks: list[CloneTask]) -> ImageData:
    """Test images of T_t and of every branch's T_s, labelled by the multi-branch clone's outputs."""
    sets = [tasks[0].eval_sets()["ori"]]
    offset = 0
    for task in tasks:
        tar = task.eval_sets()["tar"]
        sets.append(ImageData(tar.x, tar.y + offset))
        offset += len(task.clone_classes)
    return ImageData(torch.cat([s.x for s in sets]), torch.cat([s.y for s in sets]))


@torch.no_grad()
def logits_of(fn, x: Tensor, batch: int = 512) -> Tensor:
    return torch.cat([fn(xb) for xb in x.split(batch)])


def compare(net: ClonedNetwork, target: nn.Module, sources: list[tuple[nn.Module, list[int]]],
            tasks: list[CloneTask]) -> dict[str, dict[str, float]]:
    """Ori/Tar/Avg of the target alone, the clone and the direct ensemble on the same images."""
    data = eval_set(tasks)
    n_old, n_all = len(tasks[0].target_classes), len(net.classes)
    target_logits = logits_of(target, data.x)
    padded = torch.cat([target_logits, torch.full((len(data), n_all - n_old), -torch.inf)], 1)
    ensemble = torch.cat([target_logits] + [logits_of(s, data.x)[:, idx] for s, idx in sources], 1)
    return {"target": accuracies(padded, data.y, n_old),
            "clone": accuracies(logits_of(net, data.x), data.y, n_old),
            "ensemble": accuracies(ensemble, data.y, n_old)}


def run_clone(store: ZooStore, target_name: str, sources: list[tuple[str, str]], out: Path, *, seed: int = 0,
              data_dir: str | None = None, fraction: float = 0.3, old_fraction: float = 0.3,
              config: SearchConfig | None = None, progress: bool = True) -> tuple[ClonedNetwork, dict]:
    """Clone each (source name, class spec) into the target; write DIR/clone.pnc and DIR/report.json.

    ``fraction`` / ``old_fraction``: shares of the clone classes' / the target classes'
    training images available while cloning. report.json's ``images`` counts the images
    of each kind the (first) branch trained and selected R on.

    Returns (the cloned network, the report). An interrupted run resumes from the
    checkpoints in DIR/.ckpt."""
    start = time.perf_counter()
    target, t_card = store.load(target_name)
    dataset = load_dataset(t_card.dataset, data_dir)
    net, tasks, models, branches = None, [], [], []
    for k, (source_name, spec) in enumerate(sources):
        source, s_card = store.load(source_name)
        if s_card.dataset != t_card.dataset:
            raise TaskError(f"target {target_name!r} is on {t_card.dataset} but source {source_name!r} on "
                            f"{s_card.dataset}; clone between models of the same dataset")
        task = CloneTask(dataset, t_card.classes, s_card.classes,
                         spec if spec in ("S", "M") else _class_spec(spec, dataset.classes), fraction, seed,
                         old_fraction=old_fraction)
        name = source_name if source_name not in (b["name"] for b in branches) else f"{source_name}-{k}"
        net = clone(target, source, task, config=config or SearchConfig(seed=seed), into=net, name=name,
                    source_name=source_name, checkpoint_dir=out / ".ckpt" / name, cache_dir=out / ".cache",
                    progress=progress)
        rep = net.branches[name].report
        branches.append({"name": name, "source": source_name, "classes": net.branches[name].classes,
                         **asdict(rep)})
        tasks.append(task)
        models.append((source, task.source_label_index()))
    patch_bytes = save_patch(net, out / "clone.pnc", target_name=target_name, input_size=t_card.input_size,
                             tasks={b["name"]: t.to_dict() for b, t in zip(branches, tasks)})
    acc = compare(net, target, models, tasks)
    report = {
        "target": target_name, "ori_acc": acc["clone"]["ori"], "tar_acc": acc["clone"]["tar"],
        "avg_acc": acc["clone"]["avg"], "target_acc": acc["target"], "ensemble_acc": acc["ensemble"],
        "target_cut": branches[0]["target_cut"], "source_cut": branches[0]["source_cut"],
        "fraction": fraction, "old_fraction": old_fraction, "images": branches[0]["images"],
        "patch_bytes": patch_bytes,
        "source_bytes": sum(os.path.getsize(store.path(s) / WEIGHTS_FILE) for s, _ in sources),
        "seconds": round(time.perf_counter() - start, 2), "branches": branches,
    }
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    return net, report


def _class_spec(spec: str, names: list[str]) -> list[int]:
    from pnc.zoo.tasks import parse_classes

    return parse_classes(spec, names)


def evaluate_patch(path: Path, store: ZooStore, data_dir: str | None = None) -> dict:
    """Rebuild a patch's clone from the zoo and measure it like ``pnc clone`` did."""
    net, meta = load_patch(path, store)
    target, t_card = store.load(meta["target"]["name"])
    dataset = load_dataset(t_card.dataset, data_dir)
    tasks, models = [], []
    for b in meta["branches"]:
        if b.get("task") is None:
            raise PncError(f"{path}: branch {b['name']!r} records no clone task, so it cannot be evaluated")
        tasks.append(CloneTask.from_json(b["task"], dataset=dataset))
        models.append((store.load(b["source"]["name"])[0], b["source_outputs"]))
    acc = compare(net, target, models, tasks)
    return {"patch": str(path), "ori_acc": acc["clone"]["ori"], "tar_acc": acc["clone"]["tar"],
            "avg_acc": acc["clone"]["avg"], "target_acc": acc["target"], "ensemble_acc": acc["ensemble"]}


def print_table(report: dict) -> None:
    """The Ori / Tar / Avg summary table (rich)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Ori / Tar / Avg accuracy (%) on the test images")
    for col in ("model", "Ori", "Tar", "Avg"):
        table.add_column(col, justify="left" if col == "model" else "right")
    rows = (("target alone", report["target_acc"]),
            ("PNC clone", {"ori": report["ori_acc"], "tar": report["tar_acc"], "avg": report["avg_acc"]}),
            ("direct ensemble", report["ensemble_acc"]))
    for label, acc in rows:
        table.add_row(label, *(f"{100 * acc[k]:.2f}" for k in ("ori", "tar", "avg")))
    Console().print(table)


def _store(args) -> ZooStore:
    return ZooStore(args.zoo_dir)


def _cmd_clone(args) -> int:
    if len(args.source) != len(args.classes):
        raise TaskError("give one --classes per --source (e.g. --source A --classes S --source B --classes 7)")
    config = SearchConfig(seed=args.seed, mask_ratio=args.mask_ratio)
    _, report = run_clone(_store(args), args.target, list(zip(args.source, args.classes)), Path(args.out),
                       seed=args.seed, data_dir=args.data_dir, fraction=args.fraction,
                       old_fraction=args.old_fraction, config=config,
                       progress=not args.json)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
        for b in report["branches"]:
            print(f"branch {b['name']!r}: R = {b['target_cut']} (target) <- R' = {b['source_cut']} (source); "
                  f"transferable module {b['params_before']:,} -> {b['params_after']:,} params, "
                  f"{b['macs_before']:,} -> {b['macs_after']:,} MACs")
        im = report["images"]
        print(f"images: {im['old_train']} of the target's classes + {im['clone_train']} of the cloned classes "
              f"to train, {im['old_holdout'] + im['clone_holdout']} held out to choose R")
        print(f"patch {report['patch_bytes']:,} bytes vs source checkpoint {report['source_bytes']:,} bytes; "
              f"{report['seconds']:.0f} s; wrote {args.out}/clone.pnc and report.json")
    return 0


def _cmd_eval(args) -> int:
    report = evaluate_patch(Path(args.patch), _store(args), args.data_dir)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0


def _cmd_demo(args) -> int:
    from pnc.zoo.defaults import default_pair, ensure_default

    store = _store(args)
    try:
        load_dataset("fashion-mnist", args.data_dir)
        dataset, arch = "fashion-mnist", "lenet5"
    except PncError:
        print("Fashion-MNIST not found (apt-get install dataset-fashion-mnist); using sklearn's digits.")
        dataset, arch = "digits", "cnn4"
    start = time.perf_counter()
    target, source = default_pair(dataset, arch)
    for name in (target, source):
        card = ensure_default(store, name, args.data_dir)
        print(f"zoo: {name} ({card.arch} on {card.dataset}, classes {card.classes}, "
              f"test accuracy {100 * card.test_accuracy:.2f}%)")
    out = Path(args.out)
    net, report = run_clone(store, target, [(source, "S")], out, seed=args.seed, data_dir=args.data_dir)
    print_table(report)
    print(f"cloned {report['branches'][0]['classes']} from {source} into {target} at R = {report['target_cut']}; "
          f"patch {report['patch_bytes']:,} bytes (source checkpoint {report['source_bytes']:,})")
    example = torch.zeros(1, *store.card(target).input_size)
    export_onnx(net, out / "clone.onnx", example)
    export_onnx(net.target, out / "target.onnx", example)
    detach_onnx(out / "clone.onnx", None, out / "detached.onnx")
    same = file_sha256(out / "detached.onnx") == file_sha256(out / "target.onnx")
    print(f"ONNX: {out}/clone.onnx (detachable branch); detaching it gives a file "
          f"{'byte-identical to' if same else 'DIFFERENT from'} {out}/target.onnx")
    print(f"demo {time.perf_counter() - start:.0f} s (clone {report['seconds']:.0f} s); wrote {out}")
    return 0 if same else 1


def add_cli(sub: argparse._SubParsersAction) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--zoo-dir", help="zoo folder (default $PNC_ZOO_DIR or ~/.cache/pnc/zoo)")
        p.add_argument("--data-dir", help="data folder (default $PNC_DATA_DIR or the dataset's default)")

    p = sub.add_parser("clone", help="clone classes of source zoo models into a target zoo model")
    p.add_argument("--target", required=True, help="the target's zoo name")
    p.add_argument("--source", action="append", required=True, help="a source's zoo name (repeatable)")
    p.add_argument("--classes", action="append", required=True,
                   help="classes to clone from that source: S (20%%), M (60%%), 5-6, 5,7 or names")
    p.add_argument("--out", required=True, help="output folder for clone.pnc and report.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fraction", type=float, default=0.3, help="share of the clone classes' training images")
    p.add_argument("--old-fraction", type=float, default=0.3,
                   help="share of the target classes' training images available while cloning "
                        "(default 0.3, the paper's setting; 0: none)")
    p.add_argument("--mask-ratio", type=float, default=0.5, help="kept share of each channel group")
    p.add_argument("--json", action="store_true", help="print report.json instead of a table")
    common(p)
    p.set_defaults(func=_cmd_clone)

    p = sub.add_parser("eval", help="rebuild a .pnc patch from the zoo and measure Ori / Tar / Avg")
    p.add_argument("patch")
    p.add_argument("--json", action="store_true")
    common(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("demo", help="the main job on the embedded default pair, end to end")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--seed", type=int, default=0)
    common(p)
    p.set_defaults(func=_cmd_demo)
