"""The fp32 GEMV (M = 1) for the pbs2p sparse-binary linear op on x86 with AVX-512 (F, VBMI): lookup tables.

The x86 preset's one-row calls (the ``decode`` entry) run this hand-written kernel instead of the TE kernel
(``sparse_binary_linear`` + the CPU schedule rule), which spends about four vector instructions per 16
weights (a bit test per plane, a blend, an FMA). Here 16 rows x 4 columns cost one ``vpermps``.

Arithmetic (exact fp32, no quantisation). With ``P = mask & sign`` and ``M = mask`` as 0/1 planes, a weight
is ``mask * (alpha * (2 sign - 1) + mu) = 2 alpha P + (mu - alpha) M``, so per scale group ``g``

    y[o] = sum_g 2 alpha[o, g] * XP[o, g] + (mu[o, g] - alpha[o, g]) * XM[o, g]

with ``XP = sum_k x_k P[o, k]`` and ``XM = sum_k x_k M[o, k]``. For every 4 consecutive inputs the kernel
first builds the 16 subset sums ``T_j[e] = sum_{i: bit i of e} x[4j + i]`` (one zmm register of fp32 per
``j``; ``16 K`` bytes for the layer, in L2), so the 4 columns of a plane nibble contribute ``T_j[nibble]``.

Layout. The kernel reads the x86 target layout as it is: sign and mask bytes row-interleaved
``[N/16, K/8, 16]`` (byte ``[t, c, j]`` holds bits ``8c .. 8c+7`` of row ``16t + j``) and fp16 scales
``[N/16, K/G, 16]``. Per 16 rows and column byte: one 16-byte load per plane, a ``vpermb`` that puts row
``j``'s byte into int32 lane ``j``, ``vpermps`` with ``T_{2c}`` (``vpermps`` reads bits 0-3 of each lane:
the low nibble) and, after a 32-bit shift by 4, with ``T_{2c+1}``, and two ``vaddps``. ``R`` tiles of 16
rows per parallel task share the table loads; each (tile, plane, nibble) has its own accumulator.
"""

from __future__ import annotations

from pbs2pc.compiler.tvm_compat import T, tirx

#: Rows per vector (fp32 lanes of a zmm register) and the row interleave the kernel reads.
LANES = 16
#: 16-row tiles per parallel task (they share each table load). With the mask as pattern codes (the x86
#: layout), streaming from memory, 2 threads, 1 / 2 / 4 tiles: 4096x11008 855 / 504 / 469 us, 11008x4096
#: 1038 / 694 / 707 us; cache-resident 576x1536 24.9 / 21.0 / 20.4 us (A/B in one process).
TILES_PER_TASK = 4
#: Layers with fewer weights run their tasks on one thread: a parallel launch costs more than it saves there
#: (SmolLM2's k/v projection, 192x576: 2.8 us serial, 4.8 us parallel; 576x576 about level, 8.2-9.8 vs
#: 8.1-8.4 us; 1536x576 15-16 us parallel, 20-21 us serial; fp32, 2 threads, 8 layers in turn).
PARALLEL_MIN_WEIGHTS = 1 << 18


def task_loop(out_features: int, in_features: int, parallel_min: int | None = None):
    """``T.parallel``, or ``T.serial`` for a layer of fewer than ``parallel_min`` weights (default
    :data:`PARALLEL_MIN_WEIGHTS`): too small to be worth a parallel launch."""
    threshold = PARALLEL_MIN_WEIGHTS if parallel_min is None else parallel_min
    return T.parallel if out_features * in_features >= threshold else T.serial


def supported(out_features: int, in_features: int, group_size: int, interleave: int, plane_dtype: str,
              coded: bool = False) -> bool:
    """Whether the kernel covers this layer (else the TE kernel runs it); ``coded``: with its mask as pattern
    codes, which come in chunks of 32 columns."""
    return (interleave == LANES and plane_dtype == "uint8" and out_features % LANES == 0
            and group_size % (32 if coded else 8) == 0 and in_features % group_size == 0)


def tiles_per_task(out_features: int, preferred: int) -> int:
    """The largest of ``preferred``, 2, 1 that divides the layer's 16-row tiles."""
    tiles = out_features // LANES
    return next(r for r in (preferred, 2, 1) if tiles % r == 0)


def spread_rows(bits16):
    """The 16 rows' plane bytes (uint8x16, one per row) as uint8x64 with row j's byte in all four bytes of
    int32 lane j (one ``vpermb``)."""
    return T.Shuffle([bits16] * 4, [j // 4 for j in range(64)])  # Shuffle cannot widen: index into four copies


def row_plane(buf, tile: int, col: int):
    """Plane byte ``col`` of the 16 rows of ``tile`` (one 128-bit load of the ``[N/16, K/8, 16]`` layout)."""
    return buf.vload([tile, col, 0], "uint8x16")


def p_plane(sign, mask, tile: int, col: int, and_mask: bool):
    """Byte ``col`` of the 16 rows' ``P = mask & sign`` plane: ``sign & mask`` with ``and_mask``, else ``sign``
    itself (a layer without a mask, or a sign plane the build stored as ``sign & mask`` already)."""
    bits = row_plane(sign, tile, col)
    return T.bitwise_and(bits, row_plane(mask, tile, col)) if and_mask else bits


def vpermps(table, idx):
    """``table[idx & 15]`` per fp32 lane (``vpermps``: it reads bits 0-3 of each int32 index lane)."""
    return T.call_llvm_pure_intrin("float32x16", "llvm.x86.avx512.permvar.sf.512", table, idx)


def group_output(alpha, mu, has_mu: bool, tile, g, lane, p_sum, m_sum):
    """One scale group's part of output ``lane`` of ``tile`` from its sums of inputs over the P and M planes:
    ``2 alpha P_sum + (mu - alpha) M_sum`` (``alpha (2 P_sum - M_sum)`` without mu), fp32."""
    a = T.Cast("float32", alpha[tile, g, lane])
    if has_mu:
        return T.float32(2) * a * p_sum + (T.Cast("float32", mu[tile, g, lane]) - a) * m_sum
    return a * (T.float32(2) * p_sum - m_sum)


def subset_sum(x, row: int, j: int, e):
    """Entry ``e`` of the lookup table of inputs ``4j .. 4j+3`` of ``x[row]``: ``T_j[e] = sum of x[row, 4j + i]
    over the set bits i of e`` (fp32; shared by the fp32 GEMV and GEMM)."""
    terms = [T.Cast("float32", T.bitwise_and(T.shift_right(e, i), 1)) * x[row, 4 * j + i] for i in range(4)]
    return terms[0] + terms[1] + terms[2] + terms[3]


def plus_bias(value, bias, has_bias: bool, index):
    """``value + bias[index]``, or ``value`` for a layer without a bias."""
    return value + bias[index] if has_bias else value


def without_absent(kernel, has_mask: bool, has_mu: bool, has_bias: bool):
    """``kernel`` (parameters ``x, sign, mask, alpha, mu, bias, y``) without the inputs the layer lacks."""
    keep = [True, True, has_mask, True, has_mu, has_bias, True]
    params = [p for p, k in zip(kernel.params, keep) if k]
    return tirx.PrimFunc(params, kernel.body, kernel.ret_type, kernel.attrs)


def gemv_fp32(out_features: int, in_features: int, group_size: int, has_mask: bool, has_mu: bool,
              has_bias: bool, codes: tuple[int, int] | None = None, tiles: int | None = None,
              parallel_min: int | None = None):
    """The PrimFunc ``(x [1, K] f32, sign, [mask], alpha, [mu], [bias], y [1, N] f32)`` for one layer shape.

    ``tiles``: 16-row tiles per task (default :data:`TILES_PER_TASK`; see :func:`tiles_per_task`);
    ``parallel_min``: see :func:`task_loop` (the tuner's knobs).

    ``codes=(n, m)``: the mask arrives as pattern codes (:mod:`pbs2pc.passes.kernels.x86_avx512.mask_codes`) and the
    sign plane as ``P = sign & mask``; ``XM`` is then one ``vpermi2ps`` per 16 rows and column byte, from a
    32-entry table per column byte (``XM`` of each pattern), indexed by the codes, instead of two
    ``vpermps`` of mask nibbles.
    """
    from pbs2pc.passes.kernels.x86_avx512 import mask_codes

    N, K, G = out_features, in_features, group_size
    R = tiles_per_task(N, tiles or TILES_PER_TASK)
    NT, C, GB = N // LANES, K // 8, K // G
    CG = G // 8  # plane bytes per row per group
    tasks = task_loop(N, K, parallel_min)
    coded = codes is not None  # a Python bool: TVMScript conditions must be one
    NC = mask_codes.MAX_PATTERNS
    mask_shape = (NT, mask_codes.code_width(K)) if coded else (NT, C, LANES)
    plane_mask = has_mask and not coded  # the mask is a plane of bits
    step = 4 if coded else 1  # column bytes per inner step: codes come in chunks of 4

    def column(g, cb, c4):
        return g * CG + cb * step + c4

    def lookup(tab, col, nibble, bits16):
        # row j's byte in every byte of int32 lane j; vpermps reads bits 0-3 of a lane only, so the copies
        # above do not matter and the high nibble is one 32-bit shift away
        idx = T.reinterpret("int32x16", spread_rows(bits16))
        if nibble == 1:
            idx = T.shift_right(idx, T.broadcast(4, LANES))
        return vpermps(tab.vload([2 * col + nibble, 0], "float32x16"), idx)

    def p_bits(sign, mask, tile, col):
        return p_plane(sign, mask, tile, col, plane_mask)

    def code_lookup(tm, mask, tile, chunk, c4):
        # XM of the 16 rows for column byte 4 chunk + c4: their codes (byte c4 of each row's int32 lane of the
        # extracted chunk) index the 32 fp32 entries of that column byte's table (vpermi2ps reads 5 bits)
        idx = T.shift_right(T.reinterpret("int32x16", mask_codes.extract(mask, tile, chunk)),
                            T.broadcast(8 * c4, LANES))
        return T.call_llvm_pure_intrin("float32x16", "llvm.x86.avx512.vpermi2var.ps.512",
                                       tm.vload([4 * chunk + c4, 0], "float32x16"), idx,
                                       tm.vload([4 * chunk + c4, LANES], "float32x16"))

    fill_kept = mask_codes.pattern_bits(*codes, "float32") if coded else None

    @T.prim_func(private=True, check_well_formed=False)
    def kernel(x: T.Buffer((1, K), "float32"), sign: T.Buffer((NT, C, LANES), "uint8"),
               mask: T.Buffer(mask_shape, "uint8"), alpha: T.Buffer((NT, GB, LANES), "float16"),
               mu: T.Buffer((NT, GB, LANES), "float16"), bias: T.Buffer((N,), "float32"),
               y: T.Buffer((1, N), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        tab = T.alloc_buffer((K // 4, LANES), "float32")
        xm = T.alloc_buffer((GB,), "float32")  # XM of a layer without a mask plane: the group's sum of x
        # 1. The tables (serial: K/4 vectors, a few microseconds).
        for j in range(K // 4):
            for e in T.vectorized(LANES):
                tab[j, e] = subset_sum(x, 0, j, e)
        if not has_mask:
            for g in range(GB):
                xm[g] = T.float32(0)
                for k in range(G):
                    xm[g] = xm[g] + x[0, g * G + k]
        # With codes: tm[c, e] = XM of pattern e over column byte c.
        tm = T.alloc_buffer((C, NC) if coded else (1, 1), "float32")
        kept = T.alloc_buffer((8, NC) if coded else (1, 1), "float32")  # bit i of pattern e
        if coded:
            fill_kept(kept)
            for c in range(C):
                for e in T.vectorized(NC):
                    tm[c, e] = T.float32(0)
                for i in T.unroll(8):
                    for e in T.vectorized(NC):
                        tm[c, e] = tm[c, e] + kept[i, e] * x[0, 8 * c + i]
        # 2. The GEMV: R tiles of 16 rows per task, partial sums per (tile, plane, nibble), scaled per group.
        for task in tasks(NT // R):
            acc = T.alloc_buffer((R, LANES), "float32", scope="local")
            part = T.alloc_buffer((R, 2, 2, LANES), "float32", scope="local")  # [tile, P | M, nibble, row]
            for r in T.unroll(R):
                for l in T.vectorized(LANES):
                    acc[r, l] = T.float32(0)
            for g in range(GB):
                for r in T.unroll(R):
                    for p in T.unroll(2):
                        for h in T.unroll(2):
                            for l in T.vectorized(LANES):
                                part[r, p, h, l] = T.float32(0)
                for cb in range(CG // step):
                    for c4 in T.unroll(step):
                        for r in T.unroll(R):
                            part[r, 0, 0, T.ramp(0, 1, LANES)] = part.vload([r, 0, 0, 0], "float32x16") + lookup(
                                tab, column(g, cb, c4), 0, p_bits(sign, mask, task * R + r, column(g, cb, c4)))
                            part[r, 0, 1, T.ramp(0, 1, LANES)] = part.vload([r, 0, 1, 0], "float32x16") + lookup(
                                tab, column(g, cb, c4), 1, p_bits(sign, mask, task * R + r, column(g, cb, c4)))
                            if plane_mask:
                                part[r, 1, 0, T.ramp(0, 1, LANES)] = part.vload([r, 1, 0, 0], "float32x16") + lookup(
                                    tab, column(g, cb, c4), 0, row_plane(mask, task * R + r, column(g, cb, c4)))
                                part[r, 1, 1, T.ramp(0, 1, LANES)] = part.vload([r, 1, 1, 0], "float32x16") + lookup(
                                    tab, column(g, cb, c4), 1, row_plane(mask, task * R + r, column(g, cb, c4)))
                            if coded:
                                part[r, 1, 0, T.ramp(0, 1, LANES)] = part.vload([r, 1, 0, 0], "float32x16") + \
                                    code_lookup(tm, mask, task * R + r, g * (CG // 4) + cb, c4)
                for r in T.unroll(R):
                    for l in T.vectorized(LANES):
                        if not has_mask:
                            part[r, 1, 0, l] = xm[g]
                        acc[r, l] = acc[r, l] + group_output(alpha, mu, has_mu, task * R + r, g, l,
                                                             part[r, 0, 0, l] + part[r, 0, 1, l],
                                                             part[r, 1, 0, l] + part[r, 1, 1, l])
            for r in T.unroll(R):
                for l in T.vectorized(LANES):
                    y[0, (task * R + r) * LANES + l] = plus_bias(acc[r, l], bias, has_bias, (task * R + r) * LANES + l)

    return without_absent(kernel, has_mask, has_mu, has_bias)


def reference(x, sign, mask, alpha, mu, bias, group_size: int):
    """float64 numpy oracle of the layer on the interchange layout (``sign``/``mask`` uint8 ``[N, K/8]``,
    scales ``[N, K/G]``, ``x`` ``[K]``): the dense product ``(mask * (alpha (2 sign - 1) + mu)) @ x + bias``."""
    import numpy as np

    s = np.unpackbits(sign, axis=1, bitorder="little").astype(np.float64)
    m = np.ones_like(s) if mask is None else np.unpackbits(mask, axis=1, bitorder="little").astype(np.float64)
    a = np.repeat(alpha.astype(np.float64), group_size, axis=1)
    u = 0 if mu is None else np.repeat(mu.astype(np.float64), group_size, axis=1)
    y = (m * (a * (2 * s - 1) + u)) @ np.asarray(x, np.float64)
    return y if bias is None else y + bias
