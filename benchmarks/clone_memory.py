"""Where a clone's memory goes: resident memory at each phase of one clone.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/clone_memory.py \\
        --target fmnist32-mobilenetv2_050-target --source fmnist32-resnet18-source --scale S
    ... --keep-freed     # the same clone, freed trainers left to the allocator (what the release saves)

One clone of two zoo models with the tables' budget (the paper setting, the default search,
seed 0), set up as ``benchmarks/search_variants.py`` does, with the process's resident set
size (``/proc/self/statm``) sampled every 5 ms. Each phase — G, the frozen outputs, every
candidate's stage and the trainer built for it, the branch's build and tuning, the
finalists' test accuracy — gets its resident memory at entry, its peak and its resident
memory at exit, in MiB above the level before the clone (the models and images loaded).
``--keep-freed`` replaces :func:`~pnc.surgery.devices.release_freed_memory` in the search by
a no-op: each finished trainer is then left to the automatic collector and the allocator.
Writes ``benchmarks/results/clone_memory-<target>-<source>-<scale>[-keep-freed].{json,md}``.
"""

from __future__ import annotations

import argparse
import functools
import shlex
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from pnc.bench.baselines import _clone, resident_bytes
from pnc.bench.paper import machine_info
from pnc.bench.results_files import write_json_md
from pnc.bench.search_variants import OUT, add_pair_arguments, zoo_pair
from pnc.surgery import cloning, cut_search, insertion
from pnc.zoo.tasks import CloneTask, shared_validation


def _rss_mb() -> float:
    rss = resident_bytes()
    if rss is None:
        raise OSError("clone_memory.py reads /proc/self/statm (Linux)")
    return rss / 2**20


class PhaseMemory:
    """Resident memory per phase, within a ``with`` block (a thread samples it): :meth:`wrap`
    a function, and every call of it becomes a phase with its entry, peak and exit (MiB,
    absolute) and its nesting depth."""

    def __init__(self, interval: float = 0.005):
        self.phases: list[dict[str, Any]] = []
        self._open: dict[int, list[float]] = {}
        self._depth = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(interval,), daemon=True)

    def __enter__(self) -> PhaseMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self, interval: float) -> None:
        while not self._stop.wait(interval):
            rss = _rss_mb()
            with self._lock:
                for peak in self._open.values():
                    peak[0] = max(peak[0], rss)

    def wrap(self, owner: object, name: str, label: Callable[..., str]) -> None:
        """Make each call of ``owner.name`` a phase named ``label(*args)``."""
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def phase(*args: Any, **kwargs: Any) -> Any:
            entry = _rss_mb()
            peak = [entry]
            with self._lock:
                self._open[id(peak)] = peak
            record = {"phase": label(*args), "depth": self._depth}
            self.phases.append(record)
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                with self._lock:
                    del self._open[id(peak)]
                record |= {"entry": entry, "peak": peak[0], "exit": _rss_mb()}

        setattr(owner, name, phase)


def run(args: argparse.Namespace) -> dict[str, Any]:
    target, t_card, source, s_card, splits, budget = zoo_pair(args.zoo_dir, args.target, args.source)
    task = CloneTask(
        splits, t_card.classes, s_card.classes, args.scale, seed=args.seed, validation=shared_validation(t_card, s_card)
    )
    if args.keep_freed:
        cut_search.release_freed_memory = lambda: None  # type: ignore[attr-defined]
    with PhaseMemory() as memory:
        memory.wrap(cloning, "fit_local_models", lambda *a: "G (local models)")
        memory.wrap(cloning, "SearchContext", lambda *a: "frozen outputs (SearchContext)")
        memory.wrap(cut_search, "run_job", lambda ctx, config, job, *a: f"candidate {job.index}, stage {job.stage}")
        memory.wrap(insertion.CandidateTrainer, "__init__", lambda trainer, ctx, r, *a: f"trainer at R={r.node}")
        memory.wrap(insertion.CandidateTrainer, "run_phase", lambda trainer, phase, *a: f"{phase} phase")
        memory.wrap(cloning, "build_branch", lambda *a: "build the branch")
        memory.wrap(cloning, "tune_branch", lambda *a: "tune the branch")
        memory.wrap(cloning, "finalist_accuracy", lambda *a: "finalists' test accuracy (reported)")
        before = _rss_mb()
        start = time.perf_counter()
        _, _, details = _clone(task, target, source, args.seed, budget, None)
        seconds = time.perf_counter() - start
    for record in memory.phases:
        for key in ("entry", "peak", "exit"):
            record[key] -= before
    return {
        "target": args.target,
        "source": args.source,
        "scale": args.scale,
        "seed": args.seed,
        "keep_freed": args.keep_freed,
        "rss_before_mb": before,
        "peak_mb": max(r["peak"] for r in memory.phases),
        "seconds": seconds,
        "chosen_cut": details["report"]["target_cut"],
        "phases": memory.phases,
        "machine": machine_info(),
    }


def render(result: dict[str, Any], command: str) -> str:
    freed = (
        "finished trainers left to the automatic collector and the allocator (`--keep-freed`)"
        if result["keep_freed"]
        else "each finished trainer released at once (the default)"
    )
    lines = [
        f"# Clone memory: `{result['target']}` <- `{result['source']}`, {result['scale']}, seed {result['seed']}",
        "",
        f"Resident memory in MiB above the {result['rss_before_mb']:.0f} MiB before the clone (models and "
        f"images loaded), sampled every 5 ms; {freed}. Peak **{result['peak_mb']:.0f} MiB**, "
        f"{result['seconds']:.0f} s, chosen R `{result['chosen_cut']}`. Nested phases are indented.",
        "",
        "| phase | entry | peak | exit |",
        "|---|---:|---:|---:|",
    ]
    for r in result["phases"]:
        lines.append(
            f"| {'&nbsp;&nbsp;' * r['depth']}{r['phase']} | {r['entry']:.0f} | {r['peak']:.0f} | {r['exit']:.0f} |"
        )
    lines += ["", f"Machine: {result['machine']['cpu']}. Command: `{command}`.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_pair_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-freed", action="store_true", help="no release of finished trainers (the effect)")
    args = parser.parse_args()
    command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/clone_memory.py " + " ".join(
        shlex.quote(a) for a in sys.argv[1:]
    )
    result = run(args)
    stem = f"clone_memory-{args.target}-{args.source}-{args.scale}" + ("-keep-freed" if args.keep_freed else "")
    write_json_md(OUT / stem, result | {"command": command}, render(result, command))
    print(f"peak {result['peak_mb']:.0f} MiB above the start; wrote {OUT / stem}.md")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
