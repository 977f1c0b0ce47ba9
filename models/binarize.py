"""Closed-form binarizers: ``W_hat = alpha * B + mu`` per row per block, restricted to kept weights.

Every function works on tensors whose *last* dimension is one block of one row (``[..., G]``), so a whole
weight ``[rows, K]`` is binarized at once as ``w.reshape(rows, K // G, G)``, and searches over candidate
masks add a leading dimension (``[candidates, rows, blocks, G]``) instead of a Python loop.

The updates are ARB-LLM's alternating refinement (``binary_arb.py``: ``high_order_residual_alternating_
order1``), each one the exact minimiser of ``E = sum_{j kept} (w_j - alpha b_j - mu)^2`` in one variable
with the others fixed, so ``E`` never increases:

- ``mu    = mean_{kept}(w - alpha b)``                     (dE/dmu = 0)
- ``alpha = max(0, mean_{kept}(b (w - mu)))``              (dE/dalpha = 0, b^2 = 1)
- ``b     = sign(w - mu)``                                 (pointwise minimiser for alpha >= 0)

The start is BiLLM's (``high_order_residual``): ``mu = mean w``, ``alpha = mean |w - mu|``. Pruned
(not kept) entries are exactly zero in the result and contribute ``w^2`` to the error.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class Binary:
    """One binary plane over ``[..., G]``: ``alpha``, ``mu`` of shape ``[...]``, ``sign`` and ``keep`` bool."""

    alpha: torch.Tensor
    mu: torch.Tensor
    sign: torch.Tensor
    keep: torch.Tensor

    def dense(self) -> torch.Tensor:
        """``(alpha * (2 sign - 1) + mu) * keep``."""
        b = self.sign.to(self.alpha.dtype) * 2 - 1
        return (self.alpha[..., None] * b + self.mu[..., None]) * self.keep


def _masked_mean(x: torch.Tensor, keep: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return (x * keep).sum(-1) / count


def arb_fit(
    w: torch.Tensor,
    keep: torch.Tensor | None = None,
    iters: int = 15,
    alpha: torch.Tensor | None = None,
    mu: torch.Tensor | None = None,
    use_mu: bool = True,
) -> Binary:
    """Binarize ``w`` (``[..., G]``) on ``keep`` with the ARB closed forms.

    Parameters
    ----------
    w, keep
        Weights and the kept-entry mask (broadcastable to ``w``; ``None`` keeps everything).
    iters
        Alternating refinement rounds after the start (0 gives BiLLM's plain order-1 binarization).
    alpha, mu
        A warm start (SPBO passes the previous step's values); default: BiLLM's start.
    use_mu
        ``False`` fits ``alpha * sign(w)`` only (XNOR / sign baseline: ``mu = 0``).
    """
    keep = torch.ones_like(w, dtype=torch.bool) if keep is None else keep.expand_as(w)
    kf = keep.to(w.dtype)
    count = kf.sum(-1).clamp_min(1)
    kw = kf * w
    if mu is None:
        mu = kw.sum(-1) / count if use_mu else torch.zeros(w.shape[:-1], dtype=w.dtype, device=w.device)
    if alpha is None:
        alpha = _masked_mean((w - mu[..., None]).abs(), kf, count)
    # With b = 2p - 1 (p = [w >= mu]), the sums over kept entries the updates need are
    # sum b = 2 sum p - count and sum b w = 2 sum p w - sum w: two masked sums per round.
    sum_w = kw.sum(-1)
    for _ in range(iters):
        p = (w >= mu[..., None]).to(w.dtype)
        sum_b = 2 * (p * kf).sum(-1) - count
        sum_bw = 2 * (p * kw).sum(-1) - sum_w
        if use_mu:
            mu = (sum_w - alpha * sum_b) / count
        alpha = ((sum_bw - mu * sum_b) / count).clamp_min(0)
    sign = w >= mu[..., None]
    return Binary(alpha, mu, sign, keep)


def sq_error(w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``sum over the last dim of (w - q)^2``."""
    return (w - q).square().sum(-1)


def residual_fit(w: torch.Tensor, keep: torch.Tensor, iters: int = 15) -> tuple[Binary, Binary]:
    """Order-2 residual binarization (BiLLM's salient columns): fit ``w``, then fit what is left."""
    first = arb_fit(w, keep, iters)
    second = arb_fit(w - first.dense(), keep, iters)
    return first, second


def nm_keep_from_scores(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest-``score`` entries of every aligned group of ``m`` along the last dim."""
    shape = score.shape
    groups = score.reshape(*shape[:-1], shape[-1] // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.reshape(shape)


def nm_ranks(score: torch.Tensor, m: int) -> torch.Tensor:
    """Rank (0 = lowest score) of every entry inside its aligned group of ``m`` along the last dim."""
    shape = score.shape
    groups = score.reshape(*shape[:-1], shape[-1] // m, m)
    # stable double argsort: ties broken by position, so the ranks are a permutation of 0..m-1
    order = groups.argsort(dim=-1, stable=True)
    return order.argsort(dim=-1).reshape(shape)
