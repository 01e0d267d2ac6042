"""Tracing: shape specialisation, batch generality, parameter sharing, errors."""

from __future__ import annotations

import hashlib
import pickle

import networkx as nx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pnc.surgery.cuts import dominator_chain
from pnc.surgery.errors import TraceError
from pnc.surgery.tracing import evaluating, is_batch_node, trace


def _state_hash(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class TokenMixer(nn.Module):
    """Reads B, N, C from the shape and reshapes with them (the ViT attention idiom)."""

    def __init__(self, dim: int = 8, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1)) * (C // self.heads) ** -0.5
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class Resize(nn.Module):
    """Reads the input's spatial size first and uses it last: a shape-only edge around the body."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.mixer = TokenMixer()
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        y = self.body(x)
        tokens = y.flatten(2).transpose(1, 2)
        tokens = tokens + self.mixer(tokens)
        y = tokens.transpose(1, 2).reshape(x.size(0), 8, h // 2, w // 2)
        y = F.interpolate(y, size=(h, w), mode="nearest")
        return self.head(y.mean((2, 3)))


class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent: no graph can record this
            return x
        return -x


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gate = Gate()
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gate(self.conv(x)).mean((2, 3)))


class Cached(nn.Module):
    """Stores a derived tensor on itself in eval mode (like timm's LeViT attention biases)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.full((4,), 0.5))
        self.cache: dict[str, torch.Tensor] = {}
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            if "s" not in self.cache:
                self.cache["s"] = self.scale * 2
            s = self.cache["s"]
        else:
            s = self.scale * 2
        return self.conv(x) * s.view(1, -1, 1, 1)


@pytest.fixture(scope="module")
def resize_traced():
    torch.manual_seed(0)
    model = Resize()
    return trace(model, torch.randn(2, 3, 16, 16))


def test_shape_reads_become_constants(resize_traced):
    gm = resize_traced.gm
    size_reads = [n for n in gm.graph.nodes if n.op == "call_method" and n.target in ("size", "dim")]
    # only the batch size is read from a tensor, and from the input alone
    assert [n.args for n in size_reads] == [(next(iter(gm.graph.nodes)), 0)]
    assert all(is_batch_node(n) for n in size_reads)
    assert not any(n.op == "call_function" and n.target is getattr for n in gm.graph.nodes)


def test_no_shape_edges_in_dataflow(resize_traced):
    graph = resize_traced.graph
    assert isinstance(graph, nx.DiGraph) and nx.is_directed_acyclic_graph(graph)
    chain = dominator_chain(resize_traced)
    # the input's H, W are used after the body: without specialisation nothing inside would dominate
    assert "body_2" in chain and "add" in chain
    assert resize_traced.shapes["body_2"] == (2, 8, 8, 8)
    assert resize_traced.shapes["x"] == (2, 3, 16, 16)


def test_graph_runs_at_other_batch_sizes(resize_traced):
    model = resize_traced.model
    assert resize_traced.batch_size is None
    for batch in (1, 5):
        x = torch.randn(batch, 3, 16, 16)
        with evaluating(model), torch.no_grad():
            assert torch.equal(resize_traced.gm(x), model(x))


def test_shares_parameters_and_leaves_model_untouched():
    torch.manual_seed(0)
    model = Resize().train()
    before = _state_hash(model)
    attrs = set(vars(model))
    traced = trace(model, torch.randn(2, 3, 16, 16))
    assert model.training and all(m.training for m in model.modules())
    assert _state_hash(model) == before and set(vars(model)) == attrs
    params = dict(model.named_parameters())
    for name, p in traced.gm.named_parameters():
        assert p is params[name]


def test_state_a_forward_stores_is_undone():
    model = Cached()
    traced = trace(model, torch.randn(2, 3, 8, 8))
    assert model.cache == {}  # the trace stored a proxy there; it must be gone
    x = torch.randn(3, 3, 8, 8)
    with evaluating(model), torch.no_grad():
        assert torch.equal(traced.gm(x), model(x))


def test_data_dependent_branch_raises_trace_error_naming_module():
    with pytest.raises(TraceError) as info:
        trace(Gated(), torch.randn(2, 3, 8, 8))
    message = str(info.value)
    assert "'gate'" in message and "Gate" in message
    assert "register_notrace_module" in message and "leaf_modules=[Gate]" in message


def test_leaf_modules_fix_the_untraceable_module():
    model = Gated()
    traced = trace(model, torch.randn(2, 3, 8, 8), leaf_modules=[Gate])
    assert [n.target for n in traced.gm.graph.nodes if n.op == "call_module"] == ["conv", "gate", "head"]
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(traced.gm(x), model.eval()(x))


def test_forward_with_required_extra_argument_is_rejected():
    class TwoInputs(nn.Module):
        def forward(self, x, y):
            return x + y

    with pytest.raises(TraceError, match="needs argument 'y'"):
        trace(TwoInputs(), torch.randn(1, 3))


class PerSampleConstant(nn.Module):
    """Builds a (B, 4) constant from the batch size, the same row for every sample."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(4, dtype=x.dtype).repeat(x.shape[0], 1)
        return self.fc(x.flatten(1)) + positions


def test_constants_repeated_over_the_batch_follow_the_batch_size():
    model = PerSampleConstant()
    traced = trace(model, torch.randn(2, 3, 2, 2))
    assert traced.batch_size is None
    x = torch.randn(5, 3, 2, 2)
    with torch.no_grad():
        assert torch.equal(traced.gm(x), model.eval()(x))


def test_model_that_cannot_take_the_input_is_told_so():
    class NeedsEven(nn.Module):
        def forward(self, x):
            assert x.shape[-1] % 2 == 0, "width must be even"
            return x

    with pytest.raises(TraceError, match=r"does not run on an input of shape \(1, 3, 5, 5\).*input size"):
        trace(NeedsEven(), torch.randn(1, 3, 5, 5))


def test_traced_models_and_pieces_survive_pickling():
    """A traced model and a piece of it cross processes (the Ray backend ships them): fx
    re-traces their code on unpickling, with the tracer they name."""
    from pnc.surgery.examples import tiny_pair
    from pnc.surgery.splitting import extract

    target, _, images, _ = tiny_pair()
    traced = trace(target, images[:2])
    piece = extract(traced, None, [traced.gm.graph.find_nodes(op="call_module")[1].name])
    again, piece_again = pickle.loads(pickle.dumps((traced, piece)))
    with torch.no_grad():
        assert torch.equal(again.gm(images), target(images))
        assert torch.equal(piece_again(images), piece(images))
    assert [n.name for n in again.gm.graph.nodes] == [n.name for n in traced.gm.graph.nodes]
