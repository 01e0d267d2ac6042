"""The small timm ViT default pair and CNN <-> ViT cloning both ways (tiny models, digits)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pnc.bench.hetero import EXTRA_MODELS, PAIRS
from pnc.surgery.cloning import clone
from pnc.surgery.cuts import cut_points
from pnc.surgery.insertion import SearchConfig
from pnc.surgery.tracing import trace
from pnc.zoo import archs
from pnc.zoo.datasets import load_dataset
from pnc.zoo.defaults import DEFAULTS, VIT_KWARGS, default_pair
from pnc.zoo.store import ModelCard
from pnc.zoo.tasks import CloneTask
from pnc.zoo.train import fit

TINY_VIT = {"patch_size": 2, "embed_dim": 16, "depth": 2, "num_heads": 2}  # 16 patch tokens of an 8x8 digit
TINY_SEARCH = SearchConfig(seed=0, loc_epochs=1, joint_epochs=1, binary_epochs=1, min_steps_per_epoch=5, tune_epochs=1)
BY_LOSS = replace(TINY_SEARCH, choose="loss")  # every candidate trained


def test_vit_default_builds_traces_and_cuts_into_tokens():
    spec = DEFAULTS["fmnist-vit-target"]
    assert default_pair("fashion-mnist", spec.arch) == ("fmnist-vit-target", "fmnist-vit-source")
    torch.manual_seed(0)
    kwargs = {**archs.input_kwargs(spec.arch, (1, 28, 28)), **spec.arch_kwargs}
    model = archs.create(spec.arch, num_classes=5, **kwargs).eval()
    x = torch.randn(2, 1, 28, 28)
    traced = trace(model, x)
    with torch.no_grad():
        assert torch.equal(traced.gm(torch.cat([x, x])), model(torch.cat([x, x])))  # another batch size
        assert model(x).shape == (2, 5)
    blocks = cut_points(traced, blocks=True)
    patches = (28 // VIT_KWARGS["patch_size"]) ** 2
    assert len(blocks) == VIT_KWARGS["depth"] + 1  # before the first transformer block, then after each
    assert {(c.layout, c.shape, c.prefix_tokens) for c in blocks} == {("NLC", (patches + 1, 96), 1)}


def test_recipes_match_only_their_own_cards():
    """The ViT's AdamW recipe and sizes are part of its match; the SGD defaults' stored cards
    (optimizer named or, from before it was recorded, not) still match theirs; a card trained
    on every image (no validation share) is another recipe."""
    spec, lenet = DEFAULTS["fmnist-vit-source"], DEFAULTS["fmnist-lenet5-source"]
    recipe = {"epochs": spec.epochs, "lr": spec.lr, "seed": spec.seed, "batch_size": 128, "validation": 0.1}
    card = ModelCard(
        name=spec.name,
        arch=spec.arch,
        kwargs={"in_chans": 1, "img_size": [28, 28], **spec.arch_kwargs, "num_classes": 5},
        dataset="fashion-mnist",
        classes=[5, 6, 7, 8, 9],
        class_names=[],
        mean=(0.0,),
        std=(1.0,),
        input_size=(1, 28, 28),
        test_accuracy=0.9,
        recipe={**recipe, "optimizer": "adamw", "weight_decay": 0.05},
    )
    ids = [5, 6, 7, 8, 9]
    assert spec.matches(card, ids) and not spec.matches(card, [0, 1, 2, 3, 4])
    assert not spec.matches(replace(card, recipe={**card.recipe, "optimizer": "sgd"}), ids)
    assert not spec.matches(replace(card, kwargs={**card.kwargs, "depth": 6}), ids)
    sgd = {"epochs": lenet.epochs, "lr": lenet.lr, "seed": lenet.seed, "batch_size": 128, "validation": 0.1}
    old = replace(card, arch="lenet5", kwargs={"in_chans": 1, "img_size": 28, "num_classes": 5})
    assert lenet.matches(replace(old, recipe={**sgd, "optimizer": "sgd", "weight_decay": 0.0005}), ids)
    assert lenet.matches(replace(old, recipe=sgd), ids)
    assert not lenet.matches(replace(old, recipe={**sgd, "optimizer": "adamw", "weight_decay": 0.0005}), ids)
    assert not lenet.matches(replace(old, recipe={k: v for k, v in sgd.items() if k != "validation"}), ids)


def test_table2_pairs_name_known_models_and_include_cnn_vit_both_ways():
    known = set(DEFAULTS) | set(EXTRA_MODELS)
    assert all({p.target, p.source} <= known for p in PAIRS.values())
    cnn_vit = {(PAIRS[k].target, PAIRS[k].source) for k in ("vit-lenet5", "lenet5-vit")}
    assert cnn_vit == {("fmnist-lenet5-target", "fmnist-vit-source"), ("fmnist-vit-target", "fmnist-lenet5-source")}


@pytest.fixture(scope="module")
def tiny_models():
    """Digits task (S) and briefly trained 8x8 LeNet-5 and ViT targets (0-4) and sources (5-9)."""
    ds = load_dataset("digits")
    task = CloneTask(ds, list(range(5)), list(range(5, 10)), "S", fraction=0.3, seed=0)

    def train(arch: str, seed: int, data, **kwargs):
        torch.manual_seed(seed)
        model = archs.create(arch, in_chans=1, num_classes=5, **kwargs)
        optimizer = "adamw" if arch.startswith("vit") else "sgd"
        lr = 3e-3 if optimizer == "adamw" else 0.05
        return fit(model, data, epochs=3, lr=lr, seed=seed, optimizer=optimizer, progress=False)

    vit = {"img_size": (8, 8), **TINY_VIT}
    models = {
        "lenet_t": train("lenet5", 1, task.target_train(), img_size=8),
        "lenet_s": train("lenet5", 2, task.source_train(), img_size=8),
        "vit_t": train("vit_tiny_patch16_224", 3, task.target_train(), **vit),
        "vit_s": train("vit_tiny_patch16_224", 4, task.source_train(), **vit),
    }
    return task, models


def _clone(task, target, source, config=BY_LOSS):
    """The clone's report; by default every candidate trained (the loss rule)."""
    net = clone(target, source, **task.clone_inputs(), config=config, num_masks=16, progress=False)
    x = task.eval_sets()["avg"].x
    with torch.no_grad(), net.disabled():
        assert torch.equal(net(x), target(x))
    assert net(x[:3]).shape == (3, len(task.target_classes) + len(task.clone_classes))
    return net.branches[next(iter(net.branches))].report


def test_cnn_target_vit_source_skips_the_flat_cut(tiny_models):
    """LeNet-5's last block cut is flat (NC): no adapter maps it to the ViT's tokens, so that
    candidate is skipped with its reason and the search goes on with the conv cuts."""
    task, m = tiny_models
    report = _clone(task, m["lenet_t"], m["vit_s"])
    assert len(report.skipped) == 1
    assert (
        report.skipped[0].startswith("R=block3_4 <- ")
        and "no adapter maps NC (84,) -> NLC (17, 16)" in (report.skipped[0])
    )
    specs = [c["adapter_spec"] for c in report.candidates]
    assert len(specs) == 2 and all((s["src_layout"], s["dst_layout"]) == ("NCHW", "NLC") for s in specs)
    assert report.target_cut in {"block1_2", "block2_2"}


def test_vit_target_cnn_source_maps_tokens_to_maps(tiny_models):
    """Every ViT cut pairs with a LeNet-5 conv cut (tokens -> map adapters); the ViT's last cut,
    whose R' would be LeNet-5's pre-logits with nothing left to clone, is skipped as such."""
    task, m = tiny_models
    report = _clone(task, m["vit_t"], m["lenet_s"])
    assert report.skipped == [
        "R=add_4 <- R'=block3_4: the source has no layer between R' and its classifier, nothing to clone"
    ]
    pairs = [(c["target_cut"], c["source_cut"]) for c in report.candidates]
    assert pairs == [("add_2", "block2_2"), ("norm_pre", "block1_2")]
    earliest = _clone(task, m["vit_t"], m["lenet_s"], TINY_SEARCH)  # the default rule: only the earliest cut
    assert [(c["target_cut"], c["source_cut"]) for c in earliest.candidates] == [("norm_pre", "block1_2")]
    assert all(
        (c["adapter_spec"]["src_layout"], c["adapter_spec"]["dst_layout"]) == ("NLC", "NCHW") for c in report.candidates
    )


def test_table_search_section_lists_skipped_pairs():
    from pnc.bench.paper import _search_section

    cand = {"target_cut": "block1_2", "loss": 0.1, "accuracy": {"ori": 0.9, "tar": 0.9, "avg": 0.9}}
    entry = {"method": "PNC", "scale": "S", "seed": 0, "target_cut": "block1_2", "source_cut": "norm_pre"}
    entry |= {"kept_fraction": 0.5, "best_cut": "block1_2", "regret": 0.0, "candidates": [cand]}
    reason = "R=block3_4 <- R'=add_8: no adapter maps NC (84,) -> NLC (50, 96); supported layout pairs: ..."
    text = "\n".join(_search_section([{**entry, "skipped": [reason]}]))
    assert "- PNC S seed 0: R=block3_4 <- R'=add_8: no adapter maps NC (84,) -> NLC (50, 96)\n" in text + "\n"
    assert "supported layout pairs" not in text
    assert "skipped" not in "\n".join(_search_section([entry]))  # rows cached before reports had it
