"""``clone(target, source, images, source_outputs) -> ClonedNetwork``: partial network cloning, Eq. 1.

    M_c <- Clone(M_t, M, M_s, R):  fit G on the source (Eq. 4), then search R with
    localization and insertion trained jointly (Eq. 5-8), then prune the source's layers
    after R' to the learned masks and graft them, through the adapter, into the target.
    With old-class images, the grafted branch (A, the pruned copy M_f, F_c) is then
    fine-tuned with L_ins and kept so if its held-out error falls.

The available images (the clone classes' and, in the paper's setting, some of the target
classes') are split per class into a training part and a held-out part
(``config.holdout``) on which R is selected.

Neither network is modified: their state_dict hashes are checked before and after.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pnc.surgery.branch import Branch, CloneReport
from pnc.surgery.cloned import ClonedNetwork
from pnc.surgery.cut_search import (
    Backend,
    SearchOutcome,
    SearchProgress,
    branch_accuracy,
    finalist_accuracy,
    search,
)
from pnc.surgery.devices import device_of, release_freed_memory
from pnc.surgery.errors import DataError, TaskError, require_finite_images, require_finite_weights
from pnc.surgery.insertion import SearchConfig, SearchContext, build_branch, split_holdout
from pnc.surgery.io import state_dict_sha256
from pnc.surgery.local_models import fit_local_models
from pnc.surgery.reporting import reporting_only
from pnc.surgery.tracing import trace
from pnc.surgery.tuning import tune_branch


def _num_outputs(model: nn.Module, x: Tensor) -> int:
    with torch.no_grad():
        return int(model(x[:1].to(device_of(model))).shape[1])


def _require_labelled(images: Tensor, labels: Tensor, what: str) -> None:
    """DataError unless ``images`` (N, C, H, W) are finite, N > 0, with one of ``labels`` (N,) each."""
    if len(images) == 0 or len(images) != len(labels):
        raise DataError(f"{what} needs images and one label each, got {len(images)} images and {len(labels)} labels")
    require_finite_images(images, what)


def _checked_holdout(
    holdout: tuple[Tensor, Tensor], images: Tensor, labels: Tensor, num_outputs: int
) -> tuple[Tensor, Tensor]:
    """The caller's held-out (images (M, C, H, W), labels (M,)), checked against the training
    ``images`` (N, C, H, W) and ``labels`` (N,): one label per image, the same image shape,
    finite, every label an output, every trained class held out."""
    x, y = holdout
    _require_labelled(x, y, "clone: holdout")
    if x.shape[1:] != images.shape[1:]:
        raise DataError(f"holdout images are {tuple(x.shape[1:])}, the training images {tuple(images.shape[1:])}")
    if int(y.min()) < 0 or int(y.max()) >= num_outputs:
        raise TaskError(f"holdout labels must lie in 0..{num_outputs - 1}, as the training labels")
    missing = sorted(set(labels.unique().tolist()) - set(y.unique().tolist()))
    if missing:
        raise DataError(f"holdout has no image of class(es) {missing}; give a few of every class it trains on")
    return x, y


def _tuned_finalist_accuracy(
    ctx: SearchContext,
    config: SearchConfig,
    outcome: SearchOutcome,
    built_by_cut: dict[str, Branch],
    names: list[str],
    bar: SearchProgress,
) -> None:
    """Fill ``tuned_accuracy`` of every finalist at the chosen one's stage: its branch built
    and tuned as the chosen one's was (``built_by_cut``: the contenders already tuned)."""
    for result in outcome.contenders(len(outcome.results)):
        built = built_by_cut.get(result.target_cut)
        if built is None:
            built = build_branch(ctx, result, classes=names)
            tune_branch(ctx, built, config, bar.counter(f"tuning R={result.target_cut} to report it"))
        result.tuned_accuracy = branch_accuracy(ctx, built)
        if result.target_cut not in built_by_cut:
            del built
            release_freed_memory()


def clone(
    target: nn.Module,
    source: nn.Module,
    images: Tensor,
    labels: Tensor,
    source_outputs: Sequence[int],
    *,
    class_names: Sequence[str] | None = None,
    target_classes: Sequence[str] | None = None,
    eval_sets: Mapping[str, tuple[Tensor, Tensor]] | None = None,
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
    backend: Backend | None = None,
    time_budget: float | None = None,
    holdout: tuple[Tensor, Tensor] | None = None,
    report_tuned: bool = False,
) -> ClonedNetwork:
    """Clone the classes behind ``source_outputs`` from ``source`` into ``target``.

    Args:
        target / source: frozen networks, (B, C, H, W) -> logits; never modified.
        images: (N, C, H, W) the training images available while cloning.
        labels: (N,) their classes as outputs of the cloned network: ``0 .. |T_t|-1`` for
            images of the target's classes (none at all is the strict setting),
            ``|T_t| + i`` for the i-th class to clone.
        source_outputs: the source's logit index of each class to clone, in output order.
        class_names: names of the cloned classes (default: the source output indices).
        target_classes: names of the target's outputs (default ``"0"``, ``"1"``, ...).
        eval_sets: name -> (images (M, C, H, W), labels (M,) over the cloned network's
            outputs); every candidate's accuracy on them is reported, never used to select.
        config: search settings (:class:`SearchConfig`).
        into: an existing ClonedNetwork on the same target to add the branch to
            (multi-source cloning); a new one otherwise.
        name: the branch name (default ``source_name`` or ``"branch<k>"``).
        g_fraction / num_masks / grid: the local model set G (Eq. 4): the share of clone
            images it is fitted on (at most the ``config.loc_pool / num_masks`` images whose
            (image, mask) pairs L_loc can draw), |B|, and the patch grid (4 for <= 32 px, else 8).
        checkpoint_dir: per-candidate checkpoints; an interrupted clone resumes there.
        cache_dir: cache for G.
        backend: runs the candidates' stages (default: in this process, one after another;
            ``pnc.bench.ray_backend.RayBackend`` on a Ray cluster).
        time_budget: seconds; the search starts no new stage once spent and keeps the best
            candidate so far (``report.budget_stopped``).
        holdout: (images (M, C, H, W), labels (M,), as ``labels``) to choose R and keep the
            tuning on, e.g. images neither network was trained on; then every one of
            ``images`` trains. Default: ``config.holdout`` of ``images`` per class.
        report_tuned: with ``eval_sets`` and the tuning, also build and tune every finalist
            the way the chosen one is and report its accuracy on them
            (``CandidateResult.tuned_accuracy``): the selection regret of the clones as
            they would ship. One tuning per finalist, timed under ``report_accuracy``
            and marked :func:`~pnc.surgery.reporting.reporting_only`; never used to choose.
    Returns the cloned network (B, C, H, W) -> (B, |T_t| + |T_s|); the branch's
    :class:`~pnc.surgery.branch.CloneReport` is ``net.branches[name].report``.
    A :class:`~pnc.zoo.CloneTask` gives every data argument: ``clone(t, s, **task.clone_inputs())``.

    >>> from pnc.surgery.examples import tiny_pair
    >>> target, source, images, labels = tiny_pair()  # 3 and 2 classes; (16, 1, 8, 8), all labelled 3
    >>> config = SearchConfig(loc_epochs=1, joint_epochs=1, binary_epochs=1, min_steps_per_epoch=2)
    >>> net = clone(target, source, images, labels, [1], class_names=["new"], config=config, num_masks=8,
    ...             progress=False)
    >>> net(images).shape, net.classes              # the target's 3 classes, then the clone's
    (torch.Size([16, 4]), ['0', '1', '2', 'new'])
    >>> with net.disabled():                        # the target alone, bit for bit
    ...     torch.equal(net(images), target(images))
    True
    """
    start = time.perf_counter()
    config = config or SearchConfig()
    source_outputs = [int(i) for i in source_outputs]
    _require_labelled(images, labels, "clone")
    require_finite_weights(target, "the target")
    require_finite_weights(source, "the source")
    for set_name, (set_x, _) in (eval_sets or {}).items():
        require_finite_images(set_x, f"clone: eval set {set_name!r}")
    hashes = state_dict_sha256(target), state_dict_sha256(source)
    target.eval()  # frozen: never let a forward pass move their BatchNorm statistics
    source.eval()
    n_source, n_target = _num_outputs(source, images), _num_outputs(target, images)
    if int(labels.min()) < 0 or int(labels.max()) >= n_target + len(source_outputs):
        raise TaskError(
            f"labels must lie in 0..{n_target + len(source_outputs) - 1} (the cloned network's outputs: "
            f"{n_target} of the target, then {len(source_outputs)} cloned classes)"
        )
    if not source_outputs or min(source_outputs) < 0 or max(source_outputs) >= n_source:
        raise TaskError(f"source_outputs {source_outputs} must be indices into the source's {n_source} outputs")
    if len(set(source_outputs)) != len(source_outputs):
        raise TaskError(f"source_outputs {source_outputs} names a class more than once")
    target_classes = list(target_classes) if target_classes is not None else [str(i) for i in range(n_target)]
    if len(target_classes) != n_target:
        raise TaskError(
            f"the target has {n_target} outputs but {len(target_classes)} target class names were "
            "given; check the classes against the target's zoo card"
        )
    names = list(class_names) if class_names is not None else [str(i) for i in source_outputs]
    if holdout is None:
        train_idx, held_idx = split_holdout(labels, config.holdout, config.seed)
        train_x, train_y, held = images[train_idx], labels[train_idx], (images[held_idx], labels[held_idx])
    else:
        held = _checked_holdout(holdout, images, labels, n_target + len(source_outputs))
        train_x, train_y = images, labels
    x = train_x[train_y >= n_target]
    if len(x) == 0:
        raise DataError("the clone set is empty: no training image of a class to clone")
    if config.use_masks is None:  # masks only with old-class images (SearchConfig.use_masks)
        config = replace(config, use_masks=bool((train_y < n_target).any()))
    grid = grid or (4 if x.shape[-1] <= 32 else 8)
    profile = {"checks": time.perf_counter() - start}
    mark = time.perf_counter()
    g = fit_local_models(
        source,
        x,
        source_outputs,
        num_images=max(1, min(round(g_fraction * len(x)), math.ceil(config.loc_pool / num_masks))),
        num_masks=num_masks,
        grid=grid,
        seed=config.seed,
        cache_dir=cache_dir,
    )
    profile["local_models"] = time.perf_counter() - mark
    mark = time.perf_counter()
    t_traced = into.traced if into is not None else trace(target, x[:2])
    ctx = SearchContext(
        t_traced,
        trace(source, x[:2]),
        train_x,
        train_y,
        source_outputs,
        g,
        dict(eval_sets or {}),
        n_target,
        holdout=held,
        config=config,
    )
    profile["frozen_outputs"] = time.perf_counter() - mark
    data_hash = hashlib.sha256(images.cpu().contiguous().numpy().data.cast("B"))  # no copy on the CPU
    data_hash.update(labels.cpu().contiguous().numpy().data.cast("B"))
    for part in held if holdout is not None else ():  # the caller's held-out images choose too
        data_hash.update(part.cpu().contiguous().numpy().data.cast("B"))
    data_sha = data_hash.hexdigest()
    run_key = f"{hashes}{data_sha}{source_outputs}{g_fraction}{num_masks}{grid}"
    tune = ctx.arbitrate and ctx.holdout is not None and bool(config.tune_epochs)
    config = config.resolved(tune)
    report_all = report_tuned and bool(ctx.eval_sets)  # with the earliest rule: every other candidate trained too
    mark = time.perf_counter()
    outcome = search(
        ctx,
        config,
        run_key=run_key,
        checkpoint_dir=checkpoint_dir,
        progress=progress,
        backend=backend,
        time_budget=time_budget,
        report_all=report_all,
    )
    profile["search"] = time.perf_counter() - mark
    if config.choose == "earliest" and report_all:  # the others were trained for the report only
        chosen = outcome.best.target_cut
        profile["report_candidates"] = sum(r.seconds for r in outcome.results if r.target_cut != chosen)
        profile["search"] -= profile["report_candidates"]
    chosen_because = outcome.chosen_because
    contenders = outcome.contenders(config.tune_runners_up if tune else 0)
    best = contenders[0]  # the contender kept, its branch and its tuning record
    branch: Branch | None = None
    built_by_cut: dict[str, Branch] = {}  # with report_tuned: every contender, tuned
    tuning: dict[str, Any] = {}
    kept_acc: dict[str, float] = {}  # contender's target cut -> its held-out accuracy after tuning
    profile["build_branch"] = profile["tune_branch"] = 0.0
    with SearchProgress(progress) as bar:
        for result in contenders:  # the search's choice first: a tie keeps it
            mark = time.perf_counter()
            built = build_branch(ctx, result, classes=names, source_name=source_name, source_sha256=hashes[1])
            profile["build_branch"] += time.perf_counter() - mark
            mark = time.perf_counter()
            tuned = (
                tune_branch(ctx, built, config, bar.counter(f"tuning the branch at R={result.target_cut}"))
                if tune
                else {}
            )
            profile["tune_branch"] += time.perf_counter() - mark
            if report_tuned:
                built_by_cut[result.target_cut] = built
            if tuned:
                kept_acc[result.target_cut] = tuned["after" if tuned["kept"] else "before"]["acc"]
            if branch is None or kept_acc[result.target_cut] > kept_acc[best.target_cut]:
                best, branch, tuning = result, built, tuned
        if len(contenders) > 1:
            tuning["contenders"] = kept_acc
            chosen_because += (
                f"; the best {len(contenders)} finalists tuned, held-out accuracy after tuning "
                + ", ".join(f"R={cut} {acc:.4f}" for cut, acc in kept_acc.items())
                + f": R={best.target_cut} kept"
            )
        assert branch is not None  # contenders is never empty
        mark = time.perf_counter()
        with reporting_only():  # the choice is made: what follows is reported, never shipped
            finalist_accuracy(ctx, config, outcome, bar.counter("test accuracy of the finalists"))
            if report_tuned and tune and ctx.eval_sets:
                _tuned_finalist_accuracy(ctx, config, outcome, built_by_cut, names, bar)
            del built_by_cut
    profile["report_accuracy"] = time.perf_counter() - mark
    net = into or ClonedNetwork(target, x[:2], target_classes, traced=t_traced)
    name = name or source_name or f"branch{len(net.branches)}"
    net.add_branch(name, branch)
    if (state_dict_sha256(target), state_dict_sha256(source)) != hashes:
        raise RuntimeError("pnc bug: cloning changed the target's or the source's weights")
    rep = branch.body.report
    branch.report = CloneReport(
        target_cut=best.target_cut,
        source_cut=best.source_cut,
        candidates=[r.summary() for r in outcome.results],
        params_before=rep.params_before,
        params_after=rep.params_after,
        macs_before=rep.macs_before,
        macs_after=rep.macs_after,
        kept_fraction=best.kept_fraction,
        seconds=time.perf_counter() - start,
        settings={"search": vars(config) | {}, "g_fraction": g_fraction, "num_masks": num_masks, "grid": grid},
        images={
            "old_train": int((train_y < n_target).sum()),
            "clone_train": len(x),
            "old_holdout": int((held[1] < n_target).sum()),
            "clone_holdout": int((held[1] >= n_target).sum()),
        },
        tuning=tuning,
        skipped=outcome.skipped,
        budget_stopped=outcome.budget_stopped,
        chosen_because=chosen_because,
        profile=profile,
    )
    return net
