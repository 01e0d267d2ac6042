"""The Ray backend (``pip install 'pnc[ray]'``): the candidate search's stages as Ray Tune
trials and benchmark cells as Ray tasks, on a local Ray or a cluster (``address``).

:class:`RayBackend` implements the backend protocol of :mod:`pnc.surgery.cut_search`
(``clone(..., backend=RayBackend())``, ``pnc clone --backend ray [--address ADDR]``). Each
call runs one stage of the search: one Tune trial per candidate job (``tune.Tuner`` on a
function trainable that calls :func:`~pnc.surgery.cut_search.run_job`, one CPU each); the
search context goes to the object store once per search (``ray.put``, handed to the trials
by ``tune.with_parameters``).

**Elimination.** A stage is a rung of successive halving. ASHA would promote a trial as soon
as it is in the top share of the results that happen to be in, so which candidates go on
would depend on the order trials finish, and could differ from the in-process search.
Here the rung is synchronous: Tune runs a stage's trials to the end (FIFO), and the driver,
:func:`pnc.surgery.cut_search.search`, promotes with :func:`~pnc.surgery.cut_search.survivors`
on the full rung, the same pure function the in-process backend goes through. Both backends
therefore keep the same candidates and pick the same R; a trial runs the same code on the
same state (RNG included, one torch thread), so the patches agree to float tolerance.

**Outcomes** come back as safetensors bytes (:func:`~pnc.surgery.cut_search.outcome_bytes`)
in the trial's one reported result: no Tune checkpoint, so a multi-node cluster needs no
shared storage. Tune's own experiment state goes to a temporary folder removed after each
stage. As each trial reports, the driver calls ``done`` (the search checkpoints it there).

**Failures.** A trial whose worker dies (killed, out of memory, node lost) is retried up to
``max_failures`` times (``tune.FailureConfig``); trials already finished are kept. A trial
still failing after that raises :class:`~pnc.surgery.errors.BackendError` naming the
candidate. A pnc error inside a trial (e.g. a non-finite loss, ``TrainingError``) is not
retried: it would fail the same way; it is raised in the driver as itself.

:func:`run_cells` runs benchmark cells (seed x scale x method) as Ray tasks (``max_retries``);
``pnc bench paper --backend ray`` (:func:`pnc.bench.paper.run_table`) uses it.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import torch

from pnc.surgery import errors
from pnc.surgery.cut_search import SearchProgress, StageJob, StageOutcome, outcome_bytes, outcome_from_bytes, run_job
from pnc.surgery.errors import BackendError, PncError
from pnc.surgery.insertion import SearchConfig, SearchContext

try:
    import ray
    from ray import tune
except ImportError as err:
    raise BackendError(
        f"the Ray backend needs Ray with Tune, which cannot be imported ({err}); install it with "
        "`pip install 'pnc[ray]'`, or use the default in-process backend (--backend inprocess)"
    ) from None


#: CPUs (and torch threads) of one trial or benchmark cell
CPUS_PER_TRIAL = 1


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Start a local Ray (``num_cpus``; default: every core) or join the cluster at
    ``address``, unless this process is connected already; BackendError if unreachable."""
    if ray.is_initialized():
        return
    try:
        ray.init(
            address=address,
            num_cpus=num_cpus if address is None else None,
            include_dashboard=False,
            log_to_driver=False,
            logging_level="WARNING",
        )
    except (ConnectionError, RuntimeError, ValueError) as err:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise BackendError(
            f"cannot start or reach {where} ({err}); start a cluster with `ray start --head` and pass "
            "the address it prints, or omit --address for a local Ray"
        ) from None


def _trial(params: dict, ctx: list, search_config: SearchConfig, jobs: list[StageJob], threads: int) -> None:
    """One Tune trial: run job ``params["job"]`` and report its outcome as safetensors bytes
    (or the pnc error it raised). ``ctx``: [the search context's object ref]."""
    torch.set_num_threads(threads)
    job = jobs[params["job"]]
    try:
        outcome = run_job(ray.get(ctx[0]), search_config, job)
    except PncError as err:  # deterministic: a retry would fail the same way
        tune.report({"error": type(err).__name__, "message": str(err)})
        return
    tune.report({"loss": outcome.result.loss, "outcome": outcome_bytes(outcome)})


class _Collector(tune.Callback):
    """In the driver, as trials report: decode outcomes and hand them to ``done``; count retries."""

    def __init__(
        self,
        backend: RayBackend,
        jobs: list[StageJob],
        names: list[str],
        progress: SearchProgress,
        done: Callable[[StageOutcome], None],
    ):
        self.backend, self.jobs, self.names, self.progress, self.done = backend, jobs, names, progress, done
        self.outcomes: dict[int, StageOutcome] = {}
        self.errors: dict[int, PncError] = {}

    def __getstate__(self) -> dict:
        """Tune pickles its callbacks into the experiment folder for ``Tuner.restore``, which
        pnc never calls (the search resumes from its own checkpoints): nothing to keep."""
        return {}

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        i = trial.config["job"]
        if "error" in result:
            kind = getattr(errors, result["error"], PncError)
            self.errors[i] = (kind if isinstance(kind, type) and issubclass(kind, PncError) else PncError)(
                result["message"]
            )
            return
        outcome = outcome_from_bytes(result["outcome"], self.jobs[i].index)[0]
        self.outcomes[i] = outcome
        self.done(outcome)
        self.progress.say(f"{self.names[i]}: selection loss {outcome.result.loss:.4f} ({trial.trial_id})")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        line = f"{self.names[trial.config['job']]}: its Ray worker failed; retry {trial.num_failures}"
        self.backend.retries.append(line)
        self.progress.say(line)


class RayBackend:
    """Runs each stage's candidate jobs as Ray Tune trials (see the module docstring).

    ``address``: a Ray cluster (``ray start --head`` prints it; None: this process's Ray if
    connected, else a local one with ``num_cpus``). ``max_failures``: retries of a trial
    whose worker died. ``retries`` lists, after a run, one line per retried trial."""

    def __init__(self, address: str | None = None, num_cpus: int | None = None, *, max_failures: int = 2):
        self.address, self.num_cpus, self.max_failures = address, num_cpus, max_failures
        self.retries: list[str] = []
        self._shipped: tuple[SearchContext, Any] | None = None

    def _context_ref(self, ctx: SearchContext) -> Any:
        """The object ref of ``ctx``, put once per search context."""
        if self._shipped is None or self._shipped[0] is not ctx:
            self._shipped = (ctx, ray.put(ctx))
        return self._shipped[1]

    def run(
        self,
        ctx: SearchContext,
        config: SearchConfig,
        jobs: list[StageJob],
        progress: SearchProgress,
        done: Callable[[StageOutcome], None],
    ) -> list[StageOutcome]:
        if not jobs:
            return []
        connect(self.address, self.num_cpus)
        pairs = ctx.candidates(config.candidates)
        names = [f"R={pairs[j.index][0].node} <- R'={pairs[j.index][1].node} (stage {j.stage!r})" for j in jobs]
        collector = _Collector(self, jobs, names, progress, done)
        trainable = tune.with_parameters(
            _trial, ctx=[self._context_ref(ctx)], search_config=config, jobs=jobs, threads=CPUS_PER_TRIAL
        )
        # Tune prints its experiment banner on stdout: keep stdout for pnc's own output (--json)
        with tempfile.TemporaryDirectory(prefix="pnc-tune-") as storage, contextlib.redirect_stdout(sys.stderr):
            tuner = tune.Tuner(
                tune.with_resources(trainable, {"cpu": CPUS_PER_TRIAL}),
                param_space={"job": tune.grid_search(list(range(len(jobs))))},
                tune_config=tune.TuneConfig(reuse_actors=True),
                run_config=tune.RunConfig(
                    name=f"pnc-{jobs[0].stage}",
                    storage_path=storage,
                    failure_config=tune.FailureConfig(max_failures=self.max_failures),
                    callbacks=[collector],
                    verbose=0,
                ),
            )
            grid = tuner.fit()
        if collector.errors:  # a pnc error in a trial, as the in-process search would raise it
            raise collector.errors[min(collector.errors)]
        failed = [names[i] for i in range(len(jobs)) if i not in collector.outcomes]
        if failed:
            causes = "; ".join(str(e).strip().splitlines()[-1] for e in grid.errors) or "no result"
            raise BackendError(
                f"{', '.join(failed)}: the Ray trial failed after {self.max_failures + 1} attempt(s) ({causes}); the "
                "candidates that finished are checkpointed, so a rerun resumes from them; check the workers' "
                "memory and logs (ray logs) or raise max_failures"
            )
        return [collector.outcomes[i] for i in range(len(jobs))]


def run_cells(
    cell: Callable[..., dict],
    calls: Sequence[tuple[str, tuple, Sequence[str]]],
    shared: dict[str, Any],
    finished: Callable[[str, dict], None],
    *,
    address: str | None = None,
    max_retries: int = 2,
) -> dict[str, dict]:
    """Run ``cell(*args, **shared)`` for each (key, args, after) of ``calls`` as a Ray task
    (one CPU, retried ``max_retries`` times if its worker dies); ``shared`` values go to the
    object store once; a call starts after the calls whose keys are in its ``after``.
    ``finished(key, row)`` is called in this process as each returns. Returns key -> row.
    A pnc error in a cell is raised as itself; a cell whose worker kept dying, BackendError."""
    connect(address)
    shared_refs = {k: ray.put(v) for k, v in shared.items()}
    remote = ray.remote(num_cpus=CPUS_PER_TRIAL, max_retries=max_retries)(_cell_task)
    refs: dict[str, Any] = {}
    for key, args, after in calls:
        refs[key] = remote.remote(cell, args, shared_refs, *[refs[k] for k in after if k in refs])
    keys = {ref: key for key, ref in refs.items()}
    rows, pending = {}, list(refs.values())
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        key = keys[ready[0]]
        try:
            rows[key] = ray.get(ready[0])
        except ray.exceptions.RayTaskError as err:
            raise (err.cause if isinstance(err.cause, PncError) else err) from None
        except ray.exceptions.RayError as err:
            raise BackendError(
                f"benchmark cell {key}: its Ray task failed {max_retries + 1} times ({type(err).__name__}); the "
                "cells that finished are cached, so a rerun resumes from them"
            ) from None
        finished(key, rows[key])
    return rows


def _cell_task(cell: Callable[..., dict], args: tuple, shared: dict[str, Any], *after: dict) -> dict:
    """A Ray task: ``cell(*args, **shared)`` on one torch thread (``after``: rows it waited for)."""
    torch.set_num_threads(CPUS_PER_TRIAL)
    return cell(*args, **{k: ray.get(v) for k, v in shared.items()})
