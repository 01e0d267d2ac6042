"""In-process vs Ray wall time of one ``pnc clone``, for the cost model (issue 11): each
default pair at S (digits cnn4, Fashion-MNIST LeNet-5) cloned from scratch in this process,
then with the Ray backend on a local Ray over this machine's cores; the chosen R of both, how
far their patches differ, and the machine's load while each ran (it may be shared). Writes
``benchmarks/results/ray_backend.{json,md}``.

    python -m pnc.bench.ray_backend_bench [--pairs digits,fashion-mnist] [--zoo-dir DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from pnc.bench.cli.clone import run_clone
from pnc.bench.paper import machine_info
from pnc.bench.results_files import write_json_md
from pnc.surgery.patch import read_patch
from pnc.zoo.defaults import default_pair, ensure_default
from pnc.zoo.store import ZooStore

PAIRS = {"digits": "cnn4", "fashion-mnist": "lenet5"}


def _timed_clone(store: ZooStore, target: str, source: str, out: Path, backend: object | None) -> dict:
    """One ``pnc clone --target T --source S --classes S`` from scratch: wall seconds, search
    seconds, R, the machine's 1-minute load average before and after."""
    load = os.getloadavg()[0]
    began = time.perf_counter()
    _, report = run_clone(store, target, [(source, "S")], out, progress=False, backend=backend)  # type: ignore[arg-type]
    branch = report["branches"][0]
    return {
        "seconds": round(time.perf_counter() - began, 2),
        "search_seconds": round(branch["profile"]["search"], 2),
        "target_cut": branch["target_cut"],
        "candidates": len(branch["candidates"]),
        "avg_acc": report["avg_acc"],
        "load_before": load,
        "load_after": os.getloadavg()[0],
    }


def _patch_difference(a: Path, b: Path) -> float:
    """Largest absolute difference between the two patches' tensors (inf if their keys differ)."""
    (_, x), (_, y) = read_patch(a), read_patch(b)
    if x.keys() != y.keys():
        return float("inf")
    return max((float((x[k].double() - y[k].double()).abs().max()) for k in x if x[k].numel()), default=0.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default=",".join(PAIRS), help="datasets of the default pairs to clone")
    parser.add_argument("--zoo-dir")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    from pnc.bench.ray_backend import RayBackend, connect

    store = ZooStore(args.zoo_dir)
    pairs = [(d, *default_pair(d, PAIRS[d])) for d in args.pairs.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="pnc-ray-bench-") as tmp:
        for dataset, target, source in pairs:
            for name in (target, source):
                ensure_default(store, name, progress=False)
            rows.append({"dataset": dataset, "target": target, "source": source})
            rows[-1]["inprocess"] = _timed_clone(store, target, source, Path(tmp) / f"{dataset}-here", None)
        began = time.perf_counter()
        connect()  # a local Ray over every core, started once (its start is counted apart)
        ray_start = round(time.perf_counter() - began, 2)
        for row in rows:
            backend = RayBackend()
            out = Path(tmp) / f"{row['dataset']}-ray"
            row["ray"] = _timed_clone(store, row["target"], row["source"], out, backend)
            row["ray"]["retries"] = len(backend.retries)
            row["same_r"] = row["ray"]["target_cut"] == row["inprocess"]["target_cut"]
            row["patch_max_abs_difference"] = _patch_difference(
                Path(tmp) / f"{row['dataset']}-here/clone.pnc", out / "clone.pnc"
            )
            row["ray_over_inprocess"] = round(row["ray"]["seconds"] / row["inprocess"]["seconds"], 2)
    import ray

    doc = {
        "rows": rows,
        "ray_start_seconds": ray_start,
        "machine": machine_info() | {"ray": ray.__version__},
        "command": "python -m pnc.bench.ray_backend_bench",
    }
    out_dir = Path(args.out)
    write_json_md(out_dir / "ray_backend", doc, render(doc))
    print(render(doc))
    return 0 if all(r["same_r"] for r in rows) else 1


def render(doc: dict) -> str:
    m = doc["machine"]
    lines = [
        "# In-process vs Ray backend: wall time of one `pnc clone`",
        "",
        f"Made by `{doc['command']}`: each default pair cloned at S (`pnc clone --target T --source S "
        "--classes S`, default search settings) from scratch, in this process, then with `--backend ray` "
        "on a local Ray over every core (one Tune trial per candidate and stage, one CPU each). "
        f"Starting the local Ray took {doc['ray_start_seconds']:.1f} s, not counted below.",
        "",
        "| pair | in process: clone s (search s) | Ray: clone s (search s) | Ray / in process | R in process | "
        "R with Ray | max abs patch difference | load avg before/after (in process; Ray) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        a, b = r["inprocess"], r["ray"]
        lines.append(
            f"| {r['target']} <- {r['source']} ({a['candidates']} candidates) | {a['seconds']:.1f} "
            f"({a['search_seconds']:.1f}) | {b['seconds']:.1f} ({b['search_seconds']:.1f}) | "
            f"{r['ray_over_inprocess']:.2f}x | {a['target_cut']} | {b['target_cut']} | "
            f"{r['patch_max_abs_difference']:.2g} | {a['load_before']:.1f}/{a['load_after']:.1f}; "
            f"{b['load_before']:.1f}/{b['load_after']:.1f} |"
        )
    lines += [
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch threads in process: {m['torch_threads']}; "
        f"torch {m.get('torch', '?')}, Ray {m['ray']}. The machine is shared (see the load averages): the figures are "
        "for this machine at that time, one run each.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
