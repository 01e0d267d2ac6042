"""Closed-form (ridge least-squares) initialization of any adapter's channel map."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Adapter, AdapterError


@torch.no_grad()
def least_squares_init(adapter: Adapter, src_feats: Tensor, dst_feats: Tensor, ridge: float = 1e-3) -> float:
    """Fit the adapter's channel map W, b to map ``src_feats`` onto ``dst_feats``; return the residual.

    src_feats: (B, *src_shape), the target's features at its cut; dst_feats:
    (B, *dst_shape), the source's features at its cut, for the same B images. The
    fixed resampling is applied first, then W, b solve the ridge regression
    ``min ||X W^T + b - Y||^2 + lam ||W||^2`` over all rows (positions x images),
    with ``lam = ridge * mean(diag(X^T X))`` (scale-free; the bias is not penalized).
    Learned prefix tokens are set to the batch mean of the destination's. Give more
    rows (B x output positions) than input channels, or the fit interpolates the batch.
    Returns ``||adapter(src_feats) - dst_feats|| / ||dst_feats||`` after the fit
    (ReLU, if any, included). The features are moved to the adapter's device; the float64
    solve itself runs on the CPU (LAPACK's rank-revealing ``gelsd`` exists there only, and
    Apple MPS has no float64), and its result is copied into the adapter.
    """
    if ridge < 0:
        raise AdapterError(f"ridge must be >= 0, got {ridge}")
    if src_feats.shape[0] != dst_feats.shape[0]:
        raise AdapterError(
            f"src_feats has {src_feats.shape[0]} samples and dst_feats {dst_feats.shape[0]}; "
            "pass features of the same images"
        )
    weight, bias = adapter.channel_map()
    src_feats, dst_feats = src_feats.to(weight.device), dst_feats.to(weight.device)
    out_shape = tuple(adapter(src_feats).shape)
    if out_shape != tuple(dst_feats.shape):
        raise AdapterError(
            f"adapter maps src_feats {tuple(src_feats.shape)} to {out_shape}, but dst_feats is "
            f"{tuple(dst_feats.shape)}; build the adapter from these two cut shapes"
        )
    dst_norm = float(dst_feats.norm())
    if dst_norm == 0:
        raise AdapterError("dst_feats is all zeros; nothing to fit (check the source cut and the images)")
    solver = torch.device("cpu")
    x = adapter.resample(src_feats).flatten(0, 1).to(solver, torch.float64)  # (N, in)
    y = adapter.dst_rows(dst_feats).flatten(0, 1).to(solver, torch.float64)  # (N, out)
    xa = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
    gram = xa.T @ xa
    lam = ridge * gram.diagonal()[:-1].mean()
    gram[:-1, :-1] += lam * torch.eye(x.shape[1], dtype=gram.dtype, device=gram.device)
    beta = torch.linalg.lstsq(gram, xa.T @ y, driver="gelsd").solution  # (in + 1, out)
    weight.copy_(beta[:-1].T.reshape(weight.shape))
    bias.copy_(beta[-1])
    adapter.fit_prefix(dst_feats)
    return ((adapter(src_feats) - dst_feats).norm() / dst_norm).item()
