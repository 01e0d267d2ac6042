"""``pnc prune``: class-local structural pruning of the layers after a cut (Eq. 4-5, no insertion).

    pnc prune fmnist-lenet5-source --from block1_2 --classes Sandal,Sneaker --keep 0.5 --out runs/p

MODEL is a zoo model (its card names the dataset and classes). G is fitted on a seeded
share of the chosen classes' training images, soft masks on the coupling groups after
the cut are trained against G (:func:`pnc.surgery.localization.localize`), binarized to
the top ``keep`` share per group, and the layers are structurally pruned. Writes
DIR/suffix.onnx (input ``cut`` (batch, *cut shape), output ``logits``, all the model's
classes), DIR/suffix.safetensors and DIR/prune.json (model, cut, classes, kept channel
indices per group, sizes, accuracies); :func:`load_pruned` rebuilds the suffix from them.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from pnc.surgery.branch import module_cost
from pnc.surgery.cuts import cut_points, find_cut
from pnc.surgery.devices import DeviceLike, cpu_copy, device_of
from pnc.surgery.errors import ExportError, PncError, TaskError
from pnc.surgery.io import atomic_write_bytes, atomic_write_text, save_tensors
from pnc.surgery.local_models import fit_local_models
from pnc.surgery.localization import (
    LocalizeConfig,
    group_sizes,
    localize,
    masked_suffix,
    pruned_suffix,
)
from pnc.surgery.onnx_export import ATOL, RTOL, run, to_onnx
from pnc.surgery.splitting import extract
from pnc.surgery.tracing import TracedModel, trace
from pnc.zoo.datasets import ImageData, load_dataset
from pnc.zoo.images import decoded
from pnc.zoo.store import ModelCard, ZooStore
from pnc.zoo.tasks import CLONE_PRESETS, SetT, parse_classes, select_classes

from .common import add_data_dir, add_device, add_zoo_dir, check_output_dir, in_range, seed_number
from .common import share as share_arg

FORMAT = "pnc-prune/1"
CUT_INPUT = "cut"


def model_classes(spec: str, card: ModelCard, dataset_classes: list[str]) -> list[int]:
    """Dataset class ids of ``spec`` ("S"/"M" presets of the model's classes, ids, ranges or
    names); TaskError unless each is one of the model's outputs."""
    if spec.upper() in CLONE_PRESETS:
        return card.classes[: max(1, round(CLONE_PRESETS[spec.upper()] * len(card.classes)))]
    ids = parse_classes(spec, dataset_classes)
    outside = [i for i in ids if i not in card.classes]
    if outside:
        raise TaskError(
            f"classes {outside} are not outputs of {card.name} (it predicts "
            f"{', '.join(f'{i} {n}' for i, n in zip(card.classes, card.class_names))})"
        )
    return ids


def share(data: SetT, fraction: float, seed: int) -> SetT:
    """A seeded ``fraction`` of each class's images (at least one per class)."""
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for label in data.y.unique(sorted=True):
        members = torch.nonzero(data.y == label).flatten()
        order = torch.randperm(len(members), generator=gen, device=gen.device).to(members.device)
        picks.append(members[order[: max(1, round(fraction * len(members)))]])
    return data.subset(torch.cat(picks).sort().values)


@torch.no_grad()
def logits_on(fn: Callable[[Tensor], Tensor], x: Tensor, device: torch.device, batch: int = 1024) -> Tensor:
    """``fn`` on x (N, ...) in batches moved to ``device`` -> (N, K) on the CPU (the metrics use numpy)."""
    return torch.cat([fn(xb.to(device)).cpu() for xb in x.split(batch)])


def auroc(scores: Tensor, positive_: Tensor) -> float:
    """Area under the ROC curve of ``scores`` (N,) for the boolean labels ``positive_`` (N,), ties halved."""
    _, inverse, counts = np.unique(scores.numpy(), return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts  # 0-based rank of each distinct value; ties get their mean rank
    ranks = torch.as_tensor(first[inverse] + (counts[inverse] - 1) / 2.0, dtype=torch.float64, device=positive_.device)
    n_pos, n_neg = int(positive_.sum()), int((~positive_).sum())
    return float((ranks[positive_].sum() - n_pos * (n_pos - 1) / 2) / max(n_pos * n_neg, 1))


def measure(
    suffix: Callable[[Tensor], Tensor],
    prefix: nn.Module,
    test: ImageData,
    outputs: list[int],
    reference: Tensor | None = None,
) -> dict[str, float]:
    """Metrics of ``suffix(prefix(x))`` on ``test`` (images of every model class, labels =
    model output index), run on the prefix's device: accuracy among ``outputs`` (argmax over
    their logits only) on their images, mean one-vs-rest AUROC of each class's logit over all
    test images, and the relative squared error of the ``outputs`` logits vs ``reference``
    (the unpruned logits)."""
    logits = logits_on(lambda xb: suffix(prefix(xb)), test.x, device_of(prefix))
    wanted = torch.tensor(outputs, device=test.y.device)
    mine = torch.isin(test.y, wanted)
    among = logits[mine][:, outputs]
    position = (test.y[mine].unsqueeze(1) == wanted).long().argmax(1)
    result = {
        "accuracy": float((among.argmax(1) == position).float().mean()),
        "auroc": float(np.mean([auroc(logits[:, o], test.y == o) for o in outputs])),
        "test_images": int(mine.sum()),
    }
    if reference is not None:
        ref = reference[mine][:, outputs]
        result["logit_rel_error"] = float(((among - ref) ** 2).sum() / (ref**2).sum().clamp_min(1e-12))
    return result


def run_prune(
    store: ZooStore,
    model_name: str,
    cut_name: str,
    classes_spec: str,
    out: Path,
    *,
    keep: float = 0.5,
    fraction: float = 0.1,
    seed: int = 0,
    data_dir: str | None = None,
    config: LocalizeConfig | None = None,
    num_masks: int = 100,
    progress: bool = True,
    keep_override: dict[str, Tensor] | None = None,
    cache_dir: Path | None = None,
    device: DeviceLike | None = None,
) -> dict:
    """Prune ``model_name``'s layers after ``cut_name`` for ``classes_spec`` on ``device`` (default:
    torch's default device); write DIR/suffix.onnx, suffix.safetensors and prune.json (the same
    files on every device); return the report (prune.json's content).

    ``keep_override`` ({group: kept indices}) replaces the G-guided masks (baselines);
    ``cache_dir`` caches G (it depends on the model, images and settings, not on the cut)."""
    start = time.perf_counter()
    if not 0 < fraction <= 1:
        raise TaskError(f"--fraction {fraction} must be a share in (0, 1]")
    config = config or LocalizeConfig(keep=keep, seed=seed)
    model, card = store.load(model_name, device)
    device = device_of(model)
    dataset = load_dataset(card.dataset, data_dir, image_size=card.input_size[-1])
    classes = model_classes(classes_spec, card, dataset.classes)
    outputs = [card.classes.index(c) for c in classes]
    train = decoded(share(select_classes(dataset.train, classes), fraction, seed), "training images")
    test = decoded(select_classes(dataset.test, card.classes), "test images")  # labels = model output index
    traced = trace(model, train.x[:2])
    cut = find_cut(cut_points(traced, verify=False), cut_name)
    prefix, body, head = masked_suffix(traced, cut)
    layout = "NCHW" if cut.layout == "NCHW" else "NLC"
    if keep_override is None:
        grid = 4 if train.x.shape[-1] <= 32 else 8
        g = fit_local_models(model, train.x, outputs, num_masks=num_masks, grid=grid, seed=seed, cache_dir=cache_dir)
        keep_idx, masked = _localize(body, prefix, train.x, outputs, g, config, layout, head, progress)
        excluded = masked.excluded
        sizes = {gr.name: gr.size for gr in masked.groups}
    with torch.no_grad():
        example = prefix(train.x[:8].to(device))
    if keep_override is not None:
        keep_idx, excluded = keep_override, {}
        sizes = group_sizes(body, example, layout, [head])
        unknown = set(keep_idx) - set(sizes)
        if unknown:
            raise PncError(f"no coupling groups {sorted(unknown)} after {cut.node!r}; they are {sorted(sizes)}")
    pruned = pruned_suffix(traced, cut, keep_idx, example)
    before, after = module_cost(body, example), module_cost(pruned, example)
    reference = logits_on(model, test.x, device)
    report = {
        "format": FORMAT,
        "model": model_name,
        "model_sha256": card.sha256,
        "arch": card.arch,
        "dataset": card.dataset,
        "cut": cut.node,
        "cut_module": cut.module,
        "cut_shape": list(cut.shape),
        "layout": layout,
        "classes": classes,
        "class_names": [dataset.classes[c] for c in classes],
        "outputs": outputs,
        "keep": config.keep,
        "groups": {n: {"size": sizes[n], "kept": [int(i) for i in idx]} for n, idx in keep_idx.items()},
        "excluded_groups": excluded,
        "suffix": {
            "macs_before": before[0],
            "macs_after": after[0],
            "params_before": before[1],
            "params_after": after[1],
        },
        "unpruned": measure(body, prefix, test, outputs),
        "pruned": measure(pruned, prefix, test, outputs, reference),
        "settings": {
            "fraction": fraction,
            "seed": seed,
            "num_masks": num_masks,
            "train_images": len(train),
            "localize": vars(config) | {},
            "masks": "G-guided" if keep_override is None else "given",
            "device": str(device),
        },
        "files": {"onnx": "suffix.onnx", "weights": "suffix.safetensors"},
    }
    _write(out, pruned, example, report)
    report["seconds"] = round(time.perf_counter() - start, 2)
    atomic_write_text(out / "prune.json", json.dumps(report, indent=2))
    return report


def _localize(body, prefix, images, outputs, g, config, layout, head, progress):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(
        TextColumn("localize"), BarColumn(), MofNCompleteColumn(), console=Console(stderr=True), disable=not progress
    ) as bar:
        task = bar.add_task("localize", total=config.steps)
        return localize(
            body, prefix, images, outputs, g, config, layout=layout, frozen=[head], tick=lambda: bar.advance(task)
        )


def _write(out: Path, pruned: nn.Module, example: Tensor, report: dict) -> None:
    """suffix.onnx (checked against PyTorch in onnxruntime) and suffix.safetensors, from CPU copies."""
    pruned, example = cpu_copy(pruned), example.cpu()
    proto = to_onnx(pruned, example[:1])
    _rename_input(proto, CUT_INPUT)
    onnx.checker.check_model(proto, full_check=True)
    with torch.no_grad():
        expected = pruned(example).numpy()
    got = run(proto, example)["logits"]
    if got.shape != expected.shape or not np.allclose(got, expected, rtol=RTOL, atol=ATOL):
        raise ExportError("onnxruntime's output of the pruned suffix differs from PyTorch's; please report it")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "suffix.onnx", proto.SerializeToString())
    save_tensors(out / "suffix.safetensors", pruned.state_dict(), metadata={"format": FORMAT})


def _rename_input(proto: onnx.ModelProto, name: str) -> None:
    old = proto.graph.input[0].name
    proto.graph.input[0].name = name
    for node in proto.graph.node:
        node.input[:] = [name if x == old else x for x in node.input]


def load_pruned(
    folder: str | Path, store: ZooStore, device: DeviceLike | None = None
) -> tuple[nn.Module, TracedModel, dict]:
    """(pruned suffix with its saved weights, the traced zoo model, prune.json) of a ``pnc prune``
    folder, on ``device``.

    The suffix is rebuilt from the zoo model, the cut and the kept indices, then loaded
    strictly from suffix.safetensors."""
    folder = Path(folder)
    try:
        spec = json.loads((folder / "prune.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PncError(f"{folder}/prune.json is missing or not JSON ({err}); rerun `pnc prune`") from err
    if spec.get("format") != FORMAT:
        raise PncError(f"{folder}/prune.json is not a `pnc prune` result (format {spec.get('format')!r})")
    model, card = store.load(spec["model"], device)
    if card.sha256 != spec["model_sha256"]:
        raise PncError(
            f"zoo model {spec['model']!r} changed since it was pruned (sha256 {card.sha256[:12]}... vs "
            f"{spec['model_sha256'][:12]}...); prune it again"
        )
    zeros = torch.zeros(2, *card.input_size, device=device_of(model))
    traced = trace(model, zeros)
    cut = find_cut(cut_points(traced, verify=False), spec["cut"])
    with torch.no_grad():
        example = extract(traced, None, [cut.node])(zeros)
    keep = {n: torch.tensor(g["kept"], dtype=torch.long, device=zeros.device) for n, g in spec["groups"].items()}
    pruned = pruned_suffix(traced, cut, keep, example)
    pruned.load_state_dict(load_file(str(folder / "suffix.safetensors")), strict=True)
    return pruned, traced, spec


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    s = report["suffix"]
    table = Table(
        title=f"{report['model']} after {report['cut']}, classes {', '.join(report['class_names'])}, "
        f"keep {report['keep']}"
    )
    for col in ("suffix", "MACs", "params", "acc among classes", "AUROC", "logit rel. error"):
        table.add_column(col, justify="left" if col == "suffix" else "right")
    for label, key, macs, params in (
        ("unpruned", "unpruned", s["macs_before"], s["params_before"]),
        ("pruned", "pruned", s["macs_after"], s["params_after"]),
    ):
        m = report[key]
        table.add_row(
            label,
            f"{macs:,}",
            f"{params:,}",
            f"{100 * m['accuracy']:.2f}",
            f"{m['auroc']:.4f}",
            f"{m['logit_rel_error']:.4f}" if "logit_rel_error" in m else "",
        )
    Console().print(table)


def _cmd_prune(args: argparse.Namespace) -> int:
    config = LocalizeConfig(keep=args.keep, steps=args.steps, seed=args.seed)
    out = check_output_dir(args.out, "--out")
    report = run_prune(
        ZooStore(args.zoo_dir),
        args.model,
        args.cut,
        args.classes,
        out,
        keep=args.keep,
        fraction=args.fraction,
        seed=args.seed,
        data_dir=args.data_dir,
        config=config,
        progress=not args.json,
        device=args.device,
    )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
        s = report["suffix"]
        print(
            f"MACs of the layers after {report['cut']}: {s['macs_before']:,} -> {s['macs_after']:,} "
            f"({s['macs_after'] / max(s['macs_before'], 1):.2f}x); wrote {out}/suffix.onnx, suffix.safetensors, "
            f"prune.json ({report['seconds']:.0f} s)"
        )
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prune",
        help="prune the layers after a cut to the channels that serve some classes",
        description="Localization alone (Eq. 4-5): fit G on images of CLASSES, train channel "
        "masks after the cut against it, keep the top share per coupling group and "
        "prune structurally. Writes suffix.onnx, suffix.safetensors and prune.json.",
    )
    p.add_argument("model", help="a zoo model name (its card gives the dataset and classes)")
    p.add_argument(
        "--from",
        dest="cut",
        required=True,
        metavar="CUT",
        help="the cut: an fx node or module name listed by `pnc cuts MODEL`, or first/last block cut",
    )
    p.add_argument("--classes", required=True, help="classes to keep serving: ids, ranges, names, S or M")
    p.add_argument("--keep", type=share_arg, default=0.5, help="kept share of each channel group, in (0, 1]")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--fraction",
        type=share_arg,
        default=0.1,
        help="share of the classes' training images G is fitted on (seeded), in (0, 1]",
    )
    p.add_argument("--steps", type=in_range(int, 1, 100_000), default=200, help="mask training steps")
    p.add_argument("--seed", type=seed_number, default=0)
    p.add_argument("--json", action="store_true", help="print prune.json instead of a table")
    add_device(p, "fit G, train the masks and measure")
    add_zoo_dir(p)
    add_data_dir(p)
    p.set_defaults(func=_cmd_prune)
