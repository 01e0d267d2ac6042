"""Pick an adapter from two cut shapes and layouts, through a registry keyed by layout pair.

"src" is the tensor the adapter reads (the target's features at cut R), "dst" the one
it must produce (the source's features at its cut R'); shapes exclude the batch dim.
Layouts: "NCHW" (C, H, W), "NHWC" (H, W, C), "NLC" (L, C) with ``prefix_tokens``
class/distillation tokens first and a square patch grid after them, "NC" (C,).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Adapter, AdapterError
from .conv import ConvAdapter, SpatialConvAdapter
from .layout import ChannelsLast
from .linear import LinearAdapter
from .tokens import MapToTokens, TokensToMap, TokensToTokens

LAYOUT_RANK = {"NCHW": 3, "NHWC": 3, "NLC": 2, "NC": 1}


@dataclass(frozen=True)
class AdapterSpec:
    """The arguments of ``make_adapter`` (JSON-able: ``make_adapter(**dataclasses.asdict(spec))``)."""

    src_shape: tuple[int, ...]
    src_layout: str
    dst_shape: tuple[int, ...]
    dst_layout: str
    src_prefix_tokens: int = 0
    dst_prefix_tokens: int = 0
    relu: bool = False

    def __str__(self) -> str:
        def side(layout: str, shape: tuple[int, ...], prefix: int) -> str:
            return f"{layout} {shape}" + (f" with {prefix} prefix token(s)" if prefix else "")

        return (
            f"{side(self.src_layout, self.src_shape, self.src_prefix_tokens)} -> "
            f"{side(self.dst_layout, self.dst_shape, self.dst_prefix_tokens)}"
        )


Builder = Callable[[AdapterSpec, "Tensor | None"], Adapter]
_REGISTRY: dict[tuple[str, str], Builder] = {}


def register_adapter(src_layout: str, dst_layout: str) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder(spec, prefix_init) -> Adapter`` for a layout pair."""

    def register(builder: Builder) -> Builder:
        _REGISTRY[(src_layout, dst_layout)] = builder
        return builder

    return register


def supported_pairs() -> list[str]:
    """The registered "SRC->DST" layout pairs."""
    return [f"{s}->{d}" for s, d in _REGISTRY]


def _map_dims(shape: tuple[int, ...], layout: str) -> tuple[int, tuple[int, int]]:
    """(channels, (H, W)) of an NCHW or NHWC shape."""
    if layout == "NHWC":
        return shape[2], (shape[0], shape[1])
    return shape[0], (shape[1], shape[2])


def _grid(shape: tuple[int, ...], prefix: int, spec: AdapterSpec) -> tuple[int, int]:
    """Square patch grid of an NLC shape (L, C) after ``prefix`` tokens."""
    patches = shape[0] - prefix
    side = math.isqrt(patches)
    if side * side != patches:
        raise AdapterError(
            f"{spec}: {shape[0]} tokens minus {prefix} prefix token(s) = {patches} patch tokens, "
            "not a square grid; check the prefix token count (timm: model.num_prefix_tokens)"
        )
    return side, side


def _no_prefix_init(spec: AdapterSpec, prefix_init: Tensor | None) -> None:
    if prefix_init is not None:
        raise AdapterError(f"{spec}: this adapter learns no prefix tokens, so prefix_init does not apply")


@register_adapter("NCHW", "NCHW")
def _map_to_map(spec: AdapterSpec, prefix_init: Tensor | None) -> Adapter:
    _no_prefix_init(spec, prefix_init)
    c_in, hw_in = _map_dims(spec.src_shape, spec.src_layout)
    c_out, hw_out = _map_dims(spec.dst_shape, spec.dst_layout)
    if hw_in == hw_out:
        return ConvAdapter(c_in, c_out, spec.relu)
    return SpatialConvAdapter(c_in, c_out, hw_in, hw_out, spec.relu)


@register_adapter("NCHW", "NLC")
def _map_to_tokens(spec: AdapterSpec, prefix_init: Tensor | None) -> Adapter:
    c_in, hw_in = _map_dims(spec.src_shape, spec.src_layout)
    grid = _grid(spec.dst_shape, spec.dst_prefix_tokens, spec)
    return MapToTokens(c_in, spec.dst_shape[1], hw_in, grid, spec.dst_prefix_tokens, spec.relu, prefix_init)


@register_adapter("NLC", "NCHW")
def _tokens_to_map(spec: AdapterSpec, prefix_init: Tensor | None) -> Adapter:
    _no_prefix_init(spec, prefix_init)
    grid = _grid(spec.src_shape, spec.src_prefix_tokens, spec)
    c_out, hw_out = _map_dims(spec.dst_shape, spec.dst_layout)
    return TokensToMap(spec.src_shape[1], c_out, spec.src_prefix_tokens, grid, hw_out, spec.relu)


@register_adapter("NLC", "NLC")
def _tokens_to_tokens(spec: AdapterSpec, prefix_init: Tensor | None) -> Adapter:
    same_prefix = spec.src_prefix_tokens == spec.dst_prefix_tokens
    if same_prefix:
        _no_prefix_init(spec, prefix_init)
    if same_prefix and spec.src_shape[0] == spec.dst_shape[0]:
        return LinearAdapter(spec.src_shape[1], spec.dst_shape[1], spec.relu)
    return TokensToTokens(
        spec.src_shape[1],
        spec.dst_shape[1],
        spec.src_prefix_tokens,
        _grid(spec.src_shape, spec.src_prefix_tokens, spec),
        spec.dst_prefix_tokens,
        _grid(spec.dst_shape, spec.dst_prefix_tokens, spec),
        spec.relu,
        prefix_init,
    )


@register_adapter("NC", "NC")
def _vector_to_vector(spec: AdapterSpec, prefix_init: Tensor | None) -> Adapter:
    _no_prefix_init(spec, prefix_init)
    return LinearAdapter(spec.src_shape[0], spec.dst_shape[0], spec.relu)


@register_adapter("NHWC", "NHWC")
def _nhwc_to_nhwc(spec: AdapterSpec, prefix_init: Tensor | None) -> Adapter:
    _no_prefix_init(spec, prefix_init)
    if spec.src_shape[:2] == spec.dst_shape[:2]:
        return LinearAdapter(spec.src_shape[2], spec.dst_shape[2], spec.relu)
    return ChannelsLast(_map_to_map(spec, None), src_nhwc=True, dst_nhwc=True)


def _channels_last(build: Builder) -> Builder:
    """Wrap an NCHW-side builder so NHWC sides are permuted around its adapter."""

    def wrapped(spec: AdapterSpec, prefix_init: Tensor | None) -> Adapter:
        inner = build(spec, prefix_init)
        return ChannelsLast(inner, spec.src_layout == "NHWC", spec.dst_layout == "NHWC")

    return wrapped


for _src, _dst in [("NHWC", "NCHW"), ("NCHW", "NHWC"), ("NHWC", "NLC"), ("NLC", "NHWC")]:
    _REGISTRY[(_src, _dst)] = _channels_last(_REGISTRY[(_src.replace("NHWC", "NCHW"), _dst.replace("NHWC", "NCHW"))])


def _check_side(name: str, shape: Sequence[int], layout: str, prefix: int) -> tuple[int, ...]:
    if layout not in LAYOUT_RANK:
        raise AdapterError(f"unknown {name} layout {layout!r}; use one of {', '.join(LAYOUT_RANK)}")
    try:
        shape = tuple(operator.index(s) for s in shape)
    except TypeError:
        shape = tuple(shape)
    if len(shape) != LAYOUT_RANK[layout] or not all(isinstance(s, int) and s > 0 for s in shape):
        raise AdapterError(
            f"{name} shape {shape} does not fit layout {layout}: give {LAYOUT_RANK[layout]} positive ints "
            "without the batch dim"
        )
    if prefix and layout != "NLC":
        raise AdapterError(f"{name} has {prefix} prefix token(s) but layout {layout}; prefix tokens need NLC")
    if not 0 <= prefix < (shape[0] if layout == "NLC" else 1):
        raise AdapterError(f"{name} prefix token count {prefix} must be in [0, {shape[0]}) for shape {shape}")
    return shape


def make_adapter(
    src_shape: Sequence[int],
    src_layout: str,
    dst_shape: Sequence[int],
    dst_layout: str,
    *,
    src_prefix_tokens: int = 0,
    dst_prefix_tokens: int = 0,
    relu: bool = False,
    prefix_init: Tensor | None = None,
    device: torch.device | str | None = None,
) -> Adapter:
    """Adapter mapping (B, *src_shape) in ``src_layout`` to (B, *dst_shape) in ``dst_layout``.

    The paper's adapter is a 1x1 conv + ReLU. ``relu`` defaults to False because the
    ReLU is only right when the destination (source cut) tensor is non-negative on
    data, e.g. a ReLU output; callers pass ``relu=True`` then. ``prefix_init``
    ((P, C) or (1, P, C)) seeds learned output prefix tokens, e.g. the source's class
    token plus its position embedding. The returned module carries ``.spec``
    (an ``AdapterSpec``) so it can be rebuilt from JSON; it is built on ``device``
    (default: torch's default device).
    """
    if not isinstance(relu, bool):
        raise AdapterError(f"relu must be True or False, got {relu!r}")
    spec = AdapterSpec(
        _check_side("src", src_shape, src_layout, src_prefix_tokens),
        src_layout,
        _check_side("dst", dst_shape, dst_layout, dst_prefix_tokens),
        dst_layout,
        src_prefix_tokens,
        dst_prefix_tokens,
        relu,
    )
    build = _REGISTRY.get((src_layout, dst_layout))
    if build is None:
        raise AdapterError(
            f"no adapter maps {spec}; supported layout pairs: {', '.join(supported_pairs())}. "
            "Choose cuts whose layouts form one of these pairs (e.g. a cut before the final pooling/flatten)"
        )
    device = torch.device(device) if device is not None else torch.get_default_device()
    with device:  # every parameter is made there
        adapter = build(spec, prefix_init).to(device)
    adapter.spec = spec
    return adapter
