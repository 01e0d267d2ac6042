"""A cloned branch: adapter A, transferable module M_f and head extension F_c.

The branch reads the target's features at its cut R and its pre-logit features, and gives
(correction to the target's logits, logits of the cloned classes)::

    cut (B, *target_cut_shape) --A--> (B, *source_cut_shape) --M_f--> feats (B, d_f)
    correction = W_old @ feats + U_old @ target_prelogits + c   (B, |T_t|), starts at zero
    new        = W_new @ [target_prelogits, feats] + b          (B, |T_s|), feats' part starts
                                                                 as the source classifier's T_s rows
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

from pnc.adapters import make_adapter
from pnc.surgery.channel_groups import prune_structurally
from pnc.surgery.cuts import classifier_of, cut_points
from pnc.surgery.devices import DeviceLike, device_of
from pnc.surgery.errors import CutError
from pnc.surgery.splitting import extract
from pnc.surgery.tracing import TracedModel


class ExtendedHead(nn.Module):
    """F_c: the extension of the target's classifier (the target's own head is untouched).

    Args:
        target_dim: width of the target's pre-logit features.
        branch_dim: width of the transferable module's output features.
        num_old / num_new: |T_t| and |T_s|.
        device: where its weights are made (default: torch's default device).
    """

    def __init__(self, target_dim: int, branch_dim: int, num_old: int, num_new: int, device: DeviceLike | None = None):
        super().__init__()
        self.old = nn.Linear(branch_dim, num_old, bias=False, device=device)
        self.old_target = nn.Linear(target_dim, num_old, device=device)
        self.new = nn.Linear(target_dim + branch_dim, num_new, device=device)
        nn.init.zeros_(self.old.weight)
        nn.init.zeros_(self.old_target.weight)
        nn.init.zeros_(self.old_target.bias)
        nn.init.zeros_(self.new.weight)
        nn.init.zeros_(self.new.bias)
        self.target_dim = target_dim

    @classmethod
    def from_state(cls, state: Mapping[str, Tensor]) -> ExtendedHead:
        """A head sized and loaded from its own state_dict (``old.weight`` (|T_t|, branch_dim),
        ``new.weight`` (|T_s|, target_dim + branch_dim)), on the device of those tensors."""
        num_old, branch_dim = state["old.weight"].shape
        num_new, width = state["new.weight"].shape
        head = cls(width - branch_dim, branch_dim, num_old, num_new, device=state["new.weight"].device)
        head.load_state_dict(dict(state))
        return head

    def init_from_source(self, weight: Tensor, bias: Tensor | None) -> None:
        """Source classifier rows for T_s: weight (|T_s|, branch_dim), bias (|T_s|,)."""
        with torch.no_grad():
            self.new.weight[:, self.target_dim :] = weight
            if bias is not None:
                self.new.bias.copy_(bias)

    def forward(self, target_feats: Tensor, branch_feats: Tensor) -> tuple[Tensor, Tensor]:
        """(B, target_dim), (B, branch_dim) -> correction (B, |T_t|), new logits (B, |T_s|)."""
        correction = self.old(branch_feats) + self.old_target(target_feats)
        return correction, self.new(torch.cat([target_feats, branch_feats], 1))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As nn.Module's; a head saved before ``old_target`` existed loads with it at zero."""
        state_dict = dict(state_dict)
        for key in ("old_target.weight", "old_target.bias"):
            state_dict.setdefault(key, torch.zeros_like(self.state_dict()[key]))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def keep_branch_features(self, kept: Tensor) -> ExtendedHead:
        """A copy that reads only the branch features ``kept`` (after structural pruning)."""
        device = self.old.weight.device
        head = ExtendedHead(self.target_dim, len(kept), self.old.out_features, self.new.out_features, device)
        kept = kept.to(device)
        with torch.no_grad():
            head.old.weight.copy_(self.old.weight[:, kept])
            head.old_target.load_state_dict(self.old_target.state_dict())
            head.new.weight.copy_(
                torch.cat([self.new.weight[:, : self.target_dim], self.new.weight[:, self.target_dim :][:, kept]], 1)
            )
            head.new.bias.copy_(self.new.bias)
        return head


@dataclass
class CloneReport:
    """What the clone run that made a branch did: the chosen R, every candidate's summary,
    the transferable module's size before/after pruning, time, the images used (``images``:
    old / clone training images and held-out images), the chosen branch's fine-tuning
    (``tuning``: held-out metrics before / after, kept or not), whether a time budget
    stopped the search early, why R was chosen (``chosen_because``) and where the time went
    (``profile``: seconds per phase)."""

    target_cut: str
    source_cut: str
    candidates: list[dict]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    kept_fraction: float
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)
    images: dict[str, int] = field(default_factory=dict)
    tuning: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # candidate pairs no adapter maps, with the reason
    budget_stopped: bool = False
    chosen_because: str = ""
    profile: dict[str, float] = field(default_factory=dict)


@dataclass
class PruningCost:
    """Size of the source's layers after the cut, before and after structural pruning."""

    params_before: int
    params_after: int
    macs_before: int
    macs_after: int


class TransferableModule(nn.Module):
    """M_f: the source's layers from its cut R' to its pre-logit features, structurally
    pruned to the kept channels. A copy: the source itself is never touched.

    forward: (B, *source_cut_shape) -> (B, d_f) with d_f = len(self.features).
    """

    features: Tensor

    def __init__(
        self, body: torch.fx.GraphModule, features: Tensor, keep: dict[str, Tensor], report: PruningCost | None = None
    ):
        super().__init__()
        self.body = body
        self.register_buffer("features", features, persistent=False)
        self.keep = keep
        self.report = report
        #: its weights were fine-tuned (they differ from the source's and go into patches)
        self.tuned = False

    @classmethod
    def from_keep(
        cls, body_with_head: torch.fx.GraphModule, head: str, example: Tensor, layout: str, keep: dict[str, Tensor]
    ) -> TransferableModule:
        """Prune a copy of ``body_with_head`` (cut -> (pre-logits, logits), the classifier
        at path ``head`` kept whole) to ``keep`` and drop the classifier.

        ``features`` holds the pre-logit indices that survive (those the pruned classifier
        still reads)."""
        before = module_cost(body_with_head, example)
        pruned, removed = prune_structurally(copy.deepcopy(body_with_head), example, layout, keep, [head])
        width = dict(body_with_head.named_modules())[head].in_features
        features = torch.tensor(sorted(set(range(width)) - removed[head]), dtype=torch.long, device=example.device)
        graph = pruned.graph
        out = next(n for n in graph.nodes if n.op == "output")
        out.args = (out.args[0][0],)  # keep the pre-logits only
        graph.eliminate_dead_code()
        pruned.delete_all_unused_submodules()
        pruned.recompile()
        after = module_cost(pruned, example)
        report = PruningCost(params_before=before[1], params_after=after[1], macs_before=before[0], macs_after=after[0])
        return cls(pruned.eval().requires_grad_(False), features, keep, report)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)

    def train(self, mode: bool = True) -> TransferableModule:
        """The source's layers stay in eval mode (frozen BatchNorm statistics); only the tuning
        of the chosen branch lets this copy's BatchNorm layers train (:func:`pnc.surgery.tuning.train_mode`)."""
        return super().train(False)


def module_cost(module: nn.Module, example: Tensor) -> tuple[int, int]:
    """(MACs, params) of ``module`` on one example (1, *input shape), with torch-pruning's counter."""
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(module, example[:1])
    return int(macs), int(params)


class Branch(nn.Module):
    """One cloned branch; ``body`` is a :class:`MaskedBody` while searching and a
    :class:`TransferableModule` once pruned.

    Attributes (metadata kept for patches and ONNX export):
        target_cut / source_cut: fx node names of R in the target and R' in the source.
        classes: names of the cloned classes, in output order.
        source_outputs: the source's output index of each cloned class.
        report: how the branch was found (set by ``clone``; kept in patches).
    """

    report: CloneReport | None

    def __init__(
        self,
        adapter: nn.Module,
        body: nn.Module,
        head: ExtendedHead,
        *,
        target_cut: str,
        source_cut: str,
        classes: list[str],
        source_outputs: list[int],
        source_name: str = "",
        source_sha256: str = "",
    ):
        super().__init__()
        self.adapter, self.body, self.head = adapter, body, head
        self.target_cut, self.source_cut = target_cut, source_cut
        self.classes, self.source_outputs = list(classes), list(source_outputs)
        self.source_name, self.source_sha256 = source_name, source_sha256
        self.report = None

    def features(self, cut: Tensor) -> Tensor:
        """Target cut features -> branch features (B, d_f)."""
        out = self.body(self.adapter(cut))
        return out[0] if isinstance(out, tuple) else out

    def forward(self, cut: Tensor, target_prelogits: Tensor) -> tuple[Tensor, Tensor]:
        """-> (correction (B, |T_t|), new-class logits (B, |T_s|))."""
        return self.head(target_prelogits, self.features(cut))

    def joint_logits(self, cut: Tensor, target_prelogits: Tensor, target_logits: Tensor) -> Tensor:
        """The cloned network's logits (B, |T_t| + |T_s|) with this branch alone: the target's
        logits (B, |T_t|) plus the correction, then the new classes'."""
        correction, new = self(cut, target_prelogits)
        return torch.cat([target_logits + correction, new], 1)


def transferable_module(
    source: TracedModel, source_cut: str, images: Tensor, keep: Mapping[str, Tensor]
) -> TransferableModule:
    """M_f: the source's layers from ``source_cut`` to its pre-logits, pruned to ``keep``, on the
    source's device.

    images: (B, C, H, W) inputs of the source (moved to its device), used to trace the layers."""
    cls = classifier_of(source)
    cut = next((c for c in cut_points(source, verify=False) if c.node == source_cut), None)
    if cut is None:
        raise CutError(f"{source_cut!r} is not a cut point of the source")
    with torch.no_grad():
        example = extract(source, None, [cut.node])(images.to(device_of(source.model)))
    body = extract(source, cut.node, [cls.input_node, cls.node])
    layout = "NCHW" if cut.layout == "NCHW" else "NLC"
    return TransferableModule.from_keep(body, cls.module, example, layout, dict(keep))


def _prefixed(tensors: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def branch_tensors(
    keep: Mapping[str, Tensor], adapter: nn.Module, head: nn.Module, module: TransferableModule | None = None
) -> dict[str, Tensor]:
    """{M, A, F_c} as flat tensors: ``keep.<group>`` (kept channel indices of each coupling
    group), ``adapter.<param>``, ``head.<param>`` (copies), and ``module.<param>`` when the
    transferable module was fine-tuned; :func:`assemble_branch` reads them back."""
    tensors = {f"keep.{g}": idx.to(torch.int64) for g, idx in keep.items()}
    parts = [("adapter", adapter), ("head", head)] + ([("module", module.body)] if module and module.tuned else [])
    for part, layer in parts:
        tensors |= {f"{part}.{k}": v.detach().clone() for k, v in layer.state_dict().items()}
    return tensors


def assemble_branch(
    source: TracedModel,
    images: Tensor,
    parts: Mapping[str, Tensor],
    *,
    source_cut: str,
    adapter_spec: Mapping[str, Any],
    target_cut: str,
    classes: list[str],
    source_outputs: list[int],
    source_name: str = "",
    source_sha256: str = "",
) -> Branch:
    """The one way a branch is built from its learned parts {M, A, F_c} (``parts`` as
    :func:`branch_tensors` writes them): by the search (head over every source feature)
    and by ``load_patch`` (head already pruned). The branch is built on the source's device,
    whatever device ``parts`` are on (a patch's are on the CPU).

    images: (B, C, H, W) inputs of the source, used to trace M_f."""
    device = device_of(source.model)
    parts = {k: v.to(device) for k, v in parts.items()}
    module = transferable_module(source, source_cut, images, _prefixed(parts, "keep."))
    tuned = _prefixed(parts, "module.")
    if tuned:  # a fine-tuned copy: its weights travel with the patch
        module.body.load_state_dict(tuned)
        module.tuned = True
    adapter = make_adapter(**adapter_spec, device=device)
    adapter.load_state_dict(_prefixed(parts, "adapter."))
    head = ExtendedHead.from_state(_prefixed(parts, "head."))
    if head.old.in_features != len(module.features):
        head = head.keep_branch_features(module.features)
    return Branch(
        adapter.eval(),
        module,
        head.eval(),
        target_cut=target_cut,
        source_cut=source_cut,
        classes=classes,
        source_outputs=source_outputs,
        source_name=source_name,
        source_sha256=source_sha256,
    )
