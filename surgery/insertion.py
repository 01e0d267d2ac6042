"""Localization and insertion (Eq. 5-8): learn M, A and F_c at one candidate R.

At a candidate target cut R and its source cut R' (the source block cut at the nearest
relative depth), :class:`CandidateTrainer` runs two *stages*, after each of which the
candidate is measured on held-out images (:mod:`pnc.surgery.cut_search` compares
candidates there and drops the clearly worse ones):

1. ``"search"``: *localize* (Eq. 5): soft masks on the source's channel groups after R'
   are trained so that the masked source's T_s logits on occluded images match the local
   models G, under the channel budget; then *joint* (Eq. 8): adapter A, head F_c and the
   masks together, L_loc + L_ins; measured with the soft masks it was trained with;
2. ``"binary"``: the masks are binarized to the top-c channels and A and F_c are trained
   on with them (L_loc has no gradient left, so only L_ins is computed).

L_ins (Eq. 7) is a KL at temperature T between the cloned network's joint logits
[old, new] (B, |T_t| + |T_s|) and a teacher built per image:

* with images of the target's classes available (the paper's setting), it *arbitrates*:
  on an old-class image the teacher is [target logits, -inf], on a clone-class image
  [-inf, source logits of T_s], so the new outputs lose on old images and the old
  outputs lose on clone images; plus ``ce_weight`` x cross-entropy on the joint labels.
  F_c (reading the target's pre-logits and the branch features) learns the arbitration;
* with clone-class images only (old fraction 0), the teacher is [target logits, source
  logits of T_s] on every image (the direct ensemble), on clean and occluded images.

The frozen networks' outputs on the training images (and on a fixed pool of occluded
ones) are computed once (:mod:`pnc.surgery.frozen_pool`); a step only runs the target up
to R (or reads it from the cache) and the branch. Candidates are measured on one scale for
every cut: held-out joint error (ties: held-out cross-entropy) when old-class images
exist, else the held-out KD loss to the ensemble teacher on clean images. With old-class
images, :func:`pnc.surgery.tuning.tune_branch` then fine-tunes the chosen, pruned branch
(A, its own copy of M_f, F_c) with the same L_ins, kept only if the held-out error falls;
the target and the source are never trained.
"""

from __future__ import annotations

import difflib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pnc.adapters import Adapter, least_squares_init, make_adapter
from pnc.surgery.branch import Branch, ExtendedHead, assemble_branch, branch_tensors
from pnc.surgery.channel_groups import MaskedBody
from pnc.surgery.cuts import CutPoint, classifier_of, cut_points
from pnc.surgery.devices import adam, device_of
from pnc.surgery.errors import ConfigError, CutError, TrainingError
from pnc.surgery.frozen_pool import (
    CHUNK,
    FrozenActivations,
    InsertionPool,
    LocalizationPool,
    batched,
    cut_activations,
)
from pnc.surgery.local_models import LocalModelSet
from pnc.surgery.splitting import extract
from pnc.surgery.tracing import TracedModel

#: the stages of a candidate, in order; candidates are compared after each
STAGES = ("search", "binary")
#: bumped when what a setting means changes without a field changing (e.g. what None
#: resolves to), so that checkpoints and cached rows of the old meaning are not reused
SEARCH_REVISION = 2


@dataclass
class SearchConfig:
    """Settings of the localization + insertion search (defaults: the paper's, scaled to CPU).

    An epoch of the search is ``max(ceil(N / batch_size), min_steps_per_epoch)`` steps (tiny
    sets are cycled), N the clone classes' training images (``epoch_images="clone"``: the
    old-class images do not lengthen the search) or all of them (``"available"``); batches
    are drawn from every available image either way. A tuning epoch is a pass over every
    training image: the long tuning of the one chosen branch is what the accuracy needs,
    the long search of every candidate is not (``benchmarks/results/clone_cost.md``).
    ``mask_ratio`` is the kept fraction c/|W| per group (``mask_scope="global"``: of all
    maskable channels); ``use_masks=False`` is the "w/o Local" ablation (every channel
    kept); None (the default): masks with old-class images, none without (in the strict
    setting masks localized on clone-class images alone prune the channels that keep the new
    outputs low on other classes: ResNetC-20 S fell to Ori 77 with them, 94.7 without).
    ``candidates`` fixes the target cuts to try (["first"] is "w/o Insert").
    ``holdout`` is the share of the available images (per class) kept out of training to
    select R; ``ce_weight`` weighs L_ins's cross-entropy when old-class images are given.
    ``tune_epochs`` / ``tune_lr``: with old-class images, the chosen branch's A, its pruned
    copy of M_f and F_c are then fine-tuned with L_ins (Adam, cosine schedule; the target
    stays frozen), kept only if the held-out error falls; 0 epochs: never. 10 epochs (6
    before): at M the tuning is where the clone learns to arbitrate (ResNetC-20 M seed 0:
    Tar 79.1 / 84.3 / 87.8 after 3 / 6 / 10 epochs, Avg 85.9 / 87.9 / 89.2); at S and on
    LeNet-5 M (3 seeds) it changed Avg by at most 0.2.
    ``tune_weight_decay``: AdamW's decoupled weight decay in that tuning; 0 (the default):
    0.01, 0.05 and 0.2 changed LeNet-5 M's Avg by at most 0.08 point over 3 seeds
    (``benchmarks/results/variants-*-M-wd.md``).
    ``tune_bn_train``: in that tuning the copy of M_f's BatchNorm layers normalize each batch
    with its own statistics and track them (the copy's running statistics, saved with its
    weights; the source's never move); False: they keep the source's statistics, frozen. On
    by default: on ResNetC-20 M (3 seeds, Intel Xeon) Avg 88.63 -> 89.66 (Tar +2.7, Ori
    +0.05); at S (3 seeds) 95.46 -> 95.49, and ResNetC-20 -> CNN4 93.66 -> 93.82
    (``benchmarks/results/variants-*-bn*.md``); a source without BatchNorm is unaffected.
    ``tune_shift`` / ``tune_flip``: augmentation in that tuning: each training image is
    translated by up to ``tune_shift`` pixels (edges replicated) and, with ``tune_flip``,
    mirrored left-right with probability 1/2; the frozen target then runs on the augmented
    image (a full forward per step), the source's logits of the clean image stay the
    teacher. Off by default: seed 0, ResNetC-20 M Avg 90.25 without, 90.31 with a 2-pixel
    shift, 89.78 with shift and flips; ResNetC-20 -> CNN4 93.87 / 93.83 / 93.62
    (``benchmarks/results/variants-*-aug-*.md``); flips are wrong for digits and text anyway.
    ``tune_runners_up``: with that tuning, this many next-best finalists are built and tuned
    too, and the one with the best held-out accuracy after tuning is kept (ties: the
    search's choice); the selection loss ranks candidates before tuning, and near-tied cuts
    can swap places after it. 0 (the default): only the chosen one is tuned. 1, 3 seeds
    (``benchmarks/results/variants-*-runners.md``): LeNet-5 M 88.24 vs 88.09 Avg at 1.9x the
    clone's time, ResNetC-20 M 89.82 vs 89.65 at 1.4x, LeNet-5 -> ViT 89.64 vs 89.51,
    resnet18 -> mobilenetv2_050 88.53 vs 88.43 at 1.5x, ResNetC-20 -> CNN4 unchanged; never
    lower on a seed.
    ``tune_epochs_choices``: other tuning lengths, each tried from the same start; the one
    with the best held-out accuracy is kept (ties: the shorter). Empty by default. Choose
    lengths only on held-out images neither network was trained on (a validation split,
    ``clone(holdout=...)``): on images they were trained on, the longer tuning looks
    better and is not (``benchmarks/results/unseen_holdout-*.md``).
    ``perturbed_copies``: occluded versions of each training image in L_ins's pool, beside
    the clean one; None: 0 with old-class images (measured best there), 1 without (half of
    L_ins's images occluded: the perturbation helps when distilling to the source alone, and
    with the copies fixed once, 3 per image cost 0.9 Avg points at M on LeNet-5, 3 seeds,
    against 1; chosen on those seeds' test sets, then checked on ResNetC-20).
    ``loc_pool``: the (image, mask) pairs of G that L_loc draws from. ``cache_mb``: the most
    memory the frozen networks' cached activations at the cuts may take, all together
    (float16; the first candidates, the latest cuts, get it; the others are recomputed per
    step): a candidate's two stages and the chosen branch's tuning read them again. 192 MiB
    (128 before) holds the L_ins pool of the latest ResNetC-20 cut at M (145 MiB): seed 0 took
    146 s instead of 178 s (the tuning 24 s instead of 52 s), 538 MiB peak instead of 434
    (Joint+Full: 484), Avg 88.94 vs 88.96; at S 73 s instead of 77 s, 475 MiB instead of 413
    (``benchmarks/results/clone_cost.md``, a fresh process per cell).
    ``keep_fraction``: successive halving, the share of candidates kept after each stage
    but the last (at least one, and every one within a standard error of the best). 1 (the
    default) keeps all: ranked with the soft masks of the first stage, candidates at early
    cuts can look better than they end after binarization (measured on ResNetC-20 in the
    strict setting: the best final R was dropped), so halving is an opt-in speed-up.
    ``smaller_branch_within_se``: the one-standard-error rule, for deployment. Among the
    finalists, the latest cut (the smallest branch, the cheapest clone to run) whose
    held-out selection loss is within one *paired* standard error of the best one's (the
    per-image differences on the same held-out images) is chosen. Off by default: the
    lowest loss (on Fashion-MNIST LeNet-5 at M the rule cost 0.3-0.45 Avg points in 2 of 3
    seeds; at S it changed nothing measurable).
    ``choose``: how R is chosen. ``"loss"``: the finalist with the lowest held-out selection
    loss (every candidate trained). ``"earliest"``: the earliest cut an adapter maps (the
    largest branch), the only candidate trained (``clone(report_tuned=True)`` trains the
    others too, for the report only). None (the default): ``"earliest"`` when the chosen
    branch is tuned (old-class images, a held-out part, ``tune_epochs`` > 0) and neither
    ``smaller_branch_within_se`` nor ``tune_runners_up`` asks to compare candidates,
    ``"loss"`` otherwise (:meth:`resolved`). Why: after tuning the largest branch is the
    best or within noise of it, while the selection loss, read before tuning, cannot see
    what tuning adds (``benchmarks/results/selection_criteria.md``: regret after tuning
    0.05 point for ``"earliest"``, 0.17 for ``"loss"`` on 24 committed rows; on unseen
    seeds 3-5 never lower: resnet18 -> mobilenetv2_050 88.36 vs 88.28 Avg in 0.55x the time,
    LeNet-5 -> ViT 89.98 vs 89.86, ResNetC-20 M seeds 3-4 90.41 vs 89.96,
    ``variants-*-earliest-*.md``); before tuning the loss rule is the better one (regret
    0.10 vs 0.41), so the strict setting keeps it.
    ``smaller_mask_ratios``: kept shares below ``mask_ratio`` tried on the chosen R, for
    deployment: its last stage is re-run from the same soft masks at each, smallest first,
    and the first whose held-out selection loss is at most the chosen one's replaces it
    (a smaller, faster branch where the held-out images see no loss). Empty by default.
    """

    mask_ratio: float = 0.5
    mask_scope: str = "group"
    use_masks: bool | None = None
    loc_epochs: int = 2
    joint_epochs: int = 3
    binary_epochs: int = 3
    lr: float = 3e-3
    batch_size: int = 64
    temperature: float = 2.0
    loc_weight: float = 1.0
    keep_weight: float = 1.0
    perturbed_copies: int | None = None
    min_steps_per_epoch: int = 25
    epoch_images: str = "clone"
    candidates: list[str] | None = None
    holdout: float = 0.2
    ce_weight: float = 1.0
    tune_epochs: int = 10
    tune_epochs_choices: tuple[int, ...] = ()
    tune_lr: float = 3e-3
    tune_weight_decay: float = 0.0
    tune_bn_train: bool = True
    tune_shift: int = 0
    tune_flip: bool = False
    tune_runners_up: int = 0
    loc_pool: int = 4096
    cache_mb: float = 192.0
    keep_fraction: float = 1.0
    smaller_branch_within_se: bool = False
    smaller_mask_ratios: tuple[float, ...] = ()
    choose: str | None = None
    seed: int = 0

    def key(self) -> str:
        """The settings and :data:`SEARCH_REVISION`, as JSON: what checkpoints and cached
        benchmark rows are keyed by. A setting of :data:`PRIOR_VALUES` is left out at the value
        the search had before it existed (rows cached then stay valid)."""
        settings = {k: v for k, v in asdict(self).items() if k not in PRIOR_VALUES or v != PRIOR_VALUES[k]}
        return json.dumps(settings | {"revision": SEARCH_REVISION}, sort_keys=True)

    def resolved(self, tuned: bool) -> SearchConfig:
        """This config with ``choose`` decided (see the class docstring); ``tuned``: whether
        the chosen branch will be tuned. ConfigError for an unknown rule, or for
        ``choose="earliest"`` with a setting that compares candidates."""
        compares = self.smaller_branch_within_se or self.tune_runners_up > 0
        if self.choose is None:
            return replace(self, choose="earliest" if tuned and not compares else "loss")
        if self.choose not in CHOOSE_RULES:
            rules = ", ".join(map(repr, CHOOSE_RULES))
            raise ConfigError(f"choose must be one of {rules} or None, got {self.choose!r}")
        if self.choose == "earliest" and compares:
            raise ConfigError(
                "choose='earliest' (--choose earliest) trains one candidate, but smaller_branch_within_se / "
                "tune_runners_up (--prefer-smaller-branch / --tune-runners-up) compare candidates: use "
                "choose='loss' (--choose loss) with them"
            )
        return self


#: the rules :attr:`SearchConfig.choose` names
CHOOSE_RULES = ("loss", "earliest")

#: settings added after rows were cached, each with the value the search had before it
#: existed: at that value they are left out of :meth:`SearchConfig.key`
PRIOR_VALUES: dict[str, Any] = {
    "smaller_mask_ratios": (),
    "tune_epochs_choices": (),
    "tune_weight_decay": 0.0,
    "tune_bn_train": False,
    "tune_shift": 0,
    "tune_flip": False,
    "tune_runners_up": 0,
    "choose": "loss",
}


@dataclass
class CandidateResult:
    """What one candidate R gave: its selection ``loss`` (the held-out criterion, lower is
    better; the last epoch's training loss when nothing is held out), held-out metrics,
    test accuracies of the finalists (``accuracy``: as the search left them;
    ``tuned_accuracy``: built and tuned as the chosen one is, with ``clone(report_tuned=True)``;
    both reported, never used to select), learned parts, the last stage it finished and,
    when it was dropped, why."""

    target_cut: str
    source_cut: str
    loss: float
    accuracy: dict[str, float]
    kept_fraction: float
    seconds: float
    adapter_spec: dict
    train_loss: float = float("nan")
    holdout: dict[str, float] = field(default_factory=dict)
    stage: str = ""
    eliminated: str = ""
    phase_seconds: dict[str, float] = field(default_factory=dict)
    tensors: dict[str, Tensor] = field(repr=False, default_factory=dict)
    #: (M,) the selection loss of each held-out image (error 0/1 or KD), for paired comparisons
    holdout_losses: Tensor | None = field(repr=False, default=None)
    tuned_accuracy: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("tensors", "holdout_losses")}


def nearest_cut(depth: float, cuts: list[CutPoint]) -> CutPoint:
    """The cut at the nearest relative depth (the later one on a tie)."""
    return min(reversed(cuts), key=lambda c: abs(c.depth - depth))


def kd_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)) * T^2 over the joint logit vector (B, K)."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, 1), F.softmax(teacher / t, 1), reduction="batchmean") * t * t


def joint_teacher(old: Tensor, new: Tensor, labels: Tensor | None) -> Tensor:
    """L_ins's teacher (B, |T_t| + |T_s|) from target logits ``old`` (B, |T_t|) and source
    logits of T_s ``new`` (B, |T_s|): their concatenation (the direct ensemble) when
    ``labels`` is None; else, per image, the side its joint label (B,) is not on is -inf."""
    if labels is not None:
        is_old = (labels < old.shape[1]).unsqueeze(1)
        old, new = old.masked_fill(~is_old, -math.inf), new.masked_fill(is_old, -math.inf)
    return torch.cat([old, new], 1)


def split_holdout(labels: Tensor, share: float, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded per-class split of labels (N,) into (train, held-out) index tensors; a
    ``share`` of each class is held out, but every class keeps at least one training row."""
    gen = torch.Generator().manual_seed(seed)
    none = torch.zeros(0, dtype=torch.int64, device=labels.device)
    train, held = [none], [none]
    for label in labels.unique(sorted=True).tolist():
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=gen, device=gen.device).to(labels.device)]
        k = min(round(share * len(members)), len(members) - 1)
        held.append(members[:k])
        train.append(members[k:])
    return torch.cat(train).sort().values, torch.cat(held).sort().values


def _kd_per_image(ctx: SearchContext, logits: Tensor, temperature: float) -> Tensor:
    """(M,) KD loss of each held-out image's logits (M, K) to the direct ensemble's."""
    assert ctx.holdout_frozen is not None
    t = temperature
    ensemble = ctx.holdout_frozen[2]
    return F.kl_div(F.log_softmax(logits / t, 1), F.softmax(ensemble / t, 1), reduction="none").sum(1) * t * t


def selection_losses(ctx: SearchContext, logits: Tensor, temperature: float) -> Tensor:
    """(M,) the selection criterion of each held-out image, from the cloned network's logits
    (M, K): its error (0 or 1) with old-class images, else its KD loss to the direct ensemble."""
    assert ctx.holdout is not None
    if ctx.arbitrate:
        return (logits.argmax(1) != ctx.holdout[1]).float()
    return _kd_per_image(ctx, logits, temperature)


def holdout_metrics(ctx: SearchContext, logits: Tensor, temperature: float) -> dict[str, float]:
    """Held-out metrics of a cloned network's logits (M, K) on ``ctx.holdout``: accuracy,
    cross-entropy, KD to the direct ensemble, and ``se``, the standard error of the
    selection criterion (the error with old-class images, else the KD loss)."""
    assert ctx.holdout is not None
    y = ctx.holdout[1]
    n, acc = len(y), float((logits.argmax(1) == y).float().mean())
    per_image = _kd_per_image(ctx, logits, temperature)
    se = math.sqrt(acc * (1 - acc) / n) if ctx.arbitrate else float(per_image.std() / math.sqrt(n)) if n > 1 else 0.0
    return {
        "acc": acc,
        "ce": float(F.cross_entropy(logits, y)),
        "kd": float(per_image.mean()),
        "se": se,
        "images": n,
    }


class SearchContext:
    """Everything the candidates share: traced networks, training images, G, the frozen
    networks' outputs on the pools and the held-out images, eval sets.

    train_x (N, C, H, W), train_y (N,): the available training images with the cloned
    network's labels (< num_old: target classes, the rest: clone classes); G indexes the
    clone-class rows ``clone_x``. holdout: (x, y) held out of training to select R, or None.
    eval_sets: name -> (x, y) test sets, for reporting only.
    """

    def __init__(
        self,
        target: TracedModel,
        source: TracedModel,
        train_x: Tensor,
        train_y: Tensor,
        source_outputs: list[int],
        g: LocalModelSet,
        eval_sets: dict[str, tuple[Tensor, Tensor]],
        num_old: int,
        holdout: tuple[Tensor, Tensor] | None = None,
        config: SearchConfig | None = None,
    ):
        config = config or SearchConfig()
        self.target, self.source = target, source
        #: where the search computes: the models' device (the images are moved there once)
        self.device = device_of(target.gm)
        train_x, train_y = train_x.to(self.device), train_y.to(self.device)
        if holdout is not None:
            holdout = (holdout[0].to(self.device), holdout[1].to(self.device))
        self.train_x, self.train_y = train_x, train_y
        self.clone_x = train_x[train_y >= num_old]
        self.source_outputs, self.g = source_outputs, g
        self.eval_sets, self.num_old = eval_sets, num_old
        self.holdout = holdout if holdout is not None and len(holdout[1]) else None
        #: old-class images are available: L_ins arbitrates between old and new outputs
        self.arbitrate = bool((train_y < num_old).any())
        self.t_cls, self.s_cls = classifier_of(target), classifier_of(source)
        self.source_logits = extract(source, None, [self.s_cls.node])
        self.target_head = extract(target, None, [self.t_cls.input_node, self.t_cls.node])
        self.t_blocks = cut_points(target, blocks=True, verify=False)
        self._pairs: dict[
            tuple[str, ...] | None, tuple[list[tuple[CutPoint, CutPoint]], list[tuple[CutPoint, CutPoint]]]
        ] = {}
        self.s_blocks = cut_points(source, blocks=True, verify=False)
        self.grid = int(round(g.masks.shape[1] ** 0.5))
        copies = config.perturbed_copies
        copies = (0 if self.arbitrate else 1) if copies is None else copies
        self.pool = InsertionPool.build(
            train_x, train_y, copies, self.grid, config.seed, self.target_head, self.source_logits, source_outputs
        )
        self.loc_pool = LocalizationPool.build(g, config.loc_pool, config.seed)
        #: name -> a frozen prefix's activations on a pool, cached or recomputed: see :meth:`activations`
        self._activations: dict[str, FrozenActivations] = {}
        self.cache_mb = config.cache_mb
        self.holdout_frozen: tuple[Tensor, Tensor, Tensor] | None = None
        if self.holdout is not None:  # (pre-logits, target logits, direct-ensemble teacher) on held-out images
            pre, logits = batched(self.target_head, self.holdout[0])
            source = batched(self.source_logits, self.holdout[0])[:, source_outputs]
            self.holdout_frozen = (pre, logits, joint_teacher(logits, source, None))

    def activations(
        self, name: str, prefix: nn.Module, images: Callable[[Tensor], Tensor], count: int
    ) -> FrozenActivations:
        """``prefix`` (a frozen network up to a cut) on entries 0..count-1 of ``images``: cached
        once per ``name`` and kept for the whole clone (every stage of a candidate and the tuning
        of the chosen branch read it again) when it fits in what is left of ``cache_mb``, shared
        by every cached activation (the first candidates, the latest cuts with the smallest
        activations, get it); else recomputed per batch. ``images`` must not hold the context
        (a reference cycle would keep the cache alive after the clone).

        name: ``"<target|source>:<cut node>:<pool|loc|holdout>"``."""
        if name not in self._activations:
            left = max(self.cache_mb - sum(a.nbytes for a in self._activations.values()) / 2**20, 0.0)
            cached = cut_activations(prefix, images, count, left, self.device)
            self._activations[name] = FrozenActivations(prefix, images, cached)
        return self._activations[name]

    def candidates(self, names: list[str] | None) -> list[tuple[CutPoint, CutPoint]]:
        """(R, R') pairs, R from the last target block cut to the first (computed once per
        ``names``: every stage and report asks for them).

        By default, block cuts after which the source has no layer left (only pooling
        before its classifier) are skipped: there would be nothing to clone
        (:meth:`unclonable` says which)."""
        return self._candidates(names)[0]

    def unclonable(self, names: list[str] | None) -> list[str]:
        """The pairs :meth:`candidates` left out for ``names``, each with the reason."""
        return [
            f"R={r.node} <- R'={r_src.node}: the source has no layer between R' and its classifier, nothing to clone"
            for r, r_src in self._candidates(names)[1]
        ]

    def _candidates(
        self, names: list[str] | None
    ) -> tuple[list[tuple[CutPoint, CutPoint]], list[tuple[CutPoint, CutPoint]]]:
        """(kept pairs, pairs left out because R' leaves nothing to clone), once per ``names``."""
        key = None if names is None else tuple(names)
        if key not in self._pairs:
            self._pairs[key] = self._pair_cuts(names)
        return self._pairs[key]

    def _pair_cuts(
        self, names: list[str] | None
    ) -> tuple[list[tuple[CutPoint, CutPoint]], list[tuple[CutPoint, CutPoint]]]:
        if names is None:
            chosen = list(reversed(self.t_blocks))
        else:
            t_cuts = {c.node: c for c in cut_points(self.target, verify=False)}
            aliases = {"first": self.t_blocks[0].node, "last": self.t_blocks[-1].node}
            chosen = []
            for name in (aliases.get(n, n) for n in names):
                if name not in t_cuts:
                    near = difflib.get_close_matches(name, list(t_cuts), n=5, cutoff=0.3)
                    raise CutError(f"{name!r} is not a cut point of the target; nearest: {', '.join(near) or 'none'}")
                chosen.append(t_cuts[name])
        pairs = [(r, nearest_cut(r.depth, self.s_blocks)) for r in chosen]
        empty = []
        if names is None:  # M_f must hold some of the source's layers, not only its pooling
            has_layers = [bool(self.layers_after(r_src)) for _, r_src in pairs]
            empty = [pair for pair, kept in zip(pairs, has_layers, strict=True) if not kept]
            pairs = [pair for pair, kept in zip(pairs, has_layers, strict=True) if kept]
        if not pairs:
            raise CutError("no target block cut leaves source layers to clone; name cuts with candidates=[...]")
        return pairs, empty

    def layers_after(self, r_src: CutPoint) -> int:
        """Parameters of the source between R' and its pre-logits."""
        body = extract(self.source, r_src.node, [self.s_cls.input_node])
        return sum(p.numel() for p in body.parameters())


class CandidateTrainer:
    """Trains A, F_c and the masks at one (R, R') pair, stage by stage (:data:`STAGES`).

    Its whole state after a stage is :meth:`state` (tensors, with the sampling generator's
    state) and :meth:`restore` puts it back, so a stage can run in another process or after
    an interruption and give the same numbers."""

    def __init__(self, ctx: SearchContext, r: CutPoint, r_src: CutPoint, config: SearchConfig):
        self.ctx, self.r, self.r_src, self.config = ctx, r, r_src, config
        t, s = ctx.target, ctx.source
        self.t_prefix = extract(t, None, [r.node])
        self.s_prefix = extract(s, None, [r_src.node])
        self.s_body = extract(s, r_src.node, [ctx.s_cls.input_node, ctx.s_cls.node])
        self.gen = torch.Generator().manual_seed(config.seed)  # CPU: the same draws on every device
        sampler = torch.Generator().manual_seed(config.seed)
        first = torch.randperm(len(ctx.train_x), generator=sampler, device=sampler.device)[:256]
        sample = ctx.train_x[first.to(ctx.device)]
        t_cut, (t_pre, _), s_cut = (
            batched(self.t_prefix, sample),
            batched(ctx.target_head, sample),
            batched(self.s_prefix, sample),
        )
        layout = "NCHW" if r_src.layout == "NCHW" else "NLC"
        head_module = dict(self.s_body.named_modules())[ctx.s_cls.module]
        self.masked = MaskedBody(self.s_body, s_cut[:8], layout, frozen=[head_module])
        self.adapter = self.adapter_for(r, r_src, ctx.device, relu=bool((s_cut >= 0).all()))
        least_squares_init(self.adapter, t_cut, s_cut)
        self.head = ExtendedHead(
            t_pre.shape[1], ctx.s_cls.in_features, ctx.num_old, len(ctx.source_outputs), device=ctx.device
        )
        w = head_module.weight[ctx.source_outputs]
        b = head_module.bias[ctx.source_outputs] if head_module.bias is not None else None
        self.head.init_from_source(w.detach(), None if b is None else b.detach())
        self.stage, self.train_loss = "", float("nan")
        self.phase_seconds: dict[str, float] = {}
        # the frozen prefixes on the L_ins and L_loc pools, recomputed per batch until cache()
        self._cuts = FrozenActivations(self.t_prefix, partial(ctx.pool.images, ctx.train_x))
        self._loc_cuts = FrozenActivations(self.s_prefix, partial(ctx.loc_pool.images, ctx.clone_x, ctx.g))

    @staticmethod
    def adapter_for(r: CutPoint, r_src: CutPoint, device: torch.device, relu: bool = False) -> Adapter:
        """A fresh adapter from the target's activation at R to the source's at R';
        AdapterError if no adapter maps those layouts."""
        return make_adapter(
            r.shape,
            r.layout,
            r_src.shape,
            r_src.layout,
            src_prefix_tokens=r.prefix_tokens,
            dst_prefix_tokens=r_src.prefix_tokens,
            relu=relu,
            device=device,
        )

    @property
    def masks_on(self) -> bool:
        return bool(self.config.use_masks) and bool(self.masked.groups)

    # -- cached frozen activations ---------------------------------------------------
    def cache(self) -> None:
        """The target up to R on L_ins's pool and the source up to R' on L_loc's pool, from
        the context's shared cache (:meth:`SearchContext.activations`)."""
        ctx = self.ctx
        self._cuts = ctx.activations(f"target:{self.r.node}:pool", self._cuts.prefix, self._cuts.images, len(ctx.pool))
        if self.masks_on:
            loc = self._loc_cuts
            self._loc_cuts = ctx.activations(f"source:{self.r_src.node}:loc", loc.prefix, loc.images, len(ctx.loc_pool))

    # -- forward pieces --------------------------------------------------------------
    def joint_logits(self, cut: Tensor, pre: Tensor, logits: Tensor) -> Tensor:
        """The cloned network's logits (B, |T_t| + |T_s|) from the target's activation at R,
        its pre-logits (B, D) and logits (B, |T_t|)."""
        feats = self.masked(self.adapter(cut))[0]
        correction, new = self.head(pre, feats)
        return torch.cat([logits + correction, new], 1)

    def cloned_logits(self, x: Tensor) -> Tensor:
        """The cloned network with this candidate's branch on images x: (B, |T_t| + |T_s|)."""
        with torch.no_grad():
            cut, (pre, logits) = self.t_prefix(x), self.ctx.target_head(x)
        return self.joint_logits(cut, pre, logits)

    def loss_ins(self, entries: Tensor) -> Tensor:
        """L_ins (Eq. 7) on L_ins pool ``entries`` (B,)."""
        pool = self.ctx.pool
        logits = self.joint_logits(self._cuts(entries), pool.pre[entries], pool.logits[entries])
        y = pool.labels[entries]
        teacher = joint_teacher(pool.logits[entries], pool.source[entries], y if self.ctx.arbitrate else None)
        loss = kd_loss(logits, teacher, self.config.temperature)
        if self.ctx.arbitrate:
            loss = loss + self.config.ce_weight * F.cross_entropy(logits, y)
        return loss

    def loss_loc(self, entries: Tensor) -> Tensor:
        """Eq. 5 on L_loc pool ``entries`` (B,): relative squared error between the masked
        source's T_s logits and G."""
        ctx = self.ctx
        target = ctx.loc_pool.targets[entries]
        pred = self.masked(self._loc_cuts(entries))[1][:, ctx.source_outputs]
        return ((pred - target) ** 2).sum() / (target**2).sum().clamp_min(1e-8)

    @torch.no_grad()
    def holdout_logits(self) -> Tensor:
        """The cloned network's logits (M, K) on the held-out clean images: the same images
        and teacher for every R, so their metrics are on one scale (:func:`holdout_metrics`)."""
        batches = holdout_batches(self.ctx, self.r.node, self.t_prefix)
        return torch.cat([self.joint_logits(cut, pre, logits) for cut, pre, logits in batches])

    def selection_loss(self, holdout: dict[str, float]) -> float:
        """Held-out error with old-class images, held-out KD without; the training loss
        when nothing is held out."""
        if not holdout:
            return self.train_loss
        return 1.0 - holdout["acc"] if self.ctx.arbitrate else holdout["kd"]

    # -- phases ----------------------------------------------------------------------
    def run_phase(self, phase: str, epochs: int, tick: Callable[[], None]) -> float:
        """Train for ``epochs``; return the mean training loss (L_ins + L_loc) of the last epoch."""
        cfg, ctx, gen = self.config, self.ctx, self.gen
        start = time.perf_counter()
        params = {
            "localize": list(self.masked.logits.parameters()),
            "joint": list(self.adapter.parameters())
            + list(self.head.parameters())
            + list(self.masked.logits.parameters()),
            "binary": list(self.adapter.parameters()) + list(self.head.parameters()),
        }[phase]
        opt = adam(params, lr=cfg.lr)
        n, last = len(ctx.pool), float("nan")
        steps = self.steps_per_epoch()
        with_loc = bool(cfg.use_masks) and phase != "binary"  # binary masks: L_loc has no gradient left
        for epoch in range(epochs):
            draws = math.ceil(steps * cfg.batch_size / n)  # seeded on the CPU generator, then moved
            order = torch.cat([torch.randperm(n, generator=gen, device=gen.device) for _ in range(draws)])
            order = order.to(ctx.device)
            total, seen = 0.0, 0
            for step in range(steps):
                entries = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
                # L_loc and L_ins pass different images through the branch: each term is
                # backpropagated as soon as it is computed, so only one graph is alive at a time
                opt.zero_grad(set_to_none=True)
                measured = torch.zeros((), device=ctx.device)
                if with_loc:
                    drawn = torch.randint(len(ctx.loc_pool), (len(entries),), generator=gen, device=gen.device)
                    loc = self.loss_loc(drawn.to(ctx.device))
                    term = (1.0 if phase == "localize" else cfg.loc_weight) * loc
                    if phase != "binary":
                        term = term + cfg.keep_weight * self.masked.keep_penalty(cfg.mask_ratio)
                    self._backward(term, phase, epoch, step)
                    measured = term.detach() if phase == "localize" else cfg.loc_weight * loc.detach()
                if phase != "localize":
                    ins = self.loss_ins(entries)
                    self._backward(ins, phase, epoch, step)
                    measured = measured + ins.detach()
                opt.step()
                total += float(measured.detach()) * len(entries)
                seen += len(entries)
                tick()
            last = total / seen
        self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + time.perf_counter() - start
        return last

    def _backward(self, loss: Tensor, phase: str, epoch: int, step: int) -> None:
        self.check_finite(loss, phase, epoch, step)
        if loss.requires_grad:
            loss.backward()

    def check_finite(self, loss: Tensor, phase: str, epoch: int, step: int) -> None:
        """TrainingError if ``loss`` is NaN/Inf (the candidates finished before stay checkpointed)."""
        if not bool(torch.isfinite(loss).all()):
            raise TrainingError(
                f"candidate R={self.r.node} <- R'={self.r_src.node}: the {phase} loss became "
                f"{float(loss.detach().reshape(-1)[0])} at epoch {epoch + 1}, step {step + 1}; lower the "
                "learning rate or check the images and the target/source weights for NaN/Inf (the candidates "
                "finished before are checkpointed and a rerun resumes from them)"
            )

    def run_stage(self, stage: str, tick: Callable[[], None] = lambda: None) -> CandidateResult:
        """Run ``stage`` (the next one of :data:`STAGES`) and measure the candidate."""
        expected = STAGES[STAGES.index(self.stage) + 1] if self.stage else STAGES[0]
        if stage != expected:
            raise RuntimeError(f"pnc bug: stage {stage!r} run after {self.stage or 'nothing'!r}")
        cfg = self.config
        self.cache()
        self.adapter.train()
        self.head.train()
        if stage == "search":
            if self.masks_on:
                self.masked.mode = "soft"
                self.run_phase("localize", cfg.loc_epochs, tick)
            else:
                self.masked.binarize(1.0)
            self.train_loss = self.run_phase("joint", cfg.joint_epochs, tick)
        else:
            if self.masks_on:
                self.masked.binarize(cfg.mask_ratio, cfg.mask_scope)
            self.train_loss = self.run_phase("binary", cfg.binary_epochs, tick)
        self.adapter.eval()
        self.head.eval()
        self.stage = stage
        return self.result()

    def result(self) -> CandidateResult:
        """This candidate as it stands after its last stage (``tensors``: its branch, with the
        masks binarized as they would be if it stopped here)."""
        start = time.perf_counter()
        holdout, losses = {}, None
        if self.ctx.holdout is not None:
            logits = self.holdout_logits()
            holdout = holdout_metrics(self.ctx, logits, self.config.temperature)
            losses = selection_losses(self.ctx, logits, self.config.temperature)
        keep = self.binary_keep()
        self.phase_seconds["holdout"] = self.phase_seconds.get("holdout", 0.0) + time.perf_counter() - start
        return CandidateResult(
            target_cut=self.r.node,
            source_cut=self.r_src.node,
            loss=self.selection_loss(holdout),
            accuracy={},
            kept_fraction=sum(len(k) for k in keep.values()) / max(sum(g.size for g in self.masked.groups), 1),
            seconds=sum(self.phase_seconds.values()),
            adapter_spec=asdict(self.adapter.spec),
            train_loss=self.train_loss,
            holdout=holdout,
            stage=self.stage,
            phase_seconds=dict(self.phase_seconds),
            tensors=branch_tensors(keep, self.adapter, self.head),
            holdout_losses=losses,
        )

    def binary_keep(self) -> dict[str, Tensor]:
        """Kept channels per group: the binary masks, or those binarizing the soft ones would give."""
        if self.masked.mode == "binary":
            return self.masked.keep()
        keep = self.masked.binarize(self.config.mask_ratio, self.config.mask_scope)
        self.masked.mode, self.masked.binary = "soft", {}
        return keep

    # -- state -----------------------------------------------------------------------
    def state(self) -> dict[str, Tensor]:
        """Everything needed to continue: A, F_c, the mask logits and binary masks, and the
        sampling generator (as ``rng``)."""
        tensors = branch_tensors(self.masked.keep(), self.adapter, self.head)
        tensors |= {f"mask_logits.{k}": v.detach().clone() for k, v in self.masked.logits.items()}
        return tensors | {"rng": self.gen.get_state()}

    def restore(self, tensors: dict[str, Tensor], result: CandidateResult) -> None:
        """Put back a :meth:`state` saved after ``result.stage``."""
        self.adapter.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("adapter.")})
        self.head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
        with torch.no_grad():
            for k, v in tensors.items():
                if k.startswith("mask_logits."):
                    self.masked.logits[k[12:]].copy_(v)
        keep = {k[5:]: v for k, v in tensors.items() if k.startswith("keep.")}
        if keep or not self.masks_on:
            every = {g.name: torch.arange(g.size, device=self.ctx.device) for g in self.masked.groups}
            self.masked.set_keep(keep if self.masks_on else every)
        else:
            self.masked.mode = "soft"
        self.gen.set_state(tensors["rng"])
        self.stage, self.train_loss = result.stage, result.train_loss
        self.phase_seconds = dict(result.phase_seconds)
        self.adapter.eval()
        self.head.eval()

    def accuracy(self) -> dict[str, float]:
        """Ori / Tar / Avg of this candidate on the eval sets (reported, never used to select)."""
        return eval_accuracy(self.ctx.eval_sets, self.cloned_logits)

    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.ctx, self.config)

    def stage_steps(self, stage: str) -> int:
        """Optimizer steps of ``stage``."""
        cfg = self.config
        if stage == "binary":
            epochs = cfg.binary_epochs
        else:
            epochs = cfg.joint_epochs + (cfg.loc_epochs if self.masks_on else 0)
        return epochs * self.steps_per_epoch()


@torch.no_grad()
def eval_accuracy(
    eval_sets: dict[str, tuple[Tensor, Tensor]], logits_of: Callable[[Tensor], Tensor]
) -> dict[str, float]:
    """Accuracy of ``logits_of`` (x (B, C, H, W) -> cloned logits (B, K)) on each eval set
    (name -> (x (M, C, H, W), y (M,))), :data:`CHUNK` images at a time."""
    out = {}
    for name, (x, y) in eval_sets.items():
        pred = torch.cat([logits_of(xb).argmax(1) for xb in x.split(CHUNK)])
        out[name] = float((pred == y).float().mean())
    return out


def holdout_batches(ctx: SearchContext, node: str, prefix: nn.Module) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """The held-out images, :data:`CHUNK` at a time, one chunk alive at a time: the target's
    activation at cut ``node`` (read from the context's cache when it fits, else computed), its
    pre-logits (B, D) and its logits (B, |T_t|)."""
    assert ctx.holdout is not None and ctx.holdout_frozen is not None
    x = ctx.holdout[0]
    pre, logits, _ = ctx.holdout_frozen
    activations = ctx.activations(f"target:{node}:holdout", prefix, x.__getitem__, len(x))
    rows = torch.arange(len(x), device=x.device).split(CHUNK)
    for entries, p, lg in zip(rows, pre.split(CHUNK), logits.split(CHUNK), strict=True):
        yield activations(entries), p, lg


def steps_per_epoch(ctx: SearchContext, config: SearchConfig) -> int:
    """Optimizer steps of one epoch of the search: one pass over the clone classes' training
    images (or every training image, ``config.epoch_images="available"``), at least
    ``min_steps_per_epoch``."""
    if config.epoch_images not in ("available", "clone"):
        raise ValueError(f"epoch_images must be 'available' or 'clone', got {config.epoch_images!r}")
    images = ctx.train_x if config.epoch_images == "available" else ctx.clone_x
    return max(math.ceil(len(images) / config.batch_size), config.min_steps_per_epoch)


def build_branch(
    ctx: SearchContext, result: CandidateResult, *, classes: list[str], source_name: str = "", source_sha256: str = ""
) -> Branch:
    """The final branch of a candidate: structurally pruned M_f, its A and F_c."""
    return assemble_branch(
        ctx.source,
        ctx.clone_x[:8],
        result.tensors,
        source_cut=result.source_cut,
        adapter_spec=result.adapter_spec,
        target_cut=result.target_cut,
        classes=classes,
        source_outputs=ctx.source_outputs,
        source_name=source_name,
        source_sha256=source_sha256,
    )
