"""Trace a backbone into an fx graph and a data-flow graph, specialised to one input shape.

The tracer is torch.fx's, with timm's leaf modules and autowrapped functions, plus
*concrete evaluation*: every node is also executed on the example input while it is
traced. Reads of tensor metadata (``x.shape``, ``x.size(1)``, ``x.dim()``, ``len(x)``,
``x.dtype``, ``x.device``) therefore return plain Python values instead of graph nodes,
so ``B, N, C = x.shape`` becomes constants, shape-dependent Python branches are taken
as they would be for that input, and the data-flow graph has no edge that carries only
a shape. Branches on tensor *values* still fail: they are data-dependent.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import operator
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
from torch import nn
from torch.fx import _symbolic_trace
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
from torch.fx.proxy import Attribute

from pnc.surgery.batch import BATCH_META, BatchDim, batch_dims, generalise_batch
from pnc.surgery.devices import device_of
from pnc.surgery.errors import TraceError

__all__ = ["TracedModel", "BatchDim", "trace", "owning_module", "default_input", "evaluating", "is_batch_node"]

#: layers kept whole even when subclassed (timm's Linear, Conv2dSame, ...): one node per layer
_LAYER_TYPES = (nn.Linear, nn.modules.conv._ConvNd)
#: tensor methods that only read metadata; traced as their value for the example input
_METADATA_METHODS = frozenset(
    {
        "size",
        "dim",
        "ndimension",
        "numel",
        "nelement",
        "element_size",
        "stride",
        "storage_offset",
        "get_device",
        "is_contiguous",
        "is_floating_point",
        "is_complex",
    }
)
#: ops whose result depends on their tensor arguments' shape/dtype only (folded to constants)
_SHAPE_ONLY_FUNCTIONS = frozenset(
    {
        torch.zeros_like,
        torch.ones_like,
        torch.empty_like,
        torch.full_like,
        torch.numel,
    }
)
_SHAPE_ONLY_METHODS = frozenset({"new_zeros", "new_ones", "new_empty", "new_full", "new_tensor"})


@dataclass
class TracedModel:
    """A model traced for one input shape (C, H, W), at any batch size.

    Shapes are specialised to the example input, except the batch: a shape read that
    changes with the batch size becomes ``scale * x.size(0) + offset`` in the graph
    (found by tracing at two batch sizes). Where that fails (a Python branch on the batch
    size), ``batch_size`` says the one batch size the graph is valid for. ``gm`` shares the
    model's parameters and buffers (no copies); ``graph`` is the data
    flow between fx node names (edge u -> v when v reads u's value); ``shapes`` maps every
    tensor-valued node to its shape *including* the batch dimension.
    """

    gm: fx.GraphModule
    graph: nx.DiGraph
    shapes: dict[str, tuple[int, ...]]
    example_input: torch.Tensor
    model: nn.Module
    #: where each tensor node carries the batch (absent: it does not depend on the batch size)
    batch_dims: dict[str, BatchDim] = field(default_factory=dict)
    #: None if the graph (and every piece cut from it) runs at any batch size, else the one it needs
    batch_size: int | None = None

    @property
    def input_node(self) -> str:
        """Name of the placeholder that receives the model input."""
        return next(n.name for n in self.gm.graph.nodes if n.op == "placeholder")

    @property
    def output_node(self) -> str:
        """Name of the node whose value the model returns (the logits for a classifier)."""
        out = next(n for n in self.gm.graph.nodes if n.op == "output")
        value = out.args[0]
        if not isinstance(value, fx.Node):
            raise TraceError(
                f"{type(self.model).__name__} returns {type(value).__name__}, not one tensor; "
                "wrap it in a module whose forward returns the tensor to cut through."
            )
        return value.name

    def node(self, name: str) -> fx.Node:
        """The fx node called ``name`` (KeyError if absent)."""
        return _node_index(self.gm)[name]


def is_batch_node(node: fx.Node) -> bool:
    """True for the batch-size scalar and the arithmetic on it (not data flow)."""
    return bool(node.meta.get(BATCH_META))


def owning_module(node: fx.Node) -> str:
    """Path of the innermost module whose forward created ``node`` ("" for the root)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


def _node_index(gm: fx.GraphModule) -> dict[str, fx.Node]:
    return {n.name: n for n in gm.graph.nodes}


def _value(arg: Any) -> Any:
    """Replace every proxy inside ``arg`` by its concrete value."""
    return fx.node.map_aggregate(arg, lambda a: a.value if isinstance(a, fx.Proxy) else a)


class _ConcreteProxy(fx.Proxy):
    """A proxy that also carries the value its node takes on the example input."""

    value: Any
    tracer: _ConcreteTracer

    def __getattr__(self, k: str) -> Any:
        if k == "value" or (k.startswith("__") and k.endswith("__")):
            raise AttributeError(k)
        attr = getattr(self.value, k)
        if isinstance(attr, torch.Tensor) or callable(attr):
            return _ConcreteAttribute(self, k)
        self.tracer.shape_reads += k in ("shape", "ndim")
        return attr  # metadata: shape, ndim, dtype, device, requires_grad, ...

    def __len__(self) -> int:
        self.tracer.shape_reads += isinstance(self.value, torch.Tensor)
        return len(self.value)

    def __iter__(self) -> Iterator[Any]:
        for i in range(len(self.value)):
            yield self[i]  # type: ignore[index]  # fx.Proxy's magic methods are added at runtime

    def __bool__(self) -> bool:
        module = self.tracer.current_module()
        raise TraceError(
            f"data-dependent control flow in {module}: a Python `if`/`while`/`and`/`or` "
            "reads the value of a tensor, which a graph cannot record." + _leaf_hint(self.tracer.current_module_type())
        )


class _ConcreteAttribute(_ConcreteProxy, Attribute):
    """``proxy.attr`` for tensor-valued attributes and methods (resolved lazily, as in fx)."""

    @property
    def value(self) -> Any:
        return getattr(self.root.value, self.attr)


def _leaf_hint(cls: type | None) -> str:
    if cls is None:
        return " Fix the model's forward so that it does not branch on tensor values."
    return (
        f" Mark the module a leaf so that it is called as one opaque op: "
        f"`timm.layers.register_notrace_module({cls.__module__}.{cls.__qualname__})` "
        f"before tracing, or pass `leaf_modules=[{cls.__qualname__}]` to pnc.surgery.tracing.trace()."
    )


class _ConcreteTracer(fx.Tracer):
    """torch.fx tracer that evaluates each node on concrete values while recording it."""

    leaf_types: tuple[type, ...]

    def __init__(self, leaf_modules: Sequence[type], autowrap_functions: Sequence[Callable], inputs: dict[str, Any]):
        super().__init__(autowrap_modules=(math,), autowrap_functions=tuple(autowrap_functions))
        self.leaf_types = (*_LAYER_TYPES, *leaf_modules)
        self.inputs = inputs
        self.shape_reads = 0  # metadata reads specialised to constants (0: nothing depends on shapes)

    def current_module(self) -> str:
        if not self.module_stack:
            return "the model's own forward"
        path, cls = next(reversed(self.module_stack.values()))
        return f"module '{path}' ({cls.__qualname__})"

    def current_module_type(self) -> type | None:
        return next(reversed(self.module_stack.values()))[1] if self.module_stack else None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, module_qualified_name)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ConcreteProxy(node, self)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        if kind == "call_method" and (target in _METADATA_METHODS or target in _SHAPE_ONLY_METHODS):
            self.shape_reads += 1
            return getattr(_value(args[0]), target)(*_value(args[1:]), **_value(kwargs))
        if kind == "call_function" and target in _SHAPE_ONLY_FUNCTIONS:
            self.shape_reads += 1
            return target(*_value(args), **_value(kwargs))
        if kind == "call_method" and target == "type_as":  # only the other tensor's dtype is read
            return self.create_proxy("call_method", "to", (args[0], _value(args[1]).dtype), {})
        value = self._evaluate(kind, target, args, kwargs)
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        proxy.value = value  # type: ignore[attr-defined]  # proxy_factory_fn makes a _ConcreteProxy
        return proxy

    def _evaluate(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        args, kwargs = _value(args), _value(kwargs)
        if kind == "call_method" or (kind == "call_function" and _is_builtin_op(target)):
            return self._run(kind, target, args, kwargs)
        with _eager():  # modules, attributes and user functions run as in eager mode
            return self._run(kind, target, args, kwargs)

    def _run(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        if kind == "placeholder":
            return self.inputs[target] if target in self.inputs else (args[0] if args else None)
        if kind == "get_attr":
            obj: Any = self.root
            for part in str(target).split("."):
                obj = getattr(obj, part)
            return obj
        if kind == "call_module":
            return self.root.get_submodule(target)(*args, **kwargs)
        if kind == "call_function":
            return target(*args, **kwargs)
        if kind == "call_method":
            return getattr(args[0], target)(*args[1:], **kwargs)
        raise TraceError(f"unexpected fx node kind {kind!r} while tracing")


def _is_builtin_op(fn: Any) -> bool:
    module = getattr(fn, "__module__", None) or ""
    return module.split(".")[0] in ("torch", "_operator", "operator", "builtins", "math")


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block, then restore each module's training flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def _preserved_state(model: nn.Module) -> Iterator[None]:
    """Undo what a forward stores on its modules (caches such as LeViT's attention biases)."""
    saved = []
    for module in model.modules():
        state = {k: v for k, v in vars(module).items() if not k.startswith("_")}
        saved.append((module, state, {k: copy.copy(v) for k, v in state.items() if isinstance(v, (dict, list, set))}))
    try:
        yield
    finally:
        for module, state, containers in saved:
            for k in [k for k in vars(module) if not k.startswith("_") and k not in state]:
                delattr(module, k)
            for k, v in state.items():
                if k in containers:
                    v.clear()
                    if isinstance(v, list):
                        v.extend(containers[k])
                    else:
                        v.update(containers[k])
                if vars(module).get(k) is not v:
                    vars(module)[k] = v


@contextlib.contextmanager
def _eager() -> Iterator[None]:
    """Undo fx's patches of ``nn.Module.__call__``/``__getattr__`` to run ops for real."""
    patched = nn.Module.__call__, nn.Module.__getattr__
    tracing = _symbolic_trace._get_is_fx_tracing()
    nn.Module.__call__, nn.Module.__getattr__ = (  # type: ignore[method-assign]
        _symbolic_trace._orig_module_call,
        _symbolic_trace._orig_module_getattr,
    )
    _symbolic_trace._set_is_fx_tracing(False)
    try:
        yield
    finally:
        nn.Module.__call__, nn.Module.__getattr__ = patched  # type: ignore[method-assign]
        _symbolic_trace._set_is_fx_tracing(tracing)


def default_input(model: nn.Module, input_size: tuple[int, int, int] | None = None, batch: int = 2) -> torch.Tensor:
    """A seeded random batch (batch, C, H, W) on the model's device (drawn on the CPU: the same
    values on every device); size from ``input_size`` or the model's timm config."""
    if input_size is None:
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        input_size = cfg.get("input_size")
    if input_size is None:
        raise TraceError(
            f"{type(model).__name__} does not declare its input size; pass input_size=(C, H, W) "
            "or example_input=torch.randn(2, C, H, W)."
        )
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, *input_size, generator=generator, device=generator.device).to(device_of(model))


def _timm_leaves() -> tuple[list[type], list[Callable]]:
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:  # timm is a dependency, but a user's own model does not need it
        return [], []
    return list(get_notrace_modules()), [f for f in get_notrace_functions() if callable(f)]


def _concrete_args(model: nn.Module) -> tuple[str, dict[str, Any]]:
    """Name of forward's first argument, and every other argument fixed to its default."""
    params = list(inspect.signature(model.forward).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not positional:
        raise TraceError(f"{type(model).__name__}.forward takes no positional input tensor.")
    concrete: dict[str, Any] = {}
    for p in params[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is inspect.Parameter.empty:
            raise TraceError(
                f"{type(model).__name__}.forward needs argument {p.name!r} besides the input; "
                "wrap the model in a module whose forward takes the input tensor only."
            )
        concrete[p.name] = p.default
    return positional[0].name, concrete


def _drop_concrete_placeholders(graph: fx.Graph) -> None:
    """Remove the placeholders fx makes for concrete args (and the asserts on them)."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for ph in placeholders[1:]:
        checks, frontier = [ph], list(ph.users)
        while frontier:
            node = frontier.pop()
            if node.op == "output":
                raise TraceError(
                    f"forward argument {ph.name!r} is returned; trace a forward that returns tensors only."
                )
            if node not in checks:
                checks.append(node)
                frontier.extend(node.users)
        for node in sorted(checks, key=_topo_index(graph), reverse=True):
            graph.erase_node(node)


def _topo_index(graph: fx.Graph) -> Callable[[fx.Node], int]:
    order = {n: i for i, n in enumerate(graph.nodes)}
    return order.__getitem__


def _eliminate_dead_code(graph: fx.Graph) -> None:
    """DCE that keeps in-place tensor methods (``x.add_(y)``), whose result may go unused."""
    for node in reversed(list(graph.nodes)):
        if node.users or node.op in ("placeholder", "output"):
            continue
        if _mutates_first_arg(node) or (node.op != "call_method" and node.is_impure()):
            continue
        graph.erase_node(node)


def _mutates_first_arg(node: fx.Node) -> bool:
    return (node.op == "call_method" and str(node.target).endswith("_") and not str(node.target).startswith("__")) or (
        node.op == "call_function" and node.target is operator.setitem
    )


def _dataflow(gm: fx.GraphModule) -> nx.DiGraph:
    """Edge u -> v when v reads u; an in-place op on u also feeds every later reader of u."""
    graph = nx.DiGraph()
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in gm.graph.nodes:
        if is_batch_node(node):
            continue
        graph.add_node(node.name, op=node.op)
        for src in node.all_input_nodes:
            if not is_batch_node(src):
                graph.add_edge(src.name, node.name)
        if _mutates_first_arg(node) and isinstance(node.args[0], fx.Node):
            for reader in node.args[0].users:
                if order[reader] > order[node]:
                    graph.add_edge(node.name, reader.name)
    return graph


def _shapes(gm: fx.GraphModule) -> dict[str, tuple[int, ...]]:
    return {
        n.name: tuple(n.meta["tensor_meta"].shape)
        for n in gm.graph.nodes
        if isinstance(n.meta.get("tensor_meta"), TensorMetadata)
    }


def _trace_once(model: nn.Module, x: torch.Tensor, leaf_modules: Sequence[type]) -> tuple[fx.GraphModule, int]:
    """fx-trace ``model`` on ``x`` with concrete evaluation, dead code removed; and its number of shape reads."""
    input_name, concrete = _concrete_args(model)
    timm_modules, timm_functions = _timm_leaves()
    tracer = _ConcreteTracer([*timm_modules, *leaf_modules], timm_functions, {input_name: x.detach().clone()})
    own_attrs = set(vars(model))
    try:
        with _preserved_state(model):
            graph = tracer.trace(model, concrete_args=concrete or None)
        gm = fx.GraphModule(model, graph, type(model).__name__)
    except TraceError:
        raise
    except Exception as err:  # torch.fx raises many types; name where it happened
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        _check_runs_eagerly(model, x)
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}: in {tracer.current_module()}: "
            f"{type(err).__name__}: {first_line}." + _leaf_hint(tracer.current_module_type())
        ) from err
    finally:
        for name in set(vars(model)) - own_attrs:  # fx parks tensor constants on the root
            delattr(model, name)
    _drop_concrete_placeholders(gm.graph)
    _eliminate_dead_code(gm.graph)
    gm.graph.lint()
    gm.recompile()
    return gm, tracer.shape_reads


def _check_runs_eagerly(model: nn.Module, x: torch.Tensor) -> None:
    """Raise TraceError if the model itself fails on ``x``: then no tracer is to blame."""
    try:
        with _preserved_state(model):
            model(x)
    except Exception as err:
        lines = str(err).strip().splitlines()
        raise TraceError(
            f"{type(model).__name__} does not run on an input of shape {tuple(x.shape)}: {type(err).__name__}: "
            f"{lines[0] if lines else ''}. Use an input size the model accepts (input_size=(C, H, W), "
            "or `--input-size C,H,W` on the command line)."
        ) from err


def trace(model: nn.Module, example_input: torch.Tensor, leaf_modules: Sequence[type] = ()) -> TracedModel:
    """Trace ``model`` in eval mode for inputs shaped like ``example_input`` (B, C, H, W), which
    is moved to the model's device (``TracedModel.example_input`` is that copy).

    Modules of the types in ``leaf_modules`` (and timm's registered no-trace modules)
    become single ``call_module`` nodes. The model's training flag is restored and its
    parameters and buffers are left untouched. Raises TraceError naming the module or op
    that torch.fx could not trace.

    >>> from pnc.surgery.examples import tiny_cnn
    >>> traced = trace(tiny_cnn(3, seed=0), torch.randn(2, 1, 8, 8))
    >>> traced.shapes["conv2"], traced.shapes["flat"]   # node name -> shape at this batch
    ((2, 4, 4, 4), (2, 4))
    """
    x1 = example_input = example_input.to(device_of(model))
    x2 = torch.cat([x1, x1[:1]])  # one more sample: shape reads that move with the batch
    batches = (x1.shape[0], x2.shape[0])
    with evaluating(model), torch.no_grad(), _preserved_state(model):
        gm, shape_reads = _trace_once(model, x1, leaf_modules)
        fixed, graph = gm.graph, gm.graph
        if shape_reads:  # trace again one sample larger to see which constants are the batch size
            graph = generalise_batch(gm, _trace_once(model, x2, leaf_modules)[0], batches)
        large: dict[str, tuple[int, ...]] = {}
        if graph is not None:
            if graph is not fixed:
                gm.graph = graph
            if _same_output(ShapeProp(gm).propagate(x2), model(x2)):
                large = _shapes(gm)
            else:
                gm.graph = fixed
        batch_size = None if large else batches[0]
        same = _same_output(ShapeProp(gm).propagate(x1), model(x1))
    if not same:
        raise TraceError(
            f"the traced graph of {type(model).__name__} does not reproduce model(x) exactly "
            "(a module with hidden state or randomness in eval mode?); mark it a leaf with leaf_modules=[...]."
        )
    shapes = _shapes(gm)
    return TracedModel(
        gm=gm,
        graph=_dataflow(gm),
        shapes=shapes,
        example_input=example_input,
        model=model,
        batch_dims=batch_dims(shapes, large, batches),
        batch_size=batch_size,
    )


def _same_output(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_output(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_output(a[k], b[k]) for k in a)
    return a == b
