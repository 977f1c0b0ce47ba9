"""The int8-activation GEMV (M = 1) for the pbs2p sparse-binary linear op on aarch64 NEON: ``tbl`` lookups.

The NEON counterpart of :mod:`pbs2pc.passes.kernels.x86_avx2.sparse_binary_gemv_int8`, with the same
arithmetic, so an ARM build and an x86 build of a model compute the same numbers (up to the fp32 order of
the per-group sums): per group ``g`` of ``G`` inputs the activation is quantised symmetrically (``s_g =
max|x_g| / 127``, ``q = round_half_even(x * (127 / max|x_g|))``), and

    y[o] = sum_g s_g * (2 alpha[o, g] * IP[o, g] + (mu[o, g] - alpha[o, g]) * IM[o, g])

with the exact integer dots ``IP = sum_k q_k P[o, k]`` (``P = mask & sign``) and ``IM = sum_k q_k M[o, k]``
(``M = mask``; without a mask plane, the group's sum of ``q``). The oracle is
:func:`pbs2pc.passes.kernels.x86_avx512.sparse_binary_gemv_int8.reference`.

Tables that fit bytes (T-MAC's idea, kept exact). ``q = ql + 16 qh`` with ``ql = q & 15`` in ``[0, 15]`` and
``qh = q >> 4`` in ``[-8, 7]``; per nibble (4 inputs) of every column byte two 16-entry byte tables hold the
subset sums ``TL[e] = sum ql`` (in ``[0, 60]``) and ``TH[e] = sum qh + 32`` (in ``[0, 60]``), so
``TL[e] + 16 TH[e] = T[e] + 512``. A NEON ``tbl`` with one table register looks up 16 bytes at once, and an
index of 16 or more gives 0: the tables are built with ``tbl`` too (4 lookups of the column byte's 8 inputs
by constant indices, 3 adds).

Layout: the x86 one (:data:`INTERLEAVE` = 16): sign and mask bytes ``[N/16, K/8, 16]``, so one 16-byte load is
one column byte of 16 rows, row ``j`` in byte ``j``; every byte of it is looked up in the same table (that
column byte's) and no byte moves: no shuffles. Per 16 rows and column byte: one ``and`` (``P``), per plane an
``and #15`` and a ``ushr #4`` (the nibbles), per plane and nibble two ``tbl`` (TL, TH) and two byte adds.
Over a step of 2 column bytes a byte sums 4 lookups (at most 240: no overflow); then it is widened into
uint16 row sums, ``TL`` by ``uaddw``/``uaddw2`` and ``TH`` by ``umlal``/``umlal2`` against 16. Over a block of
``B <= 256`` inputs a lane carries ``B / 4`` lookups of at most 1020 (no uint16 wrap) and an offset of
``128 B``; at the block's end ``uxtl`` to int32 minus the offset gives ``IP`` and ``IM`` exactly. Per group
they meet the scales in fp32 (``fcvtl`` of the fp16 scales, ``fmla``).

Cost per 16 rows x 16 inputs (256 weights) with a mask: 2 ``and`` (P), 8 nibble operations, 16 ``tbl``, 12
byte adds, 8 widening adds: 46 ASIMD instructions (0.18 per weight; the two ASIMD pipes of a Cortex-A76
issue two a cycle), plus 4 plane loads and 8 table loads on the load pipes. Without a mask plane, half.
Modeled cycles: ``benchmarks/arm.py`` (docs/arm.md).
"""

from __future__ import annotations

from pbs2pc.compiler.tvm_compat import T
from pbs2pc.passes.kernels.x86_avx512.sparse_binary_gemv import plus_bias, without_absent
from pbs2pc.passes.kernels.x86_avx512.sparse_binary_gemv_int8 import quantiser, reference  # noqa: F401

#: Rows per interleaved block of the planes and scales: one 16-byte register of row bytes.
INTERLEAVE = 16
#: Inputs per widening step: two column bytes, two nibbles each (4 lookups of at most 60 per byte sum).
COLUMNS_PER_STEP = 16
#: Inputs per uint16 block (a lane's sum stays below ``B / 4 * 1020 <= 65280``). Groups above it must be
#: multiples of it.
BLOCK = 256
#: 16-row tiles per parallel task (they share each table load): one with a mask plane, two without. Modeled
#: (benchmarks/arm.py, llvm-mca neoverse-n1, 11008x4096): 6:8 one tile 0.094 cycles per weight in the loop, two
#: 0.101 (two tiles' 8 byte sums and 8 uint16 sums spill); dense binary one tile 0.084 (a latency-bound add
#: chain), two 0.045.
TILES_PER_TASK = {True: 1, False: 2}
#: Layers of at least this many weights run their tasks in parallel, smaller ones serially (the x86 int8
#: kernels' threshold; a board's thread launch costs about what an x86 one does).
PARALLEL_MIN_WEIGHTS = 1 << 19
#: The offset of every TH entry (keeps it in ``[0, 60]``); each lookup then carries ``16 * 32 = 512``.
TH_OFFSET = 32


def supported(out_features: int, in_features: int, group_size: int, interleave: int, plane_dtype: str) -> bool:
    """Whether the kernel covers this layer: byte planes row-interleaved by 16, whole 16-row tiles, groups of
    whole 16-input steps (at most :data:`BLOCK`, or a multiple of it) tiling ``K``."""
    return (interleave == INTERLEAVE and plane_dtype == "uint8" and out_features > 0
            and out_features % INTERLEAVE == 0 and group_size > 0 and group_size % COLUMNS_PER_STEP == 0
            and (group_size <= BLOCK or group_size % BLOCK == 0)
            and in_features > 0 and in_features % group_size == 0)


def tbl(table, idx):
    """``table[idx]`` per byte, 0 where ``idx`` >= 16 (``tbl`` with one table register)."""
    return T.call_llvm_pure_intrin("int8x16", "llvm.aarch64.neon.tbl1", T.reinterpret("int8x16", table),
                                   T.reinterpret("int8x16", idx))


def umull(a, b):
    """``a * b`` widened (uint8x8 -> uint16x8, ``umull``; added to an accumulator it becomes ``umlal``)."""
    return T.call_llvm_pure_intrin("uint16x8", "llvm.aarch64.neon.umull", a, b)


def build_table(parts, col, half, high):
    """The 16 bytes of table TL (``high`` = 0) or TH of nibble ``half`` of column byte ``col``: entry ``e``
    sums the nibble's inputs ``i`` with bit ``i`` of ``e`` set (plus :data:`TH_OFFSET` for TH). ``parts``
    ``[2, K]`` int8 holds ``ql`` and ``qh``; the column byte's 8 inputs are looked up with ``tbl`` by constant
    indices (input ``4 half + i`` where bit ``i`` of ``e`` is set, else 255: zero)."""
    eight = parts.vload([high, 8 * col], "int8x8")
    inputs = T.Shuffle([eight, eight], list(range(16)))
    e = T.ramp(0, 1, 16)
    total = T.broadcast(T.Cast("int8", high * TH_OFFSET), 16)  # high: an unrolled loop variable
    for i in range(4):
        pick = T.Select(T.bitwise_and(T.shift_right(e, i), 1) == 1, T.broadcast(4 * half + i, 16),
                        T.broadcast(255, 16))
        total = total + tbl(inputs, T.Cast("uint8x16", pick))
    return total


def table_builder(in_features: int, group_size: int, group_sums: bool):
    """A TVMScript macro ``build_tables(x, xq, xs, qsum, parts, tab)``: ``x`` ``[1, K]`` quantised per group (the
    x86 int8 kernels' quantiser: ``xq``, scales ``xs``, with ``group_sums`` each group's sum of ``q`` in ``qsum``),
    split into ``ql``/``qh`` (``parts`` ``[2, K]``) and the TL / TH tables of every column byte's nibbles
    (``tab`` ``[K/8, 2, 2, 16]``: column byte, nibble half, TL | TH, entry)."""
    K, C = in_features, in_features // 8
    quantise = quantiser(K, group_size, group_sums=group_sums)

    @T.macro
    def build_tables(x, xq, xs, qsum, parts, tab):
        quantise(x, 0, xq, xs, qsum)
        for k in T.vectorized(K):
            parts[0, k] = T.bitwise_and(xq[0, k], T.int8(15))  # ql
            parts[1, k] = T.shift_right(xq[0, k], T.int8(4))  # qh (arithmetic)
        for c in range(C):
            for half in T.unroll(2):
                for t in T.unroll(2):
                    tab[c, half, t, T.ramp(0, 1, INTERLEAVE)] = build_table(parts, c, half, t)

    return build_tables


def gemv_int8(out_features: int, in_features: int, group_size: int, has_mask: bool, has_mu: bool,
              has_bias: bool, tiles: int | None = None, parallel_min: int | None = None):
    """The PrimFunc ``(x [1, K] f32, sign, [mask], alpha, [mu], [bias], y [1, N] f32)`` for one layer shape.

    Planes ``[N/16, K/8, 16]`` uint8 and scales ``[N/16, K/G, 16]`` float16. ``tiles``: 16-row tiles per task
    (default :data:`TILES_PER_TASK`; the largest of it, 2, 1 that divides ``N / 16``); ``parallel_min``: see
    :data:`PARALLEL_MIN_WEIGHTS`.
    """
    if not supported(out_features, in_features, group_size, INTERLEAVE, "uint8"):
        raise ValueError(f"the NEON int8 GEMV does not cover N={out_features}, K={in_features}, G={group_size}")
    N, K, G = out_features, in_features, group_size
    L = INTERLEAVE
    NT, C, GB = N // L, K // 8, K // G
    R = next(r for r in (tiles or TILES_PER_TASK[has_mask], 2, 1) if NT % r == 0)
    B = min(G, BLOCK)  # inputs per uint16 block
    NB = G // B  # blocks per group
    STEPS = B // COLUMNS_PER_STEP  # widening steps per block
    CG, CB = G // 8, B // 8  # column bytes per group, per block
    P = 2 if has_mask else 1  # planes looked up: P (and M)
    build_tables = table_builder(K, G, group_sums=not has_mask)
    tasks = T.parallel if N * K >= (parallel_min or PARALLEL_MIN_WEIGHTS) else T.serial
    offset = 128 * B  # a lane's TH offsets over a block: 512 per lookup, B / 4 lookups
    u8, u16 = "uint8x16", "uint16x8"

    def idx(sign, mask, tile, col, p, half):
        # nibble ``half`` of P (p = 0) or M (p = 1) of column byte col of the tile's 16 rows (uint8x16)
        s = sign.vload([tile, col, 0], u8)
        bits = s if not has_mask else T.Select(p == 0, T.bitwise_and(s, mask.vload([tile, col, 0], u8)),
                                                mask.vload([tile, col, 0], u8))
        return T.Select(half == 0, T.bitwise_and(bits, T.broadcast(T.uint8(15), 16)),
                        T.shift_right(bits, T.broadcast(T.uint8(4), 16)))

    def widened(wide, bsum, r, p, h: int):
        # rows 8h .. 8h+7: wide += TL + 16 TH (uaddw, umlal)
        lanes = list(range(8 * h, 8 * h + 8))
        tl = T.Shuffle([bsum.vload([r, p, 0, 0], u8)], lanes)
        th = T.Shuffle([bsum.vload([r, p, 1, 0], u8)], lanes)
        return wide.vload([r, p, 8 * h], u16) + T.Cast(u16, tl) + umull(th, T.broadcast(T.uint8(16), 8))

    def group_output(alpha, mu, tile, g, ip, im):
        a = T.Cast("float32x16", alpha.vload([tile, g, 0], "float16x16"))  # fcvtl
        if has_mu:
            return (a + a) * ip + (T.Cast("float32x16", mu.vload([tile, g, 0], "float16x16")) - a) * im
        return a * (T.broadcast(T.float32(2), 16) * ip - im)

    @T.prim_func(private=True, check_well_formed=False)
    def kernel(x: T.Buffer((1, K), "float32"), sign: T.Buffer((NT, C, L), "uint8"),
               mask: T.Buffer((NT, C, L), "uint8"), alpha: T.Buffer((NT, GB, L), "float16"),
               mu: T.Buffer((NT, GB, L), "float16"), bias: T.Buffer((N,), "float32"),
               y: T.Buffer((1, N), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        xq = T.alloc_buffer((1, K), "int8")
        xs = T.alloc_buffer((1, GB), "float32")
        qsum = T.alloc_buffer((1, GB), "int32")  # IM of a layer without a mask plane: the group's sum of q
        parts = T.alloc_buffer((2, K), "int8")  # [ql | qh, k]
        tab = T.alloc_buffer((C, 2, 2, L), "int8")  # [column byte, nibble half, TL | TH, e]
        # 1. Quantise x per group (the x86 int8 kernels' quantiser), 2. the TL / TH tables.
        build_tables(x, xq, xs, qsum, parts, tab)
        # 3. The GEMV: R tiles of 16 rows per task.
        for task in tasks(NT // R):
            # global scope: stack allocas, registers after LLVM's SROA (see the x86 kernels)
            acc = T.alloc_buffer((R, L), "float32")
            wide = T.alloc_buffer((R, P, L), "uint16")  # [tile, plane, row]: the block's sums with offsets
            isum = T.alloc_buffer((R, P, L), "int32")  # [tile, plane, row]: the group's exact dots
            bsum = T.alloc_buffer((R, P, 2, L), "uint8")  # [tile, plane, TL | TH, row]: a step's byte sums
            for r in T.unroll(R):
                acc[r, T.ramp(0, 1, L)] = T.broadcast(T.float32(0), L)
            for g in range(GB):
                if NB > 1:
                    for r in T.unroll(R):
                        for p in T.unroll(P):
                            isum[r, p, T.ramp(0, 1, L)] = T.broadcast(T.int32(0), L)
                for blk in range(NB):
                    for r in T.unroll(R):
                        for p in T.unroll(P):
                            wide[r, p, T.ramp(0, 1, L)] = T.broadcast(T.uint16(0), L)
                    for st in range(STEPS):
                        for r in T.unroll(R):
                            for p in T.unroll(P):
                                for t in T.unroll(2):
                                    bsum[r, p, t, T.ramp(0, 1, L)] = T.broadcast(T.uint8(0), L)
                        # 4 lookups per byte sum: 2 column bytes x 2 nibbles; each table load serves every
                        # tile and plane back to back
                        for u in T.unroll(2):
                            for half in T.unroll(2):
                                for t in T.unroll(2):
                                    for r in T.unroll(R):
                                        for p in T.unroll(P):
                                            bsum[r, p, t, T.ramp(0, 1, L)] = bsum.vload([r, p, t, 0], u8) + T.reinterpret(
                                                u8, tbl(tab.vload([g * CG + blk * CB + 2 * st + u, half, t, 0], "int8x16"),
                                                        idx(sign, mask, task * R + r, g * CG + blk * CB + 2 * st + u,
                                                            p, half)))
                        for r in T.unroll(R):
                            for p in T.unroll(P):
                                wide[r, p, T.ramp(0, 1, 8)] = widened(wide, bsum, r, p, 0)
                                wide[r, p, T.ramp(8, 1, 8)] = widened(wide, bsum, r, p, 1)
                    for r in T.unroll(R):
                        for p in T.unroll(P):
                            if NB == 1:  # one block per group: its sums are the group's
                                isum[r, p, T.ramp(0, 1, L)] = (T.Cast("int32x16", wide.vload([r, p, 0], "uint16x16"))
                                                               - T.broadcast(T.int32(offset), L))
                            else:
                                isum[r, p, T.ramp(0, 1, L)] = isum.vload([r, p, 0], "int32x16") + (
                                    T.Cast("int32x16", wide.vload([r, p, 0], "uint16x16")) - T.broadcast(T.int32(offset), L))
                for r in T.unroll(R):
                    acc[r, T.ramp(0, 1, L)] = acc.vload([r, 0], "float32x16") + T.broadcast(xs[0, g], L) * group_output(
                        alpha, mu, task * R + r, g, T.Cast("float32x16", isum.vload([r, 0, 0], "int32x16")),
                        T.Cast("float32x16", isum.vload([r, P - 1, 0], "int32x16")) if has_mask
                        else T.broadcast(T.Cast("float32", qsum[0, g]), L))
            for r in T.unroll(R):
                for l in T.vectorized(L):
                    y[0, (task * R + r) * L + l] = plus_bias(acc[r, l], bias, has_bias, (task * R + r) * L + l)

    return without_absent(kernel, has_mask, has_mu, has_bias)
