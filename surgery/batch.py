"""Batch-size generalisation of a concretely traced graph.

Concrete tracing (:mod:`pnc.surgery.tracing`) turns shape reads into constants, so a graph
traced at batch size b bakes b into its ``view``/``reshape``/``expand`` arguments. Tracing
again at b + 1 and comparing the two graphs finds those constants: every int that differs
must be ``scale * batch + offset``, and is rewritten as that expression of the batch-size
node ``x.size(0)``. Tensor constants made with the batch size (one sample repeated) are
stored once and expanded. Two traces that differ in anything else are not generalised.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

__all__ = ["BATCH_META", "BatchDim", "generalise_batch", "batch_dims"]

#: node.meta key marking the batch-size node ``x.size(0)`` and the scalars computed from it
BATCH_META = "pnc_batch"


@dataclass(frozen=True)
class BatchDim:
    """The batch size of a tensor: ``shape[dim] == scale * batch + offset``."""

    dim: int
    scale: int
    offset: int


class _NotBatchAffine(Exception):
    """Two traces differ by more than batch-size arithmetic."""


class _BatchRewriter:
    """Builds ``scale * batch + offset`` nodes in a graph, after the batch-size node."""

    def __init__(self, graph: fx.Graph, batches: tuple[int, int]):
        self.graph, self.batches = graph, batches
        placeholder = next(n for n in graph.nodes if n.op == "placeholder")
        with graph.inserting_after(placeholder):
            self.batch = graph.call_method("size", (placeholder, 0))
        self.batch.meta[BATCH_META] = True
        self.last = self.batch
        self.cache: dict[tuple[int, int], fx.Node] = {(1, 0): self.batch}

    def node(self, v1: int, v2: int) -> fx.Node:
        (b1, b2) = self.batches
        if (v2 - v1) % (b2 - b1):
            raise _NotBatchAffine(f"{v1} at batch {b1} and {v2} at batch {b2}")
        scale = (v2 - v1) // (b2 - b1)
        key = (scale, v1 - scale * b1)
        if key not in self.cache:
            value = self.batch
            for op, operand in ((operator.mul, key[0]), (operator.add, key[1])):
                if operand != (1 if op is operator.mul else 0):
                    with self.graph.inserting_after(self.last):
                        value = self.last = self.graph.call_function(op, (value, operand))
                    value.meta[BATCH_META] = True
            self.cache[key] = value
        return self.cache[key]

    def merge(self, a1: Any, a2: Any) -> Any:
        """``a1`` with each int that differs in ``a2`` replaced by its batch expression."""
        if isinstance(a1, fx.Node) or isinstance(a2, fx.Node):
            if not (isinstance(a1, fx.Node) and isinstance(a2, fx.Node) and a1.name == a2.name):
                raise _NotBatchAffine(f"different arguments {a1} and {a2}")
            return a1
        if type(a1) is int and type(a2) is int:
            return a1 if a1 == a2 else self.node(a1, a2)
        if isinstance(a1, (tuple, list)) and isinstance(a2, (tuple, list)) and len(a1) == len(a2):
            merged = [self.merge(x, y) for x, y in zip(a1, a2)]
            if isinstance(a1, list):
                return merged
            return tuple(merged) if any(isinstance(m, fx.Node) for m in merged) else type(a1)(merged)
        if isinstance(a1, dict) and isinstance(a2, dict) and a1.keys() == a2.keys():
            return {k: self.merge(a1[k], a2[k]) for k in a1}
        if isinstance(a1, slice) and isinstance(a2, slice):
            return slice(*(self.merge(getattr(a1, f), getattr(a2, f)) for f in ("start", "stop", "step")))
        if type(a1) is not type(a2) or not (a1 == a2 or (a1 != a1 and a2 != a2)):
            raise _NotBatchAffine(f"{a1!r} and {a2!r}")
        return a1


def generalise_batch(gm: fx.GraphModule, other: fx.GraphModule, batches: tuple[int, int]) -> fx.Graph | None:
    """A copy of ``gm.graph`` valid at any batch size, or None if the traces differ otherwise."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, env)
    graph.output(out)
    nodes1 = list(graph.nodes)
    nodes2 = list(other.graph.nodes)
    if [(n.op, n.target, n.name) for n in nodes1] != [(n.op, n.target, n.name) for n in nodes2]:
        return None
    per_sample: list[tuple[fx.Node, torch.Tensor]] = []
    for n1, n2 in zip(nodes1, nodes2):
        if n1.op == "get_attr" and str(n1.target).startswith("_tensor_constant"):
            c1, c2 = getattr(gm, str(n1.target)), getattr(other, str(n2.target))
            if c1.shape != c2.shape:  # a constant made with the batch size
                if not _repeated_sample(c1, c2, batches):
                    return None
                per_sample.append((n1, c1[:1].clone()))
    rewriter = _BatchRewriter(graph, batches)
    try:
        for n1, n2 in zip(nodes1, nodes2):
            n1.args = rewriter.merge(n1.args, n2.args)
            n1.kwargs = rewriter.merge(n1.kwargs, n2.kwargs)
    except _NotBatchAffine:
        return None
    for node, sample in per_sample:  # one stored sample, expanded to the batch
        name = f"{node.target}_sample"
        setattr(gm, name, sample)
        with graph.inserting_after(node):
            expanded = graph.call_method("expand", (node, rewriter.batch, *[-1] * (sample.dim() - 1)))
        node.replace_all_uses_with(expanded, delete_user_cb=functools.partial(operator.is_not, expanded))
        node.target = name
    graph.lint()
    return graph


def _repeated_sample(c1: torch.Tensor, c2: torch.Tensor, batches: tuple[int, int]) -> bool:
    """True if both constants are one sample repeated along a leading batch dimension."""
    return (
        c1.dim() > 0
        and (c1.shape[0], c2.shape[0]) == batches
        and c1.shape[1:] == c2.shape[1:]
        and torch.equal(c1[:1], c2[:1])
        and bool((c1 == c1[:1]).all())
        and bool((c2 == c2[:1]).all())
    )


def batch_dims(
    small: dict[str, tuple[int, ...]], large: dict[str, tuple[int, ...]], batches: tuple[int, int]
) -> dict[str, BatchDim]:
    """Per node, the dimension that moves with the batch between traces at ``batches``."""
    dims = {}
    for name, s1 in small.items():
        s2 = large.get(name)
        if s2 is None or len(s1) != len(s2):
            continue
        d = next((i for i, (u, v) in enumerate(zip(s1, s2)) if u != v), None)
        if d is not None:
            scale = s2[d] - s1[d]
            dims[name] = BatchDim(d, scale, s1[d] - scale * batches[0])
    return dims
