"""Partial network cloning end to end on tiny digits models: accuracy, invariants, patches."""

from __future__ import annotations

import copy
import json
from dataclasses import asdict

import pytest
import torch
from torch import nn

from pnc.bench.cli import main
from pnc.surgery.channel_groups import MaskedBody
from pnc.surgery.cloning import clone
from pnc.surgery.errors import BranchError, CutError, PatchError, TaskError
from pnc.surgery.insertion import SearchConfig
from pnc.surgery.io import state_dict_sha256
from pnc.surgery.patch import load_patch, read_patch, save_patch
from pnc.zoo.archs import create
from pnc.zoo.datasets import load_dataset
from pnc.zoo.store import ModelCard, ZooStore
from pnc.zoo.tasks import CloneTask
from pnc.zoo.train import evaluate, fit

QUICK = dict(loc_epochs=1, joint_epochs=1, binary_epochs=2, min_steps_per_epoch=10)


def _trained(arch: str, task_data, num_classes: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = (
        create(arch, in_chans=1, num_classes=num_classes, img_size=8)
        if arch == "lenet5"
        else create(arch, in_chans=1, num_classes=num_classes)
    )
    return fit(model, task_data, epochs=10, lr=0.05, seed=seed, progress=False)


@pytest.fixture(scope="module")
def digits():
    ds = load_dataset("digits")
    task = CloneTask(
        ds, target_classes=list(range(5)), source_classes=list(range(5, 10)), clone_classes="S", fraction=0.3, seed=0
    )
    target = _trained("cnn4", task.target_train(), 5, seed=1)
    source = _trained("cnn4", task.source_train(), 5, seed=2)
    return ds, task, target, source


@pytest.fixture(scope="module")
def cloned(digits):
    ds, task, target, source = digits
    hashes = state_dict_sha256(target), state_dict_sha256(source)
    flags = [p.requires_grad for p in target.parameters()] + [p.requires_grad for p in source.parameters()]
    target.train()  # handed over in train mode: cloning must still not move a BatchNorm statistic
    source.train()
    net = clone(
        target, source, **task.clone_inputs(), config=SearchConfig(seed=0, **QUICK), source_name="src", progress=False
    )
    return net, hashes, flags


def _accuracy(model, data) -> float:
    with torch.no_grad():
        return float((model(data.x).argmax(1) == data.y).float().mean())


def test_clone_learns_new_class_and_keeps_old(digits, cloned):
    _, task, target, _ = digits
    net, _, _ = cloned
    ev = task.eval_sets()
    tar, ori = _accuracy(net, ev["tar"]), _accuracy(net, ev["ori"])
    assert tar > 0.8, f"Tar {tar:.3f} is not well above chance (1/6)"
    assert ori > evaluate(target, task.target_test()) - 0.05
    assert net(ev["ori"].x[:3]).shape == (3, len(task.target_classes) + len(task.clone_classes))
    report = net.branches["src"].report
    assert report.params_after < report.params_before
    # the default rule with old-class images: the earliest cut, the only candidate trained (the loss
    # rule's choices: tests/test_cut_search.py)
    assert report.settings["search"]["choose"] == "earliest"
    assert [c["target_cut"] for c in report.candidates] == [report.target_cut]
    assert report.chosen_because.startswith("the earliest cut an adapter maps")
    assert all(
        c["holdout"]["images"] == sum(report.images[k] for k in ("old_holdout", "clone_holdout"))
        for c in report.candidates
    )


def test_invariants_unchanged_and_detach_exact(digits, cloned):
    _, task, target, source = digits
    net, hashes, flags = cloned
    assert (state_dict_sha256(target), state_dict_sha256(source)) == hashes
    x = task.eval_sets()["avg"].x[:64]
    net.train()  # must not move any BatchNorm statistic of the target
    net(x)
    net.eval()
    assert state_dict_sha256(target) == hashes[0]
    assert [p.requires_grad for p in target.parameters()] + [p.requires_grad for p in source.parameters()] == flags
    detached = copy.deepcopy(net)
    detached.detach_all()
    with torch.no_grad():
        assert torch.equal(detached(x), target(x))


def test_structural_pruning_equals_zero_masking():
    torch.manual_seed(0)
    body = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    for m in body.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics, so a bias survives masking
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.bias.data.uniform_(-1, 1)
    body.eval()
    x = torch.randn(4, 3, 6, 6)
    masked = MaskedBody(body, x, "NCHW", frozen=[body[8]])
    assert [g.size for g in masked.groups] == [8]  # conv, bn, depthwise conv, bn: one group
    keep = masked.binarize(0.5)
    small, _ = masked.prune()
    assert small[0].out_channels == 4 and small[3].out_channels == 4
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(masked(x), body(x))  # masking did something
    assert len(keep) == 1  # named by its root layer


def _store_pair(root, ds, task, target, source) -> ZooStore:
    """A zoo holding the digits pair as "t" (target) and "src" (source)."""
    store = ZooStore(root)
    for name, model, classes in (("t", target, task.target_classes), ("src", source, task.source_classes)):
        card = ModelCard(
            name=name,
            arch="cnn4",
            kwargs={"in_chans": 1, "num_classes": 5},
            dataset="digits",
            classes=classes,
            class_names=[ds.classes[c] for c in classes],
            mean=ds.mean,
            std=ds.std,
            input_size=ds.input_size,
            test_accuracy=0.0,
        )
        store.save(name, model, card)
    return store


def test_patch_round_trip_and_refusals(digits, cloned, tmp_path):
    ds, task, target, source = digits
    net, _, _ = cloned
    store = _store_pair(tmp_path / "zoo", ds, task, target, source)
    path = tmp_path / "clone.pnc"
    size = save_patch(net, path, target_name="t", input_size=ds.input_size, tasks={"src": task.to_dict()})
    assert size == path.stat().st_size < 0.5 * (store.path("src") / "model.safetensors").stat().st_size
    rebuilt, meta = store.load_patch(path)
    assert meta["branches"][0]["target_cut"] == net.branches["src"].target_cut
    # the search's report travels along (as JSON: tuples come back as lists)
    assert asdict(rebuilt.branches["src"].report) == json.loads(json.dumps(asdict(net.branches["src"].report)))
    x = task.eval_sets()["avg"].x
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), net(x), rtol=1e-5, atol=1e-5)
    # the core needs no zoo: the target and a mapping of sources by name
    direct, _ = load_patch(path, target, {"src": source})
    with torch.no_grad():
        assert torch.equal(direct(x), rebuilt(x))
    with pytest.raises(PatchError, match="no source network given for 'src'"):
        load_patch(path, target, {})
    with pytest.raises(PatchError, match="other weights of target"):
        load_patch(path, source, {"src": source})

    # the same patch against other weights of the source is refused
    other = copy.deepcopy(source)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    store.save("src", other, store.card("src"))
    with pytest.raises(PatchError, match="other weights"):
        store.load_patch(path)

    path.write_bytes(b"not a patch")
    with pytest.raises(PatchError, match="not a pnc patch"):
        read_patch(path)


def test_heterogeneous_pair_plain_cnn_target_resnet_source(digits):
    ds, task, target, _ = digits
    source = _trained("resnetc20", task.source_train(), 5, seed=3)
    net = clone(target, source, **task.clone_inputs(), config=SearchConfig(seed=0, **QUICK), progress=False)
    branch = next(iter(net.branches.values()))
    assert branch.adapter.spec.src_shape != branch.adapter.spec.dst_shape or branch.target_cut != branch.source_cut
    assert _accuracy(net, task.eval_sets()["tar"]) > 0.5


def test_bad_class_spec_is_refused(digits, tmp_path, capsys):
    ds, _, _, _ = digits
    with pytest.raises(TaskError):
        CloneTask(ds, target_classes=[0, 1], source_classes=[1, 2], clone_classes=[1])
    with pytest.raises(TaskError):
        CloneTask(ds, target_classes=[0, 1], source_classes=[2, 3], clone_classes=[12])
    code = main(
        [
            "clone",
            "--target",
            "a",
            "--source",
            "b",
            "--classes",
            "S",
            "--classes",
            "M",
            "--out",
            str(tmp_path),
            "--zoo-dir",
            str(tmp_path),
        ]
    )
    assert code == 2
    assert "one --classes per --source" in capsys.readouterr().err


def test_interrupted_search_resumes_to_the_same_result(digits, tmp_path, monkeypatch):
    from pnc.surgery import insertion

    _, task, target, source = digits
    config = SearchConfig(seed=0, **QUICK)
    x = task.eval_sets()["avg"].x[:50]
    reference = clone(target, source, **task.clone_inputs(), config=config, progress=False)

    real_stage, calls = insertion.CandidateTrainer.run_stage, []

    def crash_on_second(self, stage, tick=lambda: None):
        calls.append((self.r.node, stage))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_stage(self, stage, tick)

    monkeypatch.setattr(insertion.CandidateTrainer, "run_stage", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        clone(target, source, **task.clone_inputs(), config=config, checkpoint_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("candidate-*.safetensors"))) == 1
    monkeypatch.setattr(insertion.CandidateTrainer, "run_stage", real_stage)
    resumed = clone(target, source, **task.clone_inputs(), config=config, checkpoint_dir=tmp_path, progress=False)
    with torch.no_grad():
        assert torch.equal(resumed(x), reference(x))
    ref, res = (next(iter(n.branches.values())).report for n in (reference, resumed))
    assert [c["loss"] for c in res.candidates] == [c["loss"] for c in ref.candidates]


def test_multi_branch_clone_and_partial_detach(digits, cloned):
    ds, task, target, source = digits
    net, _, _ = cloned
    single = copy.deepcopy(net)
    second = CloneTask(ds, task.target_classes, task.source_classes, clone_classes=[6], fraction=0.3, seed=0)
    multi = clone(
        target,
        source,
        **second.clone_inputs(),
        config=SearchConfig(seed=0, **QUICK),
        into=copy.deepcopy(net),
        name="six",
        progress=False,
    )
    assert list(multi.branches) == ["src", "six"]
    assert multi.classes == single.classes + [ds.classes[6]]
    x = second.eval_sets()["tar"].x
    with torch.no_grad():
        assert multi(x).shape == (len(x), 7)
        assert float((multi(x).argmax(1) == 6).float().mean()) > 0.5  # the "6" branch answers its class
        with multi.disabled("six"):  # temporarily the single-branch clone
            assert torch.equal(multi(x), single(x))
        with multi.disabled():  # temporarily the target
            assert torch.equal(multi(x), target(x))
        assert multi(x).shape == (len(x), 7)  # both branches are back
        with pytest.raises(BranchError, match="no branch named 'nine'"):
            with multi.disabled("nine"):
                pass
        multi.detach("six")
        assert torch.equal(multi(x), single(x))


def test_arbitrating_insertion_keeps_old_classes_when_old_images_are_given(digits):
    """A source whose logits are 4x the scale of the target's: imitating the direct ensemble
    (no old-class image) loses old-class images to the new classes; arbitrating does not."""
    ds, _, target, source = digits
    hot = copy.deepcopy(source)
    with torch.no_grad():
        hot.head.weight *= 4
        hot.head.bias *= 4
    ori, stolen = {}, {}
    for old_fraction in (0.0, 0.3):
        task = CloneTask(ds, list(range(5)), list(range(5, 10)), "M", seed=0, old_fraction=old_fraction)
        net = clone(target, hot, **task.clone_inputs(), config=SearchConfig(seed=0, **QUICK), progress=False)
        old = task.eval_sets()["ori"]
        with torch.no_grad():
            pred = net(old.x).argmax(1)
        ori[old_fraction] = float((pred == old.y).float().mean())
        stolen[old_fraction] = int((pred >= len(task.target_classes)).sum())  # old images lost to new classes
        images = net.branches["branch0"].report.images
        assert (images["old_train"] > 0) == (old_fraction > 0) and images["clone_holdout"] > 0
    assert stolen[0.3] < stolen[0.0] / 4
    assert ori[0.3] > ori[0.0] + 0.2
    assert ori[0.3] >= evaluate(target, task.target_test()) - 0.03


def test_tuning_moves_the_batchnorm_statistics_of_the_branch_copy_only(digits, cloned):
    """The tuning trains the copy of M_f with its BatchNorm layers on batch statistics
    (``tune_bn_train``, the default): the copy's running statistics move, the source's never
    do; with ``tune_bn_train=False`` they stay frozen."""
    from pnc.surgery.tuning import train_mode

    _, task, _, source = digits
    net, hashes, _ = cloned
    _, taps = net.taps()
    with torch.no_grad():
        cut, pre, _ = taps(task.eval_sets()["avg"].x[:32])
    source_bns = {k: m for k, m in source.named_modules() if isinstance(m, nn.BatchNorm2d)}
    for batch_stats in (True, False):
        branch = copy.deepcopy(net.branches["src"])
        copies = {k: m for k, m in branch.body.body.named_modules() if isinstance(m, nn.BatchNorm2d)}
        assert copies and set(copies) <= set(source_bns)
        before = {k: (m.running_mean.clone(), int(m.num_batches_tracked)) for k, m in copies.items()}
        with torch.no_grad():
            train_mode(branch, batch_stats)(cut, pre)
        assert branch.adapter.training and branch.head.training
        for name, bn in copies.items():
            assert bn.training == batch_stats
            assert int(bn.num_batches_tracked) == before[name][1] + batch_stats
            assert torch.equal(bn.running_mean, before[name][0]) != batch_stats
        branch.eval()
        assert not any(m.training for m in branch.modules())
    assert state_dict_sha256(source) == hashes[1]
    frozen = SearchConfig(tune_bn_train=False)
    assert json.loads(frozen.key()).keys().isdisjoint({"tune_bn_train"})  # rows cached before it stay valid
    assert json.loads(SearchConfig().key())["tune_bn_train"] is True


def test_patch_carries_a_fine_tuned_module(digits, cloned, tmp_path):
    ds, task, target, source = digits
    net, _, _ = cloned
    store = _store_pair(tmp_path / "zoo", ds, task, target, source)
    tuned = copy.deepcopy(net)
    module = tuned.branches["src"].body
    with torch.no_grad():
        for p in module.body.parameters():
            p.mul_(1.1)
    module.tuned = True
    x = task.eval_sets()["avg"].x
    for model, name in ((net, "plain.pnc"), (tuned, "tuned.pnc")):
        save_patch(model, tmp_path / name, target_name="t", input_size=ds.input_size)
        meta, tensors = read_patch(tmp_path / name)
        has_module = any(k.startswith("src/module.") for k in tensors)
        assert has_module == model.branches["src"].body.tuned
        rebuilt, _ = store.load_patch(tmp_path / name)
        with torch.no_grad():
            torch.testing.assert_close(rebuilt(x), model(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(tuned(x), net(x))


def test_search_skips_pairs_no_adapter_maps_and_refuses_when_none_is_left(digits, monkeypatch):
    """A candidate whose layouts no adapter maps is skipped with its reason, never aborting
    the search (LeNet-5 <- ViT had aborted on its flat NC cut); none left is a CutError."""
    from pnc.adapters import AdapterError
    from pnc.surgery import insertion

    ds, task, target, source = digits
    real = insertion.make_adapter
    blocked: set[tuple[int, ...]] = set()

    def picky(src_shape, *args, **kwargs):
        if tuple(src_shape) in blocked:
            raise AdapterError(f"no adapter maps {tuple(src_shape)} (test)")
        return real(src_shape, *args, **kwargs)

    monkeypatch.setattr(insertion, "make_adapter", picky)
    first = SearchConfig(seed=0, choose="loss", **QUICK)  # every candidate trained
    unblocked = next(
        iter(clone(target, source, **task.clone_inputs(), config=first, progress=False).branches.values())
    ).report
    shapes = [tuple(c["adapter_spec"]["src_shape"]) for c in unblocked.candidates]
    blocked.add(shapes[0])  # the first candidate tried (the last block cut)
    net = clone(target, source, **task.clone_inputs(), config=first, progress=False)
    report = next(iter(net.branches.values())).report
    unmapped = [line for line in report.skipped if "no adapter maps" in line]
    assert len(unmapped) == 1 and len(report.skipped) == len(unblocked.skipped) + 1
    assert report.target_cut != unmapped[0].split(" ")[0].removeprefix("R=")
    assert len(report.candidates) == len(shapes) - 1
    blocked.clear()
    blocked.add(shapes[-1])  # the earliest cut: the default rule takes the earliest one an adapter maps
    net = clone(target, source, **task.clone_inputs(), config=SearchConfig(seed=0, **QUICK), progress=False)
    report = next(iter(net.branches.values())).report
    assert [c["target_cut"] for c in report.candidates] == [unblocked.candidates[-2]["target_cut"]]
    assert report.target_cut == unblocked.candidates[-2]["target_cut"]
    blocked.update(shapes)
    for config in (first, SearchConfig(seed=0, **QUICK)):
        with pytest.raises(CutError, match="no candidate pair of cuts can be bridged"):
            clone(target, source, **task.clone_inputs(), config=config, progress=False)


def test_masks_by_default_only_with_old_class_images(digits):
    """SearchConfig.use_masks=None: localized masks with old-class images; in the strict
    setting every channel is kept (masks fitted on clone images alone cost Ori), unless asked."""
    ds, task, target, source = digits
    strict = CloneTask(ds, task.target_classes, task.source_classes, task.clone_classes, 0.3, seed=0, old_fraction=0.0)
    config = SearchConfig(seed=0, candidates=["first"], **QUICK)
    kept = {}
    for name, t in (("paper", task), ("strict", strict)):
        report = next(iter(clone(target, source, **t.clone_inputs(), config=config, progress=False).branches.values()))
        kept[name] = (report.report.settings["search"]["use_masks"], report.report.kept_fraction)
    assert kept["paper"] == (True, pytest.approx(config.mask_ratio, abs=0.1))
    assert kept["strict"] == (False, 1.0)
    forced = SearchConfig(seed=0, candidates=["first"], use_masks=True, **QUICK)
    report = next(iter(clone(target, source, **strict.clone_inputs(), config=forced, progress=False).branches.values()))
    assert report.report.settings["search"]["use_masks"] is True and report.report.kept_fraction < 1.0
