"""No redundant nodes in a branch's ONNX graph: clean it before the merge, and audit it.

The TorchScript exporter leaves in a branch body Identity nodes that alias deduplicated
weights, Constant nodes, Shape/Gather/Unsqueeze chains computed once per use, successive
reshapes and Flatten. :func:`tidy` runs onnxscript's optimizer on the body alone
(constant folding, its rewrite rules such as Reshape-Reshape and Flatten -> Reshape,
removal of unused nodes, constants lifted to initializers, initializer deduplication,
common subexpression elimination) and keeps its input and output names.
:func:`redundancies` lists what is left of each kind in any part of a graph.

The base graph (the target) is never tidied: it must stay the target's own export, byte
for byte, so that detaching restores it and branch files made for it still attach.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx

from pnc.surgery.errors import ExportError

__all__ = ["tidy", "redundancies", "KINDS"]

#: the kinds of redundancy :func:`redundancies` reports
KINDS = (
    "identity",
    "constant",
    "duplicate",
    "dead",
    "chained_reshape",
    "unused_initializer",
    "duplicate_initializer",
)
_RESHAPES = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}
_RANDOM = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


def tidy(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` optimized by onnxscript, same inputs and outputs (ExportError if they changed).

    Deterministic: the same model gives the same bytes."""
    import onnxscript.optimizer  # slow to import; only exports need it

    ins, outs = [i.name for i in model.graph.input], [o.name for o in model.graph.output]
    tidied = onnxscript.optimizer.optimize(model)
    if [i.name for i in tidied.graph.input] != ins or [o.name for o in tidied.graph.output] != outs:
        raise ExportError(f"onnxscript's optimizer renamed the graph's inputs/outputs {ins}/{outs}; please report it")
    return tidied


def redundancies(graph: onnx.GraphProto, scope: Callable[[str], bool] = lambda name: True) -> dict[str, list[str]]:
    """Names of the redundant nodes and initializers of ``graph`` whose name ``scope`` accepts, by kind:

    * identity: Identity nodes; constant: Constant nodes (an initializer is enough);
    * duplicate: the same op, inputs and attributes as an earlier node of the graph (also
      one outside the scope: a branch recomputing what the target computes);
    * dead: no output read by a node nor a graph output;
    * chained_reshape: a Reshape/Flatten/Squeeze/Unsqueeze of another one's sole use;
    * unused_initializer, duplicate_initializer: read by no node; the same type, shape and
      bytes as an earlier one in scope.
    """
    found: dict[str, list[str]] = {k: [] for k in KINDS}
    producer = {x: n for n in graph.node for x in n.output}
    uses: dict[str, int] = {}
    for n in graph.node:
        for x in n.input:
            uses[x] = uses.get(x, 0) + 1
    outputs = {o.name for o in graph.output}
    seen: set[tuple] = set()
    for n in graph.node:
        key = (n.domain, n.op_type, tuple(n.input), tuple(a.SerializeToString() for a in n.attribute))
        fresh = key not in seen or n.op_type in _RANDOM
        seen.add(key)
        if not scope(n.name):
            continue
        if n.op_type == "Identity":
            found["identity"].append(n.name)
        if n.op_type == "Constant":
            found["constant"].append(n.name)
        if not fresh:
            found["duplicate"].append(n.name)
        if not any(x in outputs or uses.get(x) for x in n.output):
            found["dead"].append(n.name)
        source = producer.get(n.input[0]) if n.input else None
        if (
            n.op_type in _RESHAPES
            and source is not None
            and source.op_type in _RESHAPES
            and uses[n.input[0]] == 1
            and n.input[0] not in outputs
        ):
            found["chained_reshape"].append(n.name)
    contents: set[bytes] = set()
    for t in graph.initializer:
        if not scope(t.name):
            continue
        if not uses.get(t.name):
            found["unused_initializer"].append(t.name)
        unnamed = onnx.TensorProto()
        unnamed.CopyFrom(t)
        unnamed.ClearField("name")
        key = unnamed.SerializeToString()
        if key in contents:
            found["duplicate_initializer"].append(t.name)
        contents.add(key)
    return found
