"""Export a model, or a cloned network with detachable branches, to ONNX.

Opset 17 by default (``OPSET``), TorchScript exporter (``torch.onnx.export(...,
dynamo=False)``, deterministic: the same model gives the same bytes), a dynamic batch
axis, input ``input`` (batch, C, H, W) and output ``logits`` (batch, |T_t|).

A :class:`~pnc.surgery.cloned.ClonedNetwork` exports as:

* the **base graph**: its target, byte for byte as exporting the target alone;
* each **branch** exported on its own, (cut, target pre-logits) -> (correction, new
  logits), with its transferable module structurally pruned, names prefixed
  ``<branch>/``, its inputs wired to the base's tensors at the branch's target cut and
  at the target's pre-logits. fx node names do not survive export, so those tensors are
  found numerically: every intermediate value of the base is run in onnxruntime on a
  probe input and matched (same shape, allclose) to the fx tensor computed in PyTorch;
* a combiner, output ``cloned_logits`` (batch, |T_t| + sum |T_s|) equal to the
  network's forward; ``logits`` stays the target's own output.

A detach manifest (``pnc.surgery.onnx_merge``) in ``metadata_props`` lets
:func:`pnc.surgery.onnx_detach.detach_onnx` remove branches and restore the base exactly.

Example: see :func:`export_onnx`.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn

from pnc.surgery.cloned import ClonedNetwork
from pnc.surgery.devices import cpu_copy
from pnc.surgery.errors import ExportError
from pnc.surgery.io import atomic_write_bytes
from pnc.surgery.onnx_merge import CLONED_OUTPUT, BranchGraph, merge
from pnc.surgery.tracing import evaluating

__all__ = [
    "OPSET",
    "OPSETS",
    "check_opset",
    "INPUT",
    "LOGITS",
    "RTOL",
    "ATOL",
    "export_onnx",
    "to_onnx",
    "torch_to_onnx",
    "locate_tensors",
    "session",
    "run",
]

OPSET = 17
#: opsets that work end to end here: the TorchScript exporter supports at most 20 (it warns
#: above), a clone's branches need at least 9 (below, its Flatten/Gemm export fails), and
#: onnxruntime runs every one of them (checked on cnn4, lenet5, resnetc20 and a clone)
OPSETS = range(9, 21)
INPUT, LOGITS = "input", "logits"
#: tolerance of ONNX vs PyTorch values (matching cut tensors and verifying the export)
RTOL, ATOL = 1e-3, 1e-5


def export_onnx(model: nn.Module | ClonedNetwork, path: str | Path, example_input: Tensor, opset: int = OPSET) -> Path:
    """Write ``model`` as ONNX to ``path`` (atomically) and return the path.

    Args:
        model: a classifier (B, C, H, W) -> (B, K), or a ClonedNetwork (its branches
            become detachable; with none it exports as its target).
        example_input: (B, C, H, W); only its shape (C, H, W) matters, the batch axis is dynamic.
        opset: ONNX opset of the default domain.

    A model on another device is exported from a CPU copy: the same bytes on every device.

    >>> import tempfile, onnx
    >>> from pnc.surgery import detach_onnx
    >>> from pnc.surgery.examples import tiny_clone
    >>> net, target, source, images = tiny_clone()
    >>> folder = Path(tempfile.mkdtemp())
    >>> path = export_onnx(net, folder / "clone.onnx", images[:1])
    >>> [o.name for o in onnx.load(path).graph.output]   # (B, 3) and (B, 3 + 1)
    ['logits', 'cloned_logits']
    >>> base = detach_onnx(path, None, folder / "base.onnx")
    >>> base.read_bytes() == export_onnx(target, folder / "target.onnx", images[:1]).read_bytes()
    True
    """
    proto = to_onnx(model, example_input, opset)
    path = Path(path)
    atomic_write_bytes(path, proto.SerializeToString())
    return path


def check_opset(opset: int) -> int:
    """``opset`` if it is in :data:`OPSETS`, else ExportError (before any export is tried)."""
    if isinstance(opset, bool) or not isinstance(opset, int) or opset not in OPSETS:
        raise ExportError(f"opset {opset!r} is not supported: use {OPSETS.start}-{OPSETS.stop - 1} (default {OPSET})")
    return opset


def to_onnx(model: nn.Module | ClonedNetwork, example_input: Tensor, opset: int = OPSET) -> onnx.ModelProto:
    """The ModelProto :func:`export_onnx` writes (from a CPU copy of a model on another device)."""
    check_opset(opset)
    model, example_input = cpu_copy(model), example_input.cpu()
    if isinstance(model, ClonedNetwork) and model.branches:
        with evaluating(model):
            return _clone_to_onnx(model, example_input, opset)
    if isinstance(model, ClonedNetwork):
        model = model.target
    return torch_to_onnx(model, (example_input,), [INPUT], [LOGITS], opset)


def torch_to_onnx(
    module: nn.Module, args: tuple[Tensor, ...], inputs: list[str], outputs: list[str], opset: int = OPSET
) -> onnx.ModelProto:
    """TorchScript export with a dynamic batch axis on every input and output."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # dynamo=False: we want its determinism
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        try:
            torch.onnx.export(
                module,
                args,
                buffer,  # type: ignore[arg-type]  # a BytesIO is accepted
                dynamo=False,
                input_names=inputs,
                output_names=outputs,
                opset_version=opset,
                dynamic_axes={n: {0: "batch"} for n in inputs + outputs},
            )
        except (RuntimeError, torch.onnx.errors.OnnxExporterError) as err:
            raise ExportError(
                f"torch.onnx could not export {type(module).__name__} at opset {opset}: {err}; try another --opset"
            ) from err
    return onnx.load_from_string(buffer.getvalue())


def session(model: onnx.ModelProto, optimize: bool = True) -> ort.InferenceSession:
    """A single-threaded CPU onnxruntime session (``optimize=False``: no graph rewrites)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto, x: Tensor, outputs: list[str] | None = None) -> dict[str, np.ndarray]:
    """Run ``model`` on x (B, C, H, W): {output name: value}."""
    sess = session(model)
    names = outputs or [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {sess.get_inputs()[0].name: x.numpy()})))


def _close(onnx_value: np.ndarray, torch_value: np.ndarray) -> bool:
    return onnx_value.shape == torch_value.shape and np.allclose(onnx_value, torch_value, rtol=RTOL, atol=ATOL)


def locate_tensors(base: onnx.ModelProto, probe: Tensor, wanted: dict[str, Tensor]) -> dict[str, str]:
    """ONNX tensor name of each fx tensor in ``wanted`` ({key: value on ``probe``}).

    Runs ``base`` in onnxruntime (no graph rewrites) with every float intermediate value
    exposed as an output; a key's tensor is the value with its shape that is allclose to
    it, the closest one if several are (the earliest on a tie). ExportError if none is."""
    inferred = onnx.shape_inference.infer_shapes(base)
    types = {v.name: v.type for v in (*inferred.graph.value_info, *inferred.graph.output)}
    names = [
        x
        for n in base.graph.node
        for x in n.output
        if x in types and types[x].tensor_type.elem_type == onnx.TensorProto.FLOAT
    ]
    probing = onnx.ModelProto()
    probing.CopyFrom(base)
    del probing.graph.output[:]
    probing.graph.output.extend(onnx.helper.make_value_info(x, types[x]) for x in names)
    sess = session(probing, optimize=False)
    values = dict(zip(names, sess.run(names, {sess.get_inputs()[0].name: probe.numpy()})))
    found = {}
    for key, tensor in wanted.items():
        ref = tensor.detach().numpy()
        matches = [(float(np.abs(v - ref).max()), i, x) for i, (x, v) in enumerate(values.items()) if _close(v, ref)]
        if not matches:
            same = [x for x, v in values.items() if v.shape == ref.shape]
            raise ExportError(
                f"no tensor of the exported graph matches fx node {key!r} (shape {tuple(ref.shape)}; "
                f"{len(same)} have that shape, none is allclose at rtol={RTOL}, atol={ATOL}): the exporter "
                "folded or fused it away. Clone at another cut point (SearchConfig(candidates=[...]))"
            )
        found[key] = min(matches)[2]
    return found


def _probe(example_input: Tensor, batch: int) -> Tensor:
    """A seeded random input (batch, C, H, W) on the example's device: distinct values make
    accidental matches unlikely."""
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn((batch, *example_input.shape[1:]), generator=gen, dtype=example_input.dtype, device=gen.device)
    return probe.to(example_input.device)


@torch.no_grad()
def _clone_to_onnx(net: ClonedNetwork, example_input: Tensor, opset: int) -> onnx.ModelProto:
    base = torch_to_onnx(net.target, (example_input,), [INPUT], [LOGITS], opset)
    probe = _probe(example_input, net.traced.batch_size or 2)
    cut_names, taps = net.taps()
    *cuts, prelogits, _ = taps(probe)
    at = dict(zip(cut_names, cuts))
    pre_node = net.classifier.input_node
    located = locate_tensors(base, probe, {**at, pre_node: prelogits})
    graphs = []
    for name, branch in net.branches.items():
        model = torch_to_onnx(
            branch, (at[branch.target_cut], prelogits), ["cut", "prelogits"], ["correction", "logits"], opset
        )
        info = {
            "target_cut": branch.target_cut,
            "source_cut": branch.source_cut,
            "classes": list(branch.classes),
            "source_name": branch.source_name,
            "source_sha256": branch.source_sha256,
            "cut_tensor": located[branch.target_cut],
            "prelogits_tensor": located[pre_node],
        }
        graphs.append(
            BranchGraph.from_model(
                name, model, {"cut": info["cut_tensor"], "prelogits": info["prelogits_tensor"]}, info
            )
        )
    merged = merge(base, graphs, net.target_classes)
    try:
        onnx.checker.check_model(merged, full_check=True)
    except onnx.checker.ValidationError as err:
        raise ExportError(f"the merged graph is not valid ONNX: {err}") from err
    _verify(merged, net, probe)
    return merged


def _verify(merged: onnx.ModelProto, net: ClonedNetwork, probe: Tensor) -> None:
    """ExportError unless onnxruntime reproduces the target's and the clone's logits."""
    got = run(merged, probe, [LOGITS, CLONED_OUTPUT])
    for name, expected in ((LOGITS, net.target(probe)), (CLONED_OUTPUT, net(probe))):
        ref = expected.numpy()
        if not _close(got[name], ref):
            err = float(np.abs(got[name] - ref).max()) if got[name].shape == ref.shape else float("nan")
            raise ExportError(
                f"onnxruntime's {name!r} differs from PyTorch's by {err:.3g} "
                f"(rtol={RTOL}, atol={ATOL}); the export is wrong, please report it"
            )
