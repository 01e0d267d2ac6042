"""``pnc split`` and ``pnc extract``: a model cut into pieces, as ONNX and safetensors + JSON.

    pnc split resnet18 --cut layer2.1.act2 --input-size 3,64,64 --out d     # prefix + suffix
    pnc extract resnet18 --from layer1 --to layer3 --input-size 3,64,64 --out d

Each command checks that the pieces reproduce the model, in PyTorch and in onnxruntime,
before it writes anything (``pnc.surgery.pieces.save_pieces``).
"""

from __future__ import annotations

import argparse

import torch

from pnc.surgery.cuts import cut_points, find_cut
from pnc.surgery.errors import CutError
from pnc.surgery.onnx_export import INPUT, LOGITS, OPSET, OPSETS
from pnc.surgery.pieces import Piece, PieceCheck, save_pieces
from pnc.surgery.splitting import extract
from pnc.surgery.tracing import TracedModel, default_input, trace
from pnc.zoo.resolve import resolve_model
from pnc.zoo.store import ZooStore

from .common import add_zoo_dir, check_output_dir, in_range, input_size

#: the batch the pieces are checked at (not the one traced: the pieces must generalise)
CHECK_BATCH = 3


def _traced(args: argparse.Namespace) -> tuple[TracedModel, torch.Tensor]:
    check_output_dir(args.out, "--out")
    model, size = resolve_model(args.model, args.input_size, store=ZooStore(args.zoo_dir))
    x = default_input(model, size)
    return trace(model, x), default_input(model, tuple(x.shape[1:]), batch=CHECK_BATCH)


def _report(args: argparse.Namespace, what: str, check: PieceCheck) -> int:
    print(
        f"{args.out}: {what}; composition equals the model in PyTorch "
        f"({'bit for bit' if check.torch_equal else f'max |diff| {check.torch_max_abs:.2e}'}) and in onnxruntime "
        f"(max |diff| {check.onnx_max_abs:.2e}) at batch {check.batch}; see pieces.json"
    )
    return 0


def _cmd_split(args: argparse.Namespace) -> int:
    traced, x = _traced(args)
    cut = find_cut(cut_points(traced), args.cut)
    prefix, suffix = extract(traced, None, [cut.node]), extract(traced, cut.node, [traced.output_node])
    with torch.no_grad():
        reference = traced.model(x)
    spec = {
        "command": "split",
        "model": args.model,
        "cut": cut.node,
        "module": cut.module,
        "cut_shape": list(cut.shape),
        "input_size": list(x.shape[1:]),
    }
    check = save_pieces(
        [Piece("prefix", prefix, INPUT, cut.node), Piece("suffix", suffix, cut.node, LOGITS)],
        x,
        reference,
        args.out,
        spec,
        args.opset,
    )
    return _report(args, f"prefix (input -> {cut.node} {tuple(cut.shape)}) and suffix", check)


def _cmd_extract(args: argparse.Namespace) -> int:
    traced, x = _traced(args)
    cuts = cut_points(traced)
    start, end = find_cut(cuts, args.start), find_cut(cuts, args.end)
    if cuts.index(start) >= cuts.index(end):
        raise CutError(
            f"--from {start.node} must come before --to {end.node} (cuts are listed input to output by `pnc cuts`)"
        )
    with torch.no_grad():
        before = extract(traced, None, [start.node])(x)
        reference = extract(traced, None, [end.node])(x)
    spec = {
        "command": "extract",
        "model": args.model,
        "from": start.node,
        "to": end.node,
        "from_module": start.module,
        "to_module": end.module,
        "input_shape": list(start.shape),
        "output_shape": list(end.shape),
        "input_size": list(x.shape[1:]),
    }
    module = Piece("module", extract(traced, start.node, [end.node]), start.node, end.node)
    check = save_pieces([module], before, reference, args.out, spec, args.opset)
    return _report(args, f"module {start.node} {tuple(start.shape)} -> {end.node} {tuple(end.shape)}", check)


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register ``pnc split`` and ``pnc extract``."""

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "model",
            help="timm name, zoo name, pnc architecture, FILE.safetensors from "
            "`pnc zoo export`, or package.module:factory",
        )
        p.add_argument("--input-size", type=input_size, help="C,H,W (default: the model's own)")
        p.add_argument("--out", required=True, help="folder for the .onnx, .safetensors and pieces.json")
        p.add_argument(
            "--opset",
            type=in_range(int, OPSETS.start, OPSETS.stop - 1),
            default=OPSET,
            help=f"ONNX opset, {OPSETS.start}-{OPSETS.stop - 1} (default {OPSET})",
        )
        add_zoo_dir(p)

    split = sub.add_parser("split", help="cut a model at a cut point into prefix and suffix (ONNX + safetensors)")
    common(split)
    split.add_argument("--cut", required=True, help="a node or module name as `pnc cuts MODEL` lists them")
    split.set_defaults(func=_cmd_split)

    ext = sub.add_parser("extract", help="the module between two cut points (ONNX + safetensors)")
    common(ext)
    ext.add_argument("--from", dest="start", required=True, help="the cut the module reads")
    ext.add_argument("--to", dest="end", required=True, help="the cut the module computes")
    ext.set_defaults(func=_cmd_extract)
