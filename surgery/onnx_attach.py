"""Ship one branch as a standalone ONNX model and attach it to a deployed target, without PyTorch.

A *branch file* is one branch of a pnc clone export on its own: a valid ONNX model whose
inputs are named after the target tensors it reads (its cut tensor, then the target's
pre-logits, exactly the names they have in the target's export) and whose outputs are
``<branch>/correction`` (batch, |T_t|) and ``<branch>/logits`` (batch, |T_s|). Its
``metadata_props[BRANCH_KEY]`` holds the sha256 of the target export it was made for,
the target's classes and the branch's entry of the detach manifest, so that::

    attach(target.onnx, branch.onnx)          == pnc export of the clone, byte for byte
    detach(attach(target.onnx, branch.onnx))  == target.onnx, byte for byte

Attaching to an export that already has branches adds to them (the same bytes as
exporting the clone with all of them); a branch made for another target export is
refused. This module imports neither torch nor the zoo: it runs on the device.

    attach_onnx("target.onnx", ["branch.onnx"], "clone.onnx")
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
from onnx import helper, numpy_helper

from pnc.surgery.errors import BranchError, ExportError
from pnc.surgery.io import atomic_write_bytes
from pnc.surgery.onnx_detach import load_onnx
from pnc.surgery.onnx_merge import MANIFEST_KEY, BranchGraph, Head, merge, refuse_optimized, sha256, split

__all__ = ["BRANCH_KEY", "branch_model", "read_branch", "attach_model", "attach_onnx"]

BRANCH_KEY = "pnc.branch"
_FORMAT = "pnc-onnx-branch/2"


def _choose(branches: list[BranchGraph], name: str | None) -> BranchGraph:
    names = [b.name for b in branches]
    if name is None:
        if len(branches) != 1:
            raise BranchError(
                f"this clone has {len(branches)} branches ({', '.join(names)}); name the one to ship with --branch NAME"
            )
        return branches[0]
    if name not in names:
        raise BranchError(f"no branch named {name!r} in this clone; its branches are {', '.join(names)}")
    return branches[names.index(name)]


def _input_infos(base: onnx.ModelProto, names: list[str]) -> list[onnx.ValueInfoProto]:
    """Value infos (type and shape, batch axis symbolic) of base tensors ``names``, by shape inference."""
    inferred = onnx.shape_inference.infer_shapes(base)
    known = {v.name: v for v in (*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input)}
    infos = []
    for name in names:
        if name in known:
            info = onnx.ValueInfoProto()
            info.CopyFrom(known[name])
        else:  # shape inference could not type it: float of unknown shape
            info = helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
        infos.append(info)
    return infos


def _head_names(branch: str) -> dict[str, str]:
    """Names of the head nodes, tensors and initializers of a branch file."""
    p = f"{branch}/head"
    return {
        "concat": f"{p}/Concat",
        "input": f"{p}/input",
        "old": f"{p}/correction",
        "new": f"{p}/logits",
        "old_weight": f"{p}.old.weight",
        "old_bias": f"{p}.old.bias",
        "new_weight": f"{p}.new.weight",
        "new_bias": f"{p}.new.bias",
    }


def _standalone_head(branch: BranchGraph) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Concat(prelogits, features) -> Gemm -> ``<branch>/correction``, Gemm -> ``<branch>/logits``."""
    n, h = _head_names(branch.name), branch.head
    nodes = [
        helper.make_node(
            "Concat", [branch.info["prelogits_tensor"], branch.features], [n["input"]], name=n["concat"], axis=1
        ),
        helper.make_node(
            "Gemm", [n["input"], n["old_weight"], n["old_bias"]], [f"{branch.name}/correction"], name=n["old"], transB=1
        ),
        helper.make_node(
            "Gemm", [n["input"], n["new_weight"], n["new_bias"]], [f"{branch.name}/logits"], name=n["new"], transB=1
        ),
    ]
    arrays = {"old_weight": h.old_weight, "old_bias": h.old_bias, "new_weight": h.new_weight, "new_bias": h.new_bias}
    return nodes, [numpy_helper.from_array(a, n[k]) for k, a in arrays.items()]


def branch_model(merged: onnx.ModelProto, name: str | None = None) -> onnx.ModelProto:
    """One branch of a clone export (``merged``, with a detach manifest) as a standalone model.

    Inputs: the base tensors the branch reads, (batch, *cut shape) then (batch, d_pre),
    named as in the base; outputs: correction (batch, |T_t|), new logits (batch, |T_s|).
    ``name`` may be None when the clone has one branch. The result passes
    ``onnx.checker`` (full check)."""
    base, branches, manifest = split(merged)
    branch = _choose(branches, name)
    defined = {x for n in branch.nodes for x in n.output} | {t.name for t in branch.initializers}
    reads = list(dict.fromkeys(x for n in branch.nodes for x in n.input if x and x not in defined))
    if reads != [branch.info["cut_tensor"]] or branch.features not in defined:
        raise ExportError(
            f"branch {branch.name!r}: its body reads base tensors {reads}, not its cut "
            f"{branch.info['cut_tensor']!r}, or does not compute {branch.features!r}; re-export the clone"
        )
    wired = list(dict.fromkeys([branch.info["cut_tensor"], branch.info["prelogits_tensor"]]))
    batch = base.graph.output[0].type.tensor_type.shape.dim[0]
    outputs = []
    for out, width in (
        (f"{branch.name}/correction", branch.head.num_old),
        (f"{branch.name}/logits", branch.head.num_new),
    ):
        info = helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, [None, width])
        info.type.tensor_type.shape.dim[0].CopyFrom(batch)
        outputs.append(info)
    head_nodes, head_inits = _standalone_head(branch)
    graph = helper.make_graph(
        [*branch.nodes, *head_nodes],
        f"pnc_branch_{branch.name}",
        _input_infos(base, wired),
        outputs,
        [*branch.initializers, *head_inits],
        value_info=list(branch.value_info),
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid(d, v) for d, v in branch.opset_import],
        ir_version=base.ir_version,
        producer_name="pnc",
        producer_version=merged.producer_version,
    )
    model.doc_string = (
        f"pnc branch {branch.name!r} (classes {', '.join(branch.info['classes'])}) for the target "
        f"export with sha256 {manifest['base_sha256']}; `pnc attach TARGET.onnx THIS.onnx` adds it"
    )
    meta = {
        "format": _FORMAT,
        "base_sha256": manifest["base_sha256"],
        "target_classes": manifest["target_classes"],
        "inputs": wired,
        "branch": branch.manifest(),
    }
    model.metadata_props.add(key=BRANCH_KEY, value=json.dumps(meta, sort_keys=True))
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as err:
        raise ExportError(f"the standalone branch {branch.name!r} is not valid ONNX: {err}") from err
    return model


def read_branch(model: onnx.ModelProto) -> tuple[BranchGraph, dict]:
    """(the branch as merge takes it, its metadata) of a branch file made by :func:`branch_model`."""
    text = next((p.value for p in model.metadata_props if p.key == BRANCH_KEY), None)
    if text is None:
        hint = (
            " (it is a clone export: ship one of its branches with `pnc export PATCH --branch-only`)"
            if any(p.key == MANIFEST_KEY for p in model.metadata_props)
            else ""
        )
        raise ExportError(
            f"not a pnc branch file: it has no metadata_props[{BRANCH_KEY!r}]{hint}; "
            "make one with `pnc export PATCH --branch-only --out branch.onnx`"
        )
    try:
        meta = json.loads(text)
        ok = meta.get("format") == _FORMAT and all(k in meta for k in ("base_sha256", "target_classes", "branch"))
    except (json.JSONDecodeError, AttributeError):
        ok = False
    if not ok:
        raise ExportError(
            f"the branch metadata is corrupt or from another pnc version (expected format "
            f"{_FORMAT!r}); re-export the branch with `pnc export PATCH --branch-only`"
        )
    inits = {t.name: t for t in model.graph.initializer}
    try:
        names = _head_names(meta["branch"]["name"])
        head = Head(
            *(numpy_helper.to_array(inits[names[k]]) for k in ("old_weight", "old_bias", "new_weight", "new_bias"))
        )
        branch = BranchGraph.from_manifest(meta["branch"], model.graph, head)
    except (KeyError, TypeError, ValueError) as err:
        raise ExportError(f"the branch metadata is corrupt ({err!r}); re-export the branch") from err
    return branch, meta


def attach_model(target: onnx.ModelProto, branch_files: list[onnx.ModelProto]) -> onnx.ModelProto:
    """``target`` (a target export, or a clone export) with the branches of ``branch_files`` added
    after its own, in the given order. ExportError if a branch was made for another target
    export (the two sha256 are named) or a name is taken; the inputs are not modified."""
    if not branch_files:
        raise ExportError("name at least one branch file to attach")
    for model in (target, *branch_files):
        refuse_optimized(model, "attach")
    if any(p.key == MANIFEST_KEY for p in target.metadata_props):
        base, existing, manifest = split(target)
        classes: list[str] | None = list(manifest["target_classes"])
    else:
        base, existing, classes = target, [], None
    if any(p.key == BRANCH_KEY for p in base.metadata_props):
        raise ExportError(
            "the first file is a branch file, not a target export: write `pnc attach TARGET.onnx BRANCH.onnx [...]`"
        )
    have = sha256(base)
    added: list[BranchGraph] = []
    for model in branch_files:
        branch, meta = read_branch(model)
        if meta["base_sha256"] != have:
            raise ExportError(
                f"branch {branch.name!r} was made for the target export with sha256 "
                f"{meta['base_sha256']}, but this target's export has sha256 {have}; attach it "
                "to the file `pnc export` wrote for its target (same model, opset and input size)"
            )
        if classes is not None and list(meta["target_classes"]) != classes:
            raise ExportError(
                f"branch {branch.name!r} expects target classes {meta['target_classes']}, "
                f"the target export has {classes}"
            )
        classes = list(meta["target_classes"])
        taken = [b.name for b in (*existing, *added)]
        if branch.name in taken:
            raise BranchError(
                f"the target already has a branch named {branch.name!r} (it has {', '.join(taken)}); "
                f"detach it first (`pnc detach FILE --branch {branch.name}`)"
            )
        added.append(branch)
    assert classes is not None
    merged = merge(base, [*existing, *added], classes)
    try:
        onnx.checker.check_model(merged, full_check=True)
    except onnx.checker.ValidationError as err:
        raise ExportError(f"the attached graph is not valid ONNX: {err}") from err
    return merged


def attach_onnx(
    target: str | Path | onnx.ModelProto, branches: list[str | Path | onnx.ModelProto], out: str | Path
) -> Path:
    """Write ``target`` with ``branches`` attached to ``out`` (atomically, only once every check passed)."""
    result = attach_model(load_onnx(target), [load_onnx(b) for b in branches])
    out = Path(out)
    atomic_write_bytes(out, result.SerializeToString())
    return out
