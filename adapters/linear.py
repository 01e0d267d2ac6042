"""Last-dimension channel adapter for flat vectors and same-grid tokens."""

from __future__ import annotations

from torch import Tensor, nn

from .base import Adapter, activation, weight_and_bias


class LinearAdapter(Adapter):
    """Linear + optional ReLU on the last dim: (B, ..., in_f) -> (B, ..., out_f).

    Serves NC -> NC, NLC -> NLC with the same tokens (prefix tokens are mapped like
    the others) and NHWC -> NHWC of the same size. Identity at init when
    ``in_f == out_f``. ``relu`` defaults to False: tokens and fc features are signed.
    """

    def __init__(self, in_f: int, out_f: int, relu: bool = False) -> None:
        super().__init__()
        self.proj = nn.Linear(in_f, out_f)
        self.act = activation(relu)
        if in_f == out_f:
            self.identity_init()

    def forward(self, x: Tensor) -> Tensor:
        """(B, ..., in_f) -> (B, ..., out_f)."""
        return self.act(self.proj(x))

    def resample(self, x: Tensor) -> Tensor:
        """(B, ..., in_f) -> (B, P, in_f), P = product of the middle dims (1 for NC)."""
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def dst_rows(self, y: Tensor) -> Tensor:
        """(B, ..., out_f) -> (B, P, out_f)."""
        return y.reshape(y.shape[0], -1, y.shape[-1])

    def channel_map(self) -> tuple[Tensor, Tensor]:
        return weight_and_bias(self.proj)
