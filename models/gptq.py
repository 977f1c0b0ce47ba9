"""GPTQ (Frantar et al. 2022): the weight-only 2-/3-bit group-wise baseline, in the shared harness.

Followed: the reference implementation (IST-DASLab/gptq, ``gptq.py`` ``fasterquant`` and ``quant.py``
``Quantizer``) with its defaults except act-order:

- quantizer: per row, asymmetric min-max with ``2^bits`` levels, range widened to contain 0
  (``xmin = min(min w, 0)``, ``xmax = max(max w, 0)``; an all-zero row gets ``[-1, 1]``),
  ``scale = (xmax - xmin) / (2^bits - 1)``, integer ``zero = round(-xmin / scale)``,
  ``q = scale * (clamp(round(w / scale) + zero, 0, 2^bits - 1) - zero)``;
- groups of :data:`GROUP_SIZE` = 128 input columns: a group's scale and zero are fitted on the *current*
  (already compensated) weights of its columns when the column loop reaches the group's first column;
  a last partial group (SmolLM2: K = 576 = 4 * 128 + 64) gets its own scale and zero;
- ``Hinv`` = the upper Cholesky factor of the damped inverse Hessian, from the shared
  :func:`~pbs2pc.models.pbs2p.prepare_hessian` (``percdamp = 0.01``, dead columns zeroed there);
- lazy batches of :data:`BLOCK` = 128 columns: inside a block, column by column, quantize ``w_i``,
  ``e = (w_i - q_i) / Hinv_ii``, ``W[:, i:] -= e Hinv[i, i:]`` (block-local); after the block,
  ``W[:, end:] -= Err @ Hinv[blk, end:]``;
- no act-order (the reference's default; it is not implemented here), no MSE grid search, no static groups.

Deviations, all small: scales are rounded to fp16 when fitted (the reference fits in fp32 and stores fp16
when packing), so the error compensation sees the scale that is stored and counted; ``prepare_hessian``
retries the Cholesky factorisation with 10x the damping where it fails (the reference would stop); when
a group straddles two lazy blocks (only with a group size that is not a multiple of the block) its scale
is fitted on the current weights of both (the reference reads the not yet block-updated matrix there).

Honest bits per weight of a layer with K input columns: ``bits`` per weight plus, per row and per group,
one fp16 scale and one zero stored at ``bits`` bits (as GPTQ packs zeros):
``bits + (16 + bits) * ceil(K / 128) / K``. Interchange and compact are that number; "paper" is ``bits``
(what GPTQ's tables print).

Like ``billm``/``arb`` this is a **PyTorch-only evaluation baseline**: the dequantized weight is stored
in the ordinary ``nn.Linear``; the manifest says ``"exportable": false``. The ``--nm`` scheme does not
apply (nothing is pruned; its M is recorded as the per-layer N), nor does ``--group-size``: the groups
are always :data:`GROUP_SIZE` columns (the run's settings say so).
"""

from __future__ import annotations

import math

import torch

from pbs2pc.errors import Pbs2pcError
from pbs2pc.models.format import NMScheme
from pbs2pc.models.pbs2p import layer_errors, prepare_hessian, refuse_options, run_calibrated

#: input columns sharing one scale and zero
GROUP_SIZE = 128
#: lazy-batch width of the column loop
BLOCK = 128


def honest_bits(bits: int, k: int, group_size: int = GROUP_SIZE) -> float:
    """Bits per weight: ``bits`` + per group one fp16 scale and one ``bits``-bit zero, over K columns."""
    return bits + (16 + bits) * math.ceil(k / group_size) / k


def minmax_params(x: torch.Tensor, maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(scale, zero)`` of the asymmetric min-max grid of ``x`` ``[rows, cols]`` (scale fp16-exact)."""
    x = x.float()
    zero_t = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    xmin = torch.minimum(x.min(1).values, zero_t)
    xmax = torch.maximum(x.max(1).values, zero_t)
    flat = (xmin == 0) & (xmax == 0)
    xmin[flat], xmax[flat] = -1.0, 1.0
    scale = ((xmax - xmin) / maxq).to(torch.float16).float()
    scale = scale.clamp_min(2.0**-24)  # the smallest fp16 value; only a group narrower than ~1e-7 gets it
    zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Dequantized ``x`` on the grid ``scale * (k - zero)``, ``k`` in ``0..maxq`` (``x`` ``[rows]`` or ``[rows, c]``)."""
    if x.dim() == 2:
        scale, zero = scale[:, None], zero[:, None]
    return scale * (torch.clamp(torch.round(x / scale) + zero, 0, maxq) - zero)


def gptq_quantize(w: torch.Tensor, u: torch.Tensor, bits: int, group_size: int = GROUP_SIZE, block: int = BLOCK):
    """The GPTQ column loop on prepared ``w`` with ``u`` = upper Cholesky of the damped ``H^-1``.

    Returns ``(Q, scale, zero)``; ``scale`` and ``zero`` are ``[rows, ceil(K / group_size)]``.
    """
    if not 1 <= bits <= 8:
        raise Pbs2pcError(f"GPTQ supports 1 to 8 bits per weight, got {bits}.")
    w = w.clone().float()
    rows, k = w.shape
    maxq = 2**bits - 1
    q = torch.zeros_like(w)
    groups = math.ceil(k / group_size)
    scales = torch.zeros(rows, groups, dtype=w.dtype, device=w.device)
    zeros = torch.zeros_like(scales)
    # thousands of small ops: intra-op threads cost more in synchronisation than they save (up to 30x
    # slower on a busy 2-core machine), so the loop runs on one thread
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _column_loop(w, u, q, scales, zeros, maxq, group_size, block)
    finally:
        torch.set_num_threads(threads)
    return q, scales, zeros


def _column_loop(w, u, q, scales, zeros, maxq, group_size, block):
    """GPTQ's lazy-batch loop; fills ``q``, ``scales`` and ``zeros`` in place (``w`` is updated too)."""
    k = w.shape[1]
    scale = zero = None
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:
                current = torch.cat([w1[:, i : i + group_size], w[:, i2 : col + group_size]], 1)
                scale, zero = minmax_params(current, maxq)
                scales[:, col // group_size], zeros[:, col // group_size] = scale, zero
            x = w1[:, i]
            qc = quantize(x, scale, zero, maxq)
            q[:, col] = qc
            e = (x - qc) / u1[i, i]
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            err1[:, i] = e
        if i2 < k:
            w[:, i2:] -= err1 @ u[i1:i2, i2:]


def gptq_linear(w0: torch.Tensor, h: torch.Tensor, scheme: NMScheme, bias=None, *, bits: int,
                group_size: int = GROUP_SIZE, block: int = BLOCK, percdamp: float = 0.01):
    """GPTQ one linear: ``(dequantized dense weight, stats)``; ``scheme`` supplies only M (nothing is pruned)."""
    w, u = prepare_hessian(w0, h, percdamp)
    q, _, _ = gptq_quantize(w, u, bits, group_size, block)
    honest = honest_bits(bits, w0.shape[1], group_size)
    stats = layer_errors(w0, q, h)
    stats.update(n=scheme.m, bits={"interchange": honest, "compact": honest, "paper": float(bits)})
    return q, stats


def make_method(bits: int, group_size: int = GROUP_SIZE):
    """A ``compress_model`` method ``gptq-w<bits>`` (PyTorch-only; the N:M scheme is ignored)."""
    name = f"gptq-w{bits}"

    def method(model, scheme: NMScheme, *, percdamp: float = 0.01, **options) -> dict:
        refuse_options(name, options)

        def one(w, h, s, b):
            return gptq_linear(w, h, s, b, bits=bits, group_size=group_size, percdamp=percdamp)

        settings = {"scheme": f"w{bits} g{group_size} asymmetric min-max (N:M not applied)", "bits": bits,
                    "group_size": group_size, "block": BLOCK, "percdamp": percdamp, "act_order": False}
        info = run_calibrated(model, scheme, one, method=name, settings=settings, **options)
        info["exportable"] = False
        return info

    method.__name__ = name.replace("-", "_")
    method.__doc__ = f"Registered as ``{name}``: GPTQ, {bits}-bit, groups of {group_size} (see :mod:`.gptq`)."
    return method
