"""The chosen branch's tuning in channels-last (the default on the CPU) against NCHW.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tune_memory_format.py \\
        --target fmnist-resnetc20-target --source fmnist-resnetc20-source --scale S --seed 0

One clone per memory format, in this process, one after the other (``--formats``: in
which order; a VM's speed drifts, so a speed probe is run before each and the order can be
swapped), with the tables' budget
but ``--tune-epochs`` tuning passes (default 3; the tables' 10 scale the tuning time): the
search is seeded, so both tune the same branch from the same start. Per format: the tuning's
seconds and seconds per pass, the clone's whole seconds, Ori / Tar / Avg on the test images
and the largest relative difference between the two tuned branches' tensors. Writes
``benchmarks/results/tune_memory_format-<target>-<scale>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from pnc.bench.baselines import _clone
from pnc.bench.machine import speed_probe
from pnc.bench.metrics import clone_accuracy, set_logits
from pnc.bench.paper import machine_info
from pnc.bench.results_files import write_json_md
from pnc.bench.search_variants import zoo_pair
from pnc.surgery import tuning
from pnc.zoo.tasks import CloneTask, shared_validation

OUT = Path(__file__).resolve().parent / "results"


@contextmanager
def nchw(module: torch.nn.Module, device: torch.device) -> Iterator[Any]:
    """Stands in for :func:`pnc.surgery.tuning.channels_last`: the tuning as before it."""
    yield lambda x: x


def run(args: argparse.Namespace) -> dict[str, Any]:
    target, t_card, source, s_card, splits, budget = zoo_pair(args.zoo_dir, args.target, args.source)
    task = CloneTask(
        splits,
        t_card.classes,
        s_card.classes,
        args.scale,
        seed=args.seed,
        old_fraction=0.3,
        validation=shared_validation(t_card, s_card),
    )
    pooled = task.eval_sets()["avg"]
    rows, states = [], {}
    default = tuning.channels_last
    contexts = {"channels_last": default, "nchw": nchw}
    for name in args.formats.split(","):
        context = contexts[name]
        tuning.channels_last = context
        try:
            probe = speed_probe()
            start = time.perf_counter()
            net, _, details = _clone(task, target, source, args.seed, budget, None, tune_epochs=args.tune_epochs)
            seconds = time.perf_counter() - start
        finally:
            tuning.channels_last = default
        report = details["report"]
        acc = clone_accuracy(set_logits(net, pooled), pooled.y, len(task.target_classes))
        (branch,) = net.branch_list()
        states[name] = branch.state_dict()
        tune = report["profile"]["tune_branch"]
        rows.append(
            {
                "format": name,
                "probe_ms": probe,
                "target_cut": report["target_cut"],
                "tune_seconds": tune,
                "tune_seconds_per_pass": tune / args.tune_epochs,
                "clone_seconds": seconds - details["reporting_seconds"],
                **{k: 100 * float(v) for k, v in acc.items()},
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    a, b = states["channels_last"], states["nchw"]
    floats = [k for k in a if a[k].is_floating_point() and a[k].numel()]
    worst = max(floats, key=lambda k: float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)))
    diff = float((a[worst] - b[worst]).norm() / b[worst].norm().clamp_min(1e-12))
    return {
        "target": args.target,
        "source": args.source,
        "scale": args.scale,
        "seed": args.seed,
        "tune_epochs": args.tune_epochs,
        "max_tensor_difference": diff,
        "max_difference_tensor": worst,
        "machine": machine_info(),
        "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tune_memory_format.py " + shlex.join(sys.argv[1:]),
        "rows": rows,
    }


def render(result: dict[str, Any]) -> str:
    lines = [
        f"# Tuning's memory format: `{result['target']}` <- `{result['source']}`, {result['scale']}, seed "
        f"{result['seed']}",
        "",
        f"One clone per format with {result['tune_epochs']} tuning passes (the tables: 10), the same search and "
        "branch; seconds of the tuning and of the clone (its reporting left out), the speed probe run before "
        "each (`pnc.bench.machine.speed_probe`), accuracy in % on the test images. Largest relative difference "
        "between the two tuned branches' float tensors (||a - b|| / ||b||): "
        f"{result['max_tensor_difference']:.2e}, `{result['max_difference_tensor']}`.",
        "",
        "| format | R | tuning s | s per pass | clone s | probe ms | Ori | Tar | Avg |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['format']} | {r['target_cut']} | {r['tune_seconds']:.1f} | {r['tune_seconds_per_pass']:.1f} | "
            f"{r['clone_seconds']:.1f} | {r['probe_ms']:.2f} | {r['ori']:.2f} | {r['tar']:.2f} | {r['avg']:.2f} |"
        )
    m = result["machine"]
    lines += ["", f"Machine: {m['cpu']}, {m['torch_threads']} thread(s). Command: `{result['command']}`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="fmnist-resnetc20-target")
    parser.add_argument("--source", default="fmnist-resnetc20-source")
    parser.add_argument("--scale", default="S")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tune-epochs", type=int, default=3)
    parser.add_argument("--formats", default="channels_last,nchw", help="the order the clones run in")
    parser.add_argument("--zoo-dir", default=None)
    args = parser.parse_args(argv)
    result = run(args)
    stem = OUT / f"tune_memory_format-{args.target}-{args.scale}"
    write_json_md(stem, result, render(result))
    print(render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
