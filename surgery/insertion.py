"""Localization and insertion search (Eq. 5-8): learn M, A and F_c at each candidate R.

At each candidate target cut R (block-level cuts, last to first) and its source cut R'
(the source block cut at the nearest relative depth):

1. *localize* (Eq. 5): soft masks on the source's channel groups after R' are trained so
   that the masked source's T_s logits on perturbed images match the local models G,
   under the channel budget;
2. *joint* (Eq. 8): adapter A, head F_c and the masks together, L_loc + L_ins;
3. *binary*: the masks are binarized to the top-c channels per group and A, F_c are
   trained on with them; the mean loss of this last epoch is R's converged loss.

L_ins (Eq. 7) is a KL at temperature T between the cloned network's joint logits
[old, new] (B, |T_t| + |T_s|) and a teacher built per image, on the same perturbed image:

* with images of the target's classes available (the paper's setting), it *arbitrates*:
  on an old-class image the teacher is [target logits, -inf], on a clone-class image
  [-inf, source logits of T_s], so the new outputs lose on old images and the old
  outputs lose on clone images; plus ``ce_weight`` x cross-entropy on the joint labels.
  F_c (reading the target's pre-logits and the branch features) learns the arbitration;
* with clone-class images only (old fraction 0), the teacher is [target logits, source
  logits of T_s] on every image (the direct ensemble): a loss on the new classes alone
  cannot win, because the old-class term holds the target's behaviour in place.

R is selected on a held-out share of the available images (never the test set), by a
criterion on one scale for every cut: held-out joint error (ties: held-out cross-entropy)
when old-class images exist, else the held-out KD loss to the ensemble teacher on clean
images. Each R's result is checkpointed, so an interrupted search resumes and ends with
the same answer. With old-class images, :func:`tune_branch` then fine-tunes the chosen,
pruned branch (A, its own copy of M_f, F_c) with the same L_ins, and keeps the result only
if the held-out error falls; the target and the source are never trained.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load
from torch import Tensor

from pnc.adapters import AdapterError, least_squares_init, make_adapter
from pnc.surgery.branch import Branch, ExtendedHead, assemble_branch, branch_tensors
from pnc.surgery.channel_groups import MaskedBody
from pnc.surgery.cuts import CutPoint, classifier_of, cut_points
from pnc.surgery.errors import CutError, TrainingError
from pnc.surgery.io import save_tensors
from pnc.surgery.local_models import LocalModelSet, occlude
from pnc.surgery.splitting import extract
from pnc.surgery.tracing import TracedModel


@dataclass
class SearchConfig:
    """Settings of the localization + insertion search (defaults: the paper's, scaled to CPU).

    An epoch is a pass over the clone set with fresh perturbations, and at least
    ``min_steps_per_epoch`` batches (tiny clone sets are cycled).
    ``mask_ratio`` is the kept fraction c/|W| per group (``mask_scope="global"``: of all
    maskable channels); ``use_masks=False`` is the "w/o Local" ablation (every channel
    kept) and ``candidates`` fixes the target cuts to try (["first"] is "w/o Insert").
    ``holdout`` is the share of the available images (per class) kept out of training to
    select R; ``ce_weight`` weighs L_ins's cross-entropy when old-class images are given.
    ``tune_epochs`` / ``tune_lr``: with old-class images, the chosen branch's A, its pruned
    copy of M_f and F_c are then fine-tuned with L_ins (Adam, cosine schedule; the target
    stays frozen), kept only if the held-out error falls; 0 epochs: never.
    ``clean_fraction``: the share of unperturbed images in L_ins's batches; None: 1 with
    old-class images (measured best there), 0.25 without (L_ins then distils to the
    source on perturbed images, and the perturbation helped).
    """

    mask_ratio: float = 0.5
    mask_scope: str = "group"
    use_masks: bool = True
    loc_epochs: int = 2
    joint_epochs: int = 3
    binary_epochs: int = 3
    lr: float = 3e-3
    batch_size: int = 64
    temperature: float = 2.0
    loc_weight: float = 1.0
    keep_weight: float = 1.0
    clean_fraction: float | None = None
    min_steps_per_epoch: int = 25
    candidates: list[str] | None = None
    holdout: float = 0.2
    ce_weight: float = 1.0
    tune_epochs: int = 6
    tune_lr: float = 3e-3
    seed: int = 0

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass
class CandidateResult:
    """What one candidate R gave: its selection ``loss`` (the held-out criterion, lower is
    better; the last epoch's training loss when nothing is held out), held-out metrics,
    test accuracies (reported, never used to select) and learned parts."""

    target_cut: str
    source_cut: str
    loss: float
    accuracy: dict[str, float]
    kept_fraction: float
    seconds: float
    adapter_spec: dict
    train_loss: float = float("nan")
    holdout: dict[str, float] = field(default_factory=dict)
    tensors: dict[str, Tensor] = field(repr=False, default_factory=dict)

    def summary(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "tensors"}


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
    train, held = [torch.zeros(0, dtype=torch.int64)], [torch.zeros(0, dtype=torch.int64)]
    for label in labels.unique(sorted=True).tolist():
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=gen)]
        k = min(round(share * len(members)), len(members) - 1)
        held.append(members[:k])
        train.append(members[k:])
    return torch.cat(train).sort().values, torch.cat(held).sort().values


def random_occlusion_masks(n: int, cells: int, clean_fraction: float, gen: torch.Generator) -> Tensor:
    """(n, cells) occlusion masks: a ``clean_fraction`` keeps everything, the rest keep each cell
    with a per-image probability drawn from U(0.1, 1)."""
    keep = 0.1 + 0.9 * torch.rand(n, 1, generator=gen)
    masks = (torch.rand(n, cells, generator=gen) < keep).float()
    masks[: int(round(clean_fraction * n))] = 1.0
    return masks


class SearchContext:
    """Everything the candidates share: traced networks, training images, G, eval sets.

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
    ):
        self.target, self.source = target, source
        self.train_x, self.train_y = train_x, train_y
        self.clone_x = train_x[train_y >= num_old]
        self.source_outputs, self.g = source_outputs, g
        self.eval_sets, self.num_old = eval_sets, num_old
        self.holdout = holdout if holdout is not None and len(holdout[1]) else None
        #: old-class images are available: L_ins arbitrates between old and new outputs
        self.arbitrate = bool((train_y < num_old).any())
        self.t_cls, self.s_cls = classifier_of(target), classifier_of(source)
        self.source_logits = extract(source, None, [self.s_cls.node])
        self.target_logits = extract(target, None, [self.t_cls.node])
        self.t_blocks = cut_points(target, blocks=True, verify=False)
        self.s_blocks = cut_points(source, blocks=True, verify=False)
        self.grid = int(round(g.masks.shape[1] ** 0.5))

    @torch.no_grad()
    def teacher(self, target_logits: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """L_ins's teacher (B, |T_t| + |T_s|) for images x with joint labels y (B,), given the
        target's logits on them (B, |T_t|): :func:`joint_teacher`, per image when arbitrating."""
        new = self.source_logits(x)[:, self.source_outputs]
        return joint_teacher(target_logits, new, y if self.arbitrate else None)

    @torch.no_grad()
    def holdout_metrics(self, logits_fn: Callable[[Tensor], Tensor], temperature: float) -> dict[str, float]:
        """Of a cloned network's ``logits_fn`` (B, C, H, W) -> (B, K) on the held-out clean
        images: joint accuracy, cross-entropy and the KD loss to the direct-ensemble teacher
        (the same images and teacher for every R, so comparable across cuts)."""
        assert self.holdout is not None, "holdout_metrics needs held-out images"
        x, y = self.holdout
        logits = torch.cat([logits_fn(xb) for xb in x.split(512)])
        ensemble = torch.cat(
            [
                joint_teacher(self.target_logits(xb), self.source_logits(xb)[:, self.source_outputs], None)
                for xb in x.split(512)
            ]
        )
        return {
            "acc": float((logits.argmax(1) == y).float().mean()),
            "ce": float(F.cross_entropy(logits, y)),
            "kd": float(kd_loss(logits, ensemble, temperature)),
            "images": len(y),
        }

    def candidates(self, names: list[str] | None) -> list[tuple[CutPoint, CutPoint]]:
        """(R, R') pairs, R from the last target block cut to the first.

        By default, block cuts after which the source has no layer left (only pooling
        before its classifier) are skipped: there would be nothing to clone."""
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
        if names is None:  # M_f must hold some of the source's layers, not only its pooling
            pairs = [(r, r_src) for r, r_src in pairs if self.layers_after(r_src)]
        if not pairs:
            raise CutError("no target block cut leaves source layers to clone; name cuts with candidates=[...]")
        return pairs

    def layers_after(self, r_src: CutPoint) -> int:
        """Parameters of the source between R' and its pre-logits."""
        body = extract(self.source, r_src.node, [self.s_cls.input_node])
        return sum(p.numel() for p in body.parameters())


class CandidateTrainer:
    """Trains A, F_c and the masks at one (R, R') pair."""

    def __init__(self, ctx: SearchContext, r: CutPoint, r_src: CutPoint, config: SearchConfig):
        self.ctx, self.r, self.r_src, self.config = ctx, r, r_src, config
        t, s = ctx.target, ctx.source
        self.taps = extract(t, None, [r.node, ctx.t_cls.input_node, ctx.t_cls.node])
        self.s_prefix = extract(s, None, [r_src.node])
        self.s_body = extract(s, r_src.node, [ctx.s_cls.input_node, ctx.s_cls.node])
        gen = torch.Generator().manual_seed(config.seed)
        sample = ctx.train_x[torch.randperm(len(ctx.train_x), generator=gen)[:256]]
        with torch.no_grad():
            t_cut, t_pre, _ = self.taps(sample)
            s_cut = self.s_prefix(sample)
        layout = "NCHW" if r_src.layout == "NCHW" else "NLC"
        head_module = dict(self.s_body.named_modules())[ctx.s_cls.module]
        self.masked = MaskedBody(self.s_body, s_cut[:8], layout, frozen=[head_module])
        self.adapter = make_adapter(
            r.shape,
            r.layout,
            r_src.shape,
            r_src.layout,
            src_prefix_tokens=r.prefix_tokens,
            dst_prefix_tokens=r_src.prefix_tokens,
            relu=bool((s_cut >= 0).all()),
        )
        least_squares_init(self.adapter, t_cut, s_cut)
        self.head = ExtendedHead(t_pre.shape[1], ctx.s_cls.in_features, ctx.num_old, len(ctx.source_outputs))
        w = head_module.weight[ctx.source_outputs]
        b = head_module.bias[ctx.source_outputs] if head_module.bias is not None else None
        self.head.init_from_source(w.detach(), None if b is None else b.detach())

    @property
    def clean_fraction(self) -> float:
        if self.config.clean_fraction is not None:
            return self.config.clean_fraction
        return 1.0 if self.ctx.arbitrate else 0.25

    # -- forward pieces --------------------------------------------------------------
    def cloned_logits(self, x: Tensor) -> Tensor:
        """The cloned network with this candidate's branch: (B, |T_t| + |T_s|)."""
        with torch.no_grad():
            cut, pre, logits = self.taps(x)
        feats = self.masked(self.adapter(cut))[0]
        correction, new = self.head(pre, feats)
        return torch.cat([logits + correction, new], 1)

    @torch.no_grad()
    def teacher(self, x: Tensor, y: Tensor) -> Tensor:
        """(B, |T_t| + |T_s|) teacher logits of L_ins for images x with joint labels y (B,):
        [target, source T_s] without old-class images, else the losing side set to -inf."""
        return self.ctx.teacher(self.taps(x)[2], x, y)

    def loss_ins(self, x: Tensor, y: Tensor) -> Tensor:
        """L_ins (Eq. 7) on images x (B, C, H, W) with joint labels y (B,)."""
        logits = self.cloned_logits(x)
        loss = kd_loss(logits, self.teacher(x, y), self.config.temperature)
        if self.ctx.arbitrate:
            loss = loss + self.config.ce_weight * F.cross_entropy(logits, y)
        return loss

    def holdout_metrics(self) -> dict[str, float]:
        """This candidate's :meth:`SearchContext.holdout_metrics`."""
        return self.ctx.holdout_metrics(self.cloned_logits, self.config.temperature)

    def selection_loss(self, holdout: dict[str, float], train_loss: float) -> float:
        """Held-out error with old-class images, held-out KD without; the training loss
        when nothing is held out."""
        if not holdout:
            return train_loss
        return 1.0 - holdout["acc"] if self.ctx.arbitrate else holdout["kd"]

    def loss_loc(self, rows: Tensor, mask_ids: Tensor) -> Tensor:
        """Eq. 5: relative squared error between the masked source's T_s logits and G."""
        g = self.ctx.g
        x = occlude(self.ctx.clone_x[g.index[rows]], g.masks[mask_ids])
        with torch.no_grad():
            cut = self.s_prefix(x)
            target = g.predict(g.masks[mask_ids], which=rows)
        pred = self.masked(cut)[1][:, self.ctx.source_outputs]
        return ((pred - target) ** 2).sum() / (target**2).sum().clamp_min(1e-8)

    # -- phases ----------------------------------------------------------------------
    def run_phase(self, phase: str, epochs: int, gen: torch.Generator, tick) -> float:
        """Train for ``epochs``; return the mean selection loss of the last epoch."""
        cfg, ctx = self.config, self.ctx
        params = {
            "localize": list(self.masked.logits.parameters()),
            "joint": list(self.adapter.parameters())
            + list(self.head.parameters())
            + list(self.masked.logits.parameters()),
            "binary": list(self.adapter.parameters()) + list(self.head.parameters()),
        }[phase]
        opt = torch.optim.Adam(params, lr=cfg.lr)
        n, last = len(ctx.train_x), float("nan")
        steps = self.steps_per_epoch()
        for epoch in range(epochs):
            order = torch.cat([torch.randperm(n, generator=gen) for _ in range(math.ceil(steps * cfg.batch_size / n))])
            total, seen = 0.0, 0
            for step in range(steps):
                rows = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
                g_rows = torch.randint(len(ctx.g.index), (len(rows),), generator=gen)
                g_masks = torch.randint(ctx.g.masks.shape[0], (len(rows),), generator=gen)
                loc = self.loss_loc(g_rows, g_masks) if cfg.use_masks else torch.zeros(())
                if phase == "localize":
                    loss = loc + cfg.keep_weight * self.masked.keep_penalty(cfg.mask_ratio)
                    selection = loss
                else:
                    masks = random_occlusion_masks(len(rows), self.ctx.grid**2, self.clean_fraction, gen)
                    ins = self.loss_ins(occlude(ctx.train_x[rows], masks), ctx.train_y[rows])
                    selection = ins + cfg.loc_weight * loc.detach()
                    loss = ins + cfg.loc_weight * loc
                    if phase == "joint" and cfg.use_masks:
                        loss = loss + cfg.keep_weight * self.masked.keep_penalty(cfg.mask_ratio)
                self.check_finite(loss, phase, epoch, step)
                opt.zero_grad(set_to_none=True)
                if loss.requires_grad:
                    loss.backward()
                    opt.step()
                total += float(selection.detach()) * len(rows)
                seen += len(rows)
                tick()
            last = total / seen
        return last

    def check_finite(self, loss: Tensor, phase: str, epoch: int, step: int) -> None:
        """TrainingError if ``loss`` is NaN/Inf (the candidates finished before stay checkpointed)."""
        if not bool(torch.isfinite(loss).all()):
            raise TrainingError(
                f"candidate R={self.r.node} <- R'={self.r_src.node}: the {phase} loss became "
                f"{float(loss.detach().reshape(-1)[0])} at epoch {epoch + 1}, step {step + 1}; lower the "
                "learning rate or check the images and the target/source weights for NaN/Inf (the candidates "
                "finished before are checkpointed and a rerun resumes from them)"
            )

    def train(self, tick) -> CandidateResult:
        cfg = self.config
        start = time.perf_counter()
        gen = torch.Generator().manual_seed(cfg.seed)
        self.adapter.train()
        self.head.train()
        if cfg.use_masks and self.masked.groups:
            self.masked.mode = "soft"
            self.run_phase("localize", cfg.loc_epochs, gen, tick)
            self.run_phase("joint", cfg.joint_epochs, gen, tick)
            self.masked.binarize(cfg.mask_ratio, cfg.mask_scope)
        else:
            self.masked.binarize(1.0)
            self.run_phase("joint", cfg.joint_epochs, gen, tick)
        train_loss = self.run_phase("binary", cfg.binary_epochs, gen, tick)
        self.adapter.eval()
        self.head.eval()
        holdout = self.holdout_metrics() if self.ctx.holdout is not None else {}
        tensors = branch_tensors(self.masked.keep(), self.adapter, self.head)
        return CandidateResult(
            target_cut=self.r.node,
            source_cut=self.r_src.node,
            loss=self.selection_loss(holdout, train_loss),
            accuracy=self.accuracy(),
            kept_fraction=self.masked.kept_fraction(),
            seconds=time.perf_counter() - start,
            adapter_spec=asdict(self.adapter.spec),
            train_loss=train_loss,
            holdout=holdout,
            tensors=tensors,
        )

    @torch.no_grad()
    def accuracy(self) -> dict[str, float]:
        """Ori / Tar / Avg of this candidate (reported, never used to select)."""
        out = {}
        for name, (x, y) in self.ctx.eval_sets.items():
            pred = torch.cat([self.cloned_logits(xb).argmax(1) for xb in x.split(512)])
            out[name] = float((pred == y).float().mean())
        return out

    def steps_per_epoch(self) -> int:
        return max(math.ceil(len(self.ctx.train_x) / self.config.batch_size), self.config.min_steps_per_epoch)

    def steps(self) -> int:
        cfg = self.config
        epochs = cfg.joint_epochs + cfg.binary_epochs + (cfg.loc_epochs if cfg.use_masks and self.masked.groups else 0)
        return epochs * self.steps_per_epoch()


def tune_branch(ctx: SearchContext, branch: Branch, config: SearchConfig) -> dict:
    """Fine-tune a built branch (A, the pruned copy M_f, F_c) with L_ins on the training
    images, the target frozen; keep the result only if the held-out error falls.

    Returns {"before": held-out metrics, "after": held-out metrics, "kept": bool, "epochs"}."""
    taps = extract(ctx.target, None, [branch.target_cut, ctx.t_cls.input_node, ctx.t_cls.node])

    def logits_fn(x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, C, H, W) -> (cloned logits (B, K), the target's own logits (B, |T_t|))."""
        with torch.no_grad():
            cut, pre, logits = taps(x)
        correction, new = branch(cut, pre)
        return torch.cat([logits + correction, new], 1), logits

    branch.eval()
    before = ctx.holdout_metrics(lambda x: logits_fn(x)[0], config.temperature)
    saved = {k: v.clone() for k, v in branch.state_dict().items()}
    branch.body.requires_grad_(True)
    params = [p for p in branch.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=config.tune_lr)
    n, gen = len(ctx.train_x), torch.Generator().manual_seed(config.seed)
    steps = config.tune_epochs * math.ceil(n / config.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    branch.train()
    for _ in range(config.tune_epochs):
        for rows in torch.randperm(n, generator=gen).split(config.batch_size):
            x, y = ctx.train_x[rows], ctx.train_y[rows]
            logits, target_logits = logits_fn(x)
            loss = kd_loss(logits, ctx.teacher(target_logits, x, y), config.temperature)
            loss = loss + config.ce_weight * F.cross_entropy(logits, y)
            if not bool(torch.isfinite(loss).all()):
                raise TrainingError(
                    f"fine-tuning the branch at {branch.target_cut}: the loss became {float(loss.detach())}; lower the "
                    "tuning learning rate or check the images for NaN/Inf (the candidate search is checkpointed "
                    "and a rerun resumes from it)"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
    branch.body.requires_grad_(False)
    branch.eval()
    after = ctx.holdout_metrics(lambda x: logits_fn(x)[0], config.temperature)
    kept = after["acc"] > before["acc"]
    if kept:
        branch.body.tuned = True
    else:
        branch.load_state_dict(saved)
    return {"before": before, "after": after, "kept": kept, "epochs": config.tune_epochs}


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


def _save_result(path: Path, result: CandidateResult, key: str) -> None:
    save_tensors(path, result.tensors, metadata={"key": key, "result": json.dumps(result.summary())})


def _load_result(path: Path, key: str) -> CandidateResult | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata()
        if meta.get("key") != key:
            return None
        return CandidateResult(**json.loads(meta["result"]), tensors=load(path.read_bytes()))
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None  # a corrupt or foreign checkpoint: recompute that candidate


def search(
    ctx: SearchContext,
    config: SearchConfig,
    *,
    run_key: str = "",
    checkpoint_dir: Path | None = None,
    progress: bool = True,
) -> tuple[CandidateResult, list[CandidateResult], list[str]]:
    """Train every candidate R (last block to first); return (best, all trained, skipped) by
    the least selection loss (ties: the least held-out cross-entropy, then the later cut).

    A candidate pair whose layouts no adapter maps (e.g. a flat NC target cut against a
    ViT's token cut) is skipped with its reason, never aborting the search; CutError if
    every pair is skipped."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    pairs = ctx.candidates(config.candidates)
    key = hashlib.sha256((run_key + config.key()).encode()).hexdigest()
    results, skipped = [], []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
        for i, (r, r_src) in enumerate(pairs):
            path = None if checkpoint_dir is None else Path(checkpoint_dir) / f"candidate-{i}-{r.node}.safetensors"
            done = _load_result(path, key) if path is not None and path.exists() else None
            if done is None:
                torch.manual_seed(config.seed + i)
                try:
                    trainer = CandidateTrainer(ctx, r, r_src, config)
                except AdapterError as err:
                    skipped.append(f"R={r.node} <- R'={r_src.node}: {err}")
                    continue
                task = bar.add_task(f"R={r.node} <- R'={r_src.node}", total=trainer.steps())
                done = trainer.train(functools.partial(bar.advance, task))
                if path is not None:
                    _save_result(path, done, key)
            results.append(done)
    if not results:
        raise CutError(
            f"no candidate pair of cuts can be bridged by an adapter ({'; '.join(skipped)}); "
            "name target cuts whose layout an adapter maps with SearchConfig(candidates=[...])"
        )
    best = min(results, key=lambda res: (res.loss, res.holdout.get("ce", 0.0)))
    return best, results, skipped
