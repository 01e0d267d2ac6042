"""Surgery verbs on any model: `pnc split`, `pnc extract`, `pnc cuts` on zoo models and
checkpoints, `pnc zoo import` / `pnc zoo export` (a timm model trained elsewhere becomes clonable)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import save_file

from pnc.bench.cli import main
from pnc.surgery.onnx_export import session
from pnc.zoo import archs
from pnc.zoo.datasets import load_dataset
from pnc.zoo.tasks import select_classes
from pnc.zoo.train import fit


def _onnx_chain(folder, x: np.ndarray) -> np.ndarray:
    for piece in json.loads((folder / "pieces.json").read_text())["pieces"]:
        model = onnx.load(folder / piece["onnx"])
        onnx.checker.check_model(model)
        sess = session(model)
        assert sess.get_inputs()[0].name == piece["input"] and sess.get_outputs()[0].name == piece["output"]
        x = sess.run(None, {piece["input"]: x})[0]
    return x


def test_split_resnet18_onnx_pieces_match_the_model(tmp_path, capsys):
    assert main(["cuts", "resnet18", "--input-size", "3,64,64", "--blocks", "--json"]) == 0
    node = json.loads(capsys.readouterr().out)["cuts"][2]["node"]  # a listed block cut
    out = tmp_path / "d"
    assert main(["split", "resnet18", "--cut", node, "--input-size", "3,64,64", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "pieces.json",
        "prefix.onnx",
        "prefix.safetensors",
        "suffix.onnx",
        "suffix.safetensors",
    ]
    # the command checked the composition against the model it built, in PyTorch and onnxruntime
    spec = json.loads((out / "pieces.json").read_text())
    assert spec["cut"] == node and spec["check"]["onnx_max_abs"] <= 1e-5 and spec["check"]["torch_equal"]
    # the pieces run in onnxruntime at another batch size, wired by the cut's tensor name
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(5)).numpy()
    prefix, suffix = (session(onnx.load(out / f"{n}.onnx")) for n in ("prefix", "suffix"))
    composed = suffix.run(None, {node: prefix.run(None, {"input": x})[0]})[0]
    assert composed.shape == (4, 1000)
    assert np.array_equal(composed, _onnx_chain(out, x))


@pytest.fixture(scope="module")
def zoo(tiny_zoo, tmp_path_factory):
    """A writable copy of the session's tiny digits zoo ("t": classes 0-4, "s": 5-9)."""
    root = tmp_path_factory.mktemp("verbs")
    shutil.copytree(tiny_zoo, root / "zoo")
    return root, str(root / "zoo")


def test_split_and_extract_by_module_name_on_a_zoo_model(zoo, capsys):
    root, zoo_dir = zoo
    assert main(["cuts", "t", "--plain", "--zoo-dir", zoo_dir]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    header, rows = lines[0].split("\t"), [line.split("\t") for line in lines[1:]]
    assert header[:3] == ["block", "node", "module"] and "macs_after" in header
    macs = [int(r[header.index("macs_after")].replace(",", "")) for r in rows]
    assert macs == sorted(macs, reverse=True) and macs[-1] > 0  # less and less model after later cuts
    module = rows[len(rows) // 2][2]
    assert main(["split", "t", "--cut", module, "--out", str(root / "split"), "--zoo-dir", zoo_dir]) == 0
    assert json.loads((root / "split" / "pieces.json").read_text())["module"] == module
    first, last = rows[1][1], rows[-2][1]
    assert main(["extract", "t", "--from", first, "--to", last, "--out", str(root / "ext"), "--zoo-dir", zoo_dir]) == 0
    spec = json.loads((root / "ext" / "pieces.json").read_text())
    assert (spec["from"], spec["to"]) == (first, last) and spec["check"]["onnx_max_abs"] <= 1e-5
    # bad requests: one line, exit 2, nothing written
    assert main(["split", "t", "--cut", "block9", "--out", str(root / "bad"), "--zoo-dir", zoo_dir]) == 2
    assert main(["extract", "t", "--from", last, "--to", first, "--out", str(root / "bad"), "--zoo-dir", zoo_dir]) == 2
    err = capsys.readouterr().err
    assert "neither a cut point nor a module" in err and "must come before" in err and "Traceback" not in err
    assert not (root / "bad").exists()


def _import(zoo_dir: str, name: str, arch: str, weights, classes: str) -> int:
    """`pnc zoo import NAME --arch ARCH --weights FILE --dataset digits --classes SPEC`."""
    argv = ["zoo", "import", name, "--arch", arch, "--weights", str(weights), "--dataset", "digits"]
    return main([*argv, "--classes", classes, "--zoo-dir", zoo_dir])


def test_zoo_import_of_a_timm_model_makes_it_clonable_and_export_round_trips(zoo, capsys):
    root, zoo_dir = zoo
    splits = load_dataset("digits")
    torch.manual_seed(3)
    timm_model = archs.create("resnet10t", in_chans=1, num_classes=5)
    fit(timm_model, select_classes(splits.train, list(range(5, 10))), epochs=4, lr=0.05, seed=3, progress=False)
    weights = root / "resnet10t.safetensors"
    save_file({k: v.contiguous() for k, v in timm_model.state_dict().items()}, str(weights))
    assert _import(zoo_dir, "r10", "resnet10t", str(weights), "5-9") == 0
    capsys.readouterr()
    card = json.loads((root / "zoo" / "r10" / "card.json").read_text())
    assert card["arch"] == "resnet10t" and card["classes"] == [5, 6, 7, 8, 9] and card["test_accuracy"] > 0.5
    assert (
        main(
            [
                "clone",
                "--target",
                "t",
                "--source",
                "r10",
                "--classes",
                "7",
                "--out",
                str(root / "c"),
                "--zoo-dir",
                zoo_dir,
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["tar_acc"] > 0.5 and report["ori_acc"] > 0.5

    # the same weights as a .pt state dict load with weights_only=True; a pickled object is refused
    torch.save(timm_model.state_dict(), root / "r10.pt")
    assert _import(zoo_dir, "r10pt", "resnet10t", str(root / "r10.pt"), "5-9") == 0
    torch.save({"model": timm_model}, root / "whole.pt")  # a pickled nn.Module, not a state dict
    assert _import(zoo_dir, "bad", "resnet10t", str(root / "whole.pt"), "5-9") == 2
    assert _import(zoo_dir, "bad", "cnn4", str(weights), "5-9") == 2  # other architecture: strict load fails
    assert _import(zoo_dir, "r10", "resnet10t", str(weights), "5-9") == 2  # the name is taken
    err = capsys.readouterr().err
    assert "never unpickles" in err and "does not fit cnn4" in err and "--force" in err
    assert not (root / "zoo" / "bad").exists()

    exported = root / "r10-export.safetensors"
    assert main(["zoo", "export", "r10", "--out", str(exported), "--zoo-dir", zoo_dir]) == 0
    capsys.readouterr()
    assert main(["cuts", str(exported), "--blocks", "--json"]) == 0  # a self-describing checkpoint is a MODEL
    doc = json.loads(capsys.readouterr().out)
    assert doc["input_size"] == [1, 8, 8] and doc["verified"]
