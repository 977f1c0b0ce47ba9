"""The fp32 GEMM (M rows, any M) for the pbs2p sparse-binary linear op on x86 with AVX-512: lookup tables.

The x86 preset's prompt calls (``main``, ``prefill``: a symbolic number of rows) run this kernel; one-row
calls run the GEMV (``sparse_binary_gemv``), which it extends to many rows. The TE kernel it replaces decodes
each weight to fp32 and spends one FMA per 16 weights and row, which on Zen 4 is bound by the FMA pipes (it
ran at about 83 % of their peak). Here the FMAs become table lookups and adds, which other pipes execute.

Arithmetic (exact fp32, no quantisation): the GEMV's, per row. With ``P = mask & sign`` and ``M = mask``,

    y[m, o] = sum_g 2 alpha[o, g] * XP[m, o, g] + (mu[o, g] - alpha[o, g]) * XM[m, o, g]

where ``XP``/``XM`` sum ``x[m, k]`` over the set bits of the plane. ``sparse_binary_gemv.reference`` applied
to each row is the oracle.

Schedule. Every row gets subset-sum tables (``T_mj[e] = sum_{i: bit i of e} x[m, 4j + i]``: one zmm of fp32
per row and 4 inputs, ``16 K`` bytes a row), and per chunk of ``KC`` inputs the plane nibbles of ``R`` tiles
of 16 output rows become ``vpermps`` indices (int32 lanes, ``32 KC`` bytes per tile, in L1/L2). For blocks of
``MR`` rows x ``RR`` tiles, per 4 inputs, the rows' tables are looked up with the tiles' indices: ``2 MR RR``
``vpermps`` + ``vaddps`` into accumulators that are scaled by the group's ``alpha``/``mu`` into ``y`` once
per group. Rows past the last whole block run one at a time. How the work is split over parallel tasks
depends on the layer's size:

* small layers (``N K <= ROW_SPLIT_MAX_WEIGHTS``): a task owns a slice of the rows; it builds their tables
  and runs them against every tile (one parallel launch, and no thread reads what another wrote);
* large layers: per chunk of ``MC`` rows a parallel stage builds every row's tables, then a task owns ``R``
  tiles and runs every row against them (the indices are decoded once per tile, not once per row slice).
"""

from __future__ import annotations

from pbs2pc.compiler.tvm_compat import T
from pbs2pc.passes.kernels.x86_avx512 import sparse_binary_gemv
from pbs2pc.passes.kernels.x86_avx512.sparse_binary_gemv import (LANES, group_output, p_plane, row_plane, subset_sum,
                                                      tiles_per_task, vpermps, without_absent)

#: Register block: input rows x 16-row tiles, ``2 MR RR`` accumulators (+ ``2 RR`` index registers).
ROWS_PER_BLOCK = 4
TILES_PER_BLOCK = 2
#: 16-row tiles per parallel task: the tables of a row block are reused across them.
TILES_PER_TASK = 8
#: Rows whose tables are built at once: as many as fit ``TABLE_BYTES`` (``16 K`` bytes a row, in L3), at
#: least ``ROWS_PER_CHUNK``. Each chunk costs two parallel launches, about 10 us each here.
TABLE_BYTES = 8 << 20
ROWS_PER_CHUNK = 64
#: Inputs per index chunk (rounded to whole groups).
COLUMNS_PER_CHUNK = 256
#: Layers up to this many weights split the rows over the tasks (each builds its rows' tables and reads all
#: the weights; at most ``ROW_TASKS`` tasks of at least ``2 MR`` rows); larger layers split the output tiles
#: (every task reads every row's tables, built once). On SmolLM2's layers the tile split ran at two speeds,
#: per process (a two-thread effect: 192x576 at M = 128 took 176 or 420 us); the row split ran 135-145 us,
#: and at 32-512 rows it was level with the tile split's fast speed or faster (1536x576 at M = 128: 850 vs
#: 833 us, 192x576: 135 vs 178 us). On 4096x4096 and 4096x11008 it was 4-17 % slower: it decodes the
#: weights once per task (docs/performance.md).
ROW_SPLIT_MAX_WEIGHTS = 1 << 22
ROW_TASKS = 8


def supported(out_features: int, in_features: int, group_size: int, interleave: int, plane_dtype: str) -> bool:
    """Whether the kernel covers this layer (else the TE kernel runs it): the layouts the GEMV covers with
    mask planes."""
    return sparse_binary_gemv.supported(out_features, in_features, group_size, interleave, plane_dtype)


def gemm_fp32(out_features: int, in_features: int, group_size: int, has_mask: bool, has_mu: bool,
              has_bias: bool):
    """The PrimFunc ``(x [M, K] f32, sign, [mask], alpha, [mu], [bias], y [M, N] f32)``, M symbolic."""
    N, K, G = out_features, in_features, group_size
    R = tiles_per_task(N, TILES_PER_TASK)
    RR = TILES_PER_BLOCK if R % TILES_PER_BLOCK == 0 else 1
    MR = ROWS_PER_BLOCK
    MC = max(ROWS_PER_CHUNK, TABLE_BYTES // (16 * K) // MR * MR)
    NT, GB = N // LANES, K // G
    J = G // 4  # table nibbles per group
    GC = max(1, COLUMNS_PER_CHUNK // G)  # groups per index chunk
    NCH = (GB + GC - 1) // GC
    PL = 2 if has_mask else 1  # planes looked up: P (and M)

    def nibbles(bytes16, half):
        # nibble ``half`` of each row's plane byte in its int32 lane: the vpermps index (it reads bits 0-3)
        return T.shift_right(T.Cast("int32x16", bytes16), T.broadcast(4 * half, LANES))

    @T.macro
    def block(tab, idx, xsum, alpha, mu, y, task, rb, ch, m0, t0, mr):
        # rows m0 .. m0 + mr - 1 (t0 .. in the table chunk) x tiles rb RR .. of the task, groups of chunk ch
        accp = T.alloc_buffer((mr, RR, LANES), "float32", scope="local")
        accm = T.alloc_buffer((mr, RR, LANES), "float32", scope="local")
        for gg in range(T.min(GC, GB - ch * GC)):
            for i in T.unroll(mr):
                for r in T.unroll(RR):
                    for l in T.vectorized(LANES):
                        accp[i, r, l] = T.float32(0)
                        accm[i, r, l] = T.float32(0)
            for j in range(J):
                for i in T.unroll(mr):
                    for r in T.unroll(RR):
                        accp[i, r, T.ramp(0, 1, LANES)] = accp.vload([i, r, 0], "float32x16") + vpermps(
                            tab.vload([t0 + i, (ch * GC + gg) * J + j, 0], "float32x16"),
                            idx.vload([rb * RR + r, 0, gg * J + j, 0], "int32x16"))
                        if has_mask:
                            accm[i, r, T.ramp(0, 1, LANES)] = accm.vload([i, r, 0], "float32x16") + vpermps(
                                tab.vload([t0 + i, (ch * GC + gg) * J + j, 0], "float32x16"),
                                idx.vload([rb * RR + r, PL - 1, gg * J + j, 0], "int32x16"))
            for i in T.unroll(mr):
                for r in T.unroll(RR):
                    for l in T.vectorized(LANES):
                        if not has_mask:
                            accm[i, r, l] = xsum[t0 + i, ch * GC + gg]
                        y[m0 + i, ((task * R + rb * RR + r) * LANES + l)] = y[
                            m0 + i, ((task * R + rb * RR + r) * LANES + l)] + group_output(
                            alpha, mu, has_mu, task * R + rb * RR + r, ch * GC + gg, l, accp[i, r, l], accm[i, r, l])

    @T.macro
    def row_tables(tab, xsum, x, y, bias, t, m):
        # row m's tables at tab[t] (and, without a mask plane, its group sums of x); y[m] starts as the bias or 0
        for j in range(K // 4):
            for e in T.vectorized(LANES):
                tab[t, j, e] = subset_sum(x, m, j, e)
        if not has_mask:
            for g in range(GB):
                xsum[t, g] = T.float32(0)
                for k in range(G):
                    xsum[t, g] = xsum[t, g] + x[m, g * G + k]
        for o in range(NT):
            for l in T.vectorized(LANES):
                y[m, o * LANES + l] = bias[o * LANES + l] if has_bias else T.float32(0)

    @T.macro
    def tile_indices(idx, sign, mask, task, ch):
        # the nibbles of the R tiles of ``task`` in index chunk ch, as vpermps indices
        for r in range(R):
            for cc in range(T.min(GC * G, K - ch * GC * G) // 8):
                for h in T.unroll(2):
                    idx[r, 0, 2 * cc + h, T.ramp(0, 1, LANES)] = nibbles(
                        p_plane(sign, mask, task * R + r, ch * GC * G // 8 + cc, has_mask), h)
                    if has_mask:
                        idx[r, PL - 1, 2 * cc + h, T.ramp(0, 1, LANES)] = nibbles(
                            row_plane(mask, task * R + r, ch * GC * G // 8 + cc), h)

    row_split = N * K <= ROW_SPLIT_MAX_WEIGHTS  # a Python bool: TVMScript conditions must be one

    def task_rows(M):
        # the row split's rows per task: a multiple of MR, at least 2 MR, for at most ROW_TASKS tasks
        return T.max(T.int64(2 * MR), ((M + ROW_TASKS - 1) // ROW_TASKS + MR - 1) // MR * MR)

    @T.prim_func(private=True, check_well_formed=False)
    def kernel(var_x: T.handle, sign: T.Buffer((NT, K // 8, LANES), "uint8"),
               mask: T.Buffer((NT, K // 8, LANES), "uint8"), alpha: T.Buffer((NT, GB, LANES), "float16"),
               mu: T.Buffer((NT, GB, LANES), "float16"), bias: T.Buffer((N,), "float32"), var_y: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        M = T.int64()
        x = T.match_buffer(var_x, (M, K), "float32")
        y = T.match_buffer(var_y, (M, N), "float32")
        if row_split:  # tasks own row slices: each builds the tables it reads
            for rg in T.parallel((M + task_rows(M) - 1) // task_rows(M)):
                rows = T.min(task_rows(M), M - rg * task_rows(M))
                tab = T.alloc_buffer((task_rows(M), K // 4 + 1, LANES), "float32")
                xsum = T.alloc_buffer((task_rows(M), GB), "float32")
                idx = T.alloc_buffer((R, PL, GC * J + 1, LANES), "int32")
                # 1. The tables of this task's rows (and y's initial value: the bias or 0).
                for t in range(rows):
                    row_tables(tab, xsum, x, y, bias, t, rg * task_rows(M) + t)
                # 2. Per R tiles and index chunk: the tiles' nibbles as vpermps indices, then the row blocks.
                for task in range(NT // R):
                    for ch in range(NCH):
                        tile_indices(idx, sign, mask, task, ch)
                        for mb in range(rows // MR):
                            for rb in range(R // RR):
                                block(tab, idx, xsum, alpha, mu, y, task, rb, ch, rg * task_rows(M) + mb * MR,
                                      mb * MR, MR)
                        for t in range(rows // MR * MR, rows):
                            for rb in range(R // RR):
                                block(tab, idx, xsum, alpha, mu, y, task, rb, ch, rg * task_rows(M) + t, t, 1)
        else:  # tasks own output tiles and read every row's tables
            tab = T.alloc_buffer((MC, K // 4 + 1, LANES), "float32")  # rows 64 bytes apart from 4 KiB strides
            xsum = T.alloc_buffer((MC, GB), "float32")  # XM of a layer without a mask plane: the group's sum of x
            for mc in range((M + MC - 1) // MC):
                # 1. The tables of the chunk's rows (and y's initial value: the bias or 0).
                for t in T.parallel(T.min(MC, M - mc * MC)):
                    row_tables(tab, xsum, x, y, bias, t, mc * MC + t)
                # 2. Per task: per index chunk, the tiles' nibbles as vpermps indices, then the row blocks.
                for task in T.parallel(NT // R):
                    idx = T.alloc_buffer((R, PL, GC * J + 1, LANES), "int32")
                    for ch in range(NCH):
                        tile_indices(idx, sign, mask, task, ch)
                        rows = T.min(MC, M - mc * MC)
                        for mb in range(rows // MR):
                            for rb in range(R // RR):
                                block(tab, idx, xsum, alpha, mu, y, task, rb, ch, mc * MC + mb * MR, mb * MR, MR)
                        for t in range(rows // MR * MR, rows):
                            for rb in range(R // RR):
                                block(tab, idx, xsum, alpha, mu, y, task, rb, ch, mc * MC + t, t, 1)

    return without_absent(kernel, has_mask, has_mu, has_bias)
