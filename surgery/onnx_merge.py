"""Merge branch graphs into a base ONNX graph, and split them out again.

A merged model is the base graph (the target, exactly as exported alone) with, appended
after it, each branch's nodes, initializers and value_info (names prefixed ``<branch>/``,
inputs wired to base tensors), then a combiner::

    cloned_logits = Concat(logits + correction_1 + ... + correction_P, new_1, ..., new_P)
                    (batch, |T_t| + sum_p |T_s^p|)

Every name the merge adds and every model field it changes are listed in a JSON *detach
manifest* in ``metadata_props[MANIFEST_KEY]``, with the sha256 of the base's serialized
bytes, so that :func:`split` restores the base byte for byte. ``merge`` is a pure
function of (base, branches): merging the branches left after a split gives the same
bytes as exporting a clone with only those branches.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import metadata

import onnx
from onnx import helper

from pnc.surgery.errors import ExportError

__all__ = ["MANIFEST_KEY", "CLONED_OUTPUT", "BranchGraph", "merge", "split", "read_manifest", "sha256"]

MANIFEST_KEY = "pnc.detach_manifest"
CLONED_OUTPUT = "cloned_logits"
_FORMAT = "pnc-onnx-clone/1"
_COMBINER = "pnc.combiner/"
#: scalar ModelProto fields the merge sets; their base values (or absence) are in the manifest
_FIELDS = ("producer_name", "producer_version", "doc_string")


def sha256(model: onnx.ModelProto) -> str:
    """sha256 of the model's serialized bytes (what an export writes to disk)."""
    return hashlib.sha256(model.SerializeToString()).hexdigest()


@dataclass
class BranchGraph:
    """One branch's part of a merged graph, names prefixed ``<name>/``, inputs wired.

    ``correction`` (batch, |T_t|) and ``logits`` (batch, |T_s|) name its two results;
    ``info`` is JSON metadata (target cut, cut tensors, classes, source)."""

    name: str
    nodes: list[onnx.NodeProto]
    initializers: list[onnx.TensorProto]
    value_info: list[onnx.ValueInfoProto]
    opset_import: list[tuple[str, int]]
    correction: str
    logits: str
    info: dict = field(default_factory=dict)

    @classmethod
    def from_model(cls, name: str, model: onnx.ModelProto, inputs: dict[str, str], info: dict) -> BranchGraph:
        """Prefix ``model`` (inputs (cut, prelogits) -> outputs (correction, logits)) with
        ``<name>/`` and rename its graph inputs to base tensors: ``inputs`` maps each input
        name of ``model`` to the base tensor it reads."""
        if model.functions or model.graph.sparse_initializer:
            raise ExportError(
                f"branch {name!r} exported with local functions or sparse initializers, "
                "which pnc cannot merge; export it without export_modules_as_functions"
            )
        prefix = f"{name}/"
        graph = onnx.compose.add_prefix_graph(model.graph, prefix)
        wiring = {prefix + k: v for k, v in inputs.items()}
        if set(wiring) != {i.name for i in graph.input}:
            raise ExportError(
                f"branch {name!r} has inputs {[i.name[len(prefix) :] for i in graph.input]}, "
                f"expected {sorted(inputs)} (an input the branch does not read is dropped "
                "by the exporter)"
            )
        for i, node in enumerate(graph.node):
            node.name = node.name or f"{prefix}{node.op_type}_{i}"
            node.input[:] = [wiring.get(x, x) for x in node.input]
        if len(graph.output) != 2 or any(o.name in wiring for o in graph.output):
            raise ExportError(f"branch {name!r} must give two computed outputs (correction, logits)")
        correction, logits = (o.name for o in graph.output)
        return cls(
            name,
            list(graph.node),
            list(graph.initializer),
            [*graph.value_info, *graph.output],
            [(o.domain, o.version) for o in model.opset_import],
            correction,
            logits,
            info,
        )

    def manifest(self) -> dict:
        return {
            "name": self.name,
            "correction": self.correction,
            "logits": self.logits,
            "nodes": [n.name for n in self.nodes],
            "initializers": [t.name for t in self.initializers],
            "value_info": [v.name for v in self.value_info],
            "opset_import": [list(o) for o in self.opset_import],
            "info": self.info,
        }

    @classmethod
    def from_manifest(cls, entry: dict, graph: onnx.GraphProto) -> BranchGraph:
        """Collect the branch listed by ``entry`` from a merged ``graph``."""
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
            entry["correction"],
            entry["logits"],
            entry["info"],
        )


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
    """The base plus ``branches`` and the combiner output ``cloned_logits``, with a manifest.

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
    model = onnx.ModelProto()
    model.CopyFrom(base)
    taken = _graft(model.graph, branches)
    combiner = _add_combiner(model.graph, logits, branches, len(target_classes), taken)
    _add_manifest(model, base, logits.name, branches, target_classes, combiner)
    return model


def _graft(graph: onnx.GraphProto, branches: list[BranchGraph]) -> set[str]:
    """Append each branch's nodes, initializers and value_info to ``graph`` after checking
    that its names are new and its inputs exist; returns every name now in the graph."""
    taken = _names(graph)
    for b in branches:
        defined = {n.name for n in b.nodes} | {x for n in b.nodes for x in n.output}
        defined |= {t.name for t in b.initializers} | {v.name for v in b.value_info}
        clash = defined & taken
        if clash:
            raise ExportError(
                f"branch {b.name!r} clashes with names already in the graph: {sorted(clash)[:3]}; give it another name"
            )
        unwired = {x for n in b.nodes for x in n.input} - defined - taken - {""}
        if unwired:
            raise ExportError(f"branch {b.name!r} reads {sorted(unwired)[:3]}, which the base graph does not have")
        taken |= defined
        graph.node.extend(b.nodes)
        graph.initializer.extend(b.initializers)
        graph.value_info.extend(b.value_info)
    return taken


def _add_combiner(
    graph: onnx.GraphProto, logits: onnx.ValueInfoProto, branches: list[BranchGraph], num_old: int, taken: set[str]
) -> list[onnx.NodeProto]:
    """``cloned_logits`` (batch, |T_t| + sum |T_s|) = Concat(logits + sum corrections, new logits...)."""
    running, nodes = logits.name, []
    for i, b in enumerate(branches):
        out = f"{_COMBINER}logits_{i}"
        nodes.append(helper.make_node("Add", [running, b.correction], [out], name=f"{_COMBINER}Add_{i}"))
        running = out
    nodes.append(
        helper.make_node(
            "Concat", [running, *(b.logits for b in branches)], [CLONED_OUTPUT], name=f"{_COMBINER}Concat", axis=1
        )
    )
    clash = taken & {CLONED_OUTPUT, *(x for n in nodes for x in (n.name, *n.output))}
    if clash:
        raise ExportError(f"the graph already uses the combiner's name(s) {sorted(clash)}")
    graph.node.extend(nodes)
    width = num_old + sum(len(b.info["classes"]) for b in branches)
    out = helper.make_tensor_value_info(CLONED_OUTPUT, logits.type.tensor_type.elem_type, [None, width])
    out.type.tensor_type.shape.dim[0].CopyFrom(logits.type.tensor_type.shape.dim[0])
    graph.output.append(out)
    return nodes


def _add_manifest(
    model: onnx.ModelProto,
    base: onnx.ModelProto,
    logits: str,
    branches: list[BranchGraph],
    target_classes: list[str],
    combiner: list[onnx.NodeProto],
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
        "combiner_nodes": [n.name for n in combiner],
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


def read_manifest(model: onnx.ModelProto) -> dict:
    """The detach manifest of a merged model (ExportError if it has none or a bad one)."""
    text = next((p.value for p in model.metadata_props if p.key == MANIFEST_KEY), None)
    if text is None:
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
                "combiner_nodes",
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


def split(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[BranchGraph], dict]:
    """(base, branches, manifest) of a merged model; the base is checked against the
    manifest's sha256 (ExportError if it differs: the base graph was edited)."""
    manifest = read_manifest(model)
    try:
        branches = [BranchGraph.from_manifest(e, model.graph) for e in manifest["branches"]]
    except (KeyError, TypeError, ValueError) as err:
        raise ExportError(f"the detach manifest is corrupt ({err!r}); re-export the clone with `pnc export`") from err
    added_nodes = set(manifest["combiner_nodes"]) | {n.name for b in branches for n in b.nodes}
    missing = set(manifest["combiner_nodes"]) - {n.name for n in model.graph.node}
    if missing:
        raise ExportError(f"the combiner nodes {sorted(missing)} are missing; the file was edited after export")
    base = onnx.ModelProto()
    base.CopyFrom(model)
    graph = base.graph
    _keep(graph.node, lambda n: n.name not in added_nodes)
    inits = {t.name for b in branches for t in b.initializers}
    _keep(graph.initializer, lambda t: t.name not in inits)
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
