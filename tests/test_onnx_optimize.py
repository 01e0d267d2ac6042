"""`pnc export --optimize LEVEL` (pnc.surgery.onnx_optimize): onnxruntime's graph
optimizations applied offline; same outputs, fewer nodes, refused by detach and attach.

Uses the session's tiny digits zoo and clone run (tests/conftest.py)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from pnc.bench import cli
from pnc.surgery.errors import ExportError
from pnc.surgery.onnx_attach import attach_model, branch_model
from pnc.surgery.onnx_detach import detach_model
from pnc.surgery.onnx_export import session
from pnc.surgery.onnx_merge import CLONED_OUTPUT, MANIFEST_KEY, OPTIMIZED_KEY, sha256
from pnc.surgery.onnx_optimize import LEVELS, optimize_onnx


@pytest.fixture(scope="module")
def exports(tiny_zoo, tiny_run, tmp_path_factory):
    """{"plain": the clone's export, LEVEL: the same written with --optimize LEVEL}, as files."""
    root = tmp_path_factory.mktemp("optimize")
    files = {"plain": root / "clone.onnx", **{level: root / f"clone.{level}.onnx" for level in LEVELS}}
    zoo = ["--zoo-dir", str(tiny_zoo)]
    patch = str(tiny_run / "clone.pnc")
    assert cli.main(["export", patch, "--out", str(files["plain"]), *zoo]) == 0
    for level in LEVELS:
        assert cli.main(["export", patch, "--out", str(files[level]), "--optimize", level, *zoo]) == 0
    return files


def test_optimized_exports_give_the_same_logits_with_fewer_nodes(exports):
    plain = onnx.load(exports["plain"])
    x = torch.randn(7, 1, 8, 8, generator=torch.Generator().manual_seed(3)).numpy()
    want = session(plain, optimize=False).run(None, {"input": x})
    for level in LEVELS:
        model = onnx.load(exports[level])
        got = session(model, optimize=False).run(None, {"input": x})  # already optimized: load as is
        assert [o.name for o in model.graph.output] == ["logits", CLONED_OUTPUT]
        for a, b in zip(want, got):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
        props = {p.key: p.value for p in model.metadata_props}
        assert MANIFEST_KEY not in props
        assert json.loads(props[OPTIMIZED_KEY]) == {"sha256": sha256(plain), "level": level}
    # Conv+ReLU and Gemm+ReLU fuse from "extended" on, so the graph loses its ReLU nodes
    assert len(onnx.load(exports["extended"]).graph.node) < len(plain.graph.node)
    assert not [n for n in onnx.load(exports["extended"]).graph.node if n.op_type == "Relu"]
    assert optimize_onnx(plain).SerializeToString() == exports["extended"].read_bytes()  # deterministic


def test_optimized_export_is_refused_by_detach_and_attach(exports, tmp_path, capsys):
    plain, optimized = onnx.load(exports["plain"]), onnx.load(exports["extended"])
    with pytest.raises(ExportError, match=f"optimized by onnxruntime.*plain export.*sha256 {sha256(plain)}"):
        detach_model(optimized)
    target, branch = detach_model(plain), branch_model(plain)
    for args in ((optimized, [branch]), (target, [optimize_onnx(branch)])):
        with pytest.raises(ExportError, match="optimized by onnxruntime.*cannot attach it"):
            attach_model(*args)
    out = tmp_path / "x.onnx"
    assert cli.main(["detach", str(exports["extended"]), "--all", "--out", str(out)]) == 2
    assert "pnc detach: error: this ONNX file was optimized by onnxruntime" in capsys.readouterr().err
    assert not out.exists()


def test_changed_outputs_are_an_export_error(monkeypatch, exports):
    """optimize_onnx compares the optimized graph's outputs with the plain one's before returning."""
    import pnc.surgery.onnx_optimize as module

    real = module._session

    def broken(model, level, save=None):
        sess = real(model, level, save)
        if save is not None:  # what onnxruntime wrote: make its last Gemm add 1 to everything
            proto = onnx.load(save)
            gemm = [n for n in proto.graph.node if n.op_type in ("Gemm", "FusedGemm")][-1]
            bias = next(t for t in proto.graph.initializer if t.name == gemm.input[2])
            bias.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(bias) + 1, bias.name))
            onnx.save(proto, save)
        return sess

    monkeypatch.setattr(module, "_session", broken)
    with pytest.raises(ExportError, match="changes output '(cloned_)?logits'; export without --optimize"):
        optimize_onnx(onnx.load(exports["plain"]))
