"""pnc.adapters: shape-matching adapters between a target's cut and a source's cut."""

from .base import Adapter, AdapterError
from .conv import ConvAdapter, SpatialConvAdapter
from .factory import LAYOUT_RANK, AdapterSpec, make_adapter, register_adapter, supported_pairs
from .init import least_squares_init
from .layout import ChannelsLast
from .linear import LinearAdapter
from .resample import resampler
from .tokens import MapToTokens, TokensToMap, TokensToTokens

__all__ = [
    "Adapter",
    "AdapterError",
    "AdapterSpec",
    "ChannelsLast",
    "ConvAdapter",
    "LAYOUT_RANK",
    "LinearAdapter",
    "MapToTokens",
    "SpatialConvAdapter",
    "TokensToMap",
    "TokensToTokens",
    "least_squares_init",
    "make_adapter",
    "register_adapter",
    "resampler",
    "supported_pairs",
]
