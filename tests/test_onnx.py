"""ONNX export with detachable branches, detach, parity and errors (pnc.surgery.onnx_*).

Models are untrained but seeded (export correctness does not need accuracy); clones use
a one-candidate, one-step search on the digits clone set.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from pnc.bench import cli
from pnc.surgery.cloned import ClonedNetwork
from pnc.surgery.cloning import clone
from pnc.surgery.errors import BranchError, ExportError
from pnc.surgery.insertion import SearchConfig
from pnc.surgery.io import file_sha256
from pnc.surgery.onnx_detach import branch_names, detach_model, detach_onnx
from pnc.surgery.onnx_export import LOGITS, branch_body, export_onnx, locate_tensors, run, session, to_onnx
from pnc.surgery.onnx_merge import CLONED_OUTPUT, read_manifest
from pnc.surgery.onnx_tidy import KINDS, redundancies, tidy
from pnc.surgery.patch import save_patch
from pnc.zoo.archs import create
from pnc.zoo.datasets import load_dataset
from pnc.zoo.store import ModelCard, ZooStore
from pnc.zoo.tasks import CloneTask

VIT = dict(img_size=8, patch_size=2, depth=2)  # vit_tiny_patch16_224 at the digits' 8x8
RESNET = dict(width=8)  # resnetc20, half width


def _model(arch: str, seed: int, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create(arch, in_chans=1, num_classes=5, **kwargs).eval()


def _config(cut: str) -> SearchConfig:
    return SearchConfig(loc_epochs=1, joint_epochs=1, binary_epochs=1, min_steps_per_epoch=1, candidates=[cut])


def _parity(model: onnx.ModelProto, torch_fn, x: torch.Tensor, output: str) -> None:
    with torch.no_grad():
        expected = torch_fn(x).numpy()
    np.testing.assert_allclose(run(model, x, [output])[output], expected, rtol=1e-3, atol=1e-5)


@pytest.fixture(scope="module")
def task() -> CloneTask:
    digits = load_dataset("digits")
    digits = dataclasses.replace(digits, test=digits.test.subset(torch.arange(0, len(digits.test), 4)))
    return CloneTask(
        digits,
        target_classes=list(range(5)),
        source_classes=list(range(5, 10)),
        clone_classes="S",
        fraction=0.3,
        seed=0,
    )


@pytest.fixture(scope="module")
def images(task) -> dict[str, torch.Tensor]:
    real = task.eval_sets()["avg"].x[:96]
    return {"real": real, "random": torch.randn(16, *real.shape[1:], generator=torch.Generator().manual_seed(5))}


@pytest.fixture(scope="module")
def multi(task) -> ClonedNetwork:
    """cnn4 target with three branches: cnn4 (same arch), resnetc20 (residual), ViT-tiny (tokens)."""
    target = _model("cnn4", 1)
    net = clone(
        target,
        _model("cnn4", 2),
        **task.clone_inputs(),
        config=_config("first"),
        name="cnn",
        num_masks=10,
        progress=False,
    )
    clone(
        target,
        _model("resnetc20", 3, **RESNET),
        **task.clone_inputs(),
        config=_config("block3_2"),
        into=net,
        name="res",
        num_masks=10,
        progress=False,
    )
    clone(
        target,
        _model("vit_tiny_patch16_224", 4, **VIT),
        **task.clone_inputs(),
        config=_config("first"),
        into=net,
        name="vit",
        num_masks=10,
        progress=False,
    )
    return net


@pytest.fixture(scope="module")
def multi_onnx(multi, images) -> onnx.ModelProto:
    return to_onnx(multi, images["real"][:1])


def _save_to_zoo(root, name: str, model: torch.nn.Module, arch: str, **kwargs) -> ZooStore:
    store = ZooStore(root)
    card = ModelCard(
        name=name,
        arch=arch,
        kwargs={"in_chans": 1, "num_classes": 5, **kwargs},
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


# ------------------------------------------------------------------ plain export


def test_plain_export_is_deterministic_and_matches_torch(tmp_path, images):
    model = _model("cnn4", 1)
    a = export_onnx(model, tmp_path / "a.onnx", torch.zeros(1, 1, 8, 8))
    b = export_onnx(model, tmp_path / "b.onnx", images["random"][:3])  # other values, other batch
    assert a.read_bytes() == b.read_bytes()
    proto = onnx.load(a)
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["input"] and [o.name for o in proto.graph.output] == [LOGITS]
    assert proto.opset_import[0].version == 17 and not proto.metadata_props
    for x in images.values():
        _parity(proto, model, x, LOGITS)
    _parity(proto, model, images["real"][:1], LOGITS)  # the batch axis is dynamic


# ------------------------------------------------------------------ clone export


def test_clone_export_parity_and_structure(multi, multi_onnx, images):
    onnx.checker.check_model(multi_onnx, full_check=True)
    assert [o.name for o in multi_onnx.graph.output] == [LOGITS, CLONED_OUTPUT]
    manifest = read_manifest(multi_onnx)
    assert [b["name"] for b in manifest["branches"]] == ["cnn", "res", "vit"] == branch_names(multi_onnx)
    assert manifest["classes"] == multi.classes
    produced = {x for n in multi_onnx.graph.node for x in n.output}
    for b in manifest["branches"]:
        assert b["info"]["target_cut"] == multi.branches[b["name"]].target_cut
        assert b["info"]["cut_tensor"] in produced and not b["info"]["cut_tensor"].startswith(b["name"] + "/")
        assert all(n.startswith(b["name"] + "/") for n in b["nodes"] + b["initializers"])
    for x in images.values():
        _parity(multi_onnx, multi, x, CLONED_OUTPUT)
        _parity(multi_onnx, multi.target, x, LOGITS)
    base = to_onnx(multi.target, images["real"][:1])
    assert (
        run(multi_onnx, images["real"], [LOGITS])[LOGITS].tobytes()
        == run(base, images["real"], [LOGITS])[LOGITS].tobytes()
    )


def test_transferable_module_is_exported_pruned(multi, multi_onnx):
    """The cnn branch's source layers after R' are the structurally pruned ones."""
    graph = multi_onnx.graph
    inits = {t.name: tuple(t.dims) for t in graph.initializer}
    onnx_convs = {inits[n.input[1]] for n in graph.node if n.op_type == "Conv" and n.name.startswith("cnn/")}
    source = _model("cnn4", 2)
    pruned = 0
    for name, conv in multi.branches["cnn"].body.body.named_modules():
        if isinstance(conv, torch.nn.Conv2d):
            assert tuple(conv.weight.shape) in onnx_convs
            pruned += conv.weight.shape != source.get_submodule(name).weight.shape
    assert pruned > 0


def test_clone_export_is_deterministic(multi, multi_onnx, images):
    assert to_onnx(multi, images["random"][:2]).SerializeToString() == multi_onnx.SerializeToString()


def _scope(branch: str):
    return lambda name: name.startswith(branch + "/")


def test_merged_graph_has_no_redundant_nodes(multi, multi_onnx, images):
    """Each branch adds its tidied body and a head of one Concat and one Gemm, nothing else:
    no Identity, Constant, duplicated, dead or chained-reshape node, no unused or duplicated
    initializer, and the target's pre-logits are read once by its head and once per branch."""
    graph, manifest = multi_onnx.graph, read_manifest(multi_onnx)
    base = to_onnx(multi.target, images["real"][:1])
    bodies = sum(len(b["nodes"]) for b in manifest["branches"])
    assert len(graph.node) == len(base.graph.node) + bodies + 2 * len(manifest["branches"])
    for b in manifest["branches"]:
        assert redundancies(graph, _scope(b["name"])) == {k: [] for k in KINDS}
        head = [n for n in graph.node if n.name in (b["head"]["concat"], b["head"]["gemm"])]
        assert [n.op_type for n in head] == ["Concat", "Gemm"]
    pre = manifest["branches"][0]["info"]["prelogits_tensor"]
    readers = [n.op_type for n in graph.node if pre in n.input]
    assert readers == ["Gemm"] + ["Concat"] * len(manifest["branches"])
    assert [n.name for n in graph.node if CLONED_OUTPUT in n.output] == [manifest["branches"][-1]["head"]["gemm"]]


def test_tidy_removes_what_the_exporter_leaves(multi, images):
    """The ViT branch body as TorchScript exports it has Constant nodes and repeated shape
    computations (and Identity aliases of shared weights); tidied, none, with the same values."""
    branch = multi.branches["vit"]
    names, taps = multi.taps()
    with torch.no_grad():
        cut = dict(zip(names, taps(images["random"])))[branch.target_cut]
    raw = branch_body(branch, cut, clean=False)
    found = redundancies(raw.graph)
    assert found["constant"] and found["duplicate"]  # Identity aliases too, when weights are shared
    tidied = branch_body(branch, cut)
    assert redundancies(tidied.graph) == {k: [] for k in KINDS}
    assert len(tidied.graph.node) < len(raw.graph.node) - len(found["identity"])
    feeds = {"cut": cut.numpy()}
    np.testing.assert_allclose(session(tidied).run(None, feeds)[0], session(raw).run(None, feeds)[0], rtol=0, atol=1e-6)
    assert tidy(raw).SerializeToString() == tidied.SerializeToString()  # deterministic


def test_edited_head_is_refused(multi_onnx):
    """The head weights hold an identity block that detaching checks, bit for bit."""
    tampered = onnx.ModelProto()
    tampered.CopyFrom(multi_onnx)
    name = read_manifest(multi_onnx)["branches"][1]["head"]["weight"]
    init = next(t for t in tampered.graph.initializer if t.name == name)
    weight = onnx.numpy_helper.to_array(init).copy()
    weight[0, 1] = 1e-3  # outside the branch's own weights
    init.CopyFrom(onnx.numpy_helper.from_array(weight, name))
    with pytest.raises(ExportError, match="branch 'res': its head weights are not of the form"):
        detach_model(tampered, ["cnn"])


def test_export_bytes_do_not_depend_on_the_hash_seed(tmp_path):
    """The tidy pass (onnxscript) must not carry set or hash order into the file: two
    processes with different PYTHONHASHSEED write the same bytes (attach == export relies on it)."""
    script = (
        "import sys, torch; torch.set_num_threads(1)\n"
        "from pnc.surgery.examples import tiny_clone\n"
        "from pnc.surgery.onnx_export import export_onnx\n"
        "net, _, _, images = tiny_clone()\n"
        "export_onnx(net, sys.argv[1], images[:1])\n"
    )
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-c", script, str(tmp_path / f"{seed}.onnx")], env=env, check=True)
    assert (tmp_path / "1.onnx").read_bytes() == (tmp_path / "2.onnx").read_bytes()


# ------------------------------------------------------------------ detach


def test_detach_all_is_byte_identical_to_target_export(tmp_path, multi, multi_onnx):
    store = _save_to_zoo(tmp_path / "zoo", "digits-t", multi.target, "cnn4")
    base = tmp_path / "target.onnx"
    assert cli.main(["export", "digits-t", "--zoo-dir", str(store.root), "--out", str(base)]) == 0
    clone_path = tmp_path / "clone.onnx"
    clone_path.write_bytes(multi_onnx.SerializeToString())
    detached = tmp_path / "detached.onnx"
    assert cli.main(["detach", str(clone_path), "--all", "--out", str(detached)]) == 0
    assert file_sha256(detached) == file_sha256(base) == read_manifest(multi_onnx)["base_sha256"]
    assert file_sha256(clone_path) != file_sha256(base)


def test_partial_detach_equals_export_of_the_smaller_clone(tmp_path, multi, multi_onnx, images):
    for drop in (["res"], ["cnn", "vit"]):
        smaller = ClonedNetwork(multi.target, images["real"][:2], multi.target_classes, traced=multi.traced)
        for name, branch in multi.branches.items():
            if name not in drop:
                smaller.add_branch(name, branch)
        src, out = tmp_path / "clone.onnx", tmp_path / f"without-{'-'.join(drop)}.onnx"
        src.write_bytes(multi_onnx.SerializeToString())
        assert cli.main(["detach", str(src), *(a for d in drop for a in ("--branch", d)), "--out", str(out)]) == 0
        proto = onnx.load(out)
        onnx.checker.check_model(proto, full_check=True)
        assert branch_names(proto) == list(smaller.branches)
        assert out.read_bytes() == to_onnx(smaller, images["real"][:1]).SerializeToString()
        for x in images.values():
            _parity(proto, smaller, x, CLONED_OUTPUT)
            assert run(proto, x, [LOGITS])[LOGITS].tobytes() == run(multi_onnx, x, [LOGITS])[LOGITS].tobytes()
    # detaching in steps ends at the target, byte for byte
    step = detach_model(detach_model(multi_onnx, ["vit"]), ["cnn", "res"])
    assert step.SerializeToString() == to_onnx(multi.target, images["real"][:1]).SerializeToString()


def test_export_of_a_patch_equals_export_of_the_network(tmp_path, task, images):
    """`pnc export clone.pnc` rebuilds the clone from the zoo and writes the same bytes."""
    target, source = _model("cnn4", 1), _model("cnn4", 2)
    store = _save_to_zoo(tmp_path / "zoo", "t", target, "cnn4")
    _save_to_zoo(tmp_path / "zoo", "s", source, "cnn4")
    net = clone(
        target, source, **task.clone_inputs(), config=_config("block2_3"), source_name="s", num_masks=10, progress=False
    )
    save_patch(net, tmp_path / "clone.pnc", target_name="t", input_size=(1, 8, 8))
    out = tmp_path / "clone.onnx"
    assert cli.main(["export", str(tmp_path / "clone.pnc"), "--zoo-dir", str(store.root), "--out", str(out)]) == 0
    assert out.read_bytes() == to_onnx(net, torch.zeros(1, 1, 8, 8)).SerializeToString()
    assert branch_names(out) == ["s"]


# ------------------------------------------------------------------ other pairs


@pytest.mark.parametrize(
    "target_arch, target_kw, source_arch, source_kw, cut",
    [
        ("resnetc20", RESNET, "resnetc20", RESNET, "last"),  # residual pair
        ("vit_tiny_patch16_224", VIT, "cnn4", {}, "last"),  # ViT target, CNN source
    ],
)
def test_round_trip(tmp_path, task, images, target_arch, target_kw, source_arch, source_kw, cut):
    target = _model(target_arch, 1, **target_kw)
    net = clone(
        target,
        _model(source_arch, 2, **source_kw),
        **task.clone_inputs(),
        config=_config(cut),
        name="b",
        num_masks=10,
        progress=False,
    )
    path = export_onnx(net, tmp_path / "clone.onnx", images["real"][:1])
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    for x in images.values():
        _parity(proto, net, x, CLONED_OUTPUT)
    base = export_onnx(target, tmp_path / "target.onnx", images["real"][:1])
    detached = detach_onnx(path, ["b"], tmp_path / "detached.onnx")
    assert file_sha256(detached) == file_sha256(base)


# ------------------------------------------------------------------ errors


def _no_output(tmp_path) -> None:
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]  # no result, no temp file left


def test_unknown_branch_is_refused(tmp_path, multi_onnx, capsys):
    src = tmp_path / "in.onnx"
    src.write_bytes(multi_onnx.SerializeToString())
    with pytest.raises(BranchError, match="no branch named 'nope'.*cnn, res, vit"):
        detach_onnx(src, ["cnn", "nope"], tmp_path / "out.onnx")
    assert cli.main(["detach", str(src), "--branch", "nope", "--out", str(tmp_path / "out.onnx")]) == 2
    assert "no branch named 'nope'" in capsys.readouterr().err
    _no_output(tmp_path)


def test_file_without_manifest_is_refused(tmp_path, capsys):
    src = export_onnx(_model("cnn4", 1), tmp_path / "in.onnx", torch.zeros(1, 1, 8, 8))
    with pytest.raises(ExportError, match="not a pnc clone export"):
        detach_onnx(src, None, tmp_path / "out.onnx")
    assert cli.main(["detach", str(src), "--all", "--out", str(tmp_path / "out.onnx")]) == 2
    assert "no detach manifest" in capsys.readouterr().err
    _no_output(tmp_path)


def test_modified_base_is_refused(tmp_path, multi_onnx, capsys):
    tampered = onnx.ModelProto()
    tampered.CopyFrom(multi_onnx)
    head = next(t for t in tampered.graph.initializer if t.name == "head.weight")
    weights = onnx.numpy_helper.to_array(head).copy()
    weights[0, 0] += 1.0
    head.CopyFrom(onnx.numpy_helper.from_array(weights, "head.weight"))
    src = tmp_path / "in.onnx"
    src.write_bytes(tampered.SerializeToString())
    for branches in (None, ["res"]):
        with pytest.raises(ExportError, match="base graph has sha256 .* but the manifest says"):
            detach_onnx(src, branches, tmp_path / "out.onnx")
    assert cli.main(["detach", str(src), "--all", "--out", str(tmp_path / "out.onnx")]) == 2
    assert "modified after export" in capsys.readouterr().err
    _no_output(tmp_path)


def test_unmatched_tensor_is_an_export_error(multi, multi_onnx, images):
    base = to_onnx(multi.target, images["real"][:1])
    probe = images["random"][:2]
    cuts, taps = multi.taps()
    with torch.no_grad():
        value = taps(probe)[0]
    assert locate_tensors(base, probe, {cuts[0]: value}) == {
        cuts[0]: read_manifest(multi_onnx)["branches"][
            [multi.branches[b].target_cut for b in multi.branches].index(cuts[0])
        ]["info"]["cut_tensor"]
    }
    with pytest.raises(ExportError, match="no tensor of the exported graph matches fx node 'fake'"):
        locate_tensors(base, probe, {"fake": value + 0.5})
