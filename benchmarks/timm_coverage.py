"""How much of timm pnc can cut: one small model per timm architecture family.

For every module of ``timm.list_modules()`` the representative is its model with the
fewest parameters (counted on the meta device among the names that look smallest).
It is built without weights, traced at a small input (the first of 64, 112, 56, 128 px that
the model runs on, else its own input size), cut at every cut point and split-verified
(``suffix(prefix(x))`` equal to ``model(x)`` with ``torch.equal``), and its block-level
cut points are listed. A family counts as *verified* when tracing succeeds, at least one
cut point is found and every one of them splits exactly.

    .venv/bin/python benchmarks/timm_coverage.py            # all families (long, 2 cores)
    .venv/bin/python benchmarks/timm_coverage.py --only resnet vgg

Writes ``benchmarks/results/timm_coverage.json`` and ``.md`` (atomically, after every
family, so an interrupted run keeps what it measured and ``--resume`` goes on from there).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pnc.surgery.cuts import classifier_of, cut_points
from pnc.surgery.errors import CutError, PncError
from pnc.surgery.tracing import default_input, trace
from pnc.zoo.resolve import resolve_model

RESULTS = Path(__file__).parent / "results"
SMALL = 64
#: input sizes tried in turn until the model runs (patch 14/16 and stride-32 nets need others than 64)
SMALL_SIZES = (SMALL, 112, 56, 128)
#: size words in timm names, smallest first (a prefilter before counting parameters)
_SIZE_WORDS = [
    "atto",
    "femto",
    "pico",
    "nano",
    "xxxs",
    "micro",
    "xxs",
    "xs",
    "mini",
    "tiny",
    "t",
    "extra_small",
    "small",
    "s",
    "lite",
    "light",
    "medium",
    "m",
    "base",
    "b",
    "large",
    "l",
    "xl",
    "huge",
    "h",
    "giant",
    "g",
]
_CANDIDATES = 10


class _Timeout(BaseException):  # not an Exception: code under test must not swallow it
    pass


@contextlib.contextmanager
def _time_limit(seconds: int) -> Iterator[None]:
    def _raise(signum: int, frame: Any) -> None:
        raise _Timeout(f"timed out after {seconds} s")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _name_score(name: str) -> tuple[int, int, str]:
    tokens = re.split(r"[_.\-]", name)
    ranks = [_SIZE_WORDS.index(t) for t in tokens if t in _SIZE_WORDS]
    numbers = [int(n) for n in re.findall(r"\d+", name)]
    return (min(ranks) if ranks else len(_SIZE_WORDS) // 2, sum(numbers[:1]), name)


def _param_count(name: str) -> int:
    import timm

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    return sum(p.numel() for p in model.parameters())


def representative(module: str) -> tuple[str, int | None]:
    """The family's model with the fewest parameters among its smallest-looking names."""
    import timm

    names = sorted(set(timm.list_models(module=module)), key=_name_score)[:_CANDIDATES]
    counted = []
    for name in names:
        try:
            counted.append((_param_count(name), name))
        except Exception:  # counted on the meta device; the real build below reports errors
            continue
    if not counted:
        return names[0], None
    params, name = min(counted)
    return name, params


def _run_model(name: str, size: int | None) -> dict[str, Any]:
    """Build, trace, cut and verify ``name`` at SIZE x SIZE (None: its own input size)."""
    import timm

    own = tuple(timm.get_pretrained_cfg(name).input_size) if timm.get_pretrained_cfg(name) else (3, 224, 224)
    input_size = (own[0], size, size) if size else own
    torch.manual_seed(0)
    model, _ = resolve_model(name, input_size)
    x = default_input(model, input_size)
    traced = trace(model, x)
    cuts = cut_points(traced)
    blocks = cut_points(traced, blocks=True, verify=False)
    try:
        classifier = classifier_of(traced).module
    except CutError as err:
        classifier = f"none: {err}"
    bad = [c for c in cuts if not c.verified]
    return {
        "input_size": list(input_size),
        "cuts": len(cuts),
        "verified_cuts": len(cuts) - len(bad),
        "blocks": len(blocks),
        "block_layouts": sorted({c.layout for c in blocks}),
        "any_batch_size": traced.batch_size is None,
        "classifier": classifier,
        "status": "verified" if cuts and not bad else ("no cuts" if not cuts else "partial"),
        "reason": "; ".join(f"{c.node}: {c.reason}" for c in bad[:3])
        if bad
        else ("" if cuts else "no cut point found"),
    }


def run_family(module: str, timeout: int) -> dict[str, Any]:
    start = time.perf_counter()
    record: dict[str, Any] = {"family": module}
    try:
        with _time_limit(timeout):
            name, params = representative(module)
            record.update(model=name, params=params)
            errors = []
            for size in (*SMALL_SIZES, None):  # None: the model's own input size
                try:
                    record.update(_run_model(name, size))
                    break
                except Exception as err:  # built or run at a size the model does not take: try the next
                    if size is None:
                        raise
                    errors.append(f"{size}x{size}: {_one_line(err)}")
            if errors:
                record["small_input_error"] = " | ".join(errors)
    except _Timeout as err:
        record.update(status="timeout", reason=str(err))
    except PncError as err:
        record.update(status="trace error" if "trace" in type(err).__name__.lower() else "error", reason=_one_line(err))
    except Exception as err:  # the benchmark reports every failure instead of stopping
        record.update(status="error", reason=_one_line(err), where=traceback.format_exc(limit=-3))
    record["seconds"] = round(time.perf_counter() - start, 1)
    return record


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:500]


def _write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _markdown(doc: dict[str, Any]) -> str:
    s = doc["summary"]
    lines = [
        "# timm coverage of pnc cut points",
        "",
        f"One model per timm family (smallest by parameter count), timm {doc['timm']}, torch {doc['torch']}, "
        f"built without weights, at the first input size of {', '.join(map(str, SMALL_SIZES))} px the model runs on "
        "(else its own). "
        "Verified = traced, and every cut point splits with `suffix(prefix(x))` `torch.equal` to `model(x)`.",
        "",
        f"**{s['verified']} / {s['families']} families verified ({s['percent']:.1f}%)**; "
        f"{s['any_batch_size']} traced batch-size-generic; `classifier_of` found the classifier in "
        f"{s['classifier_found']} (the others average two heads, add an auxiliary head, or are encoders "
        f"without one); total {s['seconds']:.0f} s.",
        "",
        "| family | model | params (M) | input | status | cuts | blocks | block layout | classifier | s | reason |",
        "|---|---|---:|---|---|---:|---:|---|---|---:|---|",
    ]
    for r in doc["results"]:
        params = f"{r['params'] / 1e6:.1f}" if r.get("params") else ""
        size = "x".join(str(v) for v in r.get("input_size", [])[1:])
        cuts = f"{r.get('verified_cuts', '')}/{r.get('cuts', '')}" if "cuts" in r else ""
        reason = (r.get("reason") or "").replace("|", "\\|")
        lines.append(
            f"| {r['family']} | {r.get('model', '')} | {params} | {size} | {r['status']} | {cuts} | "
            f"{r.get('blocks', '')} | {','.join(r.get('block_layouts', []))} | "
            f"{'none' if str(r.get('classifier', 'none')).startswith('none') else r['classifier']} | "
            f"{r['seconds']} | {reason} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    import timm

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="timm module names to run (default: all)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per family")
    parser.add_argument("--resume", action="store_true", help="keep families already in the JSON")
    parser.add_argument("--out", type=Path, default=RESULTS / "timm_coverage.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the machine is shared; one thread per run is the fair measure

    modules = [m for m in timm.list_modules() if timm.list_models(module=m)]
    if args.only:
        modules = [m for m in modules if m in args.only]
    done: dict[str, dict[str, Any]] = {}
    if (args.resume or args.only) and args.out.exists():
        done = {r["family"]: r for r in json.loads(args.out.read_text())["results"]}
    todo = [m for m in modules if args.only or m not in done]

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
        task = bar.add_task("families", total=len(todo))
        for module in todo:
            bar.update(task, description=f"{module:28s}")
            done[module] = run_family(module, args.timeout)
            bar.console.print(
                f"{module:28s} {done[module].get('model', ''):40s} {done[module]['status']:12s} "
                f"{done[module]['seconds']:7.1f}s {done[module].get('reason', '')[:100]}"
            )
            _save(args.out, done)
            bar.advance(task)


def _save(out: Path, done: dict[str, dict[str, Any]]) -> None:
    import timm

    results = sorted(done.values(), key=lambda r: r["family"])
    verified = sum(r["status"] == "verified" for r in results)
    doc = {
        "timm": timm.__version__,
        "torch": torch.__version__,
        "input": SMALL,
        "summary": {
            "families": len(results),
            "verified": verified,
            "percent": 100.0 * verified / max(len(results), 1),
            "any_batch_size": sum(bool(r.get("any_batch_size")) for r in results),
            "classifier_found": sum(not str(r.get("classifier", "none")).startswith("none") for r in results),
            "seconds": sum(r["seconds"] for r in results),
        },
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    _write(out, json.dumps(doc, indent=1) + "\n")
    _write(out.with_suffix(".md"), _markdown(doc))


if __name__ == "__main__":
    main()
