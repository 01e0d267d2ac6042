"""pnc.adapters: shapes, identity start, protocol consistency, least squares, fx, ONNX, errors."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.fx

from pnc.adapters import (
    Adapter,
    AdapterError,
    ChannelsLast,
    ConvAdapter,
    LinearAdapter,
    MapToTokens,
    SpatialConvAdapter,
    TokensToMap,
    TokensToTokens,
    least_squares_init,
    make_adapter,
)

# (id, make_adapter kwargs, expected class)
CASES = [
    ("nchw-equal", dict(src_shape=(8, 6, 6), src_layout="NCHW", dst_shape=(8, 6, 6), dst_layout="NCHW"), ConvAdapter),
    ("nchw-widths", dict(src_shape=(8, 6, 6), src_layout="NCHW", dst_shape=(12, 6, 6), dst_layout="NCHW"), ConvAdapter),
    (
        "nchw-down2",
        dict(src_shape=(8, 8, 8), src_layout="NCHW", dst_shape=(12, 4, 4), dst_layout="NCHW"),
        SpatialConvAdapter,
    ),
    (
        "nchw-up2",
        dict(src_shape=(8, 4, 4), src_layout="NCHW", dst_shape=(12, 8, 8), dst_layout="NCHW"),
        SpatialConvAdapter,
    ),
    (
        "nchw-down-7to4",
        dict(src_shape=(8, 7, 7), src_layout="NCHW", dst_shape=(8, 4, 4), dst_layout="NCHW"),
        SpatialConvAdapter,
    ),
    (
        "nchw-to-nlc-p1",
        dict(src_shape=(8, 8, 8), src_layout="NCHW", dst_shape=(17, 12), dst_layout="NLC", dst_prefix_tokens=1),
        MapToTokens,
    ),
    (
        "nlc-p1-to-nchw",
        dict(src_shape=(17, 12), src_layout="NLC", dst_shape=(8, 8, 8), dst_layout="NCHW", src_prefix_tokens=1),
        TokensToMap,
    ),
    (
        "nlc-dims",
        dict(
            src_shape=(17, 12),
            src_layout="NLC",
            dst_shape=(17, 20),
            dst_layout="NLC",
            src_prefix_tokens=1,
            dst_prefix_tokens=1,
        ),
        LinearAdapter,
    ),
    (
        "nlc-grid-4to7",
        dict(
            src_shape=(17, 12),
            src_layout="NLC",
            dst_shape=(50, 20),
            dst_layout="NLC",
            src_prefix_tokens=1,
            dst_prefix_tokens=1,
        ),
        TokensToTokens,
    ),
    (
        "nlc-p0-to-p2",
        dict(src_shape=(16, 12), src_layout="NLC", dst_shape=(18, 12), dst_layout="NLC", dst_prefix_tokens=2),
        TokensToTokens,
    ),
    ("nc", dict(src_shape=(10,), src_layout="NC", dst_shape=(6,), dst_layout="NC"), LinearAdapter),
    ("nhwc-same", dict(src_shape=(6, 6, 8), src_layout="NHWC", dst_shape=(6, 6, 12), dst_layout="NHWC"), LinearAdapter),
    ("nhwc-down2", dict(src_shape=(8, 8, 8), src_layout="NHWC", dst_shape=(4, 4, 12), dst_layout="NHWC"), ChannelsLast),
    (
        "nhwc-to-nchw",
        dict(src_shape=(8, 8, 8), src_layout="NHWC", dst_shape=(12, 8, 8), dst_layout="NCHW"),
        ChannelsLast,
    ),
    (
        "nchw-to-nhwc-down",
        dict(src_shape=(8, 8, 8), src_layout="NCHW", dst_shape=(4, 4, 12), dst_layout="NHWC"),
        ChannelsLast,
    ),
    (
        "nhwc-to-nlc-p1",
        dict(src_shape=(8, 8, 8), src_layout="NHWC", dst_shape=(17, 12), dst_layout="NLC", dst_prefix_tokens=1),
        ChannelsLast,
    ),
    (
        "nlc-p1-to-nhwc",
        dict(src_shape=(17, 12), src_layout="NLC", dst_shape=(8, 8, 6), dst_layout="NHWC", src_prefix_tokens=1),
        ChannelsLast,
    ),
]
IDS = [c[0] for c in CASES]


def _x(kw: dict, batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, *kw["src_shape"], generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _randomize(adapter: Adapter, seed: int = 1) -> Adapter:
    """A 'teacher' adapter with random channel map and prefix tokens."""
    g = torch.Generator().manual_seed(seed)
    for p in adapter.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return adapter


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("name,kw,cls", CASES, ids=IDS)
def test_output_shape_and_class(name, kw, cls, relu):
    adapter = make_adapter(**kw, relu=relu)
    assert type(adapter) is cls
    y = adapter(_x(kw, 3))
    assert tuple(y.shape) == (3, *kw["dst_shape"])
    if relu:
        assert (y[:, kw.get("dst_prefix_tokens", 0) :] >= 0).all()


@pytest.mark.parametrize("relu", [False, True])
def test_equal_widths_start_at_identity(relu):
    x = torch.randn(4, 8, 6, 6)
    adapter = ConvAdapter(8, 8, relu=relu)
    assert torch.equal(adapter(x), torch.relu(x) if relu else x)
    assert torch.equal(make_adapter((8, 6, 6), "NCHW", (8, 6, 6), "NCHW", relu=relu)(x), torch.relu(x) if relu else x)


def test_equal_dims_token_and_linear_adapters_pass_through():
    tokens = torch.randn(2, 17, 12)
    assert torch.equal(
        make_adapter((17, 12), "NLC", (17, 12), "NLC", src_prefix_tokens=1, dst_prefix_tokens=1)(tokens), tokens
    )
    feats = torch.randn(2, 12, 4, 4)
    out = make_adapter((12, 4, 4), "NCHW", (17, 12), "NLC", dst_prefix_tokens=1)(feats)
    assert torch.equal(out[:, 1:], feats.flatten(2).transpose(1, 2))
    assert torch.equal(out[:, :1], torch.zeros(2, 1, 12))
    back = make_adapter((17, 12), "NLC", (12, 4, 4), "NCHW", src_prefix_tokens=1)(out)
    assert torch.equal(back, feats)


def test_spatial_adapter_resamples_like_torch():
    x = torch.randn(2, 8, 8, 8)
    down = SpatialConvAdapter(8, 8, (8, 8), (4, 4), relu=False)
    torch.testing.assert_close(down(x), torch.nn.functional.adaptive_avg_pool2d(x, 4))
    up = SpatialConvAdapter(8, 8, (8, 8), (16, 16), relu=False)
    torch.testing.assert_close(up(x), torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear"))


@pytest.mark.parametrize("name,kw,cls", CASES, ids=IDS)
def test_forward_matches_protocol(name, kw, cls):
    """forward == place(resample(x) @ W^T + b): what least_squares_init relies on."""
    adapter = _randomize(make_adapter(**kw))
    x = _x(kw, 2)
    weight, bias = adapter.channel_map()
    rows = adapter.resample(x) @ weight.reshape(weight.shape[0], -1).T + bias
    torch.testing.assert_close(adapter.dst_rows(adapter(x)), rows, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,kw,cls", CASES, ids=IDS)
def test_least_squares_recovers_known_linear_map(name, kw, cls):
    teacher = _randomize(make_adapter(**kw))
    x = _x(kw, 24)
    with torch.no_grad():
        y = teacher(x)
    student = make_adapter(**kw)
    before = ((student(x) - y).norm() / y.norm()).item()
    residual = least_squares_init(student, x, y, ridge=1e-9)
    assert residual < 1e-4 < before
    for learned, true in zip(student.channel_map(), teacher.channel_map()):
        torch.testing.assert_close(learned, true, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(student(x), y, rtol=1e-3, atol=1e-4)


def test_least_squares_ridge_trades_fit_for_shrinkage():
    kw = CASES[1][1]
    teacher = _randomize(make_adapter(**kw))
    x = _x(kw, 4)
    with torch.no_grad():
        y = teacher(x) + 0.3 * torch.randn(4, *kw["dst_shape"], generator=torch.Generator().manual_seed(5))
    small, large = make_adapter(**kw), make_adapter(**kw)
    r_small = least_squares_init(small, x, y, ridge=1e-6)
    r_large = least_squares_init(large, x, y, ridge=10.0)
    assert 0 < r_small < r_large
    assert large.channel_map()[0].norm() < small.channel_map()[0].norm()


def test_least_squares_with_relu_fits_nonnegative_features():
    kw = CASES[2][1]
    teacher = _randomize(make_adapter(**kw, relu=True))
    x = _x(kw, 16)
    with torch.no_grad():
        y = teacher(x)
    student = make_adapter(**kw, relu=True)
    before = ((student(x) - y).norm() / y.norm()).item()
    residual = least_squares_init(student, x, y)
    assert residual < 0.5 * before
    assert residual < 0.35


@pytest.mark.parametrize("name,kw,cls", CASES, ids=IDS)
def test_fx_traceable(name, kw, cls):
    adapter = _randomize(make_adapter(**kw, relu=True))
    graph_module = torch.fx.symbolic_trace(adapter)
    x = _x(kw, 3)
    assert torch.equal(graph_module(x), adapter(x))


ONNX_CASES = [
    "nchw-equal",
    "nchw-down2",
    "nchw-up2",
    "nchw-down-7to4",
    "nchw-to-nlc-p1",
    "nlc-p1-to-nchw",
    "nlc-grid-4to7",
    "nlc-p0-to-p2",
    "nc",
    "nlc-dims",
    "nhwc-to-nlc-p1",
]


@pytest.mark.parametrize("name", ONNX_CASES)
def test_onnx_export_parity_dynamic_batch(name, tmp_path):
    kw = next(c[1] for c in CASES if c[0] == name)
    adapter = _randomize(make_adapter(**kw, relu=True)).eval()
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(
        adapter,
        (_x(kw, 2),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = _x(kw, batch, seed=batch)
        (got,) = session.run(None, {"x": x.numpy()})
        with torch.no_grad():
            want = adapter(x).numpy()
        assert got.shape == (batch, *kw["dst_shape"])
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5)


def test_prefix_init_and_fit_prefix():
    init = torch.randn(1, 12)
    adapter = make_adapter((8, 8, 8), "NCHW", (17, 12), "NLC", dst_prefix_tokens=1, prefix_init=init)
    out = adapter(torch.randn(3, 8, 8, 8))
    assert torch.equal(out[:, 0], init.expand(3, 12))
    y = torch.randn(3, 17, 12)
    least_squares_init(adapter, torch.randn(3, 8, 8, 8), y)
    torch.testing.assert_close(adapter.prefix[0], y[:, :1].mean(0))


def test_spec_round_trips_through_json():
    kw = next(c[1] for c in CASES if c[0] == "nhwc-to-nlc-p1")
    adapter = _randomize(make_adapter(**kw, relu=True))
    rebuilt = make_adapter(**json.loads(json.dumps(dataclasses.asdict(adapter.spec))))
    rebuilt.load_state_dict(adapter.state_dict())
    x = _x(kw, 2)
    assert rebuilt.spec == adapter.spec
    assert torch.equal(rebuilt(x), adapter(x))


def test_num_params():
    assert ConvAdapter(8, 12).num_params() == 8 * 12 + 12
    assert make_adapter((8, 8, 8), "NCHW", (17, 12), "NLC", dst_prefix_tokens=1).num_params() == 8 * 12 + 12 + 12


@pytest.mark.parametrize(
    "args,kwargs,words",
    [
        (((10,), "NC", (8, 4, 4), "NCHW"), {}, ["NC (10,)", "NCHW (8, 4, 4)", "supported layout pairs"]),
        (((8, 4, 4), "NCHW", (10,), "NC"), {}, ["NCHW (8, 4, 4)", "NC (10,)"]),
        (((8, 4, 4), "NCL", (8, 4, 4), "NCHW"), {}, ["unknown src layout 'NCL'"]),
        (((8, 4), "NCHW", (8, 4, 4), "NCHW"), {}, ["src shape (8, 4)", "NCHW"]),
        (((8, 4, 4), "NCHW", (18, 12), "NLC"), {"dst_prefix_tokens": 1}, ["17 patch tokens", "not a square grid"]),
        (((8, 4, 4), "NCHW", (8, 4, 4), "NCHW"), {"src_prefix_tokens": 1}, ["prefix tokens need NLC"]),
        (
            ((8, 4, 4), "NCHW", (17, 12), "NLC"),
            {"dst_prefix_tokens": 1, "prefix_init": torch.zeros(2, 12)},
            ["prefix_init has shape (2, 12)", "(1, 12)"],
        ),
        (((8, 4, 4), "NCHW", (8, 4, 4), "NCHW"), {"prefix_init": torch.zeros(1, 8)}, ["prefix_init does not apply"]),
        (((8, 4, 4), "NCHW", (8, 4, 4), "NCHW"), {"relu": None}, ["relu must be True or False"]),
    ],
)
def test_bad_requests_raise_clear_errors(args, kwargs, words):
    with pytest.raises(AdapterError) as info:
        make_adapter(*args, **kwargs)
    assert isinstance(info.value, ValueError)  # adapters stand alone; the core turns it into a CutError
    for word in words:
        assert word in str(info.value)


def test_least_squares_rejects_mismatched_features():
    adapter = make_adapter((8, 4, 4), "NCHW", (12, 4, 4), "NCHW")
    with pytest.raises(AdapterError, match=r"to \(2, 12, 4, 4\), but dst_feats is \(2, 12, 8, 8\)"):
        least_squares_init(adapter, torch.randn(2, 8, 4, 4), torch.randn(2, 12, 8, 8))
    with pytest.raises(AdapterError, match="same images"):
        least_squares_init(adapter, torch.randn(2, 8, 4, 4), torch.randn(3, 12, 4, 4))


def test_identity_init_needs_equal_widths():
    with pytest.raises(AdapterError, match="least_squares_init"):
        ConvAdapter(8, 12).identity_init()
