"""The int8-activation GEMM (any M, the prompt) for the pbs2p sparse-binary linear op on ARMv8.2 NEON: ``sdot``.

The arithmetic of the int8 GEMVs (:mod:`.sparse_binary_gemv_int8`, and the x86 int8 kernels): each row ``m`` of
``x`` is quantised per scale group (``s = max|x| / 127``, ``q`` int8, round half to even), and per group

    y[m, o] = sum_g s[m, g] * (alpha[o, g] * IT[m, o, g] + mu[o, g] * IM[m, o, g])

with the exact integer dots ``IT = sum_k q_k t_k`` over the ternary weight ``t = mask * (2 sign - 1)`` and
``IM = sum_k q_k mask_k`` (without a mask plane the group's sum of ``q``). This equals the GEMVs'
``2 alpha IP + (mu - alpha) IM`` (``t = 2 P - M``), so a prompt and a decode step compute the same numbers.

A prompt has many rows, so the weights are worth decoding once per call: per 16-row tile (one parallel task),
``t`` and ``mask`` are expanded to int8 in the ``sdot`` layout ``[K/4, 4, 16]`` (row group ``j`` of 4 rows; in
each 16 bytes, row ``4 j + r``'s 4 inputs ``4 k4 .. 4 k4 + 3`` in bytes ``4 r .. 4 r + 3``): a plane nibble of
16 rows is repeated per row with ``tbl`` and tested bit by bit (``cmtst``), 3 instructions per 16 weights and
plane, ``2 K`` bytes per row of the tile (in L1/L2). Then for every pair of rows of ``x``: per 4 inputs,
each row's 4 quantised inputs broadcast to the 4 lanes (``ld1r``) meet the 4 row groups' ``t`` and ``mask`` in
``sdot`` (4 rows x 4 inputs per instruction): 16 ``sdot`` per 64 weights and 2 rows, 0.125 per weight and row.
Per scale group the int32 dots meet the scales in fp32. Rows of ``x`` past ``M`` (an odd M) are zeros and
are not written.

:func:`build_gemm` builds op contract v2 layers the same way (:mod:`.sparse_binary_gemm_v2_int8` says how);
a v1 layer is its case without groups and residual.

Needs the dot-product instructions (``asimddp``: Cortex-A55/A76/A78 and newer, the ``rpi5`` and
``jetson-orin`` presets); the generic ``arm`` preset runs prompts with the TE kernel.
"""

from __future__ import annotations

from pbs2pc.compiler.tvm_compat import T, tirx
from pbs2pc.passes.kernels.x86_avx512.sparse_binary_gemv_int8 import quantiser

from .sparse_binary_gemv_int8 import INTERLEAVE, tbl

#: Rows of ``x`` per pass over a tile's decoded weights: 2 rows x 4 row groups x 2 planes = 16 int32x4
#: accumulators, plus 8 weight and 2 input registers, within NEON's 32.
ROWS = 2


def supported(out_features: int, in_features: int, group_size: int, interleave: int, plane_dtype: str) -> bool:
    """Whether the kernel covers this layer: byte planes row-interleaved by 16, whole 16-row tiles, groups of
    a multiple of 16 inputs (the quantiser's vectors) tiling ``K``."""
    return (interleave == INTERLEAVE and plane_dtype == "uint8" and out_features > 0
            and out_features % INTERLEAVE == 0 and group_size > 0 and group_size % 16 == 0
            and in_features > 0 and in_features % group_size == 0)


def sdot(acc, a, b):
    """``acc`` (int32x4) plus, per lane ``i``, the dot of bytes ``4 i .. 4 i + 3`` of ``a`` and ``b`` (int8x16)."""
    return T.call_llvm_pure_intrin("int32x4", "llvm.aarch64.neon.sdot", acc, a, b)


def nibble(v, half):
    """The low (``half`` = 0) or high nibble of each byte of ``v`` (uint8x16; ``half`` an unrolled loop variable)."""
    return T.Select(half == 0, T.bitwise_and(v, T.broadcast(T.uint8(15), 16)),
                    T.shift_right(v, T.broadcast(T.uint8(4), 16)))


def expand(v, half, j):
    """0/1 bytes of nibble ``half`` of the 16 rows' plane bytes ``v``, rows 4j .. 4j+3, in the sdot layout (row
    4j + r's 4 inputs in bytes 4r .. 4r+3): each row's nibble repeated 4 times (``tbl``), then bit r % 4 tested
    (``cmtst``)."""
    rep = T.Cast("int8x16", T.ramp(0, 1, 16) // 4 + T.broadcast(4 * j, 16))
    spread = T.reinterpret("uint8x16", tbl(nibble(v, half), rep))
    bits = T.Cast("uint8x16", T.shift_left(1, T.ramp(0, 1, 16) % 4))
    return T.Select(tirx.NE(T.bitwise_and(spread, bits), T.broadcast(T.uint8(0), 16)),
                    T.broadcast(T.int8(1), 16), T.broadcast(T.int8(0), 16))


def quad(xq, row, k):
    """The 4 quantised inputs ``k .. k+3`` of ``row`` in every int32 lane (``ld1r``), as int8x16."""
    return T.reinterpret("int8x16", T.broadcast(T.reinterpret("int32", xq.vload([row, k], "int8x4")), 4))


def row_quantiser(in_features: int, group_size: int, group_sums: bool):
    """A TVMScript macro ``quantise_rows(x, M, MP, xq, xs, qsum)``: every row of ``x`` [M, K] quantised per group
    (the x86 int8 kernels' quantiser), rows ``M .. MP-1`` (the padding of an odd M) zeros."""
    K, GB = in_features, in_features // group_size
    quantise = quantiser(K, group_size, group_sums=group_sums)

    @T.macro
    def quantise_rows(x, M, MP, xq, xs, qsum):
        for m in range(M):
            quantise(x, m, xq, xs, qsum)
        for m in range(M, MP):
            for k in range(K):
                xq[m, k] = T.int8(0)
            for g in range(GB):
                xs[m, g] = T.float32(0)
                qsum[m, g] = 0

    return quantise_rows


def row_writer(out_features: int, has_bias: bool):
    """A TVMScript macro ``write_rows(y, out, bias, M, mb, tile)``: the tile's outputs of rows ``ROWS mb ..``
    of ``x`` (``out`` ``[ROWS, 16]``) into ``y``, plus the bias; rows past ``M`` are not written."""
    L = INTERLEAVE

    @T.macro
    def write_rows(y, out, bias, M, mb, tile):
        for r in range(ROWS):
            if mb * ROWS + r < M:
                for l in T.vectorized(L):
                    if has_bias:
                        y[mb * ROWS + r, tile * L + l] = out[r, l] + bias[tile * L + l]
                    else:
                        y[mb * ROWS + r, tile * L + l] = out[r, l]

    return write_rows


def gemm_int8(out_features: int, in_features: int, group_size: int, has_mask: bool, has_mu: bool, has_bias: bool):
    """The PrimFunc ``(x [M, K] f32, sign, [mask], alpha, [mu], [bias], y [M, N] f32)`` for one v1 layer shape,
    ``M`` symbolic. Planes ``[N/16, K/8, 16]`` uint8, scales ``[N/16, K/G, 16]`` float16."""
    if not supported(out_features, in_features, group_size, INTERLEAVE, "uint8"):
        raise ValueError(f"the NEON int8 GEMM does not cover N={out_features}, K={in_features}, G={group_size}")
    return build_gemm(out_features, in_features, group_size, has_mask, has_mu, has_bias)


def build_gemm(out_features: int, in_features: int, group_size: int, has_mask: bool, has_mu: bool,
               has_bias: bool, has_groups: bool = False, has_residual: bool = False, residual_bytes: int = 1):
    """The GEMM's PrimFunc for a v1 layer (no ``has_groups``, no ``has_residual``) or a v2 one: ``(x [M, K], sign,
    [mask], alpha, [mu], [bias], [group, group_alpha, group_mu], [salient, residual, residual_alpha,
    residual_mu], y [M, N])``, ``M`` symbolic; planes and scales 16-row interleaved, ``salient`` ``[1, K/8]``.
    The callers check the shape (:func:`gemm_int8`, :func:`.sparse_binary_gemm_v2_int8.gemm_v2_int8`)."""
    N, K, G = out_features, in_features, group_size
    L = INTERLEAVE
    NT, C, GB, K4, G4, RB = N // L, K // 8, K // G, K // 4, G // 4, max(1, residual_bytes)
    # decoded planes over K, in order, and which sum each is
    if has_groups:
        kinds = ["T0", "M0", "T1", "M1"] if has_mask else ["T0", "T1", "M1"]
    else:
        kinds = ["T0", "M0"] if has_mask else ["T0"]
    NP = len(kinds)
    SP = K  # the padded salient list's room: a group's columns padded to a multiple of 4 stay within G
    quantise_rows = row_quantiser(K, G, group_sums=True)
    write_rows = row_writer(N, has_bias)
    i8, u8 = "int8x16", "uint8x16"

    def plane(sign, mask, group, tile, c, half, j, p):
        """Decoded plane ``p`` (0/1 or -1/0/1 bytes) of rows 4j .. 4j+3, inputs of nibble ``half`` of byte c."""
        s = sign.vload([tile, c, 0], u8)
        m = mask.vload([tile, c, 0], u8) if has_mask else T.broadcast(T.uint8(255), 16)
        g = group.vload([tile, c, 0], u8) if has_groups else T.broadcast(T.uint8(0), 16)
        ng = T.bitwise_not(g)
        two = T.broadcast(T.int8(2), 16)
        options = {"T0": expand(T.bitwise_and(T.bitwise_and(s, m), ng), half, j) * two
                   - expand(T.bitwise_and(m, ng), half, j),
                   "M0": expand(T.bitwise_and(m, ng), half, j),
                   "T1": expand(T.bitwise_and(T.bitwise_and(s, m), g), half, j) * two - expand(T.bitwise_and(m, g), half, j),
                   "M1": expand(T.bitwise_and(m, g), half, j)}
        expr = options[kinds[-1]]
        for index in range(NP - 2, -1, -1):
            expr = T.Select(p == index, options[kinds[index]], expr)
        return expr

    def scale(buf, tile, g, j):
        return T.Cast("float32x4", buf.vload([tile, g, 4 * j], "float16x4"))

    def dots(acc, qsum, r, j, kind, row, g):
        def at(p):
            return T.Cast("float32x4", acc.vload([r, p, j, 0], "int32x4"))
        if kind in kinds:
            return at(kinds.index(kind))
        total = T.broadcast(T.Cast("float32", qsum[row, g]), 4)  # no mask plane: M0 + M1 = 1
        return total - at(kinds.index("M1")) if has_groups else total

    def group_total(acc, racc, qsum, alpha, mu, group_alpha, group_mu, residual_alpha, residual_mu, tile, g, r, j,
                    row):
        """Scale group ``g``'s part of rows 4j .. 4j+3 of the tile for row ``row`` of x (before ``s_g``)."""
        total = scale(alpha, tile, g, j) * dots(acc, qsum, r, j, "T0", row, g)
        if has_mu:
            total = total + scale(mu, tile, g, j) * dots(acc, qsum, r, j, "M0", row, g)
        if has_groups:
            total = total + scale(group_alpha, tile, g, j) * dots(acc, qsum, r, j, "T1", row, g) + scale(
                group_mu, tile, g, j) * dots(acc, qsum, r, j, "M1", row, g)
        if has_residual:
            total = total + scale(residual_alpha, tile, g, j) * T.Cast(
                "float32x4", racc.vload([r, 0, j, 0], "int32x4")) + scale(residual_mu, tile, g, j) * T.Cast(
                "float32x4", racc.vload([r, 1, j, 0], "int32x4"))
        return total

    @T.prim_func(private=True, check_well_formed=False)
    def kernel(var_x: T.handle, sign: T.Buffer((NT, C, L), "uint8"), mask: T.Buffer((NT, C, L), "uint8"),
               alpha: T.Buffer((NT, GB, L), "float16"), mu: T.Buffer((NT, GB, L), "float16"),
               bias: T.Buffer((N,), "float32"), group: T.Buffer((NT, C, L), "uint8"),
               group_alpha: T.Buffer((NT, GB, L), "float16"), group_mu: T.Buffer((NT, GB, L), "float16"),
               salient: T.Buffer((1, C), "uint8"), residual: T.Buffer((NT, RB, L), "uint8"),
               residual_alpha: T.Buffer((NT, GB, L), "float16"), residual_mu: T.Buffer((NT, GB, L), "float16"),
               var_y: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        M = T.int64()
        x = T.match_buffer(var_x, (M, K), "float32")
        y = T.match_buffer(var_y, (M, N), "float32")
        MP = T.meta_var((M + ROWS - 1) // ROWS * ROWS)
        xq = T.alloc_buffer((MP, K), "int8")
        xs = T.alloc_buffer((MP, GB), "float32")
        qsum = T.alloc_buffer((MP, GB), "int32")
        cols = T.alloc_buffer((SP,), "int32")  # padded salient columns (-1: padding)
        ranks = T.alloc_buffer((SP,), "int32")  # each one's index in the residual plane
        start = T.alloc_buffer((GB + 1,), "int32")
        count = T.alloc_buffer((2,), "int32")  # [padded list length, salient columns so far]
        xr = T.alloc_buffer((MP, SP), "int8")  # q at the padded salient columns
        # 1. Quantise every row (padding rows: zeros); list the salient columns, padded per group.
        quantise_rows(x, M, MP, xq, xs, qsum)
        if has_residual:
            count[0] = 0
            count[1] = 0
            for g in range(GB):
                start[g] = count[0]
                for k in range(G):
                    if tirx.NE(T.bitwise_and(T.shift_right(salient[0, (g * G + k) // 8], T.uint8(k % 8)), T.uint8(1)),
                               T.uint8(0)):
                        cols[count[0]] = g * G + k
                        ranks[count[0]] = count[1]
                        count[0] = count[0] + 1
                        count[1] = count[1] + 1
                while count[0] % 4 != 0:
                    cols[count[0]] = -1
                    ranks[count[0]] = 0
                    count[0] = count[0] + 1
            start[GB] = count[0]
            for m in range(MP):
                for t in range(count[0]):
                    xr[m, t] = T.if_then_else(cols[t] >= 0, xq[m, T.max(cols[t], 0)], T.int8(0))
        # 2. Per 16-row tile: decode, then sdot against every pair of rows.
        for tile in T.parallel(NT):
            w = T.alloc_buffer((NP, K4, 4, L), "int8")
            wr = T.alloc_buffer((2, SP // 4, 4, L), "int8")  # tr | mr at the padded salient columns
            acc = T.alloc_buffer((ROWS, NP, 4, 4), "int32")
            racc = T.alloc_buffer((ROWS, 2, 4, 4), "int32")
            out = T.alloc_buffer((ROWS, L), "float32")
            for c in range(C):
                for half in T.unroll(2):
                    for j in T.unroll(4):
                        for p in T.unroll(NP):
                            w[p, 2 * c + half, j, T.ramp(0, 1, L)] = plane(sign, mask, group, tile, c, half, j, p)
            if has_residual:
                for t in range(count[0]):
                    for row in range(L):
                        if cols[t] >= 0:
                            kept = T.meta_var(T.Cast("int8", T.bitwise_and(T.shift_right(
                                mask[tile, cols[t] // 8, row], T.Cast("uint8", cols[t] % 8)), T.uint8(1))) if has_mask
                                else T.int8(1))
                            r = T.meta_var(T.Cast("int8", T.bitwise_and(T.shift_right(
                                residual[tile, ranks[t] // 8, row], T.Cast("uint8", ranks[t] % 8)), T.uint8(1))))
                            wr[0, t // 4, row // 4, (row % 4) * 4 + t % 4] = kept * (r * T.int8(2) - T.int8(1))
                            wr[1, t // 4, row // 4, (row % 4) * 4 + t % 4] = kept
                        else:
                            wr[0, t // 4, row // 4, (row % 4) * 4 + t % 4] = T.int8(0)
                            wr[1, t // 4, row // 4, (row % 4) * 4 + t % 4] = T.int8(0)
            for mb in range(MP // ROWS):
                for r in T.unroll(ROWS):
                    out[r, T.ramp(0, 1, L)] = T.broadcast(T.float32(0), L)
                for g in range(GB):
                    for r in T.unroll(ROWS):
                        for p in T.unroll(NP):
                            for j in T.unroll(4):
                                acc[r, p, j, T.ramp(0, 1, 4)] = T.broadcast(T.int32(0), 4)
                        for p in T.unroll(2):
                            for j in T.unroll(4):
                                racc[r, p, j, T.ramp(0, 1, 4)] = T.broadcast(T.int32(0), 4)
                    for k4 in range(G4):
                        for j in T.unroll(4):
                            for r in T.unroll(ROWS):
                                for p in T.unroll(NP):
                                    acc[r, p, j, T.ramp(0, 1, 4)] = sdot(acc.vload([r, p, j, 0], "int32x4"),
                                                                         w.vload([p, g * G4 + k4, j, 0], i8),
                                                                         quad(xq, mb * ROWS + r, g * G + 4 * k4))
                    if has_residual:
                        for t4 in range(start[g] // 4, start[g + 1] // 4):
                            for j in T.unroll(4):
                                for r in T.unroll(ROWS):
                                    for p in T.unroll(2):
                                        racc[r, p, j, T.ramp(0, 1, 4)] = sdot(racc.vload([r, p, j, 0], "int32x4"),
                                                                              wr.vload([p, t4, j, 0], i8),
                                                                              quad(xr, mb * ROWS + r, 4 * t4))
                    for r in T.unroll(ROWS):
                        for j in T.unroll(4):
                            out[r, T.ramp(4 * j, 1, 4)] = out.vload([r, 4 * j], "float32x4") + T.broadcast(
                                xs[mb * ROWS + r, g], 4) * group_total(
                                acc, racc, qsum, alpha, mu, group_alpha, group_mu, residual_alpha, residual_mu,
                                tile, g, r, j, mb * ROWS + r)
                write_rows(y, out, bias, M, mb, tile)

    keep = [True, True, has_mask, True, has_mu, has_bias] + [has_groups] * 3 + [has_residual] * 4 + [True]
    params = [p for p, k in zip(kernel.params, keep) if k]
    return tirx.PrimFunc(params, kernel.body, kernel.ret_type, kernel.attrs)
