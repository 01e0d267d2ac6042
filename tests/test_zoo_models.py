"""Architectures and the hash-verified checkpoint store (pnc.zoo)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from pnc.surgery.errors import ConfigError, ModelNotFoundError, StoreError
from pnc.surgery.io import file_sha256, state_dict_sha256
from pnc.zoo import archs
from pnc.zoo.store import ModelCard, ZooStore, default_zoo_dir


@pytest.mark.parametrize(
    "name, size, blocks",
    [
        ("lenet5", (1, 28, 28), 3),
        ("lenet5", (3, 32, 32), 3),
        ("lenet5", (1, 8, 8), 3),
        ("cnn4", (1, 8, 8), 4),
        ("resnetc20", (3, 32, 32), 4),
        ("resnetc20", (1, 28, 28), 4),
    ],
)
def test_our_archs_shapes_blocks_and_head(name, size, blocks):
    torch.manual_seed(0)
    model = archs.create(name, num_classes=7, **archs.input_kwargs(name, size)).eval()
    x = torch.randn(2, *size)
    seen = {}
    model.head.register_forward_hook(lambda m, i, o: seen.setdefault("head", o))
    out = model(x)
    assert out.shape == (2, 7) and torch.equal(out, seen["head"])
    assert isinstance(model.head, nn.Linear) and model.num_classes == 7
    assert len(model.pnc_blocks) == blocks
    modules = dict(model.named_modules())
    assert all(b in modules for b in model.pnc_blocks)
    assert model.forward_features(x).shape == (2, model.num_features)


def test_resnetc20_is_resnet20():
    model = archs.create("resnetc20", in_chans=3, num_classes=10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) + 1 == 20  # 19 3x3 convs + the classifier
    assert [len(getattr(model, f"layer{i}")) for i in (1, 2, 3)] == [3, 3, 3]
    assert 0.26e6 < sum(p.numel() for p in model.parameters()) < 0.28e6


def test_timm_fallback_and_unknown_names():
    model = archs.create("resnet10t", in_chans=1, num_classes=4)
    assert model.eval()(torch.randn(1, 1, 32, 32)).shape == (1, 4)
    with pytest.raises(ModelNotFoundError, match="did you mean.*lenet5"):
        archs.create("lenet")
    with pytest.raises(ModelNotFoundError, match="resnetc20"):
        archs.create("resnet_c20")
    with pytest.raises(ConfigError, match="bad arguments for cnn4"):  # a known name, a bad setting
        archs.create("cnn4", depth=3)
    with pytest.raises(ConfigError, match="lenet5 needs img_size >= 4"):
        archs.create("lenet5", img_size=1)


def test_state_dict_sha256_is_a_content_hash():
    torch.manual_seed(0)
    a = archs.create("cnn4", in_chans=1, num_classes=3, width=4)
    b = archs.create("cnn4", in_chans=1, num_classes=3, width=4)
    b.load_state_dict(a.state_dict())
    assert state_dict_sha256(a) == state_dict_sha256(b) == state_dict_sha256(dict(reversed(a.state_dict().items())))
    with torch.no_grad():
        b.block3[0].weight[0, 0, 0, 0] += 1e-7
    assert state_dict_sha256(a) != state_dict_sha256(b)
    assert state_dict_sha256({"w": torch.zeros(2)}) != state_dict_sha256({"w": torch.zeros(2, dtype=torch.float64)})
    assert state_dict_sha256({"w": torch.zeros(2, 3)}) != state_dict_sha256({"w": torch.zeros(3, 2)})
    assert state_dict_sha256({"w": torch.zeros(2)}) != state_dict_sha256({"v": torch.zeros(2)})


def _card(model: nn.Module, **kwargs) -> ModelCard:
    return ModelCard(
        name="x",
        arch="cnn4",
        kwargs={"in_chans": 1, "num_classes": 3, "width": 4},
        dataset="digits",
        classes=[0, 1, 2],
        class_names=["0", "1", "2"],
        mean=(0.3,),
        std=(0.4,),
        input_size=(1, 8, 8),
        test_accuracy=0.5,
        recipe={"epochs": 1},
        **kwargs,
    )


def test_store_round_trip(tmp_path):
    torch.manual_seed(1)
    model = archs.create("cnn4", in_chans=1, num_classes=3, width=4)
    model(torch.randn(8, 1, 8, 8))  # move BN running stats away from their init
    store = ZooStore(tmp_path)
    folder = store.save("tiny", model.eval(), _card(model))
    assert sorted(p.name for p in folder.iterdir()) == ["card.json", "model.safetensors"]
    card = store.card("tiny")
    assert card.sha256 == file_sha256(folder / "model.safetensors") and card.name == "tiny"
    assert card.input_size == (1, 8, 8) and "torch" in card.versions
    loaded, card2 = store.load("tiny")
    assert not loaded.training and card2 == card
    assert state_dict_sha256(loaded) == state_dict_sha256(model)
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(loaded(x), model(x))
    assert store.names() == ["tiny"] and store.exists("tiny") and store.verify("tiny")
    assert not store.exists("other")


def test_store_refuses_tampered_or_missing_weights(tmp_path):
    store = ZooStore(tmp_path)
    model = archs.create("cnn4", in_chans=1, num_classes=3, width=4)
    folder = store.save("tiny", model, _card(model))
    weights = folder / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0x01
    weights.write_bytes(bytes(raw))
    assert not store.verify("tiny")
    with pytest.raises(StoreError, match="sha256.*modified or corrupted.*pnc zoo train"):
        store.load("tiny")
    weights.unlink()
    with pytest.raises(StoreError, match="no model.safetensors"):
        store.load("tiny")
    with pytest.raises(StoreError, match="does not exist.*pretrain-defaults"):
        store.load("nothing")
    (folder / "card.json").write_text("{not json")
    with pytest.raises(StoreError, match="not a pnc model card"):
        store.card("tiny")
    with pytest.raises(StoreError, match="bad model name"):
        store.path("../escape")


def test_store_refuses_weights_of_another_architecture(tmp_path):
    store = ZooStore(tmp_path)
    model = archs.create("cnn4", in_chans=1, num_classes=3, width=4)
    store.save("tiny", model, _card(model))
    card_path = tmp_path / "tiny" / "card.json"
    card = json.loads(card_path.read_text())
    card["kwargs"]["width"] = 8
    card_path.write_text(json.dumps(card))
    with pytest.raises(StoreError, match="does not fit cnn4"):
        store.load("tiny")


def test_default_zoo_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("PNC_ZOO_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_zoo_dir() == tmp_path / "cache" / "pnc" / "zoo"
    monkeypatch.setenv("PNC_ZOO_DIR", str(tmp_path / "env"))
    assert default_zoo_dir() == tmp_path / "env"
    assert default_zoo_dir(tmp_path / "arg") == tmp_path / "arg"
    assert ZooStore().root == Path(tmp_path / "env")
