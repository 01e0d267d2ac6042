"""The fixed, seeded image pools of the search and the frozen networks' outputs on them.

The target and the source never change while cloning, so what they compute on an image
is computed once, not at every step of every candidate:

* :class:`InsertionPool`: the images of L_ins (Eq. 7): every available training image,
  clean, and (without old-class images) ``copies`` occluded versions of each; with the
  target's pre-logits and logits and the source's logits of the cloned classes on them.
* :class:`LocalizationPool`: a fixed set of (image, occlusion mask) pairs of G (Eq. 4)
  for L_loc (Eq. 5), with G's predictions on them.
* :func:`cut_activations`: the target (or the source) up to one cut on a pool's images,
  stored as float16 and kept only when it fits in the cache budget; otherwise the caller
  recomputes it per batch.

Shapes: P pool entries, C x H x W images, D target pre-logit features.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pnc.surgery.local_models import LocalModelSet, occlude

#: images per no-grad pass of a frozen network (pools, caches, held-out and test evaluation):
#: small chunks keep the transient activations small (ResNetC-20 at 256 images per pass put
#: the clone's peak memory 120 MiB above its training steps')
CHUNK = 64


def random_occlusion_masks(n: int, cells: int, gen: torch.Generator) -> Tensor:
    """(n, cells) occlusion masks keeping each cell with a per-image probability from U(0.1, 1),
    drawn with ``gen`` (on the generator's device: seeded masks are the same on every device)."""
    keep = 0.1 + 0.9 * torch.rand(n, 1, generator=gen, device=gen.device)
    return (torch.rand(n, cells, generator=gen, device=gen.device) < keep).float()


@torch.no_grad()
def batched(fn: nn.Module, x: Tensor, batch_size: int = CHUNK) -> Tensor | tuple[Tensor, ...]:
    """``fn`` over x (N, ...) in chunks; its outputs concatenated along dim 0."""
    outs = [fn(chunk) for chunk in x.split(batch_size)]
    if isinstance(outs[0], tuple | list):
        return tuple(torch.cat(parts) for parts in zip(*outs, strict=True))
    return torch.cat(outs)


@dataclass
class InsertionPool:
    """The L_ins pool.

    Attributes:
        rows: (P,) index of each entry's image in the training images.
        masks: (P, cells) its occlusion mask (all ones: the clean image), or None when every
            entry is clean.
        labels: (P,) joint labels.
        pre: (P, D) the target's pre-logits; logits: (P, |T_t|) its logits;
        source: (P, |T_s|) the source's logits of the cloned classes.
    """

    rows: Tensor
    masks: Tensor | None
    labels: Tensor
    pre: Tensor
    logits: Tensor
    source: Tensor

    def images(self, train_x: Tensor, entries: Tensor) -> Tensor:
        """The (B, C, H, W) images of pool ``entries`` (B,)."""
        x = train_x[self.rows[entries]]
        return x if self.masks is None else occlude(x, self.masks[entries])

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def build(
        cls,
        train_x: Tensor,
        train_y: Tensor,
        copies: int,
        grid: int,
        seed: int,
        target_taps: nn.Module,
        source_logits: nn.Module,
        source_outputs: list[int],
    ) -> InsertionPool:
        """Every image clean, then ``copies`` occluded versions of each (seeded).

        target_taps: x -> (pre-logits, logits) of the target; source_logits: x -> logits."""
        n, device = len(train_x), train_x.device
        rows = torch.arange(n, device=device).repeat(copies + 1)
        masks = None
        if copies:
            gen = torch.Generator().manual_seed(seed + 104729)
            drawn = random_occlusion_masks(n * copies, grid * grid, gen).to(device)
            masks = torch.cat([torch.ones(n, grid * grid, device=device), drawn])
        none = torch.empty(0, device=device)
        pool = cls(rows, masks, train_y[rows], none, none, none)
        chunks = torch.arange(len(rows), device=device).split(CHUNK)
        pre, logits, source = [], [], []
        with torch.no_grad():
            for entries in chunks:
                x = pool.images(train_x, entries)
                p, lg = target_taps(x)
                pre.append(p)
                logits.append(lg)
                source.append(source_logits(x)[:, source_outputs])
        pool.pre, pool.logits, pool.source = torch.cat(pre), torch.cat(logits), torch.cat(source)
        return pool


@dataclass
class LocalizationPool:
    """A fixed, seeded set of P (image of G, occlusion mask of G) pairs for L_loc.

    Attributes:
        g_rows: (P,) which local model (and image) of G; mask_ids: (P,) which mask of G;
        targets: (P, |T_s|) G's prediction g_i(b) for each pair.
    """

    g_rows: Tensor
    mask_ids: Tensor
    targets: Tensor

    def __len__(self) -> int:
        return len(self.g_rows)

    def images(self, clone_x: Tensor, g: LocalModelSet, entries: Tensor) -> Tensor:
        """The (B, C, H, W) occluded clone images of pool ``entries`` (B,)."""
        return occlude(clone_x[g.index[self.g_rows[entries]]], g.masks[self.mask_ids[entries]])

    @classmethod
    def build(cls, g: LocalModelSet, size: int, seed: int) -> LocalizationPool:
        """``size`` distinct pairs drawn without replacement (every pair when G has fewer)."""
        total = len(g.index) * g.masks.shape[0]
        gen = torch.Generator().manual_seed(seed + 7)
        pick = torch.randperm(total, generator=gen, device=gen.device)[: min(size, total)].to(g.coef.device)
        g_rows, mask_ids = pick // g.masks.shape[0], pick % g.masks.shape[0]
        targets = torch.cat(
            [g.predict(g.masks[m], which=r) for r, m in zip(g_rows.split(4096), mask_ids.split(4096), strict=True)]
        )
        return cls(g_rows, mask_ids, targets)


@dataclass
class FrozenActivations:
    """A frozen ``prefix`` (x -> activation at a cut) on the entries of a pool whose images
    ``images`` gives (entries (B,) -> (B, C, H, W)): read from ``cached`` (the float16
    activations of every entry, :func:`cut_activations`) when it fit, else recomputed.

    Calling it with entries (B,) gives their float activations, without autograd."""

    prefix: nn.Module
    images: Callable[[Tensor], Tensor]
    cached: Tensor | None = None

    @property
    def nbytes(self) -> int:
        """Memory the cache holds (0 when nothing is cached)."""
        return 0 if self.cached is None else self.cached.numel() * self.cached.element_size()

    def __call__(self, entries: Tensor) -> Tensor:
        if self.cached is not None:
            return self.cached[entries].float()
        with torch.no_grad():
            return self.prefix(self.images(entries))


def cut_activations(
    prefix: nn.Module, images: Callable[[Tensor], Tensor], count: int, budget_mb: float, device: torch.device
) -> Tensor | None:
    """``prefix`` (x -> activation at a cut) on every entry 0..count-1 of a pool, or None
    when it does not fit in ``budget_mb`` MiB (the caller then recomputes it per batch).

    A float32 activation is stored as float16 (half the memory; read it back with
    ``.float()``, a relative rounding of at most 2^-11) unless a value exceeds float16's
    range, in which case it is not cached at all. images: entries (B,) on ``device`` ->
    (B, C, H, W)."""
    with torch.no_grad():
        first = prefix(images(torch.arange(min(count, 2), device=device)))
        dtype = torch.float16 if first.dtype == torch.float32 else first.dtype
        if count * first[0].numel() * dtype.itemsize > budget_mb * 2**20:
            return None
        out = torch.empty((count, *first.shape[1:]), dtype=dtype, device=device)  # filled in place
        for chunk in torch.arange(count, device=device).split(CHUNK):
            part = prefix(images(chunk))
            if dtype != part.dtype and not bool((part.abs() <= torch.finfo(dtype).max).all()):
                return None
            out[chunk[0] : chunk[-1] + 1] = part
    return out
