"""The methods PBS2P is compared against, in the same harness (calibration, blocks, compensation, errors).

- ``sign``: XNOR/RTN binarization ``alpha * sign(W)`` per row per block (``alpha = mean |W|``), no mean,
  no calibration, no compensation (calibration inputs are used only to *measure* its layer error). Base
  op form, n == m (the mask is omitted; ``--nm`` only supplies M).
- ``billm``: BiLLM (Huang et al. 2024) dense binarization inside the same OBS block loop: per block, the
  Hessian-salient columns (``sum_rows w^2 / U_jj^2``; count searched over 1..49 by binarizing the saliency
  matrix, as BiLLM's ``structural_searching``) get order-2 residual binarization; the other weights are split at a magnitude threshold (searched over 81 percentiles) into
  two groups, each with its own alpha and mu. Plain BiLLM start (no refinement).
- ``arb``: ARB-LLM-style: the same structure with the ARB alternating refinement (15 rounds) in every
  group (ARB-LLM's ARB variant, not its RC or X variants, and without CGB).

``billm`` and ``arb`` need two sign planes on salient columns and per-group bitmaps, which the op contract
(v1) cannot express. They are **PyTorch-only evaluation baselines**: the compressed weight is stored
dequantized in the ordinary ``nn.Linear`` (as the BiLLM/ARB code bases do), and the bits they would need
are counted as below. They cannot be exported (the manifest says ``"exportable": false``).

Honest bits per weight of a BiLLM/ARB block of ``B`` columns with ``k`` salient columns and ``R`` rows:
``1`` (sign) + ``k/B`` (residual plane) + ``(B-k)/B`` (group bitmap of non-salient weights) + ``1/R``
(salient-column bitmap) + ``8*16/B`` (alpha and mu of the 2 salient orders and 2 groups, fp16, per row).
The papers' count (1.06-1.11) is the sign planes only: ``1 + k/B``; we report it as "paper".
"""

from __future__ import annotations

import math

import torch

from pbs2pc.models.binarize import arb_fit, residual_fit
from pbs2pc.models.structure import search_salient
from pbs2pc.models.format import NMScheme, PackedLinear, pack_bits
from pbs2pc.models.pbs2p import bits_dict, layer_errors, obs_quantize, prepare_hessian, refuse_options, run_calibrated


def sign_linear(w0: torch.Tensor, h: torch.Tensor, scheme: NMScheme, bias=None):
    """``alpha * sign(W)`` per row per block (``alpha = mean |W|``): ``(PackedLinear, stats)``."""
    dense = NMScheme(scheme.m, scheme.m, scheme.group_size)
    rows, k = w0.shape
    g = dense.group_size
    b = arb_fit(w0.reshape(rows, k // g, g), None, iters=0, use_mu=False)
    packed = PackedLinear(
        sign=pack_bits(b.sign.reshape(rows, k).cpu().numpy()),
        mask=None,
        alpha=b.alpha.to(torch.float16).cpu().numpy(),
        mu=None,
        scheme=dense,
        bias=None if bias is None else bias.detach().float().cpu().numpy(),
    ).validate()
    stats = layer_errors(w0, torch.from_numpy(packed.dense()).to(w0.device), h)
    stats.update(n=dense.n, bits=bits_dict(dense, has_mu=False))
    return packed, stats


def billm_block(wb: torch.Tensor, d2: torch.Tensor, iters: int, percentiles: int = 41, search_rows: int = 256,
                keep: torch.Tensor | None = None):
    """BiLLM/ARB structure for one block ``[rows, B]``; returns ``(Q, k)`` (k = salient columns).

    The salient columns come from BiLLM's search on the saliency matrix ``s = w^2 / U_jj^2``
    (:func:`pbs2pc.models.structure.search_salient`: candidate counts scored by binarizing ``s`` itself),
    which keeps a few percent of the columns salient, as ARB-LLM's 1.06-1.11 bits show. The magnitude
    split of the other weights is searched on ``w`` over ``percentiles`` quantiles in [0.1, 0.9] (BiLLM: 81
    on ``s``; see :func:`pbs2pc.models.structure.search_split`), on at most ``search_rows`` evenly spaced
    rows, with the plain BiLLM start (iters=0); the final fit uses ``iters`` refinement rounds. With
    ``keep`` (an N:M mask) the structure is fitted on the kept weights only and the pruned ones are
    exactly zero.
    """
    rows, width = wb.shape
    if keep is None:
        keep = torch.ones_like(wb, dtype=torch.bool)
    wb = wb * keep
    pick = torch.linspace(0, rows - 1, min(rows, search_rows), device=wb.device).long()
    ws, ks_keep = wb[pick], keep[pick]
    salient = search_salient(wb.square() / d2, keep, search_rows)
    k = int(salient.sum())
    rest_s = ~salient.expand_as(ws) & ks_keep
    qs = torch.linspace(0.1, 0.9, percentiles, device=wb.device)
    thresholds = torch.quantile(ws.abs()[rest_s], qs)
    m1 = rest_s & (ws.abs()[None] < thresholds[:, None, None])
    wp = ws.expand(percentiles, *ws.shape)
    g1, g2 = arb_fit(wp, m1, 0), arb_fit(wp, rest_s & ~m1, 0)
    err = ((ws - g1.dense() - g2.dense()) * rest_s).square().sum((1, 2))
    t = thresholds[int(err.argmin())]
    salm = salient.expand_as(wb) & keep
    m1 = ~salient & keep & (wb.abs() < t)
    m2 = ~salient & keep & ~(wb.abs() < t)
    s1, s2 = residual_fit(wb, salm, iters)
    q = s1.dense() + s2.dense() + arb_fit(wb, m1, iters).dense() + arb_fit(wb, m2, iters).dense()
    return q, k


def billm_linear(w0: torch.Tensor, h: torch.Tensor, scheme: NMScheme, bias=None, *, iters: int = 0,
                 percdamp: float = 0.01, compensate: bool = True):
    """BiLLM (``iters=0``) or ARB-style (``iters=15``) dense binarization: ``(dense weight, stats)``."""
    g = scheme.group_size
    w, u = prepare_hessian(w0, h, percdamp)
    q, ks = obs_quantize(w, u, g, lambda bi, wb, du: billm_block(wb, du.square(), iters), compensate)
    rows = w.shape[0]
    frac = sum(ks) / (len(ks) * g)
    honest = 1 + frac + (1 - frac) + 1 / rows + 8 * 16 / g
    stats = layer_errors(w0, q, h)
    stats.update(n=scheme.m, salient_fraction=round(frac, 4),
                 bits={"interchange": honest, "compact": honest, "paper": 1 + frac})
    return q, stats


def arb_nm_linear(w0: torch.Tensor, h: torch.Tensor, scheme: NMScheme, bias=None, *, iters: int = 15,
                  percdamp: float = 0.01):
    """Experiment: PBS2P's fine-stage N:M mask (OBS saliency on the compensated block) + the ARB structure.

    Tests whether pruning beats dense ARB when both spend the residual plane and group bitmaps. PyTorch-only.
    """
    from pbs2pc.models.binarize import nm_keep_from_scores

    g, n, m = scheme.group_size, scheme.n, scheme.m

    def block(bi, wb, du):
        keep = nm_keep_from_scores(wb.square() / du.square(), n, m)
        return billm_block(wb, du.square(), iters, keep=keep)

    w, u = prepare_hessian(w0, h, percdamp)
    q, ks = obs_quantize(w, u, g, block)
    frac = sum(ks) / (len(ks) * g)
    density = n / m
    pattern = math.ceil(math.log2(math.comb(m, n))) / m if n < m else 0.0
    # per kept weight: sign + residual on salient + group bit on the rest; plus the N:M pattern and scales
    honest = density * (1 + frac + (1 - frac)) + pattern + 1 / w.shape[0] + 8 * 16 / g
    stats = layer_errors(w0, q, h)
    stats.update(n=n, salient_fraction=round(frac, 4),
                 bits={"interchange": honest + (1 - pattern if n < m else 0), "compact": honest,
                       "paper": density * (1 + frac)})
    return q, stats


def arb_nm_method(model, scheme: NMScheme, *, iters: int = 15, percdamp: float = 0.01, **options) -> dict:
    """Registered as ``arb-nm`` (experiment, PyTorch-only)."""
    for key in ("n_low", "n_high", "steps"):
        options.pop(key, None)

    def one(w, h, s, b):
        return arb_nm_linear(w, h, s, b, iters=iters, percdamp=percdamp)

    info = run_calibrated(model, scheme, one, method="arb-nm", settings={"iters": iters}, **options)
    info["exportable"] = False
    return info


def sign_method(model, scheme: NMScheme, **options) -> dict:
    """Registered as ``sign``."""
    refuse_options("sign", options)
    info = run_calibrated(model, scheme, lambda w, h, s, b: sign_linear(w, h, s, b), method="sign", **options)
    return info


def billm_method(model, scheme: NMScheme, *, iters: int = 0, percdamp: float = 0.01, **options) -> dict:
    """Registered as ``billm`` (and, with ``iters=15``, as ``arb``)."""
    name = "arb" if iters else "billm"

    def one(w, h, s, b):
        return billm_linear(w, h, s, b, iters=iters, percdamp=percdamp)

    info = run_calibrated(model, scheme, one, method=name, settings={"iters": iters, "percdamp": percdamp}, **options)
    info["exportable"] = False
    return info


def arb_method(model, scheme: NMScheme, *, iters: int = 15, **options) -> dict:
    """Registered as ``arb``."""
    return billm_method(model, scheme, iters=iters, **options)
