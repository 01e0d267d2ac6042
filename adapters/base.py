"""The adapter protocol: a fixed resampling, one linear channel map, an optional ReLU.

Every adapter computes ``forward(x) = place(act(resample(x) @ W.T + b))``:

- ``resample`` is parameter-free (spatial/token-grid resampling and layout changes)
  and yields one row per output position the channel map writes;
- ``W, b = channel_map()`` is the only learned map over channels (a 1x1 conv or a
  linear layer);
- ``place`` is the inverse of ``dst_rows`` (back to the destination layout, plus any
  learned prefix tokens).

``least_squares_init`` fits ``W, b`` in closed form through this protocol, so it works
for every adapter without knowing its class.
"""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import Tensor, nn


class AdapterError(ValueError):
    """Shapes or layouts no adapter maps, or features that do not fit an adapter."""


def weight_and_bias(layer: nn.Conv2d | nn.Linear) -> tuple[Tensor, Tensor]:
    """(weight, bias) of an adapter's channel map layer (built with a bias)."""
    if layer.bias is None:
        raise AdapterError(f"{type(layer).__name__} of an adapter must have a bias")
    return layer.weight, layer.bias


class Adapter(nn.Module, abc.ABC):
    """Base class of every shape-matching adapter (see the module docstring).

    ``spec`` is the :class:`~pnc.adapters.factory.AdapterSpec` it was made from (set by
    ``make_adapter``; patches store it to rebuild the adapter)."""

    spec: Any

    @abc.abstractmethod
    def resample(self, x: Tensor) -> Tensor:
        """Parameter-free part: (B, *src_shape) -> (B, P, in_features) rows."""

    @abc.abstractmethod
    def dst_rows(self, y: Tensor) -> Tensor:
        """Destination rows: (B, *dst_shape) -> (B, P, out_features), same order as ``resample``."""

    @abc.abstractmethod
    def channel_map(self) -> tuple[Tensor, Tensor]:
        """The learned channel map: (weight with out x in leading dims, bias (out,))."""

    def fit_prefix(self, y: Tensor) -> None:
        """Set learned prefix tokens from destination features (B, *dst_shape); none here."""

    @torch.no_grad()
    def identity_init(self) -> None:
        """Weights = identity, bias = 0 (only when in and out widths are equal)."""
        weight, bias = self.channel_map()
        out_f, in_f = weight.shape[:2]
        if out_f != in_f:
            raise AdapterError(
                f"identity_init needs equal widths, this adapter maps {in_f} -> {out_f} "
                "channels; use least_squares_init(adapter, src_feats, dst_feats) instead"
            )
        weight.copy_(torch.eye(in_f, dtype=weight.dtype, device=weight.device).view_as(weight))
        bias.zero_()

    def num_params(self) -> int:
        """Number of learned scalars (channel map and prefix tokens)."""
        return sum(p.numel() for p in self.parameters())


def activation(relu: bool) -> nn.Module:
    """``nn.ReLU()`` when ``relu`` else ``nn.Identity()``."""
    return nn.ReLU() if relu else nn.Identity()
