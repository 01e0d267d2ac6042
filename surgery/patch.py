"""Patch files (``.pnc``): the paper's transmission form {M, R, A, F_c}.

One safetensors file. Its tensors, per branch ``b``: ``b/keep.<group>`` (kept channel
indices of each coupling group = M), ``b/adapter.*`` (A), ``b/head.*`` (F_c) and, when the
branch's pruned module was fine-tuned while cloning, ``b/module.*`` (its weights). Its JSON
metadata (key ``pnc``): the format version, the target's and each source's zoo name and
state_dict sha256, the cut node names R (target) and R' (source), class names, the
adapter spec and each branch's clone task. With the public zoo models it names, the patch
rebuilds the cloned network anywhere; weights whose hash differs are refused.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from pnc.adapters import make_adapter
from pnc.surgery.branch import Branch, ExtendedHead
from pnc.surgery.cloned import ClonedNetwork
from pnc.surgery.errors import PatchError
from pnc.surgery.insertion import transferable_module
from pnc.surgery.tracing import trace
from pnc.zoo.store import ZooStore, atomic_write_bytes, state_dict_sha256

FORMAT = "pnc-patch/1"


def save_patch(net: ClonedNetwork, path: str | Path, *, target_name: str, input_size: tuple[int, ...],
               tasks: dict[str, dict] | None = None) -> int:
    """Write ``net``'s branches to ``path`` (atomically); return the file size in bytes.

    Args:
        target_name: the target's zoo name.
        input_size: (C, H, W) of the network's input.
        tasks: per branch, the clone task as ``CloneTask.to_dict()`` (for ``pnc eval``).
    """
    tensors, branches = {}, []
    for name, b in net.branches.items():
        for part, module in (("adapter", b.adapter), ("head", b.head)):
            tensors |= {f"{name}/{part}.{k}": v.detach().contiguous() for k, v in module.state_dict().items()}
        tensors |= {f"{name}/keep.{g}": idx.to(torch.int64) for g, idx in b.body.keep.items()}
        if b.body.tuned:
            tensors |= {f"{name}/module.{k}": v.detach().contiguous() for k, v in b.body.body.state_dict().items()}
        branches.append({
            "name": name, "source": {"name": b.source_name, "sha256": b.source_sha256},
            "target_cut": b.target_cut, "source_cut": b.source_cut, "classes": b.classes,
            "source_outputs": b.source_outputs, "adapter": asdict(b.adapter.spec),
            "task": (tasks or {}).get(name),
        })
    meta = {"format": FORMAT, "input_size": list(input_size), "branches": branches,
            "target": {"name": target_name, "sha256": state_dict_sha256(net.target), "classes": net.target_classes}}
    data = save(tensors, metadata={"pnc": json.dumps(meta)})
    atomic_write_bytes(Path(path), data)
    return len(data)


def read_patch(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a patch file; a corrupt or foreign file raises PatchError."""
    path = Path(path)
    try:
        data = path.read_bytes()
        tensors = load(data)
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(json.loads(data[8:8 + header_len])["__metadata__"]["pnc"])
    except FileNotFoundError:
        raise PatchError(f"{path}: no such patch file; make one with `pnc clone ... --out DIR`") from None
    except (SafetensorError, KeyError, ValueError, TypeError) as err:
        raise PatchError(f"{path} is not a pnc patch (corrupt or not made by `pnc clone`): {err}") from None
    if meta.get("format") != FORMAT:
        raise PatchError(f"{path}: unsupported patch format {meta.get('format')!r}; expected {FORMAT}")
    return meta, tensors


def _verified(store: ZooStore, name: str, sha256: str, role: str):
    model, card = store.load(name)
    actual = state_dict_sha256(model)
    if actual != sha256:
        raise PatchError(f"the patch was made for other weights of {role} {name!r}: expected sha256 "
                         f"{sha256[:12]}..., the zoo has {actual[:12]}...; use the zoo model the patch names "
                         f"(`pnc zoo show {name}`) or re-run `pnc clone`")
    return model, card


def load_patch(path: str | Path, store: ZooStore) -> tuple[ClonedNetwork, dict]:
    """Rebuild the cloned network of a patch from the zoo; returns (network, metadata)."""
    meta, tensors = read_patch(path)
    target, _ = _verified(store, meta["target"]["name"], meta["target"]["sha256"], "target")
    example = torch.zeros(2, *meta["input_size"])
    net = ClonedNetwork(target, example, meta["target"]["classes"])
    for b in meta["branches"]:
        name = b["name"]
        source, _ = _verified(store, b["source"]["name"], b["source"]["sha256"], "source")

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        module = transferable_module(trace(source, example), b["source_cut"], example, part(f"{name}/keep."))
        tuned = part(f"{name}/module.")
        if tuned:
            module.body.load_state_dict(tuned)
            module.tuned = True
        adapter = make_adapter(**b["adapter"])
        adapter.load_state_dict(part(f"{name}/adapter."))
        head = ExtendedHead(net.classifier.in_features, len(module.features), len(net.target_classes),
                            len(b["classes"]))
        head.load_state_dict(part(f"{name}/head."))
        net.add_branch(name, Branch(adapter.eval(), module, head.eval(), target_cut=b["target_cut"],
                                    source_cut=b["source_cut"], classes=b["classes"],
                                    source_outputs=b["source_outputs"], source_name=b["source"]["name"],
                                    source_sha256=b["source"]["sha256"]))
    return net, meta
