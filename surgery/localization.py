"""Localization alone (Eq. 4-5): prune the layers after a cut to the channels that serve some classes.

Given a frozen classifier, a cut and the output indices of a few classes K:

1. G (Eq. 4, :func:`~pnc.surgery.local_models.fit_local_models`) is fitted on images of
   those classes: one local linear model per image, from patch-mask bits to the K logits;
2. soft masks on the torch-pruning coupling groups of the layers after the cut
   (:class:`~pnc.surgery.channel_groups.MaskedBody`) are trained against G, Eq. 5::

       L_loc = sum ||f_masked(b * x)[K] - g_x(b)||^2 / sum ||g_x(b)||^2
               + keep_weight * sum_groups relu(mean(mask) - keep)

   (the objective of the *localize* phase of :mod:`pnc.surgery.insertion`);
3. the masks are binarized to the top ``keep`` share of each group and the layers are
   structurally pruned (:func:`pruned_suffix`); the classifier keeps all its outputs.

    keep, masked = localize(suffix, prefix, images, outputs, g, LocalizeConfig(keep=0.5))
    small = pruned_suffix(traced, cut, keep)     # cut tensor -> logits, fewer channels
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.fx
from torch import Tensor, nn

from pnc.surgery.channel_groups import MaskedBody, _build_groups, prune_structurally
from pnc.surgery.cuts import CutPoint, classifier_of
from pnc.surgery.devices import adam, device_of
from pnc.surgery.errors import CutError, PncError
from pnc.surgery.local_models import LocalModelSet, occlude
from pnc.surgery.splitting import extract
from pnc.surgery.tracing import TracedModel

__all__ = [
    "LocalizeConfig",
    "relative_squared_error",
    "localization_loss",
    "localize",
    "masked_suffix",
    "pruned_suffix",
    "group_scores",
    "group_sizes",
    "top_share",
]


@dataclass
class LocalizeConfig:
    """Settings of the mask training (defaults: insertion's localize phase, longer).

    ``keep``: the kept share of each group; ``steps``: Adam steps of ``batch_size``
    (image, patch mask) pairs drawn from G's images; ``keep_weight``: weight of the
    budget penalty relu(mean mask - keep) per group."""

    keep: float = 0.5
    steps: int = 200
    batch_size: int = 64
    lr: float = 3e-2
    keep_weight: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.keep <= 1:
            raise PncError(
                f"keep must be a share in (0, 1], got {self.keep}; e.g. --keep 0.5 keeps half of each channel group"
            )
        if self.steps < 1 or self.batch_size < 1:
            raise PncError("steps and batch_size must be at least 1")


def relative_squared_error(pred: Tensor, target: Tensor) -> Tensor:
    """Eq. 5's data term: sum (pred - target)^2 / sum target^2, pred and target (B, K)."""
    return ((pred - target) ** 2).sum() / (target**2).sum().clamp_min(1e-8)


def _logits(out: Tensor | tuple[Tensor, ...]) -> Tensor:
    """The logits of a body that returns them alone or last in a tuple (pre-logits, logits)."""
    return out[-1] if isinstance(out, tuple) else out


def localization_loss(
    masked: MaskedBody, cut: Tensor, outputs: Sequence[int], g_pred: Tensor, keep: float, keep_weight: float = 1.0
) -> Tensor:
    """Eq. 5 with the budget: relative squared error of the masked body's logits of
    ``outputs`` on ``cut`` (B, *cut shape) vs G's predictions ``g_pred`` (B, K), plus
    ``keep_weight`` * :meth:`MaskedBody.keep_penalty` (keep)."""
    pred = _logits(masked(cut))[:, list(outputs)]
    return relative_squared_error(pred, g_pred) + keep_weight * masked.keep_penalty(keep)


def localize(
    body: nn.Module,
    prefix: nn.Module,
    images: Tensor,
    outputs: Sequence[int],
    g: LocalModelSet,
    config: LocalizeConfig,
    *,
    layout: str = "NCHW",
    frozen: Sequence[nn.Module] = (),
    tick: Callable[[], None] | None = None,
) -> tuple[dict[str, Tensor], MaskedBody]:
    """Train soft masks on ``body`` (cut tensor -> logits, or (pre-logits, logits)) against G and
    binarize them to the top ``config.keep`` share per group, on the body's device (batches of
    ``images`` are moved there as they are drawn; the draws come from a seeded CPU generator).

    Args:
        prefix: input (B, C, H, W) -> cut tensor; frozen; on the body's device.
        images: (N, C, H, W) the images G was fitted on (``g.index`` indexes them).
        outputs: the logit indices G models (K of them).
        frozen: modules of ``body`` whose out-channels stay (its classifier).
    Returns ({group name: sorted kept channel indices}, the MaskedBody in binary mode)."""
    gen = torch.Generator().manual_seed(config.seed)
    device = device_of(body)
    masks, index = g.masks.to(device), g.index.to(images.device)
    with torch.no_grad():
        example = prefix(images[:8].to(device))
    masked = MaskedBody(body, example, layout, frozen=frozen)
    if not masked.groups:
        raise PncError(
            f"the layers after the cut have no prunable channel group ({masked.excluded or 'none'}); "
            "choose an earlier cut"
        )
    masked.mode = "soft"
    opt = adam(masked.logits.parameters(), lr=config.lr)
    for _ in range(config.steps):
        rows = torch.randint(len(index), (config.batch_size,), generator=gen, device=gen.device)
        mask_ids = torch.randint(masks.shape[0], (config.batch_size,), generator=gen, device=gen.device).to(device)
        with torch.no_grad():
            x = images[index[rows.to(index.device)]].to(device)
            cut = prefix(occlude(x, masks[mask_ids]))
            g_pred = g.predict(masks[mask_ids], which=rows.to(device))
        loss = localization_loss(masked, cut, outputs, g_pred, config.keep, config.keep_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if tick is not None:
            tick()
    return masked.binarize(config.keep), masked


def masked_suffix(traced: TracedModel, cut: CutPoint) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule, nn.Module]:
    """(prefix: input -> cut tensor, body: cut tensor -> logits, the body's classifier module)."""
    cls = classifier_of(traced)
    body = extract(traced, cut.node, [cls.node])
    if sum(p.numel() for n, p in body.named_parameters() if not n.startswith(cls.module + ".")) == 0:
        raise CutError(f"nothing to prune after {cut.node!r}: only the classifier follows it; choose an earlier cut")
    return extract(traced, None, [cut.node]), body, body.get_submodule(cls.module)


def pruned_suffix(traced: TracedModel, cut: CutPoint, keep: Mapping[str, Tensor], example: Tensor) -> nn.Module:
    """A copy of the layers after ``cut`` (cut tensor (B, *cut.shape) -> logits (B, K_all))
    with only the channels ``keep`` of each group; the classifier keeps every output.

    example: (B, *cut.shape) a cut tensor, for tracing."""
    cls = classifier_of(traced)
    _, body, _ = masked_suffix(traced, cut)
    pruned, _ = prune_structurally(copy.deepcopy(body), example, _layout(cut), dict(keep), [cls.module])
    return pruned.eval().requires_grad_(False)


def _layout(cut: CutPoint) -> str:
    return "NCHW" if cut.layout == "NCHW" else "NLC"


def group_scores(
    body: nn.Module,
    example: Tensor,
    layout: str,
    frozen: Sequence[nn.Module],
    groups: Sequence[str],
    importance: Callable[[object], Tensor],
) -> dict[str, Tensor]:
    """{group: per-channel score (size,)} of a torch-pruning importance (e.g.
    ``tp.importance.MagnitudeImportance()``) on the coupling groups named ``groups`` of
    ``body``, built as :class:`MaskedBody` builds them. ``body`` is used as is: for
    Taylor importance its parameters must hold gradients."""
    dg, _, found, _ = _build_groups(body, example, layout, list(frozen))
    names = {m: n for n, m in body.named_modules()}
    scores = {}
    for group in dg.get_all_groups(ignored_layers=list(frozen)):
        root = group[0].dep.target.module
        name = names.get(root)
        if name is not None and name in groups:
            scores[name] = importance(group).detach().flatten()
    missing = set(groups) - set(scores)
    if missing:
        raise PncError(f"torch-pruning gave no group for {sorted(missing)}; {[g.name for g in found]} were found")
    return scores


def group_sizes(body: nn.Module, example: Tensor, layout: str, frozen: Sequence[nn.Module]) -> dict[str, int]:
    """{group name: channels} of the coupling groups of ``body`` (as :class:`MaskedBody` names them,
    before it drops the groups it cannot mask faithfully)."""
    _, _, groups, _ = _build_groups(body, example, layout, list(frozen))
    return {g.name: g.size for g in groups}


def top_share(scores: Mapping[str, Tensor], keep: float) -> dict[str, Tensor]:
    """{group: sorted indices of the top ceil(keep * size) scores}: binarization as MaskedBody's."""
    return {n: s.topk(min(len(s), math.ceil(keep * len(s)))).indices.sort().values for n, s in scores.items()}
