"""The search over cut points R: every candidate (R, R') trained stage by stage, with
successive halving between stages, checkpoints, a time budget and pluggable backends.

After each stage of :data:`~pnc.surgery.insertion.STAGES` but the last, the candidates
are ranked by their held-out selection loss and only the best ``keep_fraction`` go on
(:func:`survivors`: the same rule for every backend, so every backend keeps the same
ones); the chosen R is the best finalist, or, by ``SearchConfig.choose="earliest"``, the
earliest cut (then the only candidate trained). A stage's work — one candidate's training — is
a :class:`StageJob`; a *backend* runs a list of them (:class:`InProcess`, one after
another here; ``pnc.bench.ray_backend`` on a Ray cluster) and returns their results.

Every finished stage is checkpointed (``checkpoint_dir``), so an interrupted search
resumes where it stopped and ends with the same answer.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load
from torch import Tensor

from pnc.adapters import AdapterError
from pnc.surgery.branch import Branch
from pnc.surgery.devices import release_freed_memory
from pnc.surgery.errors import CutError
from pnc.surgery.insertion import (
    CHOOSE_RULES,
    STAGES,
    CandidateResult,
    CandidateTrainer,
    SearchConfig,
    SearchContext,
    eval_accuracy,
)
from pnc.surgery.io import atomic_write_bytes, tensor_bytes
from pnc.surgery.reporting import reporting_only
from pnc.surgery.splitting import extract


@dataclass
class StageJob:
    """One candidate's next stage: candidate ``index`` (into the context's pairs), the
    ``stage`` to run, and its state after the previous stage (None before the first)."""

    index: int
    stage: str
    previous: tuple[dict[str, Tensor], CandidateResult] | None = None


@dataclass
class StageOutcome:
    """A job's result and the candidate's state after it (to continue from)."""

    index: int
    result: CandidateResult
    state: dict[str, Tensor] = field(repr=False)


def run_job(
    ctx: SearchContext, config: SearchConfig, job: StageJob, tick: Callable[[int], None] = lambda n: None
) -> StageOutcome:
    """Run one :class:`StageJob` in this process. ``tick(total)`` is called once with the
    stage's step count, then ``tick(0)`` per step (for progress bars)."""
    r, r_src = ctx.candidates(config.candidates)[job.index]
    torch.manual_seed(config.seed + job.index)
    trainer = CandidateTrainer(ctx, r, r_src, config)
    if job.previous is not None:
        trainer.restore(*job.previous)
    tick(trainer.stage_steps(job.stage))
    result = trainer.run_stage(job.stage, lambda: tick(0))
    outcome = StageOutcome(job.index, result, trainer.state())
    copies = copied_bytes(trainer)
    del trainer
    release_if_large(copies)
    return outcome


#: a finished trainer whose masked copies of the source's layers hold more bytes than this is
#: collected at once (:func:`~pnc.surgery.devices.release_freed_memory`); a full collection
#: costs about 0.2 s, more than small copies (LeNet-5, ResNetC-20: 0.25-1.1 MiB) are worth
RELEASE_BYTES = 16 * 2**20


def copied_bytes(trainer: CandidateTrainer) -> int:
    """Bytes of a trainer's masked copies of the source's layers."""
    return sum(p.numel() * p.element_size() for p in trainer.masked.parameters())


def release_if_large(copies: int) -> None:
    """After the caller dropped a finished trainer holding ``copies`` bytes of copies: collect
    it at once when they exceed :data:`RELEASE_BYTES`."""
    if copies > RELEASE_BYTES:
        release_freed_memory()


class Backend(Protocol):
    """Runs a list of stage jobs, calls ``done`` with each outcome as soon as it exists (the
    search checkpoints it there), and returns the outcomes in the jobs' order."""

    def run(
        self,
        ctx: SearchContext,
        config: SearchConfig,
        jobs: list[StageJob],
        progress: SearchProgress,
        done: Callable[[StageOutcome], None],
    ) -> list[StageOutcome]: ...


class InProcess:
    """The default backend: the jobs one after another in this process."""

    def run(
        self,
        ctx: SearchContext,
        config: SearchConfig,
        jobs: list[StageJob],
        progress: SearchProgress,
        done: Callable[[StageOutcome], None],
    ) -> list[StageOutcome]:
        outcomes = []
        for job in jobs:
            outcomes.append(run_job(ctx, config, job, progress.ticker(ctx, config, job)))
            done(outcomes[-1])
        return outcomes


class SearchProgress:
    """Per-candidate progress bars with ETA (rich, on stderr), and one line per dropped or
    skipped candidate saying why."""

    def __init__(self, enabled: bool):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        self.enabled = enabled
        self.bar = Progress(*columns, console=Console(stderr=True), disable=not enabled)

    def __enter__(self) -> SearchProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(None, None, None)

    def ticker(self, ctx: SearchContext, config: SearchConfig, job: StageJob) -> Callable[[int], None]:
        """The bar of one candidate's stage (see :meth:`counter`)."""
        r, r_src = ctx.candidates(config.candidates)[job.index]
        return self.counter(f"R={r.node} <- R'={r_src.node} [{job.stage}]")

    def counter(self, description: str) -> Callable[[int], None]:
        """A ``tick`` callback drawing one bar: ``tick(total)`` once, then ``tick(0)`` per step.
        ``description`` is plain text (``[search]`` is not read as rich markup)."""
        from rich.markup import escape

        task: list = []

        def tick(total: int) -> None:
            if not task:
                task.append(self.bar.add_task(escape(description), total=total))
            else:
                self.bar.advance(task[0])

        return tick

    def say(self, line: str) -> None:
        if self.enabled:
            self.bar.console.print(line)


def rank_key(result: CandidateResult, index: int) -> tuple[float, float, int]:
    """How candidates rank (lower is better): held-out selection loss, then held-out
    cross-entropy, then ``index`` (a later cut first)."""
    return result.loss, result.holdout.get("ce", 0.0), index


def survivors(results: dict[int, CandidateResult], keep_fraction: float) -> tuple[list[int], dict[int, str]]:
    """Successive halving: the best ``ceil(keep_fraction * n)`` candidates by (selection
    loss, held-out cross-entropy, index) go on, and so does every candidate within one
    standard error (``holdout["se"]``) of the best: only a *clearly* worse one is dropped.
    The others get the reason they were dropped."""
    ranked = sorted(results, key=lambda i: rank_key(results[i], i))
    best = results[ranked[0]]
    keep = max(1, math.ceil(keep_fraction * len(ranked)))
    margin = best.holdout.get("se", 0.0)
    kept = [i for n, i in enumerate(ranked) if n < keep or results[i].loss <= best.loss + margin]
    reasons = {
        i: (
            f"after stage {results[i].stage!r}: selection loss {results[i].loss:.4f} vs "
            f"{best.loss:.4f} (+- {margin:.4f}) of R={best.target_cut}; the best {keep} of {len(ranked)} "
            "and those within one standard error of the best go on"
        )
        for i in ranked
        if i not in kept
    }
    return sorted(kept), reasons


def choose_by_loss(results: dict[int, CandidateResult], smaller_branch_within_se: bool) -> tuple[int, str]:
    """The chosen finalist among ``results`` (index -> result; a lower index is a later cut,
    a smaller branch) and why.

    The best is the lowest (selection loss, held-out cross-entropy, index). With
    ``smaller_branch_within_se`` (the one-standard-error rule), a later cut is preferred
    when its held-out losses exceed the best's by at most one standard error of the mean
    per-image difference (paired: the same held-out images)::

        best: losses [0, 1, 0, 0] (0.25), later cut: [0, 1, 1, 0] (0.50)
        difference [0, 0, 1, 0]: mean 0.25, paired standard error 0.25 -> the later cut
    """
    best = min(results, key=lambda i: rank_key(results[i], i))
    why = f"lowest held-out selection loss ({results[best].loss:.4f})"
    base = results[best].holdout_losses
    if not smaller_branch_within_se or base is None or len(base) < 2:
        return best, why
    for i in sorted(j for j in results if j < best):
        losses = results[i].holdout_losses
        if losses is None or losses.shape != base.shape:
            continue
        diff = (losses - base).double()
        se = float(diff.std() / math.sqrt(len(diff)))
        if float(diff.mean()) <= se:
            return i, (
                f"selection loss {results[i].loss:.4f} within one paired standard error ({se:.4f}) of "
                f"R={results[best].target_cut}'s {results[best].loss:.4f}: the later cut, a smaller branch"
            )
    return best, why


def _checkpoint(checkpoint_dir: Path | None, index: int, stage: str, node: str) -> Path | None:
    if checkpoint_dir is None:
        return None
    return Path(checkpoint_dir) / f"candidate-{index}-{node}-{stage}.safetensors"


def outcome_bytes(outcome: StageOutcome, key: str = "") -> bytes:
    """An outcome as safetensors bytes: its state and result tensors, with the result's
    summary and ``key`` (the run it belongs to) as metadata. Checkpoints hold these bytes,
    and a backend running stages in other processes ships outcomes back as them."""
    tensors = {f"state.{k}": v for k, v in outcome.state.items()}
    tensors |= {f"result.{k}": v for k, v in outcome.result.tensors.items()}
    if outcome.result.holdout_losses is not None:
        tensors["holdout_losses"] = outcome.result.holdout_losses
    return tensor_bytes(tensors, metadata={"key": key, "result": json.dumps(outcome.result.summary())})


def outcome_from_bytes(data: bytes, index: int) -> tuple[StageOutcome, str]:
    """(the outcome of candidate ``index``, its key) from :func:`outcome_bytes`'s ``data``;
    SafetensorError, ValueError, KeyError or TypeError when ``data`` is not such bytes."""
    tensors = load(data)
    meta = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    result = CandidateResult(
        **json.loads(meta["result"]),
        tensors={k[7:]: v for k, v in tensors.items() if k.startswith("result.")},
        holdout_losses=tensors.get("holdout_losses"),
    )
    return StageOutcome(index, result, {k[6:]: v for k, v in tensors.items() if k.startswith("state.")}), meta["key"]


def _load(path: Path | None, key: str, index: int) -> StageOutcome | None:
    if path is None or not path.exists():
        return None
    try:
        outcome, stored = outcome_from_bytes(path.read_bytes(), index)
    except (OSError, SafetensorError, ValueError, KeyError, TypeError):
        return None  # a corrupt or foreign checkpoint: recompute that stage
    return outcome if stored == key else None


@dataclass
class SearchOutcome:
    """The chosen candidate, every candidate's last result (finalists and dropped ones), the
    pairs skipped (no adapter maps them), whether the time budget stopped the search early,
    why the chosen one was chosen, and the finalists' states (to report on)."""

    best: CandidateResult
    results: list[CandidateResult]
    skipped: list[str]
    budget_stopped: bool = False
    chosen_because: str = ""
    states: dict[int, dict[str, Tensor]] = field(default_factory=dict, repr=False)

    def contenders(self, runners_up: int) -> list[CandidateResult]:
        """The chosen candidate, then up to ``runners_up`` other finalists (not dropped, at
        its stage), best first by :func:`rank_key`."""
        pair = (self.best.target_cut, self.best.source_cut)
        others = [
            (rank_key(r, i), r)
            for i, r in enumerate(self.results)
            if (r.target_cut, r.source_cut) != pair and not r.eliminated and r.stage == self.best.stage
        ]
        return [self.best] + [r for _, r in sorted(others, key=lambda kr: kr[0])[:runners_up]]


def search(
    ctx: SearchContext,
    config: SearchConfig,
    *,
    run_key: str = "",
    checkpoint_dir: Path | None = None,
    progress: bool = True,
    backend: Backend | None = None,
    time_budget: float | None = None,
    report_all: bool = False,
) -> SearchOutcome:
    """Train every candidate (R, R') stage by stage with successive halving; the finalist
    :func:`choose_by_loss` picks is chosen. With ``config.choose == "earliest"`` (resolved:
    :meth:`SearchConfig.resolved`) only the earliest cut an adapter maps is trained and
    chosen; ``report_all``: the others are trained after it too, none dropped, for the report
    only (the chosen one trains exactly as alone: first, with the first claim on the cache).

    A candidate pair whose layouts no adapter maps (e.g. a flat NC target cut against a
    ViT's token cut) is skipped with its reason, never aborting the search; CutError if
    every pair is skipped. ``time_budget`` (seconds): no new stage starts once it is spent;
    the best candidate of the furthest stage reached is chosen and ``budget_stopped`` set.
    """
    if config.choose not in CHOOSE_RULES:
        raise ValueError(f"search needs a resolved config (SearchConfig.resolved), got choose={config.choose!r}")
    backend = backend or InProcess()
    start = time.perf_counter()
    pairs = ctx.candidates(config.candidates)
    key = hashlib.sha256((run_key + config.key()).encode()).hexdigest()
    latest: dict[int, StageOutcome] = {}
    skipped: list[str] = ctx.unclonable(config.candidates)
    dropped: dict[int, str] = {}
    alive = []
    for i, (r, r_src) in enumerate(pairs):  # an adapter that cannot exist: skip before any training
        try:
            CandidateTrainer.adapter_for(r, r_src, ctx.device)
        except AdapterError as err:
            skipped.append(f"R={r.node} <- R'={r_src.node}: {err}")
            continue
        alive.append(i)
    if not alive:
        raise CutError(
            f"no candidate pair of cuts can be bridged by an adapter ({'; '.join(skipped)}); "
            "name target cuts whose layout an adapter maps with SearchConfig(candidates=[...])"
        )
    earliest = config.choose == "earliest"
    if earliest:
        first = min(alive, key=lambda i: (pairs[i][0].depth, -i))
        alive = [first] + ([i for i in alive if i != first] if report_all else [])
    budget_stopped = False
    with SearchProgress(progress) as bar:
        for line in skipped:
            bar.say(f"skipped {line}")
        for s, stage in enumerate(STAGES):
            if time_budget is not None and time.perf_counter() - start > time_budget and latest:
                budget_stopped = True
                bar.say(f"time budget of {time_budget:.0f} s spent: stopping before stage {stage!r}")
                break
            jobs, done = [], []
            for i in alive:
                loaded = _load(_checkpoint(checkpoint_dir, i, stage, pairs[i][0].node), key, i)
                if loaded is not None:
                    done.append(loaded)
                else:
                    previous = (latest[i].state, latest[i].result) if i in latest else None
                    jobs.append(StageJob(i, stage, previous))

            def checkpoint(outcome: StageOutcome, stage: str = stage) -> None:
                path = _checkpoint(checkpoint_dir, outcome.index, stage, pairs[outcome.index][0].node)
                if path is not None:
                    atomic_write_bytes(path, outcome_bytes(outcome, key))

            reported = [j for j in jobs if earliest and j.index != alive[0]]  # trained for the report only
            chosen = [j for j in jobs if not earliest or j.index == alive[0]]
            fresh = backend.run(ctx, config, chosen, bar, checkpoint)
            if reported:
                with reporting_only():
                    fresh += backend.run(ctx, config, reported, bar, checkpoint)
            for outcome in done + fresh:
                latest[outcome.index] = outcome
            if s == len(STAGES) - 2:
                before_last = dict(latest)  # where a smaller kept share restarts the last stage
            if s < len(STAGES) - 1 and not earliest:
                alive, reasons = survivors({i: latest[i].result for i in alive}, config.keep_fraction)
                for i, why in reasons.items():
                    dropped[i] = why
                    bar.say(f"dropped R={pairs[i][0].node}: {why}")
    reached = max(STAGES.index(o.result.stage) for o in latest.values())
    finalists = {i: o for i, o in latest.items() if STAGES.index(o.result.stage) == reached and i not in dropped}
    if earliest:
        best_i = alive[0]
        chosen_because = "the earliest cut an adapter maps, the largest branch (SearchConfig.choose='earliest')"
        if len(finalists) > 1:
            chosen_because += f"; the {len(finalists) - 1} other candidates trained for the report only"
    else:
        best_i, chosen_because = choose_by_loss(
            {i: o.result for i, o in finalists.items()}, config.smaller_branch_within_se
        )
    if config.smaller_mask_ratios and config.use_masks and reached == len(STAGES) - 1:
        finalists[best_i], why = smaller_kept_share(
            ctx, config, backend, progress, before_last[best_i], finalists[best_i]
        )
        latest[best_i] = finalists[best_i]
        chosen_because += why
    results = {i: replace(latest[i].result, eliminated=dropped.get(i, "")) for i in sorted(latest)}
    return SearchOutcome(
        best=results[best_i],
        results=list(results.values()),
        skipped=skipped,
        budget_stopped=budget_stopped,
        chosen_because=chosen_because,
        states={i: o.state for i, o in finalists.items()},
    )


def smaller_kept_share(
    ctx: SearchContext,
    config: SearchConfig,
    backend: Backend,
    progress: bool,
    before_last: StageOutcome,
    chosen: StageOutcome,
) -> tuple[StageOutcome, str]:
    """Re-run the chosen candidate's last stage from ``before_last`` (its state after the
    stage before) at each of ``config.smaller_mask_ratios`` below ``mask_ratio``, smallest
    first; the first whose held-out selection loss is at most ``chosen``'s replaces it.
    Returns the outcome kept and what was tried (appended to ``chosen_because``)."""
    job = StageJob(chosen.index, STAGES[-1], (before_last.state, before_last.result))
    best = chosen.result.loss
    tried: list[str] = []
    for ratio in sorted(r for r in set(config.smaller_mask_ratios) if r < config.mask_ratio):
        with SearchProgress(progress) as bar:
            [outcome] = backend.run(ctx, replace(config, mask_ratio=ratio), [job], bar, lambda o: None)
        loss = outcome.result.loss
        if loss <= best:
            return outcome, (
                f"; kept share {ratio:g} instead of {config.mask_ratio:g} (held-out selection loss "
                f"{loss:.4f} <= {best:.4f}{''.join(f'; {t} lost' for t in tried)})"
            )
        tried.append(f"{ratio:g}: {loss:.4f}")
    if not tried:
        return chosen, ""
    return chosen, f"; smaller kept shares lost on held-out images ({', '.join(tried)} > {best:.4f})"


def finalist_accuracy(
    ctx: SearchContext, config: SearchConfig, outcome: SearchOutcome, tick: Callable[[int], None] = lambda n: None
) -> None:
    """Fill ``accuracy`` (Ori / Tar / Avg on the eval sets) of every finalist, after the
    search: reported (e.g. for the selection regret), never used to select. ``tick(total)``
    once with the number of finalists, then ``tick(0)`` after each."""
    if not ctx.eval_sets:
        return
    pairs = ctx.candidates(config.candidates)
    by_pair = {(r.node, r_src.node): i for i, (r, r_src) in enumerate(pairs)}
    finalists = [(r, by_pair[(r.target_cut, r.source_cut)]) for r in outcome.results]
    finalists = [(result, i) for result, i in finalists if i in outcome.states]
    tick(len(finalists))
    for result, i in finalists:
        trainer = CandidateTrainer(ctx, *pairs[i], config)
        trainer.restore(outcome.states[i], result)
        result.accuracy = trainer.accuracy()
        copies = copied_bytes(trainer)
        del trainer
        release_if_large(copies)
        tick(0)


def branch_accuracy(ctx: SearchContext, branch: Branch) -> dict[str, float]:
    """Accuracy on each eval set of the target with a built ``branch`` (reported, never used
    to select)."""
    prefix = extract(ctx.target, None, [branch.target_cut])

    def logits_of(x: Tensor) -> Tensor:
        return branch.joint_logits(prefix(x), *ctx.target_head(x))

    return eval_accuracy(ctx.eval_sets, logits_of)
