"""The chosen branch's tuning: channels-last on the CPU, contiguous tensors after it."""

import pytest
import torch
from torch import nn

from pnc.bench.tune_memory_format import nchw, render
from pnc.surgery import clone, tuning
from pnc.surgery.insertion import SearchConfig
from pnc.surgery.tuning import augment, channels_last
from pnc.zoo import CloneTask, ZooStore, load_dataset

QUICK = dict(loc_epochs=1, joint_epochs=1, binary_epochs=1, min_steps_per_epoch=6, tune_epochs=2)


def test_channels_last_converts_the_weights_inside_and_restores_them_after():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.LazyLinear(2)).eval()
    x = torch.randn(2, 3, 6, 6)
    expected = net(x)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with channels_last(net, torch.device("cpu")) as fast:
        assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
        assert not net[0].weight.is_contiguous()
        assert fast(x).is_contiguous(memory_format=torch.channels_last) and torch.equal(fast(x), x)
        flat = torch.randn(2, 5)
        assert fast(flat) is flat  # other ranks pass as they are
        assert torch.allclose(net(fast(x)), expected, atol=1e-5)
    assert all(v.is_contiguous() for v in net.state_dict().values())
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_channels_last_changes_nothing_off_the_cpu():
    net = nn.Conv2d(3, 8, 3)
    with channels_last(net, torch.device("meta")) as fast:
        assert net.weight.is_contiguous()
        x = torch.randn(1, 3, 4, 4)
        assert fast(x) is x


def test_augment_shifts_each_image_within_its_bound_and_flips_some():
    x = torch.arange(64 * 36, dtype=torch.float32).reshape(64, 1, 6, 6)
    assert torch.equal(augment(x, 0, False, torch.Generator().manual_seed(0)), x)
    shifted = augment(x, 1, False, torch.Generator().manual_seed(0))
    assert torch.equal(shifted, augment(x, 1, False, torch.Generator().manual_seed(0)))  # seeded
    # the inner 4x4 of a shift within 1 pixel is a window of the original at offsets -1..1
    offsets = []
    for image, moved in zip(x, shifted, strict=True):
        found = [
            (dy, dx)
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
            if torch.equal(moved[:, 1:5, 1:5], image[:, 1 + dy : 5 + dy, 1 + dx : 5 + dx])
        ]
        assert len(found) == 1
        offsets.append(found[0])
    assert len(set(offsets)) > 3  # per image, not one offset per batch
    flipped = augment(x, 0, True, torch.Generator().manual_seed(0))
    mirrored = [torch.equal(f, i.flip(2)) for f, i in zip(flipped, x, strict=True)]
    kept = [torch.equal(f, i) for f, i in zip(flipped, x, strict=True)]
    assert all(m != k for m, k in zip(mirrored, kept, strict=True)) and 10 < sum(mirrored) < 54


@pytest.fixture(scope="module")
def pair(tiny_zoo):
    store = ZooStore(tiny_zoo)
    (target, t_card), (source, s_card) = store.load("t"), store.load("s")
    task = CloneTask(load_dataset("digits"), t_card.classes, s_card.classes, clone_classes=[7, 8], seed=0)
    return target, source, task


def test_a_tuned_branch_is_contiguous_and_tunes_as_in_nchw(pair, monkeypatch):
    target, source, task = pair
    config = SearchConfig(**QUICK)
    fast = clone(target, source, **task.clone_inputs(), config=config, progress=False)
    monkeypatch.setattr(tuning, "channels_last", nchw)
    plain = clone(target, source, **task.clone_inputs(), config=config, progress=False)
    (branch,), (reference,) = fast.branch_list(), plain.branch_list()
    assert branch.report.tuning["epochs"] == 2
    state, expected = branch.state_dict(), reference.state_dict()
    assert all(v.is_contiguous() for v in state.values())  # saving needs it
    assert any(v.dim() == 4 for v in state.values())  # the branch has convolutions: the format mattered
    for key, value in state.items():  # the same tuning, up to the kernels' rounding
        assert torch.allclose(value.float(), expected[key].float(), rtol=1e-3, atol=1e-4), key


def test_an_augmented_tuning_is_seeded_and_differs_from_the_plain_one(pair):
    target, source, task = pair
    config = SearchConfig(**QUICK, tune_shift=1)
    runs = [clone(target, source, **task.clone_inputs(), config=config, progress=False) for _ in range(2)]
    plain = clone(target, source, **task.clone_inputs(), config=SearchConfig(**QUICK), progress=False)
    (first,), (second,), (reference,) = (r.branch_list() for r in (*runs, plain))
    state = first.state_dict()
    assert all(torch.equal(v, second.state_dict()[k]) for k, v in state.items())
    assert first.report.tuning["kept"] and reference.report.tuning["kept"]
    assert any(not torch.equal(v, reference.state_dict()[k]) for k, v in state.items())


def test_tune_memory_format_table_lists_both_formats():
    row = {"target_cut": "stem_2", "tune_seconds": 60.0, "tune_seconds_per_pass": 20.0, "clone_seconds": 90.0}
    row |= {"probe_ms": 5.0, "ori": 94.5, "tar": 100.0, "avg": 95.42}
    result = {"target": "t", "source": "s", "scale": "S", "seed": 0, "tune_epochs": 3, "max_tensor_difference": 1e-6}
    result["max_difference_tensor"] = "head.new.weight"
    result |= {"machine": {"cpu": "cpu", "torch_threads": 1}, "command": "cmd"}
    result["rows"] = [{"format": "channels_last", **row}, {"format": "nchw", **row, "tune_seconds": 90.0}]
    text = render(result)
    assert "| channels_last | stem_2 | 60.0 | 20.0 | 90.0 | 5.00 | 94.50 | 100.00 | 95.42 |" in text
    assert "| nchw | stem_2 | 90.0 |" in text and "1.00e-06" in text
