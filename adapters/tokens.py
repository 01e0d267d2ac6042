"""Feature map <-> token adapters for CNN <-> ViT pairs, and token grid -> token grid.

Token tensors are NLC: ``prefix`` class/distillation tokens first, then a square
``grid`` of patch tokens in row-major order (timm's ViT/DeiT layout).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Adapter, AdapterError, activation, weight_and_bias
from .resample import map_to_rows, resampler, rows_to_map


def _prefix_param(num: int, dim: int, init: Tensor | None) -> nn.Parameter | None:
    """Learned prefix tokens (1, num, dim): zeros, or a copy of ``init`` ((num, dim) or (1, num, dim))."""
    if num == 0:
        if init is not None:
            raise AdapterError("prefix_init was given but the destination has no prefix tokens")
        return None
    if init is None:
        return nn.Parameter(torch.zeros(1, num, dim))
    if init.numel() != num * dim or init.shape[-1] != dim:
        raise AdapterError(
            f"prefix_init has shape {tuple(init.shape)}, expected ({num}, {dim}) or (1, {num}, {dim}) "
            "(e.g. the source's cls_token + its pos_embed[:, :1])"
        )
    return nn.Parameter(init.detach().reshape(1, num, dim).clone().float())


class _LearnedPrefix(Adapter):
    """Mixin for adapters that prepend learned prefix tokens to their output."""

    prefix: nn.Parameter | None

    def prepend(self, tokens: Tensor) -> Tensor:
        """(B, P, D) -> (B, num_prefix + P, D)."""
        if self.prefix is None:
            return tokens
        return torch.cat([self.prefix.expand(tokens.shape[0], -1, -1), tokens], dim=1)

    @torch.no_grad()
    def fit_prefix(self, y: Tensor) -> None:
        """Prefix tokens := batch mean of the destination's prefix tokens, y: (B, L, D)."""
        if self.prefix is not None:
            self.prefix.copy_(y[:, : self.prefix.shape[1]].mean(0, keepdim=True))


class MapToTokens(_LearnedPrefix):
    """(B, C, H, W) map -> (B, prefix + gh*gw, D) tokens.

    Resamples the map to the token grid, flattens it row-major, applies a linear
    channel map (+ optional ReLU) and prepends learned prefix tokens (zeros, or
    ``prefix_init``, e.g. the source's class token plus its position embedding).
    """

    def __init__(
        self,
        in_ch: int,
        out_dim: int,
        in_hw: tuple[int, int],
        out_grid: tuple[int, int],
        prefix_tokens: int = 0,
        relu: bool = False,
        prefix_init: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.resize = resampler(in_hw, out_grid)
        self.proj = nn.Linear(in_ch, out_dim)
        self.act = activation(relu)
        self.prefix = _prefix_param(prefix_tokens, out_dim, prefix_init)
        if in_ch == out_dim:
            self.identity_init()

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_ch, *in_hw) -> (B, prefix_tokens + gh*gw, out_dim)."""
        return self.prepend(self.act(self.proj(self.resample(x))))

    def resample(self, x: Tensor) -> Tensor:
        """(B, in_ch, *in_hw) -> (B, gh*gw, in_ch)."""
        return map_to_rows(self.resize(x))

    def dst_rows(self, y: Tensor) -> Tensor:
        """(B, prefix + gh*gw, out_dim) -> (B, gh*gw, out_dim): patch tokens only."""
        return y[:, 0 if self.prefix is None else self.prefix.shape[1] :]

    def channel_map(self) -> tuple[Tensor, Tensor]:
        return weight_and_bias(self.proj)


class TokensToMap(Adapter):
    """(B, prefix + gh*gw, D) tokens -> (B, C, H, W) map.

    Drops the prefix tokens, folds the patch tokens into their grid, resamples it to
    H x W and applies a 1x1 conv (+ optional ReLU).
    """

    def __init__(
        self,
        in_dim: int,
        out_ch: int,
        in_prefix: int,
        in_grid: tuple[int, int],
        out_hw: tuple[int, int],
        relu: bool = False,
    ) -> None:
        super().__init__()
        self.in_prefix = in_prefix
        self.in_grid = (int(in_grid[0]), int(in_grid[1]))
        self.resize = resampler(in_grid, out_hw)
        self.proj = nn.Conv2d(in_dim, out_ch, kernel_size=1)
        self.act = activation(relu)
        if in_dim == out_ch:
            self.identity_init()

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_prefix + gh*gw, in_dim) -> (B, out_ch, *out_hw)."""
        grid = rows_to_map(x[:, self.in_prefix :], self.in_grid)
        return self.act(self.proj(self.resize(grid)))

    def resample(self, x: Tensor) -> Tensor:
        """(B, in_prefix + gh*gw, in_dim) -> (B, out_h*out_w, in_dim)."""
        return map_to_rows(self.resize(rows_to_map(x[:, self.in_prefix :], self.in_grid)))

    def dst_rows(self, y: Tensor) -> Tensor:
        """(B, out_ch, H, W) -> (B, H*W, out_ch)."""
        return map_to_rows(y)

    def channel_map(self) -> tuple[Tensor, Tensor]:
        return weight_and_bias(self.proj)


class TokensToTokens(_LearnedPrefix):
    """(B, p_in + gh*gw, D_in) -> (B, p_out + gh'*gw', D_out): token grid resampling + linear.

    Patch tokens are folded into their grid, resampled and mapped by a linear layer
    (+ optional ReLU). When ``in_prefix == out_prefix`` the prefix tokens go through
    the same linear map (they carry the image's summary); otherwise they are dropped
    and learned output prefix tokens are prepended.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        in_prefix: int,
        in_grid: tuple[int, int],
        out_prefix: int,
        out_grid: tuple[int, int],
        relu: bool = False,
        prefix_init: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.in_prefix = in_prefix
        self.in_grid = (int(in_grid[0]), int(in_grid[1]))
        self.map_prefix = in_prefix == out_prefix and in_prefix > 0
        self.resize = resampler(in_grid, out_grid)
        self.proj = nn.Linear(in_dim, out_dim)
        self.act = activation(relu)
        if in_prefix == out_prefix and prefix_init is not None:
            raise AdapterError(
                f"both sides have {in_prefix} prefix token(s), so they are mapped from the input's; "
                "prefix_init applies only when the prefix counts differ"
            )
        self.prefix = _prefix_param(0 if in_prefix == out_prefix else out_prefix, out_dim, prefix_init)
        if in_dim == out_dim:
            self.identity_init()

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_prefix + gh*gw, in_dim) -> (B, out_prefix + gh'*gw', out_dim)."""
        return self.prepend(self.act(self.proj(self.resample(x))))

    def resample(self, x: Tensor) -> Tensor:
        """(B, in_prefix + gh*gw, in_dim) -> (B, [in_prefix +] gh'*gw', in_dim); prefix kept if mapped."""
        grid = map_to_rows(self.resize(rows_to_map(x[:, self.in_prefix :], self.in_grid)))
        if self.map_prefix:
            return torch.cat([x[:, : self.in_prefix], grid], dim=1)
        return grid

    def dst_rows(self, y: Tensor) -> Tensor:
        """(B, out_prefix + gh'*gw', out_dim) -> the rows the linear map writes."""
        return y[:, 0 if self.prefix is None else self.prefix.shape[1] :]

    def channel_map(self) -> tuple[Tensor, Tensor]:
        return weight_and_bias(self.proj)
