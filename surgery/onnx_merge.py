"""Merge branch graphs into a base ONNX graph, and split them out again.

A merged model is the base graph (the target, exactly as exported alone) followed, for
each branch p, by its *body* and its *head*:

* body: the adapter and the pruned source layers, names prefixed ``<branch>/``, reading
  the base's tensor at the branch's cut and giving the branch features (batch, d_f);
* head: one Concat and one Gemm that extend the running logits::

      running_0 = logits                                                (batch, |T_t|)
      running_p = Gemm(Concat(running_{p-1}, prelogits, features_p), W_p, b_p)
      cloned_logits = running_P                        (batch, |T_t| + sum_p |T_s^p|)

  W_p carries running_{p-1} through an identity block and holds F_c's two affine maps of
  [prelogits, features_p]: the correction of the old logits and the new logits (see
  :class:`Head`). F_c's three linear layers and the old combiner's Add and Concat are
  thereby one kernel call per branch, and the target's pre-logits are read once per branch.

Every name the merge adds and every model field it changes are listed in a JSON *detach
manifest* in ``metadata_props[MANIFEST_KEY]``, with the sha256 of the base's serialized
bytes, so that :func:`split` restores the base byte for byte and each branch exactly (the
head weights are sliced back out of W_p). ``merge`` is a pure function of (base, branches):
merging the branches left after a split gives the same bytes as exporting a clone with
only those branches. No torch import: this runs on the device.

Caveat of the identity block: a non-finite target logit (inf) turns every Gemm output of
that row into NaN (0 * inf), where PyTorch would keep the new logits finite.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import metadata

import numpy as np
import onnx
from onnx import helper, numpy_helper

from pnc.surgery.errors import ExportError

__all__ = [
    "MANIFEST_KEY",
    "OPTIMIZED_KEY",
    "CLONED_OUTPUT",
    "Head",
    "BranchGraph",
    "head_names",
    "merge",
    "split",
    "read_manifest",
    "refuse_optimized",
    "sha256",
]

MANIFEST_KEY = "pnc.detach_manifest"
#: metadata_props key of a graph optimized by onnxruntime (:mod:`pnc.surgery.onnx_optimize`)
OPTIMIZED_KEY = "pnc.optimized_from"
CLONED_OUTPUT = "cloned_logits"
_FORMAT = "pnc-onnx-clone/2"
#: scalar ModelProto fields the merge sets; their base values (or absence) are in the manifest
_FIELDS = ("producer_name", "producer_version", "doc_string")


def sha256(model: onnx.ModelProto) -> str:
    """sha256 of the model's serialized bytes (what an export writes to disk)."""
    return hashlib.sha256(model.SerializeToString()).hexdigest()


def head_names(branch: str) -> dict[str, str]:
    """Names of the head nodes, tensors and initializers the merge adds for ``branch``."""
    p = f"{branch}/head"
    return {
        "concat": f"{p}/Concat",
        "gemm": f"{p}/Gemm",
        "input": f"{p}/input",
        "output": f"{p}/output",
        "weight": f"{p}.weight",
        "bias": f"{p}.bias",
    }


@dataclass
class Head:
    """F_c as two affine maps of z = [target pre-logits, branch features] (batch, d_pre + d_f):
    correction = z @ old_weight.T + old_bias (batch, |T_t|), new logits = z @ new_weight.T +
    new_bias (batch, |T_s|). float32 arrays."""

    old_weight: np.ndarray  # (|T_t|, d_pre + d_f)
    old_bias: np.ndarray  # (|T_t|,)
    new_weight: np.ndarray  # (|T_s|, d_pre + d_f)
    new_bias: np.ndarray  # (|T_s|,)

    def __post_init__(self) -> None:
        (num_old, width), (num_new, width_new) = self.old_weight.shape, self.new_weight.shape
        if (
            width != width_new
            or self.old_bias.shape != (num_old,)
            or self.new_bias.shape != (num_new,)
            or any(a.dtype != np.float32 for a in (self.old_weight, self.old_bias, self.new_weight, self.new_bias))
        ):
            raise ExportError(
                f"inconsistent head: old {self.old_weight.shape}/{self.old_bias.shape}, new "
                f"{self.new_weight.shape}/{self.new_bias.shape} (float32 expected); re-export the clone"
            )

    @property
    def num_old(self) -> int:
        return self.old_weight.shape[0]

    @property
    def num_new(self) -> int:
        return self.new_weight.shape[0]

    def fused(self, carried: int) -> tuple[np.ndarray, np.ndarray]:
        """(W (carried + |T_s|, carried + d_pre + d_f), b) of the merged Gemm, whose input is
        [running logits (batch, carried), z]: the first |T_t| of the carried logits gain the
        correction, all pass through, the new logits follow."""
        width = self.old_weight.shape[1]
        weight = np.zeros((carried + self.num_new, carried + width), np.float32)
        weight[:carried, :carried] = np.eye(carried, dtype=np.float32)
        weight[: self.num_old, carried:] = self.old_weight
        weight[carried:, carried:] = self.new_weight
        bias = np.zeros(carried + self.num_new, np.float32)
        bias[: self.num_old] = self.old_bias
        bias[carried:] = self.new_bias
        return weight, bias

    @classmethod
    def unfused(cls, weight: np.ndarray, bias: np.ndarray, num_old: int, num_new: int, branch: str) -> Head:
        """The head whose :meth:`fused` gives ``weight``, ``bias``, bit for bit (ExportError if none does)."""
        carried = weight.shape[0] - num_new if weight.ndim == 2 else -1
        if num_old <= carried <= weight.shape[1] and bias.shape == (weight.shape[0],):
            head = cls(weight[:num_old, carried:], bias[:num_old], weight[carried:, carried:], bias[carried:])
            again = head.fused(carried)
            if again[0].tobytes() == weight.tobytes() and again[1].tobytes() == bias.tobytes():
                return head
        raise ExportError(
            f"branch {branch!r}: its head weights are not of the form `pnc export` writes; the file "
            "was edited after export, re-export it"
        )


@dataclass
class BranchGraph:
    """One branch of a merged graph: its body (names prefixed ``<name>/``, reading a base
    tensor, giving ``features`` (batch, d_f)) and its :class:`Head`.

    ``info`` is JSON metadata: target cut, the base tensors read (``cut_tensor``,
    ``prelogits_tensor``), classes, source."""

    name: str
    nodes: list[onnx.NodeProto]
    initializers: list[onnx.TensorProto]
    value_info: list[onnx.ValueInfoProto]
    opset_import: list[tuple[str, int]]
    features: str
    head: Head
    info: dict = field(default_factory=dict)

    @classmethod
    def from_model(cls, name: str, body: onnx.ModelProto, cut_tensor: str, head: Head, info: dict) -> BranchGraph:
        """Prefix ``body`` (one input, the cut tensor -> one output, the features) with
        ``<name>/`` and wire its input to the base tensor ``cut_tensor``."""
        if body.functions or body.graph.sparse_initializer:
            raise ExportError(
                f"branch {name!r} exported with local functions or sparse initializers, "
                "which pnc cannot merge; export it without export_modules_as_functions"
            )
        prefix = f"{name}/"
        graph = onnx.compose.add_prefix_graph(body.graph, prefix)
        if len(graph.input) != 1 or len(graph.output) != 1 or graph.output[0].name == graph.input[0].name:
            raise ExportError(
                f"branch {name!r}: its body must read one tensor and compute one (the features); it reads "
                f"{[i.name for i in graph.input]} and gives {[o.name for o in graph.output]}"
            )
        wiring = {graph.input[0].name: cut_tensor}
        for i, node in enumerate(graph.node):
            node.name = node.name or f"{prefix}{node.op_type}_{i}"
            node.input[:] = [wiring.get(x, x) for x in node.input]
        return cls(
            name,
            list(graph.node),
            list(graph.initializer),
            [*graph.value_info, *graph.output],
            [(o.domain, o.version) for o in body.opset_import],
            graph.output[0].name,
            head,
            info,
        )

    def manifest(self) -> dict:
        return {
            "name": self.name,
            "features": self.features,
            "nodes": [n.name for n in self.nodes],
            "initializers": [t.name for t in self.initializers],
            "value_info": [v.name for v in self.value_info],
            "opset_import": [list(o) for o in self.opset_import],
            "head": {"num_old": self.head.num_old, "num_new": self.head.num_new, **head_names(self.name)},
            "info": self.info,
        }

    @classmethod
    def from_manifest(cls, entry: dict, graph: onnx.GraphProto, head: Head) -> BranchGraph:
        """Collect the body listed by ``entry`` from ``graph``; ``head`` is read by the caller."""
        nodes = {n.name: n for n in graph.node}
        inits = {t.name: t for t in graph.initializer}
        infos = {v.name: v for v in graph.value_info}
        name = entry["name"]
        for kind, have in (("nodes", nodes), ("initializers", inits), ("value_info", infos)):
            missing = [x for x in entry[kind] if x not in have]
            if missing:
                raise ExportError(
                    f"branch {name!r}: the manifest lists {kind} {missing[:3]} that the graph "
                    "does not hold; the file was edited after `pnc export`, re-export it"
                )
        return cls(
            name,
            [nodes[x] for x in entry["nodes"]],
            [inits[x] for x in entry["initializers"]],
            [infos[x] for x in entry["value_info"]],
            [(d, v) for d, v in entry["opset_import"]],
            entry["features"],
            head,
            entry["info"],
        )

    def merged_head(
        self, running: str, carried: int, output: str
    ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
        """Concat + Gemm: [running (batch, carried), prelogits, features] -> ``output``
        (batch, carried + |T_s|), and the Gemm's initializers."""
        n = head_names(self.name)
        weight, bias = self.head.fused(carried)
        nodes = [
            helper.make_node(
                "Concat",
                [running, self.info["prelogits_tensor"], self.features],
                [n["input"]],
                name=n["concat"],
                axis=1,
            ),
            helper.make_node("Gemm", [n["input"], n["weight"], n["bias"]], [output], name=n["gemm"], transB=1),
        ]
        return nodes, [numpy_helper.from_array(weight, n["weight"]), numpy_helper.from_array(bias, n["bias"])]


def _names(graph: onnx.GraphProto) -> set[str]:
    """Every node and tensor name of ``graph``."""
    names = {n.name for n in graph.node} | {x for n in graph.node for x in (*n.input, *n.output)}
    names |= {t.name for t in graph.initializer} | {v.name for v in (*graph.input, *graph.output, *graph.value_info)}
    return names - {""}


def _base_logits(base: onnx.ModelProto) -> onnx.ValueInfoProto:
    outputs = base.graph.output
    if len(outputs) != 1 or len(outputs[0].type.tensor_type.shape.dim) != 2:
        raise ExportError(
            f"the base graph must have one (batch, classes) output, it has "
            f"{[o.name for o in outputs]}; export the target with pnc.surgery.onnx_export"
        )
    return outputs[0]


def _added_opsets(base: onnx.ModelProto, branches: list[BranchGraph]) -> list[tuple[str, int]]:
    """(domain, version) pairs the branches need beyond the base's opset imports."""
    have = {o.domain: o.version for o in base.opset_import}
    added: list[tuple[str, int]] = []
    for b in branches:
        for domain, version in b.opset_import:
            if domain not in have:
                have[domain] = version
                added.append((domain, version))
            elif have[domain] != version:
                raise ExportError(
                    f"branch {b.name!r} uses opset {version} of domain {domain or 'ai.onnx'!r}, "
                    f"the base {have[domain]}; export both with the same --opset"
                )
    return added


def merge(base: onnx.ModelProto, branches: list[BranchGraph], target_classes: list[str]) -> onnx.ModelProto:
    """The base plus ``branches`` and the output ``cloned_logits``, with a manifest.

    ``base`` is not modified; its nodes, initializers, inputs, outputs and value_info come
    first, unchanged. ``target_classes``: the base's output classes, in order."""
    if not branches:
        raise ExportError("merge needs at least one branch; with none the base is the whole model")
    if any(p.key == MANIFEST_KEY for p in base.metadata_props):
        raise ExportError("the base graph is already a pnc clone export; detach its branches first")
    logits = _base_logits(base)
    if logits.type.tensor_type.shape.dim[1].dim_value != len(target_classes):
        raise ExportError(
            f"the base gives {logits.type.tensor_type.shape.dim[1].dim_value} logits but "
            f"{len(target_classes)} target classes were named"
        )
    for b in branches:
        if b.head.num_old != len(target_classes):
            raise ExportError(
                f"branch {b.name!r} corrects {b.head.num_old} logits but the base gives {len(target_classes)}"
            )
    model = onnx.ModelProto()
    model.CopyFrom(base)
    graph = model.graph
    taken = _names(graph)
    running, carried = logits.name, len(target_classes)
    for i, b in enumerate(branches):
        output = CLONED_OUTPUT if i == len(branches) - 1 else head_names(b.name)["output"]
        head_nodes, head_inits = b.merged_head(running, carried, output)
        _graft(graph, b, head_nodes, head_inits, taken)
        running, carried = output, carried + b.head.num_new
    out = helper.make_tensor_value_info(CLONED_OUTPUT, logits.type.tensor_type.elem_type, [None, carried])
    out.type.tensor_type.shape.dim[0].CopyFrom(logits.type.tensor_type.shape.dim[0])
    graph.output.append(out)
    _add_manifest(model, base, logits.name, branches, target_classes)
    return model


def _graft(
    graph: onnx.GraphProto,
    b: BranchGraph,
    head_nodes: list[onnx.NodeProto],
    head_inits: list[onnx.TensorProto],
    taken: set[str],
) -> None:
    """Append a branch's body, then its head, to ``graph`` after checking that its names are
    new and that it reads only tensors the graph has; adds its names to ``taken``."""
    nodes, inits = [*b.nodes, *head_nodes], [*b.initializers, *head_inits]
    defined = {n.name for n in nodes} | {x for n in nodes for x in n.output}
    defined |= {t.name for t in inits} | {v.name for v in b.value_info}
    clash = defined & taken
    if clash:
        raise ExportError(
            f"branch {b.name!r} clashes with names already in the graph: {sorted(clash)[:3]}; give it another name"
        )
    unwired = {x for n in nodes for x in n.input} - defined - taken - {""}
    if unwired:
        raise ExportError(f"branch {b.name!r} reads {sorted(unwired)[:3]}, which the base graph does not have")
    taken |= defined
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    graph.value_info.extend(b.value_info)


def _add_manifest(
    model: onnx.ModelProto, base: onnx.ModelProto, logits: str, branches: list[BranchGraph], target_classes: list[str]
) -> None:
    """The detach manifest in ``metadata_props``, the opsets the branches add, and producer fields."""
    added_opsets = _added_opsets(base, branches)
    manifest = {
        "format": _FORMAT,
        "base_sha256": sha256(base),
        "base_fields": {f: getattr(base, f) for f in _FIELDS if base.HasField(f)},
        "added_opset_domains": [d for d, _ in added_opsets],
        "logits": logits,
        "output": CLONED_OUTPUT,
        "target_classes": list(target_classes),
        "classes": list(target_classes) + [c for b in branches for c in b.info["classes"]],
        "branches": [b.manifest() for b in branches],
    }
    model.opset_import.extend(helper.make_opsetid(d, v) for d, v in added_opsets)
    model.producer_name = "pnc"
    model.producer_version = _pnc_version()
    model.doc_string = (
        f"pnc partial network clone: base graph plus detachable branches "
        f"{', '.join(b.name for b in branches)}; `pnc detach` restores the base"
    )
    model.metadata_props.add(key=MANIFEST_KEY, value=json.dumps(manifest, sort_keys=True))


def _pnc_version() -> str:
    try:
        return metadata.version("pnc")
    except metadata.PackageNotFoundError:
        return "unknown"


def refuse_optimized(model: onnx.ModelProto, verb: str) -> None:
    """ExportError if ``model`` was optimized by onnxruntime (`pnc export --optimize`)."""
    text = next((p.value for p in model.metadata_props if p.key == OPTIMIZED_KEY), None)
    if text is not None:
        try:
            origin = f" (sha256 {json.loads(text)['sha256']})"
        except (json.JSONDecodeError, KeyError, TypeError):
            origin = ""
        raise ExportError(
            f"this ONNX file was optimized by onnxruntime (`pnc export --optimize`), which fuses and "
            f"renames nodes, so pnc cannot {verb} it; use the plain export it was made from{origin}, "
            "written by `pnc export` without --optimize"
        )


def read_manifest(model: onnx.ModelProto) -> dict:
    """The detach manifest of a merged model (ExportError if it has none or a bad one)."""
    text = next((p.value for p in model.metadata_props if p.key == MANIFEST_KEY), None)
    if text is None:
        refuse_optimized(model, "detach")
        raise ExportError(
            "this ONNX file is not a pnc clone export (it has no detach manifest in its "
            f"metadata_props[{MANIFEST_KEY!r}]); only files written by `pnc export` from a "
            "cloned network have branches to detach"
        )
    try:
        manifest = json.loads(text)
        ok = manifest.get("format") == _FORMAT and all(
            k in manifest
            for k in (
                "base_sha256",
                "base_fields",
                "added_opset_domains",
                "logits",
                "output",
                "target_classes",
                "branches",
            )
        )
    except (json.JSONDecodeError, AttributeError):
        ok = False
    if not ok:
        raise ExportError(
            f"the detach manifest is corrupt or from another pnc version (expected format "
            f"{_FORMAT!r}); re-export the clone with `pnc export`"
        )
    return manifest


def _merged_head(entry: dict, inits: dict[str, onnx.TensorProto], num_old: int) -> Head:
    """A branch's head, sliced out of its merged Gemm's weight and bias."""
    names = head_names(entry["name"])
    missing = [names[k] for k in ("weight", "bias") if names[k] not in inits]
    if missing:
        raise ExportError(f"branch {entry['name']!r}: its head {missing} is missing; the file was edited after export")
    weight, bias = (numpy_helper.to_array(inits[names[k]]) for k in ("weight", "bias"))
    return Head.unfused(weight, bias, num_old, entry["head"]["num_new"], entry["name"])


def split(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[BranchGraph], dict]:
    """(base, branches, manifest) of a merged model; the base is checked against the
    manifest's sha256 (ExportError if it differs: the base graph was edited)."""
    manifest = read_manifest(model)
    inits = {t.name: t for t in model.graph.initializer}
    num_old = len(manifest["target_classes"])
    try:
        branches = [
            BranchGraph.from_manifest(e, model.graph, _merged_head(e, inits, num_old)) for e in manifest["branches"]
        ]
    except (KeyError, TypeError, ValueError) as err:
        raise ExportError(f"the detach manifest is corrupt ({err!r}); re-export the clone with `pnc export`") from err
    heads = [head_names(b.name) for b in branches]
    added_nodes = {n.name for b in branches for n in b.nodes} | {h[k] for h in heads for k in ("concat", "gemm")}
    missing = {h[k] for h in heads for k in ("concat", "gemm")} - {n.name for n in model.graph.node}
    if missing:
        raise ExportError(f"the head nodes {sorted(missing)} are missing; the file was edited after export")
    base = onnx.ModelProto()
    base.CopyFrom(model)
    graph = base.graph
    _keep(graph.node, lambda n: n.name not in added_nodes)
    added_inits = {t.name for b in branches for t in b.initializers} | {h[k] for h in heads for k in ("weight", "bias")}
    _keep(graph.initializer, lambda t: t.name not in added_inits)
    infos = {v.name for b in branches for v in b.value_info}
    _keep(graph.value_info, lambda v: v.name not in infos)
    _keep(graph.output, lambda o: o.name != manifest["output"])
    _keep(base.metadata_props, lambda p: p.key != MANIFEST_KEY)
    _keep(base.opset_import, lambda o: o.domain not in manifest["added_opset_domains"])
    for f in _FIELDS:
        base.ClearField(f)
        if f in manifest["base_fields"]:
            setattr(base, f, manifest["base_fields"][f])
    actual = sha256(base)
    if actual != manifest["base_sha256"]:
        raise ExportError(
            f"the base graph has sha256 {actual[:16]}... but the manifest says "
            f"{manifest['base_sha256'][:16]}...: the target's part of the file was modified "
            "after export, so detaching cannot restore the original target; re-export it"
        )
    return base, branches, manifest


def _keep(repeated, predicate) -> None:
    """Keep the items of a protobuf repeated field that satisfy ``predicate``, in order."""
    kept = [x for x in repeated if predicate(x)]
    if len(kept) != len(repeated):
        copies = []
        for x in kept:
            c = type(x)()
            c.CopyFrom(x)
            copies.append(c)
        del repeated[:]
        repeated.extend(copies)
