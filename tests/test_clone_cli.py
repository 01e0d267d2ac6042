"""`pnc clone` / `pnc eval` the way users run them: 1, 2 and 3 clone classes, two datasets.

The multi-class case crashed once (G's coefficients were saved non-contiguous to the G
cache, which only the CLI uses), while the Python tests cloned one class.
"""

from __future__ import annotations

import json

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
