"""Standalone branch files and `pnc attach` (pnc.surgery.onnx_attach): the identities
attach(target, branch) == export(clone) and detach(attach(target, branch)) == target, byte
for byte, on the digits cnn4 pair and on a LeNet-5 target with a ResNetC-20 source.

Models are untrained but seeded; clones use a one-candidate, one-step search."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest
import torch

from pnc.bench import cli
from pnc.surgery.cloning import clone
from pnc.surgery.errors import BranchError, ExportError
from pnc.surgery.insertion import SearchConfig
from pnc.surgery.io import file_sha256
from pnc.surgery.onnx_attach import BRANCH_KEY, attach_model, attach_onnx, branch_model
from pnc.surgery.onnx_detach import branch_names, detach_model
from pnc.surgery.onnx_export import LOGITS, session, to_onnx
from pnc.surgery.onnx_merge import CLONED_OUTPUT, read_manifest, sha256
from pnc.surgery.patch import save_patch
from pnc.zoo.archs import create
from pnc.zoo.datasets import load_dataset
from pnc.zoo.store import ModelCard, ZooStore
from pnc.zoo.tasks import CloneTask

X1 = torch.zeros(1, 1, 8, 8)


def _model(arch: str, seed: int, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create(arch, in_chans=1, num_classes=5, **kwargs).eval()


def _clone(target, source, task, cut, name, into=None):
    config = SearchConfig(loc_epochs=1, joint_epochs=1, binary_epochs=1, min_steps_per_epoch=1, candidates=[cut])
    return clone(
        target,
        source,
        **task.clone_inputs(),
        config=config,
        into=into,
        name=name,
        source_name=name,
        num_masks=10,
        progress=False,
    )


@pytest.fixture(scope="module")
def task() -> CloneTask:
    digits = load_dataset("digits")
    digits = dataclasses.replace(digits, test=digits.test.subset(torch.arange(0, len(digits.test), 4)))
    return CloneTask(digits, list(range(5)), list(range(5, 10)), clone_classes="S", fraction=0.3, seed=0)


@pytest.fixture(scope="module")
def digits(task):
    """cnn4 target with two cnn4 branches 'a' and 'b', their zoo and patch."""
    target, a, b = _model("cnn4", 1), _model("cnn4", 2), _model("cnn4", 3)
    net = _clone(target, a, task, "block2_3", "a")
    _clone(target, b, task, "first", "b", into=net)
    return net, {"t": (target, "cnn4"), "a": (a, "cnn4"), "b": (b, "cnn4")}


def _zoo(root, models) -> ZooStore:
    store = ZooStore(root)
    for name, (model, arch) in models.items():
        card = ModelCard(
            name=name,
            arch=arch,
            kwargs={"in_chans": 1, "num_classes": 5},
            dataset="digits",
            classes=list(range(5)),
            class_names=[str(i) for i in range(5)],
            mean=(0.0,),
            std=(1.0,),
            input_size=(1, 8, 8),
            test_accuracy=0.0,
        )
        store.save(name, model, card)
    return store


def _intermediates(base: onnx.ModelProto, names: list[str], x: torch.Tensor) -> dict[str, np.ndarray]:
    probing = onnx.ModelProto()
    probing.CopyFrom(base)
    del probing.graph.output[:]
    probing.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    sess = session(probing, optimize=False)
    return dict(zip(names, sess.run(names, {"input": x.numpy()})))


def test_branch_only_and_attach_through_the_cli(tmp_path, digits, task, capsys):
    net, models = digits
    single = _clone(models["t"][0], models["a"][0], task, "block2_3", "a")
    store = _zoo(tmp_path / "zoo", models)
    save_patch(single, tmp_path / "clone.pnc", target_name="t", input_size=(1, 8, 8))
    z = ["--zoo-dir", str(store.root)]
    files = {k: tmp_path / f"{k}.onnx" for k in ("target", "branch", "clone", "attached", "detached")}
    assert cli.main(["export", "t", *z, "--out", str(files["target"])]) == 0
    assert cli.main(["export", str(tmp_path / "clone.pnc"), *z, "--out", str(files["clone"])]) == 0
    assert cli.main(["export", str(tmp_path / "clone.pnc"), *z, "--branch-only", "--out", str(files["branch"])]) == 0
    assert "attach it with `pnc attach" in capsys.readouterr().out

    branch = onnx.load(files["branch"])
    onnx.checker.check_model(branch, full_check=True)
    entry = read_manifest(onnx.load(files["clone"]))["branches"][0]
    meta = json.loads(next(p.value for p in branch.metadata_props if p.key == BRANCH_KEY))
    assert meta["base_sha256"] == file_sha256(files["target"]) and meta["branch"] == entry
    assert meta["target_classes"] == ["0", "1", "2", "3", "4"]
    ins = [i.name for i in branch.graph.input]
    assert ins == [entry["info"]["cut_tensor"], entry["info"]["prelogits_tensor"]]
    assert [o.name for o in branch.graph.output] == ["a/correction", "a/logits"]
    size = files["branch"].stat().st_size  # the branch alone: the clone export minus the target
    assert size < files["clone"].stat().st_size - 0.9 * files["target"].stat().st_size
    # the branch runs alone in onnxruntime on the target's tensors and gives the clone's logits
    x = task.eval_sets()["avg"].x[:32]
    target_onnx = onnx.load(files["target"])
    feeds = _intermediates(target_onnx, ins, x)
    correction, new = session(branch).run(None, feeds)
    with torch.no_grad():
        expected = single(x).numpy()
    got = np.concatenate([_intermediates(target_onnx, [LOGITS], x)[LOGITS] + correction, new], 1)
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-5)

    assert cli.main(["attach", str(files["target"]), str(files["branch"]), "--out", str(files["attached"])]) == 0
    assert files["attached"].read_bytes() == files["clone"].read_bytes()
    assert cli.main(["detach", str(files["attached"]), "--all", "--out", str(files["detached"])]) == 0
    assert files["detached"].read_bytes() == files["target"].read_bytes()

    wrong = tmp_path / "wrong.onnx"
    assert cli.main(["export", "t", *z, "--branch-only", "--out", str(wrong)]) == 2
    assert "not a clone, so it has no branch to ship" in capsys.readouterr().err
    assert cli.main(["export", str(tmp_path / "clone.pnc"), *z, "--branch", "a", "--out", str(wrong)]) == 2
    assert "add --branch-only" in capsys.readouterr().err
    assert cli.main(["attach", str(files["branch"]), str(files["branch"]), "--out", str(wrong)]) == 2
    assert "is a branch file, not a target export" in capsys.readouterr().err
    assert not wrong.exists()


def test_attach_adds_to_existing_branches(tmp_path, digits):
    net, _ = digits
    merged = to_onnx(net, X1)
    target = detach_model(merged)
    a, b = branch_model(merged, "a"), branch_model(merged, "b")
    assert attach_model(target, [a, b]).SerializeToString() == merged.SerializeToString()
    only_a = attach_model(target, [a])
    assert only_a.SerializeToString() == detach_model(merged, ["b"]).SerializeToString()
    assert attach_model(only_a, [b]).SerializeToString() == merged.SerializeToString()  # adds after 'a'
    assert detach_model(attach_model(target, [b])).SerializeToString() == target.SerializeToString()
    with pytest.raises(BranchError, match="already has a branch named 'a'.*detach it first"):
        attach_model(only_a, [a])
    with pytest.raises(BranchError, match="2 branches \\(a, b\\); name the one"):
        branch_model(merged)
    with pytest.raises(ExportError, match="not a pnc branch file.*clone export"):
        attach_model(target, [merged])


def test_branch_for_another_target_is_refused(tmp_path, digits, task, capsys):
    net, _ = digits
    other = _clone(_model("cnn4", 7), _model("cnn4", 2), task, "block2_3", "z")
    stranger = branch_model(to_onnx(other, X1))
    target = detach_model(to_onnx(net, X1))
    (tmp_path / "target.onnx").write_bytes(target.SerializeToString())
    (tmp_path / "z.onnx").write_bytes(stranger.SerializeToString())
    want, have = read_manifest(to_onnx(other, X1))["base_sha256"], sha256(target)
    with pytest.raises(ExportError, match=f"sha256 {want}, but this target's export has sha256 {have}"):
        attach_onnx(tmp_path / "target.onnx", [tmp_path / "z.onnx"], tmp_path / "out.onnx")
    assert (
        cli.main(
            ["attach", str(tmp_path / "target.onnx"), str(tmp_path / "z.onnx"), "--out", str(tmp_path / "out.onnx")]
        )
        == 2
    )
    assert have in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target.onnx", "z.onnx"]  # nothing written


def test_identities_on_lenet5_target_with_resnetc20_source(tmp_path, task):
    target = _model("lenet5", 1, img_size=8)
    net = _clone(target, _model("resnetc20", 2, width=8), task, "block2_2", "res")
    _clone(target, _model("cnn4", 3), task, "first", "cnn", into=net)
    merged = to_onnx(net, X1)
    target_onnx = to_onnx(target, X1)
    files = [tmp_path / f"{n}.onnx" for n in branch_names(merged)]
    for name, path in zip(branch_names(merged), files):
        path.write_bytes(branch_model(merged, name).SerializeToString())
    out = attach_onnx(target_onnx, files, tmp_path / "clone.onnx")
    assert out.read_bytes() == merged.SerializeToString()
    assert detach_model(onnx.load(out)).SerializeToString() == target_onnx.SerializeToString()
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    sess = session(onnx.load(out))
    with torch.no_grad():
        np.testing.assert_allclose(
            sess.run([CLONED_OUTPUT], {"input": x.numpy()})[0], net(x).numpy(), rtol=1e-3, atol=1e-5
        )


def test_attach_and_detach_run_without_torch(tmp_path, digits):
    """On the device: a Python with onnx but no torch attaches and detaches."""
    import subprocess
    import sys

    net, _ = digits
    merged = to_onnx(net, X1)
    (tmp_path / "t.onnx").write_bytes(detach_model(merged).SerializeToString())
    for name in ("a", "b"):
        (tmp_path / f"{name}.onnx").write_bytes(branch_model(merged, name).SerializeToString())
    script = (
        "import sys; sys.modules['torch'] = None\n"  # any import of torch now fails
        "from pnc.surgery.onnx_attach import attach_onnx\n"
        "from pnc.surgery.onnx_detach import detach_onnx\n"
        "attach_onnx('t.onnx', ['a.onnx', 'b.onnx'], 'clone.onnx')\n"
        "detach_onnx('clone.onnx', None, 'back.onnx')\n"
        "assert not [m for m in sys.modules if m.startswith(('torch.', 'pnc.zoo'))]\n"
    )
    subprocess.run([sys.executable, "-c", script], cwd=tmp_path, check=True)
    assert (tmp_path / "clone.onnx").read_bytes() == merged.SerializeToString()
    assert (tmp_path / "back.onnx").read_bytes() == (tmp_path / "t.onnx").read_bytes()
