"""The simple compressor: magnitude N:M mask, sign, closed-form alpha and mu per row per group.

For every row and every aligned group of ``m`` columns the ``n`` largest-magnitude weights are kept. Within
each ``group_size`` block of a row, alpha and mu minimise ``sum over kept j of (W_j - alpha*s_j - mu)^2``
for the signs ``s_j = sign(W_j - mu)``; they are fitted in closed form, alternating a few times (ARB-style),
starting from ``mu = mean``, ``alpha = mean |W - mu|``. No calibration data is used: this is the baseline
that already produces the final format; the PBS2P method proper lives in :mod:`pbs2pc.models.pbs2p`.
"""

from __future__ import annotations

import numpy as np
import torch

from pbs2pc.models.format import NMScheme, PackedLinear, pack_bits


def nm_magnitude_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask keeping the ``n`` largest ``|w|`` of every aligned group of ``m`` along the last dim."""
    rows, k = w.shape
    groups = w.abs().reshape(rows, k // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, groups.topk(n, dim=2).indices, True)
    return keep.reshape(rows, k)


def fit_binary(w: torch.Tensor, keep: torch.Tensor, group_size: int, iters: int = 5):
    """Closed-form alpha, mu (per row per group) and signs for the kept weights of ``w``.

    Returns ``(alpha, mu, sign)`` with alpha, mu of shape ``[N, K/G]`` (float32) and sign bool ``[N, K]``.
    Each step is the exact minimiser of the squared error over the kept entries for the other variables
    fixed, so the error never increases.
    """
    rows, k = w.shape
    wg = w.reshape(rows, k // group_size, group_size)
    kg = keep.reshape(rows, k // group_size, group_size).to(w.dtype)
    count = kg.sum(-1).clamp_min(1)
    mu = (wg * kg).sum(-1) / count
    alpha = ((wg - mu[..., None]).abs() * kg).sum(-1) / count
    for _ in range(iters):
        s = torch.where(wg - mu[..., None] >= 0, 1.0, -1.0)
        mu = ((wg - alpha[..., None] * s) * kg).sum(-1) / count
        alpha = (((wg - mu[..., None]) * s * kg).sum(-1) / count).clamp_min(0)
    sign = (wg - mu[..., None]) >= 0
    return alpha, mu, sign.reshape(rows, k)


def to_packed(sign: torch.Tensor, keep: torch.Tensor, alpha, mu, scheme: NMScheme, bias=None) -> PackedLinear:
    """Assemble the interchange form from boolean planes and float scales."""
    return PackedLinear(
        sign=pack_bits(sign.numpy()),
        mask=None if scheme.dense else pack_bits(keep.numpy()),
        alpha=alpha.to(torch.float16).numpy(),
        mu=None if mu is None else mu.to(torch.float16).numpy(),
        scheme=scheme,
        bias=None if bias is None else bias.detach().float().numpy(),
    ).validate()


def compress_weight(w: torch.Tensor, scheme: NMScheme, bias=None) -> PackedLinear:
    """Compress one float weight ``[N, K]`` with the simple method."""
    scheme.check_shape(*w.shape)
    w = w.detach().float()
    keep = nm_magnitude_mask(w, scheme.n, scheme.m)
    alpha, mu, sign = fit_binary(w, keep, scheme.group_size)
    return to_packed(sign, keep, alpha, mu, scheme, bias)
