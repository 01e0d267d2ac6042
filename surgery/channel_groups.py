"""Channel masks on a network body, one per torch-pruning coupling group.

A *coupling group* (torch-pruning's ``Group``) is every layer whose channels must be removed
together: a conv's out-channels, the BatchNorm after it, the in-channels of its consumers,
all branches of a residual add, the matching slice of a concat. :class:`MaskedBody` wraps a
private copy of a body (for pnc: the source's layers after the cut) and puts one mask on
each group. Masking channel ``k`` multiplies it, at the output of each *anchor* of the
group (the BatchNorm or, without one, the conv/linear that produces it), by the mask
value; with a binary mask this zeroes the channel, which is what removing it does. Every
group kept maskable was checked at build time: removing half of its channels structurally
gives the same outputs as zero-masking them. Groups for which that cannot hold are left
whole and listed in :attr:`MaskedBody.excluded` with the reason (LayerNorm/GroupNorm
statistics run over all channels; grouped convs; channels tied to the body's input).

Example::

    >>> body = nn.Sequential(nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
    ...                      nn.Flatten(), nn.Linear(8 * 4 * 4, 3))
    >>> mb = MaskedBody(body, torch.randn(2, 4, 6, 6), layout="NCHW", frozen=[body[4]])
    >>> [(g.name, g.size) for g in mb.groups]        # conv0 out + bn1 + linear in
    [('0', 8)]
    >>> keep = mb.binarize(ratio=0.5)                 # top-4 channels by mask value
    >>> small, _ = mb.prune()                         # physically smaller copy, no hooks
    >>> small[0].out_channels
    4
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import Tensor, nn

#: initial mask logit: sigmoid(3) = 0.95, i.e. every channel starts almost fully on
_INIT_LOGIT = 3.0
_NORMS_OVER_CHANNELS = (nn.LayerNorm, nn.GroupNorm)
_ANCHOR_TYPES = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm)


@dataclass
class Anchor:
    """Where a group's mask is applied: the output of ``module`` along ``dim``.

    ``channels[i]`` is the module's channel that carries the group's root channel
    ``roots[i]`` (they differ after a concat)."""

    module: str
    dim: int
    width: int
    channels: Tensor
    roots: Tensor


@dataclass
class ChannelGroup:
    """One coupling group: ``size`` root channels, named by its root layer's path."""

    name: str
    size: int
    anchors: list[Anchor] = field(default_factory=list)


class _Stubbed(nn.Module):
    """``body(stub(x))`` with an identity stub, so that groups tied to the input show up."""

    def __init__(self, body: nn.Module, channels: int, layout: str, device: torch.device):
        super().__init__()
        self.stub: nn.Conv2d | nn.Linear
        eye = torch.eye(channels, device=device)
        if layout == "NCHW":
            self.stub = nn.Conv2d(channels, channels, 1, bias=False, device=device)
            self.stub.weight.data = eye.view(channels, channels, 1, 1)
        else:  # channels last: NLC, NHWC, NC
            self.stub = nn.Linear(channels, channels, bias=False, device=device)
            self.stub.weight.data = eye
        self.body = body

    def forward(self, x: Tensor):
        return self.body(self.stub(x))


def _channel_dim(module: nn.Module) -> int:
    return 1 if isinstance(module, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)) else -1


def _exclusion_reason(group, stub: nn.Module) -> str:
    for dep, _ in group:
        m = dep.target.module
        if m is stub:
            return "its channels are the body's input (the cut tensor)"
        if isinstance(m, _NORMS_OVER_CHANNELS):
            return f"{type(m).__name__} normalizes over all channels, so removing one changes the others"
        if isinstance(m, nn.modules.conv._ConvNd) and 1 < m.groups < m.out_channels:
            return f"grouped conv (groups={m.groups}) needs channels removed group-wise"
        if not isinstance(m, nn.Module):
            return "couples an unwrapped nn.Parameter (e.g. a position embedding)"
    return ""


def _build_groups(body: nn.Module, example: Tensor, layout: str, frozen: list[nn.Module]):
    """Trace ``body`` with torch-pruning; return (dep graph, stubbed, groups, excluded). Anchor
    indices live on the example's device."""
    stubbed = _Stubbed(body, example.shape[1 if layout == "NCHW" else -1], layout, example.device)
    with torch.enable_grad():
        dg = tp.DependencyGraph().build_dependency(stubbed, example, verbose=False)
    names = {m: n for n, m in body.named_modules()}
    groups, excluded = [], {}
    for group in dg.get_all_groups(ignored_layers=list(frozen)):
        root = group[0].dep.target.module
        name = names[root] if root in names else "stub"
        reason = _exclusion_reason(group, stubbed.stub)
        if reason:
            excluded[name] = reason
            continue
        out_mods = {
            dep.target.module
            for dep, _ in group
            if dg.is_out_channel_pruning_fn(dep.handler) and isinstance(dep.target.module, _ANCHOR_TYPES)
        }
        bns = {m for m in out_mods if isinstance(m, nn.modules.batchnorm._BatchNorm)}
        anchors = {}
        for item in group:
            m = item.dep.target.module
            if m not in out_mods or m in anchors:
                continue
            feeds_bn = any(o.module in bns for o in dg.module2node[m].outputs)
            if feeds_bn and not isinstance(m, nn.modules.batchnorm._BatchNorm):
                continue
            anchors[m] = Anchor(
                module=names[m],
                dim=_channel_dim(m),
                width=dg.get_out_channels(m),
                channels=torch.as_tensor(item.idxs, dtype=torch.long, device=example.device),
                roots=torch.as_tensor(item.root_idxs, dtype=torch.long, device=example.device),
            )
        groups.append(ChannelGroup(name, dg.get_out_channels(root), list(anchors.values())))
    return dg, stubbed, groups, excluded


def _close(a, b) -> bool:
    """Outputs (a tensor or a tuple of tensors) equal up to float summation order.

    Outputs whose shape pruning changed (pre-logits read by a frozen classifier) are
    skipped; at least one output must keep its shape (the logits)."""
    a, b = ((t,) if isinstance(t, Tensor) else tuple(t) for t in (a, b))
    pairs = [(x, y) for x, y in zip(a, b) if x.shape == y.shape]
    return (
        len(a) == len(b)
        and bool(pairs)
        and all(torch.allclose(x, y, rtol=1e-4, atol=1e-5 * max(1.0, float(x.abs().max()))) for x, y in pairs)
    )


def prune_structurally(
    body: nn.Module, example: Tensor, layout: str, keep: dict[str, Tensor], frozen_names: list[str]
) -> tuple[nn.Module, dict[str, set[int]]]:
    """Remove, in place, every channel of each named group not listed in ``keep[name]``.

    Returns the body and, for each frozen module, the input channels removed from it
    (e.g. the pre-logit features a frozen classifier no longer reads)."""
    modules = dict(body.named_modules())
    frozen = [modules[n] for n in frozen_names]
    dg, _, _, _ = _build_groups(body, example, layout, frozen)
    removed: dict[str, set[int]] = {n: set() for n in frozen_names}
    for name, kept in keep.items():
        root = modules[name]
        width = dg.get_out_channels(root)
        drop = sorted(set(range(width)) - set(kept.tolist()))
        if drop:
            pruner = dg.get_pruner_of_module(root)
            group = dg.get_pruning_group(root, pruner.prune_out_channels, drop)
            for dep, idxs in group:
                for fname, fmod in zip(frozen_names, frozen):
                    if dep.target.module is fmod and dg.is_in_channel_pruning_fn(dep.handler):
                        removed[fname].update(int(i) for i in idxs)
            group.prune(record_history=False)
    return body, removed


def _empty_anchors(group: ChannelGroup, kept: set[int]) -> list[Anchor]:
    """Anchors of ``group`` none of whose channels are in ``kept`` (e.g. one input of a
    concatenation): pruning would leave that layer with zero channels."""
    return [a for a in group.anchors if len(a.roots) and not kept & set(a.roots.tolist())]


class MaskedBody(nn.Module):
    """A private, frozen copy of ``body`` with one mask per maskable coupling group.

    Args:
        body: the layers to mask (not modified: a deep copy is taken).
        example: an input batch for ``body`` (B, *in_shape), for tracing.
        layout: "NCHW" or a channels-last layout ("NLC", "NHWC", "NC") of that input.
        frozen: modules of ``body`` whose out-channels must stay (e.g. the classifier).

    Modes: ``"soft"`` (mask = sigmoid(logit), trainable), ``"binary"`` (0/1 from
    :meth:`binarize` or :meth:`set_keep`), ``"off"`` (plain body).

    Masks and kept indices live on the example's device, which must be the body's.
    """

    def __init__(self, body: nn.Module, example: Tensor, layout: str, frozen: Sequence[nn.Module] = ()):
        super().__init__()
        names = {m: n for n, m in body.named_modules()}
        self.frozen_names = [names[m] for m in frozen]
        self.layout = layout
        self.example = example.detach()[:2].clone()
        self.pristine = copy.deepcopy(body).eval()
        self.body = copy.deepcopy(body).eval().requires_grad_(False)
        _, _, groups, self.excluded = _build_groups(self.body, self.example, layout, self._frozen(self.body))
        self.groups: list[ChannelGroup] = groups
        self.binary: dict[str, Tensor] = {}
        self._values: dict[str, Tensor] = {}
        modules = dict(self.body.named_modules())
        for g in groups:
            for a in g.anchors:
                modules[a.module].register_forward_hook(self._hook(g.name, a))
        self._drop_unfaithful_groups()
        self.logits = nn.ParameterDict(
            {
                self._key(g.name): nn.Parameter(torch.full((g.size,), _INIT_LOGIT, device=self.example.device))
                for g in self.groups
            }
        )
        self.mode = "soft"

    def _faithful(self, groups: list[ChannelGroup]) -> bool:
        """Does removing the first half of each group's channels equal zero-masking them?"""
        keep = {g.name: torch.arange(g.size // 2, g.size, device=self.example.device) for g in groups}
        self.groups, saved = groups, self.groups
        try:
            self.set_keep(keep)
            with torch.no_grad():
                masked = self(self.example)
                pruned, _ = prune_structurally(
                    copy.deepcopy(self.pristine), self.example, self.layout, keep, self.frozen_names
                )
                pruned = pruned(self.example)
            return _close(masked, pruned)
        except (RuntimeError, ValueError, IndexError):  # pruning broke a shape
            return False
        finally:
            self.groups = saved

    def _drop_unfaithful_groups(self) -> None:
        """Exclude groups whose structural removal differs from zero-masking."""
        if not self.groups or self._faithful(self.groups):
            return
        for g in list(self.groups):
            if not self._faithful([g]):
                self.groups.remove(g)
                self.excluded[g.name] = "structural removal did not match zero-masking on the example input"

    # -- helpers ---------------------------------------------------------------------
    def _frozen(self, body: nn.Module) -> list[nn.Module]:
        modules = dict(body.named_modules())
        return [modules[n] for n in self.frozen_names]

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__") or "root"

    def _hook(self, group: str, anchor: Anchor):
        def apply(module, inputs, output):
            mask = self._values.get(group) if self.mode != "off" else None
            if mask is None:  # masks off, or a group dropped as unfaithful
                return output
            mult = torch.ones(anchor.width, dtype=output.dtype, device=output.device)
            mult = mult.index_put((anchor.channels,), mask[anchor.roots].to(output.dtype))
            shape = [1] * output.dim()
            shape[anchor.dim] = anchor.width
            return output * mult.view(shape)

        return apply

    def mask(self, group: str) -> Tensor:
        """The current mask of a group, shape (size,): soft values or 0/1."""
        if self.mode == "binary":
            return self.binary[group]
        return torch.sigmoid(self.logits[self._key(group)])

    # -- forward ---------------------------------------------------------------------
    def forward(self, x: Tensor):
        """x: (B, *in_shape) -> the body's output with masked channels."""
        if self.mode != "off":
            self._values = {g.name: self.mask(g.name) for g in self.groups}
        return self.body(x)

    # -- budget, binarization, pruning ---------------------------------------------
    def keep_penalty(self, ratio: float) -> Tensor:
        """L1 budget: sum over groups of the mean soft mask in excess of ``ratio``."""
        terms = [torch.relu(torch.sigmoid(p).mean() - ratio) for p in self.logits.values()]
        return torch.stack(terms).sum() if terms else torch.zeros((), device=self.example.device)

    def binarize(self, ratio: float, scope: str = "group", round_to: int = 1) -> dict[str, Tensor]:
        """Keep the top-c channels by soft mask value; switch to binary mode.

        ``scope="group"``: c = ceil(ratio * size) per group (rounded up to ``round_to``);
        ``scope="global"``: the top ``ratio`` of all maskable channels, at least one per group.
        Returns {group name: sorted kept channel indices}.
        """
        if not 0 < ratio <= 1:
            raise ValueError(f"mask ratio must be in (0, 1], got {ratio}")
        soft = {g.name: torch.sigmoid(self.logits[self._key(g.name)]).detach() for g in self.groups}
        counts = {}
        if scope == "global" and soft:
            values = torch.cat(list(soft.values()))
            k = max(1, math.ceil(ratio * values.numel()))
            threshold = values.topk(k).values.min()
            counts = {n: max(1, int((v >= threshold).sum())) for n, v in soft.items()}
        elif scope != "group":
            raise ValueError(f"scope must be 'group' or 'global', got {scope!r}")
        keep = {}
        groups = {g.name: g for g in self.groups}
        for name, v in soft.items():
            c = counts.get(name, math.ceil(ratio * v.numel()))
            c = min(v.numel(), round_to * math.ceil(c / round_to))
            kept = set(v.topk(c).indices.tolist())
            for anchor in _empty_anchors(groups[name], kept):  # a concatenated part would vanish:
                kept.add(int(anchor.roots[v[anchor.roots].argmax()]))  # keep its best channel
            keep[name] = torch.tensor(sorted(kept), dtype=torch.long, device=v.device)
        self.set_keep(keep)
        return keep

    def set_keep(self, keep: dict[str, Tensor]) -> None:
        """Binary masks from kept indices per group (e.g. read back from a patch)."""
        self.binary = {}
        for g in self.groups:
            empty = _empty_anchors(g, set(keep[g.name].tolist()))
            if empty:
                raise ValueError(
                    f"keeping channels {keep[g.name].tolist()} of group {g.name!r} removes every "
                    f"channel of {empty[0].module!r} (a concatenated part): keep at least one of "
                    f"{empty[0].roots.tolist()}; structural pruning cannot make a 0-channel layer"
                )
            m = torch.zeros(g.size, device=self.example.device)
            m[keep[g.name].long().to(m.device)] = 1.0
            self.binary[g.name] = m
        self.mode = "binary"

    def keep(self) -> dict[str, Tensor]:
        """Kept channel indices per group (binary mode)."""
        return {n: m.nonzero().flatten() for n, m in self.binary.items()}

    def prune(self) -> tuple[nn.Module, dict[str, set[int]]]:
        """A physically smaller copy of the body keeping the binary masks' channels, and
        the input channels removed from each frozen module (see :func:`prune_structurally`).

        Its outputs equal this module's in binary mode (the zero-masked body)."""
        if self.mode != "binary":
            raise RuntimeError("call binarize() or set_keep() before prune()")
        body = copy.deepcopy(self.pristine)
        return prune_structurally(body, self.example, self.layout, self.keep(), self.frozen_names)

    def kept_fraction(self) -> float:
        """Fraction of maskable channels kept (binary mode)."""
        total = sum(g.size for g in self.groups)
        return sum(int(m.sum()) for m in self.binary.values()) / max(total, 1)
