"""`pnc zoo ...` smoke tests on digits in a temporary zoo folder."""

from __future__ import annotations

import json

import pytest

from pnc.bench.cli import main


def test_zoo_train_list_show_verify(tmp_path, capsys):
    zoo = str(tmp_path / "zoo")
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
                "0-4",
                "--name",
                "dig-t",
                "--epochs",
                "3",
                "--batch-size",
                "32",
                "--arch-kwargs",
                '{"width": 8}',
                "--zoo-dir",
                zoo,
            ]
        )
        == 0
    )
    assert "dig-t: cnn4 on digits classes [0, 1, 2, 3, 4]" in capsys.readouterr().out

    assert main(["zoo", "list", "--json", "--zoo-dir", zoo]) == 0
    cards = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in cards] == ["dig-t"] and cards[0]["kwargs"]["width"] == 8
    assert cards[0]["test_accuracy"] > 0.8

    assert main(["zoo", "show", "dig-t", "--json", "--zoo-dir", zoo]) == 0
    assert json.loads(capsys.readouterr().out)["sha256"] == cards[0]["sha256"]

    assert main(["zoo", "verify", "--zoo-dir", zoo]) == 0
    assert "ok  dig-t" in capsys.readouterr().out
    weights = tmp_path / "zoo" / "dig-t" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    assert main(["zoo", "verify", "dig-t", "--zoo-dir", zoo]) == 1
    assert "MISMATCH  dig-t" in capsys.readouterr().out


def test_zoo_errors_exit_2_with_a_message(tmp_path, capsys):
    zoo = str(tmp_path)
    assert main(["zoo", "show", "nope", "--zoo-dir", zoo]) == 2
    assert "pnc zoo train" in capsys.readouterr().err
    assert (
        main(
            [
                "zoo",
                "train",
                "--arch",
                "lenet",
                "--dataset",
                "digits",
                "--classes",
                "0-4",
                "--name",
                "x",
                "--zoo-dir",
                zoo,
            ]
        )
        == 2
    )
    assert "did you mean" in capsys.readouterr().err
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
                "0-12",
                "--name",
                "x",
                "--zoo-dir",
                zoo,
            ]
        )
        == 2
    )
    assert "out of range" in capsys.readouterr().err
    assert (
        main(
            [
                "zoo",
                "pretrain-defaults",
                "--only",
                "fmnist-lenet5-target",
                "--data-dir",
                str(tmp_path / "empty"),
                "--zoo-dir",
                zoo,
            ]
        )
        == 2
    )
    assert "skipping fmnist-lenet5-target" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(
            [
                "zoo",
                "train",
                "--arch",
                "cnn4",
                "--dataset",
                "digits",
                "--classes",
                "0-4",
                "--name",
                "x",
                "--epochs",
                "0",
            ]
        )


def test_list_empty_zoo_from_env(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PNC_ZOO_DIR", str(tmp_path))
    assert main(["zoo", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["zoo", "list"]) == 0
    assert f"no models in {tmp_path}" in capsys.readouterr().out
    assert main(["zoo", "verify"]) == 2
