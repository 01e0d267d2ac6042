"""IDX parsing, dataset loading, class specs and clone-task validation (pnc.zoo)."""

from __future__ import annotations

import gzip
import struct
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pnc.surgery.errors import DataError, TaskError
from pnc.zoo.datasets import DatasetSplits, ImageData, load_dataset
from pnc.zoo.idx import read_idx
from pnc.zoo.tasks import CloneTask, parse_classes, select_classes, validation_rows


def _idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def test_read_idx_raw_gz_and_dtypes(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(_idx_bytes(images))
    (tmp_path / "a.gz").write_bytes(gzip.compress(_idx_bytes(images)))
    ints = np.array([-5, 70000, 3], dtype=np.int32)
    (tmp_path / "b").write_bytes(_idx_bytes(ints, 0x0C))
    assert np.array_equal(read_idx(tmp_path / "a"), images)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), images)
    assert read_idx(tmp_path / "b").tolist() == [-5, 70000, 3]


@pytest.mark.parametrize(
    "mutate, words",
    [
        (lambda raw: b"\x08\x03" + raw[2:], "bad magic"),
        (lambda raw: raw[:2] + b"\x42" + raw[3:], "bad magic"),
        (lambda raw: raw[:6], "truncated inside its header"),
        (lambda raw: raw[:-5], "truncated"),
        (lambda raw: raw + b"\x00", "longer than its header"),
        (lambda raw: gzip.compress(raw)[:-12], "gzip"),
    ],
)
def test_read_idx_rejects_corrupt_files(tmp_path, mutate, words):
    raw = _idx_bytes(np.zeros((4, 5, 5), dtype=np.uint8))
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(mutate(raw))
    with pytest.raises(DataError, match=words) as err:
        read_idx(path)
    assert str(path) in str(err.value)


def _write_mnist_folder(folder, n_train=30, n_test=10, gz=True):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    parts = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for stem, array in parts.items():
        raw = _idx_bytes(array)
        (folder / (stem + (".gz" if gz else ""))).write_bytes(gzip.compress(raw) if gz else raw)
    return parts


def test_idx_folder_loader_normalizes_with_train_statistics(tmp_path):
    parts = _write_mnist_folder(tmp_path / "mnist", gz=False)
    splits = load_dataset("mnist", data_dir=str(tmp_path))  # parent with a mnist/ subfolder
    assert splits.input_size == (1, 28, 28) and splits.classes[3] == "3"
    assert splits.train.x.shape == (30, 1, 28, 28) and splits.test.x.shape == (10, 1, 28, 28)
    assert splits.train.y.dtype == torch.int64
    assert splits.train.y.tolist() == parts["train-labels-idx1-ubyte"].tolist()
    expected_mean = parts["train-images-idx3-ubyte"].mean() / 255.0
    assert splits.mean[0] == pytest.approx(expected_mean, abs=1e-5)
    assert splits.train.x.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert splits.train.x.std().item() == pytest.approx(1.0, abs=1e-3)
    back = splits.test.x[0, 0] * splits.std[0] + splits.mean[0]
    assert torch.allclose(back * 255.0, torch.from_numpy(parts["t10k-images-idx3-ubyte"][0]).float(), atol=1e-3)


def test_fashion_mnist_reads_any_idx_folder_and_env(tmp_path, monkeypatch):
    _write_mnist_folder(tmp_path / "fashion-mnist")
    monkeypatch.setenv("PNC_DATA_DIR", str(tmp_path))
    splits = load_dataset("fashion-mnist")
    assert splits.classes[5] == "Sandal" and len(splits.train) == 30
    assert splits.data_dir == str(tmp_path / "fashion-mnist")


def test_missing_and_unknown_datasets_say_what_to_do(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", data_dir=str(tmp_path))
    with pytest.raises(DataError, match="cifar-10-batches-bin"):
        load_dataset("cifar10", data_dir=str(tmp_path))
    with pytest.raises(DataError, match="digits, fashion-mnist"):
        load_dataset("fashoin-mnist")
    with pytest.raises(DataError, match="no train/ subfolder"):
        load_dataset(f"imagefolder:{tmp_path}")


def test_image_folder_tiny_imagenet_layout(tmp_path):
    from PIL import Image

    for wnid, colour in (("n01", (255, 0, 0)), ("n02", (0, 0, 255))):
        (tmp_path / "train" / wnid / "images").mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (20, 20), colour).save(tmp_path / "train" / wnid / "images" / f"{wnid}_{i}.JPEG")
    (tmp_path / "val" / "images").mkdir(parents=True)
    Image.new("RGB", (20, 20), (0, 0, 255)).save(tmp_path / "val" / "images" / "val_0.JPEG")
    (tmp_path / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn02\t0\t0\t20\t20\n")
    splits = load_dataset(f"imagefolder:{tmp_path}", image_size=16)
    assert splits.classes == ["n01", "n02"] and splits.input_size == (3, 16, 16)
    assert splits.train.y.tolist() == [0, 0, 1, 1] and splits.test.y.tolist() == [1]
    test = splits.test.load()  # image folders are indexed; rows are decoded on demand
    assert test.x[0, 2].mean() > test.x[0, 0].mean()  # blue, not red


def test_digits_split_is_fixed_and_stratified():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert a.input_size == (1, 8, 8) and len(a.train) + len(a.test) == 1797
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    counts = torch.bincount(a.test.y, minlength=10)
    assert counts.min() >= 50 and counts.max() <= 56


NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def test_parse_classes_forms_and_errors():
    assert parse_classes("0-4", NAMES) == [0, 1, 2, 3, 4]
    assert parse_classes("5,7, 9", NAMES) == [5, 7, 9]
    assert parse_classes("Sandal,bag", NAMES) == [5, 8]
    assert parse_classes("1-2,Bag", NAMES) == [1, 2, 8]
    assert parse_classes([9, "Trouser"], NAMES) == [9, 1]
    for bad, words in (
        ("3-12", "out of range"),
        ("Sock", "unknown class"),
        ("4-2", "empty"),
        ("", "empty"),
        ("1,1", "more than once"),
        ([10], "out of range"),
    ):
        with pytest.raises(TaskError, match=words):
            parse_classes(bad, NAMES)


def _toy_splits(per_class=10) -> DatasetSplits:
    y = torch.arange(10).repeat_interleave(per_class)
    x = torch.arange(len(y), dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).clone()
    return DatasetSplits(
        "toy", ImageData(x, y), ImageData(x[::2].clone(), y[::2].clone()), NAMES, (0.0,), (1.0,), (1, 2, 2)
    )


def test_clone_task_validation():
    ds = _toy_splits()
    for args, words in (
        (([0, 1], [1, 2], [2]), "overlap"),
        (([], [5], [5]), "target class set is empty"),
        (([0], [5, 6], []), "clone class set is empty"),
        (([0], [5, 6], [7]), "not source classes"),
        (([0], [5, 12], [5]), "out of range"),
        (([0], [5, 6], "L"), "unknown clone preset"),
        (([0, 0], [5], [5]), "duplicates"),
    ):
        with pytest.raises(TaskError, match=words):
            CloneTask(ds, *args)
    for fraction in (0.0, 1.5):
        with pytest.raises(TaskError, match="fraction"):
            CloneTask(ds, [0], [5], [5], fraction=fraction)


def test_clone_task_presets_and_labels():
    ds = _toy_splits()
    source = [5, 6, 7, 8, 9]
    assert CloneTask(ds, [0, 1], source, "S").clone_classes == [5]
    assert CloneTask(ds, [0, 1], source, "M").clone_classes == [5, 6, 7]
    assert CloneTask(ds, [0], [8, 9], "S").clone_classes == [8]  # at least one class
    task = CloneTask(ds, [3, 1], [9, 7, 5], [5, 9], fraction=0.3, seed=1)
    assert task.source_label_index() == [2, 0]
    assert task.num_outputs == 4
    tt = task.target_train()
    assert set(tt.y.tolist()) == {0, 1} and torch.equal(ds.train.y[tt.x[:, 0, 0, 0].long()], torch.tensor([3, 1])[tt.y])
    st = task.source_test()
    assert torch.equal(ds.train.y[st.x[:, 0, 0, 0].long()], torch.tensor([9, 7, 5])[st.y])
    clone = task.clone_set()
    assert sorted(clone.y.tolist()) == [2] * 3 + [3] * 3  # 30% of 10 images per class
    original = ds.train.y[clone.x[:, 0, 0, 0].long()]
    assert torch.equal(original, torch.tensor([5, 9])[clone.y - 2])
    assert torch.equal(clone.x, CloneTask(ds, [3, 1], [9, 7, 5], [5, 9], 0.3, seed=1).clone_set().x)
    assert not torch.equal(clone.x, CloneTask(ds, [3, 1], [9, 7, 5], [5, 9], 0.3, seed=2).clone_set().x)
    sets = task.eval_sets()
    assert set(sets["ori"].y.tolist()) == {0, 1} and set(sets["tar"].y.tolist()) == {2, 3}
    assert len(sets["avg"]) == len(sets["ori"]) + len(sets["tar"]) == 20
    joint = task.joint_train()
    assert torch.bincount(joint.y).tolist() == [10, 10, 10, 10]


def test_clone_task_json_round_trip():
    ds = _toy_splits()
    task = CloneTask(ds, [0, 1, 2], [5, 6, 7, 8, 9], "M", fraction=0.5, seed=3)
    back = CloneTask.from_json(task.to_json(), dataset=ds)
    assert back.to_dict() == task.to_dict() and back.clone_classes == [5, 6, 7]
    assert torch.equal(back.clone_set().x, task.clone_set().x)
    digits = CloneTask(load_dataset("digits"), [0, 1], [2, 3], "S")
    again = CloneTask.from_json(digits.to_json())
    assert torch.equal(again.clone_set().y, digits.clone_set().y)
    with pytest.raises(TaskError, match="missing or bad field"):
        CloneTask.from_json('{"dataset": "toy"}', dataset=ds)


def test_select_classes_keeps_order_of_class_list():
    ds = _toy_splits()
    sub = select_classes(ds.train, [7, 2], offset=5)
    assert torch.bincount(sub.y).tolist()[5:] == [10, 10]
    assert torch.equal(ds.train.y[sub.x[:, 0, 0, 0].long()], torch.tensor([7, 2])[sub.y - 5])


def test_cifar10_binary_version_without_pickle(tmp_path):
    root = tmp_path / "cifar-10-batches-bin"
    root.mkdir()
    names = "airplane automobile bird cat deer dog frog horse ship truck".split()
    (root / "batches.meta.txt").write_text("\n".join(names) + "\n\n")

    def records(labels):
        rows = []
        for label in labels:
            pixels = np.zeros((3, 32, 32), dtype=np.uint8)
            pixels[label % 3] = 255  # one colour plane per record
            rows.append(bytes([label]) + pixels.tobytes())
        return b"".join(rows)

    for i in range(1, 6):
        (root / f"data_batch_{i}.bin").write_bytes(records([i, i + 2]))
    (root / "test_batch.bin").write_bytes(records([0, 9, 4]))
    splits = load_dataset("cifar10", data_dir=str(tmp_path))
    assert splits.classes == names and splits.input_size == (3, 32, 32)
    assert splits.train.y.tolist() == [1, 3, 2, 4, 3, 5, 4, 6, 5, 7] and splits.test.y.tolist() == [0, 9, 4]
    raw = splits.test.x * torch.tensor(splits.std).view(3, 1, 1) + torch.tensor(splits.mean).view(3, 1, 1)
    planes = raw.mean(dim=(2, 3)).argmax(dim=1)
    assert planes.tolist() == [0, 0, 1]  # labels 0, 9, 4 -> red, red, green planes
    assert raw[2].mean(dim=(1, 2)).tolist() == pytest.approx([0.0, 1.0, 0.0], abs=1e-5)
    (root / "test_batch.bin").write_bytes(records([0])[:-7])
    with pytest.raises(DataError, match="not a multiple"):
        load_dataset("cifar10", data_dir=str(tmp_path))


def test_old_fraction_is_a_seeded_share_of_target_training_images():
    base = _toy_splits(per_class=20)
    test = ImageData(base.train.x + 10_000, base.train.y.clone())  # distinct test images
    ds = DatasetSplits("toy", base.train, test, NAMES, (0.0,), (1.0,), (1, 2, 2))
    task = CloneTask(ds, [3, 1], [9, 7, 5], [5, 9], fraction=0.3, seed=1)
    assert task.old_fraction == 0.3  # the paper's setting is the default
    old = task.old_set()
    assert torch.bincount(old.y).tolist() == [6, 6]  # 30% of 20 images of each target class
    original = ds.train.y[old.x[:, 0, 0, 0].long()]  # the toy's pixel is the training row
    assert torch.equal(original, torch.tensor([3, 1])[old.y])
    assert (old.x < 10_000).all() and not set(old.x[:, 0, 0, 0].tolist()) & set(ds.test.x[:, 0, 0, 0].tolist())
    assert torch.equal(old.x, CloneTask(ds, [3, 1], [9, 7, 5], [5, 9], 0.3, seed=1).old_set().x)
    assert not torch.equal(old.x, CloneTask(ds, [3, 1], [9, 7, 5], [5, 9], 0.3, seed=2).old_set().x)
    strict = CloneTask(ds, [3, 1], [9, 7, 5], [5, 9], 0.3, seed=1, old_fraction=0.0)
    assert len(strict.old_set()) == 0
    assert torch.equal(strict.available_set().x, task.clone_set().x)  # the clone set does not move
    both = task.available_set()
    assert torch.bincount(both.y).tolist() == [6, 6, 6, 6]
    for bad in (-0.1, 1.5):
        with pytest.raises(TaskError, match="old fraction"):
            CloneTask(ds, [3, 1], [9, 7, 5], [5, 9], old_fraction=bad)


def test_old_fraction_round_trips_and_old_descriptions_mean_zero():
    ds = _toy_splits()
    task = CloneTask(ds, [0, 1, 2], [5, 6, 7, 8, 9], "M", fraction=0.5, seed=3, old_fraction=0.4)
    back = CloneTask.from_json(task.to_json(), dataset=ds)
    assert back.old_fraction == 0.4 and torch.equal(back.old_set().x, task.old_set().x)
    legacy = {k: v for k, v in task.to_dict().items() if k != "old_fraction"}
    assert CloneTask.from_json(legacy, dataset=ds).old_fraction == 0.0


def test_validation_rows_are_never_trained_on_and_choose_r():
    ds = _toy_splits(per_class=20)
    kept, held = validation_rows(ds.train, 0.2)
    assert not set(kept.tolist()) & set(held.tolist()) and len(kept) + len(held) == len(ds.train.y)
    assert torch.bincount(ds.train.y[held]).tolist() == [4] * 10  # 20% of each class
    assert torch.equal(held, validation_rows(ds.train, 0.2)[1])  # a fixed seed: every model agrees
    assert len(validation_rows(ds.train, 0.0)[1]) == 0
    task = CloneTask(ds, [3, 1], [9, 7, 5], [5, 9], fraction=0.5, seed=1, validation=0.2)
    unseen = set(held.tolist())  # the toy's pixel is the training row
    for part in (task.available_set(), task.joint_train(), task.target_train(), task.source_train()):
        assert not set(part.x[:, 0, 0, 0].long().tolist()) & unseen
    assert torch.bincount(task.available_set().y).tolist() == [5, 5, 8, 8]  # 0.3 / 0.5 of 16 training rows
    val = task.holdout_set()
    assert set(val.x[:, 0, 0, 0].long().tolist()) <= unseen
    assert torch.bincount(val.y).tolist() == [4, 4, 4, 4]  # every validation row of the task's classes
    assert torch.equal(ds.train.y[val.x[:, 0, 0, 0].long()], torch.tensor([3, 1, 5, 9])[val.y])
    inputs = task.clone_inputs()
    assert torch.equal(inputs["holdout"][0], val.x) and torch.equal(inputs["holdout"][1], val.y)
    strict = CloneTask(ds, [3, 1], [9, 7, 5], [5, 9], seed=1, old_fraction=0.0, validation=0.2)
    assert torch.bincount(strict.holdout_set().y).tolist() == [0, 0, 4, 4]  # no image of T_t
    plain = CloneTask(ds, [3, 1], [9, 7, 5], [5, 9], seed=1)
    assert plain.holdout_set() is None and "holdout" not in plain.clone_inputs()
    assert "validation" not in plain.to_dict()  # descriptions without a share are unchanged
    back = CloneTask.from_json(task.to_json(), dataset=ds)
    assert back.validation == 0.2 and torch.equal(back.holdout_set().x, val.x)
    for bad in (-0.1, 1.0):
        with pytest.raises(TaskError, match="validation share"):
            CloneTask(ds, [3, 1], [9, 7, 5], [5, 9], validation=bad)


def test_clone_task_for_cards_uses_the_validation_share_both_models_left_out():
    ds = _toy_splits()

    def card(classes, **recipe):
        return SimpleNamespace(classes=classes, recipe=recipe)

    both = CloneTask.for_cards(ds, card([0, 1], validation=0.2), card([5, 6], validation=0.2), "S", seed=2)
    assert (both.validation, both.target_classes, both.clone_classes, both.seed) == (0.2, [0, 1], [5], 2)
    for t_recipe, s_recipe in (({"validation": 0.2}, {}), ({"validation": 0.1}, {"validation": 0.2}), ({}, {})):
        task = CloneTask.for_cards(ds, card([0, 1], **t_recipe), card([5, 6], **s_recipe), "S")
        assert task.validation == 0.0  # one model trained on the other's validation rows: none are unseen
