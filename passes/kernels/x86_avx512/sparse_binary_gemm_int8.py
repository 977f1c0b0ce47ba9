"""The int8-activation GEMM (M rows, any M) for the pbs2p sparse-binary linear op on x86 with AVX-512 VNNI.

Opt-in with ``pbs2pc compile --activations int8``, next to the int8 GEMV (``sparse_binary_gemv_int8``, the
one-row calls): the prompt's linear layers (``main``, ``prefill``) quantise their input rows to int8 and
multiply with ``vpdpbusd`` (64 byte products into 16 int32 lanes per instruction), where the fp32 TE kernel
does 16 fp32 FMAs per instruction.

Arithmetic. Exactly the GEMV's, per row: each row ``x_m`` is quantised per group of ``G`` inputs
(``s = max|x| / 127``, round half to even; the same macro), and with ``P = mask & sign``, ``M = mask``

    y[m, o] = sum_g s[m, g] * (2 alpha[o, g] * IP[m, o, g] + (mu[o, g] - alpha[o, g]) * IM[m, o, g])

with ``IP``, ``IM`` exact int32 dot products of ``q`` with the 0/1 planes. ``sparse_binary_gemv_int8
.reference`` applied to each row is its numpy oracle.

Schedule. A parallel task owns ``R`` tiles of 16 output rows. It first decodes their planes once into
bytes in the ``vpdpbusd`` layout (``[R, P | M, K/4, 64]``: 16 outputs x 4 inputs per 64 bytes, 0 or 1;
``32 K`` bytes per tile, in L2): per plane byte a ``vpermb`` spreads the 16 rows' bytes over their int32
lanes, a ``vptestmb`` against the lane's bit pattern and a zero-masked move give 4 inputs' 0/1 bytes.
Then for blocks of ``MR`` input rows, per 4 inputs: one load per tile and plane, one ``vpbroadcastd`` of
the 4 int8 inputs per row, and ``2 R MR`` ``vpdpbusd`` into int32 accumulators that are scaled into fp32
once per group. Rows past the last whole block run one at a time.
"""

from __future__ import annotations

from pbs2pc.compiler.tvm_compat import T
from pbs2pc.passes.kernels.x86_avx512.sparse_binary_gemv import (LANES, group_output, p_plane, plus_bias, row_plane,
                                                      spread_rows, tiles_per_task, without_absent)
from pbs2pc.passes.kernels.x86_avx512.sparse_binary_gemv_int8 import quantiser

#: Input rows per register block and 16-row output tiles per task: 2 x MR x R int32 accumulators. At
#: 11008x4096, M = 128, 2 threads: MR 8 x R 1 31.2 ms, 6 x 2 32.0, 3 x 4 32.4, 4 x 2 34.0, 4 x 4 38.9.
ROWS_PER_BLOCK = 8
TILES_PER_TASK = 1


def supported(out_features: int, in_features: int, group_size: int, interleave: int, plane_dtype: str) -> bool:
    """Whether the kernel covers this layer (else the fp32 TE kernel runs it)."""
    return (interleave == LANES and plane_dtype == "uint8" and out_features % LANES == 0
            and group_size % LANES == 0 and in_features % group_size == 0)


def gemm_int8(out_features: int, in_features: int, group_size: int, has_mask: bool, has_mu: bool,
              has_bias: bool):
    """The PrimFunc ``(x [M, K] f32, sign, [mask], alpha, [mu], [bias], y [M, N] f32)``, M symbolic."""
    N, K, G = out_features, in_features, group_size
    R, MR = tiles_per_task(N, TILES_PER_TASK), ROWS_PER_BLOCK
    NT, C, GB = N // LANES, K // 8, K // G
    GQ = G // 4  # 4-input quads per group
    quantise = quantiser(K, G, group_sums=not has_mask)

    def lane_bits(half):
        # bit (4 * half + i) for byte i of every int32 lane: the 4 inputs this half of the byte holds
        return T.shift_left(T.broadcast(T.uint8(1), 64), T.Cast("uint8x64", T.ramp(0, 1, 64) % 4 + 4 * half))

    def weight_bytes(bytes16, half):
        return T.Select(T.bitwise_and(spread_rows(bytes16), lane_bits(half)) != T.broadcast(T.uint8(0), 64),
                        T.broadcast(T.uint8(1), 64), T.broadcast(T.uint8(0), 64))

    def vnni(acc, weights01, q, row, k):
        # acc + the 4 int8 inputs q[row, k .. k+3] (broadcast) times the 0/1 weight bytes, per int32 lane
        quad = T.reinterpret("int32", q.vload([row, k], "int8x4"))
        return T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc, weights01,
                                       T.reinterpret("int8x64", T.broadcast(quad, 16)))

    @T.macro
    def row_block(wb, task, m0, mr, q, xs, qsum, alpha, mu, bias, y):
        # rows m0 .. m0 + mr - 1 of y for the R tiles of ``task``
        acc = T.alloc_buffer((mr, R, LANES), "float32", scope="local")
        ip = T.alloc_buffer((mr, R, LANES), "int32", scope="local")
        im = T.alloc_buffer((mr, R, LANES), "int32", scope="local")
        for i in T.unroll(mr):
            for r in T.unroll(R):
                for l in T.vectorized(LANES):
                    acc[i, r, l] = T.float32(0)
        for g in range(GB):
            for i in T.unroll(mr):
                for r in T.unroll(R):
                    for l in T.vectorized(LANES):
                        ip[i, r, l] = 0
                        im[i, r, l] = 0
            for kq in range(GQ):
                for r in T.unroll(R):
                    for i in T.unroll(mr):
                        ip[i, r, T.ramp(0, 1, LANES)] = vnni(ip.vload([i, r, 0], "int32x16"),
                                                             wb.vload([r, 0, g * GQ + kq, 0], "uint8x64"),
                                                             q, m0 + i, g * G + kq * 4)
                        if has_mask:
                            im[i, r, T.ramp(0, 1, LANES)] = vnni(im.vload([i, r, 0], "int32x16"),
                                                                 wb.vload([r, 1, g * GQ + kq, 0], "uint8x64"),
                                                                 q, m0 + i, g * G + kq * 4)
            for i in T.unroll(mr):
                for r in T.unroll(R):
                    for l in T.vectorized(LANES):
                        if not has_mask:
                            im[i, r, l] = qsum[m0 + i, g]
                        acc[i, r, l] = acc[i, r, l] + xs[m0 + i, g] * group_output(
                            alpha, mu, has_mu, task * R + r, g, l, T.Cast("float32", ip[i, r, l]),
                            T.Cast("float32", im[i, r, l]))
        for i in T.unroll(mr):
            for r in T.unroll(R):
                for l in T.vectorized(LANES):
                    y[m0 + i, (task * R + r) * LANES + l] = plus_bias(acc[i, r, l], bias, has_bias,
                                                                      (task * R + r) * LANES + l)

    @T.prim_func(private=True, check_well_formed=False)
    def kernel(var_x: T.handle, sign: T.Buffer((NT, C, LANES), "uint8"),
               mask: T.Buffer((NT, C, LANES), "uint8"), alpha: T.Buffer((NT, GB, LANES), "float16"),
               mu: T.Buffer((NT, GB, LANES), "float16"), bias: T.Buffer((N,), "float32"), var_y: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        M = T.int64()
        x = T.match_buffer(var_x, (M, K), "float32")
        y = T.match_buffer(var_y, (M, N), "float32")
        q = T.alloc_buffer((M, K), "int8")
        xs = T.alloc_buffer((M, GB), "float32")
        qsum = T.alloc_buffer((M, GB), "int32")  # IM of a layer without a mask plane: the group's sum of q
        # 1. Quantise the rows, in parallel.
        for m in T.parallel(M):
            quantise(x, m, q, xs, qsum)
        # 2. Per task: decode the planes of R tiles once, then every row block against them.
        for task in T.parallel(NT // R):
            wb = T.alloc_buffer((R, 2, K // 4, 64), "uint8")  # [tile, P | M, quad, 16 outputs x 4 inputs]
            for c in range(C):
                for r in T.unroll(R):
                    for h in T.unroll(2):
                        if has_mask:
                            wb[r, 0, 2 * c + h, T.ramp(0, 1, 64)] = weight_bytes(
                                p_plane(sign, mask, task * R + r, c, True), h)
                            wb[r, 1, 2 * c + h, T.ramp(0, 1, 64)] = weight_bytes(row_plane(mask, task * R + r, c), h)
                        else:
                            wb[r, 0, 2 * c + h, T.ramp(0, 1, 64)] = weight_bytes(row_plane(sign, task * R + r, c), h)
            for mb in range(M // MR):
                row_block(wb, task, mb * MR, MR, q, xs, qsum, alpha, mu, bias, y)
            for m in range(M // MR * MR, M):
                row_block(wb, task, m, 1, q, xs, qsum, alpha, mu, bias, y)

    return without_absent(kernel, has_mask, has_mu, has_bias)
