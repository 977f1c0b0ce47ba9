"""The int8-activation GEMV (M = 1) for op contract v2 layers on aarch64 NEON: one pass over every plane.

A v2 layer (``pbs2pc.models.format``) adds to v1 magnitude groups (a ``group`` plane; group-1 weights take
``group_alpha`` / ``group_mu``) and/or a salient residual (``salient`` columns shared by all rows; on them a
kept weight adds ``residual_alpha (2 r - 1) + residual_mu``, ``r`` from a plane that holds the salient
columns only). The activation is quantised per scale group as in the v1 kernel
(:mod:`.sparse_binary_gemv_int8`, whose tables, lookups and widening this kernel uses), and per group

    y += s_g * (2 a IP0 + (mu - a) IM0 + 2 ga IP1 + (gmu - ga) IM1 + 2 ra RP + (rmu - ra) RM)

with exact integer sums:

* **Groups**: with ``P = sign & mask`` and ``M = mask`` per column byte of 16 rows, ``P0 = P & ~grp``
  (``bic``), ``P1 = P & grp``, ``M0 = M & ~grp``, ``M1 = M & grp`` meet the same TL / TH tables: four looked-up
  planes instead of two (a weight has four states that matter: kept, by sign and by group); without a mask
  plane three (``IM0`` = the group's sum of ``q`` less ``IM1``).
* **Residual**: per call the kernel lists the salient columns (``cols``; scale group ``g``'s are
  ``cols[start[g]:start[g+1]]``). Per tile and scale group it walks them (about 1 in 10 columns in a
  BiLLM-style layer): the 16 rows' mask byte of the column and their residual byte (``[N/16, ceil(S/8), 16]``,
  the ``t``-th salient column in bit ``t % 8`` of byte ``t / 8``) are tested for their bit (``and``, a compare and ``bif``/``bsl`` selects) and
  ``q`` of the column is added to ``RM`` (kept) and ``RP`` (kept and ``r = 1``) in int32.

The oracle is :func:`reference`: the layer's decoded weights against the quantised activation, per group.
Layout: :data:`pbs2pc.passes.kernels.arm_neon.LAYOUT` (the v2 per-row inputs in the same 16-row blocks; the
salient plane stays ``[1, K/8]``).
"""

from __future__ import annotations

from pbs2pc.compiler.tvm_compat import T, tirx
from pbs2pc.passes.kernels.salient import salient_lister
from pbs2pc.passes.kernels.x86_avx512.sparse_binary_gemv import plus_bias

from .sparse_binary_gemv_int8 import (BLOCK, COLUMNS_PER_STEP, INTERLEAVE, PARALLEL_MIN_WEIGHTS,
                                      supported as v1_supported, table_builder, tbl, umull)

#: 16-row tiles per parallel task: one (four planes of two tiles would spill NEON registers).
TILES_PER_TASK = 1


def supported(out_features: int, in_features: int, group_size: int, interleave: int, plane_dtype: str,
              has_groups: bool, has_residual: bool) -> bool:
    """Whether the kernel covers this layer: a v2 layer (groups, residual or both) in the v1 kernel's shapes."""
    return (has_groups or has_residual) and v1_supported(out_features, in_features, group_size, interleave,
                                                         plane_dtype)


def _pick(p, options: list):
    """``options[p]`` for an unrolled loop variable ``p`` (a Select chain that folds once ``p`` is constant)."""
    expr = options[-1]
    for index in range(len(options) - 2, -1, -1):
        expr = T.Select(p == index, options[index], expr)
    return expr


def gemv_v2_int8(out_features: int, in_features: int, group_size: int, has_mask: bool, has_mu: bool,
                 has_bias: bool, has_groups: bool, has_residual: bool, residual_bytes: int = 1,
                 parallel_min: int | None = None):
    """The PrimFunc ``(x, sign, [mask], alpha, [mu], [bias], [group, group_alpha, group_mu], [salient,
    residual, residual_alpha, residual_mu], y)`` for one layer shape (``residual_bytes``: the residual plane's
    bytes per row, ``ceil(S / 8)``); planes and scales 16-row interleaved, ``salient`` ``[1, K/8]``."""
    if not supported(out_features, in_features, group_size, INTERLEAVE, "uint8", has_groups, has_residual):
        raise ValueError(f"the NEON v2 int8 GEMV does not cover N={out_features}, K={in_features}, G={group_size} "
                         f"(groups={has_groups}, residual={has_residual})")
    N, K, G = out_features, in_features, group_size
    L = INTERLEAVE
    NT, C, GB, RB = N // L, K // 8, K // G, max(1, residual_bytes)
    B = min(G, BLOCK)
    NB, STEPS, CG, CB = G // B, B // COLUMNS_PER_STEP, G // 8, B // 8
    # The looked-up planes, in order, and where each of IP0, IM0, IP1, IM1 is (-1: derived from the others)
    if has_groups:
        kinds = ["P0", "M0", "P1", "M1"] if has_mask else ["P0", "P1", "M1"]
    else:
        kinds = ["P0", "M0"] if has_mask else ["P0"]
    NP = len(kinds)
    build_tables = table_builder(K, G, group_sums=not has_mask)
    tasks = T.parallel if N * K >= (parallel_min or PARALLEL_MIN_WEIGHTS) else T.serial
    offset = 128 * B
    u8, u16, i32 = "uint8x16", "uint16x8", "int32x16"
    zeros32 = T.broadcast(T.int32(0), L)

    def plane(sign, mask, group, tile, col, p):
        s = sign.vload([tile, col, 0], u8)
        m = mask.vload([tile, col, 0], u8) if has_mask else None
        pp = T.bitwise_and(s, m) if has_mask else s
        if not has_groups:
            return _pick(p, [pp, m] if has_mask else [pp])
        g = group.vload([tile, col, 0], u8)
        ng = T.bitwise_not(g)
        options = {"P0": T.bitwise_and(pp, ng), "P1": T.bitwise_and(pp, g)}
        if has_mask:
            options.update(M0=T.bitwise_and(m, ng), M1=T.bitwise_and(m, g))
        else:
            options["M1"] = g
        return _pick(p, [options[k] for k in kinds])

    def idx(sign, mask, group, tile, col, p, half):
        bits = plane(sign, mask, group, tile, col, p)
        return T.Select(half == 0, T.bitwise_and(bits, T.broadcast(T.uint8(15), 16)),
                        T.shift_right(bits, T.broadcast(T.uint8(4), 16)))

    def widened(wide, bsum, p, h: int):
        lanes = list(range(8 * h, 8 * h + 8))
        tl = T.Shuffle([bsum.vload([p, 0, 0], u8)], lanes)
        th = T.Shuffle([bsum.vload([p, 1, 0], u8)], lanes)
        return wide.vload([p, 8 * h], u16) + T.Cast(u16, tl) + umull(th, T.broadcast(T.uint8(16), 8))

    def bit_on(buf, tile, byte, bit):
        """Whether bit ``bit`` of byte ``byte`` is set, for the tile's 16 rows."""
        return tirx.NE(T.bitwise_and(buf.vload([tile, byte, 0], u8), T.broadcast(T.Cast("uint8", T.shift_left(1, bit)), L)),
                       T.broadcast(T.uint8(0), L))

    def scale(buf, tile, g):
        return T.Cast("float32x16", buf.vload([tile, g, 0], "float16x16"))  # fcvtl

    def sums(isum, kind, qsum, g):
        """IP0 / IM0 / IP1 / IM1 of the tile's rows as fp32 (IM0 / IM1 derived where no plane holds them)."""
        def at(p):
            return T.Cast("float32x16", isum.vload([p, 0], i32))
        if kind in kinds:
            return at(kinds.index(kind))
        total = T.broadcast(T.Cast("float32", qsum[0, g]), L)  # no mask plane: M = 1
        return total - at(kinds.index("M1")) if has_groups else total

    def group_total(isum, res, qsum, alpha, mu, group_alpha, group_mu, residual_alpha, residual_mu, tile, g):
        a = scale(alpha, tile, g)
        im0 = sums(isum, "M0", qsum, g)
        total = (a + a) * sums(isum, "P0", qsum, g) - a * im0
        if has_mu:
            total = total + scale(mu, tile, g) * im0
        if has_groups:
            ga = scale(group_alpha, tile, g)
            total = total + (ga + ga) * sums(isum, "P1", qsum, g) + (scale(group_mu, tile, g) - ga) * sums(
                isum, "M1", qsum, g)
        if has_residual:
            ra = scale(residual_alpha, tile, g)
            total = total + (ra + ra) * T.Cast("float32x16", res.vload([0, 0], i32)) + (
                scale(residual_mu, tile, g) - ra) * T.Cast("float32x16", res.vload([1, 0], i32))
        return total

    list_salient = salient_lister(K, G)

    @T.prim_func(private=True, check_well_formed=False)
    def kernel(x: T.Buffer((1, K), "float32"), sign: T.Buffer((NT, C, L), "uint8"),
               mask: T.Buffer((NT, C, L), "uint8"), alpha: T.Buffer((NT, GB, L), "float16"),
               mu: T.Buffer((NT, GB, L), "float16"), bias: T.Buffer((N,), "float32"),
               group: T.Buffer((NT, C, L), "uint8"), group_alpha: T.Buffer((NT, GB, L), "float16"),
               group_mu: T.Buffer((NT, GB, L), "float16"), salient: T.Buffer((1, C), "uint8"),
               residual: T.Buffer((NT, RB, L), "uint8"), residual_alpha: T.Buffer((NT, GB, L), "float16"),
               residual_mu: T.Buffer((NT, GB, L), "float16"), y: T.Buffer((1, N), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        xq = T.alloc_buffer((1, K), "int8")
        xs = T.alloc_buffer((1, GB), "float32")
        qsum = T.alloc_buffer((1, GB), "int32")
        parts = T.alloc_buffer((2, K), "int8")
        tab = T.alloc_buffer((C, 2, 2, L), "int8")
        cols = T.alloc_buffer((K,), "int32")  # the salient columns, in order
        start = T.alloc_buffer((GB + 1,), "int32")  # scale group g's salient columns: cols[start[g]:start[g+1]]
        count = T.alloc_buffer((1,), "int32")
        word = T.alloc_buffer((1,), "uint64")
        # 1. Quantise x, the TL / TH tables, the salient columns.
        build_tables(x, xq, xs, qsum, parts, tab)
        if has_residual:
            list_salient(salient, cols, start, count, word)
        # 2. Per 16-row tile: NP looked-up planes, the residual walk, scaled per group.
        for tile in tasks(NT):
            acc = T.alloc_buffer((L,), "float32")
            wide = T.alloc_buffer((NP, L), "uint16")
            isum = T.alloc_buffer((NP, L), "int32")
            bsum = T.alloc_buffer((NP, 2, L), "uint8")
            res = T.alloc_buffer((2, L), "int32")  # RP, RM
            acc[T.ramp(0, 1, L)] = T.broadcast(T.float32(0), L)
            for g in range(GB):
                for p in T.unroll(NP):
                    isum[p, T.ramp(0, 1, L)] = zeros32
                for blk in range(NB):
                    for p in T.unroll(NP):
                        wide[p, T.ramp(0, 1, L)] = T.broadcast(T.uint16(0), L)
                    for st in range(STEPS):
                        for p in T.unroll(NP):
                            for t in T.unroll(2):
                                bsum[p, t, T.ramp(0, 1, L)] = T.broadcast(T.uint8(0), L)
                        for u in T.unroll(2):
                            for half in T.unroll(2):
                                for t in T.unroll(2):
                                    for p in T.unroll(NP):
                                        bsum[p, t, T.ramp(0, 1, L)] = bsum.vload([p, t, 0], u8) + T.reinterpret(
                                            u8, tbl(tab.vload([g * CG + blk * CB + 2 * st + u, half, t, 0], "int8x16"),
                                                    idx(sign, mask, group, tile, g * CG + blk * CB + 2 * st + u, p, half)))
                        for p in T.unroll(NP):
                            wide[p, T.ramp(0, 1, 8)] = widened(wide, bsum, p, 0)
                            wide[p, T.ramp(8, 1, 8)] = widened(wide, bsum, p, 1)
                    for p in T.unroll(NP):
                        isum[p, T.ramp(0, 1, L)] = isum.vload([p, 0], i32) + (
                            T.Cast(i32, wide.vload([p, 0], "uint16x16")) - T.broadcast(T.int32(offset), L))
                if has_residual:
                    for p in T.unroll(2):
                        res[p, T.ramp(0, 1, L)] = zeros32
                    for t in range(start[g], start[g + 1]):
                        j = T.meta_var(cols[t])
                        qj = T.meta_var(T.broadcast(T.Cast("int32", xq[0, j]), L))
                        r_on = T.meta_var(bit_on(residual, tile, t // 8, t % 8))
                        if has_mask:
                            m_on = T.meta_var(bit_on(mask, tile, j // 8, j % 8))
                            res[1, T.ramp(0, 1, L)] = res.vload([1, 0], i32) + T.Select(m_on, qj, zeros32)
                            res[0, T.ramp(0, 1, L)] = res.vload([0, 0], i32) + T.Select(
                                m_on, T.Select(r_on, qj, zeros32), zeros32)
                        else:
                            res[1, T.ramp(0, 1, L)] = res.vload([1, 0], i32) + qj
                            res[0, T.ramp(0, 1, L)] = res.vload([0, 0], i32) + T.Select(r_on, qj, zeros32)
                acc[T.ramp(0, 1, L)] = acc.vload([0], "float32x16") + T.broadcast(xs[0, g], L) * group_total(
                    isum, res, qsum, alpha, mu, group_alpha, group_mu, residual_alpha, residual_mu, tile, g)
            for l in T.vectorized(L):
                y[0, tile * L + l] = plus_bias(acc[l], bias, has_bias, tile * L + l)

    keep = [True, True, has_mask, True, has_mu, has_bias] + [has_groups] * 3 + [has_residual] * 4 + [True]
    params = [p for p, k in zip(kernel.params, keep) if k]
    return tirx.PrimFunc(params, kernel.body, kernel.ret_type, kernel.attrs)


def reference(layer, x):
    """numpy oracle (float64): ``x`` ``[K]`` quantised per scale group as the kernel does (symmetric int8, round
    half to even), times the layer's decoded weights (``PackedLinear.dense``), group by group, plus the bias."""
    import numpy as np

    g = layer.scheme.group_size
    x = np.asarray(x, np.float32).reshape(-1, g)
    amax = np.abs(x).max(axis=1)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.round(x * inv[:, None]).astype(np.float64)
    scale = (amax / np.float32(127)).astype(np.float64)
    w = layer.dense().astype(np.float64)
    y = (w.reshape(w.shape[0], -1, g) * (q * scale[:, None])[None]).sum(axis=(1, 2))
    return y if layer.bias is None else y + layer.bias
