"""`pnc prune`: class-local structural pruning after a cut (pnc.surgery.localization, pnc.bench.cli.prune).

On the digits cnn4 source (classes 5-9, trained in about a second), short mask training."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
import torch

from pnc.bench import cli
from pnc.bench.cli.prune import load_pruned, measure, run_prune
from pnc.surgery.cuts import cut_points, find_cut
from pnc.surgery.localization import LocalizeConfig, relative_squared_error
from pnc.surgery.onnx_export import run
from pnc.surgery.splitting import extract
from pnc.zoo.datasets import load_dataset
from pnc.zoo.defaults import ensure_default
from pnc.zoo.store import ZooStore
from pnc.zoo.tasks import select_classes

MODEL = "digits-cnn4-source"
FAST = ["--steps", "60", "--fraction", "0.5"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ZooStore:
    store = ZooStore(tmp_path_factory.mktemp("zoo"))
    ensure_default(store, MODEL, progress=False)
    return store


@pytest.mark.parametrize("classes, names", [("5", ["5"]), ("7,9", ["7", "9"])])
def test_prune_through_the_cli(tmp_path, store, capsys, classes, names):
    out = tmp_path / "pruned"
    argv = [
        "prune",
        MODEL,
        "--from",
        "block2.3",
        "--classes",
        classes,
        "--keep",
        "0.5",
        "--out",
        str(out),
        "--zoo-dir",
        str(store.root),
        "--json",
        "--device",
        "cpu",
        *FAST,
    ]
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in out.iterdir()) == ["prune.json", "suffix.onnx", "suffix.safetensors"]
    assert json.loads((out / "prune.json").read_text()) == report
    assert report["cut"] == "block2_3" and report["class_names"] == names  # the module name resolved
    assert report["settings"]["device"] == "cpu"
    assert report["classes"] == [int(c) for c in classes.split(",")]
    for group in report["groups"].values():
        kept = group["kept"]
        assert len(kept) == math.ceil(0.5 * group["size"]) and kept == sorted(set(kept)) and kept[-1] < group["size"]
    s = report["suffix"]
    assert s["macs_after"] <= 0.5 * s["macs_before"] and s["params_after"] < 0.5 * s["params_before"]
    unpruned, pruned = report["unpruned"], report["pruned"]
    assert unpruned["accuracy"] >= 0.97 and pruned["accuracy"] >= unpruned["accuracy"] - 0.02
    assert pruned["auroc"] > 0.95 and 0 < pruned["logit_rel_error"] < 0.5

    # the files: rebuilt suffix == saved weights == ONNX, after the unchanged prefix
    suffix, traced, spec = load_pruned(out, store)
    assert spec == report
    digits = load_dataset("digits")
    test = select_classes(digits.test, report["classes"])
    with torch.no_grad():
        cut = extract(traced, None, [report["cut"]])(test.x)
        logits = suffix(cut)
    proto = onnx.load(out / "suffix.onnx")
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["cut"]
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[1:]] == report["cut_shape"]
    np.testing.assert_allclose(run(proto, cut)["logits"], logits.numpy(), rtol=1e-4, atol=1e-5)
    among = logits[:, report["outputs"]].argmax(1)
    assert float((among == test.y).float().mean()) == pytest.approx(pruned["accuracy"])


def test_g_guided_masks_keep_the_classes_logits_better_than_random_ones(tmp_path, store):
    spec = "6,8"
    guided = run_prune(
        store, MODEL, "block1_2", spec, tmp_path / "g", fraction=0.5, config=LocalizeConfig(steps=60), progress=False
    )
    gen = torch.Generator().manual_seed(0)
    errors = []
    for i in range(3):
        random_keep = {
            n: torch.randperm(g["size"], generator=gen)[: len(g["kept"])].sort().values
            for n, g in guided["groups"].items()
        }
        rand = run_prune(
            store, MODEL, "block1_2", spec, tmp_path / f"r{i}", fraction=0.5, progress=False, keep_override=random_keep
        )
        assert rand["suffix"] == guided["suffix"]  # same shapes: same MACs and params
        assert {n: g["size"] for n, g in rand["groups"].items()} == {n: g["size"] for n, g in guided["groups"].items()}
        errors.append(rand["pruned"]["logit_rel_error"])
    assert guided["pruned"]["logit_rel_error"] < min(errors)


def test_prune_refuses_bad_requests(tmp_path, store, capsys):
    out = tmp_path / "out"
    base = ["prune", MODEL, "--out", str(out), "--zoo-dir", str(store.root), *FAST]
    assert cli.main([*base, "--from", "block2_3", "--classes", "3"]) == 2
    assert "classes [3] are not outputs of digits-cnn4-source (it predicts 5 5, 6 6" in capsys.readouterr().err
    assert cli.main([*base, "--from", "nope", "--classes", "5"]) == 2
    assert (
        "'nope' is neither a cut point nor a module holding one; the block cuts are block1_2, block2_3"
        in capsys.readouterr().err
    )
    model, card = store.load(MODEL)
    from pnc.surgery.tracing import trace

    last = find_cut(
        cut_points(trace(model, torch.zeros(2, *card.input_size)), verify=False), "pool.1"
    )  # only the classifier follows
    assert cli.main([*base, "--from", last.node, "--classes", "5"]) == 2
    assert "nothing to prune after" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # a share out of range is refused while parsing
        cli.main([*base, "--from", "block2_3", "--classes", "5", "--fraction", "2"])
    assert exit_.value.code == 2
    assert not out.exists()


def test_measure_and_loss_on_known_values():
    assert float(relative_squared_error(torch.ones(2, 3), torch.ones(2, 3))) == 0.0
    assert float(relative_squared_error(torch.zeros(2, 3), torch.ones(2, 3))) == 1.0
    from pnc.zoo.datasets import ImageData

    # a "suffix" whose logit 1 is the label: accuracy 1, AUROC 1; logit 0 constant: AUROC 0.5
    x = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1)
    y = torch.tensor([0, 1, 0, 1, 2, 2])
    data = ImageData(x, y)

    def suffix(v):
        idx = v.view(-1).long()
        return torch.stack([torch.zeros(len(idx)), (y[idx] == 1).float(), (y[idx] == 2).float() * 2], 1)

    m = measure(suffix, torch.nn.Identity(), data, [1, 2])
    assert m["accuracy"] == 1.0 and m["auroc"] == 1.0 and m["test_images"] == 4
    assert measure(suffix, torch.nn.Identity(), data, [0, 1])["auroc"] == pytest.approx((0.5 + 1.0) / 2)
