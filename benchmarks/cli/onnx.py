"""``pnc export`` and ``pnc detach``: ONNX with detachable cloned branches.

pnc export digits-cnn4-target --out target.onnx        # a zoo model
pnc export runs/x/clone.pnc --out clone.onnx            # a clone: target + branches
pnc detach clone.onnx --branch NAME --out smaller.onnx
pnc detach clone.onnx --all --out target.onnx           # == target.onnx, byte for byte
pnc export runs/x/clone.pnc --branch-only --out branch.onnx   # one branch, standalone
pnc attach target.onnx branch.onnx --out clone.onnx     # == the clone's export, no PyTorch
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch

from pnc.surgery.devices import device_of
from pnc.surgery.errors import ExportError
from pnc.surgery.io import atomic_write_bytes
from pnc.surgery.onnx_export import OPSET, OPSETS, to_onnx
from pnc.surgery.onnx_merge import MANIFEST_KEY, read_manifest
from pnc.zoo.store import ZooStore

from .clone import patch_path
from .common import add_zoo_dir, check_input_file, check_output_file, in_range


def _is_patch(source: str) -> bool:
    """A .pnc patch (or a `pnc clone --out` folder) rather than a zoo name (zoo names have no "/")."""
    return source.endswith(".pnc") or "/" in source or Path(source).is_dir()


def _load_source(source: str, zoo_dir: str | None):
    """(model, example input (1, C, H, W)) for a zoo name or a .pnc patch."""
    store = ZooStore(zoo_dir)
    if _is_patch(source):
        net, meta = store.load_patch(patch_path(source))
        return net, torch.zeros(1, *meta["input_size"], device=device_of(net))
    model, card = store.load(source)
    return model, torch.zeros(1, *card.input_size, device=device_of(model))


def _cmd_export(args: argparse.Namespace) -> int:
    check_output_file(args.out, not_same_as=patch_path(args.source) if _is_patch(args.source) else None)
    if args.branch and not args.branch_only:
        raise ExportError("--branch NAME picks the branch of --branch-only; add --branch-only")
    model, example = _load_source(args.source, args.zoo_dir)
    proto = to_onnx(model, example, args.opset)
    if args.branch_only:
        return _write_branch(proto, args)
    data = proto.SerializeToString()
    atomic_write_bytes(Path(args.out), data)
    print(f"{args.out}: opset {args.opset}, {len(data):,} bytes, sha256 {hashlib.sha256(data).hexdigest()}")
    if any(p.key == MANIFEST_KEY for p in proto.metadata_props):
        manifest = read_manifest(proto)
        print(
            f"  base (the target alone) sha256 {manifest['base_sha256']}; outputs 'logits' "
            f"(target) and 'cloned_logits' ({len(manifest['classes'])} classes)"
        )
        for b in manifest["branches"]:
            print(
                f"  branch {b['name']!r}: reads {b['info']['cut_tensor']!r} (fx {b['info']['target_cut']!r}), "
                f"{len(b['nodes'])} nodes, classes {', '.join(b['info']['classes'])}"
            )
    return 0


def _write_branch(proto, args: argparse.Namespace) -> int:
    from pnc.surgery.onnx_attach import BRANCH_KEY, branch_model

    if not any(p.key == MANIFEST_KEY for p in proto.metadata_props):
        raise ExportError(
            f"{args.source} is not a clone, so it has no branch to ship; --branch-only needs a "
            ".pnc patch made by `pnc clone`"
        )
    branch = branch_model(proto, args.branch)
    data = branch.SerializeToString()
    atomic_write_bytes(Path(args.out), data)
    meta = json.loads(next(p.value for p in branch.metadata_props if p.key == BRANCH_KEY))
    print(
        f"{args.out}: branch {meta['branch']['name']!r} (classes {', '.join(meta['branch']['info']['classes'])}), "
        f"{len(data):,} bytes, sha256 {hashlib.sha256(data).hexdigest()}"
    )
    print(
        f"  reads {', '.join(repr(i) for i in meta['inputs'])} of the target export with sha256 "
        f"{meta['base_sha256']}; attach it with `pnc attach TARGET.onnx {args.out} --out clone.onnx`"
    )
    return 0


def _cmd_attach(args: argparse.Namespace) -> int:
    from pnc.surgery.onnx_attach import attach_model
    from pnc.surgery.onnx_detach import branch_names, load_onnx

    check_output_file(args.out, not_same_as=args.target)
    result = attach_model(load_onnx(args.target), [load_onnx(b) for b in args.branches])
    data = result.SerializeToString()
    atomic_write_bytes(Path(args.out), data)
    print(
        f"{args.out}: branches {', '.join(branch_names(result))}; outputs 'logits' (target) and "
        f"'cloned_logits' ({len(read_manifest(result)['classes'])} classes); "
        f"sha256 {hashlib.sha256(data).hexdigest()}"
    )
    return 0


def _cmd_detach(args: argparse.Namespace) -> int:
    from pnc.surgery.onnx_detach import branch_names, detach_model, load_onnx

    check_input_file(args.file, "an ONNX file", "make one with `pnc export CLONE.pnc --out FILE.onnx`", ExportError)
    if not args.list:
        if args.out is None:
            raise ExportError("say where to write the result: --out FILE.onnx")
        check_output_file(args.out, not_same_as=args.file)
    model = load_onnx(args.file)
    if args.list:
        print("\n".join(branch_names(model)))
        return 0
    before = branch_names(model)
    result = detach_model(model, None if args.all else args.branch)
    data = result.SerializeToString()
    atomic_write_bytes(Path(args.out), data)
    left = [b for b in before if b not in (before if args.all else args.branch)]
    print(
        f"{args.out}: branches left: {', '.join(left) or 'none (the target alone)'}; "
        f"sha256 {hashlib.sha256(data).hexdigest()}"
    )
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser(
        "export",
        help="export a zoo model or a .pnc clone to ONNX (detachable branches)",
        description="Export to ONNX (TorchScript exporter, dynamic batch axis, input "
        "'input', output 'logits'; a clone adds 'cloned_logits').",
    )
    export.add_argument("source", help="a zoo model name, or a .pnc patch made by `pnc clone`")
    export.add_argument("--out", required=True, help="the .onnx file to write")
    add_zoo_dir(export)
    export.add_argument(
        "--opset",
        type=in_range(int, OPSETS.start, OPSETS.stop - 1),
        default=OPSET,
        help=f"ONNX opset, {OPSETS.start}-{OPSETS.stop - 1} (default {OPSET})",
    )
    export.add_argument(
        "--branch-only",
        action="store_true",
        help="write one branch of the clone as a standalone ONNX model, for `pnc attach`",
    )
    export.add_argument(
        "--branch", metavar="NAME", help="the branch --branch-only writes (needed when the clone has several)"
    )
    export.set_defaults(func=_cmd_export)

    attach = sub.add_parser(
        "attach",
        help="splice branch files into a target's ONNX export (no PyTorch)",
        description="Add branches written by `pnc export PATCH --branch-only` to the "
        "target's export (or to a clone export, after its branches); the "
        "result is byte-identical to exporting the clone.",
    )
    attach.add_argument("target", help="the target's .onnx (from `pnc export TARGET`), or a clone export")
    attach.add_argument("branches", nargs="+", metavar="branch", help="branch .onnx files, in output order")
    attach.add_argument("--out", required=True, help="the .onnx file to write")
    attach.set_defaults(func=_cmd_attach)

    detach = sub.add_parser(
        "detach",
        help="remove cloned branches from a pnc ONNX export",
        description="Remove branches; with --all the result is the target's own export, byte for byte.",
    )
    detach.add_argument("file", help="an .onnx file written by `pnc export` from a clone")
    which = detach.add_mutually_exclusive_group(required=True)
    which.add_argument("--branch", action="append", metavar="NAME", help="a branch to detach (repeatable)")
    which.add_argument("--all", action="store_true", help="detach every branch")
    which.add_argument("--list", action="store_true", help="print the branch names and exit")
    detach.add_argument("--out", help="the .onnx file to write")
    detach.set_defaults(func=_cmd_detach)
