"""The ONNX attach/detach identities on the default pairs (digits cnn4, Fashion-MNIST LeNet-5).

For each pair: clone two disjoint classes from the source as two branches (`pnc clone`,
paper's data setting), export the target and the clone, write each branch alone
(`--branch-only`), and check, byte for byte: attach(target, b1, b2) == export(clone);
attach(attach(target, b1), b2) == export(clone); detach(attach(...)) == target; and that a
branch made for the other pair's target is refused. Writes
``benchmarks/results/attach_identities.{md,json}``.

    python -m pnc.bench.attach_identities [--zoo-dir DIR] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
from pathlib import Path

import onnx

from pnc.bench.cli import main as pnc
from pnc.bench.machine import cpu_name
from pnc.bench.results_files import write_json_md
from pnc.surgery.errors import ExportError
from pnc.surgery.onnx_attach import attach_model
from pnc.surgery.onnx_detach import detach_model
from pnc.zoo.defaults import default_pair, ensure_default
from pnc.zoo.store import ZooStore, package_versions

PAIRS = [("digits", "cnn4", ["7", "8"]), ("fashion-mnist", "lenet5", ["Sandal", "Sneaker"])]


def _sha(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.SerializeToString()).hexdigest()


def check_pair(store: ZooStore, dataset: str, arch: str, classes: list[str], work: Path) -> dict:
    """Export, split into branch files, re-attach and detach one default pair; the identities."""
    target, source = default_pair(dataset, arch)
    for name in (target, source):
        ensure_default(store, name, progress=False)
    zoo = ["--zoo-dir", str(store.root)]
    run = work / f"{arch}-run"
    pairs = [a for c in classes for a in ("--source", source, "--classes", c)]
    assert pnc(["clone", "--target", target, *pairs, "--out", str(run), "--json", *zoo]) == 0
    files = {"target": work / f"{arch}-target.onnx", "clone": work / f"{arch}-clone.onnx"}
    assert pnc(["export", target, "--out", str(files["target"]), *zoo]) == 0
    assert pnc(["export", str(run / "clone.pnc"), "--out", str(files["clone"]), *zoo]) == 0
    names = [source, f"{source}-1"]
    for i, name in enumerate(names):
        files[f"b{i}"] = work / f"{arch}-b{i}.onnx"
        argv = ["export", str(run / "clone.pnc"), "--branch-only", "--branch", name, "--out", str(files[f"b{i}"])]
        assert pnc([*argv, *zoo]) == 0
    loaded = {k: onnx.load(v) for k, v in files.items()}
    both = attach_model(loaded["target"], [loaded["b0"], loaded["b1"]])
    stepwise = attach_model(attach_model(loaded["target"], [loaded["b0"]]), [loaded["b1"]])
    return {
        "pair": f"{target} <- {source}",
        "classes": classes,
        "bytes": {k: len(v.SerializeToString()) for k, v in loaded.items()},
        "attach_equals_export": _sha(both) == _sha(loaded["clone"]),
        "stepwise_attach_equals_export": _sha(stepwise) == _sha(loaded["clone"]),
        "detach_all_equals_target": _sha(detach_model(both, None)) == _sha(loaded["target"]),
        "detach_one_equals_attach_other": _sha(detach_model(both, [names[1]]))
        == _sha(attach_model(loaded["target"], [loaded["b0"]])),
        "_models": loaded,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo-dir")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    store = ZooStore(args.zoo_dir)
    with tempfile.TemporaryDirectory() as tmp:
        results = [check_pair(store, d, a, c, Path(tmp)) for d, a, c in PAIRS]
    (first, second) = results
    try:  # a branch of one pair's clone onto the other pair's target
        attach_model(second["_models"]["target"], [first["_models"]["b0"]])
        refused = False
    except ExportError:
        refused = True
    for r in results:
        r.pop("_models")
    doc = {
        "pairs": results,
        "foreign_branch_refused": refused,
        "machine": f"{cpu_name()}, {os.cpu_count()} cores",
        "versions": package_versions(),
    }
    out = Path(args.out)
    lines = [
        "# ONNX attach / detach identities on the default pairs",
        "",
        "Made by `python -m pnc.bench.attach_identities`: each pair's source gives two branches (two classes, "
        "`pnc clone`, paper's data setting); byte-for-byte checks of the ONNX files.",
        "",
        "| pair | classes | attach(target, b1, b2) == export(clone) | attach one by one == export(clone) | "
        "detach all == target | detach b2 == attach(target, b1) | bytes: target / branch files / clone |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        b = r["bytes"]
        lines.append(
            f"| {r['pair']} | {', '.join(r['classes'])} | {r['attach_equals_export']} | "
            f"{r['stepwise_attach_equals_export']} | {r['detach_all_equals_target']} | "
            f"{r['detach_one_equals_attach_other']} | {b['target']:,} / {b['b0']:,}, {b['b1']:,} / "
            f"{b['clone']:,} |"
        )
    lines += [
        "",
        f"A branch made for the digits target attached to the Fashion-MNIST target's export: "
        f"{'refused (ExportError)' if refused else 'NOT refused'}.",
        "",
        f"Machine: {doc['machine']}; versions {json.dumps(doc['versions'])}.",
        "",
    ]
    write_json_md(out / "attach_identities", doc, "\n".join(lines))
    print("\n".join(lines))
    ok = refused and all(v for r in results for k, v in r.items() if k.endswith(("_export", "_target", "_other")))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
