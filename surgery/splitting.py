"""Cut a traced model into pieces that share its parameters.

``extract(traced, start, outputs)`` builds the sub-graph that computes ``outputs`` from
the tensor at node ``start``; ``split(model, cut)`` is the prefix/suffix pair with
``suffix(prefix(x)) == model(x)`` exactly.
"""

from __future__ import annotations

import difflib
import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.fx as fx
from torch import nn

from pnc.surgery.batch import BATCH_META, BatchDim
from pnc.surgery.errors import CutError
from pnc.surgery.tracing import Retracer, TracedModel, default_input, trace

if TYPE_CHECKING:
    from pnc.surgery.cuts import CutPoint

__all__ = ["extract", "split", "check_node_name"]


def check_node_name(traced: TracedModel, name: str) -> None:
    """Raise CutError unless ``name`` is a tensor-valued node of ``traced``."""
    if name in traced.shapes:
        return
    near = difflib.get_close_matches(name, list(traced.shapes), n=6, cutoff=0.4)
    hint = f" Did you mean {', '.join(near)}?" if near else ""
    raise CutError(
        f"{name!r} is not a tensor node of {type(traced.model).__name__}.{hint} "
        "List the valid cut points with `pnc cuts MODEL` or pnc.surgery.cuts.cut_points(model)."
    )


def _needed(traced: TracedModel, start: str, outputs: Sequence[str], from_input: bool) -> set[str]:
    """Nodes computed between ``start`` and ``outputs``; CutError if a path bypasses ``start``."""
    needed: set[str] = set()
    model_input = traced.input_node
    for out in outputs:
        stack = [out]
        while stack:
            name = stack.pop()
            if name in needed:
                continue
            needed.add(name)
            if name == start:
                continue
            if name == model_input and not from_input:
                raise CutError(
                    f"{start!r} is not a cut for {out!r}: data reaches {out!r} from the input without "
                    f"passing through {start!r} (a skip connection around it?). Pick a cut point listed by "
                    "cut_points(), which every path from the input goes through."
                )
            stack.extend(traced.graph.predecessors(name))
    return needed


def _batch_node(traced: TracedModel, graph: fx.Graph, placeholder: fx.Node, source: str) -> fx.Node:
    """``(placeholder.size(dim) - offset) // scale``: the batch size, read from the piece's input."""
    where = BatchDim(0, 1, 0) if source == traced.input_node else traced.batch_dims.get(source)
    if where is None:
        raise CutError(
            f"{source!r} does not carry the batch dimension, so a piece starting there cannot size its batch."
        )
    value = graph.call_method("size", (placeholder, where.dim))
    if where.offset:
        value = graph.call_function(operator.sub, (value, where.offset))
    if where.scale != 1:
        value = graph.call_function(operator.floordiv, (value, where.scale))
    for node in (value, *value.all_input_nodes):
        node.meta[BATCH_META] = True
    return value


def extract(traced: TracedModel, start: str | None, outputs: Sequence[str]) -> fx.GraphModule:
    """GraphModule mapping the tensor at node ``start`` (the model input if None) to ``outputs``.

    Returns one tensor for one output name, else a tuple in the given order. Submodules,
    parameters and buffers are the model's own objects (shared, not copied), so the piece
    follows the model's train/eval mode. It runs at any batch size unless
    ``traced.batch_size`` names the one it was traced for.
    """
    if isinstance(outputs, str):
        outputs = [outputs]
    if not outputs:
        raise CutError("extract() needs at least one output node name.")
    for name in [*([start] if start is not None else []), *outputs]:
        check_node_name(traced, name)
    source = traced.input_node if start is None else start
    needed = _needed(traced, source, outputs, from_input=start is None)

    graph = fx.Graph(tracer_cls=Retracer)  # picklable: fx re-traces the piece's code with it
    env: dict[fx.Node, fx.Node] = {}

    def arg(node: fx.Node) -> fx.Node:
        if node not in env:  # the batch size, re-derived from this piece's own input
            env[node] = (
                _batch_node(traced, graph, env[index[source]], source)
                if node.op == "call_method"
                else graph.node_copy(node, arg)
            )
        return env[node]

    index = {n.name: n for n in traced.gm.graph.nodes}
    start_node = index[source]  # first: nodes before it in graph order may need the batch size
    env[start_node] = graph.placeholder(source)
    env[start_node].meta = dict(start_node.meta)
    for node in traced.gm.graph.nodes:
        if node.name in needed and node is not start_node:
            env[node] = graph.node_copy(node, arg)
    results = [env[index[name]] for name in outputs]
    graph.output(results[0] if len(results) == 1 else tuple(results))
    graph.lint()
    return fx.GraphModule(traced.gm, graph, f"{type(traced.model).__name__}Piece")


def split(
    model_or_traced: nn.Module | TracedModel, cut: str | CutPoint, example_input: torch.Tensor | None = None
) -> tuple[fx.GraphModule, fx.GraphModule]:
    """(prefix, suffix) at ``cut``: prefix(x) is the tensor at the cut, suffix(prefix(x)) == model(x).

    ``model_or_traced`` may be an nn.Module, traced on ``example_input`` (default: one
    image of the model's timm input size). Both pieces share the model's parameters and
    take any batch size.

    >>> from pnc.surgery.examples import tiny_cnn
    >>> model = tiny_cnn(3, seed=0)
    >>> prefix, suffix = split(model, "conv2", torch.randn(2, 1, 8, 8))
    >>> x = torch.randn(5, 1, 8, 8)
    >>> prefix(x).shape, torch.equal(suffix(prefix(x)), model(x))
    (torch.Size([5, 4, 4, 4]), True)
    """
    traced = (
        model_or_traced
        if isinstance(model_or_traced, TracedModel)
        else trace(model_or_traced, example_input if example_input is not None else default_input(model_or_traced))
    )
    name = cut if isinstance(cut, str) else cut.node
    check_node_name(traced, name)
    if name == traced.input_node or name == traced.output_node:
        raise CutError(f"{name!r} is the model's input or output; a cut must lie strictly between them.")
    return extract(traced, None, [name]), extract(traced, name, [traced.output_node])
