"""The int8-activation GEMV (M = 1) for the pbs2p sparse-binary linear op on x86 with AVX-512 (BW).

Opt-in (``pbs2pc compile --activations int8``): the one-token ``decode`` entry's linear layers quantise
their input to int8 and look the products up in tables (T-MAC style: ``vpshufb``, 64 lookups of 4 weights
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
``T_j[e] = sum_{i: bit i of e} q[4j + i]`` (|T| <= 508: int16, kept as a low-byte and a high-byte table of
16 bytes each; K/2 bytes per table kind, in L1). A plane nibble (4 weights of one row) is then an index:
``IP`` over those 4 columns is ``T_j[P nibble]``, exactly.

Layout. The kernel reads the x86 target layout as it is (no second copy of the weights): sign and mask
bytes row-interleaved ``[N/16, K/8, 16]`` (byte ``[t, c, j]`` holds bits ``8c .. 8c+7`` of row
``16t + j``) and fp16 scales ``[N/16, K/G, 16]``. One 64-byte load holds 16 rows x 4 column bytes, one
128-bit lane per column byte: exactly the shape of ``vpshufb``, whose 16-byte table is per lane. Per load
and plane: the low and high nibbles as indices (``vpand``, ``vpsrlw``), two ``vpshufb`` each (low and high
table bytes), ``vpunpck{l,h}bw`` back to int16 and ``vpaddw`` into accumulators that hold rows 0-7 and
8-15 of each lane (G/16 lookups of |T| <= 508 per word and group: no overflow for G <= 1024). At the end of a group
the four lanes are summed, widened to int32 and scaled in fp32. ``R`` tiles of 16 rows per parallel task
share the table loads.
"""

from __future__ import annotations

from pbs2pc.compiler.tvm_compat import T
from pbs2pc.passes.kernels.sparse_binary_gemv import (LANES, group_output, plus_bias, task_loop, tiles_per_task,
                                                      without_absent)

#: Input columns per 64-byte plane load (4 column bytes x 8 bits): the group size must be a multiple.
COLUMNS_PER_LOAD = 32
#: The int16 sums of a group stay exact up to G / 16 lookups of |T| <= 508 per word: G <= 1024.
MAX_GROUP = 1024
#: 16-row tiles per parallel task (4 int16 accumulators each, sharing the table loads). At 11008x4096 with the
#: planes in L3, 4 tiles ran in 295 us, 2 in 303 us, 1 in 322 us; streaming from memory 2 and 4 tiles were
#: level (541 / 560 us) and 1 slower (646 us), 2 threads.
TILES_PER_TASK = 2


def supported(out_features: int, in_features: int, group_size: int, interleave: int, plane_dtype: str) -> bool:
    """Whether the kernel covers this layer (else the fp32 kernel runs it)."""
    return (interleave == LANES and plane_dtype == "uint8" and out_features % LANES == 0
            and group_size % COLUMNS_PER_LOAD == 0 and group_size <= MAX_GROUP and in_features % group_size == 0)


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


def gemv_int8(out_features: int, in_features: int, group_size: int, has_mask: bool, has_mu: bool,
              has_bias: bool):
    """The PrimFunc ``(x [1, K] f32, sign, [mask], alpha, [mu], [bias], y [1, N] f32)`` for one layer shape."""
    N, K, G = out_features, in_features, group_size
    R = tiles_per_task(N, TILES_PER_TASK)
    NT, C, GB = N // LANES, K // 8, K // G
    CG = G // 8  # plane bytes per row per group
    CB = CG // 4  # 64-byte (4 column bytes x 16 rows) loads per group

    def u8(v):
        return T.broadcast(T.uint8(v), 64)

    quantise = quantiser(K, G, group_sums=not has_mask)
    tasks = task_loop(N, K)

    def table_entry(xq, col_byte, nibble, e):
        # T[e] for the 4 inputs of one nibble of a column byte, as int16 (|T| <= 4 * 127)
        first = 8 * col_byte + 4 * nibble
        terms = [T.Cast("int16", T.bitwise_and(T.shift_right(e, i), 1)) * T.Cast("int16", xq[0, first + i])
                 for i in range(4)]
        return terms[0] + terms[1] + terms[2] + terms[3]

    def pshufb(table, idx):
        return T.call_llvm_pure_intrin("int8x64", "llvm.x86.avx512.pshuf.b.512",
                                       T.reinterpret("int8x64", table), T.reinterpret("int8x64", idx))

    # vpunpcklbw / vpunpckhbw of (low bytes, high bytes): the int16 values of rows 0-7 / 8-15 of each lane
    interleave = [[i for l in range(4) for j in range(8) for i in (16 * l + 8 * w + j, 64 + 16 * l + 8 * w + j)]
                  for w in range(2)]

    def lookups(tab, col, bits, w):
        # the table values of the low and high nibbles of ``bits`` (16 rows x 4 column bytes), summed, as the
        # int16 words of rows 0-7 (w = 0) or 8-15 (w = 1) of each lane
        lo_nibbles = T.bitwise_and(bits, u8(15))
        hi_nibbles = T.bitwise_and(T.shift_right(bits, u8(4)), u8(15))
        words = [T.reinterpret("int16x32", T.Shuffle(
            [pshufb(tab.vload([2 * h, col, 0], "uint8x64"), idx),
             pshufb(tab.vload([2 * h + 1, col, 0], "uint8x64"), idx)], interleave[w]))
            for h, idx in ((0, lo_nibbles), (1, hi_nibbles))]
        return words[0] + words[1]

    def plane(buf, tile, col):
        return buf.vload([tile, col, 0], "uint8x64")

    lane = [list(range(8 * l, 8 * l + 8)) for l in range(4)]  # the int16 words of each 128-bit lane

    def row_sums(a, b):
        # a: rows 0-7 of each of the 4 lanes, b: rows 8-15 -> the 16 rows' sums over the lanes, int32
        s1 = (T.Shuffle([a, b], lane[0] + lane[1] + [32 + i for i in lane[0] + lane[1]])
              + T.Shuffle([a, b], lane[2] + lane[3] + [32 + i for i in lane[2] + lane[3]]))
        return T.Cast("int32x16", T.Shuffle([s1], lane[0] + lane[2]) + T.Shuffle([s1], lane[1] + lane[3]))

    @T.prim_func(private=True, check_well_formed=False)
    def kernel(x: T.Buffer((1, K), "float32"), sign: T.Buffer((NT, C, LANES), "uint8"),
               mask: T.Buffer((NT, C, LANES), "uint8"), alpha: T.Buffer((NT, GB, LANES), "float16"),
               mu: T.Buffer((NT, GB, LANES), "float16"), bias: T.Buffer((N,), "float32"),
               y: T.Buffer((1, N), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        xq = T.alloc_buffer((1, K), "int8")
        xs = T.alloc_buffer((1, GB), "float32")
        qsum = T.alloc_buffer((1, GB), "int32")  # IM of a layer without a mask plane: the group's sum of q
        tab = T.alloc_buffer((4, C, LANES), "uint8")
        # 1. Quantise x per group (serial: K elements, a few microseconds, not worth a parallel launch).
        quantise(x, 0, xq, xs, qsum)
        # 2. The tables: tab[2h + b, c, e] = byte b (0 low, 1 high) of T[e] for nibble h of column byte c.
        for c in range(C):
            for h in range(2):
                for e in T.vectorized(LANES):
                    tab[2 * h, c, e] = T.Cast("uint8", T.bitwise_and(table_entry(xq, c, h, e), T.int16(255)))
                    tab[2 * h + 1, c, e] = T.Cast("uint8", T.bitwise_and(
                        T.shift_right(table_entry(xq, c, h, e), T.int16(8)), T.int16(255)))
        # 3. The GEMV: R tiles of 16 rows per task; int16 sums per (tile, plane, row half), reduced per group.
        for task in tasks(NT // R):
            acc = T.alloc_buffer((R, LANES), "float32", scope="local")
            a16 = T.alloc_buffer((R, 2, 2, 32), "int16", scope="local")  # [tile, P | M, rows 0-7 | 8-15, word]
            ip = T.alloc_buffer((R, LANES), "int32", scope="local")
            im = T.alloc_buffer((R, LANES), "int32", scope="local")
            for r in T.unroll(R):
                for l in T.vectorized(LANES):
                    acc[r, l] = T.float32(0)
            for g in range(GB):
                for r in T.unroll(R):
                    for p in T.unroll(2):
                        for w in T.unroll(2):
                            for l in T.vectorized(32):
                                a16[r, p, w, l] = T.int16(0)
                for cb in range(CB):
                    for r in T.unroll(R):
                        if has_mask:
                            a16[r, 0, 0, T.ramp(0, 1, 32)] = a16.vload([r, 0, 0, 0], "int16x32") + lookups(
                                tab, g * CG + cb * 4, T.bitwise_and(plane(sign, task * R + r, g * CG + cb * 4),
                                                                    plane(mask, task * R + r, g * CG + cb * 4)), 0)
                            a16[r, 0, 1, T.ramp(0, 1, 32)] = a16.vload([r, 0, 1, 0], "int16x32") + lookups(
                                tab, g * CG + cb * 4, T.bitwise_and(plane(sign, task * R + r, g * CG + cb * 4),
                                                                    plane(mask, task * R + r, g * CG + cb * 4)), 1)
                            a16[r, 1, 0, T.ramp(0, 1, 32)] = a16.vload([r, 1, 0, 0], "int16x32") + lookups(
                                tab, g * CG + cb * 4, plane(mask, task * R + r, g * CG + cb * 4), 0)
                            a16[r, 1, 1, T.ramp(0, 1, 32)] = a16.vload([r, 1, 1, 0], "int16x32") + lookups(
                                tab, g * CG + cb * 4, plane(mask, task * R + r, g * CG + cb * 4), 1)
                        else:
                            a16[r, 0, 0, T.ramp(0, 1, 32)] = a16.vload([r, 0, 0, 0], "int16x32") + lookups(
                                tab, g * CG + cb * 4, plane(sign, task * R + r, g * CG + cb * 4), 0)
                            a16[r, 0, 1, T.ramp(0, 1, 32)] = a16.vload([r, 0, 1, 0], "int16x32") + lookups(
                                tab, g * CG + cb * 4, plane(sign, task * R + r, g * CG + cb * 4), 1)
                for r in T.unroll(R):
                    ip[r, T.ramp(0, 1, LANES)] = row_sums(a16.vload([r, 0, 0, 0], "int16x32"),
                                                          a16.vload([r, 0, 1, 0], "int16x32"))
                    if has_mask:
                        im[r, T.ramp(0, 1, LANES)] = row_sums(a16.vload([r, 1, 0, 0], "int16x32"),
                                                              a16.vload([r, 1, 1, 0], "int16x32"))
                    else:
                        im[r, T.ramp(0, 1, LANES)] = T.broadcast(qsum[0, g], LANES)
                for r in T.unroll(R):
                    for l in T.vectorized(LANES):
                        acc[r, l] = acc[r, l] + xs[0, g] * group_output(
                            alpha, mu, has_mu, task * R + r, g, l, T.Cast("float32", ip[r, l]),
                            T.Cast("float32", im[r, l]))
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
