"""The LM head on a vocabulary table stored in int8 (``pbs2pc compile --lm-head int8``): ``y = x @ Wᵀ``.

Groups of ``GROUP`` = 32 columns with an fp16 scale each, i.e. the GGUF **Q8_0** format (1.0625 bytes per
entry): SmolLM2-135M's tied 49152 x 576 table is 113 MB in fp32, 56.6 MB in fp16, 30.1 MB here, for the
largest read of a decode step. A table that already is Q8_0 (the bundled GGUF's ``token_embd``: int8
codes per 32 columns whose largest magnitude is 127, times an fp16 scale) round-trips exactly.

Layout: one int8 tensor ``[V, H + 2 * H / GROUP]`` (:func:`row_bytes`). Row ``v`` holds the H codes, then
the ``H / GROUP`` scales as fp16 (IEEE binary16, little-endian byte pairs whatever the host). Group ``g``
(columns ``32 g .. 32 g + 31``) has ``s[v, g] = fp16(max |W[v, group]| / 127)`` (round to nearest; 0 for
an all-zero group) and codes ``q[v, k] = round_half_even(W[v, k] / float(s[v, g]))`` clipped to
``[-127, 127]``: the row means ``W[v, k] ~ s[v, g] * q[v, k]``. One parameter, so the token lookup takes
whole rows (codes and scales together) with an ordinary ``take``, and the weights file, the manifest and
the params-transform record describe one array (:func:`quantize` is the array transform).

Arithmetic of the head (:func:`lm_head_int8`): x stays fp32. For each table row and group, the 32 codes
are sign-extended and converted in registers ``LANES`` at a time (``vpmovsxbd`` + ``vcvtdq2ps``, 8 per ymm
on AVX2, 16 per zmm on AVX-512) and multiplied with ``x`` into an fp32 group vector (a multiply, then
FMAs); the group's fp16 scale is widened (``vcvtph2ps``), broadcast and FMA'd in: ``acc += group * s[v,
g]``, one FMA per group vector. The row's sum is reduced to a scalar by halving the vector: ``y[m, v] =
sum_g s[v, g] * sum_{k in g} x[m, k] * q[v, k]``, the product with the dequantised table up to fp32
rounding (:func:`reference` is the float64 oracle). The loops are the fp16 kernel's (``lm_head_fp16``):
``STEP`` rows side by side, the K loop unrolled, the bytes of the next step's rows prefetched into L2.
Needs ``H % 32 == 0`` and ``V % 4 == 0`` (:func:`supported`).

:func:`dequantize_rows` converts ``N`` rows (symbolic) back to fp32, exactly (an int8 code times an fp16
scale fits fp32's significand): the token lookup (the rows taken) and ``main``'s head (the whole table,
once per call).
"""

from __future__ import annotations

from pbs2pc.compiler.tvm_compat import T
from pbs2pc.passes.kernels import lm_head_fp16
from pbs2pc.passes.kernels.lm_head_fp16 import K_UNROLL, ROWS_PER_TASK, _sum_lanes, prefetch, rows_var

#: fp32 lanes of one vector of the sums (a zmm register; two ymm on AVX2).
LANES = 16
#: Columns per scale (Q8_0's block).
GROUP = 32
#: Table rows whose sums run side by side (as in the fp16 kernel).
STEP = 2
#: Rows ahead prefetched into L2 (the next step's).
PREFETCH_ROWS = STEP
#: Bytes of one stored scale (an fp16).
SCALE_BYTES = 2
#: The name the params transform gives the dequantising PrimFunc (LowerLMHead finds the table by it).
DEQUANTIZE = "lm_head_int8_dequantize"


def row_bytes(hidden: int) -> int:
    """Bytes (int8 columns) of one stored row of an ``H = hidden`` table: the codes, then the scales."""
    return hidden + SCALE_BYTES * (hidden // GROUP)


def hidden_of(width: int) -> int:
    """The hidden size ``H`` whose stored rows are ``width`` bytes (:func:`row_bytes` inverted)."""
    hidden = width * GROUP // (GROUP + SCALE_BYTES)
    if hidden % GROUP or row_bytes(hidden) != width:
        raise ValueError(f"{width} bytes is not a row of the int8 LM head layout (H + 2 * H / {GROUP})")
    return hidden


def supported(vocab: int, hidden: int) -> bool:
    """Whether the kernels cover a ``[vocab, hidden]`` table."""
    return hidden % GROUP == 0 and hidden > 0 and vocab % 4 == 0


def _rows_per_task(vocab: int) -> int:
    return next(r for r in (ROWS_PER_TASK, 32, 16, 8, 4) if vocab % r == 0)


def _scale(rows, row, hidden: int, group):
    """The fp32 value of group ``group``'s fp16 scale, stored little-endian after the ``hidden`` codes of
    ``rows[row]``."""
    col = hidden + SCALE_BYTES * group
    lo = T.bitwise_and(T.Cast("int32", rows[row, col]), T.int32(255))
    hi = T.shift_left(T.bitwise_and(T.Cast("int32", rows[row, col + 1]), T.int32(255)), T.int32(8))
    return T.Cast("float32", T.reinterpret("float16", T.Cast("uint16", T.bitwise_or(lo, hi))))


def knobs(vocab: int, hidden: int) -> dict:
    """The tuner's search space: the fp16 kernel's (:func:`~.lm_head_fp16.knobs`), ``k_unroll`` in whole
    scale groups."""
    return lm_head_fp16.knobs(vocab, hidden, unroll_units=GROUP // LANES)


def lm_head_int8(vocab: int, hidden: int, rows: int | None = None, step: int = STEP, prefetch_rows: int | None = None,
                 locality: int = lm_head_fp16.PREFETCH_LOCALITY, k_unroll: int | None = None,
                 rows_per_task: int | None = None):
    """The PrimFunc ``(x [M, H] f32, table [V, row_bytes(H)] i8, y [M, V] f32)``, M symbolic (``rows``:
    fixed, as the tuner measures it): ``y = x @ dequantize(table)ᵀ`` (see the module docstring); the
    tuner's knobs as in :func:`~.lm_head_fp16.lm_head_fp16` (``k_unroll``: vectors, whole groups)."""
    V, H = vocab, hidden
    W = row_bytes(H)
    G = H // GROUP  # groups of a row
    VPG = GROUP // LANES  # vectors of a group
    STEP = step  # noqa: N806 - the module default, for this build
    PREFETCH_ROWS = step if prefetch_rows is None else prefetch_rows  # noqa: N806
    RT = rows_per_task or _rows_per_task(V)
    KU = k_unroll or next(u for u in K_UNROLL if u % VPG == 0 and (H // LANES) % u == 0)
    if V % RT or RT % STEP or KU % VPG or (H // LANES) % KU:
        raise ValueError(f"the int8 LM head kernel cannot run a {V} x {H} table with {RT} rows per task, step "
                         f"{STEP}, {KU} vectors unrolled")
    GU = KU // VPG  # groups unrolled
    lead = lm_head_fp16._prefetch_lines(PREFETCH_ROWS, locality)
    BLOCKS = G // GU
    # The next step's rows are STEP * W contiguous bytes; their lines are prefetched spread over the K blocks.
    LINES = -(-(-(-STEP * W // 64) + 1) // BLOCKS)  # ceil((ceil(STEP * W / 64) + 1) / BLOCKS)
    # highest first byte of the prefetched range that keeps all of it inside the table (prefetches never
    # fault, but the address stays in range)
    FIRST_MAX = max(V * W - BLOCKS * LINES * 64, 0)

    def row(task, s, r):
        return task * RT + s * STEP + r

    def group_sum(x, table, m, task, s, r, g, l):
        """``sum_{k in group g} x[m, k] * q[row, k]``, lanes ``l``: one product, then FMAs."""
        total = None
        for j in range(VPG):
            term = x[m, g * GROUP + j * LANES + l] * T.Cast("float32", table[row(task, s, r), g * GROUP + j * LANES + l])
            total = term if total is None else total + term
        return total

    M = rows_var(rows)

    @T.prim_func(private=True, check_well_formed=False)
    def kernel(x: T.Buffer((M, H), "float32"), table: T.Buffer((V, W), "int8"), y: T.Buffer((M, V), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        flat = T.decl_buffer((V * W,), "int8", data=table.data)
        for m in range(M):
            for task in T.parallel(V // RT):
                acc = T.alloc_buffer((STEP, LANES), "float32", scope="local")
                for s in range(RT // STEP):
                    for r in T.unroll(STEP):
                        for l in T.vectorized(LANES):
                            acc[r, l] = T.float32(0)
                    for ko in range(BLOCKS):
                        for line in T.unroll(LINES * lead):
                            prefetch(flat, T.min(row(task, s, PREFETCH_ROWS) * W, FIRST_MAX) + (ko * LINES + line) * 64,
                                     locality=locality)
                        for gi in T.unroll(GU):
                            for r in T.unroll(STEP):
                                for l in T.vectorized(LANES):
                                    acc[r, l] = acc[r, l] + group_sum(x, table, m, task, s, r, ko * GU + gi, l) * _scale(
                                        table, row(task, s, r), H, ko * GU + gi)
                    for r in T.unroll(STEP):
                        y[m, row(task, s, r)] = _sum_lanes(acc.vload([r, 0], f"float32x{LANES}"), LANES)

    return kernel


def dequantize_rows(hidden: int):
    """The PrimFunc ``(rows [N, row_bytes(H)] i8, out [N, H] f32)``, N symbolic: ``out[n, k] = s[n, k / 32] *
    q[n, k]`` (exact)."""
    H = hidden
    W = row_bytes(H)

    @T.prim_func(private=True, check_well_formed=False)
    def kernel(var_rows: T.handle, var_out: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        N = T.int64()
        rows = T.match_buffer(var_rows, (N, W), "int8")
        out = T.match_buffer(var_out, (N, H), "float32")
        # one root block: Relax's RewriteDataflowReshape inspects every one-input call_tir and needs one
        with T.sblock("root"):
            for n in T.parallel(N):
                scale = T.alloc_buffer((1,), "float32", scope="local")
                for g in range(H // GROUP):
                    scale[0] = _scale(rows, n, H, g)
                    for j in T.unroll(GROUP // LANES):
                        for l in T.vectorized(LANES):
                            out[n, g * GROUP + j * LANES + l] = T.Cast(
                                "float32", rows[n, g * GROUP + j * LANES + l]) * scale[0]

    return kernel


def quantize(table):
    """The array transform: a float ``[V, H]`` table -> the int8 ``[V, row_bytes(H)]`` layout of the module
    docstring (codes, then each group's fp16 scale little-endian). An all-zero group gets scale 0; a table
    that is Q8_0 already (each group ``q * s`` with fp16 ``s`` and ``max |q| = 127``) comes back exactly."""
    import numpy as np

    w = np.asarray(table, np.float32)
    v, h = w.shape
    if h % GROUP:
        raise ValueError(f"the int8 LM head needs a hidden size divisible by {GROUP}, not {h}")
    groups = w.reshape(v, h // GROUP, GROUP)
    amax = np.abs(groups).max(axis=2, keepdims=True)
    with np.errstate(over="ignore"):
        scale16 = np.minimum(amax / np.float32(127), np.float32(65504)).astype(np.float16)  # round to nearest
    scale = scale16.astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1))
    codes = np.clip(np.rint(groups / safe), -127, 127).astype(np.int8).reshape(v, h)  # rint: half to even
    scale_bytes = scale16.reshape(v, h // GROUP).astype("<f2").view(np.int8)
    return np.ascontiguousarray(np.concatenate([codes, scale_bytes], axis=1))


def dequantize(packed):
    """float64 ``[V, H]``: the table an int8 ``[V, row_bytes(H)]`` array means (``s[v, k / 32] * q[v, k]``)."""
    import numpy as np

    packed = np.ascontiguousarray(packed, np.int8)
    v, width = packed.shape
    h = hidden_of(width)
    scale = packed[:, h:].copy().view("<f2").astype(np.float64)
    return (packed[:, :h].astype(np.float64).reshape(v, h // GROUP, GROUP) * scale[:, :, None]).reshape(v, h)


def reference(x, packed):
    """float64 numpy oracle: ``x [M, H] @ dequantize(packed)ᵀ``."""
    import numpy as np

    return np.asarray(x, np.float64) @ dequantize(packed).T
