"""benchmarks/seen_images.py: a zoo model's accuracy on the rows it was trained on, on the
validation rows its recipe left out, and on the test images."""

import shutil

import pytest

from pnc.bench.cli import main
from pnc.bench.seen_images import render, run
from pnc.zoo.datasets import load_dataset
from pnc.zoo.tasks import select_classes, validation_rows


@pytest.fixture(scope="module")
def zoo(tiny_zoo, tmp_path_factory):
    """The tiny zoo plus "v": classes 0-4 trained without a seeded 20% of each class's rows."""
    zoo = tmp_path_factory.mktemp("seen") / "zoo"
    shutil.copytree(tiny_zoo, zoo)
    argv = "zoo train --arch cnn4 --dataset digits --classes 0-4 --name v --epochs 4 --seed 3 --validation 0.2"
    assert main([*argv.split(), "--zoo-dir", str(zoo)]) == 0
    return zoo


def test_each_model_is_measured_on_the_rows_its_recipe_used_and_left_out(zoo):
    result = run(["t", "v"], str(zoo))
    full, left_out = result["rows"]
    train = load_dataset("digits").train
    of_classes = len(select_classes(train, range(5)).y)
    reserved = len(select_classes(train, range(5), among=validation_rows(train, 0.2)[1]).y)
    assert (full["validation_share"], full["validation_acc"], full["validation_images"]) == (0.0, None, 0)
    assert full["train_images"] == of_classes
    assert left_out["validation_share"] == 0.2 and 0 < reserved < of_classes
    assert (left_out["train_images"], left_out["validation_images"]) == (of_classes - reserved, reserved)
    assert left_out["trained_on"] == of_classes - reserved
    for row in (full, left_out):
        assert 0 < row["test_acc"] <= 100 and 0 < row["train_acc"] <= 100
    assert 0 < left_out["validation_acc"] <= 100

    table = render(result, "cmd")
    line_t = next(line for line in table.splitlines() if line.startswith("| t |"))
    line_v = next(line for line in table.splitlines() if line.startswith("| v |"))
    assert "| - | - |" in line_t
    gap = left_out["validation_acc"] - left_out["test_acc"]
    assert f"{left_out['validation_acc']:.2f} ({reserved:,}) | {gap:+.2f}" in line_v
