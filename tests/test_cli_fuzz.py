"""CLI fuzz matrix: every sub-command against bad arguments (types, ranges, paths that are
files/folders/unwritable/missing, repeated flags, unknown names). Each case must exit 2 with
an error on stderr, no traceback, and write nothing: the sandbox (zoo, runs, working
directory, $HOME, caches) is listed before and after.

Run in-process (an uncaught exception fails the case), and a few through the installed
``pnc`` script. "Unwritable" is a path under a regular file or under /proc: tests run as root,
which ignores permission bits.

The matrix (``CASES``) found, before the fixes of issue 12: tracebacks for a folder given
as a patch or ONNX file, a factory that raises, an out-of-range seed, bad --arch-kwargs,
a zoo folder that is a file, and a repeated option silently taking its last value.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pnc.bench.cli import main

PATHS = {"file": "FILE", "dir": "DIR", "proc": "/proc/pnc-fuzz"}

#: sub-command -> bad argument lists; {file}: a regular file, {dir}: an empty folder,
#: {run}: a finished clone folder (t <- s, class 7), {junk}: random bytes, {t_onnx} /
#: {clone_onnx}: exports of t and of that clone, {opt_onnx}: the clone's with --optimize,
#: {proc}: a path no one can write.
CASES: dict[str, list[str]] = {
    "top": ["", "nosuch", "--version-x", "zoo", "bench", "clone --help-x"],
    "cuts": [
        "nosuchnet",
        "math:pi",
        "os:getcwd",
        ":",
        "''",
        "nosuch.module:f",
        "cnn4 --input-size a,b,c",
        "cnn4 --input-size 0,8,8",
        "cnn4 --input-size 1,8",
        "cnn4 --input-size 1,99999,8",
        "cnn4 --input-size 1,1,1",
        "t --input-size 3,8,8",
        "cnn4 --blocks --blocks",
        "cnn4 --zoo-dir {file}",
        "cnn4 --input-size 1,8,8 --input-size 1,8,8",
    ],
    "zoo train": [
        "{base} --epochs 0",
        "{base} --epochs -1",
        "{base} --epochs x",
        "{base} --epochs 1e9",
        "{base} --epochs 99999",
        "{base} --lr 0",
        "{base} --lr nan",
        "{base} --lr inf",
        "{base} --lr -1",
        "{base} --lr 11",
        "{base} --batch-size 0",
        "{base} --seed -1",
        "{base} --seed 4294967296",
        "{base} --seed x",
        "{base} --seed 99999999999999999999999",
        "{base} --optimizer adam",
        "{base} --arch-kwargs [1]",
        "{base} --arch-kwargs {{bad",
        "{base} --arch-kwargs '{{\"width\": -1}}'",
        "{base} --arch-kwargs '{{\"nope\": 1}}'",
        "{base} --epochs 1 --epochs 2",
        "{base} --device gpu",
        "{base} --device cuda:99",
        "{base} --device ''",
        "{base} --device cpu --device cpu",
        "{base} --zoo-dir {file}",
        "{base} --zoo-dir {file}/sub",
        "{base} --zoo-dir {proc}",
        "--arch cnn4 --dataset digits --classes 0-4 --name t --epochs 1",
        "--arch nope --dataset digits --classes 0-4 --name x",
        "--arch cnn4 --dataset nope --classes 0-4 --name x",
        "--arch cnn4 --dataset digits --classes '' --name x",
        "--arch cnn4 --dataset digits --classes 0-12 --name x",
        "--arch cnn4 --dataset digits --classes 4-0 --name x",
        "--arch cnn4 --dataset digits --classes 0,0 --name x",
        "--arch cnn4 --dataset digits --classes nope --name x",
        "--arch cnn4 --dataset digits --classes 0-4 --name '../x'",
        "--arch cnn4 --dataset digits --classes 0-4 --name 'a b'",
        "--arch cnn4 --dataset digits --classes 0-4 --name ''",
        "--arch cnn4 --dataset mnist --classes 0-4 --name x --data-dir {file}",
        "--arch cnn4 --dataset imagefolder:{dir} --classes 0 --name x",
        "--arch cnn4 --dataset imagefolder:{dir} --classes 0 --name x --image-size 16",
        "{base} --image-size 32",
        "{base} --image-size 0",
        "{base} --image-size 3",
        "{base} --image-size 99999",
        "{base} --image-size x",
        "{base} --image-size 16 --image-size 16",
        "--arch lenet5 --dataset digits --classes 0-4 --name x --arch-kwargs '{{\"img_size\": 2}}'",
    ],
    "zoo list": ["--zoo-dir {file}", "--json --json", "extra"],
    "zoo import": [
        "x --arch cnn4 --weights {dir}/missing.safetensors --dataset digits --classes 0-4",
        "x --arch cnn4 --weights {dir} --dataset digits --classes 0-4",
        "x --arch cnn4 --weights {junk} --dataset digits --classes 0-4",
        "x --arch cnn4 --weights {file} --dataset digits --classes 0-4",
        "t --arch cnn4 --weights {zoo}/t/model.safetensors --dataset digits --classes 0-4",
        "x --arch lenet5 --weights {zoo}/t/model.safetensors --dataset digits --classes 0-4",
        "x --arch cnn4 --weights {zoo}/t/model.safetensors --dataset digits --classes 0-3",
        "x --arch cnn4 --weights {zoo}/t/model.safetensors --dataset digits --classes 0-4 --input-size 1,9,9",
        "x --arch cnn4 --weights {zoo}/t/model.safetensors --dataset nope --classes 0-4",
        "x --arch cnn4 --weights {zoo}/t/model.safetensors --dataset digits --classes 0-4 --zoo-dir {file}",
        "x --arch cnn4 --dataset digits --classes 0-4",
    ],
    "zoo export": [
        "nope --out {dir}/x.safetensors",
        "t --out {dir}",
        "t --out {file}/x.safetensors",
        "t --out {proc}/x.safetensors",
        "t",
        "t --out {dir}/a --out {dir}/b",
    ],
    "split": [
        "t --cut nope --out {dir}/o",
        "t --cut block1 --out {file}",
        "t --cut block1 --out {proc}",
        "nope --cut x --out {dir}/o",
        "t --cut block1 --out {dir}/o --opset 5",
        "t --out {dir}/o",
        "t --cut block1 --out {dir}/o --input-size 1,8",
        "t --cut block1 --cut block2 --out {dir}/o",
    ],
    "prune": [
        "t --from nope --classes 1 --out {dir}/o",
        "t --from first --classes 7 --out {dir}/o",
        "t --from first --classes 1 --out {file}",
        "t --from first --classes 1 --out {proc}",
        "t --from first --classes 1 --out {dir}/o --keep 0",
        "t --from first --classes 1 --out {dir}/o --keep 2",
        "t --from first --classes 1 --out {dir}/o --fraction 0",
        "t --from first --classes 1 --out {dir}/o --steps 0",
        "t --from first --classes 1 --out {dir}/o --seed -1",
        "nope --from first --classes 1 --out {dir}/o",
        "t --from first --out {dir}/o",
        "t --from first --classes 1,1 --out {dir}/o",
        "t --from first --classes 1 --out {dir}/o --keep 0.5 --keep 0.6",
        "t --from first --classes 1 --out {dir}/o --device tpu",
        "t --from first --classes 1 --out {dir}/o --device cuda:99",
    ],
    "attach": [
        "{t_onnx} {dir}/missing.onnx --out {dir}/x.onnx",
        "{t_onnx} {junk} --out {dir}/x.onnx",
        "{t_onnx} {t_onnx} --out {dir}/x.onnx",
        "{dir}/missing.onnx {t_onnx} --out {dir}/x.onnx",
        "{t_onnx} {clone_onnx} --out {dir}/x.onnx",
        "{t_onnx} {clone_onnx} --out {t_onnx}",
        "{t_onnx} {clone_onnx} --out {proc}/x.onnx",
        "{t_onnx} --out {dir}/x.onnx",
        "{opt_onnx} {clone_onnx} --out {dir}/x.onnx",
        "{t_onnx} {clone_onnx}",
    ],
    "extract": [
        "t --from block3 --to block1 --out {dir}/o",
        "t --from nope --to block3 --out {dir}/o",
        "t --from block1 --to block1 --out {dir}/o",
        "t --from block1 --to block3 --out {file}/sub",
        "t --from block1 --out {dir}/o",
    ],
    "zoo show": ["nope", "'a b'", "t --zoo-dir {file}", "t --json --json", ""],
    "zoo verify": ["nope", "--zoo-dir {dir}", "--zoo-dir {file}", "t extra"],
    "zoo pretrain-defaults": [
        "--only nope",
        "--zoo-dir {file}",
        "--zoo-dir {proc}",
        "--zoo-dir {file}/sub",
        "--device cuda:99",
    ],
    "clone": [
        "{clone} --out {file}",
        "{clone} --out {file}/sub",
        "{clone} --out {proc}",
        "{clone} --out {run} --classes 8x",
        "--target t --source s --classes 8 --out {run}",
        "--target t --source s --classes 7 --out {run} --seed 4",
        "--target nope --source s --classes 7 --out {dir}/o",
        "--target t --source nope --classes 7 --out {dir}/o",
        "--target t --source s --classes '' --out {dir}/o",
        "--target t --source s --classes 99 --out {dir}/o",
        "--target t --source s --classes 0 --out {dir}/o",
        "--target t --source s --classes 5,5 --out {dir}/o",
        "--target t --source s --classes L --out {dir}/o",
        "--target t --source t --classes 0 --out {dir}/o",
        "--target t --source s --classes 7 --source s --classes 7 --out {dir}/o",
        "--target t --source s --classes 7 --source s --classes 6-7 --out {dir}/o",
        "--target t --source s --source s --classes 7 --out {dir}/o",
        "{clone} --out {dir}/o --fraction 0",
        "{clone} --out {dir}/o --fraction 1.5",
        "{clone} --out {dir}/o --fraction nan",
        "{clone} --out {dir}/o --mask-ratio 0",
        "{clone} --out {dir}/o --mask-ratio 2",
        "{clone} --out {dir}/o --mask-ratio x",
        "{clone} --out {dir}/o --time-budget 0",
        "{clone} --out {dir}/o --time-budget -5",
        "{clone} --out {dir}/o --time-budget soon",
        "{clone} --out {dir}/o --seed -1",
        "{clone} --out {dir}/o --target s",
        "{clone} --out {dir}/o --out {dir}/p",
        "{clone} --out {dir}/o --json --json",
        "{clone} --out {dir}/o --zoo-dir {file}",
        "--source s --classes 7 --out {dir}/o",
        "{clone} --out {dir}/o --target 'a b'",
        "{clone} --out {dir}/o --device gpu",
        "{clone} --out {dir}/o --device cuda:99",
        "{clone} --out {dir}/o --device mps:0",
        "{clone} --out {dir}/o --device cpu --device auto",
        "{clone} --out {dir}/o --backend nope",
        "{clone} --out {dir}/o --backend ''",
        "{clone} --out {dir}/o --backend ray --backend ray",
        "{clone} --out {dir}/o --address 127.0.0.1:6379",
        "{clone} --out {dir}/o --backend ray --address nohost",
        "{clone} --out {dir}/o --backend ray --address ''",
        "{clone} --out {dir}/o --backend ray --address 127.0.0.1:0",
        "{clone} --out {dir}/o --backend ray --address 127.0.0.1:99999",
        "{clone} --out {dir}/o --backend ray --address 'ray://h:1'",
        "{clone} --out {dir}/o --backend ray --address 'a b:1'",
        "{clone} --out {file} --backend ray",
    ],
    "eval": [
        "{dir}/missing.pnc",
        "{dir}",
        "{junk}",
        "{file}",
        "{t_onnx}",
        "{run}/report.json",
        "{run} --zoo-dir {file}",
        "{run} --zoo-dir {dir}",
        "{run} --json --json",
        "",
        "{run} --device nope",
    ],
    "demo": [
        "--out {run}",
        "--out {file}",
        "--out {proc}",
        "--out {file}/sub",
        "--seed -1",
        "--zoo-dir {file}",
        "--seed 1 --seed 2",
        "--device cuda:x",
    ],
    "export": [
        "nope --out {dir}/x.onnx",
        "{dir}/missing.pnc --out {dir}/x.onnx",
        "{dir} --out {dir}/x.onnx",
        "{junk} --out {dir}/x.onnx",
        "t --out {proc}/x.onnx",
        "t --out {file}/x.onnx",
        "t --out {dir}",
        "t --out {dir}/x.onnx --opset 5",
        "t --out {dir}/x.onnx --opset 8",
        "t --out {dir}/x.onnx --opset 21",
        "t --out {dir}/x.onnx --opset 99",
        "t --out {dir}/x.onnx --opset x",
        "t --out {dir}/x.onnx --opset 9 --opset 10",
        "t --out {dir}/x.onnx --optimize fast",
        "t --out {dir}/x.onnx --optimize",
        "t --out {dir}/x.onnx --optimize basic --optimize all",
        "{run} --out {dir}/x.onnx --branch-only --optimize basic",
        "t --out {dir}/x.onnx --zoo-dir {file}",
        "{run} --out {run}/clone.pnc",
        "t",
        "'a b' --out {dir}/x.onnx",
    ],
    "detach": [
        "{dir}/missing.onnx --all --out {dir}/x.onnx",
        "{junk} --all --out {dir}/x.onnx",
        "{dir} --all --out {dir}/x.onnx",
        "{clone_onnx} --all --out {proc}/x.onnx",
        "{clone_onnx} --all --out {file}/x.onnx",
        "{clone_onnx} --all --out {dir}",
        "{clone_onnx} --all --out {clone_onnx}",
        "{clone_onnx} --all",
        "{clone_onnx} --branch nope --out {dir}/x.onnx",
        "{clone_onnx} --all --list",
        "{clone_onnx}",
        "{t_onnx} --all --out {dir}/x.onnx",
        "{t_onnx} --list",
        "{opt_onnx} --all --out {dir}/x.onnx",
        "{opt_onnx} --list",
        "{clone_onnx} --all --out {dir}/x.onnx --out {dir}/y.onnx",
    ],
    "bench paper": [
        "--quick --out {file}",
        "--quick --out {proc}",
        "--quick --workdir {file}",
        "--quick --seeds x",
        "--quick --seeds -1",
        "--quick --seeds 0,0",
        "--quick --scales L",
        "--quick --methods nope",
        "--quick --methods PNC,PNC",
        "--dataset nope --out {dir}/o",
        "--quick --arch nope --out {dir}/o",
        "--quick --zoo-dir {file}",
        "--quick --target t --out {dir}/o",
        "--quick --target t --source nope --out {dir}/o",
        "--quick --target t --source s --arch cnn4 --out {dir}/o",
        "--quick --quick",
        "--quick --seeds ''",
        "--quick --device gpu",
        "--quick --device cuda:99",
    ],
    "bench figures": [
        "--quick --figures 5",
        "--quick --figures x",
        "--quick --out {file}",
        "--quick --arch nope",
        "--quick --device x",
        "--quick --backend nope",
        "--quick --address 127.0.0.1:6379",
        "--quick --backend ray --address x",
        "--quick --backend ray --address 1.2.3.4:-1",
        "--quick --backend ray --out {file}",
    ],
    "bench hetero": [
        "--pairs x",
        "--pairs resnetc20-cnn4,resnetc20-cnn4",
        "--pairs vit-lenet5,vit",
        "--quick --quick",
        "--methods nope",
        "--out {file}",
        "--workdir {proc}",
        "--seeds -5",
        "--device cuda:99",
    ],
    "bench incremental": [
        "--quick --step-sizes 0",
        "--quick --step-sizes x",
        "--quick --methods PNC-F",
        "--quick --out {file}/sub",
        "--quick --dataset nope",
        "--quick --device mps:0",
    ],
}
BASE_TRAIN = "--arch cnn4 --dataset digits --classes 0-4 --name fresh"
BASE_CLONE = "--target t --source s --classes 7"


def _argv(command: str, case: str, paths: dict[str, str]) -> list[str]:
    text = case.format(base=BASE_TRAIN, clone=BASE_CLONE, **paths)
    return shlex.split(command if command != "top" else "") + shlex.split(text)


MATRIX = [(cmd, case) for cmd, cases in CASES.items() for case in cases]


@pytest.fixture(scope="module")
def sandbox(tiny_zoo, tiny_run, tmp_path_factory):
    """Every kind of path a case points at, in one folder (listed before and after each case)."""
    root = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(tiny_zoo, root / "zoo")
    shutil.copytree(tiny_run, root / "run")
    (root / "dir").mkdir()
    (root / "file").write_text("a regular file\n")
    (root / "junk.pnc").write_bytes(os.urandom(300))
    for src, out in (("t", "t.onnx"), (str(root / "run" / "clone.pnc"), "clone.onnx")):
        assert main(["export", src, "--out", str(root / out), "--zoo-dir", str(root / "zoo")]) == 0
    optimized = ["--out", str(root / "opt.onnx"), "--optimize", "extended", "--zoo-dir", str(root / "zoo")]
    assert main(["export", str(root / "run" / "clone.pnc"), *optimized]) == 0
    paths = {
        "zoo": str(root / "zoo"),
        "file": str(root / "file"),
        "dir": str(root / "dir"),
        "proc": "/proc/pnc-fuzz",
        "run": str(root / "run"),
        "junk": str(root / "junk.pnc"),
        "t_onnx": str(root / "t.onnx"),
        "clone_onnx": str(root / "clone.onnx"),
        "opt_onnx": str(root / "opt.onnx"),
    }
    return root, paths


#: onnxruntime keeps a telemetry database in $XDG_CACHE_HOME/Microsoft when it is first used
NOT_OURS = "cache/Microsoft"


def _listing(root: Path) -> list[tuple[str, int, int]]:
    """Every file and folder with its size and mtime (a folder's mtime is left out: as root, pnc
    probes whether it can write in a folder by creating and removing a file there)."""
    return sorted(
        (str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns if p.is_file() else -1)
        for p in root.rglob("*")
        if not str(p.relative_to(root)).startswith(NOT_OURS) and str(p.relative_to(root)) != "cache"
    )


@pytest.fixture
def env(sandbox, monkeypatch):
    root, paths = sandbox
    monkeypatch.chdir(root / "dir")
    for key, value in (
        ("PNC_ZOO_DIR", root / "zoo"),
        ("PNC_DATA_DIR", root / "data"),
        ("HOME", root / "home"),
        ("XDG_CACHE_HOME", root / "cache"),
    ):
        monkeypatch.setenv(key, str(value))
    return root, paths


@pytest.mark.parametrize("command, case", MATRIX, ids=[f"{c}: {a}" for c, a in MATRIX])
def test_bad_arguments_exit_2_cleanly_and_write_nothing(env, capsys, command, case):
    root, paths = env
    before = _listing(root)
    try:
        code = main(_argv(command, case, paths))
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    captured = capsys.readouterr()
    assert code == 2, captured.err or captured.out
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    assert captured.err.strip().splitlines()[-1].startswith("pnc"), captured.err
    assert _listing(root) == before, "the failed command wrote or changed files"


@pytest.mark.parametrize(
    "case",
    ["export t --out {dir}/x.onnx --opset 99", "clone {clone} --out {file}/sub", "zoo train {base} --zoo-dir {file}"],
)
def test_installed_script_gives_one_line_and_exit_2(env, case):
    root, paths = env
    before = _listing(root)
    script = Path(sys.executable).with_name("pnc")
    argv = shlex.split(case.format(base=BASE_TRAIN, clone=BASE_CLONE, **paths))
    done = subprocess.run([str(script), *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert "Traceback" not in done.stderr and done.stderr.strip().splitlines()[-1].startswith("pnc")
    assert _listing(root) == before


def test_matrix_covers_every_sub_command():
    from pnc.bench.cli import build_parser

    parser = build_parser()
    top = next(a for a in parser._actions if a.dest == "command")
    names = set()
    for name, sub in top.choices.items():
        nested = [a for a in sub._actions if a.dest in ("zoo_command", "bench_command")]
        names |= {f"{name} {n}" for n in nested[0].choices} if nested else {name}
    assert names <= set(CASES), f"no fuzz cases for {sorted(names - set(CASES))}"
    assert len(MATRIX) >= 150
