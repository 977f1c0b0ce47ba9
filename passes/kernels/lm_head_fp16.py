"""The LM head on a vocabulary table stored in fp16 (``pbs2pc compile --lm-head fp16``): ``y = x @ W16ᵀ``.

At one token the LM head is the largest read of a decode step: SmolLM2-135M's tied table is 49152 x 576,
113 MB in fp32, about half of the step (docs/performance.md, "Where a decode step goes"). Stored in fp16
it is half the bytes; this kernel widens each row in registers (``vcvtph2ps`` on x86 with AVX-512, 16
values at a time), multiplies by ``x`` and accumulates in fp32, so the only difference from the fp32 head
is the rounding of the table to fp16 (its perplexity cost: docs/performance.md).

Layout: the table as it is, ``[V, H]`` row-major (the embedding lookup reads the same rows). Each output
is one row's dot product with ``x``: ``STEP`` rows at a time keep independent 16-lane fp32 sums (they
share the loads of ``x``; the K loop is unrolled; the next step's rows are prefetched into L2), reduced
to scalars by halving the vector 4 times.
``x`` has ``M`` rows (symbolic: 1 in ``decode``, the batch in ``prefill``); for each of them a parallel
loop over tasks of ``ROWS_PER_TASK`` table rows. Needs ``H % 16 == 0`` and ``V % 4 == 0``
(:func:`supported`).
"""

from __future__ import annotations

from pbs2pc.compiler.tvm_compat import T, tirx

#: fp32 lanes of one vector of the sums (a zmm register).
LANES = 16
#: Table rows whose sums run side by side (independent FMA chains; one load of x for both). With 2 and the
#: K loop unrolled by 12 (SmolLM2, 49152 x 576 in fp16, 3 tables rotated, 2 threads): 2.18-2.19 ms;
#: 4 rows: 2.15-2.77 ms; K loop not unrolled: 2.50-2.89 ms (2, 4, 8 or 16 rows). The fp32 table with the
#: same loops took 4.29 ms. The kernel is bound by each core's memory streams (one thread: half the speed;
#: a cache-resident table runs 4.7x faster), and the unrolled K loop keeps more loads in flight.
STEP = 2
#: Each step prefetches, line by line, the rows of the step after it into L2 (``prefetcht2``: LLVM's
#: locality 1): 1.14-1.55x faster than without in 8 A/Bs in one process (1.37-2.14 ms against 2.12-2.67 ms;
#: this VM's bandwidth moves between minutes). Measured in one minute and worse: the same into L1
#: (``prefetcht0``: 2.20 ms against 1.37-1.40), ``prefetcht1`` (2.09), non-temporal (2.36); 1 row ahead
#: (1.77), 3 rows (1.84), 4 rows (1.67), 8 rows (1.74).
PREFETCH_ROWS = STEP
PREFETCH_LOCALITY = 1
#: Table rows per parallel task, at most (the largest of 64, 32, 16, 8, 4 dividing V).
ROWS_PER_TASK = 64
#: Vectors of the K loop unrolled, at most (the largest of these dividing H / 16).
K_UNROLL = (12, 9, 8, 6, 4, 3, 2, 1)


def supported(vocab: int, hidden: int) -> bool:
    """Whether the kernel covers a ``[vocab, hidden]`` table."""
    return hidden % LANES == 0 and vocab % 4 == 0


def _rows_per_task(vocab: int) -> int:
    return next(r for r in (ROWS_PER_TASK, 32, 16, 8, 4) if vocab % r == 0)


def prefetch(buffer, *index, locality: int = PREFETCH_LOCALITY):
    """Prefetch the cache line of ``buffer[index]`` (``locality`` 1: into L2, ``prefetcht2``; 2: ``prefetcht1``;
    3: into L1, ``prefetcht0``). It never faults; the index is kept in range."""
    return T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(buffer[index]), T.int32(0),
                                         T.int32(locality), T.int32(1)))


def knobs(vocab: int, hidden: int, unroll_units: int = 1) -> dict:
    """The tuner's search space (:mod:`pbs2pc.compiler.tune`), the hand-picked defaults first: rows side by
    side (``step``), rows prefetched ahead (``prefetch_rows``; 0: none), the prefetch's cache level
    (``locality``), vectors of the K loop unrolled (``k_unroll``; multiples of ``unroll_units``) and table
    rows per parallel task (``rows_per_task``)."""
    vectors = hidden // LANES
    unrolls = [u for u in K_UNROLL if vectors % u == 0 and u % unroll_units == 0]
    tasks = [r for r in (_rows_per_task(vocab), 16, 256) if vocab % r == 0]
    return {"step": (STEP, 1, 4), "prefetch_rows": (PREFETCH_ROWS, 0, 1, 4, 8), "locality": (PREFETCH_LOCALITY, 3),
            "k_unroll": tuple(unrolls),
            "rows_per_task": tuple(dict.fromkeys(tasks))}


def _sum_lanes(vector, lanes: int = LANES):
    """The sum of the lanes of an fp32 vector: add its halves until one lane is left."""
    while lanes > 1:
        lanes //= 2
        vector = T.Shuffle([vector], list(range(lanes))) + T.Shuffle([vector], list(range(lanes, 2 * lanes)))
    return vector


def lm_head_fp16(vocab: int, hidden: int, dtype: str = "float16", rows: int | None = None, step: int = STEP,
                 prefetch_rows: int | None = None, locality: int = PREFETCH_LOCALITY, k_unroll: int | None = None,
                 rows_per_task: int | None = None):
    """The PrimFunc ``(x [M, H] f32, table [V, H] f16, y [M, V] f32)``, M symbolic (``rows``: fixed, as the
    tuner measures it): ``y = x @ tableᵀ``.

    ``dtype="float32"``: the same loops on a float32 table (the benchmarks' baseline for the fp16 one).
    ``step``, ``prefetch_rows`` (rows ahead, 0: none; default ``step``), ``locality``, ``k_unroll``,
    ``rows_per_task``: the tuner's knobs (:func:`knobs`), each result the same bits."""
    V, H = vocab, hidden
    STEP = step  # noqa: N806 - the module default, for this build
    PREFETCH_ROWS = step if prefetch_rows is None else prefetch_rows  # noqa: N806
    RT = rows_per_task or _rows_per_task(V)
    KU = k_unroll or next(u for u in K_UNROLL if (H // LANES) % u == 0)
    if V % RT or RT % STEP or (H // LANES) % KU:
        raise ValueError(f"the LM head kernel cannot run a {V} x {H} table with {RT} rows per task, step {STEP}, "
                         f"{KU} vectors unrolled")
    lead = _prefetch_lines(PREFETCH_ROWS, locality)
    STRIDE = 64 // (int(dtype[5:]) // 8) // LANES  # vectors per 64-byte cache line: 2 of fp16, 1 of fp32
    LINES = (KU + STRIDE - 1) // STRIDE  # lines of one unrolled K block of one row

    M = rows_var(rows)

    @T.prim_func(private=True, check_well_formed=False)
    def kernel(x: T.Buffer((M, H), "float32"), table: T.Buffer((V, H), dtype), y: T.Buffer((M, V), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for m in range(M):
            for task in T.parallel(V // RT):
                acc = T.alloc_buffer((STEP, LANES), "float32", scope="local")
                for s in range(RT // STEP):
                    for r in T.unroll(STEP):
                        for l in T.vectorized(LANES):
                            acc[r, l] = T.float32(0)
                    for ko in range(H // LANES // KU):
                        for line in T.unroll(LINES * lead):
                            for r in T.unroll(STEP):
                                prefetch(table, T.min(task * RT + s * STEP + r + PREFETCH_ROWS, V - 1),
                                         (ko * KU + STRIDE * line) * LANES, locality=locality)
                        for ki in T.unroll(KU):
                            for r in T.unroll(STEP):
                                for l in T.vectorized(LANES):
                                    acc[r, l] = acc[r, l] + x[m, (ko * KU + ki) * LANES + l] * T.Cast(
                                        "float32", table[task * RT + s * STEP + r, (ko * KU + ki) * LANES + l])
                    for r in T.unroll(STEP):
                        y[m, task * RT + s * STEP + r] = _sum_lanes(acc.vload([r, 0], "float32x16"))

    return kernel


def rows_var(rows: int | None):
    """The rows of ``x`` and ``y``: ``rows``, or a symbolic ``M`` (int64) where None."""
    return tirx.Var("M", "int64") if rows is None else rows


def _prefetch_lines(rows_ahead: int, locality: int) -> int:
    """1 where the kernel prefetches, 0 where ``rows_ahead`` is 0 (the prefetch loop is then empty)."""
    if locality not in (1, 2, 3):
        raise ValueError(f"prefetch locality is 1, 2 or 3, not {locality}")
    return 1 if rows_ahead > 0 else 0


def reference(x, table):
    """float64 numpy oracle: ``x [M, H] @ table.astype(float64)ᵀ``."""
    import numpy as np

    return np.asarray(x, np.float64) @ np.asarray(table, np.float64).T
