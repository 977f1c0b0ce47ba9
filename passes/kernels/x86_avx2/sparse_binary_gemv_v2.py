"""The fp32 GEMV (M = 1) for op contract v2 layers on x86 with AVX2, FMA and F16C: one pass over the weights.

A v2 layer (``pbs2pc.models.format``) adds to v1 magnitude groups (a ``group`` plane; group-1 weights take
``group_alpha`` / ``group_mu``) and/or a salient residual (``salient`` columns shared by all rows; on them a
kept weight adds ``residual_alpha (2 r - 1) + residual_mu``, ``r`` from a plane that holds the salient
columns only). This kernel reads every plane of a 16-row tile once, as the v1 GEMV
(:mod:`.sparse_binary_gemv`, whose tables and lookups it uses) does:

* **Groups**: the per-group sums split by the group bit. With ``P = sign & mask`` and ``M = mask`` per
  column byte, ``P0 = P & ~grp``, ``P1 = P & grp``, ``M0 = M & ~grp``, ``M1 = M & grp`` (16-byte ``vpand`` /
  ``vpandn`` on the tile's bytes) each meet the same subset-sum tables, and per scale group
  ``y += 2 a XP0 + (mu - a) XM0 + 2 ga XP1 + (gmu - ga) XM1``: four lookups per column byte instead of
  two (without a mask plane three: ``XM0 = sum(x) - XM1``). A weight has four states that matter (kept, by
  sign and group), so four sums per row and group is what any exact one-pass kernel computes.
* **Residual**: per call the kernel lists the salient columns (``cols``, and where each scale group's
  start in that list, ``start``) from the salient plane, alongside the tables. Per tile and scale group it
  then walks that group's salient columns only (4 of 64 in a BiLLM-style layer): the 16 rows' mask byte of
  the column and their residual byte (``[N/16, ceil(S/8), 16]``, the ``t``-th salient column in bit
  ``t % 8`` of byte ``t / 8``) are tested for their bit, and ``x[col]`` is added to ``RM`` (kept) and
  ``RP`` (kept and ``r = 1``): ``y += 2 ra RP + (rmu - ra) RM``. The column's mask byte was just read
  for the main sums, so it comes from L1. Per-column work instead of a lookup over gathered inputs: at
  4 of 64 salient columns a table pass would cost a whole extra lookup per column byte of the residual.

Named values in the TVMScript body are ``T.meta_var`` (inlined) and the scale-group sum is a helper that
returns an expression: a plain Python binding of a vector there becomes a small workspace allocation (and
free) per tile, 14 of them, which cost 35-40 % of the time at 1536x576 (110 -> 71 us) and 9-15 % at
4096x4096 (median 2237 -> 2027 us), one thread, groups + residual, alternating in one process.

Layout: the x86-avx2 layout (:data:`pbs2pc.passes.kernels.x86_avx2.LAYOUT`); InterleaveRows stores the v2
per-row inputs in the same 16-row blocks (group plane ``[N/16, K/8, 16]``, residual ``[N/16, RB, 16]``,
scales ``[N/16, K/G, 16]``), the salient plane stays ``[1, K/8]``. Measurements: docs/avx2_gemv.md.
"""

from __future__ import annotations

from pbs2pc.compiler.tvm_compat import T, tirx
from pbs2pc.passes.kernels.salient import salient_lister
from pbs2pc.passes.kernels.x86_avx512.sparse_binary_gemv import plus_bias

from .sparse_binary_gemv import (CHUNKS, INTERLEAVE, LANES, byte_sum, chunk_sum, supported as v1_supported, task_loop,
                                 widen)

#: Column bytes of a scale group unrolled: one, a loop (the code as measured in docs/avx2_gemv.md); the
#: tuner tries the other divisors of ``G / 8`` (``unroll_knob``).
UNROLL = 1


def unroll_knob(group_size: int) -> tuple:
    """The ``unroll`` candidates for scale groups of ``group_size`` columns: the default, then the other
    divisors of its column bytes."""
    cg = group_size // 8
    return (UNROLL, *(u for u in range(2, cg + 1) if cg % u == 0))


def supported(out_features: int, in_features: int, group_size: int, interleave: int, plane_dtype: str,
              has_groups: bool, has_residual: bool) -> bool:
    """Whether the kernel covers this layer: a v2 layer (groups, residual or both) the v1 GEMV's shape
    rules cover (16-row tiles of byte planes, groups of whole plane bytes)."""
    return (has_groups or has_residual) and v1_supported(out_features, in_features, group_size, interleave,
                                                         plane_dtype)


def gemv_v2(out_features: int, in_features: int, group_size: int, has_mask: bool, has_mu: bool, has_bias: bool,
            has_groups: bool, has_residual: bool, residual_bytes: int = 1, parallel_min: int | None = None,
            unroll: int = UNROLL):
    """The PrimFunc ``(x, sign, [mask], alpha, [mu], [bias], [group, group_alpha, group_mu], [salient,
    residual, residual_alpha, residual_mu], y)`` for one layer shape (``residual_bytes``: the residual
    plane's bytes per row, ``ceil(S / 8)``); planes and scales 16-row interleaved, ``salient`` ``[1, K/8]``.
    The tuner's knobs: ``parallel_min``, the parallel threshold, and ``unroll``, the column bytes of a scale
    group unrolled (a divisor of ``G / 8``)."""
    T_ = INTERLEAVE
    if not supported(out_features, in_features, group_size, T_, "uint8", has_groups, has_residual):
        raise ValueError(f"the AVX2 v2 GEMV does not cover N={out_features}, K={in_features}, G={group_size} "
                         f"(groups={has_groups}, residual={has_residual})")
    N, K, G = out_features, in_features, group_size
    if unroll < 1 or (G // 8) % unroll:
        raise ValueError(f"unroll={unroll} does not divide the {G // 8} column bytes of a scale group")
    HALVES = T_ // LANES
    NT, C, GB, CG, RB = N // T_, K // 8, K // G, G // 8, max(1, residual_bytes)
    H = len(CHUNKS)
    NP = 4 if has_groups else 2  # partial sums per 8 rows: XP0, XM0 (, XP1, XM1)
    tasks = task_loop(N, K, parallel_min)
    f32x8, zeros = "float32x8", T.broadcast(T.float32(0), LANES)

    def half(bytes16, u):
        return widen(T.Shuffle([bytes16], [u * LANES + j for j in range(LANES)]))

    def scale(buf, tile, g, u):
        return T.Cast(f32x8, buf.vload([tile, g, u * LANES], "float16x8"))  # vcvtph2ps

    def bit_on(buf, tile, byte, bit, u):
        """Whether bit ``bit`` of byte ``byte`` is set, for the 8 rows of vector ``u`` (int32 lanes)."""
        lanes = widen(buf.vload([tile, byte, u * LANES], "uint8x8"))
        return tirx.NE(T.bitwise_and(lanes, T.broadcast(T.shift_left(T.int32(1), bit), LANES)),
                       T.broadcast(T.int32(0), LANES))

    def group_total(part, res, alpha, mu, group_alpha, group_mu, residual_alpha, residual_mu, tile, g, u):
        """Scale group ``g``'s part of the 8 outputs of vector ``u`` of ``tile``, from its sums (an expression,
        see the module docstring)."""
        a = scale(alpha, tile, g, u)
        total = (a + a) * part.vload([u, 0, 0], f32x8) - a * part.vload([u, 1, 0], f32x8)
        if has_mu:
            total = total + scale(mu, tile, g, u) * part.vload([u, 1, 0], f32x8)
        if has_groups:
            ga = scale(group_alpha, tile, g, u)
            total = total + (ga + ga) * part.vload([u, 2, 0], f32x8) + (
                scale(group_mu, tile, g, u) - ga) * part.vload([u, 3, 0], f32x8)
        if has_residual:
            ra = scale(residual_alpha, tile, g, u)
            total = total + (ra + ra) * res.vload([u, 0, 0], f32x8) + (
                scale(residual_mu, tile, g, u) - ra) * res.vload([u, 1, 0], f32x8)
        return total

    list_salient = salient_lister(K, G)

    @T.prim_func(private=True, check_well_formed=False)
    def kernel(x: T.Buffer((1, K), "float32"), sign: T.Buffer((NT, C, T_), "uint8"),
               mask: T.Buffer((NT, C, T_), "uint8"), alpha: T.Buffer((NT, GB, T_), "float16"),
               mu: T.Buffer((NT, GB, T_), "float16"), bias: T.Buffer((N,), "float32"),
               group: T.Buffer((NT, C, T_), "uint8"), group_alpha: T.Buffer((NT, GB, T_), "float16"),
               group_mu: T.Buffer((NT, GB, T_), "float16"), salient: T.Buffer((1, C), "uint8"),
               residual: T.Buffer((NT, RB, T_), "uint8"), residual_alpha: T.Buffer((NT, GB, T_), "float16"),
               residual_mu: T.Buffer((NT, GB, T_), "float16"), y: T.Buffer((1, N), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        tab = T.alloc_buffer((C, H, LANES), "float32")
        xm = T.alloc_buffer((GB,), "float32")  # the group's sum of x (a layer without a mask plane)
        cols = T.alloc_buffer((K,), "int32")  # the salient columns, in order
        start = T.alloc_buffer((GB + 1,), "int32")  # scale group g's salient columns: cols[start[g]:start[g+1]]
        count = T.alloc_buffer((1,), "int32")
        word = T.alloc_buffer((1,), "uint64")
        # 1. Tables, group sums of x, the salient columns (serial: a few microseconds at K = 4096).
        for c in range(C):
            for e in T.vectorized(LANES):
                for h in T.unroll(H):
                    tab[c, h, e] = chunk_sum(x, c, h, e)
        if not has_mask:
            for g in range(GB):
                xm[g] = T.float32(0)
                for k in range(G):
                    xm[g] = xm[g] + x[0, g * G + k]
        if has_residual:
            list_salient(salient, cols, start, count, word)
        # 2. Per 16-row tile: partial sums per (8 rows, sum), scaled per group.
        for tile in tasks(NT):
            acc = T.alloc_buffer((HALVES, LANES), "float32")
            part = T.alloc_buffer((HALVES, NP, LANES), "float32")
            res = T.alloc_buffer((HALVES, 2, LANES), "float32")  # RP, RM
            for u in T.unroll(HALVES):
                acc[u, T.ramp(0, 1, LANES)] = zeros
            for g in range(GB):
                for u in T.unroll(HALVES):
                    for p in T.unroll(NP):
                        part[u, p, T.ramp(0, 1, LANES)] = zeros
                    for p in T.unroll(2):
                        res[u, p, T.ramp(0, 1, LANES)] = zeros
                for cbo in range(CG // unroll):
                    for cbi in T.unroll(unroll):
                        col = T.meta_var(g * CG + cbo * unroll + cbi)
                        s16 = T.meta_var(sign.vload([tile, col, 0], "uint8x16"))
                        if has_groups:
                            g16 = T.meta_var(group.vload([tile, col, 0], "uint8x16"))
                            p16 = T.meta_var(T.bitwise_and(s16, mask.vload([tile, col, 0], "uint8x16")) if has_mask
                                          else s16)
                            for u in T.unroll(HALVES):
                                part[u, 0, T.ramp(0, 1, LANES)] = part.vload([u, 0, 0], f32x8) + byte_sum(
                                    tab, col, half(T.bitwise_and(p16, T.bitwise_not(g16)), u))
                                part[u, 2, T.ramp(0, 1, LANES)] = part.vload([u, 2, 0], f32x8) + byte_sum(
                                    tab, col, half(T.bitwise_and(p16, g16), u))
                                if has_mask:
                                    m16 = T.meta_var(mask.vload([tile, col, 0], "uint8x16"))
                                    part[u, 1, T.ramp(0, 1, LANES)] = part.vload([u, 1, 0], f32x8) + byte_sum(
                                        tab, col, half(T.bitwise_and(m16, T.bitwise_not(g16)), u))
                                    part[u, 3, T.ramp(0, 1, LANES)] = part.vload([u, 3, 0], f32x8) + byte_sum(
                                        tab, col, half(T.bitwise_and(m16, g16), u))
                                else:
                                    part[u, 3, T.ramp(0, 1, LANES)] = part.vload([u, 3, 0], f32x8) + byte_sum(
                                        tab, col, half(g16, u))
                        else:
                            p16 = T.meta_var(T.bitwise_and(s16, mask.vload([tile, col, 0], "uint8x16")) if has_mask
                                          else s16)
                            for u in T.unroll(HALVES):
                                part[u, 0, T.ramp(0, 1, LANES)] = part.vload([u, 0, 0], f32x8) + byte_sum(
                                    tab, col, half(p16, u))
                                if has_mask:
                                    part[u, 1, T.ramp(0, 1, LANES)] = part.vload([u, 1, 0], f32x8) + byte_sum(
                                        tab, col, half(mask.vload([tile, col, 0], "uint8x16"), u))
                if has_residual:
                    for t in range(start[g], start[g + 1]):
                        j = T.meta_var(cols[t])
                        xj = T.meta_var(T.broadcast(x[0, j], LANES))
                        for u in T.unroll(HALVES):
                            r_on = T.meta_var(bit_on(residual, tile, t // 8, t % 8, u))
                            if has_mask:
                                m_on = T.meta_var(bit_on(mask, tile, j // 8, j % 8, u))
                                res[u, 1, T.ramp(0, 1, LANES)] = res.vload([u, 1, 0], f32x8) + T.Select(m_on, xj, zeros)
                                res[u, 0, T.ramp(0, 1, LANES)] = res.vload([u, 0, 0], f32x8) + T.Select(
                                    m_on, T.Select(r_on, xj, zeros), zeros)
                            else:
                                res[u, 1, T.ramp(0, 1, LANES)] = res.vload([u, 1, 0], f32x8) + xj
                                res[u, 0, T.ramp(0, 1, LANES)] = res.vload([u, 0, 0], f32x8) + T.Select(r_on, xj, zeros)
                for u in T.unroll(HALVES):
                    if not has_mask:
                        if has_groups:  # M0 = ~grp: the group's sum of x less XM1
                            part[u, 1, T.ramp(0, 1, LANES)] = T.broadcast(xm[g], LANES) - part.vload([u, 3, 0], f32x8)
                        else:
                            part[u, 1, T.ramp(0, 1, LANES)] = T.broadcast(xm[g], LANES)
                    acc[u, T.ramp(0, 1, LANES)] = acc.vload([u, 0], f32x8) + group_total(
                        part, res, alpha, mu, group_alpha, group_mu, residual_alpha, residual_mu, tile, g, u)
            for u in T.unroll(HALVES):
                for l in T.vectorized(LANES):
                    y[0, tile * T_ + u * LANES + l] = plus_bias(acc[u, l], bias, has_bias, tile * T_ + u * LANES + l)

    keep = [True, True, has_mask, True, has_mu, has_bias] + [has_groups] * 3 + [has_residual] * 4 + [True]
    params = [p for p, k in zip(kernel.params, keep) if k]
    return tirx.PrimFunc(params, kernel.body, kernel.ret_type, kernel.attrs)


def reference(layer, x):
    """float64 numpy oracle: ``PackedLinear.matmul`` of the layer on one row ``x`` ``[K]``."""
    return layer.matmul(x[None])[0]
