"""The fp32 GEMV (M = 1) for op contract v2 layers on x86 with AVX-512 (F, BW, VBMI): one pass over the weights.

A v2 layer (``pbs2pc.models.format``) adds to v1 magnitude groups (a ``group`` plane; group-1 weights take
``group_alpha`` / ``group_mu``) and/or a salient residual (``salient`` columns shared by all rows; a kept
weight on them adds ``residual_alpha (2 r - 1) + residual_mu``, ``r`` from a plane of the salient columns
only). The arithmetic is the v1 GEMV's (:mod:`.sparse_binary_gemv`: 16-entry subset-sum tables of 4
inputs, ``vpermps`` lookups by plane nibble); what differs is how the planes meet the tables:

* **Chunks of 4 column bytes.** Per 16-row tile and 32 columns, each plane is one 64-byte load and one
  ``vpermb`` that transposes it so that int32 lane ``r`` holds row ``r``'s 32 bits; a mask stored as
  pattern codes (the x86-avx512 layout) is extracted (:func:`mask_codes.extract`) and expanded by one
  ``vpermb`` from the pattern table into the same transposed form, in registers: no per-call expansion
  and no mask bytes in memory. The group split is then whole-chunk ``vpandd`` / ``vpandnd``
  (``P0 = P & ~G``, ``P1 = P & G``, ``M1 = M & G``), and every lookup index is a 32-bit shift of a chunk
  word (``vpermps`` reads bits 0-3). Spreading each column byte with its own ``vpermb`` instead (the v1
  GEMV's way) measured the same or 3-7 % slower here.
* **Four sums per scale group** (a kept weight has four values that matter: sign x group): ``XP0``,
  ``XP1``, ``XM1`` by nibble lookups and ``XM`` (all kept) by one ``vpermi2ps`` per column byte from the
  32-entry per-code table (``XM0 = XM - XM1``): 7 lookups per column byte and 16 rows, where v1 needs 3.
  ``y += 2 a XP0 + (mu - a) XM0 + 2 ga XP1 + (gmu - ga) XM1``. Each sum has two accumulators (low and high
  nibbles), so no add chain is longer than 4 per chunk. Reading mask planes instead of codes costs an
  eighth lookup and 0.375 bits per weight (8 % slower at 4096x4096), so v2 layers keep the codes.
* **Residual**: per call the salient columns of each scale group are listed (column, input) beside the
  tables (:func:`~pbs2pc.passes.kernels.salient.salient_lister`, a word of the plane at a time); per tile
  and scale group the kernel walks them (4 of 64 in a BiLLM-style layer), testing the kept bit in the
  group's transposed mask words (kept on the stack from the chunk loop) and the residual bit
  (``[N/16, ceil(S/8), 16]``), two masked adds of ``x[col]`` into ``RP`` and ``RM``:
  ``y += 2 ra RP + (rmu - ra) RM``. One walk per scale group, after its chunks (the chunk loop stays
  unrolled, its words in registers); a gathered-input table pass would need the kept bits of the salient
  columns gathered per row, which neither layout stores.

Layout: the x86-avx512 layout (:data:`pbs2pc.passes.kernels.x86_avx512.LAYOUT`), v2 per-row inputs in the same
16-row blocks (InterleaveRows); the mask as codes (``codes=(n, m)``, G % 32 = 0) or as planes, or absent.
Measurements: docs/performance.md ("Op contract v2 layers").
"""

from __future__ import annotations

import math

from pbs2pc.compiler.tvm_compat import T, tirx
from pbs2pc.passes.kernels.lm_head_fp16 import prefetch as fetch
from pbs2pc.passes.kernels.salient import salient_lister

from . import mask_codes
from .sparse_binary_gemv import LANES, plus_bias, subset_sum, task_loop, tiles_per_task, vpermps

#: 16-row tiles per parallel task. One: a tile keeps 11 accumulators (4 sums x 2 nibble chains, RP, RM, the
#: output) and its chunk words in registers; 2 tiles spill (1536x576 groups + residual, one thread:
#: 41.9 us at 1, 42.4 at 2; residual only 24.5 / 26.0; 4096x4096 1196 / 1244 us median).
TILES_PER_TASK = 1
#: Scale groups unrolled: one, a loop (the code measured in docs/performance.md); the tuner tries the other
#: divisors of ``K / G`` up to :data:`MAX_UNROLL_GROUPS` (:func:`unroll_groups_knob`).
UNROLL_GROUPS = 1
MAX_UNROLL_GROUPS = 4
#: Tasks ahead whose lines each scale group prefetches into L2 (0: none; the tuner also tries 1). SmolLM2's
#: coded layers, AMD EPYC Zen 4, 2 threads, 9 rounds in turns: 1 ahead 1.00-1.04x (192x576 the most), 2
#: ahead 1.01-1.03x, into L1 0.99-1.03x; the streams' hardware prefetch already covers most of a tile.
PREFETCH_TILES = 0
ARGS = ("x", "sign", "mask", "alpha", "mu", "bias", "group", "group_alpha", "group_mu", "salient", "residual",
        "residual_alpha", "residual_mu", "y")


def unroll_groups_knob(in_features: int, group_size: int) -> tuple:
    """The ``unroll_groups`` candidates of a layer: the default, then the divisors of its scale groups up to
    :data:`MAX_UNROLL_GROUPS` (more would only grow the code: a group's chunks are unrolled already)."""
    groups = in_features // group_size
    return (UNROLL_GROUPS, *(u for u in range(2, MAX_UNROLL_GROUPS + 1) if groups % u == 0))


def supported(out_features: int, in_features: int, group_size: int, interleave: int, plane_dtype: str,
              has_groups: bool, has_residual: bool, coded: bool = False) -> bool:
    """Whether the kernel covers this layer: a v2 layer in 16-row tiles of byte planes, groups of whole
    plane bytes (of whole 32-column code chunks with ``coded``)."""
    return ((has_groups or has_residual) and interleave == LANES and plane_dtype == "uint8"
            and out_features % LANES == 0 and group_size % (32 if coded else 8) == 0
            and in_features % group_size == 0)


def chunk_bytes(group_size: int) -> int:
    """Column bytes per chunk: 4 (32 columns, an int32 lane per row), fewer where a group has fewer."""
    return math.gcd(4, group_size // 8)


def transposed(buf, tile, col, cw: int):
    """Plane bytes ``col .. col + cw - 1`` of the 16 rows of ``tile`` as int32x16, row ``r``'s in lane ``r``
    (byte ``c'`` of the lane: column byte ``col + c'``): one load and one ``vpermb``."""
    bits = buf.vload([tile, col, 0], f"uint8x{16 * cw}")
    # Shuffle cannot widen: index into copies (bytes c' >= cw of a lane are copies no lookup reads)
    return T.reinterpret("int32x16", T.Shuffle([bits] * (4 // cw), [16 * (b % 4) + b // 4 for b in range(64)]))


def gemv_v2(out_features: int, in_features: int, group_size: int, has_mask: bool, has_mu: bool, has_bias: bool,
            has_groups: bool, has_residual: bool, residual_bytes: int = 1, codes: tuple[int, int] | None = None,
            tiles: int = TILES_PER_TASK, parallel_min: int | None = None, unroll_groups: int = UNROLL_GROUPS,
            prefetch: int = PREFETCH_TILES):
    """The PrimFunc ``(x, sign, [mask], alpha, [mu], [bias], [group, group_alpha, group_mu], [salient,
    residual, residual_alpha, residual_mu], y)`` for one layer shape; ``codes=(n, m)``: the mask as pattern
    codes ``[N/16, W]`` and the sign plane as ``sign & mask``; ``residual_bytes``: ``ceil(S / 8)``. The tuner's
    knobs: ``tiles``, 16-row tiles per task; ``parallel_min``, see :func:`~.sparse_binary_gemv.task_loop`;
    ``unroll_groups``, scale groups unrolled (a divisor of ``K / G``); ``prefetch``, tasks ahead whose lines
    each scale group prefetches (0: none; same bits either way)."""
    coded = codes is not None
    if not supported(out_features, in_features, group_size, LANES, "uint8", has_groups, has_residual, coded):
        raise ValueError(f"the AVX-512 v2 GEMV does not cover N={out_features}, K={in_features}, G={group_size} "
                         f"(groups={has_groups}, residual={has_residual}, codes={codes})")
    N, K, G = out_features, in_features, group_size
    if prefetch < 0:
        raise ValueError(f"prefetch={prefetch}: tasks ahead, 0 or more")
    if unroll_groups < 1 or (K // G) % unroll_groups:
        raise ValueError(f"unroll_groups={unroll_groups} does not divide the {K // G} scale groups of a row")
    NT, C, GB, CG, RB = N // LANES, K // 8, K // G, G // 8, max(1, residual_bytes)
    CW = chunk_bytes(G)
    CPG = CG // CW  # chunks per scale group
    R = tiles_per_task(N, tiles)
    tasks = task_loop(N, K, parallel_min)
    plane_mask = has_mask and not coded
    NC = mask_codes.MAX_PATTERNS
    mask_shape = (NT, mask_codes.code_width(K)) if coded else (NT, C, LANES)
    fill_bits = mask_codes.pattern_bits(*codes, "float32") if coded else None
    pattern = mask_codes.pattern_table(*codes) if coded else None
    f32, i32, zeros = "float32x16", "int32x16", T.broadcast(T.float32(0), LANES)

    def nibble(tab, col, c4, h, word):
        """The table sums of nibble ``h`` of column byte ``col`` (byte ``c4`` of the chunk word), 16 rows
        (``c4``, ``h``: unrolled loop variables; a shift by 0 folds away)."""
        idx = T.shift_right(word, T.broadcast(8 * c4 + 4 * h, LANES))
        return vpermps(tab.vload([2 * col + h, 0], f32), idx)

    def code_sum(tm, word, col, c4):
        idx = T.shift_right(word, T.broadcast(8 * c4, LANES))
        return T.call_llvm_pure_intrin(f32, "llvm.x86.avx512.vpermi2var.ps.512", tm.vload([col, 0], f32), idx,
                                       tm.vload([col, LANES], f32))

    @T.macro
    def add(part, half, r, p, h, value):
        if h == 0:
            part[r, p, T.ramp(0, 1, LANES)] = part.vload([r, p, 0], f32) + value
        else:
            half[r, p, T.ramp(0, 1, LANES)] = half.vload([r, p, 0], f32) + value

    def scale(buf, tile, g):
        return T.Cast(f32, buf.vload([tile, g, 0], "float16x16"))  # vcvtph2ps

    def group_output(part, half, res, xsum, alpha, mu, group_alpha, group_mu, residual_alpha, residual_mu, task, r, g):
        """Scale group ``g``'s part of the 16 outputs of tile ``task * R + r``, from its sums (an expression: a
        Python variable in the TVMScript body would be a 64-byte workspace allocation per task: 35 instead
        of 25 us at 1536x576, residual only, one thread)."""
        def both(p):
            return part.vload([r, p, 0], f32) + half.vload([r, p, 0], f32)

        tile = task * R + r
        xm = both(1) if has_mask else T.broadcast(xsum[g], LANES)
        m0 = xm - both(3) if has_groups else xm
        a = scale(alpha, tile, g)
        total = (a + a) * both(0) - a * m0
        if has_mu:
            total = total + scale(mu, tile, g) * m0
        if has_groups:
            ga = scale(group_alpha, tile, g)
            total = total + (ga + ga) * both(2) + (scale(group_mu, tile, g) - ga) * both(3)
        if has_residual:
            ra = scale(residual_alpha, tile, g)
            total = total + (ra + ra) * res.vload([r, 0, 0], f32) + (
                scale(residual_mu, tile, g) - ra) * res.vload([r, 1, 0], f32)
        return total

    CODE_LINES = -(-CPG * mask_codes.CHUNK_BYTES // 64)  # cache lines of a scale group's codes in a tile
    PLANE_LINES = -(-CG * LANES // 64)  # of its bytes of a plane
    W = mask_shape[1]

    @T.macro
    def fetch_ahead(task, g, sign, group, mask, alpha, mu, group_alpha, group_mu, residual, residual_alpha,
                    residual_mu):
        """The lines scale group ``g`` of the tiles ``prefetch`` tasks ahead will read (none past the last)."""
        for r in T.unroll(R):
            ahead = T.meta_var(T.min((task + prefetch) * R + r, NT - 1))
            for line in T.unroll(PLANE_LINES):
                fetch(sign, ahead, g * CG + 4 * line, 0)
                if has_groups:
                    fetch(group, ahead, g * CG + 4 * line, 0)
                if plane_mask:
                    fetch(mask, ahead, g * CG + 4 * line, 0)
            if coded:
                for line in T.unroll(CODE_LINES):
                    fetch(mask, ahead, T.min(g * CPG * mask_codes.CHUNK_BYTES + 64 * line, W - 1))
            fetch(alpha, ahead, g, 0)
            if has_mu:
                fetch(mu, ahead, g, 0)
            if has_groups:
                fetch(group_alpha, ahead, g, 0)
                fetch(group_mu, ahead, g, 0)
            if has_residual:
                fetch(residual_alpha, ahead, g, 0)
                fetch(residual_mu, ahead, g, 0)
                fetch(residual, ahead, T.min(g * RB // GB, RB - 1), 0)

    def bit_on(word, bit):
        return tirx.NE(T.bitwise_and(word, T.broadcast(T.shift_left(T.int32(1), bit), LANES)),
                       T.broadcast(T.int32(0), LANES))

    list_salient = salient_lister(K, G, relative=True, inputs=True)

    @T.prim_func(private=True, check_well_formed=False)
    def kernel(x: T.Buffer((1, K), "float32"), sign: T.Buffer((NT, C, LANES), "uint8"),
               mask: T.Buffer(mask_shape, "uint8"), alpha: T.Buffer((NT, GB, LANES), "float16"),
               mu: T.Buffer((NT, GB, LANES), "float16"), bias: T.Buffer((N,), "float32"),
               group: T.Buffer((NT, C, LANES), "uint8"), group_alpha: T.Buffer((NT, GB, LANES), "float16"),
               group_mu: T.Buffer((NT, GB, LANES), "float16"), salient: T.Buffer((1, C), "uint8"),
               residual: T.Buffer((NT, RB, LANES), "uint8"), residual_alpha: T.Buffer((NT, GB, LANES), "float16"),
               residual_mu: T.Buffer((NT, GB, LANES), "float16"), y: T.Buffer((1, N), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        tab = T.alloc_buffer((K // 4, LANES), "float32")
        tm = T.alloc_buffer((C, NC) if coded else (1, 1), "float32")  # XM of each pattern per column byte
        bits = T.alloc_buffer((8, NC) if coded else (1, 1), "float32")  # bit i of pattern e
        xsum = T.alloc_buffer((GB,), "float32")  # the group's sum of x (a layer without a mask)
        cols = T.alloc_buffer((K,), "int32")  # the salient columns, in order (within their scale group)
        xs = T.alloc_buffer((K,), "float32")  # their inputs
        start = T.alloc_buffer((GB + 1,), "int32")  # group g's salient columns: cols[start[g]:start[g+1]]
        count = T.alloc_buffer((1,), "int32")
        word = T.alloc_buffer((1,), "uint64")
        # 1. Tables, per-code sums, group sums of x, the salient columns (serial: a few microseconds).
        for j in range(K // 4):
            for e in T.vectorized(LANES):
                tab[j, e] = subset_sum(x, 0, j, e)
        if coded:
            fill_bits(bits)
            for c in range(C):
                for e in T.vectorized(NC):
                    tm[c, e] = T.float32(0)
                for i in T.unroll(8):
                    for e in T.vectorized(NC):
                        tm[c, e] = tm[c, e] + bits[i, e] * x[0, 8 * c + i]
        if not has_mask:
            for g in range(GB):
                xsum[g] = T.float32(0)
                for k in range(G):
                    xsum[g] = xsum[g] + x[0, g * G + k]
        if has_residual:
            list_salient(salient, cols, start, count, word, x, xs)  # each column within its scale group
        # 2. R tiles of 16 rows per task: per chunk the transposed plane words, then the lookups.
        for task in tasks(NT // R):
            acc = T.alloc_buffer((R, LANES), "float32")
            part = T.alloc_buffer((R, 4, LANES), "float32")  # XP0, XM, XP1, XM1: low nibbles, even codes
            half = T.alloc_buffer((R, 4, LANES), "float32")  # the same, high nibbles: two add chains
            res = T.alloc_buffer((R, 2, LANES), "float32")  # RP, RM
            word = T.alloc_buffer((R, 3, LANES), "int32")  # P, G, mask codes of the chunk
            kept = T.alloc_buffer((R, CPG, LANES), "int32")  # M of the group's chunks
            for r in T.unroll(R):
                acc[r, T.ramp(0, 1, LANES)] = zeros
            for go in range(GB // unroll_groups):
                for gi in T.unroll(unroll_groups):
                    g = T.meta_var(go * unroll_groups + gi)
                    for r in T.unroll(R):
                        for p in T.unroll(4):
                            part[r, p, T.ramp(0, 1, LANES)] = zeros
                            half[r, p, T.ramp(0, 1, LANES)] = zeros
                        for p in T.unroll(2):
                            res[r, p, T.ramp(0, 1, LANES)] = zeros
                    if prefetch > 0:
                        fetch_ahead(task, g, sign, group, mask, alpha, mu, group_alpha, group_mu, residual,
                                    residual_alpha, residual_mu)
                    for cb in T.unroll(CPG):
                        at = T.meta_var((g * CPG + cb) * CW)  # the chunk's first column byte
                        for r in T.unroll(R):
                            word[r, 0, T.ramp(0, 1, LANES)] = transposed(sign, task * R + r, at, CW)
                            if has_groups:
                                word[r, 1, T.ramp(0, 1, LANES)] = transposed(group, task * R + r, at, CW)
                            if plane_mask:
                                kept[r, cb, T.ramp(0, 1, LANES)] = transposed(mask, task * R + r, at, CW)
                                word[r, 0, T.ramp(0, 1, LANES)] = T.bitwise_and(word.vload([r, 0, 0], i32),
                                                                                 kept.vload([r, cb, 0], i32))
                            if coded:
                                word[r, 2, T.ramp(0, 1, LANES)] = T.reinterpret(i32, mask_codes.extract(
                                    mask, task * R + r, g * CPG + cb))
                                kept[r, cb, T.ramp(0, 1, LANES)] = T.reinterpret(i32, T.call_llvm_pure_intrin(
                                    "uint8x64", "llvm.x86.avx512.permvar.qi.512", pattern,
                                    T.reinterpret("uint8x64", word.vload([r, 2, 0], i32))))
                            if not has_mask:
                                kept[r, cb, T.ramp(0, 1, LANES)] = T.broadcast(T.int32(-1), LANES)
                        for c4 in T.unroll(CW):
                            for h in T.unroll(2):
                                for r in T.unroll(R):
                                    if has_groups:
                                        add(part, half, r, 0, h, nibble(tab, at + c4, c4, h, T.bitwise_and(
                                            word.vload([r, 0, 0], i32), T.bitwise_not(word.vload([r, 1, 0], i32)))))
                                        add(part, half, r, 2, h, nibble(tab, at + c4, c4, h, T.bitwise_and(
                                            word.vload([r, 0, 0], i32), word.vload([r, 1, 0], i32))))
                                        add(part, half, r, 3, h, nibble(tab, at + c4, c4, h, T.bitwise_and(
                                            kept.vload([r, cb, 0], i32), word.vload([r, 1, 0], i32))))
                                    else:
                                        add(part, half, r, 0, h, nibble(tab, at + c4, c4, h,
                                                                  word.vload([r, 0, 0], i32)))
                                    if plane_mask:
                                        add(part, half, r, 1, h, nibble(tab, at + c4, c4, h,
                                                                  kept.vload([r, cb, 0], i32)))
                                    if coded:
                                        if h == 0:
                                            add(part, half, r, 1, c4 % 2, code_sum(tm, word.vload([r, 2, 0], i32),
                                                                             at + c4, c4))
                    if has_residual:  # the group's salient columns: kept bit from the chunk's M, residual bit
                        for t in range(start[g], start[g + 1]):
                            for r in T.unroll(R):
                                res[r, 1, T.ramp(0, 1, LANES)] = res.vload([r, 1, 0], f32) + T.Select(
                                    bit_on(kept.vload([r, cols[t] // (8 * CW), 0], i32), cols[t] % (8 * CW)),
                                    T.broadcast(xs[t], LANES), zeros)
                                res[r, 0, T.ramp(0, 1, LANES)] = res.vload([r, 0, 0], f32) + T.Select(
                                    bit_on(kept.vload([r, cols[t] // (8 * CW), 0], i32), cols[t] % (8 * CW)),
                                    T.Select(bit_on(T.Cast(i32, residual.vload([task * R + r, t // 8, 0], "uint8x16")),
                                                    t % 8), T.broadcast(xs[t], LANES), zeros), zeros)
                    for r in T.unroll(R):
                        acc[r, T.ramp(0, 1, LANES)] = acc.vload([r, 0], f32) + group_output(
                            part, half, res, xsum, alpha, mu, group_alpha, group_mu, residual_alpha, residual_mu,
                            task, r, g)
            for r in T.unroll(R):
                for l in T.vectorized(LANES):
                    y[0, (task * R + r) * LANES + l] = plus_bias(acc[r, l], bias, has_bias, (task * R + r) * LANES + l)

    keep = [True, True, has_mask, True, has_mu, has_bias] + [has_groups] * 3 + [has_residual] * 4 + [True]
    params = [p for p, k in zip(kernel.params, keep) if k]
    return tirx.PrimFunc(params, kernel.body, kernel.ret_type, kernel.attrs)


def reference(layer, x):
    """float64 numpy oracle: ``PackedLinear.matmul`` of the layer on one row ``x`` ``[K]``."""
    return layer.matmul(x[None])[0]
