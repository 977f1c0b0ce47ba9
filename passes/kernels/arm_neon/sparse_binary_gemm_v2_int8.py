"""The int8-activation GEMM (any M, the prompt) for op contract v2 layers on ARMv8.2 NEON: ``sdot``, one pass.

The v1 GEMM's design (:mod:`.sparse_binary_gemm_int8`: weights decoded once per call and 16-row tile, ``sdot``
against pairs of quantised rows of ``x``) with the v2 structure (``pbs2pc.models.format``):

* **Groups**: the tile is decoded into ``t0 = mask (1 - grp) (2 sign - 1)``, ``m0 = mask (1 - grp)``,
  ``t1 = mask grp (2 sign - 1)`` and ``m1 = mask grp``; per scale group ``alpha IT0 + mu IM0 + ga IT1 + gmu
  IM1`` (without a mask plane ``m0`` is not decoded: ``IM0 = sum(q) - IM1``).
* **Residual**: the salient columns of each scale group, padded to a multiple of 4 with columns of zero
  weight, are a second, short ``K``: per call the kernel lists them (``cols``, ``-1`` for padding; scale group
  ``g``'s are ``[start[g], start[g+1])``) and gathers ``q`` at them (0 at padding); per tile it decodes
  ``tr = mask (2 r - 1)`` and ``mr = mask`` at the salient columns into the same ``sdot`` layout; per scale group
  ``ra ITR + rmu IMR``.

The numbers equal the v2 GEMV's (:mod:`.sparse_binary_gemv_v2_int8`): exact integer dots of the same
quantised activation, scaled per group in fp32. Oracle: :func:`.sparse_binary_gemv_v2_int8.reference` per row.
"""

from __future__ import annotations

from pbs2pc.compiler.tvm_compat import T, tirx
from .sparse_binary_gemm_int8 import (ROWS, expand, quad, row_quantiser, row_writer, sdot,
                                      supported as v1_supported)
from .sparse_binary_gemv_int8 import INTERLEAVE


def supported(out_features: int, in_features: int, group_size: int, interleave: int, plane_dtype: str,
              has_groups: bool, has_residual: bool) -> bool:
    """Whether the kernel covers this layer: a v2 layer (groups, residual or both) in the v1 GEMM's shapes."""
    return (has_groups or has_residual) and v1_supported(out_features, in_features, group_size, interleave,
                                                         plane_dtype)


def gemm_v2_int8(out_features: int, in_features: int, group_size: int, has_mask: bool, has_mu: bool,
                 has_bias: bool, has_groups: bool, has_residual: bool, residual_bytes: int = 1):
    """The PrimFunc ``(x [M, K], sign, [mask], alpha, [mu], [bias], [group, group_alpha, group_mu], [salient,
    residual, residual_alpha, residual_mu], y [M, N])``, ``M`` symbolic; planes and scales 16-row interleaved,
    ``salient`` ``[1, K/8]``."""
    if not supported(out_features, in_features, group_size, INTERLEAVE, "uint8", has_groups, has_residual):
        raise ValueError(f"the NEON v2 int8 GEMM does not cover N={out_features}, K={in_features}, G={group_size} "
                         f"(groups={has_groups}, residual={has_residual})")
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
