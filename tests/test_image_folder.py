"""Image folders are indexed, not read: a task decodes only the rows it needs, picks the same
rows as the in-memory path, streams evaluation and training, and names a broken file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import pnc.zoo.imagefolder as imagefolder
import pnc.zoo.images as images
from pnc.bench.cli import main
from pnc.bench.metrics import evaluate_clone
from pnc.surgery.errors import DataError
from pnc.zoo.archs import create
from pnc.zoo.datasets import DatasetSplits, ImageFiles, load_dataset
from pnc.zoo.tasks import CloneTask, select_classes, validation_rows
from pnc.zoo.train import evaluate, fit

CLASSES, TRAIN, VAL = 4, 10, 3


def _folder(root: Path, size: int = 12) -> Path:
    """CLASSES classes of TRAIN training and VAL validation images (PNG and JPEG), seeded:
    each class has its own colour, so a small CNN can tell them apart."""
    from PIL import Image

    for split, count in (("train", TRAIN), ("val", VAL)):
        for label in range(CLASSES):
            folder = root / split / f"k{label}"
            folder.mkdir(parents=True)
            rng = np.random.default_rng([label, count])
            for i in range(count):
                pixels = np.clip(rng.normal(60 * label, 25, size=(size, size, 3)), 0, 255).astype(np.uint8)
                ext = "png" if i % 2 else "jpg"
                Image.fromarray(pixels).save(folder / f"{i:02d}.{ext}")
    return root


@pytest.fixture
def folder(tmp_path):
    return _folder(tmp_path / "data")


@pytest.fixture
def decodes(monkeypatch):
    """The paths decoded in this process, in order."""
    seen: list[str] = []
    real = images.decode_image

    def counting(path: str, size: int) -> np.ndarray:
        seen.append(path)
        return real(path, size)

    monkeypatch.setattr(images, "decode_image", counting)
    return seen


def _in_memory(splits: DatasetSplits) -> DatasetSplits:
    """The same dataset with both splits decoded whole (what the loader used to return)."""
    assert isinstance(splits.train, ImageFiles) and isinstance(splits.test, ImageFiles)
    return DatasetSplits(
        splits.name,
        splits.train.load(),
        splits.test.load(),
        splits.classes,
        splits.mean,
        splits.std,
        splits.input_size,
        splits.data_dir,
    )


def test_loading_decodes_only_the_statistics_sample(folder, decodes, monkeypatch):
    monkeypatch.setattr(imagefolder, "STATS_IMAGES", 7)
    splits = load_dataset(f"imagefolder:{folder}", image_size=8)
    assert isinstance(splits.train, ImageFiles) and len(splits.train) == CLASSES * TRAIN
    assert len(decodes) == 7 and len(set(decodes)) == 7  # a seeded sample, nothing else
    again = load_dataset(f"imagefolder:{folder}", image_size=8)
    assert decodes[7:] == decodes[:7] and again.mean == splits.mean


def test_statistics_match_the_whole_split_when_it_fits_the_sample(folder):
    splits = load_dataset(f"imagefolder:{folder}", image_size=8)
    raw = splits.train.load().x * torch.tensor(splits.std).view(3, 1, 1) + torch.tensor(splits.mean).view(3, 1, 1)
    assert raw.mean(dim=(0, 2, 3)).tolist() == pytest.approx(list(splits.mean), abs=1e-5)
    assert raw.std(dim=(0, 2, 3)).tolist() == pytest.approx(list(splits.std), abs=1e-5)
    decoded = splits.train.load().x
    assert decoded.mean(dim=(0, 2, 3)).abs().max() < 1e-4 and (decoded.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-4


def test_a_task_decodes_only_its_share_and_picks_the_in_memory_rows(folder, decodes):
    splits = load_dataset(f"imagefolder:{folder}", image_size=8)
    memory = _in_memory(splits)
    del decodes[:]
    lazy = CloneTask(splits, [0, 1], [2, 3], [3], fraction=0.3, seed=4)
    eager = CloneTask(memory, [0, 1], [2, 3], [3], fraction=0.3, seed=4)
    sets = lazy.eval_sets()
    assert decodes == [] and all(isinstance(s, ImageFiles) for s in sets.values())
    clone = lazy.clone_set()
    assert len(decodes) == len(clone) == 3 and all("/train/k3/" in p for p in decodes)
    assert torch.equal(clone.x, eager.clone_set().x) and torch.equal(clone.y, eager.clone_set().y)
    del decodes[:]
    available = lazy.available_set()
    assert len(decodes) == len(available) == 3 + 3 + 3  # 30% of 10 images of classes 0, 1 and 3
    assert {Path(p).parent.name for p in decodes} == {"k0", "k1", "k3"}
    assert torch.equal(available.x, eager.available_set().x) and torch.equal(available.y, eager.available_set().y)
    del decodes[:]
    inputs, expected = lazy.clone_inputs(), eager.clone_inputs()
    assert len(decodes) == len(available) + 3 * VAL  # the share, then the test images of 0, 1, 3
    for name, (x, y) in expected["eval_sets"].items():
        assert torch.equal(inputs["eval_sets"][name][0], x) and torch.equal(inputs["eval_sets"][name][1], y)
    assert torch.equal(inputs["images"], expected["images"]) and inputs["class_names"] == ["k3"]


def test_a_validation_share_decodes_only_the_task_classes_validation_rows(folder, decodes):
    splits = load_dataset(f"imagefolder:{folder}", image_size=8)
    memory = _in_memory(splits)
    del decodes[:]
    lazy = CloneTask(splits, [0, 1], [2, 3], [3], seed=4, validation=0.2)
    eager = CloneTask(memory, [0, 1], [2, 3], [3], seed=4, validation=0.2)
    held = lazy.holdout_set()
    assert len(decodes) == len(held) == 3 * 2  # 20% of 10 training images of classes 0, 1 and 3
    assert {Path(p).parent.name for p in decodes} == {"k0", "k1", "k3"} and all("/train/" in p for p in decodes)
    assert torch.equal(held.x, eager.holdout_set().x) and torch.equal(held.y, eager.holdout_set().y)
    del decodes[:]
    available = lazy.available_set()
    assert not set(decodes) & {splits.train.paths[i] for i in validation_rows(splits.train, 0.2)[1].tolist()}
    assert torch.equal(available.x, eager.available_set().x)


def test_eval_sets_stay_out_of_clone_inputs_when_they_do_not_fit(folder, monkeypatch):
    splits = load_dataset(f"imagefolder:{folder}", image_size=8)
    task = CloneTask(splits, [0, 1], [2, 3], [3])
    monkeypatch.setenv("PNC_DECODE_CACHE_MB", "0")
    assert task.clone_inputs()["eval_sets"] == {}
    monkeypatch.setenv("PNC_DECODE_CACHE_MB", "lots")
    with pytest.raises(DataError, match="PNC_DECODE_CACHE_MB"):
        task.clone_inputs()


def test_evaluation_streams_and_equals_the_in_memory_result(folder, decodes):
    splits = load_dataset(f"imagefolder:{folder}", image_size=8)
    memory = _in_memory(splits)
    torch.manual_seed(0)
    model = create("cnn4", in_chans=3, num_classes=4, width=4).eval()
    lazy, eager = CloneTask(splits, [0, 1], [2, 3], [2]), CloneTask(memory, [0, 1], [2, 3], [2])
    del decodes[:]
    assert evaluate_clone(model, lazy.eval_sets()) == evaluate_clone(model, eager.eval_sets())
    assert len(decodes) == 3 * VAL  # ori and tar, each image once
    test = select_classes(splits.test, [0, 1, 2, 3])
    assert evaluate(model, test) == evaluate(model, select_classes(memory.test, [0, 1, 2, 3]))


def test_streamed_training_equals_training_on_decoded_images(folder, monkeypatch):
    splits = load_dataset(f"imagefolder:{folder}", image_size=8)
    data = select_classes(splits.train, [0, 1, 2, 3])
    weights = []
    for budget in ("0", "64"):  # decode every epoch / decode once and keep
        monkeypatch.setenv("PNC_DECODE_CACHE_MB", budget)
        torch.manual_seed(3)
        model = create("cnn4", in_chans=3, num_classes=4, width=4)
        fit(model, data, epochs=2, lr=0.05, seed=1, batch_size=8, augment=True, progress=False)
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_worker_processes_decode_the_same_pixels(folder, monkeypatch):
    splits = load_dataset(f"imagefolder:{folder}", image_size=8)
    alone = splits.train.load().x
    monkeypatch.setattr(images, "PARALLEL_ROWS", 1)
    monkeypatch.setenv("PNC_DATA_WORKERS", "2")
    state = torch.random.get_rng_state()
    assert torch.equal(splits.train.load().x, alone)
    assert torch.equal(torch.random.get_rng_state(), state)  # dropout in fit draws the same numbers


@pytest.mark.parametrize("workers", ["0", "1"])
def test_a_corrupt_image_is_named(folder, monkeypatch, workers):
    monkeypatch.setenv("PNC_DATA_WORKERS", workers)
    monkeypatch.setattr(images, "PARALLEL_ROWS", 1)
    broken = folder / "val" / "k2" / "01.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    splits = load_dataset(f"imagefolder:{folder}", image_size=8)  # val/ is not read to index it
    task = CloneTask(splits, [0, 1], [2, 3], [2])
    model = create("cnn4", in_chans=3, num_classes=4, width=4)
    with pytest.raises(DataError, match=f"cannot read image {broken}") as err:
        evaluate_clone(model, task.eval_sets())
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)
    (folder / "train" / "k0" / "00.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="train/k0/00.jpg"):
        load_dataset(f"imagefolder:{folder}", image_size=8)


def test_empty_folders_say_what_to_do(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="class folder"):
        load_dataset(f"imagefolder:{tmp_path}")
    root = _folder(tmp_path / "data")
    (root / "train" / "k9").mkdir()
    with pytest.raises(DataError, match="k9.*add images or remove the empty folder"):
        load_dataset(f"imagefolder:{root}")
    (root / "train" / "k9").rmdir()
    for path in (root / "val").rglob("*.*"):
        path.unlink()
    with pytest.raises(DataError, match="no evaluation images"):
        load_dataset(f"imagefolder:{root}")


def test_zoo_train_clone_and_eval_on_an_image_folder(tmp_path, monkeypatch, capsys):
    root, zoo, out = _folder(tmp_path / "data", size=16), tmp_path / "zoo", tmp_path / "run"
    monkeypatch.setenv("PNC_DECODE_CACHE_MB", "0")  # stream the training batches
    for name, classes, seed in (("t", "0-1", 1), ("s", "2-3", 2)):
        args = ["zoo", "train", "--arch", "cnn4", "--dataset", f"imagefolder:{root}", "--image-size", "12"]
        args += ["--classes", classes, "--name", name, "--epochs", "3", "--seed", str(seed), "--zoo-dir", str(zoo)]
        assert main(args) == 0
    card = json.loads((zoo / "t" / "card.json").read_text())
    assert card["input_size"] == [3, 12, 12] and card["recipe"]["train_images"] == 2 * TRAIN
    capsys.readouterr()
    clone_args = ["clone", "--target", "t", "--source", "s", "--classes", "k3", "--out", str(out)]
    assert main([*clone_args, "--zoo-dir", str(zoo), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"]["clone_train"] + report["images"]["clone_holdout"] == 3
    assert main(["eval", str(out), "--zoo-dir", str(zoo), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert {k: again[k] for k in ("ori_acc", "tar_acc", "avg_acc")} == {
        k: report[k] for k in ("ori_acc", "tar_acc", "avg_acc")
    }
