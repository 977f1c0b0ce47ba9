"""The int8-activation GEMV (M = 1) for the pbs2p sparse-binary linear op on x86 with AVX-512 VNNI.

Opt-in (``pbs2pc compile --activations int8``): the one-token ``decode`` entry's linear layers quantise
their input to int8 and multiply with ``vpdpbusd`` (64 byte products summed into 16 int32 lanes per
instruction), where the fp32 GEMV (``sparse_binary_linear`` + the CPU schedule rule) spends about four
vector instructions per 16 weights. The prompt (``main``/``prefill``, M > 1) keeps fp32 activations.

Arithmetic. Per group ``g`` of ``G`` inputs, the activation is quantised symmetrically:
``s_g = max|x_g| / 127``, ``q = round_half_even(x * (127 / max|x_g|))`` (0 where the group is all zeros).
With ``P = mask & sign`` and ``M = mask`` as 0/1 planes, a weight is
``mask * (alpha * (2 sign - 1) + mu) = 2 alpha P + (mu - alpha) M``, so

    y[o] = sum_g s_g * (2 alpha[o, g] * IP[o, g] + (mu[o, g] - alpha[o, g]) * IM[o, g])

where ``IP = sum_k q_k P[o, k]`` and ``IM = sum_k q_k M[o, k]`` are exact int32 dot products. The only
error against the fp32 op is the rounding of ``x`` to 8 bits per group (see docs/performance.md for its
perplexity cost); :func:`reference` is the numpy oracle of exactly this arithmetic.

Layout. The kernel reads the x86 target layout as it is (no second copy of the weights): sign and mask
bytes row-interleaved ``[N/16, K/8, 16]`` (byte ``[t, c, j]`` holds bits ``8c .. 8c+7`` of row
``16t + j``) and fp16 scales ``[N/16, K/G, 16]``. Per 16 rows and 8 columns, one 16-byte load per plane;
a byte shuffle spreads each row's byte over the four bytes of its int32 lane, a ``vptestmb`` against the
lane's bit pattern selects four columns, and the selected 0/1 bytes meet the four broadcast activations
in one ``vpdpbusd``. ``R`` tiles of 16 rows per parallel task give ``2R`` independent accumulator chains.
"""

from __future__ import annotations

from pbs2pc.compiler.tvm_compat import T, tirx

#: Rows per vector (int32 lanes of a zmm register) and the row interleave the kernel reads.
LANES = 16
#: 16-row tiles per parallel task (2 x 2 accumulator chains); 1, 2 and 4 measured within noise at 11008x4096.
TILES_PER_TASK = 2


def supported(out_features: int, in_features: int, group_size: int, interleave: int, plane_dtype: str) -> bool:
    """Whether the kernel covers this layer (else the fp32 kernel runs it)."""
    return (interleave == LANES and plane_dtype == "uint8" and out_features % LANES == 0
            and group_size % LANES == 0 and in_features % group_size == 0)


def _tiles_per_task(out_features: int) -> int:
    tiles = out_features // LANES
    return next(r for r in (TILES_PER_TASK, 1) if tiles % r == 0)


def gemv_int8(out_features: int, in_features: int, group_size: int, has_mask: bool, has_mu: bool,
              has_bias: bool):
    """The PrimFunc ``(x [1, K] f32, sign, [mask], alpha, [mu], [bias], y [1, N] f32)`` for one layer shape."""
    N, K, G = out_features, in_features, group_size
    NT, C, GB = N // LANES, K // 8, K // G
    R = _tiles_per_task(N)
    CG = G // 8  # plane bytes per row per group
    spread = [j // 4 for j in range(64)]  # byte 4j + i of the zmm <- row j's byte

    def lane_bits(half):
        # bit (4 * half + i) for byte i of every int32 lane: the four columns this half of the byte holds
        return T.shift_left(T.broadcast(T.uint8(1), 64),
                            T.Cast("uint8x64", T.ramp(0, 1, 64) % 4 + 4 * half))

    def select_bytes(bytes16, half):
        wide = T.Shuffle([bytes16] * 4, spread)  # Shuffle cannot widen: index into four copies
        return T.Select(T.bitwise_and(wide, lane_bits(half)) != T.broadcast(T.uint8(0), 64),
                        T.broadcast(T.uint8(1), 64), T.broadcast(T.uint8(0), 64))

    def row_bytes(plane, tile, col):
        # the plane byte at column byte ``col`` of the 16 rows of ``tile``: one 128-bit load
        return plane.vload([tile, col, 0], "uint8x16")

    def quad(xq, k):
        # x[k .. k+3] (int8) as one int32, to broadcast to every lane
        return T.reinterpret("int32", xq.vload([k], "int8x4"))

    def vnni(acc, weights01, xq4):
        return T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc, weights01,
                                       T.reinterpret("int8x64", T.broadcast(xq4, 16)))

    @T.prim_func(private=True, check_well_formed=False)
    def kernel(x: T.Buffer((1, K), "float32"), sign: T.Buffer((NT, C, LANES), "uint8"),
               mask: T.Buffer((NT, C, LANES), "uint8"), alpha: T.Buffer((NT, GB, LANES), "float16"),
               mu: T.Buffer((NT, GB, LANES), "float16"), bias: T.Buffer((N,), "float32"),
               y: T.Buffer((1, N), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        xq = T.alloc_buffer((K,), "int8")
        xs = T.alloc_buffer((GB,), "float32")
        # 1. Quantise x per group (serial: K elements, a few microseconds, not worth a parallel launch).
        for g in range(GB):
            peak = T.alloc_buffer((LANES,), "float32", scope="local")
            amax = T.alloc_buffer((2,), "float32", scope="local")
            for l in T.vectorized(LANES):
                peak[l] = T.float32(0)
            for k0 in range(G // LANES):
                for l in T.vectorized(LANES):
                    peak[l] = T.max(peak[l], T.fabs(x[0, g * G + k0 * LANES + l]))
            amax[0] = T.float32(0)
            for l in range(LANES):
                amax[0] = T.max(amax[0], peak[l])
            xs[g] = amax[0] / T.float32(127)
            amax[1] = T.if_then_else(amax[0] > T.float32(0), T.float32(127) / amax[0], T.float32(0))
            for k in T.vectorized(G):
                xq[g * G + k] = T.Cast("int8", T.round(x[0, g * G + k] * amax[1]))
        # 2. The GEMV: R tiles of 16 rows per task, two int32 dot products per tile and group.
        for task in T.parallel(NT // R):
            acc = T.alloc_buffer((R, LANES), "float32", scope="local")
            ip = T.alloc_buffer((R, LANES), "int32", scope="local")
            im = T.alloc_buffer((R, LANES), "int32", scope="local")
            for r in T.unroll(R):
                for l in T.vectorized(LANES):
                    acc[r, l] = T.float32(0)
            for g in range(GB):
                for r in T.unroll(R):
                    for l in T.vectorized(LANES):
                        ip[r, l] = 0
                        im[r, l] = 0
                for c in range(CG):
                    for h in T.unroll(2):
                        for r in T.unroll(R):
                            if has_mask:
                                ip[r, T.ramp(0, 1, LANES)] = vnni(
                                    ip.vload([r, 0], "int32x16"),
                                    select_bytes(T.bitwise_and(row_bytes(sign, task * R + r, g * CG + c),
                                                               row_bytes(mask, task * R + r, g * CG + c)), h),
                                    quad(xq, g * G + c * 8 + h * 4))
                                im[r, T.ramp(0, 1, LANES)] = vnni(
                                    im.vload([r, 0], "int32x16"),
                                    select_bytes(row_bytes(mask, task * R + r, g * CG + c), h),
                                    quad(xq, g * G + c * 8 + h * 4))
                            else:
                                ip[r, T.ramp(0, 1, LANES)] = vnni(
                                    ip.vload([r, 0], "int32x16"),
                                    select_bytes(row_bytes(sign, task * R + r, g * CG + c), h),
                                    quad(xq, g * G + c * 8 + h * 4))
                                im[r, T.ramp(0, 1, LANES)] = vnni(  # no mask plane: every weight is kept
                                    im.vload([r, 0], "int32x16"), T.broadcast(T.uint8(1), 64),
                                    quad(xq, g * G + c * 8 + h * 4))
                for r in T.unroll(R):
                    for l in T.vectorized(LANES):
                        if has_mu:
                            acc[r, l] = acc[r, l] + xs[g] * (
                                T.float32(2) * T.Cast("float32", alpha[task * R + r, g, l]) * T.Cast("float32", ip[r, l])
                                + (T.Cast("float32", mu[task * R + r, g, l]) - T.Cast("float32", alpha[task * R + r, g, l]))
                                * T.Cast("float32", im[r, l]))
                        else:
                            acc[r, l] = acc[r, l] + xs[g] * T.Cast("float32", alpha[task * R + r, g, l]) * (
                                T.float32(2) * T.Cast("float32", ip[r, l]) - T.Cast("float32", im[r, l]))
            for r in T.unroll(R):
                for l in T.vectorized(LANES):
                    if has_bias:
                        y[0, (task * R + r) * LANES + l] = acc[r, l] + bias[(task * R + r) * LANES + l]
                    else:
                        y[0, (task * R + r) * LANES + l] = acc[r, l]

    # Drop the parameters this layer does not have (the body never reads them).
    keep = [True, True, has_mask, True, has_mu, has_bias, True]
    params = [p for p, k in zip(kernel.params, keep) if k]
    return tirx.PrimFunc(params, kernel.body, kernel.ret_type, kernel.attrs)


def reference(x, sign, mask, alpha, mu, bias, group_size: int):
    """numpy oracle of :func:`gemv_int8` on the interchange layout (``sign``/``mask`` uint8 ``[N, K/8]``,
    scales ``[N, K/G]``): the same per-group quantisation of ``x`` ``[K]``, then exact integer dots."""
    import numpy as np

    g = group_size
    x = np.asarray(x, np.float32).reshape(-1, g)
    amax = np.abs(x).max(axis=1)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.round(x * inv[:, None]).astype(np.int64)  # half to even, as the kernel
    scale = (amax / np.float32(127)).astype(np.float32)
    s = np.unpackbits(sign, axis=1, bitorder="little").astype(np.int64)
    m = np.ones_like(s) if mask is None else np.unpackbits(mask, axis=1, bitorder="little").astype(np.int64)
    n = s.shape[0]
    ip = ((s & m).reshape(n, -1, g) * q[None]).sum(-1)
    im = (m.reshape(n, -1, g) * q[None]).sum(-1)
    a = alpha.astype(np.float64)
    u = np.zeros_like(a) if mu is None else mu.astype(np.float64)
    y = (scale[None].astype(np.float64) * (2 * a * ip + (u - a) * im)).sum(-1)
    return y if bias is None else y + bias
