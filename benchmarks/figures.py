"""The paper's Fig. 3 (accuracy against the size of the transferable module) and Fig. 4
(locality similarity matrices of the source and of one-class transferable modules).

Fig. 3: PNC on one task with the mask ratio c/|W| swept (full search at each ratio), and
with R fixed to each block cut in turn (``SearchConfig(candidates=[cut])``).

Fig. 4: the paper clones each of 10 MNIST classes from a 10-class source. A clone task
needs disjoint target and source classes, so here the 5-class default source (classes
5-9) gives 5 one-class modules M_f^i, each cloned into the default target (classes 0-4).
With D_j the first ``images_per_class`` test images of source class j and logit i of the
source modelled (the cloned functionality), the matrices are::

    source[i][j]    = Sim(M_s|D_i,   M_s|D_j)    the source against itself across classes
    paper[i][j]     = Sim(M_f^i|D_i, M_s|D_j)    the paper's Sim(M_s|D_j, M_f^i|D_i)
    module[i][j]    = Sim(M_f^i|D_j, M_s|D_j)    same images: does M_f^i act as the source on D_j?
    in_clone[i][j]  = Sim(M_c^i|D_j, M_s|D_j)    the same for the cloned network's new logit

M_f^i is the transferable module in the source's frame: the source's layers up to R',
the pruned module, and the source classifier's row i on the kept features.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pnc.bench.baselines import Budget, budget_fields, search_key
from pnc.bench.metrics import evaluate_clone, local_model_set
from pnc.bench.paper import RowCache, machine_info
from pnc.bench.results_files import write_json_md
from pnc.surgery.branch import Branch
from pnc.surgery.cloning import clone
from pnc.surgery.cuts import classifier_of, cut_points
from pnc.surgery.devices import DeviceLike, device_of
from pnc.surgery.local_models import occlusion_masks
from pnc.surgery.splitting import extract
from pnc.surgery.tracing import trace
from pnc.zoo.datasets import DatasetSplits
from pnc.zoo.store import ZooStore
from pnc.zoo.tasks import CloneTask, select_classes

__all__ = [
    "LocalizedModule",
    "figure3",
    "figure4",
    "plot_figure3",
    "plot_figure4",
    "write_figures",
    "run_figures",
    "save_figure",
]

RATIOS = (0.125, 0.25, 0.5, 0.75, 1.0)


class LocalizedModule(nn.Module):
    """M_f = M . W_s^[R':L] in the source's frame: x (B, C, H, W) -> the source's logits of
    the branch's classes (B, |T_s|), computed through the pruned transferable module."""

    def __init__(self, source: nn.Module, branch: Branch, example: Tensor):
        super().__init__()
        traced = trace(source, example[:2])
        cls = classifier_of(traced)
        self.prefix = extract(traced, None, [branch.source_cut])
        self.body = branch.body
        head = source.get_submodule(cls.module)
        device = head.weight.device
        rows, kept = torch.tensor(branch.source_outputs, device=device), branch.body.features.to(device)
        self.register_buffer("weight", head.weight.detach()[rows][:, kept].clone())
        self.register_buffer(
            "bias",
            head.bias.detach()[rows].clone() if head.bias is not None else torch.zeros(len(rows), device=device),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(self.prefix(x)) @ self.weight.T + self.bias


def _clone_point(
    task: CloneTask,
    target: nn.Module,
    source: nn.Module,
    budget: Budget,
    seed: int,
    workdir: Path,
    tag: str,
    **overrides: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    config = budget.search(seed, **overrides)
    net = clone(
        target,
        source,
        **task.clone_inputs(),
        config=config,
        g_fraction=budget.g_fraction,
        num_masks=budget.num_masks,
        checkpoint_dir=workdir / tag,
        cache_dir=workdir / "G",
        progress=False,
    )
    report = next(iter(net.branches.values())).report
    acc = evaluate_clone(net, task.eval_sets())
    return net, {
        **acc,
        "target_cut": report.target_cut,
        "source_cut": report.source_cut,
        "kept_fraction": report.kept_fraction,
        "module_params": report.params_after,
        "module_macs": report.macs_after,
        "search_seconds": report.seconds,
    }


def figure3(
    store: ZooStore,
    splits: DatasetSplits,
    target_name: str,
    source_name: str,
    *,
    scale: str = "S",
    seed: int = 0,
    ratios: tuple[float, ...] = RATIOS,
    budget: Budget,
    cache: RowCache,
    workdir: Path,
    log: Callable[[str], None] = print,
    device: DeviceLike | None = None,
) -> dict[str, Any]:
    """Ori/Tar/Avg against the mask ratio (full search) and against a fixed R (default ratio),
    cloned on ``device``."""
    target, t_card = store.load(target_name, device)
    source, s_card = store.load(source_name, device)
    task = CloneTask.for_cards(splits, t_card, s_card, scale, seed=seed)
    cuts = cut_points(trace(target, task.clone_set().x[:2]), blocks=True, verify=False)
    points: dict[str, list[dict[str, Any]]] = {"ratio": [], "cut": []}
    jobs = [("ratio", r, {"mask_ratio": r}) for r in ratios] + [("cut", c.node, {"candidates": [c.node]}) for c in cuts]
    for kind, value, overrides in jobs:
        key = f"fig3|{target_name}|{source_name}|{scale}|{seed}|{kind}|{value}"
        fingerprint = json.dumps(
            [
                budget_fields(budget, "PNC"),
                search_key(budget, "PNC", task.old_fraction > 0, **overrides),
                t_card.sha256,
                s_card.sha256,
            ]
        )
        row = cache.get(key, fingerprint)
        if row is None:
            _, row = _clone_point(task, target, source, budget, seed, Path(workdir), f"{kind}-{value}", **overrides)
            row |= {"fingerprint": fingerprint, kind: value}
            cache.put(key, row)
        log(
            f"figure 3 {kind}={value}: ori {row['ori']:.4f} tar {row['tar']:.4f} avg {row['avg']:.4f} "
            f"(R={row['target_cut']}, module {row['module_params']} params)"
        )
        points[kind].append(row)
    block_of = {c.node: i for i, c in enumerate(cuts)}
    for row in points["cut"]:
        row["block"] = block_of[row["cut"]]
    chosen = next((r["target_cut"] for r in points["ratio"] if r["ratio"] == budget.search(seed).mask_ratio), None)
    return {
        "target": target_name,
        "source": source_name,
        "scale": scale,
        "seed": seed,
        "clone_classes": task.clone_classes,
        "searched_cut": chosen,
        **points,
    }


def figure4(
    store: ZooStore,
    splits: DatasetSplits,
    target_name: str,
    source_name: str,
    *,
    seed: int = 0,
    images_per_class: int = 50,
    num_masks: int = 100,
    grid: int = 4,
    budget: Budget,
    cache: RowCache,
    workdir: Path,
    log: Callable[[str], None] = print,
    device: DeviceLike | None = None,
) -> dict[str, Any]:
    """One one-class clone per source class, then the four similarity matrices, on ``device``."""
    target, t_card = store.load(target_name, device)
    source, s_card = store.load(source_name, device)
    classes = s_card.classes
    data = [select_classes(splits.test, [c]).x[:images_per_class] for c in classes]
    masks = occlusion_masks(num_masks, grid, seed, device_of(source))

    def g(model, outputs, images):
        return local_model_set(model, outputs, images, masks)

    sets: dict[str, list[list[Any]]] = {"source": [], "module": [], "in_clone": []}
    accuracy = []
    for i, c in enumerate(classes):
        task = CloneTask(splits, t_card.classes, classes, [c], seed=seed)
        net, row = _clone_point(task, target, source, budget, seed, Path(workdir), f"class-{c}")
        accuracy.append({"class": c, **row})
        log(f"figure 4 one-class module {c}: ori {row['ori']:.4f} tar {row['tar']:.4f} R={row['target_cut']}")
        branch = next(iter(net.branches.values()))
        module = LocalizedModule(source, branch, task.clone_set().x)
        new_logit = [len(t_card.classes)]
        sets["source"].append([g(source, [i], d) for d in data])
        sets["module"].append([g(module, [0], d) for d in data])
        sets["in_clone"].append([g(net, new_logit, d) for d in data])
    n = len(classes)
    src, mod, cln = sets["source"], sets["module"], sets["in_clone"]
    matrices = {
        "source": [[src[i][i].similarity(src[i][j]) for j in range(n)] for i in range(n)],
        "paper": [[mod[i][i].similarity(src[i][j]) for j in range(n)] for i in range(n)],
        "module": [[mod[i][j].similarity(src[i][j]) for j in range(n)] for i in range(n)],
        "in_clone": [[cln[i][j].similarity(src[i][j]) for j in range(n)] for i in range(n)],
    }
    summary = {}
    for name, m in matrices.items():
        diag = [m[i][i] for i in range(n)]
        off = [m[i][j] for i in range(n) for j in range(n) if i != j]
        summary[name] = {
            "diagonal_mean": sum(diag) / n,
            "off_diagonal_mean": sum(off) / len(off),
            "rows_with_diagonal_max": sum(m[i][i] >= max(m[i]) for i in range(n)),
        }
    return {
        "target": target_name,
        "source": source_name,
        "seed": seed,
        "classes": classes,
        "class_names": [splits.classes[c] for c in classes],
        "images_per_class": images_per_class,
        "num_masks": num_masks,
        "grid": grid,
        "matrices": matrices,
        "summary": summary,
        "clones": accuracy,
    }


# --- plots -------------------------------------------------------------------------------------


def plot_figure3(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    parts = (("ori", "Ori. Acc", "o-"), ("tar", "Tar. Acc", "s-"), ("avg", "Avg. Acc", "^-"))
    for key, label, style in parts:
        axes[0].plot([p["ratio"] for p in result["ratio"]], [100 * p[key] for p in result["ratio"]], style, label=label)
        axes[1].plot([p["block"] + 1 for p in result["cut"]], [100 * p[key] for p in result["cut"]], style, label=label)
    axes[0].set_xlabel("mask ratio c/|W| (kept channels per group)")
    axes[1].set_xlabel("R (index of the block cut, input to output)")
    axes[1].set_xticks(
        [p["block"] + 1 for p in result["cut"]], [f"{p['block'] + 1}\n{p['cut']}" for p in result["cut"]], fontsize=7
    )
    searched = next((p for p in result["cut"] if p["cut"] == result["searched_cut"]), None)
    if searched is not None:
        axes[1].axvline(searched["block"] + 1, color="grey", ls=":", label="R found by the search")
    for ax in axes:
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"{result['target']} <- {result['source']}, clone {result['clone_classes']}, seed {result['seed']}", fontsize=9
    )
    fig.tight_layout()
    save_figure(fig, path)


def plot_figure4(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {
        "source": "source: Sim(M_s|D_i, M_s|D_j)",
        "paper": "module (paper): Sim(M_f^i|D_i, M_s|D_j)",
        "module": "module, same images: Sim(M_f^i|D_j, M_s|D_j)",
        "in_clone": "cloned net, same images: Sim(M_c^i|D_j, M_s|D_j)",
    }
    fig, axes = plt.subplots(2, 2, figsize=(10, 9))
    names = result["class_names"]
    for ax, (key, title) in zip(axes.flat, titles.items()):
        m = np.asarray(result["matrices"][key])
        im = ax.imshow(m, cmap="Blues", vmin=min(0.0, float(m.min())), vmax=1.0)
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(
                    j,
                    i,
                    f"{m[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if m[i, j] > 0.6 else "black",
                )
        ax.set_xticks(range(len(names)), [f"D:{n}" for n in names], rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(names)), [f"i:{n}" for n in names], fontsize=7)
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(
        f"locality similarity, {result['source']} (logit i modelled), {result['images_per_class']} test "
        f"images per class, {result['num_masks']} masks",
        fontsize=9,
    )
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig, path: Path) -> None:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    tmp.replace(path)


def write_figures(
    fig3: dict[str, Any] | None, fig4: dict[str, Any] | None, out_dir: Path, stem: str, command: str
) -> None:
    """PNGs, one JSON and one markdown summary under ``out_dir``."""
    out_dir = Path(out_dir)
    lines = [f"# Figures 3 and 4 analogue ({stem})", ""]
    if fig3 is not None:
        plot_figure3(fig3, out_dir / f"{stem}-fig3.png")
        lines += [
            f"![Fig. 3]({stem}-fig3.png)",
            "",
            f"PNC on `{fig3['target']}` <- `{fig3['source']}`, clone classes {fig3['clone_classes']}, seed "
            f"{fig3['seed']}. Left: full search at each mask ratio. Right: R fixed to each block cut (default "
            f"ratio); the search picked `{fig3['searched_cut']}`.",
            "",
            "| sweep | value | R | module params | Ori % | Tar % | Avg % |",
            "|---|---|---|---|---|---|---|",
        ]
        for kind in ("ratio", "cut"):
            for p in fig3[kind]:
                lines.append(
                    f"| {kind} | {p[kind]} | {p['target_cut']} | {p['module_params']:,} | "
                    f"{100 * p['ori']:.1f} | {100 * p['tar']:.1f} | {100 * p['avg']:.1f} |"
                )
        lines.append("")
    if fig4 is not None:
        plot_figure4(fig4, out_dir / f"{stem}-fig4.png")
        lines += [
            f"![Fig. 4]({stem}-fig4.png)",
            "",
            f"One one-class module per source class {fig4['classes']} ({', '.join(fig4['class_names'])}), "
            f"each cloned into `{fig4['target']}`; {fig4['images_per_class']} test images per class, "
            f"{fig4['num_masks']} masks on a {fig4['grid']}x{fig4['grid']} grid, plain least squares "
            "(Zest). Row i = module i (or the source's logit i), column j = images of class j.",
            "",
            "| matrix | diagonal mean | off-diagonal mean | rows whose diagonal is the max |",
            "|---|---|---|---|",
        ]
        for name, s in fig4["summary"].items():
            lines.append(
                f"| {name} | {s['diagonal_mean']:.3f} | {s['off_diagonal_mean']:.3f} | "
                f"{s['rows_with_diagonal_max']}/{len(fig4['classes'])} |"
            )
        lines += ["", "| one-class clone | R | kept | Ori % | Tar % | Avg % |", "|---|---|---|---|---|---|"]
        for c in fig4["clones"]:
            lines.append(
                f"| {c['class']} | {c['target_cut']} | {c['kept_fraction']:.2f} | {100 * c['ori']:.1f} | "
                f"{100 * c['tar']:.1f} | {100 * c['avg']:.1f} |"
            )
        lines.append("")
    lines += [f"Command: `{command}`. Machine: {machine_info()['cpu']}.", ""]
    write_json_md(out_dir / stem, {"figure3": fig3, "figure4": fig4, "command": command}, "\n".join(lines))


def run_figures(
    dataset: str,
    arch: str,
    *,
    figures: list[int],
    seed: int = 0,
    quick: bool = False,
    zoo_dir: str | None = None,
    data_dir: str | None = None,
    out_dir: Path = Path("benchmarks/results"),
    workdir: Path | None = None,
    fresh: bool = False,
    command: str = "",
    log: Callable[[str], None] = print,
    device: DeviceLike | None = None,
) -> Path:
    """Figures 3 and/or 4 for the default zoo pair of ``arch`` on ``dataset``, run on ``device``;
    returns the markdown path."""
    from pnc.bench.paper import QUICK_BUDGET, budget_for
    from pnc.zoo.datasets import load_dataset
    from pnc.zoo.defaults import default_pair, ensure_default
    from pnc.zoo.store import default_zoo_dir

    store = ZooStore(zoo_dir)
    splits = load_dataset(dataset, data_dir)
    target_name, source_name = default_pair(splits.name, arch)
    t_card = ensure_default(store, target_name, dataset=splits, progress=False, device=device)
    ensure_default(store, source_name, dataset=splits, progress=False, device=device)
    budget = QUICK_BUDGET if quick else budget_for(t_card, quick)
    stem = f"figures-{splits.name}-{arch}" + ("-quick" if quick else "")
    cache = RowCache(Path(out_dir) / f"{stem}.rows.json", fresh)
    workdir = (Path(workdir) if workdir is not None else default_zoo_dir(zoo_dir).parent / "bench") / stem
    kwargs = {"budget": budget, "cache": cache, "log": log, "seed": seed, "device": device}
    fig3 = (
        figure3(
            store,
            splits,
            target_name,
            source_name,
            workdir=workdir / "fig3",
            ratios=(0.5, 1.0) if quick else RATIOS,
            **kwargs,
        )
        if 3 in figures
        else None
    )
    fig4 = (
        figure4(
            store,
            splits,
            target_name,
            source_name,
            workdir=workdir / "fig4",
            images_per_class=10 if quick else 50,
            num_masks=budget.num_masks,
            **kwargs,
        )
        if 4 in figures
        else None
    )
    write_figures(fig3, fig4, Path(out_dir), stem, command)
    return Path(out_dir) / f"{stem}.md"
