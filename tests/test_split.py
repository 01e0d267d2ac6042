"""Splitting at cut points: exactness, parameter sharing, batch sizes, errors."""

from __future__ import annotations

import pytest
import torch
from test_cut_points import ResidualConcat
from torch import nn

from pnc.surgery.cuts import cut_points
from pnc.surgery.errors import CutError
from pnc.surgery.splitting import extract, split
from pnc.surgery.tracing import default_input, evaluating, trace
from pnc.zoo.resolve import resolve_model


@pytest.fixture(scope="module")
def user_traced():
    torch.manual_seed(0)
    return trace(ResidualConcat(), torch.randn(2, 3, 8, 8))


@pytest.mark.parametrize(
    "name,size",
    [("resnet18", (3, 32, 32)), ("vit_tiny_patch16_224", (3, 32, 32)), ("swin_tiny_patch4_window7_224", (3, 32, 32))],
)
def test_block_splits_are_exact_at_another_batch_size(name, size):
    torch.manual_seed(0)
    model, _ = resolve_model(name, size)
    traced = trace(model, default_input(model, size))
    x = torch.randn(3, *size)
    with evaluating(model), torch.no_grad():
        reference = model(x)
        for cut in cut_points(traced, blocks=True, verify=False):
            prefix, suffix = split(traced, cut)
            features = prefix(x)
            assert features.shape == (3, *cut.shape)
            assert torch.equal(suffix(features), reference), cut.node


def test_pieces_share_the_models_parameters(user_traced):
    model = user_traced.model
    prefix, suffix = split(user_traced, "relu")
    own = {id(p) for p in model.parameters()}
    pieces = [p for piece in (prefix, suffix) for p in piece.parameters()]
    assert pieces and all(id(p) in own for p in pieces)
    assert sum(p.numel() for p in pieces) == sum(p.numel() for p in model.parameters())
    assert prefix.get_submodule("stem.0") is model.stem[0]


def test_split_accepts_a_module_and_a_cut_point():
    torch.manual_seed(0)
    model = ResidualConcat().eval()
    x = torch.randn(2, 3, 8, 8)
    cut = cut_points(model, example_input=x)[3]
    prefix, suffix = split(model, cut, example_input=x)
    with torch.no_grad():
        assert torch.equal(suffix(prefix(x)), model(x))


def test_extract_between_two_cuts_and_multiple_outputs(user_traced):
    x = torch.randn(4, 3, 8, 8)
    full = extract(user_traced, None, ["stem_2", "relu", "cat"])
    middle = extract(user_traced, "stem_2", ["cat"])
    with evaluating(user_traced.model), torch.no_grad():
        stem, relu, cat = full(x)
        assert torch.equal(middle(stem), cat)
        assert torch.equal(extract(user_traced, "relu", "cat")(relu), cat)
    placeholders = [n.name for n in middle.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["stem_2"]


def test_start_that_is_bypassed_is_rejected(user_traced):
    # `res` runs beside the skip connection: data reaches `add` without passing through it
    with pytest.raises(CutError, match="not a cut for 'add'"):
        extract(user_traced, "res", ["add"])
    with pytest.raises(CutError, match="not a cut"):
        split(user_traced, "left")


def test_unknown_cut_lists_near_names(user_traced):
    with pytest.raises(CutError) as info:
        split(user_traced, "stem_22")
    message = str(info.value)
    assert "'stem_22'" in message and "stem_2" in message and "pnc cuts" in message


def test_input_and_output_are_not_cuts(user_traced):
    with pytest.raises(CutError, match="strictly between"):
        split(user_traced, user_traced.output_node)


class EarlyToken(nn.Module):
    """A class token expanded to the batch *before* the cut, in graph order, and used after it."""

    def __init__(self):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.conv = nn.Conv2d(3, 8, 2, stride=2)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = self.cls.expand(x.shape[0], -1, -1)
        tokens = self.norm(self.conv(x).flatten(2).transpose(1, 2))
        return self.head(torch.cat([cls, tokens], dim=1).mean(1))


def test_suffix_recomputes_the_batch_size_from_its_own_input():
    torch.manual_seed(0)
    model = EarlyToken().eval()
    traced = trace(model, torch.randn(2, 3, 4, 4))
    prefix, suffix = split(traced, "norm")
    x = torch.randn(3, 3, 4, 4)
    with torch.no_grad():
        assert torch.equal(suffix(prefix(x)), model(x))
