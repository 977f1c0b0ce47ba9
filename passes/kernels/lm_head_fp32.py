"""The one-token LM head on its fp32 table, ``y = x @ Wᵀ``, as a tuning kernel.

Compiled without a tuning database, the fp32 head is the graph's ``matmul(x, permute_dims(W))``, fused
into one ``x @ Wᵀ`` and scheduled by the CPU matmul rule's GEMV for a K-contiguous operand
(:func:`pbs2pc.passes.schedules.cpu_matmul._gemv_inner`: rows of the table side by side, per-row vector
partial sums over K). Its constants were picked on AVX-512 (16 rows: 16 zmm accumulators of 32
registers); on AVX2's 16 ymm registers the same tile spills. This module builds that same computation
and schedule with the rule's choices as knobs (:func:`knobs`), so ``pbs2pc tune`` measures them like a
kernel registry entry's and ``compile --tuning-db`` builds the head with the fastest
(:class:`pbs2pc.passes.LowerLMHead`); without a database the graph keeps its matmul and the rule's
defaults, which are this module's default setting.
"""

from __future__ import annotations

from pbs2pc.compiler.tvm_compat import te
from pbs2pc.passes.schedules import cpu_matmul


def supported(vocab: int, hidden: int, lanes: int) -> bool:
    """Whether a ``[vocab, hidden]`` fp32 table runs here: whole vectors of ``lanes`` along the hidden size."""
    return lanes > 0 and hidden % lanes == 0 and vocab > 0


def knobs(vocab: int, hidden: int, lanes: int) -> dict:
    """The tuner's search space, the rule's defaults first (:func:`cpu_matmul.gemv_inner_knobs`)."""
    return cpu_matmul.gemv_inner_knobs(vocab, hidden, lanes)


def lm_head_fp32(vocab: int, hidden: int, lanes: int, **settings):
    """The scheduled PrimFunc ``(x [1, H] f32, table [V, H] f32, y [1, V] f32)``: ``y = x @ tableᵀ`` for one
    token, the matmul rule's GEMV schedule with ``settings`` (``rows``, ``k_lanes``, ``unroll_k``; none:
    the rule's defaults) for a target of ``lanes`` fp32 lanes."""
    x = te.placeholder((1, hidden), "float32", name="x")
    table = te.placeholder((vocab, hidden), "float32", name="table")
    k = te.reduce_axis((0, hidden), name="k")
    y = te.compute((1, vocab), lambda i, j: te.sum(x[i, k] * table[j, k], axis=k), name="y")
    func = te.create_prim_func([x, table, y]).without_attr("global_symbol")  # named where it is added
    return cpu_matmul.gemv_inner(func, lanes, **settings)


def reference(x, table):
    """float64 numpy oracle: ``x [1, H] @ tableᵀ``."""
    import numpy as np

    return np.asarray(x, np.float64) @ np.asarray(table, np.float64).T
