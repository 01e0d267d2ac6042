"""Fixed (parameter-free) spatial resampling and map <-> row reshapes, ONNX-friendly."""

from __future__ import annotations

from torch import Tensor, nn


def resampler(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> nn.Module:
    """Module mapping (B, C, *in_hw) -> (B, C, *out_hw) with static sizes.

    Equal sizes: ``nn.Identity``. Integer-factor downsizing on both axes:
    ``nn.AvgPool2d(k, stride=k)`` (equals ``adaptive_avg_pool2d``, exports as
    AveragePool). Anything else (upsizing, non-integer ratios): bilinear
    ``nn.Upsample(size=out_hw, align_corners=False)`` (exports as Resize); it does not
    anti-alias, so a non-integer shrink skips some input pixels.
    """
    (in_h, in_w), (out_h, out_w) = in_hw, out_hw
    if (in_h, in_w) == (out_h, out_w):
        return nn.Identity()
    if in_h % out_h == 0 and in_w % out_w == 0:
        kernel = (in_h // out_h, in_w // out_w)
        return nn.AvgPool2d(kernel, stride=kernel)
    return nn.Upsample(size=(out_h, out_w), mode="bilinear", align_corners=False)


def map_to_rows(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H*W, C), row-major over (H, W) like a ViT patch sequence."""
    return x.flatten(2).transpose(1, 2)


def rows_to_map(x: Tensor, hw: tuple[int, int]) -> Tensor:
    """(B, H*W, C) -> (B, C, H, W); inverse of ``map_to_rows``."""
    return x.transpose(1, 2).reshape(-1, x.shape[2], hw[0], hw[1])
