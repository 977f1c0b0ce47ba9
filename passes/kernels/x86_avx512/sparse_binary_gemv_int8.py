"""The int8-activation GEMV (M = 1) for the pbs2p sparse-binary linear op on x86 with AVX-512 (VBMI, VNNI).

Opt-in (``pbs2pc compile --activations int8``): the one-token ``decode`` entry's linear layers quantise
their input to int8 and look the products up in tables (T-MAC style: ``vpermb``, 64 lookups of 4 weights
per instruction). The prompt's calls (``main``/``prefill``, M rows) go to the int8 GEMM
(``sparse_binary_gemm_int8``), which shares this module's quantisation; without ``--activations int8`` one-row
calls run the fp32 lookup-table GEMV (``sparse_binary_gemv``).

Arithmetic. Per group ``g`` of ``G`` inputs, the activation is quantised symmetrically:
``s_g = max|x_g| / 127``, ``q = round_half_even(x * (127 / max|x_g|))`` (0 where the group is all zeros).
With ``P = mask & sign`` and ``M = mask`` as 0/1 planes, a weight is
``mask * (alpha * (2 sign - 1) + mu) = 2 alpha P + (mu - alpha) M``, so

    y[o] = sum_g s_g * (2 alpha[o, g] * IP[o, g] + (mu[o, g] - alpha[o, g]) * IM[o, g])

where ``IP = sum_k q_k P[o, k]`` and ``IM = sum_k q_k M[o, k]`` are exact integer dot products. The only
error against the fp32 op is the rounding of ``x`` to 8 bits per group (see docs/performance.md for its
perplexity cost); :func:`reference` is the numpy oracle of exactly this arithmetic.

Lookup tables. For every 4 consecutive inputs ``q[4j .. 4j+3]`` the kernel first builds the 16 sums
``T_j[e] = sum_{i: bit i of e} q[4j + i]`` (|T| <= 508: int16, kept as a low-byte and a high-byte table).
A plane nibble (4 weights of one row) is then an index: ``IP`` over those 4 columns is ``T_j[P nibble]``,
exactly. The tables of 4 consecutive column bytes (32 inputs) fill one 64-byte ``vpermb`` table per nibble
half and byte: entry ``16 c' + e`` is ``T[e]`` for column byte ``c'``.

Layout. The kernel reads the x86 target layout as it is (no second copy of the weights): sign and mask
bytes row-interleaved ``[N/16, K/8, 16]`` (byte ``[t, c, j]`` holds bits ``8c .. 8c+7`` of row
``16t + j``) and fp16 scales ``[N/16, K/G, 16]``. One 64-byte load holds 16 rows x 4 column bytes; one
``vpermb`` turns it row-major (int32 lane ``j`` holds row ``j``'s 4 column bytes). Per load and plane: the
low and high nibbles, each ORed with its column's table offset, are the indices; two ``vpermb`` each (low
and high table bytes) and a ``vpdpbusd`` per result against a vector of ones sum the 4 column bytes of
each row straight into its int32 lane (``sum lo + 256 sum hi`` is the exact sum; no widening shuffles).
Once per group the sums are scaled in fp32. ``R`` tiles of 16 rows per parallel task share the table
loads. The previous form (``vpshufb`` per 128-bit lane, ``vpunpck{l,h}bw`` widening, int16 ``vpaddw``)
ran 11008x4096 in 356-390 us with the planes in L3, this one in 298-312 us (2 threads, alternating in one
process; docs/performance.md).
"""

from __future__ import annotations

from pbs2pc.compiler.tvm_compat import T
from pbs2pc.passes.kernels.x86_avx512 import mask_codes
from pbs2pc.passes.kernels.x86_avx512.sparse_binary_gemv import (LANES, group_output, plus_bias, task_loop, tiles_per_task,
                                                      without_absent)

#: Input columns per 64-byte plane load (4 column bytes x 8 bits): the group size must be a multiple.
COLUMNS_PER_LOAD = 32
#: 16-row tiles per parallel task (4 int32 accumulators each, sharing the table loads). With the mask as
#: pattern codes, streaming from memory, 2 threads, 1 / 2 / 4 tiles: 4096x11008 622 / 408 / 356 us,
#: 11008x4096 597 / 386 / 363 us; cache-resident 1536x576 24.8 / 21.2 / 19.2 us (A/B in one process).
TILES_PER_TASK = 4


def supported(out_features: int, in_features: int, group_size: int, interleave: int, plane_dtype: str) -> bool:
    """Whether the kernel covers this layer (else the fp32 kernel runs it)."""
    return (interleave == LANES and plane_dtype == "uint8" and out_features % LANES == 0
            and group_size % COLUMNS_PER_LOAD == 0 and in_features % group_size == 0)


def quantiser(in_features: int, group_size: int, group_sums: bool):
    """A TVMScript macro ``quantise(x, m, q, xs, qsum)``: row ``m`` of ``x`` [*, K] (fp32) to ``q`` [*, K] int8
    per group of ``G`` (symmetric, ``xs`` [*, K/G] the scales ``max|x| / 127``, round half to even, 0 for a
    group of zeros), and with ``group_sums`` each group's sum of ``q`` into ``qsum`` [*, K/G] (int32)."""
    K, G = in_features, group_size
    GB = K // G

    @T.macro
    def quantise(x, m, q, xs, qsum):
        for g in range(GB):
            peak = T.alloc_buffer((LANES,), "float32", scope="local")
            amax = T.alloc_buffer((2,), "float32", scope="local")
            for l in T.vectorized(LANES):
                peak[l] = T.float32(0)
            for k0 in range(G // LANES):
                for l in T.vectorized(LANES):
                    peak[l] = T.max(peak[l], T.fabs(x[m, g * G + k0 * LANES + l]))
            amax[0] = T.float32(0)
            for l in range(LANES):
                amax[0] = T.max(amax[0], peak[l])
            xs[m, g] = amax[0] / T.float32(127)
            amax[1] = T.if_then_else(amax[0] > T.float32(0), T.float32(127) / amax[0], T.float32(0))
            for k in T.vectorized(G):
                q[m, g * G + k] = T.Cast("int8", T.round(x[m, g * G + k] * amax[1]))
            if group_sums:
                qsum[m, g] = 0
                for k in range(G):
                    qsum[m, g] = qsum[m, g] + T.Cast("int32", q[m, g * G + k])

    return quantise


def _vpermb(table, idx):
    return T.call_llvm_pure_intrin("int8x64", "llvm.x86.avx512.permvar.qi.512", T.reinterpret("int8x64", table),
                                   T.reinterpret("int8x64", idx))


def _vpdpbusd(acc, unsigned, signed):
    # acc (int32x16) + the sums of the 4 byte products unsigned x signed in each int32 lane
    return T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc, T.reinterpret("int8x64", unsigned),
                                   T.reinterpret("int8x64", signed))


def gemv_int8(out_features: int, in_features: int, group_size: int, has_mask: bool, has_mu: bool,
              has_bias: bool, codes: tuple[int, int] | None = None, tiles: int | None = None,
              parallel_min: int | None = None):
    """The PrimFunc ``(x [1, K] f32, sign, [mask], alpha, [mu], [bias], y [1, N] f32)`` for one layer shape.

    ``tiles``: 16-row tiles per task (default :data:`TILES_PER_TASK`); ``parallel_min``: see
    :func:`~pbs2pc.passes.kernels.x86_avx512.sparse_binary_gemv.task_loop` (the tuner's knobs).

    ``codes=(n, m)``: the mask arrives as pattern codes (:mod:`pbs2pc.passes.kernels.x86_avx512.mask_codes`, ``[N/16,
    W]``) and the sign plane as ``P = sign & mask``; ``IM`` is then looked up per code: a 32-entry table per
    column byte (``IM`` of each pattern), 4 column bytes' tables in a 128-byte ``vpermi2b`` table per
    result byte, and the same ``vpdpbusd`` sums.
    """
    N, K, G = out_features, in_features, group_size
    R = tiles_per_task(N, tiles or TILES_PER_TASK)
    NT, C, GB = N // LANES, K // 8, K // G
    CG = G // 8  # plane bytes per row per group
    CB = CG // 4  # 64-byte (4 column bytes x 16 rows) loads per group
    coded = codes is not None  # a Python bool: TVMScript conditions must be one
    planes = 2 if has_mask and not coded else 1  # P (and M) looked up by plane nibbles
    mask_shape = (NT, mask_codes.code_width(K)) if coded else (NT, C, LANES)
    NC = mask_codes.MAX_PATTERNS

    quantise = quantiser(K, G, group_sums=not has_mask)
    tasks = task_loop(N, K, parallel_min)
    ones_signed, ones_unsigned = T.broadcast(T.int8(1), 64), T.broadcast(T.uint8(1), 64)
    # the table offset of each byte's column in the row-major load: 16 x (byte index mod 4)
    column_offset = T.Cast("uint8x64", T.shift_left(T.bitwise_and(T.ramp(0, 1, 64), 3), 4))

    def table_entry(xq, col_byte, nibble, e):
        # T[e] for the 4 inputs of one nibble of a column byte, as int16 (|T| <= 4 * 127)
        first = 8 * col_byte + 4 * nibble
        terms = [T.Cast("int16", T.bitwise_and(T.shift_right(e, i), 1)) * T.Cast("int16", xq[0, first + i])
                 for i in range(4)]
        return terms[0] + terms[1] + terms[2] + terms[3]

    def row_major(bytes64):
        # [column byte c', row j] -> [row j, column byte c']: row j's 4 column bytes in int32 lane j
        return T.Shuffle([bytes64], [16 * (b % 4) + b // 4 for b in range(64)])

    def indices(bits, half):
        # nibble ``half`` (0 low, 1 high: a 16-bit shift, so LLVM cannot move it before the shuffle) of every
        # byte, ORed with its column's table offset
        words = T.shift_right(T.reinterpret("uint16x32", bits), T.broadcast(T.Cast("uint16", 4 * half), 32))
        return T.bitwise_or(T.bitwise_and(T.reinterpret("uint8x64", words), T.broadcast(T.uint8(15), 64)),
                            column_offset)

    def plane_bits(sign, mask, p, tile, col):
        # P = mask & sign (p = 0) or M = mask (p = 1) of 16 rows x 4 column bytes, row-major
        s = sign.vload([tile, col, 0], "uint8x64")
        if not has_mask or coded:  # with codes, the sign plane is P already
            return row_major(s)
        m = mask.vload([tile, col, 0], "uint8x64")
        return row_major(T.Select(p == 0, T.bitwise_and(s, m), m))

    # the code table offset of each byte's column in a chunk of codes (byte 4 r + c'): 32 c'
    code_offset = T.Cast("uint8x64", T.shift_left(T.bitwise_and(T.ramp(0, 1, 64), 3), 5))

    def code_lookup(tm, chunk, byte, mask, tile):
        # byte ``byte`` of IM for the 16 rows x 4 column bytes of a chunk: vpermi2b over 4 x 32 entries
        idx = T.bitwise_or(mask_codes.extract(mask, tile, chunk), code_offset)
        return T.call_llvm_pure_intrin("int8x64", "llvm.x86.avx512.vpermi2var.qi.512",
                                       T.reinterpret("int8x64", tm.vload([chunk, byte, 0], "uint8x64")),
                                       T.reinterpret("int8x64", idx),
                                       T.reinterpret("int8x64", tm.vload([chunk, byte, 64], "uint8x64")))

    fill_kept = mask_codes.pattern_bits(*codes, "int16") if coded else None

    @T.prim_func(private=True, check_well_formed=False)
    def kernel(x: T.Buffer((1, K), "float32"), sign: T.Buffer((NT, C, LANES), "uint8"),
               mask: T.Buffer(mask_shape, "uint8"), alpha: T.Buffer((NT, GB, LANES), "float16"),
               mu: T.Buffer((NT, GB, LANES), "float16"), bias: T.Buffer((N,), "float32"),
               y: T.Buffer((1, N), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        xq = T.alloc_buffer((1, K), "int8")
        xs = T.alloc_buffer((1, GB), "float32")
        qsum = T.alloc_buffer((1, GB), "int32")  # IM of a layer without a mask plane: the group's sum of q
        tab = T.alloc_buffer((C // 4, 2, 2, 64), "uint8")  # [4 column bytes, nibble half, lo | hi byte, 16 c' + e]
        # 1. Quantise x per group (serial: K elements, a few microseconds, not worth a parallel launch).
        quantise(x, 0, xq, xs, qsum)
        # 2. The tables: byte b of T[e] for nibble h of column byte c at tab[c // 4, h, b, 16 (c % 4) + e].
        for c in range(C):
            for h in range(2):
                for e in T.vectorized(LANES):
                    tab[c // 4, h, 0, 16 * (c % 4) + e] = T.Cast(
                        "uint8", T.bitwise_and(table_entry(xq, c, h, e), T.int16(255)))
                    tab[c // 4, h, 1, 16 * (c % 4) + e] = T.Cast(
                        "uint8", T.bitwise_and(T.shift_right(table_entry(xq, c, h, e), T.int16(8)), T.int16(255)))
        # 2b. With codes: tm[c // 4, b, 32 (c % 4) + e] = byte b of IM of pattern e over column byte c.
        tm = T.alloc_buffer((C // 4, 2, 4 * NC) if coded else (1, 1, 1), "uint8")
        kept = T.alloc_buffer((8, NC) if coded else (1, 1), "int16")  # bit i of pattern e
        im16 = T.alloc_buffer((NC,), "int16")
        if coded:
            fill_kept(kept)
            for c in range(C):
                for e in T.vectorized(NC):
                    im16[e] = T.int16(0)
                for i in T.unroll(8):
                    for e in T.vectorized(NC):
                        im16[e] = im16[e] + kept[i, e] * T.Cast("int16", xq[0, 8 * c + i])
                for e in T.vectorized(NC):
                    tm[c // 4, 0, NC * (c % 4) + e] = T.Cast("uint8", T.bitwise_and(im16[e], T.int16(255)))
                    tm[c // 4, 1, NC * (c % 4) + e] = T.Cast(
                        "uint8", T.bitwise_and(T.shift_right(im16[e], T.int16(8)), T.int16(255)))
        # 3. The GEMV: R tiles of 16 rows per task; int32 sums of the low and high table bytes per (tile,
        #    plane, row), scaled per group.
        for task in tasks(NT // R):
            acc = T.alloc_buffer((R, LANES), "float32", scope="local")
            sums = T.alloc_buffer((R, 2, 2, LANES), "int32", scope="local")  # [tile, P | M, lo | hi byte, row]
            for r in T.unroll(R):
                for l in T.vectorized(LANES):
                    acc[r, l] = T.float32(0)
            for g in range(GB):
                for r in T.unroll(R):
                    for p in T.unroll(2 if has_mask else 1):
                        for b in T.unroll(2):
                            for l in T.vectorized(LANES):
                                sums[r, p, b, l] = 0
                for cb in range(CB):
                    for r in T.unroll(R):
                        for p in T.unroll(planes):
                            for h in T.unroll(2):
                                # low table bytes are unsigned (times signed ones), high bytes signed
                                sums[r, p, 0, T.ramp(0, 1, LANES)] = _vpdpbusd(
                                    sums.vload([r, p, 0, 0], "int32x16"),
                                    _vpermb(tab.vload([g * CB + cb, h, 0, 0], "uint8x64"),
                                            indices(plane_bits(sign, mask, p, task * R + r, g * CG + 4 * cb), h)),
                                    ones_signed)
                                sums[r, p, 1, T.ramp(0, 1, LANES)] = _vpdpbusd(
                                    sums.vload([r, p, 1, 0], "int32x16"), ones_unsigned,
                                    _vpermb(tab.vload([g * CB + cb, h, 1, 0], "uint8x64"),
                                            indices(plane_bits(sign, mask, p, task * R + r, g * CG + 4 * cb), h)))
                        if coded:
                            sums[r, 1, 0, T.ramp(0, 1, LANES)] = _vpdpbusd(
                                sums.vload([r, 1, 0, 0], "int32x16"),
                                code_lookup(tm, g * CB + cb, 0, mask, task * R + r),
                                ones_signed)
                            sums[r, 1, 1, T.ramp(0, 1, LANES)] = _vpdpbusd(
                                sums.vload([r, 1, 1, 0], "int32x16"), ones_unsigned,
                                code_lookup(tm, g * CB + cb, 1, mask, task * R + r))
                for r in T.unroll(R):
                    for l in T.vectorized(LANES):
                        acc[r, l] = acc[r, l] + xs[0, g] * group_output(
                            alpha, mu, has_mu, task * R + r, g, l,
                            T.Cast("float32", sums[r, 0, 0, l] + sums[r, 0, 1, l] * 256),
                            T.Cast("float32", sums[r, 1, 0, l] + sums[r, 1, 1, l] * 256) if has_mask
                            else T.Cast("float32", qsum[0, g]))
            for r in T.unroll(R):
                for l in T.vectorized(LANES):
                    y[0, (task * R + r) * LANES + l] = plus_bias(acc[r, l], bias, has_bias, (task * R + r) * LANES + l)

    return without_absent(kernel, has_mask, has_mu, has_bias)


def reference(x, sign, mask, alpha, mu, bias, group_size: int):
    """numpy oracle of :func:`gemv_int8` on the interchange layout (``sign``/``mask`` uint8 ``[N, K/8]``,
    scales ``[N, K/G]``): the same per-group quantisation of ``x`` ``[K]``, then exact integer dots."""
    import numpy as np

    g = group_size
    x = np.asarray(x, np.float32).reshape(-1, g)
    amax = np.abs(x).max(axis=1)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.round(x * inv[:, None]).astype(np.int64)  # half to even, as the kernel
    scale = (amax / np.float32(127)).astype(np.float32)
    s = np.unpackbits(sign, axis=1, bitorder="little").astype(np.int64)
    m = np.ones_like(s) if mask is None else np.unpackbits(mask, axis=1, bitorder="little").astype(np.int64)
    n = s.shape[0]
    ip = ((s & m).reshape(n, -1, g) * q[None]).sum(-1)
    im = (m.reshape(n, -1, g) * q[None]).sum(-1)
    a = alpha.astype(np.float64)
    u = np.zeros_like(a) if mu is None else mu.astype(np.float64)
    y = (scale[None].astype(np.float64) * (2 * a * ip + (u - a) * im)).sum(-1)
    return y if bias is None else y + bias
