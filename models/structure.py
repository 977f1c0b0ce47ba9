"""The BiLLM/ARB structure inside an N:M keep mask: two magnitude groups plus a salient residual plane.

Per row of one block ``[..., B]`` (a block of ``B`` columns of a compensated weight, as everywhere in
:mod:`.pbs2p`), a kept weight is reconstructed as

    ``w_hat = alpha_g * b + mu_g  (+ alpha_r * r + mu_r  on a salient column)``

where ``g`` in {0, 1} is the weight's magnitude group (a bitmap), ``b`` its sign, and ``r`` the second,
residual sign of the salient columns (shared by all rows of the block, as in BiLLM). Pruned weights are
exactly zero. That is op contract v2 (docs/format.md): six fp16 scales per row and block.

Against BiLLM/ARB (method notes §1.2) one thing differs on purpose: the salient weights' first plane uses
the scales of their magnitude group instead of two extra ones (BiLLM: 8 scales per row and block, here
6). Measured on SmolLM2 layers 8 and 20 the extra pair lowers the layer error by less than 2 % while it
costs ``32 / B`` bits per weight (0.5 at ``B = 64``); see docs/accuracy.md.

Every fit is block-coordinate descent with closed-form steps, so the squared error never increases:
:func:`fit` alternates (1) the first plane of each group, fitted with ARB's updates on
``w - residual`` over that group's kept weights, and (2) the residual, fitted the same way on
``w - first plane`` over the kept salient weights.

The two searches follow BiLLM's ``structural_searching`` / ``find_optimal_split``: both evaluate their
candidates by binarizing the **saliency matrix** ``s = w^2 / U_jj^2`` itself (not ``w``), which is what
makes BiLLM keep a few percent of the columns salient (a search on ``w`` picks 26-49 %).
"""

from __future__ import annotations

import dataclasses

import torch

from pbs2pc.models.binarize import Binary, arb_fit, residual_fit
from pbs2pc.models.format import NMScheme, PackedLinear, pack_bits

#: salient-column counts tried (BiLLM tries every k in 1..49; this grid is about 4x cheaper)
SALIENT_COUNTS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 40, 49)


@dataclasses.dataclass
class Structured:
    """One block fitted with the structure: group planes ``first`` (group 0, group 1), ``residual``."""

    first: tuple[Binary, Binary]
    residual: Binary | None
    group: torch.Tensor  # bool [..., B]: 1 = group 1
    salient: torch.Tensor  # bool [B] (broadcast over rows)

    @property
    def keep(self) -> torch.Tensor:
        return self.first[0].keep | self.first[1].keep

    def first_dense(self) -> torch.Tensor:
        return self.first[0].dense() + self.first[1].dense()

    def dense(self) -> torch.Tensor:
        out = self.first_dense()
        return out if self.residual is None else out + self.residual.dense()

    @property
    def sign(self) -> torch.Tensor:
        """The first plane's sign bits (each weight's from its own group's fit)."""
        return torch.where(self.group, self.first[1].sign, self.first[0].sign)


def fit(w: torch.Tensor, keep: torch.Tensor, group: torch.Tensor, salient: torch.Tensor, iters: int = 15,
        rounds: int = 2, warm: Structured | None = None) -> Structured:
    """Fit the structure to ``w`` (``[..., B]``) on ``keep`` by alternating closed-form updates.

    ``group`` (bool, like ``w``) picks each weight's group; ``salient`` (bool ``[B]``) the residual columns
    (all false: no residual). ``warm`` continues from an earlier fit (SPBO passes the previous step's).
    """
    keep = keep.expand_as(w)
    masks = (keep & ~group, keep & group)
    res_keep = keep & salient.expand_as(w)
    has_res = bool(salient.any())
    res = warm.residual if warm is not None and has_res else None
    first = warm.first if warm is not None else None
    for _ in range(max(1, rounds)):
        target = w if res is None else w - res.dense() * res_keep
        first = tuple(
            arb_fit(target, masks[g], iters, *((first[g].alpha, first[g].mu) if first is not None else (None, None)))
            for g in (0, 1)
        )
        if has_res:
            base = first[0].dense() + first[1].dense()
            res = arb_fit(w - base, res_keep, iters, *((res.alpha, res.mu) if res is not None else (None, None)))
    return Structured(first, res if has_res else None, group, salient)


def search_salient(s: torch.Tensor, keep: torch.Tensor | None = None, search_rows: int = 256,
                   counts=SALIENT_COUNTS) -> torch.Tensor:
    """BiLLM's salient-column search on the saliency matrix ``s`` (``[rows, B]``): bool ``[B]``.

    Columns are ranked by ``sum_rows s``; for each candidate count ``k`` the top-``k`` columns get an
    order-2 residual binarization and the rest order-2 too (all of ``s``, BiLLM's ``structural_searching``),
    and the ``k`` with the smallest squared error on ``s`` wins. Errors are evaluated on at most
    ``search_rows`` evenly spaced rows (the choice is one per block anyway).
    """
    rows, width = s.shape
    keep = torch.ones_like(s, dtype=torch.bool) if keep is None else keep
    s = s * keep
    order = s.sum(0).argsort(descending=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(width, device=s.device)
    pick = torch.linspace(0, rows - 1, min(rows, search_rows), device=s.device).long()
    ss, kk = s[pick], keep[pick]
    ks = torch.tensor([k for k in counts if k < width], device=s.device)
    sal = (rank[None, :] < ks[:, None])[:, None, :].expand(len(ks), *ss.shape)
    sk = ss.expand(len(ks), *ss.shape)
    parts = [*residual_fit(sk, sal & kk, 0), *residual_fit(sk, ~sal & kk, 0)]
    err = ((sk - sum(p.dense() for p in parts)) * kk).square().sum((1, 2))
    return rank < int(ks[int(err.argmin())])


def search_split(w: torch.Tensor, region: torch.Tensor, percentiles: int = 41, search_rows: int = 256) -> torch.Tensor:
    """The magnitude split of ``w`` (``[rows, B]``) inside ``region``: the threshold ``t`` (group 1 is
    ``|w| >= t``).

    ``t`` is searched over ``percentiles`` quantiles in [0.1, 0.9] of ``|w|`` inside ``region``; each
    candidate binarizes ``w`` at order 1 in the two groups (on at most ``search_rows`` evenly spaced rows)
    and the smallest squared error wins (BiLLM's
    ``find_optimal_split``, which thresholds and scores the saliency matrix instead: on SmolLM2 layers 8
    and 20 that gives 1.6x the layer error of splitting ``w``, see docs/accuracy.md).
    """
    pick = torch.linspace(0, w.shape[0] - 1, min(w.shape[0], search_rows), device=w.device).long()
    w, region = w[pick], region[pick]
    mag = w.abs()
    vals = mag[region]
    if vals.numel() < 2:
        return torch.tensor(float("inf"), device=w.device)
    qs = torch.linspace(0.1, 0.9, percentiles, device=w.device)
    thresholds = torch.quantile(vals.float(), qs)
    hi = region & (mag[None] >= thresholds[:, None, None])
    wp = w.expand(percentiles, *w.shape)
    g0, g1 = arb_fit(wp, region & ~hi, 0), arb_fit(wp, hi, 0)
    err = ((wp - g0.dense() - g1.dense()) * region).square().sum((1, 2))
    return thresholds[int(err.argmin())]


# ----------------------------------------------------------------------------------------------------------
# Packing per-block fits into the format

def _half(t: torch.Tensor):
    return t.to(torch.float16).cpu().numpy()


def pack_single(blocks: list[Binary], scheme: NMScheme, bias=None) -> PackedLinear:
    """Per-block single planes -> an op contract v1 :class:`PackedLinear`."""
    return PackedLinear(
        sign=pack_bits(torch.cat([b.sign for b in blocks], 1).cpu().numpy()),
        mask=None if scheme.dense else pack_bits(torch.cat([b.keep for b in blocks], 1).cpu().numpy()),
        alpha=_half(torch.stack([b.alpha for b in blocks], 1)),
        mu=_half(torch.stack([b.mu for b in blocks], 1)),
        scheme=scheme,
        bias=None if bias is None else bias.detach().float().cpu().numpy(),
    ).validate()


def pack_structured(blocks: list, scheme: NMScheme, bias=None) -> PackedLinear:
    """Per-block :class:`~.structure.Structured` fits -> an op contract v2 :class:`PackedLinear`."""
    keep = torch.cat([b.keep for b in blocks], 1)
    extra = {}
    if any(bool(b.group.any()) for b in blocks):
        extra.update(group=pack_bits((torch.cat([b.group for b in blocks], 1) & keep).cpu().numpy()),
                     group_alpha=_half(torch.stack([b.first[1].alpha for b in blocks], 1)),
                     group_mu=_half(torch.stack([b.first[1].mu for b in blocks], 1)))
    if any(b.residual is not None for b in blocks):
        rows = keep.shape[0]
        zeros = torch.zeros(rows)
        salient = torch.cat([b.salient for b in blocks])
        rsign = torch.cat([b.residual.sign[:, b.salient] for b in blocks if b.residual is not None], 1)
        padded = torch.zeros(rows, max(8, -(-rsign.shape[1] // 8) * 8), dtype=torch.bool)
        padded[:, : rsign.shape[1]] = rsign
        extra.update(salient=pack_bits(salient[None].cpu().numpy()), residual=pack_bits(padded.cpu().numpy()),
                     residual_alpha=_half(torch.stack([b.residual.alpha if b.residual is not None else zeros for b in blocks], 1)),
                     residual_mu=_half(torch.stack([b.residual.mu if b.residual is not None else zeros for b in blocks], 1)))
    return PackedLinear(
        sign=pack_bits(torch.cat([b.sign for b in blocks], 1).cpu().numpy()),
        mask=None if scheme.dense else pack_bits(keep.cpu().numpy()),
        alpha=_half(torch.stack([b.first[0].alpha for b in blocks], 1)),
        mu=_half(torch.stack([b.first[0].mu for b in blocks], 1)),
        scheme=scheme,
        bias=None if bias is None else bias.detach().float().cpu().numpy(),
        **extra,
    ).validate()
