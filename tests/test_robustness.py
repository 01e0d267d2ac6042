"""Issue 12's findings, one regression test each: bad input gives one typed error line (exit 2)
before any work, never a traceback, a silent wrong result or a lost file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pnc.bench.cli import main
from pnc.surgery.errors import ExportError
from pnc.surgery.onnx_export import OPSETS, check_opset
from pnc.surgery.patch import read_patch, save_patch
from pnc.zoo.store import ZooStore


def _listing(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1) for p in root.rglob("*"))


def _fails(argv: list[str], capsys, *expected: str) -> str:
    """Run ``pnc argv``: exit 2, one error line naming ``expected``, no traceback; the message."""
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse usage errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    for text in expected:
        assert text in last, last
    return last


@pytest.fixture
def zoo_copy(tiny_zoo, tmp_path) -> Path:
    """A private copy of the tiny zoo (tests that retrain or break a model)."""
    return Path(shutil.copytree(tiny_zoo, tmp_path / "zoo"))


def _same_patch(a: Path, b: Path) -> bool:
    """Same tensors and metadata, except the search's timings (a resumed search reloads them)."""
    (meta_a, ta), (meta_b, tb) = read_patch(a), read_patch(b)
    for meta in (meta_a, meta_b):
        for branch in meta["branches"]:
            report = {k: v for k, v in branch["report"].items() if k not in ("seconds", "candidates", "profile")}
            report["tuning"].pop("seconds", None)
            branch["report"] = report
    return meta_a == meta_b and ta.keys() == tb.keys() and all(ta[k].equal(tb[k]) for k in ta)


def _clone(zoo: Path, out: Path, *extra: str) -> list[str]:
    return ["clone", "--target", "t", "--source", "s", "--out", str(out), "--zoo-dir", str(zoo), *extra]


def test_same_class_cloned_twice_is_refused_before_any_work(tiny_zoo, tmp_path, capsys):
    out = tmp_path / "run"
    _fails(_clone(tiny_zoo, out, "--classes", "7", "--source", "s", "--classes", "7"), capsys, "'7'", "cloned twice")
    _fails(_clone(tiny_zoo, out, "--classes", "5-6", "--source", "s", "--classes", "6,7"), capsys, "cloned twice")
    _fails(_clone(tiny_zoo, out, "--classes", "S", "--source", "s", "--classes", "5"), capsys, "cloned twice")
    assert not out.exists()


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda d: (d / "file").write_text("x") and d / "file", "is a file, not a folder"),
        (lambda d: (d / "file").write_text("x") and d / "file" / "sub", "is a file, not a folder"),
        (lambda d: Path("/proc/pnc-out"), "cannot write in /proc"),
    ],
)
def test_clone_out_that_cannot_be_written(tiny_zoo, tmp_path, capsys, make, expected):
    out = make(tmp_path)
    before = _listing(tmp_path)
    _fails(_clone(tiny_zoo, out, "--classes", "7"), capsys, "--out", expected)
    assert _listing(tmp_path) == before


def test_export_and_detach_out_that_cannot_be_written(tiny_zoo, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    onnx_file = tmp_path / "t.onnx"
    assert main(["export", "t", "--out", str(onnx_file), "--zoo-dir", str(tiny_zoo)]) == 0
    capsys.readouterr()
    before = _listing(tmp_path)
    for out, text in (
        ("/proc/x.onnx", "cannot write in /proc"),
        (str(tmp_path / "file" / "x.onnx"), "is a file"),
        (str(tmp_path), "is a folder"),
    ):
        _fails(["export", "t", "--out", out, "--zoo-dir", str(tiny_zoo)], capsys, text)
        _fails(["detach", str(onnx_file), "--all", "--out", out], capsys, text)
    _fails(["detach", str(onnx_file), "--all", "--out", str(onnx_file)], capsys, "is the input file")
    assert _listing(tmp_path) == before


def test_eval_accepts_the_clone_folder_and_refuses_others_with_a_hint(tiny_zoo, tiny_run, tmp_path, capsys):
    assert main(["eval", str(tiny_run / "clone.pnc"), "--zoo-dir", str(tiny_zoo), "--json"]) == 0
    by_file = json.loads(capsys.readouterr().out)
    assert main(["eval", str(tiny_run), "--zoo-dir", str(tiny_zoo), "--json"]) == 0
    by_folder = json.loads(capsys.readouterr().out)
    assert by_folder["avg_acc"] == by_file["avg_acc"] and by_folder["patch"].endswith("clone.pnc")
    _fails(["eval", str(tmp_path), "--zoo-dir", str(tiny_zoo)], capsys, "without a clone.pnc", "DIR/clone.pnc")


@pytest.mark.parametrize("ratio", ["0", "2", "-0.5", "nan", "x"])
def test_mask_ratio_is_checked_at_parse_time(tiny_zoo, tmp_path, capsys, ratio):
    out = tmp_path / "run"
    _fails(_clone(tiny_zoo, out, "--classes", "7", "--mask-ratio", ratio), capsys, "--mask-ratio")
    assert not out.exists()  # no .cache/ left behind


@pytest.mark.parametrize("opset", ["5", "8", "21", "99", "x"])
def test_unsupported_opset_refused_before_export(tiny_zoo, tmp_path, capsys, opset):
    out = tmp_path / "t.onnx"
    try:
        code = main(["export", "t", "--out", str(out), "--opset", opset, "--zoo-dir", str(tiny_zoo)])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "" and "9, 20" in captured.err  # no IR dump on stdout
    assert not out.exists()


def test_supported_opset_range_ends_export(tiny_zoo, tmp_path, capsys):
    for opset in (OPSETS.start, OPSETS.stop - 1):
        assert (
            main(
                [
                    "export",
                    "t",
                    "--out",
                    str(tmp_path / f"{opset}.onnx"),
                    "--opset",
                    str(opset),
                    "--zoo-dir",
                    str(tiny_zoo),
                ]
            )
            == 0
        )
    with pytest.raises(ExportError, match="use 9-20"):
        check_opset(OPSETS.stop)


def test_zoo_train_into_a_zoo_dir_that_is_a_file_refused_before_training(tmp_path, monkeypatch, capsys):
    import pnc.zoo.train

    monkeypatch.setattr(pnc.zoo.train, "train_zoo_model", lambda *a, **k: pytest.fail("trained anyway"))
    (tmp_path / "zoo").write_text("not a folder")
    monkeypatch.setenv("PNC_ZOO_DIR", str(tmp_path / "zoo"))
    _fails(
        ["zoo", "train", "--arch", "cnn4", "--dataset", "digits", "--classes", "0-4", "--name", "x"],
        capsys,
        "is a file",
    )


@pytest.mark.parametrize(
    "card, reason",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object, got a list"),
        ('{"name": "bad"}', "missing fields 'arch'"),
        ("DROP mean", "missing field 'mean'"),
        ("BAD classes", "bad field 'classes'"),
    ],
)
def test_one_broken_card_does_not_break_the_zoo(zoo_copy, capsys, card, reason):
    good = json.loads((zoo_copy / "t" / "card.json").read_text())
    if card == "DROP mean":
        card = json.dumps({k: v for k, v in good.items() if k != "mean"})
    elif card == "BAD classes":
        card = json.dumps(good | {"classes": [[0], 1]})
    (zoo_copy / "bad").mkdir()
    (zoo_copy / "bad" / "card.json").write_text(card)
    assert main(["zoo", "list", "--zoo-dir", str(zoo_copy), "--json"]) == 0
    captured = capsys.readouterr()
    listed = json.loads(captured.out)
    assert [c["name"] for c in listed] == ["s", "t", "bad"] and reason in listed[2]["broken"]
    assert "BROKEN bad" in captured.err and reason in captured.err
    assert "'mean'\n" not in captured.err and "list indices" not in captured.err
    assert main(["zoo", "verify", "--zoo-dir", str(zoo_copy)]) == 1
    out = capsys.readouterr().out
    assert "ok  s" in out and "ok  t" in out and "BROKEN  bad" in out
    _fails(["zoo", "show", "bad", "--zoo-dir", str(zoo_copy)], capsys, reason)


def test_patch_for_other_weights_names_the_hash_zoo_show_prints(zoo_copy, tiny_run, capsys):
    patch = tiny_run / "clone.pnc"
    meta_source = read_patch(patch)[0]["branches"][0]["source"]["sha256"]
    assert main(["zoo", "show", "s", "--json", "--zoo-dir", str(zoo_copy)]) == 0
    assert json.loads(capsys.readouterr().out)["state_dict_sha256"] == meta_source  # matchable before...
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
                "5-9",
                "--name",
                "s",
                "--epochs",
                "1",
                "--seed",
                "9",
                "--force",
                "--zoo-dir",
                str(zoo_copy),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["zoo", "show", "s", "--json", "--zoo-dir", str(zoo_copy)]) == 0
    now = json.loads(capsys.readouterr().out)["state_dict_sha256"]
    message = _fails(["eval", str(patch), "--zoo-dir", str(zoo_copy)], capsys, "other weights of source 's'")
    assert meta_source in message and now in message and "pnc zoo show s" in message  # ... and after


def test_zoo_train_over_an_existing_model_needs_force(zoo_copy, capsys):
    card = (zoo_copy / "t" / "card.json").read_bytes()
    argv = [
        "zoo",
        "train",
        "--arch",
        "cnn4",
        "--dataset",
        "digits",
        "--classes",
        "0-4",
        "--name",
        "t",
        "--epochs",
        "1",
        "--seed",
        "5",
        "--zoo-dir",
        str(zoo_copy),
    ]
    _fails(argv, capsys, "already exists", "--force")
    assert (zoo_copy / "t" / "card.json").read_bytes() == card
    assert main(argv + ["--force"]) == 0
    assert (zoo_copy / "t" / "card.json").read_bytes() != card


def test_clone_into_a_folder_of_another_run_needs_force(tiny_zoo, tiny_run, tmp_path, capsys):
    out = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    patch = (out / "clone.pnc").read_bytes()
    _fails(_clone(tiny_zoo, out, "--classes", "8"), capsys, "another run", "sources", "--force")
    _fails(_clone(tiny_zoo, out, "--classes", "7", "--seed", "3"), capsys, "another run", "seed")
    assert (out / "clone.pnc").read_bytes() == patch
    assert main(_clone(tiny_zoo, out, "--classes", "7", "--json")) == 0  # the same run: resumed, same patch
    assert _same_patch(out / "clone.pnc", tiny_run / "clone.pnc")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "clone.pnc").write_bytes(patch)
    _fails(_clone(tiny_zoo, tmp_path / "foreign", "--classes", "7"), capsys, "unknown origin", "--force")


def test_force_replaces_a_clone_of_another_run(tiny_zoo, tiny_run, tmp_path, capsys):
    out = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    assert main(_clone(tiny_zoo, out, "--classes", "8", "--force", "--json")) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["branches"][0]["classes"] == ["8"]
    assert json.loads((out / "report.json").read_text())["run"]["sources"][0][1] == "8"


def test_report_seconds_after_a_resume_count_every_attempt(tiny_zoo, tiny_run, tmp_path, capsys):
    out = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    (out / "clone.pnc").unlink()  # as if killed before the end, after 1000 s of work
    (out / "report.json").unlink()
    (out / ".ckpt" / "elapsed.json").write_text(json.dumps({"seconds": 1000.0, "finished": False}))
    assert main(_clone(tiny_zoo, out, "--classes", "7", "--json")) == 0
    report = json.loads(capsys.readouterr().out)
    assert 1000 < report["seconds"] < 1300
    assert _same_patch(out / "clone.pnc", tiny_run / "clone.pnc")
    assert json.loads((out / ".ckpt" / "elapsed.json").read_text())["finished"] is True


def test_patch_saved_without_tasks_is_evaluated(tiny_zoo, tiny_run, tmp_path, capsys):
    net, _ = ZooStore(tiny_zoo).load_patch(tiny_run / "clone.pnc")
    bare = tmp_path / "bare.pnc"
    save_patch(net, bare, target_name="t", input_size=(1, 8, 8))  # the README's call without tasks=
    assert main(["eval", str(tiny_run / "clone.pnc"), "--zoo-dir", str(tiny_zoo), "--json"]) == 0
    with_tasks = json.loads(capsys.readouterr().out)
    assert main(["eval", str(bare), "--zoo-dir", str(tiny_zoo), "--json"]) == 0
    without = json.loads(capsys.readouterr().out)
    for key in ("ori_acc", "tar_acc", "avg_acc", "target_acc", "ensemble_acc"):
        assert without[key] == with_tasks[key]
