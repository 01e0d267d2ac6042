"""Deployment cost in ONNX: the target alone, the direct ensemble and the PNC clone.

    .venv/bin/python benchmarks/onnx_latency.py            # default pairs, ~/.cache/pnc/zoo

For each default pair (digits cnn4, Fashion-MNIST LeNet-5; trained with
``ensure_default`` if the zoo lacks them) it clones "S" (20% of the source's classes)
with the default search (``run_clone``, resumable), then exports three models through
the ``pnc export`` command or ``to_onnx``:

* target: ``pnc export <target>`` (|T_t| logits);
* ensemble: one graph computing target and whole source, ``[target(x), source(x)[:, T_s]]``;
* clone: ``pnc export clone.pnc``, output ``cloned_logits`` (target + pruned branch).

It records onnxruntime CPU latency (1 intra-op thread, default graph optimizations; batch 1
and 64; median, interquartile range and minimum of repeated runs after a warm-up, the
three models timed in turns of 10 runs so that load from other jobs hits them alike), MACs (torch-pruning's
counter, per image) and parameters of the PyTorch modules, ONNX file sizes, Ori/Tar/Avg
accuracy from the ONNX outputs, and the byte-identity check of ``pnc detach --all``.
Writes ``benchmarks/results/onnx_latency.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch_pruning as tp
from rich.progress import Progress
from torch import Tensor, nn

from pnc.bench import cli
from pnc.bench.cli.clone import run_clone
from pnc.bench.metrics import clone_accuracy
from pnc.surgery.devices import device_of
from pnc.surgery.io import atomic_write_bytes, atomic_write_text, file_sha256
from pnc.surgery.onnx_export import LOGITS, OPSET, to_onnx
from pnc.surgery.onnx_merge import CLONED_OUTPUT, read_manifest
from pnc.zoo.datasets import load_dataset
from pnc.zoo.defaults import default_pair, ensure_default
from pnc.zoo.store import ZooStore, package_versions
from pnc.zoo.tasks import CloneTask

RESULTS = Path(__file__).resolve().parent / "results"
PAIRS = (("digits", "cnn4"), ("fashion-mnist", "lenet5"))
MODELS = ("target", "ensemble", "clone")


class DirectEnsemble(nn.Module):
    """(B, C, H, W) -> [target logits, source logits of T_s] (B, |T_t| + |T_s|)."""

    def __init__(self, target: nn.Module, source: nn.Module, outputs: list[int]):
        super().__init__()
        self.target, self.source = target, source
        outputs_ = torch.tensor(outputs, dtype=torch.long, device=device_of(source))
        self.register_buffer("outputs", outputs_, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.target(x), self.source(x)[:, self.outputs]], 1)


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _latency(
    paths: dict[str, Path],
    outputs: dict[str, str],
    x: Tensor,
    batch: int,
    warmup: int,
    repeats: int,
    progress: Progress,
    block: int = 10,
) -> dict[str, dict[str, float]]:
    """Milliseconds per run of each model on ``x[:batch]``: median, quartiles, minimum.

    The models take turns in blocks of ``block`` runs, so that load from other jobs hits
    them alike while each block runs with its own weights warm in the cache."""
    feed = np.ascontiguousarray(x[:batch].numpy())
    sessions = {k: _session(p) for k, p in paths.items()}
    for k, sess in sessions.items():
        for _ in range(warmup):
            sess.run([outputs[k]], {"input": feed})
    times: dict[str, list[float]] = {k: [] for k in sessions}
    task = progress.add_task(f"latency, batch {batch}", total=repeats)
    for _ in range(0, repeats, block):
        for k, sess in sessions.items():
            for _ in range(block):
                start = time.perf_counter()
                sess.run([outputs[k]], {"input": feed})
                times[k].append(1e3 * (time.perf_counter() - start))
        progress.advance(task, block)
    result = {}
    for k, t in times.items():
        q1, median, q3 = statistics.quantiles(t, n=4)
        result[k] = {"median_ms": median, "q1_ms": q1, "q3_ms": q3, "min_ms": min(t), "runs": len(t)}
    return result


def _accuracy(logits: np.ndarray, labels: Tensor, num_old: int) -> dict[str, float]:
    return clone_accuracy(torch.from_numpy(logits), labels, num_old)


def bench_pair(
    store: ZooStore, dataset: str, arch: str, work: Path, data_dir: str | None, warmup: int, repeats: dict[int, int]
) -> dict:
    target_name, source_name = default_pair(dataset, arch)
    splits = load_dataset(dataset, data_dir)
    for name in (target_name, source_name):
        ensure_default(store, name, dataset=splits)
    _, report = run_clone(store, target_name, [(source_name, "S")], work, data_dir=data_dir)
    patch = work / "clone.pnc"
    net, meta = store.load_patch(patch)
    target, t_card = store.load(target_name)
    source, s_card = store.load(source_name)
    task = CloneTask.from_json(meta["branches"][0]["task"], dataset=splits)

    paths = {k: work / f"{k}.onnx" for k in MODELS}
    zoo = ["--zoo-dir", str(store.root)]
    if (
        cli.main(["export", target_name, "--out", str(paths["target"]), *zoo]) != 0
        or cli.main(["export", str(patch), "--out", str(paths["clone"]), *zoo]) != 0
    ):
        raise RuntimeError("pnc export failed; see the message above")
    ensemble = DirectEnsemble(target, source, task.source_label_index()).eval()
    example = torch.zeros(1, *t_card.input_size, device=device_of(target))
    atomic_write_bytes(paths["ensemble"], to_onnx(ensemble, example).SerializeToString())
    detached = work / "detached.onnx"
    if cli.main(["detach", str(paths["clone"]), "--all", "--out", str(detached)]) != 0:
        raise RuntimeError("pnc detach failed; see the message above")
    identity = {
        "target_onnx_sha256": file_sha256(paths["target"]),
        "detached_onnx_sha256": file_sha256(detached),
        "manifest_base_sha256": read_manifest(onnx.load(paths["clone"]))["base_sha256"],
        "clone_onnx_sha256": file_sha256(paths["clone"]),
    }
    identity["byte_identical"] = identity["target_onnx_sha256"] == identity["detached_onnx_sha256"]

    evals = task.eval_sets()
    x, y = evals["avg"].x, evals["avg"].y
    outputs = {"target": LOGITS, "ensemble": LOGITS, "clone": CLONED_OUTPUT}
    onnx_logits = {k: _session(p).run([outputs[k]], {"input": x.numpy()})[0] for k, p in paths.items()}
    with torch.no_grad():
        parity = float(np.abs(onnx_logits["clone"] - net(x).numpy()).max())
    num_old, num_all = len(task.target_classes), len(net.classes)
    padded = np.concatenate([onnx_logits["target"], np.full((len(x), num_all - num_old), -np.inf, np.float32)], 1)
    accuracy = {
        "target": _accuracy(padded, y, num_old),
        "ensemble": _accuracy(onnx_logits["ensemble"], y, num_old),
        "clone": _accuracy(onnx_logits["clone"], y, num_old),
    }

    modules = {"target": target, "ensemble": ensemble, "clone": net}
    cost = {}
    for k, module in modules.items():
        macs, _ = tp.utils.count_ops_and_params(module, example)
        cost[k] = {
            "macs": int(macs),
            "params": sum(p.numel() for p in module.parameters()),
            "onnx_bytes": paths[k].stat().st_size,
        }
    with Progress() as progress:
        latency = {f"batch{b}": _latency(paths, outputs, x, b, warmup, n, progress) for b, n in repeats.items()}
    branch = report["branches"][0]
    return {
        "dataset": dataset,
        "arch": arch,
        "target": target_name,
        "source": source_name,
        "cloned_classes": branch["classes"],
        "target_cut": branch["target_cut"],
        "source_cut": branch["source_cut"],
        "kept_fraction": branch["kept_fraction"],
        "eval_images": len(x),
        "onnx_vs_torch_max_abs": parity,
        "accuracy": accuracy,
        "cost": cost,
        "latency": latency,
        "detach": identity,
    }


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# ONNX deployment cost: target alone, direct ensemble, PNC clone",
        "",
        f"Written by `benchmarks/onnx_latency.py` on {m['cpu']} ({m['cores']} cores, load average "
        f"{m['load_before']:.2f} before the run; the machine was shared with other jobs), onnxruntime "
        f"{m['onnxruntime']} CPUExecutionProvider with 1 intra-op thread and default graph "
        f"optimizations, opset {result['opset']}, torch {m['torch']}.",
        "",
        f"Latency: median (interquartile range) and minimum in ms per `session.run`, after "
        f"{result['warmup']} warm-up runs, the three models timed in turns of 10 runs; on a shared machine "
        "the minimum is the steadier figure. MACs per image (torch-pruning's counter, convs and "
        "linears) and parameters of the PyTorch modules; the clone holds the target plus a structurally "
        "pruned branch, the ensemble the target plus the whole source. Accuracy (%) from the ONNX outputs "
        "on the test images of T_t (Ori) and of the cloned classes (Tar), Avg pooled; the target alone "
        "cannot predict a cloned class.",
        "",
    ]
    for r in result["pairs"]:
        lat = r["latency"]
        lines += [
            f"## {r['dataset']} / {r['arch']}: {r['target']} + {r['source']} "
            f"(cloned classes {', '.join(r['cloned_classes'])}, R = {r['target_cut']} <- {r['source_cut']})",
            "",
            "| model | MACs | params | ONNX bytes | batch 1 ms | batch 64 ms | Ori | Tar | Avg |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for k in MODELS:
            c, a = r["cost"][k], r["accuracy"][k]
            cells = [
                f"{lat[b][k]['median_ms']:.3f} ({lat[b][k]['q1_ms']:.3f}-{lat[b][k]['q3_ms']:.3f}), "
                f"min {lat[b][k]['min_ms']:.3f}"
                for b in ("batch1", "batch64")
            ]
            lines.append(
                f"| {k} | {c['macs']:,} | {c['params']:,} | {c['onnx_bytes']:,} | {cells[0]} | {cells[1]} | "
                f"{100 * a['ori']:.2f} | {100 * a['tar']:.2f} | {100 * a['avg']:.2f} |"
            )
        ce, cc = r["cost"]["ensemble"], r["cost"]["clone"]
        d = r["detach"]
        ratio = {
            f"{b} {s}": lat[b]["clone"][f"{s}_ms"] / lat[b]["ensemble"][f"{s}_ms"]
            for b in ("batch1", "batch64")
            for s in ("median", "min")
        }
        lines += [
            "",
            f"Clone / ensemble: MACs {cc['macs'] / ce['macs']:.2f}x, params {cc['params'] / ce['params']:.2f}x, "
            f"latency {', '.join(f'{k} {v:.2f}x' for k, v in ratio.items())}. "
            f"ONNX vs PyTorch clone logits: max |diff| {r['onnx_vs_torch_max_abs']:.2e} on {r['eval_images']} "
            f"test images.",
            "",
            f"`pnc detach clone.onnx --all`: sha256 {d['detached_onnx_sha256']}; `pnc export {r['target']}`: "
            f"sha256 {d['target_onnx_sha256']} ({'byte-identical' if d['byte_identical'] else 'DIFFERENT'}).",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo-dir", help="zoo folder (default ~/.cache/pnc/zoo)")
    parser.add_argument("--data-dir")
    parser.add_argument(
        "--work-dir",
        default=str(Path.home() / ".cache" / "pnc" / "bench-onnx"),
        help="clone runs and ONNX files (resumable)",
    )
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats-1", type=int, default=500, help="timed runs at batch 1")
    parser.add_argument("--repeats-64", type=int, default=200, help="timed runs at batch 64")
    args = parser.parse_args()
    store = ZooStore(args.zoo_dir)
    load = os.getloadavg()[0]
    pairs = []
    for dataset, arch in PAIRS:
        pairs.append(
            bench_pair(
                store,
                dataset,
                arch,
                Path(args.work_dir) / f"{dataset}-{arch}",
                args.data_dir,
                args.warmup,
                {1: args.repeats_1, 64: args.repeats_64},
            )
        )
    result = {
        "machine": {
            "cpu": _cpu_name(),
            "cores": os.cpu_count(),
            "load_before": load,
            "onnxruntime": ort.__version__,
            "onnx": onnx.__version__,
            **package_versions(),
        },
        "opset": OPSET,
        "warmup": args.warmup,
        "pairs": pairs,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / "onnx_latency.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(RESULTS / "onnx_latency.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
