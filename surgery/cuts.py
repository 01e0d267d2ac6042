"""Valid cut points of a traced model.

A *cut point* is a tensor node that dominates the output in the data-flow graph: every
path from the input to the output goes through it, so the model splits there into a
prefix and a suffix that exchange that one tensor. Cut points are listed input to output;
each one is *verified* by splitting the model there and checking that
``suffix(prefix(x))`` is ``torch.equal`` to ``model(x)``.

Block-level cut points (``blocks=True``) are coarser, the granularity at which the paper
searches an insertion position. The blocks of a model are, by the first rule that applies:

1. ``model.pnc_blocks``: a list of module paths the model declares;
2. its *stage container*: a stem (everything before the container) plus each child of the
   first ``nn.Sequential``/``nn.ModuleList`` named ``stages``, ``layers``, ``blocks`` or
   ``features`` with two or more children, found on the model or one level down (timm's
   ``blocks.i``, ``stages.i``, ``layers.i``; torchvision's ``features.i``);
3. ``layer1``, ``layer2``, ... children (ResNet style), plus the stem;
4. the modules of timm's ``feature_info`` (which start with the stem);
5. each top-level child of the model that holds parameters.

The first rule that yields two or more block cuts is used (a declared ``pnc_blocks`` always).

The cut of a block is the last cut point inside that module (for the stem: the last one
before the first block); blocks whose cut comes after the classifier's input (the head)
are left out.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
from torch import nn

from pnc.surgery.errors import CutError, PncError
from pnc.surgery.splitting import split
from pnc.surgery.tracing import TracedModel, default_input, evaluating, owning_module, trace

__all__ = [
    "CutPoint",
    "Classifier",
    "cut_points",
    "dominator_chain",
    "classifier_of",
    "block_rules",
    "verify_cut",
    "find_cut",
]

_STAGE_CONTAINERS = ("stages", "layers", "blocks", "features")
_PASS_THROUGH_MODULES = (nn.Identity, nn.Dropout, nn.Flatten)
_PASS_THROUGH_OPS = frozenset({"flatten", "view", "reshape", "squeeze", "contiguous", "clone"})
_CHANNEL_FIRST_MODULES = (
    nn.Conv2d,
    nn.ConvTranspose2d,
    nn.BatchNorm2d,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.InstanceNorm2d,
)


@dataclass(frozen=True)
class CutPoint:
    """A node through which all data flows from input to output.

    ``shape`` excludes the batch dimension. ``layout`` is "NCHW", "NHWC", "NLC" (tokens,
    ``prefix_tokens`` of them class/distillation tokens), "NC", "NCL" (channels then a
    flattened spatial axis) or "" when no rule applies. ``depth`` is the fraction of the
    model's ops computed before the cut, in [0, 1]; ``stage`` the timm ``feature_info``
    stage it falls in; ``block`` its index among the block-level cuts, if it is one.
    """

    node: str
    module: str
    shape: tuple[int, ...]
    layout: str
    prefix_tokens: int
    depth: float
    stage: int | None
    block: int | None
    verified: bool
    reason: str


@dataclass(frozen=True)
class Classifier:
    """The final linear (or 1x1 conv) layer; ``input_node`` is the pre-logits cut."""

    module: str
    node: str
    input_node: str
    num_classes: int
    in_features: int


# ---------------------------------------------------------------- dominators


def dominator_chain(traced: TracedModel) -> list[str]:
    """Tensor nodes that dominate the output, input to output (input and output excluded)."""
    source, sink = traced.input_node, traced.output_node
    idom = nx.immediate_dominators(traced.graph, source)
    chain: list[str] = []
    node = idom[sink]
    while node != source:
        chain.append(node)
        node = idom[node]
    ops = {n.name: n.op for n in traced.gm.graph.nodes}
    return [n for n in reversed(chain) if n in traced.shapes and ops[n].startswith("call_")]


# ---------------------------------------------------------------- layouts

_Tokens = tuple[str, ...]


def _axis(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _default_tokens(ndim: int) -> _Tokens:
    return {2: ("N", "C"), 3: ("N", "L", "C"), 4: ("N", "C", "H", "W")}.get(ndim, ("N",) + ("?",) * (ndim - 1))


def _reshaped(tokens: _Tokens, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> _Tokens:
    """Layout after a reshape: channels stay last (or second) if that axis keeps its size."""
    k = len(out_shape)
    if "C" in tokens and k >= 2:
        c = tokens.index("C")
        if c == len(tokens) - 1 and out_shape[-1] == in_shape[c]:
            return {2: ("N", "C"), 3: ("N", "L", "C"), 4: ("N", "H", "W", "C")}.get(
                k, ("N",) + ("?",) * (k - 2) + ("C",)
            )
        if c == 1 and out_shape[1] == in_shape[1]:
            return {2: ("N", "C"), 3: ("N", "C", "L"), 4: ("N", "C", "H", "W")}.get(k, ("N", "C") + ("?",) * (k - 2))
    return _default_tokens(k)


def _int(arg: object) -> int:
    """An fx argument that must be a Python int (an axis)."""
    if not isinstance(arg, int):
        raise TypeError(f"expected an int axis, got {arg!r}")
    return arg


def _dims_arg(node: fx.Node) -> list[int]:
    dims: Any = node.args[1:] if node.op == "call_method" else node.args[1:2]
    if "dims" in node.kwargs:
        dims = (node.kwargs["dims"],)
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = dims[0]
    return [int(d) for d in dims]


def _node_tokens(
    node: fx.Node, tokens: dict[str, _Tokens], shapes: dict[str, tuple[int, ...]], root: nn.Module
) -> _Tokens:
    shape = shapes[node.name]
    src = next((a for a in node.all_input_nodes if a.name in tokens), None)
    if node.op == "placeholder" or src is None:
        return _default_tokens(len(shape))
    t, in_shape = tokens[src.name], shapes[src.name]
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if node.op == "call_module":
        module = root.get_submodule(str(node.target))
        if len(shape) == 4 and (isinstance(module, _CHANNEL_FIRST_MODULES) or type(module).__name__.endswith("2d")):
            return ("N", "C", "H", "W")
        return t if len(shape) == len(t) else _default_tokens(len(shape))
    if name == "permute" and len(_dims_arg(node)) == len(t):
        return tuple(t[_axis(d, len(t))] for d in _dims_arg(node))
    if name in ("transpose", "swapaxes", "swapdims") and len(node.args) >= 3:
        a, b = _axis(_int(node.args[1]), len(t)), _axis(_int(node.args[2]), len(t))
        swapped = list(t)
        swapped[a], swapped[b] = t[b], t[a]
        return tuple(swapped)
    if name == "flatten" and len(shape) < len(t):
        start = _axis(_int(node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)), len(t))
        end = _axis(_int(node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)), len(t))
        merged = "".join(t[start : end + 1])
        merged = "C" if "C" in merged else merged  # channels absorb what is flattened into them
        return t[:start] + (merged,) + t[end + 1 :]
    if name in ("reshape", "view", "unflatten"):
        return _reshaped(t, in_shape, shape)
    if len(shape) == len(t):
        return t
    if len(shape) == 2 and "C" in t and shape[1] == in_shape[t.index("C")]:
        return ("N", "C")  # pooled over everything but channels
    return _default_tokens(len(shape))


def _layout_name(tokens: _Tokens) -> str:
    if tokens[0] != "N" or tokens.count("C") != 1 or len(tokens) not in (2, 3, 4):
        return ""
    if tokens[-1] == "C":
        return {2: "NC", 3: "NLC", 4: "NHWC"}[len(tokens)]
    if tokens[1] == "C":
        return {3: "NCL", 4: "NCHW"}[len(tokens)]
    return ""


def _layouts(traced: TracedModel) -> dict[str, str]:
    tokens: dict[str, _Tokens] = {}
    for node in traced.gm.graph.nodes:
        if node.name in traced.shapes and node.op != "get_attr":
            tokens[node.name] = _node_tokens(node, tokens, traced.shapes, traced.gm)
    return {name: _layout_name(t) for name, t in tokens.items()}


def _prefix_tokens(model: nn.Module, shape: tuple[int, ...]) -> int:
    """Class/distillation tokens in an NLC tensor of ``shape`` (batch included)."""
    count = getattr(model, "num_prefix_tokens", 0)
    if not isinstance(count, int) or count <= 0 or shape[1] <= count:
        return 0
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    patches = shape[1] - count
    if grid is not None and patches == math.prod(grid):
        return count
    return count if grid is None and math.isqrt(patches) ** 2 == patches else 0


# ---------------------------------------------------------------- stages and blocks


def _within(module: str, path: str) -> bool:
    return module == path or module.startswith(path + ".")


def _feature_modules(model: nn.Module) -> list[str]:
    info = getattr(model, "feature_info", None)
    if info is None:
        return []
    entries = info.info if hasattr(info, "info") else info
    return [str(e["module"]) for e in entries if isinstance(e, dict) and "module" in e]


def _last_node_in(modules: dict[str, str], order: dict[str, int], path: str) -> int | None:
    inside = [order[n] for n, m in modules.items() if _within(m, path)]
    return max(inside) if inside else None


def _stage_container(model: nn.Module) -> str | None:
    candidates = [("", model)] + [(name, child) for name, child in model.named_children()]
    for prefix, parent in candidates:
        for name in _STAGE_CONTAINERS:
            child = getattr(parent, name, None)
            if isinstance(child, (nn.Sequential, nn.ModuleList)) and len(child) >= 2:
                return f"{prefix}.{name}" if prefix else name
    return None


def block_rules(model: nn.Module) -> list[tuple[list[str], bool]]:
    """Candidate block lists, by rule (see the module docstring): (module paths, stem before them)."""
    declared = getattr(model, "pnc_blocks", None)
    if declared is not None:
        return [([str(p) for p in declared], False)]
    rules = []
    container = _stage_container(model)
    if container is not None:
        rules.append(([f"{container}.{name}" for name, _ in model.get_submodule(container).named_children()], True))
    layers = sorted(
        (name for name, _ in model.named_children() if re.fullmatch(r"layer\d+", name)), key=lambda n: int(n[5:])
    )
    if len(layers) >= 2:
        rules.append((layers, True))
    features = _feature_modules(model)
    if features:
        rules.append((features, False))
    rules.append(([name for name, child in model.named_children() if any(True for _ in child.parameters())], False))
    return rules


def _block_cuts(
    traced: TracedModel, chain: list[str], modules: dict[str, str], order: dict[str, int], head_at: int
) -> list[tuple[str, str]]:
    """(module path, cut node) per block, in order, before the head: by the first rule giving two or more."""
    found: list[tuple[str, str]] = []
    for paths, has_stem in block_rules(traced.model):
        found = []
        first_block_start = min(
            (order[n] for n, m in modules.items() if any(_within(m, p) for p in paths)), default=None
        )
        if has_stem and first_block_start is not None:
            stem = [n for n in chain if order[n] < first_block_start]
            if stem:
                found.append((modules[stem[-1]].split(".")[0] or "stem", stem[-1]))
        for path in paths:
            inside = [n for n in chain if _within(modules[n], path)]
            if inside and order[inside[-1]] <= head_at and all(c != inside[-1] for _, c in found):
                found.append((path, inside[-1]))
        if len(found) >= 2:
            break
    return found


# ---------------------------------------------------------------- classifier


def classifier_of(traced: TracedModel) -> Classifier:
    """The nn.Linear (or 1x1 Conv2d) producing the output, through flatten/dropout/identity."""
    index = {n.name: n for n in traced.gm.graph.nodes}
    node = index[traced.output_node]
    while True:
        module = traced.gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1)):
            break
        passes = isinstance(module, _PASS_THROUGH_MODULES) or (
            node.op in ("call_method", "call_function")
            and getattr(node.target, "__name__", node.target) in _PASS_THROUGH_OPS
        )
        inputs = [a for a in node.all_input_nodes if a.name in traced.shapes]
        if not passes or len(inputs) != 1:
            raise CutError(
                f"no classifier found in {type(traced.model).__name__}: the output comes from {node.name!r} "
                f"({node.op} {node.target}), not from an nn.Linear or 1x1 nn.Conv2d through flatten/dropout."
            )
        node = inputs[0]
    feed = [a for a in node.all_input_nodes if a.name in traced.shapes]
    if len(feed) != 1 or feed[0].name not in dominator_chain(traced):
        raise CutError(f"the input of classifier {node.target!r} is not a single cut point of the graph.")
    if isinstance(module, nn.Linear):
        num_classes, in_features = module.out_features, module.in_features
    else:
        num_classes, in_features = int(module.out_channels), int(module.in_channels)
    return Classifier(
        module=str(node.target),
        node=node.name,
        input_node=feed[0].name,
        num_classes=num_classes,
        in_features=in_features,
    )


# ---------------------------------------------------------------- cut points


def verify_cut(traced: TracedModel, node: str, reference: torch.Tensor) -> str:
    """ "" if suffix(prefix(x)) equals ``reference`` exactly at ``node``, else why not."""
    try:
        prefix, suffix = split(traced, node)
        with evaluating(traced.model), torch.no_grad():
            out = suffix(prefix(traced.example_input))
    except PncError as err:
        return str(err)
    except Exception as err:  # a piece that fails to run is an unverified cut, not a crash
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    if out.shape != reference.shape:
        return f"split output has shape {tuple(out.shape)}, model output {tuple(reference.shape)}"
    if not torch.equal(out, reference):
        return f"split output differs from model(x) by up to {(out - reference).abs().max().item():.3g}"
    return ""


def cut_points(
    model_or_traced: nn.Module | TracedModel,
    input_size: tuple[int, int, int] | None = None,
    *,
    example_input: torch.Tensor | None = None,
    blocks: bool = False,
    verify: bool = True,
) -> list[CutPoint]:
    """The model's cut points, input to output; ``blocks=True`` keeps one per block.

    A model is traced on ``example_input`` or on a seeded random batch of ``input_size``
    (C, H, W), by default the model's timm ``input_size``. Each cut's ``shape`` is the
    tensor's shape without the batch axis.

    >>> from pnc.surgery.examples import tiny_cnn
    >>> [(c.node, c.shape, c.layout) for c in cut_points(tiny_cnn(3, seed=0), (1, 8, 8), blocks=True)]
    [('conv', (4, 6, 6), 'NCHW'), ('conv2', (4, 4, 4), 'NCHW')]
    """
    if isinstance(model_or_traced, TracedModel):
        traced = model_or_traced
    else:
        x = example_input if example_input is not None else default_input(model_or_traced, input_size)
        traced = trace(model_or_traced, x)
    chain = dominator_chain(traced)
    order = {n.name: i for i, n in enumerate(traced.gm.graph.nodes)}
    compute = [n.name for n in traced.gm.graph.nodes if n.op.startswith("call_")]
    position = {name: i for i, name in enumerate(compute)}
    modules = {n.name: owning_module(n) for n in traced.gm.graph.nodes if n.op.startswith("call_")}
    layouts = _layouts(traced)
    stage_ends = [_last_node_in(modules, order, m) for m in _feature_modules(traced.model)]
    try:
        head_at = order[classifier_of(traced).input_node]
    except CutError:
        head_at = order[traced.output_node]
    block_of = {node: i for i, (_, node) in enumerate(_block_cuts(traced, chain, modules, order, head_at))}
    selected = [name for name in chain if name in block_of or not blocks]
    with evaluating(traced.model), torch.no_grad():
        reference = traced.model(traced.example_input) if verify else None
        reasons = {
            n: verify_cut(traced, n, reference) if reference is not None else "not verified (verify=False)"
            for n in selected
        }
    cuts = []
    for name in selected:
        shape = traced.shapes[name]
        stage = next((i for i, end in enumerate(stage_ends) if end is not None and order[name] <= end), None)
        reason = reasons[name]
        cuts.append(
            CutPoint(
                node=name,
                module=modules[name],
                shape=tuple(shape[1:]),
                layout=layouts.get(name, ""),
                prefix_tokens=_prefix_tokens(traced.model, shape) if layouts.get(name) == "NLC" else 0,
                depth=position[name] / max(len(compute) - 1, 1),
                stage=stage,
                block=block_of.get(name),
                verified=reason == "",
                reason=reason,
            )
        )
    return cuts


def find_cut(cuts: Sequence[CutPoint], name: str) -> CutPoint:
    """The cut named ``name``: a node name (``layer2_1_act2``), a module path as ``pnc cuts``
    prints it (``layer2.1.act2``; a container such as ``layer2`` means the last cut inside
    it), or ``first`` / ``last`` (block cuts). Raises CutError listing close matches.

    >>> from pnc.surgery.examples import tiny_cnn
    >>> cuts = cut_points(tiny_cnn(3, seed=0), (1, 8, 8))
    >>> find_cut(cuts, "conv2").node, find_cut(cuts, "relu2").shape
    ('conv2', (4, 4, 4))
    """
    by_node = {c.node: c for c in cuts}
    blocks = [c for c in cuts if c.block is not None]
    if name in ("first", "last") and blocks:
        return blocks[0] if name == "first" else blocks[-1]
    if name in by_node:
        return by_node[name]
    inside = [c for c in cuts if c.module == name or c.module.startswith(name + ".")]
    if inside:
        return inside[-1]
    known = list(by_node) + sorted({c.module for c in cuts})
    near = difflib.get_close_matches(name, known, n=6, cutoff=0.4)
    raise CutError(
        f"{name!r} is neither a cut point nor a module holding one"
        + (f"; did you mean {', '.join(near)}?" if near else "")
        + (f"; the block cuts are {', '.join(c.node for c in blocks)}" if blocks else "")
        + ". List every cut with `pnc cuts MODEL` (node and module columns)."
    )
