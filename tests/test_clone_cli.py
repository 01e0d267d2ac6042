"""`pnc clone` / `pnc eval` the way users run them: 1, 2 and 3 clone classes, two datasets.

The multi-class case crashed once (G's coefficients were saved non-contiguous to the G
cache, which only the CLI uses), while the Python tests cloned one class.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from pnc.bench.cli import main


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture(scope="module")
def zoos(tmp_path_factory):
    """Two tiny zoos: sklearn digits with cnn4, and the same images written as an
    MNIST-format IDX folder ("mnist" dataset) with lenet5."""
    root = tmp_path_factory.mktemp("clone-cli")
    digits = load_digits()
    images = np.kron(digits.images * 15, np.ones((1, 2, 2)))  # 16 x 16 px, 0-240
    idx_dir = root / "mnist"
    idx_dir.mkdir()
    order = np.random.default_rng(0).permutation(len(images))
    train, test = order[:1400], order[1400:]
    for stem, array in (
        ("train-images-idx3-ubyte", images[train]),
        ("train-labels-idx1-ubyte", digits.target[train]),
        ("t10k-images-idx3-ubyte", images[test]),
        ("t10k-labels-idx1-ubyte", digits.target[test]),
    ):
        (idx_dir / stem).write_bytes(_idx(array))
    out = {}
    for dataset, arch, data_dir in (("digits", "cnn4", None), ("mnist", "lenet5", str(idx_dir))):
        zoo = str(root / f"zoo-{dataset}")
        extra = ["--data-dir", data_dir] if data_dir else []
        for name, classes, seed in (("t", "0-4", 1), ("s", "5-9", 2)):
            assert (
                main(
                    [
                        "zoo",
                        "train",
                        "--arch",
                        arch,
                        "--dataset",
                        dataset,
                        "--classes",
                        classes,
                        "--name",
                        name,
                        "--epochs",
                        "15",
                        "--seed",
                        str(seed),
                        "--zoo-dir",
                        zoo,
                        *extra,
                    ]
                )
                == 0
            )
        out[dataset] = (zoo, extra)
    return root, out


@pytest.mark.parametrize("dataset", ["digits", "mnist"])
@pytest.mark.parametrize("classes, expected", [("7", ["7"]), ("5,8", ["5", "8"]), ("M", ["5", "6", "7"])])
def test_clone_cli_over_class_counts(zoos, dataset, classes, expected, capsys):
    root, by_dataset = zoos
    zoo, extra = by_dataset[dataset]
    out = root / f"run-{dataset}-{len(expected)}"
    assert (
        main(
            [
                "clone",
                "--target",
                "t",
                "--source",
                "s",
                "--classes",
                classes,
                "--out",
                str(out),
                "--zoo-dir",
                zoo,
                "--json",
                *extra,
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["branches"][0]["classes"] == expected
    assert (out / "clone.pnc").stat().st_size > 0
    assert report["target_acc"]["tar"] == 0.0  # the target alone never predicts a new class
    assert report["tar_acc"] > 0.5 and report["ori_acc"] > 0.5  # the clone learnt the new classes
    assert main(["eval", str(out / "clone.pnc"), "--zoo-dir", zoo, "--json", *extra]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["avg_acc"] == pytest.approx(report["avg_acc"], abs=1e-6)


@pytest.mark.parametrize("old_fraction", ["0", "0.5"])
def test_clone_cli_old_fraction_counts_the_images_it_used(zoos, old_fraction, capsys):
    from pnc.surgery.patch import read_patch
    from pnc.zoo.datasets import load_dataset

    root, by_dataset = zoos
    zoo, extra = by_dataset["digits"]
    out = root / f"run-old-{old_fraction}"
    assert (
        main(
            [
                "clone",
                "--target",
                "t",
                "--source",
                "s",
                "--classes",
                "7",
                "--out",
                str(out),
                "--old-fraction",
                old_fraction,
                "--zoo-dir",
                zoo,
                "--json",
                *extra,
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    train_y = load_dataset("digits").train.y
    expected_old = sum(round(float(old_fraction) * int((train_y == c).sum())) for c in range(5))
    images = report["images"]
    assert report["old_fraction"] == float(old_fraction)
    assert images["old_train"] + images["old_holdout"] == expected_old
    assert images["clone_train"] + images["clone_holdout"] == round(0.3 * int((train_y == 7).sum()))
    assert report["ori_acc"] > 0.5 and report["tar_acc"] > 0.5
    meta, _ = read_patch(out / "clone.pnc")
    assert meta["branches"][0]["task"]["old_fraction"] == float(old_fraction)  # the patch records the setting
    assert main(["eval", str(out / "clone.pnc"), "--zoo-dir", zoo, "--json", *extra]) == 0
    assert json.loads(capsys.readouterr().out)["avg_acc"] == pytest.approx(report["avg_acc"], abs=1e-6)


@pytest.fixture(scope="module")
def validation_zoo(tmp_path_factory):
    """Digits cnn4 target and source trained without the same 20% validation share."""
    zoo = str(tmp_path_factory.mktemp("clone-cli-validation"))
    for name, classes, seed in (("t", "0-4", 1), ("s", "5-9", 2)):
        args = ["zoo", "train", "--arch", "cnn4", "--dataset", "digits", "--classes", classes, "--name", name]
        assert main([*args, "--epochs", "15", "--seed", str(seed), "--validation", "0.2", "--zoo-dir", zoo]) == 0
    return zoo


@pytest.mark.parametrize("old_fraction", ["0", "0.3"])
def test_clone_cli_chooses_r_on_the_validation_rows_the_models_never_saw(validation_zoo, old_fraction, capsys):
    from pnc.zoo.datasets import load_dataset
    from pnc.zoo.store import ZooStore
    from pnc.zoo.tasks import validation_rows

    train = load_dataset("digits").train
    kept, held = validation_rows(train, 0.2)
    card = ZooStore(validation_zoo).card("t")
    assert card.recipe["validation"] == 0.2 and card.recipe["train_images"] == int((train.y[kept] < 5).sum())
    capsys.readouterr()
    assert main(["zoo", "list", "--zoo-dir", validation_zoo]) == 0
    assert capsys.readouterr().out.count(" 0.2 ") == 2  # the list shows both models' validation share
    out = validation_zoo + f"-run-{old_fraction}"
    base = ["clone", "--target", "t", "--source", "s", "--classes", "5,8", "--out", out, "--zoo-dir", validation_zoo]
    lengths = ["--tune-epochs-choices", "12"] if float(old_fraction) else []  # tuning needs old-class images
    assert main([*base, "--old-fraction", old_fraction, *lengths]) == 0
    assert "held out to choose R (0.2 validation share, never trained on)" in capsys.readouterr().out
    report = json.loads((Path(out) / "report.json").read_text())
    images, kept_y, held_y = report["images"], train.y[kept], train.y[held]
    assert report["validation"] == 0.2
    assert images["clone_holdout"] == int(((held_y == 5) | (held_y == 8)).sum())  # every validation row
    assert images["clone_train"] == sum(round(0.3 * int((kept_y == c).sum())) for c in (5, 8))  # all train
    expected_old = int((held_y < 5).sum()) if float(old_fraction) else 0
    assert images["old_holdout"] == expected_old
    assert images["old_train"] == sum(round(float(old_fraction) * int((kept_y == c).sum())) for c in range(5))
    assert report["ori_acc"] > 0.5 and report["tar_acc"] > 0.5
    if lengths:  # both lengths tried on the validation images, the better one kept
        tuning = report["branches"][0]["tuning"]
        assert set(tuning["tried"]) == {"10", "12"} and tuning["tried"][str(tuning["epochs"])] == tuning["after"]["acc"]
    assert main(["eval", out, "--zoo-dir", validation_zoo, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["avg_acc"] == pytest.approx(report["avg_acc"], abs=1e-6)
