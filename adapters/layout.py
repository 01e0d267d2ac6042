"""Channels-last (NHWC) support by permuting around an NCHW-side adapter."""

from __future__ import annotations

from torch import Tensor

from .base import Adapter


def _nchw(x: Tensor) -> Tensor:
    """(B, H, W, C) -> (B, C, H, W)."""
    return x.permute(0, 3, 1, 2)


class ChannelsLast(Adapter):
    """Runs ``inner`` (written for NCHW maps) on NHWC input and/or output.

    ``src_nhwc``: input is (B, H, W, C) and is permuted to NCHW first;
    ``dst_nhwc``: the output of ``inner`` (B, C, H, W) is permuted to (B, H, W, C).
    """

    def __init__(self, inner: Adapter, src_nhwc: bool, dst_nhwc: bool) -> None:
        super().__init__()
        self.inner = inner
        self.src_nhwc = src_nhwc
        self.dst_nhwc = dst_nhwc

    def forward(self, x: Tensor) -> Tensor:
        """(B, *src_shape) -> (B, *dst_shape), NHWC sides permuted around ``inner``."""
        y = self.inner(_nchw(x) if self.src_nhwc else x)
        return y.permute(0, 2, 3, 1) if self.dst_nhwc else y

    def resample(self, x: Tensor) -> Tensor:
        return self.inner.resample(_nchw(x) if self.src_nhwc else x)

    def dst_rows(self, y: Tensor) -> Tensor:
        return self.inner.dst_rows(_nchw(y) if self.dst_nhwc else y)

    def channel_map(self) -> tuple[Tensor, Tensor]:
        return self.inner.channel_map()

    def fit_prefix(self, y: Tensor) -> None:
        self.inner.fit_prefix(_nchw(y) if self.dst_nhwc else y)
