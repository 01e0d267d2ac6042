"""Cut points and block-level cut points of timm backbones and of a user's own module; the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from pnc.bench.cli import main
from pnc.surgery.cuts import classifier_of, cut_points
from pnc.surgery.errors import CutError, ModelNotFoundError
from pnc.surgery.tracing import default_input, trace
from pnc.zoo.resolve import resolve_model

# (timm name, C,H,W, expected number of block-level cuts or None, layout of the block cuts)
TIMM_MODELS = [
    ("resnet18", (3, 32, 32), 5, "NCHW"),
    ("resnet50", (3, 32, 32), 5, "NCHW"),
    ("mobilenetv2_100", (3, 32, 32), 8, "NCHW"),
    ("mobilenetv3_small_100", (3, 32, 32), 7, "NCHW"),
    ("efficientnet_b0", (3, 32, 32), 8, "NCHW"),
    ("regnetx_002", (3, 32, 32), 5, "NCHW"),
    ("densenet121", (3, 32, 32), None, "NCHW"),
    ("convnext_atto", (3, 32, 32), 5, "NCHW"),
    ("ghostnet_100", (3, 32, 32), None, "NCHW"),
    ("vit_tiny_patch16_224", (3, 32, 32), 13, "NLC"),
    ("deit_tiny_patch16_224", (3, 32, 32), 13, "NLC"),
    ("swin_tiny_patch4_window7_224", (3, 32, 32), 5, "NHWC"),
    ("mobilevit_xxs", (3, 64, 64), 6, "NCHW"),
    ("efficientvit_b0", (3, 64, 64), 5, "NCHW"),
    ("levit_128s", (3, 64, 64), None, "NLC"),
    ("maxvit_rmlp_pico_rw_256", (3, 32, 32), 5, None),
    ("coatnet_nano_rw_224", (3, 32, 32), 5, None),
]


class ResidualConcat(nn.Module):
    """A user's own model: a residual add and a channel concat, then a classifier."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.res = nn.Conv2d(8, 8, 3, padding=1)
        self.left = nn.Conv2d(8, 4, 1)
        self.right = nn.Conv2d(8, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.res(x))
        x = torch.cat([self.left(x), self.right(x)], dim=1)
        return self.fc(self.pool(x).flatten(1))


@pytest.fixture(scope="module", params=TIMM_MODELS, ids=[m[0] for m in TIMM_MODELS])
def timm_case(request):
    torch.manual_seed(0)
    name, size, n_blocks, layout = request.param
    model, _ = resolve_model(name, size)
    return trace(model, default_input(model, size)), n_blocks, layout


def test_every_cut_of_timm_backbones_splits_exactly(timm_case):
    traced, _, _ = timm_case
    cuts = cut_points(traced)
    assert len(cuts) >= 4
    failed = [(c.node, c.reason) for c in cuts if not c.verified]
    assert not failed
    depths = [c.depth for c in cuts]
    assert depths == sorted(depths) and 0 <= depths[0] and depths[-1] <= 1
    assert all(c.shape == traced.shapes[c.node][1:] for c in cuts)


def test_block_cuts_of_timm_backbones(timm_case):
    traced, n_blocks, layout = timm_case
    all_nodes = [c.node for c in cut_points(traced, verify=False)]
    blocks = cut_points(traced, blocks=True)
    if n_blocks is not None:
        assert len(blocks) == n_blocks
    assert len(blocks) >= 3 and all(c.verified for c in blocks)
    assert [c.block for c in blocks] == list(range(len(blocks)))
    positions = [all_nodes.index(c.node) for c in blocks]
    assert positions == sorted(positions)
    if layout is not None:
        assert blocks[-1].layout == layout
    if layout == "NLC" and hasattr(traced.model, "cls_token"):
        assert all(c.prefix_tokens == traced.model.num_prefix_tokens for c in blocks[1:])


def test_resnet_blocks_are_stem_and_four_stages():
    model, _ = resolve_model("resnet18", (3, 32, 32))
    blocks = cut_points(model, (3, 32, 32), blocks=True)
    assert [c.module for c in blocks] == ["maxpool", "layer1.1.act2", "layer2.1.act2", "layer3.1.act2", "layer4.1.act2"]
    assert [c.shape for c in blocks] == [(64, 8, 8), (64, 8, 8), (128, 4, 4), (256, 2, 2), (512, 1, 1)]
    assert [c.stage for c in blocks] == [1, 1, 2, 3, 4]
    cls = classifier_of(trace(model, default_input(model, (3, 32, 32))))
    assert (cls.module, cls.num_classes, cls.in_features) == ("fc", 1000, 512)


def test_user_module_with_residual_and_concat():
    torch.manual_seed(0)
    model = ResidualConcat()
    traced = trace(model, torch.randn(2, 3, 8, 8))
    cuts = cut_points(traced)
    # the residual branch (res) and the two concat branches (left, right) are not cuts
    assert [c.node for c in cuts] == ["stem_0", "stem_1", "stem_2", "add", "relu", "cat", "pool", "flatten"]
    assert all(c.verified for c in cuts)
    assert [c.layout for c in cuts] == ["NCHW"] * 7 + ["NC"]
    cls = classifier_of(traced)
    assert (cls.module, cls.input_node, cls.num_classes, cls.in_features) == ("fc", "flatten", 3, 8)
    # blocks = top-level children with parameters: res/left/right hold no cut point, fc is the head
    assert [c.node for c in cut_points(traced, blocks=True)] == ["stem_2"]


def test_declared_pnc_blocks_override_the_rule():
    model = ResidualConcat()
    model.pnc_blocks = ["stem", "res"]
    blocks = cut_points(model, example_input=torch.randn(2, 3, 8, 8), blocks=True)
    assert [(c.block, c.node) for c in blocks] == [(0, "stem_2")]  # res is a branch: no cut inside it


def test_classifier_missing_raises_cut_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(CutError, match="no classifier"):
        classifier_of(trace(model, torch.randn(1, 3, 8, 8)))


def test_cli_json(capsys):
    code = main(["cuts", "resnet18", "--input-size", "3,32,32", "--json", "--blocks"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["verified"] is True
    assert doc["model"] == "resnet18" and doc["input_size"] == [3, 32, 32]
    assert [c["block"] for c in doc["cuts"]] == [0, 1, 2, 3, 4]
    first = doc["cuts"][0]
    assert {"node", "module", "shape", "layout", "depth", "block"} <= first.keys()
    assert first["shape"] == [64, 8, 8] and first["layout"] == "NCHW"


def test_cli_user_factory(capsys):
    code = main(["cuts", f"{__name__}:ResidualConcat", "--input-size", "3,8,8", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["verified"] and len(doc["cuts"]) == 8


def test_cli_zoo_lenet5_has_the_papers_three_blocks(capsys):
    code = main(["cuts", "lenet5", "--input-size", "1,28,28", "--blocks", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["verified"]
    assert [c["module"].split(".")[0] for c in doc["cuts"]] == ["block1", "block2", "block3"]


def test_cli_unknown_model_is_a_clean_error(capsys):
    code = main(["cuts", "resnet19x", "--json"])
    err = capsys.readouterr().err
    assert code == 2
    assert "unknown" in err and "resnet18" in err and "Traceback" not in err


def test_resolve_model_unknown_name_lists_close_matches():
    with pytest.raises(ModelNotFoundError, match="efficientnet_b0"):
        resolve_model("efficentnet_b0")
