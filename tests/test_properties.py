"""Property-based tests (hypothesis, derandomized: the same examples on every run).

* random small DAG modules (residual adds, concatenations, parallel branches, reshapes,
  shared submodules): every listed cut is verified and splits exactly, batch sizes 1 and 3;
* random kept-channel sets on coupled channel groups: structural pruning == zero-masking;
* random class specs and fractions: a CloneTask never accepts overlap, duplicates, an
  empty set or an out-of-range fraction, and accepts every valid one;
* random mutations of a real patch file: read_patch/load_patch raise PatchError or give
  back exactly the original, never another exception.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from pnc.surgery.channel_groups import MaskedBody
from pnc.surgery.cuts import cut_points
from pnc.surgery.errors import PatchError, TaskError
from pnc.surgery.patch import load_patch, read_patch, save_patch
from pnc.surgery.splitting import split
from pnc.surgery.tracing import trace
from pnc.zoo.datasets import load_dataset
from pnc.zoo.tasks import CloneTask, parse_classes

SETTINGS = settings(
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


# --- random DAG modules ----------------------------------------------------------------

OPS = ("conv", "residual", "concat", "parallel_add", "reshape", "shared", "bn_relu", "pool")


class RandomDag(nn.Module):
    """A small CNN from a program of ``OPS``; channels stay ``width`` between ops."""

    def __init__(self, program: list[str], width: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.program = list(program)
        self.stem = nn.Conv2d(2, width, 3, padding=1)
        self.ops = nn.ModuleList()
        for op in program:
            self.ops.append(self._make(op, width))
        self.shared = nn.Conv2d(width, width, 1)  # used by every "shared" op: one module, several calls
        self.head = nn.Linear(width, classes)

    @staticmethod
    def _make(op: str, w: int) -> nn.Module:
        conv = functools.partial(nn.Conv2d, kernel_size=3, padding=1)
        if op == "conv":
            return nn.Sequential(conv(w, w), nn.ReLU())
        if op == "residual":
            return nn.Sequential(conv(w, w), nn.BatchNorm2d(w), nn.ReLU(), conv(w, w))
        if op == "concat":
            return nn.ModuleList([conv(w, w // 2), conv(w, w - w // 2)])
        if op == "parallel_add":
            return nn.ModuleList([conv(w, w), nn.Conv2d(w, w, 1)])
        if op == "bn_relu":
            return nn.Sequential(nn.BatchNorm2d(w), nn.ReLU())
        return nn.Identity()  # reshape, shared, pool: no parameters of their own

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for op, mod in zip(self.program, self.ops):
            if op in ("conv", "bn_relu"):
                x = mod(x)
            elif op == "residual":
                x = torch.relu(x + mod(x))
            elif op == "concat":
                x = torch.cat([mod[0](x), mod[1](x)], dim=1)
            elif op == "parallel_add":
                x = mod[0](x) + mod[1](x)
            elif op == "reshape":
                b, c, h, w = x.shape
                x = x.reshape(b, c, h * w).transpose(1, 2).transpose(1, 2).reshape(b, c, h, w)
            elif op == "shared":
                x = self.shared(torch.relu(self.shared(x)))
            elif op == "pool":
                x = nn.functional.max_pool2d(x, 2) if x.shape[-1] >= 4 else x
        return self.head(x.mean(dim=(2, 3)))


def _randomize_bn(model: nn.Module, gen: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) * 2 - 1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=gen) * 2 - 1)


@settings(SETTINGS, max_examples=50)
@given(program=st.lists(st.sampled_from(OPS), min_size=1, max_size=6), seed=st.integers(0, 2**16))
def test_every_listed_cut_splits_exactly_at_batch_1_and_3(program, seed):
    torch.manual_seed(seed)
    model = RandomDag(program).eval()
    with torch.no_grad():
        _randomize_bn(model, torch.Generator().manual_seed(seed))
    traced = trace(model, torch.randn(2, 2, 8, 8))
    cuts = cut_points(traced)
    assert cuts, f"no cut point listed for {program}"
    with torch.no_grad():
        for batch in (1, 3):
            x = torch.randn(batch, 2, 8, 8)
            reference = model(x)
            for cut in cuts:
                assert cut.verified, (program, cut.node, cut.reason)
                prefix, suffix = split(traced, cut)
                features = prefix(x)
                assert features.shape == (batch, *cut.shape), (program, cut.node)
                assert torch.equal(suffix(features), reference), (program, cut.node, batch)


# --- structural pruning == zero-masking on coupled groups ---------------------------------

BODY_OPS = ("conv_bn", "residual", "depthwise", "concat")


class CoupledBody(nn.Module):
    """Layers whose channels are coupled: residual adds tie a block's output to its input,
    depthwise convs tie input to output, concatenations join two groups."""

    def __init__(self, program: list[str], width: int, classes: int = 3) -> None:
        super().__init__()
        self.program = list(program)
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.ops = nn.ModuleList()
        w = width
        for op in program:
            if op == "conv_bn":
                self.ops.append(nn.Sequential(nn.Conv2d(w, w + 2, 3, padding=1), nn.BatchNorm2d(w + 2), nn.ReLU()))
                w += 2
            elif op == "residual":
                self.ops.append(nn.Sequential(nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w)))
            elif op == "depthwise":
                self.ops.append(nn.Sequential(nn.Conv2d(w, w, 3, padding=1, groups=w), nn.BatchNorm2d(w), nn.ReLU()))
            else:  # concat of two convolutions of the same input
                self.ops.append(nn.ModuleList([nn.Conv2d(w, 3, 1), nn.Conv2d(w, 2, 3, padding=1)]))
                w = 5
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(w, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for op, mod in zip(self.program, self.ops):
            if op == "residual":
                x = torch.relu(x + mod(x))
            elif op == "concat":
                x = torch.cat([mod[0](x), mod[1](x)], dim=1)
            else:
                x = mod(x)
        return self.head(self.pool(x))


@settings(SETTINGS, max_examples=30)
@given(
    program=st.lists(st.sampled_from(BODY_OPS), min_size=1, max_size=4),
    width=st.integers(2, 6),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_structural_pruning_equals_zero_masking(program, width, seed, data):
    torch.manual_seed(seed)
    body = CoupledBody(program, width).eval()
    with torch.no_grad():
        _randomize_bn(body, torch.Generator().manual_seed(seed))
    x = torch.randn(3, 3, 6, 6)
    masked = MaskedBody(body, x, "NCHW", frozen=[body.head])
    keep = {
        g.name: torch.tensor(
            sorted(data.draw(st.sets(st.integers(0, g.size - 1), min_size=1, max_size=g.size), label=g.name))
        )
        for g in masked.groups
    }
    vanishing = [
        a.module
        for g in masked.groups
        for a in g.anchors
        if len(a.roots) and not set(keep[g.name].tolist()) & set(a.roots.tolist())
    ]
    if vanishing:  # a concatenated part would lose every channel: refused, never a crash in prune
        with pytest.raises(ValueError, match="concatenated part"):
            masked.set_keep(keep)
        return
    masked.set_keep(keep)
    _assert_pruning_equals_masking(masked, x)
    kept = sum(len(v) for v in keep.values())
    assert masked.kept_fraction() == pytest.approx(kept / max(sum(g.size for g in masked.groups), 1))


def _assert_pruning_equals_masking(masked: MaskedBody, x: torch.Tensor) -> None:
    small, _ = masked.prune()
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(small(x[:1]), masked(x[:1]), rtol=1e-5, atol=1e-5)


@settings(SETTINGS, max_examples=40)
@given(
    program=st.lists(st.sampled_from(BODY_OPS), min_size=1, max_size=4),
    width=st.integers(2, 6),
    seed=st.integers(0, 2**16),
    ratio=st.floats(0.01, 1.0),
    scope=st.sampled_from(["group", "global"]),
)
def test_binarized_masks_always_prune_to_the_masked_output(program, width, seed, ratio, scope):
    """What the search keeps (top channels by soft mask) is always prunable, concatenations too."""
    torch.manual_seed(seed)
    body = CoupledBody(program, width).eval()
    x = torch.randn(3, 3, 6, 6)
    masked = MaskedBody(body, x, "NCHW", frozen=[body.head])
    with torch.no_grad():
        for logits in masked.logits.values():
            logits.copy_(torch.randn(logits.shape))
    masked.binarize(ratio, scope)
    _assert_pruning_equals_masking(masked, x)


# --- clone tasks ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _digits():
    return load_dataset("digits")


ids = st.integers(-2, 11)
id_lists = st.lists(ids, min_size=0, max_size=6)
fractions = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1.0, 1e-9, 1.0000001]))


def _valid(target: list[int], source: list[int], clone: list[int] | str, fraction: float) -> bool:
    def ok(ids: list[int]) -> bool:
        return bool(ids) and len(set(ids)) == len(ids) and all(0 <= c < 10 for c in ids)

    if not (ok(target) and ok(source)) or set(target) & set(source):
        return False
    if isinstance(clone, str):
        clone_ok = clone.upper() in ("S", "M")
    else:
        clone_ok = ok(clone) and set(clone) <= set(source)
    return clone_ok and 0.0 < fraction <= 1.0


@settings(SETTINGS, max_examples=150)
@given(
    target=id_lists,
    source=id_lists,
    clone=st.one_of(id_lists, st.sampled_from(["S", "M", "s", "L", ""])),
    fraction=fractions,
)
def test_a_clone_task_accepts_exactly_the_valid_ones(target, source, clone, fraction):
    valid = _valid(target, source, clone, fraction)
    try:
        task = CloneTask(
            _digits(), list(target), list(source), clone if isinstance(clone, str) else list(clone), fraction=fraction
        )
    except TaskError:
        assert not valid, "a valid task was refused"
        return
    assert valid, "an invalid task was accepted"
    classes = task.target_classes + task.clone_classes
    assert len(set(classes)) == len(classes) and task.clone_classes
    assert set(task.clone_classes) <= set(task.source_classes)
    assert task.num_outputs == len(classes)


@settings(SETTINGS, max_examples=150)
@given(spec=st.text(alphabet="0123456789-, abzS", max_size=12))
def test_parsed_class_specs_are_non_empty_unique_and_in_range(spec):
    try:
        parsed = parse_classes(spec, _digits().classes)
    except TaskError:
        return
    assert parsed and len(set(parsed)) == len(parsed) and all(0 <= c < 10 for c in parsed)


@settings(SETTINGS, max_examples=60)
@given(classes=st.lists(st.integers(0, 9), min_size=1, max_size=10, unique=True), data=st.data())
def test_disjoint_class_sets_always_make_a_task(classes, data):
    cut = data.draw(st.integers(1, len(classes)))
    target, source = classes[:cut], classes[cut:]
    if not source:
        with pytest.raises(TaskError):
            CloneTask(_digits(), target, source, "S")
        return
    task = CloneTask(
        _digits(), target, source, data.draw(st.sampled_from(["S", "M"])), fraction=data.draw(st.floats(1e-6, 1.0))
    )
    assert task.clone_classes == source[: len(task.clone_classes)]
    assert 1 <= len(task.clone_classes) <= math.ceil(0.6 * len(source)) + 1


# --- mutated patch files -------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _patch(folder: str):
    from pnc.surgery.examples import tiny_clone

    net, target, source, x = tiny_clone()
    path = Path(folder) / "clone.pnc"
    save_patch(net, path, target_name="t", input_size=(1, 8, 8))
    return path.read_bytes(), read_patch(path), target, source, x, net(x).detach()


@pytest.fixture(scope="module")
def patch_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("patch-fuzz"))


MUTATIONS = ["flip", "flip", "flip", "truncate", "insert", "delete", "reverse"]


def _mutate(data: bytes, kind: str, where: int, value: int, size: int) -> bytes:
    if not data:
        return bytes([value]) * size
    where %= len(data)
    if kind == "flip":
        return data[:where] + bytes([data[where] ^ (value or 1)]) + data[where + 1 :]
    if kind == "truncate":
        return data[:where]
    if kind == "insert":
        return data[:where] + bytes([value]) * size + data[where:]
    if kind == "delete":
        return data[:where] + data[where + size :]
    return data[:8] + data[8:][::-1] if kind == "reverse" else data[::-1]


@settings(SETTINGS, max_examples=300)
@given(
    mutations=st.lists(
        st.tuples(st.sampled_from(MUTATIONS), st.integers(0, 10**6), st.integers(0, 255), st.integers(1, 8)),
        min_size=1,
        max_size=3,
    ),
    header_bias=st.booleans(),
)
def test_a_mutated_patch_is_refused_or_loads_identically(patch_dir, tmp_path_factory, mutations, header_bias):
    original, (meta, tensors), target, source, x, reference = _patch(patch_dir)
    header_end = 8 + int.from_bytes(original[:8], "little")
    data = original
    for kind, where, value, size in mutations:
        where = where % header_end if header_bias else where  # half the cases hit the JSON header
        data = _mutate(data, kind, where, value, size)
    path = Path(patch_dir) / "mutated.pnc"
    path.write_bytes(data)
    try:
        got_meta, got_tensors = read_patch(path)
        net, _ = load_patch(path, target, {"src": source})
    except PatchError:
        return
    assert got_meta == meta and got_tensors.keys() == tensors.keys()
    assert all(torch.equal(got_tensors[k], tensors[k]) for k in tensors)
    with torch.no_grad():
        assert torch.equal(net(x), reference)


def _legacy(original: bytes) -> bytes:
    """The same patch as pnc-patch/1 wrote it: no content hash, so nothing vouches for its bytes."""
    from safetensors.torch import load, save

    header = json.loads(original[8 : 8 + int.from_bytes(original[:8], "little")])["__metadata__"]
    meta = json.loads(header["pnc"]) | {"format": "pnc-patch/1"}
    return save(load(original), metadata={"pnc": json.dumps(meta)})


@settings(SETTINGS, max_examples=150)
@given(
    mutations=st.lists(
        st.tuples(
            st.sampled_from(["flip", "flip", "insert", "delete"]),
            st.integers(0, 10**6),
            st.integers(0, 255),
            st.integers(1, 4),
        ),
        min_size=1,
        max_size=2,
    )
)
def test_a_mutated_legacy_patch_never_crashes(patch_dir, mutations):
    """Without a hash a changed weight may load (there is nothing to check it against), but a
    changed structure is PatchError, never another exception."""
    original, _, target, source, x, _ = _patch(patch_dir)
    data = _legacy(original)
    header_end = 8 + int.from_bytes(data[:8], "little")
    for kind, where, value, size in mutations:
        data = _mutate(data, kind, where % header_end, value, size)  # the JSON header: structure
    path = Path(patch_dir) / "legacy.pnc"
    path.write_bytes(data)
    try:
        net, _ = load_patch(path, target, {"src": source})
    except PatchError:
        return
    with torch.no_grad():
        assert net(x).shape[0] == len(x)


def test_a_legacy_patch_still_loads(patch_dir):
    original, (meta, _), target, source, x, reference = _patch(patch_dir)
    path = Path(patch_dir) / "legacy-intact.pnc"
    path.write_bytes(_legacy(original))
    net, again = load_patch(path, target, {"src": source})
    assert again["format"] == "pnc-patch/1" and torch.equal(net(x), reference)


def test_the_patch_fuzz_starts_from_a_loadable_patch(patch_dir):
    original, (meta, _), target, source, x, reference = _patch(patch_dir)
    net, again = load_patch(Path(patch_dir) / "clone.pnc", target, {"src": source})
    assert again == meta and torch.equal(net(x), reference) and json.dumps(meta)
