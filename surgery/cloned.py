"""ClonedNetwork: a frozen target plus detachable cloned branches (Eq. 6, M_c).

The target is held by reference and never modified: no parameter, buffer or
``requires_grad`` flag of it changes, and it always runs in eval mode. With no branch the
forward *is* ``target(x)``; with branches, one fx pass over the target taps its cut
tensors, pre-logits and logits, and each branch adds its classes::

    logits = [target_logits + sum_b correction_b, new_logits_1, ..., new_logits_P]
             (B, |T_t| + sum_p |T_s^p|)

Example (``tiny_clone`` clones one class of a 2-class source into a 3-class target)::

    >>> from pnc.surgery.examples import tiny_clone
    >>> net, target, source, x = tiny_clone()
    >>> list(net.branches), net(x).shape          # (B, 3 + 1)
    (['src'], torch.Size([16, 4]))
    >>> with net.disabled("src"):                 # temporarily without it
    ...     net(x).shape
    torch.Size([16, 3])
    >>> branch = net.detach("src")                # removed: target(x), bit for bit
    >>> torch.equal(net(x), target(x))
    True
    >>> net.add_branch("src", branch)             # and back
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from pnc.surgery.branch import Branch
from pnc.surgery.cuts import classifier_of
from pnc.surgery.devices import device_of
from pnc.surgery.errors import BranchError
from pnc.surgery.splitting import extract
from pnc.surgery.tracing import TracedModel, trace


class ClonedNetwork(nn.Module):
    """M_c: ``target`` with any number of named :class:`Branch` es.

    Args:
        target: the frozen target network (logits over its ``target_classes``).
        example_input: (B, C, H, W) used to trace it (moved to the target's device).
        target_classes: names of the target's classes, in output order.

    It runs where its target is: branches are moved to the target's device when added, and
    ``net.to(device)`` moves the target and every branch.
    """

    def __init__(
        self, target: nn.Module, example_input: Tensor, target_classes: list[str], traced: TracedModel | None = None
    ):
        super().__init__()
        self.target = target
        self.target_classes = list(target_classes)
        self.traced = traced or trace(target, example_input)
        self.classifier = classifier_of(self.traced)
        self.branches = nn.ModuleDict()
        self._taps: tuple[list[str], nn.Module] | None = None  # fx taps, rebuilt when branches change

    # -- branches ------------------------------------------------------------------
    def add_branch(self, name: str, branch: Branch) -> None:
        """Add ``branch`` under ``name``, moved to the target's device."""
        if name in self.branches:
            raise BranchError(f"a branch named {name!r} exists; pick another name or detach it first")
        self.branches[name] = branch.to(device_of(self.target))
        self._taps = None

    def detach(self, name: str) -> Branch:
        """Remove and return a branch; the others keep working."""
        if name not in self.branches:
            raise BranchError(f"no branch named {name!r}; branches: {', '.join(self.branches) or 'none'}")
        branch = self.branches.pop(name)
        self._taps = None
        return branch

    @contextlib.contextmanager
    def disabled(self, *names: str) -> Iterator[ClonedNetwork]:
        """Run without the named branches (default: all) inside the block, then restore them
        in their order. With every branch disabled the forward is ``target(x)`` exactly."""
        unknown = [n for n in names if n not in self.branches]
        if unknown:
            raise BranchError(
                f"no branch named {', '.join(map(repr, unknown))}; branches: {', '.join(self.branches) or 'none'}"
            )
        saved = self.branches
        self.branches = nn.ModuleDict({k: v for k, v in saved.items() if names and k not in names})
        self._taps = None
        try:
            yield self
        finally:
            self.branches = saved
            self._taps = None

    def detach_all(self) -> list[Branch]:
        """Remove every branch: the network is the target again."""
        return [self.detach(name) for name in list(self.branches)]

    def branch_list(self) -> list[Branch]:
        """The branches, in the order they were added."""
        return [b for b in self.branches.values() if isinstance(b, Branch)]

    @property
    def classes(self) -> list[str]:
        """Output class names: the target's, then each branch's."""
        return self.target_classes + [c for b in self.branch_list() for c in b.classes]

    def taps(self) -> tuple[list[str], nn.Module]:
        """(cut names, fx module x -> (those cut tensors..., target pre-logits, target logits))."""
        if self._taps is None:
            cuts = sorted({b.target_cut for b in self.branch_list()})
            module = extract(self.traced, None, cuts + [self.classifier.input_node, self.classifier.node])
            self._taps = cuts, module
        return self._taps

    # -- forward -------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> logits (B, len(self.classes))."""
        if not self.branches:
            return self.target(x)
        names, taps = self.taps()
        *cuts, prelogits, logits = taps(x)
        at = dict(zip(names, cuts))
        new = []
        for branch in self.branch_list():
            correction, logits_new = branch(at[branch.target_cut], prelogits)
            logits = logits + correction
            new.append(logits_new)
        return torch.cat([logits, *new], 1)

    def train(self, mode: bool = True) -> ClonedNetwork:
        """Only the adapters and heads follow ``mode``; the target and the transferable
        modules stay in eval mode, so no BatchNorm statistic of theirs ever moves."""
        super().train(mode)
        self.target.eval()
        return self
