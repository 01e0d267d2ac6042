"""``clone(target, source, task) -> ClonedNetwork``: partial network cloning, Eq. 1.

    M_c <- Clone(M_t, M, M_s, R):  fit G on the source (Eq. 4), then search R with
    localization and insertion trained jointly (Eq. 5-8), then prune the source's layers
    after R' to the learned masks and graft them, through the adapter, into the target.
    With old-class images, the grafted branch (A, the pruned copy M_f, F_c) is then
    fine-tuned with L_ins and kept so if its held-out error falls.

The available images (``task.available_set()``: the clone set and, in the paper's setting,
an ``old_fraction`` of the target classes' images) are split per class into a training
part and a held-out part (``config.holdout``) on which R is selected.

Neither network is modified: their state_dict hashes are checked before and after.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pnc.surgery.cloned import ClonedNetwork
from pnc.surgery.errors import DataError, TaskError
from pnc.surgery.insertion import SearchConfig, SearchContext, build_branch, search, split_holdout, tune_branch
from pnc.surgery.local_models import fit_local_models
from pnc.surgery.tracing import trace
from pnc.zoo.store import state_dict_sha256
from pnc.zoo.tasks import CloneTask


@dataclass
class CloneReport:
    """What a clone run did: per-R losses/accuracies, the chosen R, sizes, time, the images
    used (``images``: old / clone training images and held-out images) and the chosen
    branch's fine-tuning (``tuning``: held-out metrics before / after, kept or not)."""

    target_cut: str
    source_cut: str
    candidates: list[dict]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    kept_fraction: float
    seconds: float
    settings: dict = field(default_factory=dict)
    images: dict = field(default_factory=dict)
    tuning: dict = field(default_factory=dict)


def _check_outputs(model: nn.Module, x: torch.Tensor, expected: int, role: str) -> None:
    with torch.no_grad():
        n = model(x[:1]).shape[1]
    if n != expected:
        raise TaskError(f"the {role} has {n} outputs but the task gives it {expected} classes; "
                        f"check --classes against the {role}'s zoo card")


def clone(
    target: nn.Module,
    source: nn.Module,
    task: CloneTask,
    *,
    config: SearchConfig | None = None,
    into: ClonedNetwork | None = None,
    name: str | None = None,
    source_name: str = "",
    g_fraction: float = 0.3,
    num_masks: int = 100,
    grid: int | None = None,
    checkpoint_dir: Path | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> ClonedNetwork:
    """Clone ``task.clone_classes`` from ``source`` into ``target``.

    Args:
        target / source: frozen networks with ``len(task.target_classes)`` and
            ``len(task.source_classes)`` outputs.
        task: classes, clone set (a fraction of T_s's training images), old-class images
            (``task.old_fraction`` of T_t's) and seed.
        config: search settings (:class:`SearchConfig`); its seed defaults to the task's.
        into: an existing ClonedNetwork on the same target to add the branch to
            (multi-source cloning); a new one otherwise.
        name: the branch name (default ``source_name`` or ``"branch<k>"``).
        g_fraction / num_masks / grid: the local model set G (Eq. 4): the share of clone
            images it is fitted on, |B|, and the patch grid (4 for <= 32 px, else 8).
        checkpoint_dir: per-candidate checkpoints; an interrupted clone resumes there.
        cache_dir: cache for G.
    Returns the cloned network; the branch's :class:`CloneReport` is ``branch.report``.
    """
    start = time.perf_counter()
    config = config or SearchConfig(seed=task.seed)
    hashes = state_dict_sha256(target), state_dict_sha256(source)
    available = task.available_set()
    num_old = len(task.target_classes)
    train_idx, held_idx = split_holdout(available.y, config.holdout, config.seed)
    train_x, train_y = available.x[train_idx], available.y[train_idx]
    x = train_x[train_y >= num_old]
    if len(x) == 0:
        raise DataError("the clone set is empty: the clone classes have no training images")
    target.eval()  # frozen: never let a forward pass move their BatchNorm statistics
    source.eval()
    _check_outputs(target, x, len(task.target_classes), "target")
    _check_outputs(source, x, len(task.source_classes), "source")
    grid = grid or (4 if x.shape[-1] <= 32 else 8)
    g = fit_local_models(source, x, task.source_label_index(), num_images=max(1, round(g_fraction * len(x))),
                         num_masks=num_masks, grid=grid, seed=config.seed, cache_dir=cache_dir)
    t_traced = into.traced if into is not None else trace(target, x[:2])
    evals = {k: (v.x, v.y) for k, v in task.eval_sets().items()}
    ctx = SearchContext(t_traced, trace(source, x[:2]), train_x, train_y, task.source_label_index(), g, evals,
                        num_old, holdout=(available.x[held_idx], available.y[held_idx]))
    run_key = f"{hashes}{task.to_json()}{g_fraction}{num_masks}{grid}"
    best, results = search(ctx, config, run_key=run_key, checkpoint_dir=checkpoint_dir, progress=progress)
    names = task.dataset.classes
    branch = build_branch(ctx, best, classes=[names[c] for c in task.clone_classes], source_name=source_name,
                          source_sha256=hashes[1])
    tuning = {}
    if ctx.arbitrate and ctx.holdout is not None and config.tune_epochs:
        tuning = tune_branch(ctx, branch, config)
    net = into or ClonedNetwork(target, x[:2], [names[c] for c in task.target_classes], traced=t_traced)
    name = name or source_name or f"branch{len(net.branches)}"
    net.add_branch(name, branch)
    if (state_dict_sha256(target), state_dict_sha256(source)) != hashes:
        raise RuntimeError("pnc bug: cloning changed the target's or the source's weights")
    rep = branch.body.report
    branch.report = CloneReport(
        target_cut=best.target_cut, source_cut=best.source_cut, candidates=[r.summary() for r in results],
        params_before=rep.params_before, params_after=rep.params_after, macs_before=rep.macs_before,
        macs_after=rep.macs_after, kept_fraction=best.kept_fraction, seconds=time.perf_counter() - start,
        settings={"search": vars(config) | {}, "g_fraction": g_fraction, "num_masks": num_masks, "grid": grid},
        images={"old_train": int((train_y < num_old).sum()), "clone_train": len(x),
                "old_holdout": int((available.y[held_idx] < num_old).sum()),
                "clone_holdout": int((available.y[held_idx] >= num_old).sum())},
        tuning=tuning,
    )
    return net
