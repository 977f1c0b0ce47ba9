"""The LM head on a vocabulary table stored in int8 (``pbs2pc compile --lm-head int8``): ``y = x @ Wᵀ``.

A quarter of the fp32 table's bytes (SmolLM2-135M's tied 49152 x 576 table: 113 MB in fp32, 56.6 MB in
fp16, 28.5 MB here), for the largest read of a decode step.

Layout: one int8 tensor ``[V, H + 4]``. Row ``v`` holds the table row quantised symmetrically,
``q[v, k] = round_half_even(W[v, k] / s[v])`` in ``[-127, 127]`` with ``s[v] = max_k |W[v, k]| / 127``
(fp32), then the 4 bytes of ``s[v]`` (IEEE fp32, little-endian, whatever the host): the row means
``W[v, :] ~ s[v] * q[v, :]``. One parameter, so the token lookup takes whole rows (codes and scale
together) with an ordinary ``take``, and the weights file, the manifest and the params-transform record
describe one array (:func:`quantize` is the array transform).

Arithmetic of the head (:func:`lm_head_int8`): x stays fp32. For each table row, ``LANES`` int8 codes at a
time are sign-extended and converted in registers (``vpmovsxbd`` + ``vcvtdq2ps``, 8 per ymm on AVX2, 16
per zmm on AVX-512) and multiplied into an fp32 vector sum with ``x`` (FMA); the sum is reduced to a
scalar by halving the vector, then multiplied once by the row's scale: ``y[m, v] = s[v] * sum_k x[m, k] *
q[v, k]``, the product with the dequantised table up to fp32 rounding (:func:`reference` is the float64
oracle). The loops are the fp16 kernel's (``lm_head_fp16``): ``STEP`` rows side by side, the K loop
unrolled, the rows of the next step prefetched into L2. Needs ``H % 16 == 0`` and ``V % 4 == 0``.

:func:`dequantize_rows` converts ``N`` rows (symbolic) back to fp32: the token lookup (the rows taken)
and ``main``'s head (the whole table, once per call).
"""

from __future__ import annotations

from pbs2pc.compiler.tvm_compat import T
from pbs2pc.passes.kernels.lm_head_fp16 import K_UNROLL, PREFETCH_LOCALITY, ROWS_PER_TASK, _sum_lanes

#: fp32 lanes of one vector of the sums (a zmm register; two ymm on AVX2).
LANES = 16
#: Table rows whose sums run side by side (as in the fp16 kernel).
STEP = 2
#: Rows ahead prefetched into L2 (the next step's).
PREFETCH_ROWS = STEP
#: Bytes of the scale stored after each row's codes (an fp32).
SCALE_BYTES = 4
#: The name the params transform gives the dequantising PrimFunc (LowerLMHead finds the table by it).
DEQUANTIZE = "lm_head_int8_dequantize"


def supported(vocab: int, hidden: int) -> bool:
    """Whether the kernels cover a ``[vocab, hidden]`` table."""
    return hidden % LANES == 0 and vocab % 4 == 0


def _rows_per_task(vocab: int) -> int:
    return next(r for r in (ROWS_PER_TASK, 32, 16, 8, 4) if vocab % r == 0)


def _scale(rows, row, hidden: int):
    """The fp32 scale stored little-endian in bytes ``hidden .. hidden + 3`` of ``rows[row]``."""
    bits = T.int32(0)
    for i in range(SCALE_BYTES):
        byte = T.bitwise_and(T.Cast("int32", rows[row, hidden + i]), T.int32(255))
        bits = T.bitwise_or(bits, T.shift_left(byte, T.int32(8 * i)))
    return T.reinterpret("float32", bits)


def _prefetch(table, row, col):
    """Prefetch the cache line of ``table[row, col]`` into L2 (it never faults; ``row`` is kept in range)."""
    return T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(table[row, col]), T.int32(0),
                                         T.int32(PREFETCH_LOCALITY), T.int32(1)))


def lm_head_int8(vocab: int, hidden: int):
    """The PrimFunc ``(x [M, H] f32, table [V, H + 4] i8, y [M, V] f32)``, M symbolic:
    ``y = x @ dequantize(table)ᵀ`` (see the module docstring)."""
    V, H = vocab, hidden
    W = H + SCALE_BYTES
    RT = _rows_per_task(V)
    KU = next(u for u in K_UNROLL if (H // LANES) % u == 0)
    LINES = (KU * LANES + 63) // 64  # 64-byte lines of one unrolled K block of one row

    @T.prim_func(private=True, check_well_formed=False)
    def kernel(var_x: T.handle, table: T.Buffer((V, W), "int8"), var_y: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        M = T.int64()
        x = T.match_buffer(var_x, (M, H), "float32")
        y = T.match_buffer(var_y, (M, V), "float32")
        for m in range(M):
            for task in T.parallel(V // RT):
                acc = T.alloc_buffer((STEP, LANES), "float32", scope="local")
                for s in range(RT // STEP):
                    for r in T.unroll(STEP):
                        for l in T.vectorized(LANES):
                            acc[r, l] = T.float32(0)
                    for ko in range(H // LANES // KU):
                        for line in T.unroll(LINES):
                            for r in T.unroll(STEP):
                                _prefetch(table, T.min(task * RT + s * STEP + r + PREFETCH_ROWS, V - 1),
                                          ko * KU * LANES + 64 * line)
                        for ki in T.unroll(KU):
                            for r in T.unroll(STEP):
                                for l in T.vectorized(LANES):
                                    acc[r, l] = acc[r, l] + x[m, (ko * KU + ki) * LANES + l] * T.Cast(
                                        "float32", table[task * RT + s * STEP + r, (ko * KU + ki) * LANES + l])
                    for r in T.unroll(STEP):
                        y[m, task * RT + s * STEP + r] = (_sum_lanes(acc.vload([r, 0], "float32x16"))
                                                          * _scale(table, task * RT + s * STEP + r, H))

    return kernel


def dequantize_rows(hidden: int):
    """The PrimFunc ``(rows [N, H + 4] i8, out [N, H] f32)``, N symbolic: ``out[n] = s[n] * q[n]``."""
    H = hidden
    W = H + SCALE_BYTES

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
                scale[0] = _scale(rows, n, H)
                for ko in range(H // LANES):
                    for l in T.vectorized(LANES):
                        out[n, ko * LANES + l] = T.Cast("float32", rows[n, ko * LANES + l]) * scale[0]

    return kernel


def quantize(table):
    """The array transform: a float ``[V, H]`` table -> the int8 ``[V, H + 4]`` layout of the module
    docstring (codes, then the row's fp32 scale little-endian). An all-zero row gets scale 0."""
    import numpy as np

    w = np.asarray(table, np.float32)
    amax = np.abs(w).max(axis=1, keepdims=True)
    scale = (amax / np.float32(127)).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1))
    codes = np.clip(np.rint(w / safe), -127, 127).astype(np.int8)  # rint: round half to even
    scale_bytes = scale.astype("<f4").view(np.int8).reshape(w.shape[0], SCALE_BYTES)
    return np.ascontiguousarray(np.concatenate([codes, scale_bytes], axis=1))


def dequantize(packed):
    """float64 ``[V, H]``: the table an int8 ``[V, H + 4]`` array means (``s[v] * q[v, k]``)."""
    import numpy as np

    packed = np.ascontiguousarray(packed, np.int8)
    scale = packed[:, -SCALE_BYTES:].copy().view("<f4").astype(np.float64)
    return packed[:, :-SCALE_BYTES].astype(np.float64) * scale


def reference(x, packed):
    """float64 numpy oracle: ``x [M, H] @ dequantize(packed)ᵀ``."""
    import numpy as np

    return np.asarray(x, np.float64) @ dequantize(packed).T
