"""Metrics on hand-made predictions with known answers (pnc.bench.metrics)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pnc.bench.metrics import (
    clone_accuracy,
    confusion_matrix,
    evaluate_clone,
    inference_macs,
    local_model_set,
    locality_similarity,
    logits_of,
    per_class_accuracy,
)
from pnc.surgery.errors import DataError, TaskError
from pnc.surgery.local_models import occlusion_masks, perturbed_logits
from pnc.zoo.datasets import ImageData


def _one_hot_logits(pred: list[int], k: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(pred), k).float()


def test_clone_accuracy_splits_by_num_old_and_pools_avg():
    # 3 old images (labels 0, 1, 1), 1 new (label 2); predictions 0, 1, 2, 2
    logits = _one_hot_logits([0, 1, 2, 2], 3)
    acc = clone_accuracy(logits, torch.tensor([0, 1, 1, 2]), num_old=2)
    assert acc["ori"] == pytest.approx(2 / 3)
    assert acc["tar"] == pytest.approx(1.0)
    assert acc["avg"] == pytest.approx(3 / 4)  # pooled, not the mean of ori and tar (5/6)


def test_clone_accuracy_argmax_is_over_all_outputs():
    # the old class's logit is the largest among old outputs but a new output is larger
    logits = torch.tensor([[2.0, 1.0, 3.0]])
    assert clone_accuracy(logits, torch.tensor([0]), num_old=2)["ori"] == 0.0


def test_clone_accuracy_empty_part_is_nan_and_bad_shapes_raise():
    acc = clone_accuracy(_one_hot_logits([0, 1], 3), torch.tensor([0, 1]), num_old=2)
    assert acc["ori"] == 1.0 and math.isnan(acc["tar"])
    with pytest.raises(DataError, match="logits"):
        clone_accuracy(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long), num_old=1)


class _Lookup(nn.Module):
    """'Image' x (N, 1, 1, 1) holds the index of a fixed prediction."""

    def __init__(self, preds: list[int], k: int):
        super().__init__()
        self.register_buffer("table", _one_hot_logits(preds, k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x.flatten().long()]


def test_evaluate_clone_matches_clone_accuracy_and_restores_training_flag():
    preds = [0, 1, 0, 2, 2, 1]
    model = _Lookup(preds, 3).train()
    ori = ImageData(torch.arange(3.0).view(3, 1, 1, 1), torch.tensor([0, 1, 1]))
    tar = ImageData(torch.arange(3.0, 6.0).view(3, 1, 1, 1), torch.tensor([2, 2, 2]))
    acc = evaluate_clone(model, {"ori": ori, "tar": tar, "avg": ori})
    assert acc == pytest.approx({"ori": 2 / 3, "tar": 2 / 3, "avg": 4 / 6})
    assert model.training
    # a plain function works too, and the sets are checked
    assert evaluate_clone(lambda x: model.table[x.flatten().long()], {"ori": ori, "tar": tar}) == acc
    with pytest.raises(TaskError, match="'ori' and 'tar'"):
        evaluate_clone(model, {"avg": ori})


def test_confusion_matrix_and_per_class_accuracy():
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    logits = _one_hot_logits([0, 1, 1, 1, 0, 1], 4)
    cm = confusion_matrix(logits, labels)
    expected = torch.zeros(4, 4, dtype=torch.long)
    expected[0, 0], expected[0, 1], expected[1, 1], expected[1, 0], expected[2, 1] = 1, 1, 2, 1, 1
    assert torch.equal(cm, expected)
    acc = per_class_accuracy(logits, labels)
    assert acc[:3].tolist() == pytest.approx([0.5, 2 / 3, 0.0])
    assert math.isnan(float(acc[3]))  # no image of class 3


def _convnet(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3)
    ).eval()


class _Affine(nn.Module):
    def __init__(self, inner: nn.Module, scale: float, shift: float):
        super().__init__()
        self.inner, self.scale, self.shift = inner, scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * self.scale + self.shift


@pytest.fixture(scope="module")
def images():
    return torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def test_similarity_with_itself_and_a_scaled_copy_is_one(images):
    a = _convnet(0)
    assert locality_similarity(a, None, a, None, images, num_masks=40, grid=4, seed=1) == pytest.approx(1.0, abs=1e-6)
    scaled = _Affine(a, 3.0, 0.0)
    assert locality_similarity(a, [0, 2], scaled, [0, 2], images, num_masks=40, grid=4) == pytest.approx(1.0, abs=1e-6)


def test_similarity_drops_for_a_shift_a_permutation_and_another_network(images):
    a = _convnet(0)
    shifted = locality_similarity(a, None, _Affine(a, 1.0, 5.0), None, images, num_masks=40, grid=4)
    swapped = locality_similarity(a, [0, 1], a, [1, 0], images, num_masks=40, grid=4)
    other = locality_similarity(a, None, _convnet(1), None, images, num_masks=40, grid=4)
    assert shifted < 0.99 and swapped < 0.99 and other < 0.99
    assert -1.0 <= other <= 1.0


def test_similarity_on_other_images_and_input_checks(images):
    a = _convnet(0)
    flipped = images.flip(-1)
    cross = locality_similarity(a, None, a, None, images, num_masks=40, grid=4, images_b=flipped)
    assert cross < 0.999  # same network, different images: different local models
    with pytest.raises(TaskError, match="equal length"):
        locality_similarity(a, [0], a, [0, 1], images, num_masks=40, grid=4)
    with pytest.raises(DataError, match="same non-zero number"):
        locality_similarity(a, None, a, None, images, num_masks=40, grid=4, images_b=images[:2])


def test_local_models_are_plain_least_squares(images):
    """No locality weight, ~no ridge: each image's coefficients equal an ordinary lstsq fit."""
    a = _convnet(0)
    masks = occlusion_masks(40, 4, seed=2)
    g = local_model_set(a, [1], images[:2], masks)
    z = torch.cat([masks, torch.ones(len(masks), 1)], 1).double()
    y = perturbed_logits(a, images[:2], masks, [1]).double()
    for i in range(2):
        expected = torch.linalg.lstsq(z, y[i]).solution
        assert torch.allclose(g.coef[i].double(), expected, atol=1e-4)


def test_inference_macs_counts_linear_and_conv():
    assert inference_macs(nn.Linear(10, 5), torch.zeros(7, 10)) == 50  # one image, bias not counted
    conv = nn.Conv2d(2, 3, 3, padding=1)  # 3 * 2 * 9 per output pixel, 8 x 8 pixels
    assert inference_macs(conv, torch.zeros(1, 2, 8, 8)) == 3 * 2 * 9 * 64
    both = lambda x: torch.cat([nn.Linear(10, 5)(x), nn.Linear(10, 2)(x)], 1)  # noqa: E731
    assert inference_macs(both, torch.zeros(1, 10)) == 70


def test_logits_of_batches_and_keeps_eval_mode_only_inside():
    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.9)).train()
    x = torch.randn(1100, 4)
    out = logits_of(model, x, batch_size=500)
    assert torch.allclose(out, model[0](x), atol=1e-6)  # dropout off: eval inside
    assert model.training
