"""Patch files (``.pnc``): the paper's transmission form {M, R, A, F_c}.

One safetensors file. Its tensors, per branch ``b``: ``b/keep.<group>`` (kept channel
indices of each coupling group = M), ``b/adapter.*`` (A), ``b/head.*`` (F_c). Its JSON
metadata (key ``pnc``): the format version, the target's and each source's zoo name and
state_dict sha256, the cut node names R (target) and R' (source), class names, the
adapter spec and each branch's clone task. With the public zoo models it names, the patch
rebuilds the cloned network anywhere; weights whose hash differs are refused.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load

from torch import nn

from pnc.surgery.branch import CloneReport, assemble_branch, branch_tensors
from pnc.surgery.cloned import ClonedNetwork
from pnc.surgery.errors import PatchError
from pnc.surgery.io import save_tensors, state_dict_sha256
from pnc.surgery.tracing import trace

FORMAT = "pnc-patch/1"


def save_patch(net: ClonedNetwork, path: str | Path, *, target_name: str, input_size: tuple[int, ...],
               tasks: dict[str, dict] | None = None) -> int:
    """Write ``net``'s branches to ``path`` (atomically); return the file size in bytes.

    Args:
        target_name: the target's zoo name.
        input_size: (C, H, W) of the network's input.
        tasks: per branch, the clone task as ``CloneTask.to_dict()`` (for ``pnc eval``).

    Tensors per branch ``b``: ``b/keep.<group>`` (M), ``b/adapter.*`` (A), ``b/head.*`` (F_c).

    >>> import tempfile
    >>> from pnc.surgery.examples import tiny_clone
    >>> net, *_ = tiny_clone()
    >>> save_patch(net, Path(tempfile.mkdtemp()) / "clone.pnc", target_name="t", input_size=(1, 8, 8)) < 10_000
    True
    """
    tensors: dict[str, torch.Tensor] = {}
    branches = []
    for name, b in net.branches.items():
        tensors |= {f"{name}/{k}": v for k, v in branch_tensors(b.body.keep, b.adapter, b.head).items()}
        branches.append({
            "name": name, "source": {"name": b.source_name, "sha256": b.source_sha256},
            "target_cut": b.target_cut, "source_cut": b.source_cut, "classes": b.classes,
            "source_outputs": b.source_outputs, "adapter": asdict(b.adapter.spec),
            "task": (tasks or {}).get(name), "report": None if b.report is None else asdict(b.report),
        })
    meta = {"format": FORMAT, "input_size": list(input_size), "branches": branches,
            "target": {"name": target_name, "sha256": state_dict_sha256(net.target), "classes": net.target_classes}}
    return save_tensors(path, tensors, metadata={"pnc": json.dumps(meta)})


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
    except OSError as err:  # a folder, no permission, ...
        raise PatchError(f"{path}: cannot read it as a patch file ({err.strerror or err}); give the .pnc file "
                         "that `pnc clone --out DIR` wrote (DIR/clone.pnc)") from None
    except (SafetensorError, KeyError, ValueError, TypeError) as err:
        raise PatchError(f"{path} is not a pnc patch (corrupt or not made by `pnc clone`): {err}") from None
    if meta.get("format") != FORMAT:
        raise PatchError(f"{path}: unsupported patch format {meta.get('format')!r}; expected {FORMAT}")
    return meta, tensors


def _check_weights(model: nn.Module, sha256: str, role: str, name: str) -> None:
    actual = state_dict_sha256(model)
    if actual != sha256:
        raise PatchError(f"the patch was made for other weights of {role} {name!r}: expected state_dict sha256 "
                         f"{sha256[:12]}..., got {actual[:12]}...; pass the model the patch names, or re-run "
                         f"`pnc clone`")


SourceResolver = Callable[[str], nn.Module] | Mapping[str, nn.Module]


def load_patch(path: str | Path, target: nn.Module, sources: SourceResolver) -> tuple[ClonedNetwork, dict]:
    """Rebuild the cloned network of a patch on ``target``; returns (network, metadata).

    Args:
        target: the network the patch was made for (its state_dict hash is checked).
        sources: each branch's source network by the name the patch records
            (``meta["branches"][i]["source"]["name"]``): a mapping, or a callable such as
            ``lambda name: store.load(name)[0]``. Hashes are checked too.
    Raises :class:`PatchError` on a corrupt file or weights that differ from the patch's.

    ``pnc.zoo.ZooStore.load_patch(path)`` does this with the zoo models the patch names.

    >>> import tempfile
    >>> from pnc.surgery.examples import tiny_clone
    >>> net, target, source, x = tiny_clone()       # branch "src", made from source "src"
    >>> path = Path(tempfile.mkdtemp()) / "clone.pnc"
    >>> size = save_patch(net, path, target_name="t", input_size=(1, 8, 8))
    >>> rebuilt, meta = load_patch(path, target, {"src": source})
    >>> torch.allclose(rebuilt(x), net(x)), meta["branches"][0]["target_cut"]
    (True, 'conv')
    >>> load_patch(path, source, {"src": source})   # other weights are refused
    Traceback (most recent call last):
    pnc.surgery.errors.PatchError: the patch was made for other weights of target 't': ...
    """
    meta, tensors = read_patch(path)
    resolve = sources.__getitem__ if isinstance(sources, Mapping) else sources
    _check_weights(target, meta["target"]["sha256"], "target", meta["target"]["name"])
    example = torch.zeros(2, *meta["input_size"])
    net = ClonedNetwork(target, example, meta["target"]["classes"])
    for b in meta["branches"]:
        name, source_name = b["name"], b["source"]["name"]
        try:
            source = resolve(source_name)
        except KeyError:
            raise PatchError(f"{path}: no source network given for {source_name!r} (branch {name!r})") from None
        _check_weights(source, b["source"]["sha256"], "source", source_name)
        parts = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(f"{name}/")}
        branch = assemble_branch(
            trace(source.eval(), example), example, parts, source_cut=b["source_cut"], adapter_spec=b["adapter"],
            target_cut=b["target_cut"], classes=b["classes"], source_outputs=b["source_outputs"],
            source_name=source_name, source_sha256=b["source"]["sha256"])
        branch.report = CloneReport(**b["report"]) if b.get("report") else None
        net.add_branch(name, branch)
    return net, meta
