"""The fp32 GEMV (M = 1) for the pbs2p sparse-binary linear op on x86 with AVX2, FMA and F16C: lookup tables.

The AVX2 counterpart of :mod:`pbs2pc.passes.kernels.x86_avx512.sparse_binary_gemv`: the same arithmetic
(exact fp32, no quantisation of ``x``). With ``P = mask & sign`` and ``M = mask`` as 0/1 planes, a weight is
``mask * (alpha * (2 sign - 1) + mu) = 2 alpha P + (mu - alpha) M``, so per scale group ``g``

    y[o] = sum_g 2 alpha[o, g] * XP[o, g] + (mu[o, g] - alpha[o, g]) * XM[o, g]

with ``XP = sum_k x_k P[o, k]`` and ``XM = sum_k x_k M[o, k]`` (a layer without a mask plane: ``M = 1``, so
``XM`` is the group's sum of ``x``; without mu: ``alpha (2 XP - XM)``).

Tables. AVX2 has no ``vpermb`` and no 16-entry fp32 permute; ``vpermps`` ymm is an 8-entry table (index bits
0-2) and ``vpermilps`` ymm a 4-entry one per 128-bit half (bits 0-1). Each column byte ``c`` (inputs
``8c .. 8c+7``) is cut into the bit chunks 0-2, 3-5 and 6-7 (``CHUNKS``), and per call the kernel first
builds ``T_{c,h}[e] = sum_{i: bit i of e} x[8c + first_h + i]``: one ymm of fp32 per chunk (the 2-bit
chunk's entries 4-7 repeat 0-3, so it serves ``vpermilps``); ``12 K`` bytes for the layer, in L1/L2.

Layout: the x86 layout with a row interleave of 16 (``INTERLEAVE``, as the AVX-512 kernels): sign and
mask bytes ``[N/16, K/8, 16]`` (byte ``[t, c, j]`` holds bits ``8c .. 8c+7`` of row ``16t + j``) and fp16
scales ``[N/16, K/G, 16]``. A task owns ``TILES_PER_TASK`` tiles of 16 rows, two ymm vectors of 8 rows each.
Per tile and column byte: one 16-byte ``vpand`` of the planes gives ``P`` of the 16 rows; each half widened
to int32 lanes (``vpmovzxbd``: row ``j``'s byte in lane ``j``), then per 8 rows and plane ``vpermps`` on the
raw lanes (bits 0-2; ``vpermps`` ignores the bits above), ``vpermps`` on lanes >> 3 and ``vpermilps`` on
lanes >> 6, the shifts done as ``vpmulhuw`` by ``2^13`` / ``2^10`` (the multiplier pipe; the shuffles,
``vpsrld`` and the adds share the others), and the three lookups summed into a partial sum per (8 rows,
plane). Per group the partial sums meet the scales (``vcvtph2ps``) in an FMA. The code also reads an
interleave of 8 (``INTERLEAVE = 8``: one 16-byte AND then covers two column bytes of 8 rows), measured
5-10 % slower on the 7B shapes; 16 is also the TE kernel's better layout on AVX2 (about 2x at M = 1).

Cost per 64 weights (8 rows x 8 columns) with a mask plane: 2 widenings, half a ``vpand``, 4
``vpmulhuw``, 4 ``vpermps``, 2 ``vpermilps``, 6 ``vaddps``: about 20 vector instructions, bound by the
shuffles (``vpermps`` ymm is about 1.3 cycles of throughput on Zen 2, ``vpermilps`` 0.5). The TE kernel
spends about 3 per 8 weights and plane (bit test, blend, FMA): about 50. Measurements: docs/avx2_gemv.md.
"""

from __future__ import annotations

from pbs2pc.compiler.tvm_compat import T
from pbs2pc.passes.kernels.x86_avx512.sparse_binary_gemv import (plus_bias, reference,  # noqa: F401
                                                                 task_loop as _task_loop, without_absent)

#: fp32 lanes of a ymm register: rows per vector.
LANES = 8
#: The row interleave ``T`` the kernel reads: planes ``[N/16, K/8, 16]``, scales ``[N/16, K/G, 16]`` (8 works
#: too, see the module docstring).
INTERLEAVE = 16
#: ``INTERLEAVE``-row tiles per parallel task (their vectors share each table load). 16-row tasks against
#: 32-row ones, 2 threads: 11008x4096 1188-1321 / 1240-1450 us, 4096x11008 1185 / 1235 us; 1536x576 level.
TILES_PER_TASK = 1
#: The (first bit, bits) of each lookup chunk of a column byte: 3 + 3 + 2 bits (3-bit chunks: ``vpermps``,
#: 2-bit: ``vpermilps``). Four 2-bit ``vpermilps`` chunks measured 4 % slower (more shifts and adds).
CHUNKS = ((0, 3), (3, 3), (6, 2))
#: Layers with fewer weights run their tasks on one thread (this GEMV's and the v2 GEMV's). Lower than the
#: AVX-512 kernels' (:data:`~pbs2pc.passes.kernels.x86_avx512.sparse_binary_gemv.PARALLEL_MIN_WEIGHTS`,
#: 2^18): the same layer takes about twice as long here, so a parallel launch pays off sooner. Parallel
#: against serial in turns (2 threads, 9 rounds, Intel Xeon running this AVX2 code), v1 / v2 with groups
#: and residual: 64x576 0.64x / 0.77x, 128x576 0.87x / 0.99x; 160x576 1.06x / 1.13x, 256x384 1.18x / 1.20x,
#: 192x576 1.20x / 1.12x, 128x1024 1.18x / 1.17x; 576x576 parallel 1.7x (on an AMD EPYC Zen 3 the v2
#: 192x576 was 1.18x parallel too). Between 73728 and 92160 weights, then.
PARALLEL_MIN_WEIGHTS = 80 * 1024


def task_loop(out_features: int, in_features: int, parallel_min: int | None = None):
    """``T.parallel``, or ``T.serial`` for a layer of fewer than ``parallel_min`` weights (default
    :data:`PARALLEL_MIN_WEIGHTS`)."""
    return _task_loop(out_features, in_features, PARALLEL_MIN_WEIGHTS if parallel_min is None else parallel_min)


def supported(out_features: int, in_features: int, group_size: int, interleave: int, plane_dtype: str) -> bool:
    """Whether the kernel covers this layer (else the TE kernel runs it): byte planes row-interleaved by
    ``INTERLEAVE``, whole tiles of ``INTERLEAVE`` rows, groups of whole plane bytes that tile ``K``."""
    return (interleave == INTERLEAVE and plane_dtype == "uint8" and out_features > 0
            and out_features % INTERLEAVE == 0 and group_size > 0 and group_size % 8 == 0
            and in_features > 0 and in_features % group_size == 0)


def chunk_sum(x, col, h, e):
    """Entry ``e`` of the table of chunk ``h`` (a loop variable) of column byte ``col``: the sum of
    ``x[0, 8 col + first_h + i]`` over the set bits ``i`` of ``e`` that are inputs of the chunk (fp32)."""

    def per_chunk(values):
        expr = T.int32(values[-1])
        for index in range(len(values) - 2, -1, -1):
            expr = T.Select(h == index, T.int32(values[index]), expr)
        return expr

    first, bits = per_chunk([f for f, _ in CHUNKS]), per_chunk([b for _, b in CHUNKS])
    total = None
    for i in range(max(b for _, b in CHUNKS)):
        bit = T.bitwise_and(T.shift_right(e, i), 1) * T.Cast("int32", i < bits)
        term = T.Cast("float32", bit) * x[0, 8 * col + T.min(first + i, 7)]
        total = term if total is None else total + term
    return total


def widen(bytes8):
    """8 plane bytes (uint8x8, one per row) as int32 lanes (``vpmovzxbd``)."""
    return T.Cast("int32x8", bytes8)


def shift_right(idx, bits: int):
    """``idx >> bits`` for int32 lanes below 2^16, as ``vpmulhuw`` by ``2^(16 - bits)``: the high half of
    each 16-bit product (the upper word of every lane is 0 and stays 0). It runs on the multiplier pipe; a
    ``vpsrld`` would compete with the lookups and adds (about 8 % slower, measured)."""
    words = T.reinterpret("int16x16", idx)
    high = T.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmulhu.w", words,
                                   T.broadcast(T.int16(1 << (16 - bits)), 2 * LANES))
    return T.reinterpret("int32x8", high)


def vpermps(table, idx):
    """``table[idx & 7]`` per fp32 lane (``vpermps`` ymm: it reads bits 0-2 of each int32 index lane)."""
    return T.call_llvm_pure_intrin("float32x8", "llvm.x86.avx2.permps", table, idx)


def vpermilps(table, idx):
    """``table[idx & 3]`` per fp32 lane within each 128-bit half (``vpermilps`` ymm: bits 0-1 of each lane;
    the table holds its 4 entries in both halves)."""
    return T.call_llvm_pure_intrin("float32x8", "llvm.x86.avx.vpermilvar.ps.256", table, idx)


def lookup(tab, col, h: int, idx):
    """``T_{col,h}`` at chunk ``h`` of the 8 rows' bytes ``idx`` (int32x8)."""
    first, bits = CHUNKS[h]
    if first:
        idx = shift_right(idx, first)
    return (vpermps if bits == 3 else vpermilps)(tab.vload([col, h, 0], "float32x8"), idx)


def byte_sum(tab, col, idx):
    """``sum_i x[8 col + i]`` over the set bits ``i`` of each lane's byte: a lookup per chunk, summed as a tree."""
    parts = [lookup(tab, col, h, idx) for h in range(len(CHUNKS))]
    while len(parts) > 1:
        parts = [parts[i] + parts[i + 1] if i + 1 < len(parts) else parts[i] for i in range(0, len(parts), 2)]
    return parts[0]


def gemv_fp32(out_features: int, in_features: int, group_size: int, has_mask: bool, has_mu: bool,
              has_bias: bool, tiles: int | None = None, parallel_min: int | None = None):
    """The PrimFunc ``(x [1, K] f32, sign, [mask], alpha, [mu], [bias], y [1, N] f32)`` for one layer shape.

    Planes ``[N/T, K/8, T]`` uint8 and scales ``[N/T, K/G, T]`` float16 with ``T = INTERLEAVE``; ``tiles``:
    ``T``-row tiles per task (default ``TILES_PER_TASK``; the largest of it, 2, 1 that divides ``N / T``).
    Layers of at least :data:`PARALLEL_MIN_WEIGHTS` weights run their tasks in parallel, smaller ones
    serially (``parallel_min`` overrides the threshold: the tuner's knob).
    """
    T_ = INTERLEAVE
    assert T_ in (8, 16), T_
    if not supported(out_features, in_features, group_size, T_, "uint8"):
        raise ValueError(f"the AVX2 GEMV does not cover N={out_features}, K={in_features}, G={group_size}")
    N, K, G = out_features, in_features, group_size
    HALVES = T_ // LANES  # 8-row vectors per interleaved tile
    NT, C, GB = N // T_, K // 8, K // G
    R = next(r for r in (tiles or TILES_PER_TASK, 2, 1) if NT % r == 0)
    U = R * HALVES  # 8-row vectors per task
    CG = G // 8  # plane bytes per row per group
    H = len(CHUNKS)
    # column bytes per step: with T = 8 one 16-byte AND covers two column bytes of a tile
    STEP = 2 if HALVES == 1 and has_mask and CG % 2 == 0 else 1
    tasks = task_loop(N, K, parallel_min)
    f32x8 = "float32x8"

    def rows(task, u):
        return task * R + u // HALVES, (u % HALVES) * LANES  # (tile, first lane of the 8 rows in the tile)

    def m_bytes(mask, task, u, col):
        tile, lane = rows(task, u)
        return widen(mask.vload([tile, col, lane], "uint8x8"))

    def p_bytes(sign, mask, task, u, col, half):
        # P = sign & mask of column byte col + half of the 8 rows of vector u, widened (sign without a mask)
        tile, lane = rows(task, u)
        if not has_mask:
            return widen(sign.vload([tile, col + half, lane], "uint8x8"))
        if T_ == 8 and STEP == 1:
            return widen(T.bitwise_and(sign.vload([tile, col, 0], "uint8x8"), mask.vload([tile, col, 0], "uint8x8")))
        # one 16-byte AND: two column bytes of 8 rows (T = 8), or one column byte of 16 rows (T = 16)
        both = T.bitwise_and(sign.vload([tile, col, 0], "uint8x16"), mask.vload([tile, col, 0], "uint8x16"))
        pick = half if T_ == 8 else u % HALVES
        return widen(T.Shuffle([both], [pick * LANES + j for j in range(LANES)]))

    def scale(buf, task, u, g):
        tile, lane = rows(task, u)
        return buf.vload([tile, g, lane], "float16x8")

    def group_output(alpha, mu, task, u, g, xp, xm):
        a = T.Cast(f32x8, scale(alpha, task, u, g))  # vcvtph2ps
        if has_mu:
            return (a + a) * xp + (T.Cast(f32x8, scale(mu, task, u, g)) - a) * xm
        return a * (T.broadcast(T.float32(2), LANES) * xp - xm)

    def out_index(task, u, lane):
        tile, first = rows(task, u)
        return tile * T_ + first + lane

    @T.prim_func(private=True, check_well_formed=False)
    def kernel(x: T.Buffer((1, K), "float32"), sign: T.Buffer((NT, C, T_), "uint8"),
               mask: T.Buffer((NT, C, T_), "uint8"), alpha: T.Buffer((NT, GB, T_), "float16"),
               mu: T.Buffer((NT, GB, T_), "float16"), bias: T.Buffer((N,), "float32"),
               y: T.Buffer((1, N), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        tab = T.alloc_buffer((C, H, LANES), "float32")
        xm = T.alloc_buffer((GB,), "float32")  # XM of a layer without a mask plane: the group's sum of x
        # 1. The tables (serial: 3 K / 8 vectors, about a microsecond at K = 4096).
        for c in range(C):
            for e in T.vectorized(LANES):
                for h in T.unroll(H):
                    tab[c, h, e] = chunk_sum(x, c, h, e)
        if not has_mask:
            for g in range(GB):
                xm[g] = T.float32(0)
                for k in range(G):
                    xm[g] = xm[g] + x[0, g * G + k]
        # 2. The GEMV: U vectors of 8 rows per task, partial sums per (vector, plane), scaled per group.
        for task in tasks(NT // R):
            # Global scope on purpose: small global allocations become stack allocas (registers after
            # LLVM's SROA); "local" ones cost two TVMBackendAllocWorkspace calls per task.
            acc = T.alloc_buffer((U, LANES), "float32")
            part = T.alloc_buffer((U, 2, LANES), "float32")  # [vector, P | M, row]
            for u in T.unroll(U):
                acc[u, T.ramp(0, 1, LANES)] = T.broadcast(T.float32(0), LANES)
            for g in range(GB):
                for u in T.unroll(U):
                    for p in T.unroll(2):
                        part[u, p, T.ramp(0, 1, LANES)] = T.broadcast(T.float32(0), LANES)
                for cb in range(CG // STEP):
                    for u in T.unroll(U):
                        for half in T.unroll(STEP):
                            part[u, 0, T.ramp(0, 1, LANES)] = part.vload([u, 0, 0], f32x8) + byte_sum(
                                tab, g * CG + cb * STEP + half,
                                p_bytes(sign, mask, task, u, g * CG + cb * STEP, half))
                            if has_mask:
                                part[u, 1, T.ramp(0, 1, LANES)] = part.vload([u, 1, 0], f32x8) + byte_sum(
                                    tab, g * CG + cb * STEP + half, m_bytes(mask, task, u, g * CG + cb * STEP + half))
                for u in T.unroll(U):
                    if not has_mask:
                        part[u, 1, T.ramp(0, 1, LANES)] = T.broadcast(xm[g], LANES)
                    acc[u, T.ramp(0, 1, LANES)] = acc.vload([u, 0], f32x8) + group_output(
                        alpha, mu, task, u, g, part.vload([u, 0, 0], f32x8), part.vload([u, 1, 0], f32x8))
            for u in T.unroll(U):
                for l in T.vectorized(LANES):
                    y[0, out_index(task, u, l)] = plus_bias(acc[u, l], bias, has_bias, out_index(task, u, l))

    return without_absent(kernel, has_mask, has_mu, has_bias)
