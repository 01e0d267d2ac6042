"""Training, resume-after-interrupt determinism, zoo training and defaults (pnc.zoo)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pnc.surgery.errors import ModelNotFoundError, StoreError
from pnc.surgery.io import state_dict_sha256
from pnc.zoo import archs
from pnc.zoo.datasets import load_dataset
from pnc.zoo.defaults import DEFAULTS, default_pair, ensure_default
from pnc.zoo.store import ZooStore
from pnc.zoo.tasks import select_classes
from pnc.zoo.train import evaluate, fit, predict_logits, train_zoo_model


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return archs.create("cnn4", in_chans=1, num_classes=5, width=8)


def test_fit_learns_digits_well_above_chance(digits):
    train, test = select_classes(digits.train, range(5)), select_classes(digits.test, range(5))
    model = _model()
    assert evaluate(model, test) < 0.5
    fit(model, train, epochs=4, lr=0.05, seed=0, batch_size=64, progress=False)
    assert not model.training
    assert evaluate(model, test) > 0.9  # chance is 0.2
    logits = predict_logits(model, test, batch_size=100)
    assert logits.shape == (len(test), 5)


def test_fit_is_seeded(digits):
    train = select_classes(digits.train, range(5))
    a = fit(_model(), train, epochs=1, lr=0.05, seed=3, batch_size=64, augment=True, progress=False)
    b = fit(_model(), train, epochs=1, lr=0.05, seed=3, batch_size=64, augment=True, progress=False)
    c = fit(_model(), train, epochs=1, lr=0.05, seed=4, batch_size=64, augment=True, progress=False)
    assert state_dict_sha256(a) == state_dict_sha256(b) != state_dict_sha256(c)


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_resume_after_interrupt_gives_the_same_weights(digits, tmp_path, optimizer):
    train = select_classes(digits.train, range(5))
    settings = dict(
        epochs=3,
        lr=0.02 if optimizer == "sgd" else 0.003,
        seed=7,
        batch_size=64,
        augment=True,
        progress=False,
        optimizer=optimizer,
    )
    straight = fit(_model(), train, **settings)

    def stop_after_first(epoch: int, loss: float) -> None:
        if epoch == 1:
            raise Interrupt

    ckpt = tmp_path / "ckpt"
    with pytest.raises(Interrupt):
        fit(_model(), train, checkpoint=ckpt, on_epoch_end=stop_after_first, **settings)
    epochs_done = []
    resumed = fit(
        _model(seed=99),
        train,
        checkpoint=ckpt,  # other init: the checkpoint must win
        on_epoch_end=lambda e, _: epochs_done.append(e),
        **settings,
    )
    assert epochs_done == [2, 3]
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert sorted(p.name for p in ckpt.iterdir()) == ["epoch-0003.safetensors", "state.json"]


def test_checkpoint_of_other_settings_is_not_resumed(digits, tmp_path):
    train = select_classes(digits.train, range(5))
    ckpt = tmp_path / "ckpt"
    fit(_model(), train, epochs=1, lr=0.05, seed=0, batch_size=64, checkpoint=ckpt, progress=False)
    epochs_done = []
    fit(
        _model(),
        train,
        epochs=1,
        lr=0.01,
        seed=0,
        batch_size=64,
        checkpoint=ckpt,
        progress=False,
        on_epoch_end=lambda e, _: epochs_done.append(e),
    )
    assert epochs_done == [1]  # trained again instead of loading the lr=0.05 run


def test_fit_custom_loss_and_params(digits):
    train = select_classes(digits.train, range(5))
    model = _model()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
    calls = []

    def loss_fn(m, x, y):
        calls.append(len(x))
        return torch.nn.functional.cross_entropy(m(x), y)

    fit(
        model,
        train,
        epochs=1,
        lr=0.05,
        seed=0,
        batch_size=64,
        loss_fn=loss_fn,
        params=model.head.parameters(),
        progress=False,
    )
    assert sum(calls) == len(train) // 64 * 64
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items() if "running" not in k and "num_batches" not in k)


def test_train_zoo_model_and_ensure_default(digits, tmp_path):
    store = ZooStore(tmp_path)
    card = train_zoo_model(
        store,
        "d-src",
        "cnn4",
        digits,
        "5-9",
        epochs=3,
        lr=0.05,
        seed=1,
        arch_kwargs={"width": 8},
        batch_size=32,
        progress=False,
    )
    assert card.classes == [5, 6, 7, 8, 9] and card.kwargs["num_classes"] == 5
    assert card.test_accuracy > 0.85 and card.recipe["optimizer"] == "sgd"
    assert not (tmp_path / "d-src" / ".ckpt").exists()
    model, loaded = store.load("d-src")
    assert loaded == card
    assert evaluate(model, select_classes(digits.test, card.classes)) == pytest.approx(card.test_accuracy)

    target = ensure_default(store, "digits-cnn4-target", dataset=digits, progress=False)
    spec = DEFAULTS["digits-cnn4-target"]
    assert target.recipe["seed"] == spec.seed != DEFAULTS["digits-cnn4-source"].seed
    assert target.test_accuracy > 0.95
    sha = target.sha256
    mtime = (tmp_path / "digits-cnn4-target" / "model.safetensors").stat().st_mtime_ns
    assert ensure_default(store, "digits-cnn4-target", dataset=digits).sha256 == sha
    assert (tmp_path / "digits-cnn4-target" / "model.safetensors").stat().st_mtime_ns == mtime
    held_out = replace(spec, validation=0.2)  # a recipe with a validation share is another recipe
    assert not held_out.matches(target, target.classes)
    card = held_out.train(store, digits, target.classes, progress=False)
    assert held_out.matches(card, card.classes) and card.recipe["validation"] == 0.2
    assert card.recipe["train_images"] < target.recipe["train_images"]


def test_default_pair_names():
    assert default_pair("fashion-mnist", "lenet5") == ("fmnist-lenet5-target", "fmnist-lenet5-source")
    assert default_pair("fmnist", "resnetc20") == ("fmnist-resnetc20-target", "fmnist-resnetc20-source")
    assert default_pair("digits", "cnn4") == ("digits-cnn4-target", "digits-cnn4-source")
    with pytest.raises(ModelNotFoundError, match="digits/cnn4"):
        default_pair("cifar10", "lenet5")


def test_zoo_table_from_store_reads_cards_and_refuses_other_recipes(digits, tmp_path):
    from pnc.bench.zoo_defaults import from_store, markdown

    store = ZooStore(tmp_path)
    card = ensure_default(store, "digits-cnn4-target", dataset=digits, progress=False)
    result = from_store(str(tmp_path), ["digits-cnn4-target", "digits-cnn4-source"])
    row, missing = result["models"]
    assert (row["name"], row["validation"], row["train_images"]) == (card.name, 0.0, card.recipe["train_images"])
    assert row["sha256"] == card.sha256 and row["total_seconds"] is None and row["load_avg_before"] is None
    assert missing == {"name": "digits-cnn4-source", "skipped": f"not in {tmp_path}"}
    table = markdown(result)
    assert f"| 0 | {card.recipe['train_images']:,} | {100 * card.test_accuracy:.2f}% |" in table
    assert f"| {card.recipe['train_seconds']:.1f} | - | - |" in table
    spec = DEFAULTS["digits-cnn4-target"]
    for other, classes in ((replace(spec, validation=0.2), card.classes), (spec, [5, 6, 7, 8, 9])):
        other.train(store, digits, classes, progress=False)  # same name: another recipe, other classes
        with pytest.raises(StoreError, match="another recipe.*pretrain-defaults --only digits-cnn4-target"):
            from_store(str(tmp_path), ["digits-cnn4-target"])
