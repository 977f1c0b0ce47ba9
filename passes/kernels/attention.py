"""The KV-cache attention kernel: append this call's keys and values to the cache, then attend, in place.

One PrimFunc per (heads, kv_heads, head_dim, scale) computes ONNX ``Attention`` (opset 23: 4-D grouped-query
heads, a boolean mask) for ``S`` new tokens against a cache that already holds ``P = T - S`` tokens, where
``T`` is the mask's last dimension. Unlike the ONNX op, which returns ``present = concat(past, new)`` (a copy
of the whole cache every step), the cache here is a fixed-capacity buffer the caller owns and the kernel
writes the new entries into it (Relax ``call_tir_inplace``); nothing is copied.

Cache layouts (chosen for the x86 inner loops; ``C`` is the capacity, a multiple of 64):

* keys ``[B, KV, D, C]`` (transposed): the score loop ``s[t] += q[d] * K[d, t]`` runs over contiguous
  ``t``, a block of 64 keys (four AVX-512 vectors) accumulated in registers over ``d``, with no
  horizontal sums;
* values ``[B, KV, C, D]``: the output loop ``y[d] += p[t] * V[t, d]`` runs over contiguous ``d``.

Parameters, in order: ``q [B, H, S, D]``, ``k [B, KV, S, D]``, ``v [B, KV, S, D]``, ``mask [MB, 1, S, T]``
(bool; ``MB`` is ``B`` or 1), ``k_cache``, ``v_cache`` (updated in place), ``y [B, H, S, D]`` (output).
Key ``t`` counts for query ``s`` when ``mask[b, 0, s, t]``; a row with no such key gives zeros (ONNX gives
NaN there; such rows are padding). Scores are computed for whole blocks of 64 keys, so ``T`` rounded up to
64 must fit in the capacity (asserted). The softmax's exponential is a vectorised polynomial (relative
error below 2e-7), since LLVM would otherwise call ``expf`` once per key.

Each parallel row is one (batch, kv head, query) and computes the query heads that share the kv head, so
every key and value is loaded once for all of them; rows stop at their last unmasked key, which halves
the work of a causal prompt. Measured on SmolLM2's shapes (9 query / 3 kv heads, head_dim 64, 2 threads):
a 512-token prompt took 22.6 ms per layer with the first version (one row per query head, the score row
re-read for every ``d``, scalar ``expf``, all keys) and takes 5.5 ms with this one; one decode step at
512 cached tokens 93 -> 50 us per layer. Since then, on a 2-vCPU AVX-512 Xeon (2 threads, the two versions in
turns, 7 rounds, the same bits): masked keys get -inf in the vectorised store of their score block, not in a
scalar pass over the row's T booleans (a 512-token prompt 2.76 -> 2.61 ms per layer), and a row's fixed-size
buffers are plain allocations in the parallel loop, which TVM makes stack allocas, not ``scope="local"``
ones, which became workspace allocations per row (13 of them): 128-token prompt 349 -> 294 us per layer,
512-token 2.74 -> 2.44 ms, a decode step at 512 cached tokens 11.6 -> 10.7 us.
"""

from __future__ import annotations

from pbs2pc.compiler.tvm_compat import T

#: Keys per score block: four AVX-512 float32 vectors, so four independent FMA chains hide the latency.
#: The cache capacity is a multiple of it (the score loop reads whole blocks of keys).
KEY_BLOCK = 64


def key_block(target=None) -> int:
    """Keys per score block for ``target`` (default: the current target): :data:`KEY_BLOCK` on x86, where it
    was measured; four 4-lane vectors (16 keys) on NEON, where 64 keys would hold 16 accumulator registers per
    query head, more than the 32 registers for SmolLM2's 3 query heads per kv head (spills in every block).
    Either divides :data:`KEY_BLOCK`, the cache capacity's multiple."""
    from pbs2pc.passes.schedules.cpu_utils import vector_lanes
    from pbs2pc.compiler.tvm_compat import Target

    target = target or Target.current(allow_none=True)
    if target is None or target.kind.name != "llvm":
        return KEY_BLOCK
    lanes = vector_lanes(target)
    return KEY_BLOCK if lanes >= 8 else 4 * lanes

def builder(target=None):
    """The attention kernel builder for ``target`` (default: the current target): this module's
    :func:`cached_attention` on CPUs, :func:`pbs2pc.passes.kernels.cuda.attention.cached_attention` on CUDA
    (both take ``(heads, kv_heads, head_dim, scale, block)`` and share the cache layouts)."""
    from pbs2pc.compiler.tvm_compat import Target

    target = target or Target.current(allow_none=True)
    if target is not None and target.kind.name == "cuda":
        from pbs2pc.passes.kernels.cuda.attention import cached_attention as cuda_attention

        return cuda_attention
    return cached_attention


_LOG2E = 1.4426950408889634
_LN2_HI, _LN2_LO = 0.693145751953125, 1.428606765330187e-06  # Cody-Waite split of ln 2


def cached_attention(heads: int, kv_heads: int, head_dim: int, scale: float, block: int = KEY_BLOCK):
    """The PrimFunc for one attention shape (see the module docstring); ``block``: keys per score block
    (:func:`key_block`), a divisor of :data:`KEY_BLOCK`."""
    assert KEY_BLOCK % block == 0, block
    H, KV, D, KB = heads, kv_heads, head_dim, block
    R = heads // kv_heads  # query heads per kv head
    neg_inf = -3.4028234663852886e38

    @T.prim_func(private=True, check_well_formed=False)
    def kernel(q_h: T.handle, k_h: T.handle, v_h: T.handle, mask_h: T.handle, kc_h: T.handle,
               vc_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        B, S, TT, C, MB = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        q = T.match_buffer(q_h, (B, H, S, D), "float32")
        k = T.match_buffer(k_h, (B, KV, S, D), "float32")
        v = T.match_buffer(v_h, (B, KV, S, D), "float32")
        mask = T.match_buffer(mask_h, (MB, 1, S, TT), "bool")
        k_cache = T.match_buffer(kc_h, (B, KV, D, C), "float32")
        v_cache = T.match_buffer(vc_h, (B, KV, C, D), "float32")
        y = T.match_buffer(y_h, (B, H, S, D), "float32")
        T.Assert(C % KB == 0 and (TT + KB - 1) // KB * KB <= C and S <= TT,
                 "pbs2pc attention: the KV cache is too small for this call (or its capacity is not a multiple of 64)")
        # 1. Append: the new tokens go to cache positions P .. T-1.
        for bj in T.parallel(B * KV):
            for s, d in T.grid(S, D):
                k_cache[bj // KV, bj % KV, d, TT - S + s] = k[bj // KV, bj % KV, s, d]
                v_cache[bj // KV, bj % KV, TT - S + s, d] = v[bj // KV, bj % KV, s, d]
        # 2. Attend: one (batch, kv head, query) row per iteration, for the R query heads that share the
        # kv head, so each key and value is loaded once for all of them.
        for row in T.parallel(B * KV * S):
            scores = T.alloc_buffer((R, (TT + KB - 1) // KB * KB), "float32", scope="local")
            block = T.alloc_buffer((R, KB), "float32")  # one block of scores per head, in registers
            part = T.alloc_buffer((R, KB), "float32")  # per-lane max, then per-lane sum
            acc = T.alloc_buffer((R, D), "float32")
            stat = T.alloc_buffer((R, 2), "float32")  # max, sum of exponentials
            # exp's x and n per lane. (Not let-bindings: TVM 0.27's vectorizer broadcasts lane 0 of a
            # let-bound value inside a vectorized loop.)
            ex = T.alloc_buffer((KB,), "float32")
            en = T.alloc_buffer((KB,), "float32")
            b = row // (KV * S)
            j = row // S % KV
            s = row % S
            h0 = j * R  # first query head of the row
            mb = T.if_then_else(MB == 1, T.int64(0), b)
            # Keys after the row's last unmasked one contribute nothing: stop there (halves causal prefill).
            last = T.alloc_buffer((1,), "int64")
            last[0] = T.int64(0)
            for t in range(TT):
                if mask[mb, 0, s, t]:
                    last[0] = t + 1
            blocks = (last[0] + KB - 1) // KB
            # Scores, one block of keys at a time: q[h, d] broadcast times a contiguous row of Kᵀ.
            for t0 in range(blocks):
                for r in T.unroll(R):
                    for i in T.vectorized(KB):
                        block[r, i] = T.float32(0)
                for d in range(D):
                    for r in T.unroll(R):
                        for i in T.vectorized(KB):
                            block[r, i] = block[r, i] + q[b, h0 + r, s, d] * k_cache[b, j, d, t0 * KB + i]
                # Masked keys and the block's tail past T get -inf, in the same vectorised store.
                for r in T.unroll(R):
                    for i in T.vectorized(KB):
                        scores[r, t0 * KB + i] = T.Select(
                            t0 * KB + i < TT and mask[mb, 0, s, T.min(t0 * KB + i, TT - 1)],
                            block[r, i] * T.float32(scale), T.float32(neg_inf))
            for r in range(R):
                for i in T.vectorized(KB):
                    part[r, i] = T.float32(neg_inf)
                for t0 in range(blocks):
                    for i in T.vectorized(KB):
                        part[r, i] = T.max(part[r, i], scores[r, t0 * KB + i])
                stat[r, 0] = T.float32(neg_inf)
                for i in range(KB):
                    stat[r, 0] = T.max(stat[r, 0], part[r, i])
                # exp(score - max), vectorised: 2^n * p(x - n ln2) with |x - n ln2| <= ln2 / 2, p the degree-6
                # Taylor polynomial (relative error < 2e-7); masked keys (x below -80) give exactly 0.
                for i in T.vectorized(KB):
                    part[r, i] = T.float32(0)
                for t0 in range(blocks):
                    for i in T.vectorized(KB):
                        ex[i] = T.max(scores[r, t0 * KB + i] - stat[r, 0], T.float32(-87.0))
                    for i in T.vectorized(KB):
                        en[i] = T.floor(ex[i] * T.float32(_LOG2E) + T.float32(0.5))
                    for i in T.vectorized(KB):
                        block[r, i] = ex[i] - en[i] * T.float32(_LN2_HI) - en[i] * T.float32(_LN2_LO)
                    for i in T.vectorized(KB):
                        scores[r, t0 * KB + i] = T.Select(
                            ex[i] < T.float32(-80.0), T.float32(0),
                            (T.float32(1) + block[r, i] * (T.float32(1) + block[r, i] * (T.float32(0.5) + block[r, i] * (
                                T.float32(1 / 6) + block[r, i] * (T.float32(1 / 24) + block[r, i] * (
                                    T.float32(1 / 120) + block[r, i] * T.float32(1 / 720)))))))
                            * T.reinterpret("float32", T.shift_left(T.Cast("int32", en[i]) + T.int32(127), T.int32(23))))
                    for i in T.vectorized(KB):
                        part[r, i] = part[r, i] + scores[r, t0 * KB + i]
                stat[r, 1] = T.float32(0)
                for i in range(KB):
                    stat[r, 1] = stat[r, 1] + part[r, i]
            # Weighted sum of values: each value row is loaded once and feeds the row's heads' chains.
            for r in T.unroll(R):
                for d in T.vectorized(D):
                    acc[r, d] = T.float32(0)
            for t in range(last[0]):
                for r in T.unroll(R):
                    for d in T.vectorized(D):
                        acc[r, d] = acc[r, d] + scores[r, t] * v_cache[b, j, t, d]
            for r in T.unroll(R):
                for d in T.vectorized(D):
                    y[b, h0 + r, s, d] = T.if_then_else(stat[r, 1] > T.float32(0), acc[r, d] / stat[r, 1],
                                                           T.float32(0))

    return kernel

