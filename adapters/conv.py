"""Feature map -> feature map adapters: the paper's 1x1 conv (+ ReLU), and with resampling."""

from __future__ import annotations

from torch import Tensor, nn

from .base import Adapter, activation, weight_and_bias
from .resample import map_to_rows, resampler


class ConvAdapter(Adapter):
    """1x1 conv + optional ReLU between maps of the same size (the paper's adapter A).

    Starts at identity when ``in_ch == out_ch``; otherwise at PyTorch's default init,
    which callers should replace by ``least_squares_init``.
    """

    def __init__(self, in_ch: int, out_ch: int, relu: bool = True) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_ch, out_ch, kernel_size=1)
        self.act = activation(relu)
        if in_ch == out_ch:
            self.identity_init()

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_ch, H, W) -> (B, out_ch, H, W)."""
        return self.act(self.proj(x))

    def resample(self, x: Tensor) -> Tensor:
        """(B, in_ch, H, W) -> (B, H*W, in_ch)."""
        return map_to_rows(x)

    def dst_rows(self, y: Tensor) -> Tensor:
        """(B, out_ch, H, W) -> (B, H*W, out_ch)."""
        return map_to_rows(y)

    def channel_map(self) -> tuple[Tensor, Tensor]:
        return weight_and_bias(self.proj)


class SpatialConvAdapter(ConvAdapter):
    """Resample to the destination's H x W (see ``resampler``), then 1x1 conv + optional ReLU."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        in_hw: tuple[int, int],
        out_hw: tuple[int, int],
        relu: bool = True,
    ) -> None:
        super().__init__(in_ch, out_ch, relu)
        self.resize = resampler(in_hw, out_hw)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_ch, *in_hw) -> (B, out_ch, *out_hw)."""
        return self.act(self.proj(self.resize(x)))

    def resample(self, x: Tensor) -> Tensor:
        """(B, in_ch, *in_hw) -> (B, out_h*out_w, in_ch)."""
        return map_to_rows(self.resize(x))
