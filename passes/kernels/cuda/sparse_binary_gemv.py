"""The one-token sparse-binary GEMV for CUDA: a warp per 4 rows, 128-bit loads of interleaved bit words.

Layout (:data:`LAYOUT`): sign and mask planes as uint32 words, 4-row interleaved (``[N/4, K/32, 4]``), so
word ``c`` of a tile's four rows is one 16-byte vector; scales ``[N/4, K/G, 4]`` (four halves, 8 bytes);
the v2 group plane stays bytes (``[N/4, K/8, 4]``: a word's 32 columns are 16 contiguous bytes), and so
does the residual plane (``[N/4, ceil(S/8), 4]``); the salient plane is ``[1, K/8]``.

Per block: :data:`WARPS` warps, one tile of 4 rows each, over one K split of ``CS`` words:

1. the split's slice of ``x`` is staged into shared memory (float4 loads);
2. lane ``l`` takes words ``l, l + 32, ...``: one ``ld.global.v4.u32`` of signs and one of masks (a warp
   reads 512 contiguous bytes per plane), then decodes its 4 x 32 weights in registers: per row, the sums
   ``P = Σ x over kept +1 weights`` and ``Q = Σ x over kept weights`` (and ``P1``, ``Q1`` over group-1
   weights for v2), so a weight costs a shift, an ``and`` and a predicated add (nvcc fuses the bit tests
   into ``lop3``); the word's scales then give ``alpha (2P - Q) + mu Q`` per row, in fp32. The lane reads
   column ``(i + l) mod 32`` at step ``i``, so the 32 lanes' shared-memory reads of ``x`` hit 32 banks;
   With a salient residual, a block first counts the salient columns before every word (a prefix count of
   the salient plane in shared memory); a word's salient columns then add ``ra (2 r - 1) + rm`` for kept
   weights, ``r`` the row's residual bit at the column's rank (about 11 % of the columns in PBS2P models);
3. the 32 lanes' row sums are added through shared memory; with several K splits (tall K, or too few
   row tiles to fill the GPU) a first launch sets ``y`` to the bias and each split adds its partial rows
   with ``atomicAdd`` (``RED.E.ADD.F32``): no workspace, so the kernel can sit inside a captured CUDA
   graph (a workspace pointer would be baked into the graph).

Activations stay fp32: at one token ``x`` is K floats against ``N K / 4`` bytes of weights and more, so
fp16 activations would save nothing measurable and would round the model's inputs.
"""

from __future__ import annotations

from pbs2pc.compiler.tvm_compat import T, tirx
from pbs2pc.passes.kernels.registry import Layout

ROWS = 4  # rows per tile: one 16-byte vector of 32-bit words
WARPS = 4  # tiles (warps) per block
LAYOUT = Layout(word_bits=32, interleave=ROWS)
MAX_SPLIT_WORDS = 256  # words of K per split: 32 KB of x in shared memory
MIN_SPLIT_WORDS = 4  # words of K per split the tuner tries at least (4 of 32 lanes busy)
TARGET_BLOCKS = 264  # two blocks per SM of an H100 (132 SMs): split K until the grid has this many


def supported(out_features: int, in_features: int, group_size: int, interleave: int, plane_dtype: str) -> bool:
    return (interleave == ROWS and plane_dtype == "uint32" and out_features % (ROWS * WARPS) == 0
            and in_features % 32 == 0 and group_size % 32 == 0 and in_features % group_size == 0)


def splits_for(out_features: int, in_features: int, warps: int = WARPS) -> int:
    """K splits: the fewest with at most :data:`MAX_SPLIT_WORDS` words each, then more (while each keeps at
    least 32 words, one per lane) until the grid has :data:`TARGET_BLOCKS` blocks of ``warps`` warps."""
    words, blocks = in_features // 32, out_features // (ROWS * warps)
    divisors = [s for s in range(1, words + 1) if words % s == 0]
    split = next(s for s in divisors if words // s <= MAX_SPLIT_WORDS)
    for s in divisors:
        if s > split and blocks * split < TARGET_BLOCKS and words // s >= 32:
            split = s
    return split


def split_choices(in_features: int) -> list[int]:
    """The K splits worth a try: each split a whole number of words, at most :data:`MAX_SPLIT_WORDS` of
    them (its ``x`` fits the shared memory) and at least :data:`MIN_SPLIT_WORDS`. Splits of fewer than 32
    words leave lanes idle but multiply the blocks: a small layer (SmolLM2's 576x576 has 36 blocks of 4
    warps) fills a fraction of a 132-SM GPU otherwise."""
    words = in_features // 32
    return [s for s in range(1, words + 1)
            if words % s == 0 and words // s <= MAX_SPLIT_WORDS and (words // s >= MIN_SPLIT_WORDS or s == 1)]


def knobs(out_features: int, in_features: int) -> dict:
    """The tuner's search space (:mod:`pbs2pc.compiler.tune`): ``warps`` per block (rows per block: 4 each)
    and K ``splits``, the defaults (:data:`WARPS`, :func:`splits_for`) first."""
    warps = [w for w in (WARPS, 2, 8) if (out_features // ROWS) % w == 0]
    default = splits_for(out_features, in_features)
    return {"warps": tuple(warps),
            "splits": (default, *(s for s in split_choices(in_features) if s != default))}


def without_absent(kernel, present: list[bool]):
    params = [p for p, keep in zip(kernel.params, present) if keep]
    return tirx.PrimFunc(params, kernel.body, kernel.ret_type, kernel.attrs)


def gemv(out_features: int, in_features: int, group_size: int, has_mask: bool, has_mu: bool, has_bias: bool,
         has_groups: bool = False, has_residual: bool = False, residual_bytes: int = 1, splits: int | None = None,
         warps: int = WARPS):
    """The PrimFunc ``(x [1, K] f32, sign, [mask], alpha, [mu], [bias], [group, group_alpha, group_mu],
    [salient, residual, residual_alpha, residual_mu], y [1, N] f32)`` for one layer shape (layout: the
    module docstring; ``residual_bytes``: the residual plane's bytes per row); ``splits``: K splits (default
    :func:`splits_for`), ``warps``: warps (4-row tiles) per block (the tuner's knobs, :func:`knobs`)."""
    if (out_features // ROWS) % warps or (splits and (in_features // 32) % splits):
        raise ValueError(f"the CUDA GEMV cannot run N={out_features}, K={in_features} with {warps} warps per block "
                         f"and {splits} K splits")
    WARPS = warps  # noqa: N806 - the module default, for this build
    N, K, G = out_features, in_features, group_size
    RB = residual_bytes
    THREADS = WARPS * 32
    RCHUNK = (K // 32 + THREADS - 1) // THREADS  # salient words per thread in the rank prologue
    NT, C, GB, C8 = N // ROWS, K // 32, K // G, K // 8
    S = splits or splits_for(N, K, warps)
    CS = C // S  # words per split
    XS = CS * 32  # floats of x per split
    WPG = G // 32  # words per scale group
    ITER = (CS + 31) // 32
    STAGE = (XS + WARPS * 128 - 1) // (WARPS * 128)

    def bit(word, shift):
        return T.bitwise_and(T.shift_right(word, T.Cast("uint32", T.bitwise_and(shift, 31))), T.uint32(1)) != T.uint32(0)

    def mask_word(mw, r):
        return mw[r] if has_mask else T.uint32(0xFFFFFFFF)

    def kept(sw, mw, r):
        return T.bitwise_and(sw[r], mw[r]) if has_mask else sw[r]

    def group_word(gw, col, r):
        # the 32 group bits of the word's row r, in the sign word's bit order (4 bytes, little-endian)
        return (T.Cast("uint32", gw[0, r]) | T.shift_left(T.Cast("uint32", gw[1, r]), T.uint32(8))
                | T.shift_left(T.Cast("uint32", gw[2, r]), T.uint32(16)) | T.shift_left(T.Cast("uint32", gw[3, r]), T.uint32(24)))

    def x_at(xs, it, lane, i):
        return xs[(it * 32 + lane) * 32 + T.bitwise_and(i + lane, 31)]

    def pick(xs, it, lane, i, cond):
        return T.Select(cond, x_at(xs, it, lane, i), T.float32(0))

    def pick_kept(xs, it, lane, i, mw, r):
        return pick(xs, it, lane, i, bit(mw[r], i + lane)) if has_mask else x_at(xs, it, lane, i)

    def salient_word(salient, w):
        return (T.Cast("uint32", salient[0, w * 4]) | T.shift_left(T.Cast("uint32", salient[0, w * 4 + 1]), T.uint32(8))
                | T.shift_left(T.Cast("uint32", salient[0, w * 4 + 2]), T.uint32(16))
                | T.shift_left(T.Cast("uint32", salient[0, w * 4 + 3]), T.uint32(24)))

    def below(word, j):
        # the bits of word below bit j (j in 0..31)
        return T.bitwise_and(word, T.shift_left(T.uint32(1), T.Cast("uint32", j)) - T.uint32(1))

    def plus_bias(value, bias, index):
        return value + bias[index] if has_bias else value

    @T.prim_func(private=True, check_well_formed=False)
    def kernel(x: T.Buffer((1, K), "float32"), sign: T.Buffer((NT, C, ROWS), "uint32"),
               mask: T.Buffer((NT, C, ROWS), "uint32"), alpha: T.Buffer((NT, GB, ROWS), "float16"),
               mu: T.Buffer((NT, GB, ROWS), "float16"), bias: T.Buffer((N,), "float32"),
               group: T.Buffer((NT, C8, ROWS), "uint8"), group_alpha: T.Buffer((NT, GB, ROWS), "float16"),
               group_mu: T.Buffer((NT, GB, ROWS), "float16"), salient: T.Buffer((1, C8), "uint8"),
               residual: T.Buffer((NT, RB, ROWS), "uint8"), residual_alpha: T.Buffer((NT, GB, ROWS), "float16"),
               residual_mu: T.Buffer((NT, GB, ROWS), "float16"), y: T.Buffer((1, N), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        if S > 1:
            # Split K: y starts as the bias (or 0) and each split adds its partial rows atomically.
            for bx in T.thread_binding((N + 127) // 128, thread="blockIdx.x"):
                for tx in T.thread_binding(128, thread="threadIdx.x"):
                    if bx * 128 + tx < N:
                        y[0, bx * 128 + tx] = plus_bias(T.float32(0), bias, bx * 128 + tx)
        for bx in T.thread_binding(NT // WARPS, thread="blockIdx.x"):
            for sp in T.thread_binding(S, thread="blockIdx.y"):
                for ty in T.thread_binding(WARPS, thread="threadIdx.y"):
                    for lane in T.thread_binding(32, thread="threadIdx.x"):
                        xs = T.alloc_buffer((XS,), "float32", scope="shared")
                        red = T.alloc_buffer((WARPS, ROWS, 32), "float32", scope="shared")
                        acc = T.alloc_buffer((ROWS,), "float32", scope="local")
                        sums = T.alloc_buffer((6, ROWS), "float32", scope="local")  # P, Q, P1, Q1, PR, QR
                        cnt = T.alloc_buffer((THREADS,), "int32", scope="shared")
                        start = T.alloc_buffer((THREADS,), "int32", scope="shared")
                        srank = T.alloc_buffer((C,), "int32", scope="shared")  # salient columns before word w
                        run = T.alloc_buffer((1,), "int32", scope="local")
                        sal = T.alloc_buffer((1,), "uint32", scope="local")
                        ra = T.alloc_buffer((ROWS,), "float16", scope="local")
                        rm = T.alloc_buffer((ROWS,), "float16", scope="local")
                        sw = T.alloc_buffer((ROWS,), "uint32", scope="local")
                        mw = T.alloc_buffer((ROWS,), "uint32", scope="local")
                        gw = T.alloc_buffer((4, ROWS), "uint8", scope="local")
                        sa = T.alloc_buffer((ROWS,), "float16", scope="local")
                        sm = T.alloc_buffer((ROWS,), "float16", scope="local")
                        ga = T.alloc_buffer((ROWS,), "float16", scope="local")
                        gm = T.alloc_buffer((ROWS,), "float16", scope="local")
                        tile = bx * WARPS + ty
                        # 1. This split's x into shared memory, four floats per thread and step.
                        for i in range(STAGE):
                            if ((i * WARPS + ty) * 32 + lane) * 4 < XS:
                                for v in T.vectorized(4):
                                    xs[((i * WARPS + ty) * 32 + lane) * 4 + v] = x[
                                        0, sp * XS + ((i * WARPS + ty) * 32 + lane) * 4 + v]
                        if has_residual:
                            # The rank of every word's first column among the salient ones (a block-wide
                            # exclusive prefix count of the salient plane): the residual bit of salient
                            # column j is bit rank(j) of the row's residual bits.
                            run[0] = 0
                            for q in range(RCHUNK):
                                if (ty * 32 + lane) * RCHUNK + q < C:
                                    run[0] = run[0] + T.Cast("int32", T.popcount(
                                        salient_word(salient, (ty * 32 + lane) * RCHUNK + q)))
                            cnt[ty * 32 + lane] = run[0]
                            T.tvm_storage_sync("shared")
                            if ty * 32 + lane == 0:
                                run[0] = 0
                                for q in range(THREADS):
                                    start[q] = run[0]
                                    run[0] = run[0] + cnt[q]
                            T.tvm_storage_sync("shared")
                            run[0] = start[ty * 32 + lane]
                            for q in range(RCHUNK):
                                if (ty * 32 + lane) * RCHUNK + q < C:
                                    srank[(ty * 32 + lane) * RCHUNK + q] = run[0]
                                    run[0] = run[0] + T.Cast("int32", T.popcount(
                                        salient_word(salient, (ty * 32 + lane) * RCHUNK + q)))
                        T.tvm_storage_sync("shared")
                        # 2. Lane-strided words: 128-bit loads, decode in registers.
                        for r in range(ROWS):
                            acc[r] = T.float32(0)
                        for it in range(ITER):
                            if it * 32 + lane < CS:
                                for v in T.vectorized(ROWS):
                                    sw[v] = sign[tile, sp * CS + it * 32 + lane, v]
                                if has_mask:
                                    for v in T.vectorized(ROWS):
                                        mw[v] = mask[tile, sp * CS + it * 32 + lane, v]
                                if has_groups:
                                    for q in range(4):
                                        for v in T.vectorized(ROWS):
                                            gw[q, v] = group[tile, (sp * CS + it * 32 + lane) * 4 + q, v]
                                for p in range(6):
                                    for r in range(ROWS):
                                        sums[p, r] = T.float32(0)
                                for i in T.unroll(32):
                                    for r in T.unroll(ROWS):
                                        # +1 kept weights, kept weights, and their group-1 parts
                                        sums[0, r] = sums[0, r] + pick(xs, it, lane, i, bit(kept(sw, mw, r), i + lane))
                                        sums[1, r] = sums[1, r] + pick_kept(xs, it, lane, i, mw, r)
                                        if has_groups:
                                            sums[2, r] = sums[2, r] + pick(xs, it, lane, i, bit(
                                                T.bitwise_and(kept(sw, mw, r), group_word(gw, i + lane, r)), i + lane))
                                            sums[3, r] = sums[3, r] + pick(xs, it, lane, i, bit(
                                                T.bitwise_and(mask_word(mw, r), group_word(gw, i + lane, r)), i + lane))
                                if has_residual:
                                    # The word's salient columns: kept ones add ra (2 r - 1) + rm.
                                    sal[0] = salient_word(salient, sp * CS + it * 32 + lane)
                                    for i in T.unroll(32):
                                        if bit(sal[0], i + lane):
                                            run[0] = srank[sp * CS + it * 32 + lane] + T.Cast(
                                                "int32", T.popcount(below(sal[0], T.bitwise_and(i + lane, 31))))
                                            for r in T.unroll(ROWS):
                                                sums[5, r] = sums[5, r] + pick_kept(xs, it, lane, i, mw, r)
                                                sums[4, r] = sums[4, r] + pick(xs, it, lane, i, T.bitwise_and(
                                                    T.shift_right(T.Cast("uint32", residual[tile, T.shift_right(run[0], 3), r]),
                                                                  T.Cast("uint32", T.bitwise_and(run[0], 7))),
                                                    mask_word(mw, r) >> T.Cast("uint32", T.bitwise_and(i + lane, 31)))
                                                    & T.uint32(1) != T.uint32(0))
                                    for v in T.vectorized(ROWS):
                                        ra[v] = residual_alpha[tile, (sp * CS + it * 32 + lane) // WPG, v]
                                    for v in T.vectorized(ROWS):
                                        rm[v] = residual_mu[tile, (sp * CS + it * 32 + lane) // WPG, v]
                                    for r in range(ROWS):
                                        acc[r] = acc[r] + T.Cast("float32", ra[r]) * (T.float32(2) * sums[4, r] - sums[5, r]) \
                                            + T.Cast("float32", rm[r]) * sums[5, r]
                                # The word's scale group: alpha (2P - Q) + mu Q per row, group 1 apart.
                                for v in T.vectorized(ROWS):
                                    sa[v] = alpha[tile, (sp * CS + it * 32 + lane) // WPG, v]
                                if has_mu:
                                    for v in T.vectorized(ROWS):
                                        sm[v] = mu[tile, (sp * CS + it * 32 + lane) // WPG, v]
                                if has_groups:
                                    for v in T.vectorized(ROWS):
                                        ga[v] = group_alpha[tile, (sp * CS + it * 32 + lane) // WPG, v]
                                    for v in T.vectorized(ROWS):
                                        gm[v] = group_mu[tile, (sp * CS + it * 32 + lane) // WPG, v]
                                for r in range(ROWS):
                                    if has_groups:
                                        sums[0, r] = sums[0, r] - sums[2, r]
                                        sums[1, r] = sums[1, r] - sums[3, r]
                                        acc[r] = acc[r] + T.Cast("float32", ga[r]) * (T.float32(2) * sums[2, r] - sums[3, r]) \
                                            + T.Cast("float32", gm[r]) * sums[3, r]
                                    acc[r] = acc[r] + T.Cast("float32", sa[r]) * (T.float32(2) * sums[0, r] - sums[1, r])
                                    if has_mu:
                                        acc[r] = acc[r] + T.Cast("float32", sm[r]) * sums[1, r]
                        # 3. The warp's row sums.
                        for r in range(ROWS):
                            red[ty, r, lane] = acc[r]
                        T.tvm_storage_sync("shared")
                        if lane < ROWS:
                            acc[0] = T.float32(0)
                            for l in range(32):
                                acc[0] = acc[0] + red[ty, lane, l]
                            if S == 1:
                                y[0, tile * ROWS + lane] = plus_bias(acc[0], bias, tile * ROWS + lane)
                            else:
                                T.evaluate(T.call_intrin("float32", "tirx.cuda.atomic_add",
                                                         T.address_of(y[0, tile * ROWS + lane]), acc[0]))

    present = [True, True, has_mask, True, has_mu, has_bias, *[has_groups] * 3, *[has_residual] * 4, True]
    return without_absent(kernel, present)
