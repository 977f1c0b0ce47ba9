"""The int8-activation GEMV (M = 1) for the pbs2p sparse-binary linear op on x86 with AVX2 (T-MAC style).

The AVX2 counterpart of :mod:`pbs2pc.passes.kernels.x86_avx512.sparse_binary_gemv_int8`, with its
arithmetic: per group ``g`` of ``G`` inputs the activation is quantised symmetrically (``s_g = max|x_g| / 127``,
``q = round_half_even(x * (127 / max|x_g|))``, 0 for a group of zeros; its :func:`quantiser`), and

    y[o] = sum_g s_g * (2 alpha[o, g] * IP[o, g] + (mu[o, g] - alpha[o, g]) * IM[o, g])

with the exact integer dots ``IP = sum_k q_k P[o, k]`` (``P = mask & sign``) and ``IM = sum_k q_k M[o, k]``
(``M = mask``; a layer without a mask plane: the group's sum of ``q``). :func:`reference` is that module's
oracle: the results match it up to the fp32 summation order.

Tables that fit bytes. A table of 4 inputs has 16 subset sums in ``[-508, 508]``: more than a byte. Each
``q`` is split as ``q = ql + 16 qh`` with ``ql = q & 15`` in ``[0, 15]`` and ``qh = q >> 4`` (arithmetic) in
``[-8, 7]``, and per 4 inputs ``4j .. 4j+3`` the kernel builds two 16-entry byte tables

    TL_j[e] = sum_{i: bit i of e} ql_{4j+i}          in [0, 60]
    TH_j[e] = sum_{i: bit i of e} qh_{4j+i} + 32     in [0, 60] (the offset keeps it unsigned)

so that ``TL_j[e] + 16 TH_j[e] = T_j[e] + 512`` exactly. Four looked-up entries of one table sum to at
most 240: they add in bytes (``vpaddb``) without overflow before they are widened.

Tables per call: after the quantisation, ``ql`` and ``qh`` of all ``K`` inputs (``[2, K]`` int8); per two column
bytes (16 inputs, ``vbroadcasti128`` to both lanes) each of the 4 tables (nibble half x TL / TH) is 4
``vpshufb`` by constant indices (input ``i`` where bit ``i`` of ``e`` is set, else zero) and 3 adds:
``8 K`` bytes for the layer (88 KB at K = 11008), in L2, built serially (a 16 x 11008 layer, quantisation
and tables included, takes 8 us on one Zen 2 core; scalar-built tables took 23).

Lookups. The layout is the x86 one (:data:`INTERLEAVE` = 16, as the AVX2 fp32 kernel): sign and mask bytes
``[N/16, K/8, 16]``, so one 32-byte load holds column bytes ``c`` (low 128-bit lane) and ``c + 1`` (high lane)
of 16 rows, row ``j`` in byte ``j`` of each lane. ``vpshufb`` looks up 16 bytes per lane in a 16-entry table
of that lane, so the lane's tables are those of its column byte and no byte changes position: row ``j``
stays in byte ``j``. The indices are the low nibbles (``& 15``) and high nibbles (``vpsrlw 4``, ``& 15``) of
``M = mask`` and ``P = sign & mask``. A step of 32 inputs (two loads) adds, per plane, 4 lookups per byte
into a TL and a TH byte sum (``vpaddb``: at most 240); each table load serves the P and M lookups back to
back.

Widening (:data:`WIDEN`, "unpack"): ``vpunpck{l,h}bw`` pairs each row's TL and TH sums in a word, and one
``vpmaddubsw`` against the byte pair ``(1, 16)`` gives ``TL + 16 TH`` (at most 4080) of rows 0-7 / 8-15
per lane, added into int16 sums with ``vpaddw``. Over a block of ``B <= 128`` inputs (:data:`BLOCK`) a
lane sees ``B / 8`` lookups carrying ``512`` each; its sum starts at ``-64 B``, so it stays in
``[-64 B, 63.5 B]`` (no int16 overflow) and the two lanes' total is ``I``, the exact dot over the block
(``|I| <= 127 B``). Per block the lanes are added (``vextracti128``, ``vpaddw``) and widened to int32
(``vpmovsxwd``): ``IP`` and ``IM`` exactly, in row order. Per group they meet the scales in fp32
(``vcvtph2ps``, FMAs), as in the AVX-512 kernel. ("madd": 4 ``vpmaddubsw`` against ``(1, 0)``, ``(0, 1)``,
``(16, 0)``, ``(0, 16)``, sums of even and odd rows: 8-15 % slower.)

Cost per 16 rows x 32 inputs with a mask (1024 plane bits): 4 plane loads, 8 table loads, 14 nibble
operations, 16 ``vpshufb``, 12 ``vpaddb``, 4 ``vpunpck``, 4 ``vpmaddubsw``, 4 ``vpaddw``: about 76
instructions with the loop and a few spills, 9.5 per 64 weights (the fp32 kernel: about 20). One core
takes about 1 ns per 64 weights at G = 128 (the fp32 kernel 3.2 ns); measurements: docs/avx2_gemv.md.
"""

from __future__ import annotations

from pbs2pc.compiler.tvm_compat import T
from pbs2pc.passes.kernels.x86_avx512.sparse_binary_gemv import plus_bias, without_absent
from pbs2pc.passes.kernels.x86_avx512.sparse_binary_gemv_int8 import quantiser, reference  # noqa: F401

#: Rows per interleaved block of the planes and scales (the x86 layout): one 128-bit lane of row bytes.
INTERLEAVE = 16
#: Inputs per widening step: two 32-byte plane loads (4 column bytes); the group size must be a multiple.
COLUMNS_PER_STEP = 32
#: Inputs per int16 block (a lane's sum stays within ``[-64 B, 64 B]``, the block's dot within ``127 B``: int16).
#: Groups above it must be multiples of it.
BLOCK = 128
#: 16-row tiles per parallel task (they share the table loads). 2 tiles: level within the noise (streaming
#: 7B shapes, 2 threads) and 5 % faster cache-resident; 1 keeps the register pressure (and spills) lowest.
TILES_PER_TASK = 1
#: How the byte sums become int16 row sums: "unpack" (``vpunpck{l,h}bw`` + one ``vpmaddubsw`` per 8 rows) or
#: "madd" (4 ``vpmaddubsw``, even / odd rows; 8-15 % slower, one core, cache-resident).
WIDEN = "unpack"
#: Layers of at least this many weights run their tasks in parallel, smaller ones serially: twice the fp32
#: kernels' threshold (2^18), as a weight costs a third of the time. 576x576 (2 threads, a shared machine):
#: serial 6.8 us, parallel 8.7-9.5 us; 1536x576 and 576x1536 level or better in parallel.
PARALLEL_MIN_WEIGHTS = 1 << 19
#: The offset of every TH entry (keeps it in ``[0, 60]``); each lookup then carries ``16 * 32 = 512``.
TH_OFFSET = 32


def supported(out_features: int, in_features: int, group_size: int, interleave: int, plane_dtype: str) -> bool:
    """Whether the kernel covers this layer (else the fp32 kernel runs it): byte planes row-interleaved by 16,
    whole 16-row tiles, groups of whole 32-input steps (at most :data:`BLOCK` or a multiple of it) tiling ``K``."""
    return (interleave == INTERLEAVE and plane_dtype == "uint8" and out_features > 0
            and out_features % INTERLEAVE == 0 and group_size > 0 and group_size % COLUMNS_PER_STEP == 0
            and (group_size <= BLOCK or group_size % BLOCK == 0)
            and in_features > 0 and in_features % group_size == 0)


def vpshufb(table, idx):
    """``table[idx & 15]`` per byte within each 128-bit lane (``vpshufb`` ymm; ``idx`` below 128)."""
    return T.call_llvm_pure_intrin("int8x32", "llvm.x86.avx2.pshuf.b", table, idx)


def vpmaddubsw(unsigned, signed):
    """int16 lane ``w``: ``u[2w] s[2w] + u[2w+1] s[2w+1]`` (``u`` unsigned bytes, ``s`` signed)."""
    return T.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", unsigned, signed)


def _pair(even: int, odd: int):
    """The signed byte pair ``(even, odd)`` in every int16 lane, as int8x32."""
    return T.reinterpret("int8x32", T.broadcast(T.int16(even + 256 * odd), 16))


def table(parts, col_pair, half, high):
    """The 32 bytes of table TL (``high`` = 0) or TH of nibble ``half`` of column bytes ``2 col_pair`` (low lane)
    and ``2 col_pair + 1`` (high lane): per lane, entry ``e`` sums the lane's 4 inputs ``i`` with bit ``i`` of
    ``e`` set. ``parts`` ``[2, K]`` int8 holds ``ql`` and ``qh``; its 16 inputs of the two column bytes go to both
    lanes (``vbroadcasti128``), and each input ``i`` is looked up with ``vpshufb`` by constant indices that
    pick it where bit ``i`` of ``e`` is set and zero (bit 7) elsewhere."""
    inputs = T.Shuffle([parts.vload([high, 16 * col_pair], "int8x16")] * 2, list(range(32)))  # Shuffle cannot widen
    lane_byte = T.ramp(0, 1, 32)
    lane, e = T.shift_right(lane_byte, 4), T.bitwise_and(lane_byte, 15)
    total = T.broadcast(T.Cast("int8", high * TH_OFFSET), 32)  # high: an unrolled loop variable
    for i in range(4):
        pick = T.Select(T.bitwise_and(T.shift_right(e, i), 1) == 1, 8 * lane + 4 * half + i, T.broadcast(-128, 32))
        total = total + vpshufb(inputs, T.Cast("int8x32", pick))
    return total


def gemv_int8(out_features: int, in_features: int, group_size: int, has_mask: bool, has_mu: bool,
              has_bias: bool, tiles: int | None = None, widen: str | None = None, parallel_min: int | None = None):
    """The PrimFunc ``(x [1, K] f32, sign, [mask], alpha, [mu], [bias], y [1, N] f32)`` for one layer shape.

    Planes ``[N/16, K/8, 16]`` uint8 and scales ``[N/16, K/G, 16]`` float16. ``tiles``: 16-row tiles per task
    (default :data:`TILES_PER_TASK`; the largest of it, 2, 1 that divides ``N / 16``); ``widen``: see
    :data:`WIDEN`; ``parallel_min``: see :data:`PARALLEL_MIN_WEIGHTS`.
    """
    if not supported(out_features, in_features, group_size, INTERLEAVE, "uint8"):
        raise ValueError(f"the AVX2 int8 GEMV does not cover N={out_features}, K={in_features}, G={group_size}")
    widen = widen or WIDEN
    assert widen in ("unpack", "madd"), widen
    N, K, G = out_features, in_features, group_size
    L = INTERLEAVE
    NT, C, GB = N // L, K // 8, K // G
    R = next(r for r in (tiles or TILES_PER_TASK, 2, 1) if NT % r == 0)
    B = min(G, BLOCK)  # inputs per int16 block
    NB = G // B  # blocks per group
    STEPS = B // COLUMNS_PER_STEP  # widening steps per block
    CG, CB = G // 8, B // 8  # column bytes per group, per block
    P = 2 if has_mask else 1  # planes looked up: P (and M)
    quantise = quantiser(K, G, group_sums=not has_mask)
    tasks = T.parallel if N * K >= (parallel_min or PARALLEL_MIN_WEIGHTS) else T.serial
    # The TH offsets a lane's int16 sum carries over a block: 512 per lookup, B / 16 column bytes of 2 nibbles.
    # The sums start at minus that: each lane stays within [-64 B, 63.5 B] (no int16 wrap), the lanes' total is I.
    lane_offset = 64 * B
    i8x32, i16x16 = "int8x32", "int16x16"
    low = T.broadcast(T.int8(15), 32)

    def shifted(bits, half):
        # bits >> 4 per 16-bit word for half = 1 (an unrolled loop variable: the Select folds)
        words = T.shift_right(T.reinterpret("uint16x16", bits), T.broadcast(T.uint16(4), 16))
        return T.Select(half == 0, bits, T.reinterpret(i8x32, words))

    def idx(sign, mask, tile, col, p, half):
        # nibble ``half`` of P (p = 0) or M (p = 1) of column bytes col, col + 1 (int8x32, in [0, 15]):
        # M = mask and P = sign & mask, as (sign nibble) & (mask nibble)
        s = shifted(T.reinterpret(i8x32, sign.vload([tile, col, 0], "uint8x32")), half)
        if not has_mask:
            return T.bitwise_and(s, low)
        m = T.bitwise_and(shifted(T.reinterpret(i8x32, mask.vload([tile, col, 0], "uint8x32")), half), low)
        return T.Select(p == 0, T.bitwise_and(s, m), m)

    def widened(lo, hi, h):
        # int16 sums TL + 16 TH (lo, hi: byte sums as unsigned bytes). "unpack": rows 8h .. 8h + 7, word j of
        # lane l = row 8h + j (h: an unrolled loop variable); "madd": word j of lane l = row 2j + h.
        if widen == "unpack":
            pairs = [T.Shuffle([lo, hi], [16 * (b // 16) + (b % 16) // 2 + 32 * (b % 2) + 8 * k for b in range(32)])
                     for k in range(2)]  # vpunpck{l,h}bw: (TL, TH) of one row in each word
            return vpmaddubsw(T.Select(h == 0, pairs[0], pairs[1]), _pair(1, 16))
        return (vpmaddubsw(lo, T.Select(h == 0, _pair(1, 0), _pair(0, 1)))
                + vpmaddubsw(hi, T.Select(h == 0, _pair(16, 0), _pair(0, 16))))

    def lane_sum(wide, r, p, h):
        v = wide.vload([r, p, h, 0], i16x16)
        return T.Shuffle([v], list(range(8))) + T.Shuffle([v], list(range(8, 16)))

    def row_sums(wide, r, p, first: int):
        # rows first .. first + 7 of the block's exact dots, int32x8
        if widen == "unpack":
            return T.Cast("int32x8", lane_sum(wide, r, p, first // 8))
        rows = T.Shuffle([lane_sum(wide, r, p, 0), lane_sum(wide, r, p, 1)],
                         [first // 2 + j // 2 + 8 * (j % 2) for j in range(8)])
        return T.Cast("int32x8", rows)

    def dots(isum, r, p, hr):
        # IP (p = 0) or IM of rows 8 hr .. 8 hr + 7 of tile r, as fp32
        return T.Cast("float32x8", isum.vload([r, p, 8 * hr], "int32x8"))

    def group_output(alpha, mu, tile, g, first, ip, im):
        a = T.Cast("float32x8", alpha.vload([tile, g, first], "float16x8"))
        if has_mu:
            return (a + a) * ip + (T.Cast("float32x8", mu.vload([tile, g, first], "float16x8")) - a) * im
        return a * (T.broadcast(T.float32(2), 8) * ip - im)

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
        tab = T.alloc_buffer((C // 2, 2, 2, 2 * L), "int8")  # [column byte pair, nibble half, TL | TH, 16 (c % 2) + e]
        # 1. Quantise x per group (the AVX-512 int8 kernel's quantiser), 2. the TL / TH tables.
        quantise(x, 0, xq, xs, qsum)
        for k in T.vectorized(K):
            parts[0, k] = T.bitwise_and(xq[0, k], T.int8(15))  # ql
            parts[1, k] = T.shift_right(xq[0, k], T.int8(4))  # qh (arithmetic)
        for c2 in range(C // 2):
            for half in T.unroll(2):
                for t in T.unroll(2):
                    tab[c2, half, t, T.ramp(0, 1, 2 * L)] = table(parts, c2, half, t)
        # 3. The GEMV: R tiles of 16 rows per task.
        for task in tasks(NT // R):
            # global scope: stack allocas, registers after SROA (see the fp32 kernel)
            acc = T.alloc_buffer((R, L), "float32")
            wide = T.alloc_buffer((R, P, 2, L), "int16")  # [tile, plane, h, 2 lanes x 8 words] (see widened)
            isum = T.alloc_buffer((R, P, L), "int32")  # [tile, plane, row]: the group's exact dots
            bsum = T.alloc_buffer((R, P, 2, 2 * L), "int8")  # [tile, plane, TL | TH, byte]: a step's byte sums
            for r in T.unroll(R):
                acc[r, T.ramp(0, 1, L)] = T.broadcast(T.float32(0), L)
            for g in range(GB):
                for r in T.unroll(R):
                    for p in T.unroll(P):
                        isum[r, p, T.ramp(0, 1, L)] = T.broadcast(T.int32(0), L)
                for blk in range(NB):
                    for r in T.unroll(R):
                        for p in T.unroll(P):
                            for h in T.unroll(2):
                                wide[r, p, h, T.ramp(0, 1, L)] = T.broadcast(T.int16(-lane_offset), L)
                    for st in range(STEPS):
                        # 4 lookups per byte sum: 2 loads (column bytes col, col + 1 and col + 2, col + 3) x
                        # 2 nibbles; each table load serves the tiles' planes back to back
                        for r in T.unroll(R):
                            for p in T.unroll(P):
                                for t in T.unroll(2):
                                    bsum[r, p, t, T.ramp(0, 1, 2 * L)] = T.broadcast(T.int8(0), 2 * L)
                        for u in T.unroll(2):
                            for half in T.unroll(2):
                                for t in T.unroll(2):
                                    for r in T.unroll(R):
                                        for p in T.unroll(P):
                                            col = g * CG + blk * CB + 4 * st + 2 * u  # an even column byte
                                            bsum[r, p, t, T.ramp(0, 1, 2 * L)] = bsum.vload([r, p, t, 0], i8x32) + vpshufb(
                                                tab.vload([col // 2, half, t, 0], i8x32),
                                                idx(sign, mask, task * R + r, col, p, half))
                        for r in T.unroll(R):
                            for p in T.unroll(P):
                                for h in T.unroll(2):
                                    wide[r, p, h, T.ramp(0, 1, L)] = wide.vload([r, p, h, 0], i16x16) + widened(
                                        bsum.vload([r, p, 0, 0], i8x32), bsum.vload([r, p, 1, 0], i8x32), h)
                    for r in T.unroll(R):
                        for p in T.unroll(P):
                            isum[r, p, T.ramp(0, 1, 8)] = isum.vload([r, p, 0], "int32x8") + row_sums(wide, r, p, 0)
                            isum[r, p, T.ramp(8, 1, 8)] = isum.vload([r, p, 8], "int32x8") + row_sums(wide, r, p, 8)
                for r in T.unroll(R):
                    for hr in T.unroll(2):
                        acc[r, T.ramp(8 * hr, 1, 8)] = acc.vload([r, 8 * hr], "float32x8") + T.broadcast(
                            xs[0, g], 8) * group_output(alpha, mu, task * R + r, g, 8 * hr, dots(isum, r, 0, hr),
                                                        dots(isum, r, P - 1, hr) if has_mask
                                                        else T.broadcast(T.Cast("float32", qsum[0, g]), 8))
            for r in T.unroll(R):
                for l in T.vectorized(L):
                    y[0, (task * R + r) * L + l] = plus_bias(acc[r, l], bias, has_bias, (task * R + r) * L + l)

    return without_absent(kernel, has_mask, has_mu, has_bias)
