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

import hashlib
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
from pnc.surgery.devices import device_of
from pnc.surgery.errors import PatchError, PncError
from pnc.surgery.io import save_tensors, state_dict_sha256
from pnc.surgery.tracing import trace

FORMAT = "pnc-patch/2"
#: /1 patches (before the content hash) are still read, without an integrity check
LEGACY_FORMATS = ("pnc-patch/1",)
#: safetensors metadata key of the content hash: sha256 of the "pnc" JSON and every tensor
HASH_KEY = "pnc_sha256"
_BRANCH_KEYS = {
    "name": str,
    "source": dict,
    "target_cut": str,
    "source_cut": str,
    "classes": list,
    "source_outputs": list,
    "adapter": dict,
}


def content_sha256(meta_json: str, tensors: Mapping[str, torch.Tensor]) -> str:
    """The patch's integrity hash: its metadata JSON text, then every tensor (sorted names,
    dtype, shape, bytes). Any changed byte of a patch changes it or breaks the file."""
    digest = hashlib.sha256(meta_json.encode())
    digest.update(state_dict_sha256(tensors).encode())
    return digest.hexdigest()


def save_patch(
    net: ClonedNetwork,
    path: str | Path,
    *,
    target_name: str,
    input_size: tuple[int, ...],
    tasks: dict[str, dict] | None = None,
) -> int:
    """Write ``net``'s branches to ``path`` (atomically); return the file size in bytes. The file
    holds CPU tensors: the same bytes whatever device ``net`` is on.

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
        tensors |= {f"{name}/{k}": v for k, v in branch_tensors(b.body.keep, b.adapter, b.head, b.body).items()}
        branches.append(
            {
                "name": name,
                "source": {"name": b.source_name, "sha256": b.source_sha256},
                "target_cut": b.target_cut,
                "source_cut": b.source_cut,
                "classes": b.classes,
                "source_outputs": b.source_outputs,
                "adapter": asdict(b.adapter.spec),
                "task": (tasks or {}).get(name),
                "report": None if b.report is None else asdict(b.report),
            }
        )
    meta = {
        "format": FORMAT,
        "input_size": list(input_size),
        "branches": branches,
        "target": {"name": target_name, "sha256": state_dict_sha256(net.target), "classes": net.target_classes},
    }
    text = json.dumps(meta)
    return save_tensors(path, tensors, metadata={"pnc": text, HASH_KEY: content_sha256(text, tensors)})


def read_patch(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a patch file; a corrupt, modified or foreign file raises PatchError."""
    path = Path(path)
    try:
        data = path.read_bytes()
        tensors = load(data)
        header_len = int.from_bytes(data[:8], "little")
        stored = json.loads(data[8 : 8 + header_len])["__metadata__"]
        text = stored["pnc"]
        meta = json.loads(text)
    except FileNotFoundError:
        raise PatchError(f"{path}: no such patch file; make one with `pnc clone ... --out DIR`") from None
    except OSError as err:  # a folder, no permission, ...
        raise PatchError(
            f"{path}: cannot read it as a patch file ({err.strerror or err}); give the .pnc file "
            "that `pnc clone --out DIR` wrote (DIR/clone.pnc)"
        ) from None
    except (SafetensorError, KeyError, ValueError, TypeError) as err:
        raise PatchError(f"{path} is not a pnc patch (corrupt or not made by `pnc clone`): {err}") from None
    if not isinstance(meta, dict) or meta.get("format") not in (FORMAT, *LEGACY_FORMATS):
        found = meta.get("format") if isinstance(meta, dict) else None
        raise PatchError(f"{path}: unsupported patch format {found!r}; expected {FORMAT}")
    if meta["format"] == FORMAT and stored.get(HASH_KEY) != content_sha256(text, tensors):
        raise PatchError(
            f"{path} is corrupt: its content does not match the hash it was saved with (a damaged "
            "copy or an edited file); copy it again or re-run `pnc clone`"
        )
    _check_schema(path, meta)
    return meta, tensors


def _check_schema(path: Path, meta: dict) -> None:
    """PatchError unless ``meta`` has the fields load_patch reads, with the right types."""

    def bad(what: str) -> PatchError:
        return PatchError(f"{path} is not a valid pnc patch: {what}; re-run `pnc clone` to make it again")

    size = meta.get("input_size")
    if not (isinstance(size, list) and len(size) == 3 and all(type(v) is int and v > 0 for v in size)):
        raise bad(f"bad input_size {size!r}")
    target = meta.get("target")
    if not (
        isinstance(target, dict)
        and isinstance(target.get("name"), str)
        and isinstance(target.get("sha256"), str)
        and isinstance(target.get("classes"), list)
    ):
        raise bad("missing or bad 'target' record")
    branches = meta.get("branches")
    if not isinstance(branches, list) or not branches:
        raise bad("no branches")
    for b in branches:
        if not isinstance(b, dict):
            raise bad("a branch record is not an object")
        wrong = [k for k, kind in _BRANCH_KEYS.items() if not isinstance(b.get(k), kind)]
        if wrong or not isinstance(b["source"].get("name"), str) or not isinstance(b["source"].get("sha256"), str):
            raise bad(f"branch {b.get('name')!r} has missing or bad fields {wrong or ['source']}")


def _check_weights(model: nn.Module, sha256: str, role: str, name: str) -> None:
    actual = state_dict_sha256(model)
    if actual != sha256:
        raise PatchError(
            f"the patch was made for other weights of {role} {name!r}: expected state_dict sha256 "
            f"{sha256[:12]}..., got {actual[:12]}...; pass the model the patch names, or re-run "
            f"`pnc clone`"
        )


SourceResolver = Callable[[str], nn.Module] | Mapping[str, nn.Module]


def load_patch(path: str | Path, target: nn.Module, sources: SourceResolver) -> tuple[ClonedNetwork, dict]:
    """Rebuild the cloned network of a patch on ``target``, on the target's device (the patch
    holds CPU tensors, whatever device it was saved from); returns (network, metadata).

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
    example = torch.zeros(2, *meta["input_size"], device=device_of(target))
    try:
        net = ClonedNetwork(target, example, meta["target"]["classes"])
    except (PncError, TypeError, ValueError, RuntimeError) as err:
        raise PatchError(
            f"{path}: the target does not fit the patch's input size {meta['input_size']} or "
            f"classes ({err}); pass the target the patch was made for"
        ) from None
    for b in meta["branches"]:
        name, source_name = b["name"], b["source"]["name"]
        try:
            source = resolve(source_name)
        except KeyError:
            raise PatchError(f"{path}: no source network given for {source_name!r} (branch {name!r})") from None
        _check_weights(source, b["source"]["sha256"], "source", source_name)
        parts = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(f"{name}/")}
        try:
            branch = assemble_branch(
                trace(source.eval(), example),
                example,
                parts,
                source_cut=b["source_cut"],
                adapter_spec=b["adapter"],
                target_cut=b["target_cut"],
                classes=b["classes"],
                source_outputs=b["source_outputs"],
                source_name=source_name,
                source_sha256=b["source"]["sha256"],
            )
            branch.report = CloneReport(**b["report"]) if b.get("report") else None
            net.add_branch(name, branch)
        except (PncError, KeyError, TypeError, ValueError, IndexError, RuntimeError) as err:
            if isinstance(err, PatchError):
                raise
            raise PatchError(
                f"{path}: branch {name!r} does not fit the networks it names ({err}); the patch is "
                "damaged or was made by another version of pnc: re-run `pnc clone`"
            ) from None
    return net, meta
