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

from pbs2pc.compiler.tvm_compat import T

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


def prefetch(buffer, *index):
    """Prefetch the cache line of ``buffer[index]`` into L2 (it never faults; the index is kept in range)."""
    return T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(buffer[index]), T.int32(0),
                                         T.int32(PREFETCH_LOCALITY), T.int32(1)))


def _sum_lanes(vector, lanes: int = LANES):
    """The sum of the lanes of an fp32 vector: add its halves until one lane is left."""
    while lanes > 1:
        lanes //= 2
        vector = T.Shuffle([vector], list(range(lanes))) + T.Shuffle([vector], list(range(lanes, 2 * lanes)))
    return vector


def lm_head_fp16(vocab: int, hidden: int, dtype: str = "float16"):
    """The PrimFunc ``(x [M, H] f32, table [V, H] f16, y [M, V] f32)``, M symbolic: ``y = x @ tableᵀ``.

    ``dtype="float32"``: the same loops on a float32 table (the benchmarks' baseline for the fp16 one)."""
    V, H = vocab, hidden
    RT = _rows_per_task(V)
    KU = next(u for u in K_UNROLL if (H // LANES) % u == 0)
    STRIDE = 64 // (int(dtype[5:]) // 8) // LANES  # vectors per 64-byte cache line: 2 of fp16, 1 of fp32
    LINES = (KU + STRIDE - 1) // STRIDE  # lines of one unrolled K block of one row

    @T.prim_func(private=True, check_well_formed=False)
    def kernel(var_x: T.handle, table: T.Buffer((V, H), dtype), var_y: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        M = T.int64()
        x = T.match_buffer(var_x, (M, H), "float32")
        y = T.match_buffer(var_y, (M, V), "float32")
        for m in range(M):
            for task in T.parallel(V // RT):
                acc = T.alloc_buffer((STEP, LANES), "float32", scope="local")
                for s in range(RT // STEP):
                    for r in T.unroll(STEP):
                        for l in T.vectorized(LANES):
                            acc[r, l] = T.float32(0)
                    for ko in range(H // LANES // KU):
                        for line in T.unroll(LINES):
                            for r in T.unroll(STEP):
                                prefetch(table, T.min(task * RT + s * STEP + r + PREFETCH_ROWS, V - 1),
                                         (ko * KU + STRIDE * line) * LANES)
                        for ki in T.unroll(KU):
                            for r in T.unroll(STEP):
                                for l in T.vectorized(LANES):
                                    acc[r, l] = acc[r, l] + x[m, (ko * KU + ki) * LANES + l] * T.Cast(
                                        "float32", table[task * RT + s * STEP + r, (ko * KU + ki) * LANES + l])
                    for r in T.unroll(STEP):
                        y[m, task * RT + s * STEP + r] = _sum_lanes(acc.vload([r, 0], "float32x16"))

    return kernel


def reference(x, table):
    """float64 numpy oracle: ``x [M, H] @ table.astype(float64)ᵀ``."""
    import numpy as np

    return np.asarray(x, np.float64) @ np.asarray(table, np.float64).T
