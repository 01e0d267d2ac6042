"""Fine-tuning the chosen branch (A, its pruned copy of M_f, F_c) with L_ins, after R is chosen.

The search trains every candidate briefly; the one chosen branch is then tuned for
``SearchConfig.tune_epochs`` passes over every available image, the target frozen, and
the result is kept only if the held-out accuracy rises (with ``tune_epochs_choices``, the
best of several lengths from the same start). The copy of M_f trains with its BatchNorm
layers on batch statistics (``tune_bn_train``; :func:`train_mode`). Needs old-class images
(the arbitrating L_ins, :mod:`pnc.surgery.insertion`).

On the CPU the branch tunes in ``torch.channels_last`` (:func:`channels_last`): a pruned
copy's thin convolutions (8 channels at 28 px on a 50%-pruned ResNetC-20) run about twice
as fast in it as in NCHW (``benchmarks/results/thin_conv_speed.md``); the branch's tensors
are contiguous again when the tuning ends (saved files need it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pnc.surgery.branch import Branch
from pnc.surgery.devices import adam
from pnc.surgery.errors import TrainingError
from pnc.surgery.insertion import (
    SearchConfig,
    SearchContext,
    holdout_batches,
    holdout_metrics,
    joint_teacher,
    kd_loss,
)
from pnc.surgery.splitting import extract

__all__ = ["augment", "channels_last", "train_mode", "tune_branch"]


@contextmanager
def channels_last(module: nn.Module, device: torch.device) -> Iterator[Callable[[Tensor], Tensor]]:
    """``module``'s 4-D weights in ``torch.channels_last`` while the block runs, on the CPU
    (elsewhere nothing changes), and contiguous again after it. Yields the matching input
    conversion: (B, C, H, W) -> the same values channels-last; other ranks as they are."""
    if device.type != "cpu":
        yield lambda x: x
        return
    module.to(memory_format=torch.channels_last)
    try:
        yield lambda x: x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
    finally:
        module.to(memory_format=torch.contiguous_format)


def augment(x: Tensor, shift: int, flip: bool, gen: torch.Generator, pad: str = "replicate") -> Tensor:
    """Images (B, C, H, W) each translated by a seeded offset in [-shift, shift] per axis
    (edges filled by ``F.pad`` mode ``pad``: replicated, or ``"constant"`` zeros) and, with
    ``flip``, mirrored left-right with probability 1/2."""
    b, _, h, w = x.shape
    if shift > 0:
        padded = F.pad(x, (shift,) * 4, mode=pad)
        dy, dx = (torch.randint(0, 2 * shift + 1, (2, b), generator=gen, device=gen.device)).to(x.device)
        rows = (torch.arange(h, device=x.device) + dy[:, None])[:, :, None]  # (B, H, 1)
        cols = (torch.arange(w, device=x.device) + dx[:, None])[:, None, :]  # (B, 1, W)
        x = padded[torch.arange(b, device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    if flip:
        mirrored = (torch.rand(b, generator=gen, device=gen.device) < 0.5).to(x.device)
        x = torch.where(mirrored[:, None, None, None], x.flip(3), x)
    return x.contiguous()


def train_mode(branch: Branch, batch_stats: bool) -> Branch:
    """``branch`` in training mode for its tuning: A and F_c train; the copy of M_f stays in
    eval mode, but with ``batch_stats`` its BatchNorm layers normalize each batch with its
    own statistics and track them in their running statistics (the copy's: the source's
    never move). ``branch.eval()`` ends it."""
    branch.train()
    if batch_stats:
        for module in branch.body.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.train()
    return branch


def tune_branch(
    ctx: SearchContext, branch: Branch, config: SearchConfig, tick: Callable[[int], None] = lambda n: None
) -> dict:
    """Fine-tune a built branch (A, the pruned copy M_f, F_c) with L_ins on the training
    images (clean; ``tune_epochs`` passes over all of them), the target frozen; keep the
    result only if the held-out error falls. With ``tune_epochs_choices`` every length is
    tried from the same start and the one with the best held-out accuracy is the result
    (ties: the shorter). ``tick(total)`` is called once with the step count, then
    ``tick(0)`` per step (for a progress bar).

    Returns {"before": held-out metrics, "after": held-out metrics, "kept": bool, "epochs"
    (the length kept), "seconds"} and, with choices, "tried" (length -> held-out accuracy)."""
    with channels_last(branch, ctx.device) as fast:
        return _tune(ctx, branch, config, tick, fast)


def _tune(
    ctx: SearchContext,
    branch: Branch,
    config: SearchConfig,
    tick: Callable[[int], None],
    fast: Callable[[Tensor], Tensor],
) -> dict:
    """:func:`tune_branch`'s work, the branch's inputs passed through ``fast`` (its memory format)."""
    start = time.perf_counter()
    prefix = extract(ctx.target, None, [branch.target_cut])
    n = len(ctx.train_x)

    if config.tune_shift or config.tune_flip:
        # the target's cut, pre-logits and logits in one pass, per augmented batch
        frozen = extract(ctx.target, None, [branch.target_cut, ctx.t_cls.input_node, ctx.t_cls.node])

        def logits_of(rows: Tensor, gen: torch.Generator) -> Tensor:
            """Cloned logits (B, K) of training images ``rows`` (B,), augmented by
            ``config.tune_shift`` / ``tune_flip`` (the frozen target rerun on them)."""
            with torch.no_grad():
                cut, pre, logits = frozen(augment(ctx.train_x[rows], config.tune_shift, config.tune_flip, gen))
            return branch.joint_logits(fast(cut), pre, logits)

    else:
        # the L_ins pool's first N entries are the clean training images: its cache serves here too
        cuts = ctx.activations(
            f"target:{branch.target_cut}:pool", prefix, partial(ctx.pool.images, ctx.train_x), len(ctx.pool)
        )

        def logits_of(rows: Tensor, gen: torch.Generator) -> Tensor:
            """Cloned logits (B, K) of training images ``rows`` (B,) (pool entries 0..N-1)."""
            return branch.joint_logits(fast(cuts(rows)), ctx.pool.pre[rows], ctx.pool.logits[rows])

    @torch.no_grad()
    def held_out() -> dict[str, float]:
        batches = holdout_batches(ctx, branch.target_cut, prefix)
        parts = [branch.joint_logits(fast(cut), pre, logits) for cut, pre, logits in batches]
        return holdout_metrics(ctx, torch.cat(parts), config.temperature)

    branch.eval()
    before = held_out()
    saved = {k: v.clone() for k, v in branch.state_dict().items()}
    per_epoch = max(math.ceil(n / config.batch_size), config.min_steps_per_epoch)
    lengths = sorted({config.tune_epochs, *config.tune_epochs_choices})
    tick(per_epoch * sum(lengths))

    def tuned(epochs: int) -> dict[str, float]:
        """Tune from ``saved`` for ``epochs`` (cosine over them, the same seeded order for
        every length); the held-out metrics after."""
        branch.load_state_dict(saved)
        branch.body.requires_grad_(True)
        params = [p for p in branch.parameters() if p.requires_grad]
        opt = adam(params, lr=config.tune_lr, weight_decay=config.tune_weight_decay)
        gen = torch.Generator().manual_seed(config.seed)
        steps = epochs * per_epoch
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
        draws = math.ceil(steps * config.batch_size / n)  # seeded on the CPU generator, then moved
        order = torch.cat([torch.randperm(n, generator=gen, device=gen.device) for _ in range(draws)]).to(ctx.device)
        train_mode(branch, config.tune_bn_train)
        for step in range(steps):
            rows = order[step * config.batch_size : (step + 1) * config.batch_size]
            y = ctx.train_y[rows]
            logits = logits_of(rows, gen)
            teacher = joint_teacher(ctx.pool.logits[rows], ctx.pool.source[rows], y)
            loss = kd_loss(logits, teacher, config.temperature) + config.ce_weight * F.cross_entropy(logits, y)
            if not bool(torch.isfinite(loss).all()):
                raise TrainingError(
                    f"fine-tuning the branch at {branch.target_cut}: the loss became {float(loss.detach())}; lower "
                    "the tuning learning rate or check the images for NaN/Inf (the candidate search is checkpointed "
                    "and a rerun resumes from it)"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            tick(0)
        branch.body.requires_grad_(False)
        branch.eval()
        return held_out()

    tried: dict[int, dict[str, float]] = {}
    best, best_state = lengths[0], saved
    for epochs in lengths:  # ascending: a tie keeps the shorter tuning
        tried[epochs] = tuned(epochs)
        if epochs == lengths[0] or tried[epochs]["acc"] > tried[best]["acc"]:
            best, best_state = epochs, {k: v.clone() for k, v in branch.state_dict().items()}
    after = tried[best]
    kept = after["acc"] > before["acc"]
    branch.load_state_dict(best_state if kept else saved)
    if kept:
        branch.body.tuned = True
    seconds = time.perf_counter() - start
    return {
        "before": before,
        "after": after,
        "kept": kept,
        "epochs": best,
        "seconds": seconds,
        **({"tried": {e: m["acc"] for e, m in tried.items()}} if len(tried) > 1 else {}),
    }
