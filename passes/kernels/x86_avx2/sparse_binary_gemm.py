"""The fp32 GEMM (M rows, any M) for the pbs2p sparse-binary linear op on x86 with AVX2, FMA and F16C.

The x86-avx2 preset's prompt calls (``main``, ``prefill``: a symbolic number of rows) run this kernel; one-row
calls run the GEMV (``sparse_binary_gemv``). Exact fp32 (no quantisation of ``x``), the arithmetic of the GEMV
per row: with ``P = mask & sign`` and ``M = mask`` as 0/1 planes,

    y[m, o] = sum_g 2 alpha[o, g] * XP[m, o, g] + (mu[o, g] - alpha[o, g]) * XM[m, o, g]

where ``XP``/``XM`` sum ``x[m, k]`` over the set bits of the plane (without a mask plane ``XM`` is the group's
sum of ``x``; without mu the group term is ``alpha (2 XP - XM)``).

Design: **byte tables vectorised over the input rows.** The AVX-512 GEMM's per-row ``vpermps`` tables do not
pay on AVX2 (8-entry ``vpermps`` ymm costs 1.3 cycles on Zen 2: per 64 weights and row it needs more shuffle
time than the 8 FMAs of a dense product), and a dense decode-then-FMA kernel is at best FMA-bound, where
torch's fp32 GEMM already runs. Here the lanes run over ``RB`` = 16 *input rows* instead of output rows: per
block of 16 rows and column byte ``c`` (inputs ``8c .. 8c+7``) the kernel builds the 256 subset sums

    tab[c, e, l] = sum_{i: bit i of e} x[16 rb + l, 8c + i]      (256 x 16 fp32 = 16 KiB per column byte)

with one vector add per entry (``tab[2^b + e] = tab[e] + x[8c + b]``), and then a plane byte of an output row,
as a scalar index, picks one 64-byte line: ``XP[16 rows] += tab[c, P byte]`` is two ``vaddps`` with a memory
operand for 8 weights x 16 rows (128 multiply-adds, 16 FMAs in a dense kernel), ``XM`` two more. The plane
bytes of two output rows come from one 16-bit load per plane (``OUTPUTS_PER_STEP``; ``P = sign & mask`` one
``and``), each byte shifted to a line offset. Per scale group the two sums meet the scales (scalar
``alpha``/``mu``, broadcast) in FMAs into a transposed accumulator ``yt[o, 16 rows]``, written to ``y`` once
per task. The tables of a group (``G/8 x 16 KiB``: 256 KiB at G = 128) sit in L2 (a 6:8 mask byte takes one
of 28 values, so the ``XM`` lines mostly hit L1). Measured 1.5-1.7 ns per output row, column byte and row
block on one Zen 2 core (4 ``vaddps`` + 5 loads + 5 integer ops), cache-resident or not (all lookups on one
line: 8 % faster): the 16 FMAs of a dense kernel take 2.6 ns at the FMA pipes' peak.

Parallel tasks: (tile chunk, row block) pairs, tile chunk outer. A task builds its row block's tables once
per group and runs its chunk of 16-row tiles against them (the build, 255 vector adds and stores per column
byte and row block, is amortised over the chunk's ``2 x 16 x tiles`` lookups per column byte, so chunks are
large: ``TILES_PER_CHUNK``), then writes its ``yt`` to ``y``. Rows past ``M`` in the last block are zero in
the tables and never written.
"""

from __future__ import annotations

from pbs2pc.compiler.tvm_compat import T
from pbs2pc.passes.kernels.x86_avx2 import sparse_binary_gemv
from pbs2pc.passes.kernels.x86_avx512.sparse_binary_gemv import without_absent

#: Input rows per block: the lanes of the tables (two ymm of fp32; one 64-byte line per table entry).
ROWS = 16
#: The row interleave of the planes and scales (the AVX2 layout: ``[N/16, K/8, 16]``).
INTERLEAVE = sparse_binary_gemv.INTERLEAVE
#: 16-row tiles per task, at most: a task builds its tables (16 KiB a column byte) once per group for them.
TILES_PER_CHUNK = 128
#: Output rows per step of the lookup loop: their plane bytes come from one 16-bit load per plane (1, 2, 4;
#: 2 against 1: level to 8 % faster, 4 spills accumulators, single thread, cache-resident).
OUTPUTS_PER_STEP = 2
#: Fewer tasks than this (few row blocks, small M) split the tiles into more chunks, down to one tile each:
#: the cores of the x86 presets. At M = 16, 2 threads, 2 / 4 / 8: 576x576 201 / 224 / 319 us, 1536x576 388 /
#: 387 / 519 us, 4096x4096 6.3 / 6.6 / 7.4 ms (medians, a shared machine).
MIN_TASKS = 2


def supported(out_features: int, in_features: int, group_size: int, interleave: int, plane_dtype: str) -> bool:
    """Whether the kernel covers this layer (else the TE kernel runs it): the GEMV's layouts (byte planes
    interleaved by 16, whole tiles of 16 rows, groups of whole plane bytes that tile ``K``)."""
    return sparse_binary_gemv.supported(out_features, in_features, group_size, interleave, plane_dtype)


def gemm_fp32(out_features: int, in_features: int, group_size: int, has_mask: bool, has_mu: bool,
              has_bias: bool, tiles_per_chunk: int | None = None, outputs_per_step: int | None = None):
    """The PrimFunc ``(x [M, K] f32, sign, [mask], alpha, [mu], [bias], y [M, N] f32)``, M symbolic.

    Planes ``[N/16, K/8, 16]`` uint8, scales ``[N/16, K/G, 16]`` float16. ``tiles_per_chunk``: 16-row tiles
    per task at most (default ``TILES_PER_CHUNK``); ``outputs_per_step``: 1, 2 or 4 (``OUTPUTS_PER_STEP``).
    """
    if not supported(out_features, in_features, group_size, INTERLEAVE, "uint8"):
        raise ValueError(f"the AVX2 GEMM does not cover N={out_features}, K={in_features}, G={group_size}")
    N, K, G = out_features, in_features, group_size
    TI, RB = INTERLEAVE, ROWS
    NT, C, GB, CG = N // TI, K // 8, K // G, G // 8
    chunk = tiles_per_chunk or TILES_PER_CHUNK
    TC0 = -(-NT // chunk)  # tile chunks at least (large layers)
    TPT_MAX = -(-NT // TC0)  # tiles per chunk at most
    f32v = f"float32x{RB}"

    def blocks(M):
        return (M + RB - 1) // RB

    def chunks(M):
        # tile chunks: TC0, more when few row blocks would leave a core idle (M = 0: no blocks, no tasks)
        few = (T.int64(MIN_TASKS) + blocks(M) - 1) // T.max(blocks(M), T.int64(1))
        return T.min(T.int64(NT), T.max(T.int64(TC0), few))

    def per_chunk(M):
        return (T.int64(NT) + chunks(M) - 1) // chunks(M)

    J = outputs_per_step or OUTPUTS_PER_STEP
    wt = f"uint{8 * J}"

    def index(sign, mask, tile, col, jp, p, q):
        # the table entry of plane p (0: P, 1: M) of output row J jp + q: its byte, from one J-byte load per plane
        def word(buf):
            if J == 1:
                return buf[tile, col, jp]
            return T.reinterpret(wt, buf.vload([tile, col, J * jp], f"uint8x{J}"))

        w = word(mask) if p == 1 else T.bitwise_and(word(sign), word(mask)) if has_mask else word(sign)
        if J == 1:
            return T.Cast("int32", w)
        return T.Cast("int32", T.bitwise_and(T.shift_right(w, T.Cast(wt, 8 * q)), T.Cast(wt, 255)))

    @T.prim_func(private=True, check_well_formed=False)
    def kernel(var_x: T.handle, sign: T.Buffer((NT, C, TI), "uint8"), mask: T.Buffer((NT, C, TI), "uint8"),
               alpha: T.Buffer((NT, GB, TI), "float16"), mu: T.Buffer((NT, GB, TI), "float16"),
               bias: T.Buffer((N,), "float32"), var_y: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        M = T.int64()
        x = T.match_buffer(var_x, (M, K), "float32")
        y = T.match_buffer(var_y, (M, N), "float32")
        for task in T.parallel(blocks(M) * chunks(M)):
            tab = T.alloc_buffer((CG, 256, RB), "float32")  # the group's subset sums, [column byte, byte, row]
            xt = T.alloc_buffer((G, RB), "float32")  # the group's inputs of the row block, transposed
            yt = T.alloc_buffer((TPT_MAX * TI, RB), "float32")  # the chunk's outputs, transposed
            xs = T.alloc_buffer((RB,), "float32")  # without a mask plane: the group's sum of x per row
            acc = T.alloc_buffer((2 * J, RB), "float32")  # XP, XM of J output rows (stack: registers)
            rb = task % blocks(M)
            t0 = task // blocks(M) * per_chunk(M)
            nt = T.min(per_chunk(M), T.int64(NT) - t0)
            # 1. yt starts as the bias (or 0).
            for o in range(nt * TI):
                for l in T.vectorized(RB):
                    if has_bias:
                        yt[o, l] = bias[t0 * TI + o]
                    else:
                        yt[o, l] = T.float32(0)
            for g in range(GB):
                # 2. The group's tables: x transposed (rows past M are 0), then 255 vector adds per column byte.
                for l in range(RB):
                    if rb * RB + l < M:
                        for kk in range(G):
                            xt[kk, l] = x[rb * RB + l, g * G + kk]
                    else:
                        for kk in range(G):
                            xt[kk, l] = T.float32(0)
                for c in range(CG):
                    for l in T.vectorized(RB):
                        tab[c, 0, l] = T.float32(0)
                    for b in T.unroll(8):
                        for e in range(T.shift_left(1, b)):
                            for l in T.vectorized(RB):
                                tab[c, T.shift_left(1, b) + e, l] = tab[c, e, l] + xt[c * 8 + b, l]
                if not has_mask:
                    for l in T.vectorized(RB):
                        xs[l] = T.float32(0)
                    for c in range(CG):
                        for l in T.vectorized(RB):
                            xs[l] = xs[l] + tab[c, 255, l]
                # 3. Per pair of output rows: a table line per plane byte, then the group's scales.
                for tt in range(nt):
                    for jp in range(TI // J):
                        for p in T.unroll(2 * J):
                            for l in T.vectorized(RB):
                                acc[p, l] = T.float32(0)
                        for c in T.unroll(CG):
                            for q in T.unroll(J):
                                acc[2 * q, T.ramp(0, 1, RB)] = acc.vload([2 * q, 0], f32v) + tab.vload(
                                    [c, index(sign, mask, t0 + tt, g * CG + c, jp, 0, q), 0], f32v)
                                if has_mask:
                                    acc[2 * q + 1, T.ramp(0, 1, RB)] = acc.vload([2 * q + 1, 0], f32v) + tab.vload(
                                        [c, index(sign, mask, t0 + tt, g * CG + c, jp, 1, q), 0], f32v)
                        for q in T.unroll(J):
                            for l in T.vectorized(RB):
                                if not has_mask:
                                    acc[2 * q + 1, l] = xs[l]
                                if has_mu:
                                    yt[tt * TI + J * jp + q, l] = yt[tt * TI + J * jp + q, l] + (
                                        T.float32(2) * T.Cast("float32", alpha[t0 + tt, g, J * jp + q]) * acc[2 * q, l]
                                        + (T.Cast("float32", mu[t0 + tt, g, J * jp + q])
                                           - T.Cast("float32", alpha[t0 + tt, g, J * jp + q])) * acc[2 * q + 1, l])
                                else:
                                    yt[tt * TI + J * jp + q, l] = yt[tt * TI + J * jp + q, l] + T.Cast(
                                        "float32", alpha[t0 + tt, g, J * jp + q]) * (
                                        T.float32(2) * acc[2 * q, l] - acc[2 * q + 1, l])
            # 4. The chunk's outputs of the block's rows (rows past M are not written).
            for l in range(RB):
                if rb * RB + l < M:
                    for o in range(nt * TI):
                        y[rb * RB + l, t0 * TI + o] = yt[o, l]

    return without_absent(kernel, has_mask, has_mu, has_bias)
