"""onnxruntime's graph optimizations applied offline, for deployment (`pnc export --optimize`).

onnxruntime rewrites every graph when it loads it (``GraphOptimizationLevel``): constant
folding and redundancy elimination (basic), operator fusions such as Conv+ReLU and
MatMul+Add into com.microsoft kernels (extended), and, at ``all``, the NCHWc memory
layout of the CPU it runs on. :func:`optimize_onnx` runs that once and returns the
rewritten graph (``SessionOptions.optimized_model_filepath``), so a device loads it
without optimizing again; it then runs in onnxruntime only, and at ``all`` only on a CPU
like this one. Inference is as fast as the plain export loaded with the same level.

The optimized graph has fused and renamed nodes, so it is not detachable: its detach
manifest is replaced by ``metadata_props[OPTIMIZED_KEY]`` (the sha256 of the export it was
made from, and the level), and `pnc detach` / `pnc attach` refuse it, pointing to that export.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from pnc.surgery.errors import ExportError
from pnc.surgery.onnx_merge import MANIFEST_KEY, OPTIMIZED_KEY, sha256

__all__ = ["LEVELS", "optimize_onnx"]

#: ``pnc export --optimize LEVEL`` -> onnxruntime's optimization level
LEVELS = {
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
RTOL, ATOL = 1e-4, 1e-5


def _session(model: bytes | str, level: ort.GraphOptimizationLevel, save: str | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.graph_optimization_level = level
    if save is not None:
        options.optimized_model_filepath = save
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _random_feeds(model: onnx.ModelProto, batch: int = 2) -> dict[str, np.ndarray]:
    """A seeded float input of each graph input, its dynamic axes set to ``batch``."""
    rng = np.random.default_rng(0)
    feeds = {}
    for value in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in value.type.tensor_type.shape.dim]
        feeds[value.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def optimize_onnx(model: onnx.ModelProto, level: str = "extended") -> onnx.ModelProto:
    """``model`` as onnxruntime's optimizer at ``level`` (a key of :data:`LEVELS`) rewrites it.

    Checked before it is returned: every output within rtol=1e-4, atol=1e-5 of the
    unoptimized graph's (run without optimizations) on a seeded random input, else
    ExportError. The input is not modified."""
    if level not in LEVELS:
        raise ExportError(f"unknown optimization level {level!r}: use one of {', '.join(LEVELS)}")
    data = model.SerializeToString()
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "optimized.onnx")
        _session(data, LEVELS[level], save=path)
        optimized = onnx.load(path)
    feeds = _random_feeds(model)
    names = [o.name for o in model.graph.output]
    want = _session(data, ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(names, feeds)
    got = _session(optimized.SerializeToString(), ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(names, feeds)
    for name, a, b in zip(names, want, got):
        if a.shape != b.shape or not np.allclose(a, b, rtol=RTOL, atol=ATOL):
            raise ExportError(f"onnxruntime's optimized graph changes output {name!r}; export without --optimize")
    props = [(p.key, p.value) for p in optimized.metadata_props if p.key != MANIFEST_KEY]
    del optimized.metadata_props[:]
    for key, value in props:
        optimized.metadata_props.add(key=key, value=value)
    optimized.metadata_props.add(key=OPTIMIZED_KEY, value=json.dumps({"sha256": sha256(model), "level": level}))
    return optimized
