"""Test-wide settings: one intra-op thread. The tests run tiny models on tiny batches, where
extra threads only add synchronisation (and, on a shared 2-core machine, oversubscription
made the same clone 15x slower)."""

import torch

torch.set_num_threads(1)

import pytest  # noqa: E402


def _train(zoo, name: str, classes: str, seed: int, *extra: str) -> None:
    from pnc.bench.cli import main

    assert (
        main(
            [
                "zoo",
                "train",
                "--arch",
                "cnn4",
                "--dataset",
                "digits",
                "--classes",
                classes,
                "--name",
                name,
                "--epochs",
                "4",
                "--seed",
                str(seed),
                "--zoo-dir",
                str(zoo),
                *extra,
            ]
        )
        == 0
    )


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """A digits zoo of two cnn4 models, "t" (classes 0-4) and "s" (5-9): seconds to train.
    Tests must not modify it (copy it first)."""
    zoo = tmp_path_factory.mktemp("tiny") / "zoo"
    _train(zoo, "t", "0-4", 1)
    _train(zoo, "s", "5-9", 2)
    return zoo


@pytest.fixture(scope="session")
def tiny_run(tiny_zoo, tmp_path_factory):
    """`pnc clone --target t --source s --classes 7 --out RUN` on the tiny zoo: RUN (do not modify)."""
    from pnc.bench.cli import main

    out = tmp_path_factory.mktemp("tiny-run") / "run"
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
                "--zoo-dir",
                str(tiny_zoo),
                "--json",
            ]
        )
        == 0
    )
    return out
