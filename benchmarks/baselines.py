"""The paper's Table 1 methods on one :class:`CloneTask`: baselines, PNC and its ablations.

Every method gets the same data, ``task.available_set()``: the clone set (a
``task.fraction`` of T_s's training images) and a ``task.old_fraction`` of T_t's (replayed
by the continual baselines; none in the strict setting, old fraction 0); Joint + Full alone
sees all training images of both class sets. A method that trains runs the same epoch
budget, :class:`Budget`: ``budget.epochs`` = loc + joint + binary epochs over the available
images, the epochs PNC spends on *each* candidate cut R (default 2 + 3 + 3 = 8). Nothing is
tuned on test images.

``METHODS`` maps the paper's method names to ``fn(task, target, source, seed, budget,
workdir) -> (model, hparams, details)``; :func:`run_method` runs one under a wall clock
and a resident-memory sampler and adds its inference MACs. The zoo models are never
modified: methods that train work on ``copy.deepcopy`` of the target, and their hashes
are checked after every run.

Every method runs on the device of the target and source (move both there first): the
images stay on the CPU and are moved there batch by batch, and every model a method
returns is an nn.Module on that device. New weights (an extended classifier, Joint+Full's
re-initialisation) are drawn on the CPU from the seed, then moved: the same per seed on
every device.
"""

from __future__ import annotations

import copy
import hashlib
import os
import resource
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pnc.bench.metrics import inference_macs
from pnc.surgery.cloning import clone
from pnc.surgery.cuts import classifier_of
from pnc.surgery.devices import device_of, release_freed_memory
from pnc.surgery.errors import TaskError
from pnc.surgery.insertion import SearchConfig, joint_teacher, kd_loss
from pnc.surgery.io import state_dict_sha256
from pnc.surgery.reporting import is_reporting
from pnc.surgery.tracing import trace
from pnc.zoo.datasets import ImageData
from pnc.zoo.images import decoded
from pnc.zoo.tasks import CloneTask
from pnc.zoo.train import fit

__all__ = [
    "Budget",
    "MethodRun",
    "METHODS",
    "CalibratedEnsemble",
    "lbfgs_minimize",
    "TargetAlone",
    "DirectEnsemble",
    "METHOD_ONLY_FIELDS",
    "budget_fields",
    "run_method",
    "extend_classifier",
    "PeakMemory",
]

MethodFn = Callable[..., tuple[nn.Module, dict[str, Any], dict[str, Any]]]


#: the search's own settings: the budget's epochs, batch and temperature default to them
_SEARCH = SearchConfig()


@dataclass(frozen=True)
class Budget:
    """Training budget and hyper-parameters shared by all methods (none tuned on test data).

    The epochs, batch size and KD temperature are the search's (:class:`SearchConfig`
    defaults, passed on by :meth:`search`), so PNC and the baselines share one definition.
    ``loc_epochs + joint_epochs + binary_epochs`` are PNC's epochs per candidate R and
    also the epochs of every baseline that trains on the clone set (:attr:`epochs`);
    ``scratch_epochs`` / ``scratch_lr`` are Joint + Full's from-scratch recipe (the zoo
    recipe of the target). Fine-tuning: SGD, Nesterov 0.9, weight decay 5e-4, cosine.
    ``finetune_lr`` is PNC-F's: the cloned network keeps every BatchNorm in eval mode, and
    at ``lr`` = 0.01 its fine-tuning diverged (NaN loss after 8 steps, ResNetC-20, "M").
    """

    loc_epochs: int = _SEARCH.loc_epochs
    joint_epochs: int = _SEARCH.joint_epochs
    binary_epochs: int = _SEARCH.binary_epochs
    lr: float = 0.01
    batch_size: int = _SEARCH.batch_size
    kd_temperature: float = _SEARCH.temperature
    scratch_epochs: int = 15
    scratch_lr: float = 0.05
    scratch_batch_size: int = 128
    num_masks: int = 100
    g_fraction: float = 0.3
    finetune_lr: float = 0.001

    @property
    def epochs(self) -> int:
        """Passes over the clone set of a fine-tuning method = PNC's epochs per candidate."""
        return self.loc_epochs + self.joint_epochs + self.binary_epochs

    def search(self, seed: int, **overrides: Any) -> SearchConfig:
        """PNC's search settings under this budget."""
        shared = {
            "loc_epochs": self.loc_epochs,
            "joint_epochs": self.joint_epochs,
            "binary_epochs": self.binary_epochs,
            "batch_size": self.batch_size,
            "temperature": self.kd_temperature,
        }
        return SearchConfig(**{**shared, "seed": seed, **overrides})


@dataclass
class MethodRun:
    """One method on one task: its model (x (B, C, H, W) -> logits (B, |T_t| + |T_s|)) and costs.

    ``seconds``: wall time of building/training it (PNC's without the test-set accuracy of
    its finalist candidates, which only feeds the selection-regret report); ``peak_mb``: peak resident memory above
    the level at its start (sampled, the same reporting left out, see :class:`PeakMemory`); ``macs`` / ``params``: one
    image's inference multiply-accumulates and the parameters used at inference.
    """

    method: str
    model: nn.Module = field(repr=False)
    seconds: float
    peak_mb: float
    macs: int
    params: int
    hparams: dict[str, Any]
    details: dict[str, Any] = field(default_factory=dict)
    peak_without_reporting: bool = False  # whether ``peak_mb`` left the reporting-only work out


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int | None:
    """This process's resident set size from ``/proc/self/statm``; None without /proc."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except OSError:
        return None


class PeakMemory:
    """Peak resident set size above the starting level, in MiB, for a ``with`` block.

    A thread samples ``/proc/self/statm`` every ``interval`` seconds (torch's CPU tensors
    come from malloc, which tracemalloc does not see), skipping the samples taken while a
    clone works only to report (:func:`~pnc.surgery.reporting.is_reporting`), as the
    seconds leave that work out. Without /proc it falls back to the
    ``resource.getrusage`` maxrss delta, which reads 0 when an earlier peak was higher
    (and cannot leave the reporting out).
    The block starts from :func:`~pnc.surgery.devices.release_freed_memory`: pages an earlier
    block freed but the allocator kept would otherwise be reused without the resident size
    growing, and a later block read low (three LeNet-5 PNC rows in one process: 189 / 90 / 90 MiB, and
    214 / 183 / 185 MiB from a trimmed heap).
    """

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak_mb = interval, 0.0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def without_reporting(self) -> bool:
        """Whether the samples left the reporting-only work out (only /proc is sampled)."""
        return self._thread is not None

    def _sample(self, start: int) -> None:
        peak = start
        while not self._stop.wait(self.interval):
            if not is_reporting():
                peak = max(peak, resident_bytes() or 0)
        self.peak_mb = max(peak, resident_bytes() or 0) - start
        self.peak_mb /= 2**20

    def __enter__(self) -> PeakMemory:
        release_freed_memory()
        start = resident_bytes()
        if start is None:
            self._maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self._thread = None
        else:
            self._thread = threading.Thread(target=self._sample, args=(start,), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is None:
            self.peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self._maxrss) / 1024
            return
        self._stop.set()
        self._thread.join()


# --- helpers -------------------------------------------------------------------------------


def extend_classifier(model: nn.Module, num_new: int, example: Tensor, seed: int) -> nn.Module:
    """Replace ``model``'s nn.Linear classifier (found by tracing) in place with one having
    ``num_new`` more outputs: old rows copied, new rows default-initialized from ``seed`` (drawn
    on the CPU, then moved to the classifier's device)."""
    cls = classifier_of(trace(model, example[:2]))
    old = model.get_submodule(cls.module)
    if not isinstance(old, nn.Linear):
        raise TaskError(
            f"the classifier {cls.module!r} is a {type(old).__name__}; the fine-tuning "
            "baselines extend an nn.Linear head only"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new = nn.Linear(old.in_features, old.out_features + num_new, bias=old.bias is not None, device="cpu")
    new.to(old.weight.device)
    with torch.no_grad():
        new.weight[: old.out_features] = old.weight
        if old.bias is not None:
            new.bias[: old.out_features] = old.bias
    model.set_submodule(cls.module, new)
    return model


def _reinitialized(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` with every parameter re-drawn by its module's ``reset_parameters`` (on
    the CPU, from ``seed``), on ``model``'s device."""
    device = device_of(model)
    fresh = copy.deepcopy(model).to("cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in fresh.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return fresh.to(device).requires_grad_(True)


def _count_params(*modules: nn.Module) -> int:
    seen = {id(p): p.numel() for m in modules for p in m.parameters()}
    return sum(seen.values())


def _finetune_hparams(budget: Budget, **extra: Any) -> dict[str, Any]:
    return {
        "epochs": budget.epochs,
        "lr": budget.lr,
        "batch_size": budget.batch_size,
        "optimizer": "sgd",
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 5e-4,
        "schedule": "cosine per step",
        "data": "available images (clone set + old-class replay)",
        **extra,
    }


# --- the methods -----------------------------------------------------------------------------


class TargetAlone(nn.Module):
    """The target with -inf for each of ``num_new`` cloned classes: (B, |T_t| + num_new)."""

    def __init__(self, target: nn.Module, num_new: int):
        super().__init__()
        self.target, self.num_new = target, num_new

    def forward(self, x: Tensor) -> Tensor:
        out = self.target(x)
        return torch.cat([out, out.new_full((len(x), self.num_new), float("-inf"))], 1)


class DirectEnsemble(nn.Module):
    """The target's logits, then the source's logits ``index`` (its T_s): (B, |T_t| + |T_s|)."""

    def __init__(self, target: nn.Module, source: nn.Module, index: list[int]):
        super().__init__()
        self.target, self.source, self.index = target, source, list(index)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.target(x), self.source(x)[:, self.index]], 1)


def pretrained(
    task: CloneTask, target: nn.Module, source: nn.Module, seed: int, budget: Budget, workdir: Path | None = None
):
    """The target alone: its own logits, and -inf for every cloned class (Tar = 0)."""
    return TargetAlone(target, len(task.clone_classes)), {}, {"params": _count_params(target)}


def direct_ensemble(
    task: CloneTask, target: nn.Module, source: nn.Module, seed: int, budget: Budget, workdir: Path | None = None
):
    """Concatenate the target's logits and the source's logits of T_s."""
    model = DirectEnsemble(target, source, task.source_label_index())
    return model, {}, {"params": _count_params(target, source)}


@torch.enable_grad()
def lbfgs_minimize(params: list[Tensor], loss_of: Callable[[], Tensor], lr: float, max_iter: int) -> None:
    """Minimize ``loss_of()`` (a scalar of ``params``, which require grad) in place with
    L-BFGS (strong-Wolfe line search), up to ``max_iter`` iterations."""
    opt = torch.optim.LBFGS(params, lr=lr, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = loss_of()
        loss.backward()
        return loss

    opt.step(closure)


class CalibratedEnsemble(nn.Module):
    """The direct ensemble with a per-model temperature and a per-class bias:
    ``[target(x) / tau_t + b_old, source(x)[:, index] / tau_s + b_new]`` (B, |T_t| + |T_s|).
    The two models are held by reference and never trained; its parameters are made on the
    target's device."""

    def __init__(self, target: nn.Module, source: nn.Module, index: list[int], num_old: int):
        super().__init__()
        self.models = (target, source)  # a tuple: not registered, so not counted twice or saved
        self.index = list(index)
        device = device_of(target)
        self.log_temperature = nn.Parameter(torch.zeros(2, device=device))
        self.bias = nn.Parameter(torch.zeros(num_old + len(index), device=device))

    def combine(self, old: Tensor, new: Tensor) -> Tensor:
        """Raw target logits (B, |T_t|) and source logits of T_s (B, |T_s|) -> calibrated (B, K)."""
        scale = torch.exp(-self.log_temperature)
        return torch.cat([old * scale[0], new * scale[1]], 1) + self.bias

    def forward(self, x: Tensor) -> Tensor:
        target, source = self.models
        return self.combine(target(x), source(x)[:, self.index])

    @torch.enable_grad()
    def fit(self, x: Tensor, y: Tensor, weight_decay: float = 1e-3, steps: int = 200) -> CalibratedEnsemble:
        """Minimize cross-entropy on images x (N, C, H, W) with joint labels y (N,) by L-BFGS,
        plus ``weight_decay`` x the squared parameters (keeps the fit finite when a side
        has no image, e.g. no old-class image in the strict setting). Runs on the
        parameters' device, the images moved there batch by batch."""
        device = self.bias.device
        y = y.to(device)
        with torch.no_grad():
            old = torch.cat([self.models[0](xb.to(device)) for xb in x.split(512)])
            new = torch.cat([self.models[1](xb.to(device))[:, self.index] for xb in x.split(512)])
        params = [self.log_temperature, self.bias]
        penalty = lambda: weight_decay * sum((p**2).sum() for p in params)
        lbfgs_minimize(params, lambda: F.cross_entropy(self.combine(old, new), y) + penalty(), lr=0.5, max_iter=steps)
        return self.requires_grad_(False).eval()


def calibrated_ensemble(
    task: CloneTask, target: nn.Module, source: nn.Module, seed: int, budget: Budget, workdir: Path | None = None
):
    """The direct ensemble, calibrated (:class:`CalibratedEnsemble`) on the available images.
    Not in the paper: the strongest cheap competitor when old-class images are available."""
    data = task.available_set()
    model = CalibratedEnsemble(target, source, task.source_label_index(), len(task.target_classes))
    model.fit(data.x, data.y)
    hp = {
        "loss": "cross_entropy + 1e-3 * squared parameters",
        "optimizer": "lbfgs",
        "max_iter": 200,
        "data": "available images (clone set + old-class images)",
        "fitted": {"temperature": torch.exp(model.log_temperature).tolist(), "bias": model.bias.tolist()},
    }
    return model, hp, {"params": _count_params(target, source) + model.bias.numel() + 2, "train_images": len(data)}


def joint_full(
    task: CloneTask, target: nn.Module, source: nn.Module, seed: int, budget: Budget, workdir: Path | None = None
):
    """The target's architecture, re-initialized, trained from scratch on all training
    images of T_t and T_s (``task.joint_train()``) with cross-entropy."""
    data = task.joint_train()  # image folders: files, streamed by fit
    model = _reinitialized(target, seed)
    extend_classifier(
        model, len(task.clone_classes), decoded(data.subset(torch.arange(2, device=data.y.device))).x, seed
    )
    fit(
        model,
        data,
        epochs=budget.scratch_epochs,
        lr=budget.scratch_lr,
        seed=seed,
        batch_size=budget.scratch_batch_size,
        progress=False,
    )
    hp = _finetune_hparams(
        budget,
        epochs=budget.scratch_epochs,
        lr=budget.scratch_lr,
        batch_size=budget.scratch_batch_size,
        data="all training images of T_t and T_s",
        init="reset_parameters (PyTorch default)",
    )
    return model, hp, {"train_images": len(data)}


def fit_continual(
    base: nn.Module,
    num_old: int,
    source: nn.Module,
    index: list[int],
    data: ImageData,
    seed: int,
    budget: Budget,
    *,
    kd: bool,
    ce: bool = True,
) -> tuple[nn.Module, bool]:
    """A copy of ``base`` (``num_old`` outputs), its head extended by ``len(index)`` rows,
    fine-tuned on ``data`` (labels < num_old: base's classes, the rest: the new ones) with
    cross-entropy (``ce``) and, with ``kd``, KD to
    :func:`~pnc.surgery.insertion.joint_teacher` of base's logits and the source's
    ``source(x)[:, index]``; base stays frozen. Also returns whether ``data`` has images of
    base's classes (the teacher then arbitrates per image)."""
    model = extend_classifier(copy.deepcopy(base).requires_grad_(True), len(index), data.x, seed)
    arbitrate = bool((data.y < num_old).any())

    def loss_fn(m: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        logits = m(x)
        loss = F.cross_entropy(logits, y) if ce else logits.new_zeros(())
        if kd:
            with torch.no_grad():
                teacher = joint_teacher(base(x), source(x)[:, index], y if arbitrate else None)
            loss = loss + kd_loss(logits, teacher, budget.kd_temperature)
        return loss

    fit(
        model,
        data,
        epochs=budget.epochs,
        lr=budget.lr,
        seed=seed,
        batch_size=budget.batch_size,
        loss_fn=loss_fn,
        progress=False,
    )
    return model, arbitrate


def _continual(
    task: CloneTask, target: nn.Module, source: nn.Module, seed: int, budget: Budget, kd: bool, ce: bool = True
):
    data = task.available_set()
    index = task.source_label_index()
    num_old = len(task.target_classes)
    model, arbitrate = fit_continual(target, num_old, source, index, data, seed, budget, kd=kd, ce=ce)
    extra = {"loss": "cross_entropy"}
    if kd:
        teacher = (
            "per image: [frozen target logits, -inf] on old-class images, [-inf, source T_s logits] on "
            "clone-class images"
            if arbitrate
            else "[frozen target logits, source T_s logits]"
        )
        extra = {
            "loss": ("cross_entropy + " if ce else "") + f"KD(joint logits -> {teacher})",
            "kd_temperature": budget.kd_temperature,
            "kd_weight": 1.0,
        }
    return model, _finetune_hparams(budget, **extra), {"train_images": len(data)}


def continual(
    task: CloneTask, target: nn.Module, source: nn.Module, seed: int, budget: Budget, workdir: Path | None = None
):
    """Fine-tune a copy of the target, head extended by |T_s| rows, on the available images
    (the clone set and the old-class replay; cross-entropy)."""
    return _continual(task, target, source, seed, budget, kd=False)


def continual_kd(
    task: CloneTask, target: nn.Module, source: nn.Module, seed: int, budget: Budget, workdir: Path | None = None
):
    """Continual plus KD (temperature T) of the old logits to the frozen target and of the new
    logits to the source's logits of T_s, as one KL over the joint vector [old, new] towards
    PNC's teacher (:func:`~pnc.surgery.insertion.joint_teacher`): with old-class replay, per
    image (the target on old-class images, the source on clone-class ones); without, [target
    logits, source logits of T_s] (separate KLs would leave the old-vs-new scale free, and a
    KL over one new logit is identically zero)."""
    return _continual(task, target, source, seed, budget, kd=True)


def continual_kd_only(
    task: CloneTask, target: nn.Module, source: nn.Module, seed: int, budget: Budget, workdir: Path | None = None
):
    """Continual+KD without the cross-entropy term: the fine-tuned target learns from the two
    teachers only (PNC's own objective, but on a shared, trainable backbone). Not in the
    paper; it shows whether Continual+KD's collapse comes from the cross-entropy."""
    return _continual(task, target, source, seed, budget, kd=True, ce=False)


def _clone(
    task: CloneTask,
    target: nn.Module,
    source: nn.Module,
    seed: int,
    budget: Budget,
    workdir: Path | None,
    *,
    resume: bool = False,
    report_tuned: bool = False,
    **overrides: Any,
):
    """PNC on ``task``: checkpoints in ``workdir``. Without ``resume`` the search starts
    over (a row's seconds are those of a whole clone, never of one resumed from an earlier
    run's checkpoints); PNC-F resumes the search its PNC row just made. ``report_tuned``:
    every finalist also built and tuned for the selection regret (``clone(report_tuned=...)``;
    its time is reporting time, not the row's)."""
    config = budget.search(seed, **overrides)
    ckpt = None
    if workdir is not None:
        ckpt = Path(workdir) / f"search-{hashlib.sha256(config.key().encode()).hexdigest()[:12]}"
        if not resume:
            shutil.rmtree(ckpt, ignore_errors=True)
    # G is refitted by every run (no cache_dir), so each row's time includes it
    net = clone(
        target,
        source,
        **task.clone_inputs(),
        config=config,
        g_fraction=budget.g_fraction,
        num_masks=budget.num_masks,
        checkpoint_dir=ckpt,
        progress=False,
        report_tuned=report_tuned,
    )
    report = next(iter(net.branches.values())).report
    hp = {
        "search": asdict(config),
        "g_fraction": budget.g_fraction,
        "num_masks": budget.num_masks,
        "grid": report.settings["grid"],
    }
    reporting = report.profile["report_accuracy"] + report.profile.get("report_candidates", 0.0)
    return net, hp, {"report": asdict(report), "reporting_seconds": reporting}


def pnc(task: CloneTask, target: nn.Module, source: nn.Module, seed: int, budget: Budget, workdir: Path | None = None):
    """Partial network cloning with the default search (every block cut, masks on); every
    finalist tuned too, to report the selection regret of the clones as they would ship."""
    return _clone(task, target, source, seed, budget, workdir, report_tuned=True)


def pnc_wo_local(
    task: CloneTask, target: nn.Module, source: nn.Module, seed: int, budget: Budget, workdir: Path | None = None
):
    """PNC without localization: every channel of the source after R' is kept."""
    return _clone(task, target, source, seed, budget, workdir, use_masks=False)


def pnc_wo_insert(
    task: CloneTask, target: nn.Module, source: nn.Module, seed: int, budget: Budget, workdir: Path | None = None
):
    """PNC without the insertion search: R fixed to the first block cut."""
    return _clone(task, target, source, seed, budget, workdir, candidates=["first"])


def pnc_f(
    task: CloneTask, target: nn.Module, source: nn.Module, seed: int, budget: Budget, workdir: Path | None = None
):
    """PNC, then every weight of a deep copy of the cloned network (target, adapter,
    transferable module, head) fine-tuned on the available images with cross-entropy at
    ``budget.finetune_lr``. BatchNorm statistics stay frozen (the cloned network keeps its
    target and modules in eval mode)."""
    net, hp, details = _clone(task, target, source, seed, budget, workdir, resume=True)
    tuned = copy.deepcopy(net).requires_grad_(True)
    data = task.available_set()
    fit(
        tuned,
        data,
        epochs=budget.epochs,
        lr=budget.finetune_lr,
        seed=seed,
        batch_size=budget.batch_size,
        progress=False,
    )
    hp = {
        "pnc": hp,
        "finetune": _finetune_hparams(
            budget, lr=budget.finetune_lr, loss="cross_entropy", weights="all", batchnorm="frozen (eval mode)"
        ),
    }
    return tuned, hp, details


#: Budget fields read by one method only (kept out of the other methods' cache fingerprints)
METHOD_ONLY_FIELDS = {"finetune_lr": "PNC-F"}


def budget_fields(budget: Budget, method: str) -> dict[str, Any]:
    """The budget's fields that ``method`` reads (for cache fingerprints)."""
    return {k: v for k, v in asdict(budget).items() if METHOD_ONLY_FIELDS.get(k, method) == method}


def search_key(budget: Budget, method: str, old_images: bool, **overrides: Any) -> str | None:
    """Every search setting a PNC row depends on (defaults included, so a new default is a
    new row), as :meth:`SearchConfig.key` of the config resolved as the clone resolves it
    (``old_images``: the task gives old-class images, so the branch is tuned when
    ``tune_epochs`` > 0); None for a method that runs no search."""
    if not method.startswith("PNC"):
        return None
    config = budget.search(0, **overrides)
    return config.resolved(old_images and config.tune_epochs > 0).key()


METHODS: dict[str, MethodFn] = {
    "Pre-trained": pretrained,
    "Joint+Full": joint_full,
    "Continual": continual,
    "Continual+KD": continual_kd,
    "Continual+KD (no CE)": continual_kd_only,
    "Direct Ensemble": direct_ensemble,
    "Calibrated Ensemble": calibrated_ensemble,
    "PNC-F": pnc_f,
    "PNC (w/o Local)": pnc_wo_local,
    "PNC (w/o Insert)": pnc_wo_insert,
    "PNC": pnc,
}


def run_method(
    name: str,
    task: CloneTask,
    target: nn.Module,
    source: nn.Module,
    seed: int,
    budget: Budget,
    workdir: Path | None = None,
) -> MethodRun:
    """Run METHODS[name] timed and memory-sampled; add its inference MACs and parameters."""
    if name not in METHODS:
        raise TaskError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    hashes = state_dict_sha256(target), state_dict_sha256(source)
    target.eval(), source.eval()
    with PeakMemory() as memory:
        began = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, hparams, details = METHODS[name](task, target, source, seed, budget, workdir)
        seconds = time.perf_counter() - began - details.pop("reporting_seconds", 0.0)
    if (state_dict_sha256(target), state_dict_sha256(source)) != hashes:
        raise RuntimeError(f"pnc bug: method {name!r} changed the target's or the source's weights")
    params = details.pop("params", None)
    if params is None:
        params = _count_params(model)
    example = task.clone_set().x[:1]  # inference_macs moves it to the model's device
    return MethodRun(
        method=name,
        model=model,
        seconds=seconds,
        peak_mb=memory.peak_mb,
        peak_without_reporting=memory.without_reporting,
        macs=inference_macs(model, example),
        params=params,
        hparams=hparams,
        details=details,
    )
