"""The KV-cache attention kernel: append this call's keys and values to the cache, then attend, in place.

One PrimFunc per (heads, kv_heads, head_dim, scale) computes ONNX ``Attention`` (opset 23: 4-D grouped-query
heads, a boolean mask) for ``S`` new tokens against a cache that already holds ``P = T - S`` tokens, where
``T`` is the mask's last dimension. Unlike the ONNX op, which returns ``present = concat(past, new)`` (a copy
of the whole cache every step), the cache here is a fixed-capacity buffer the caller owns and the kernel
writes the new entries into it (Relax ``call_tir_inplace``); nothing is copied.

Cache layouts (chosen for the x86 inner loops; ``C`` is the capacity, a multiple of 16):

* keys ``[B, KV, D, C]`` (transposed): the score loop ``s[t] += q[d] * K[d, t]`` runs over contiguous
  ``t``, 16 keys per AVX-512 vector, with no horizontal sums;
* values ``[B, KV, C, D]``: the output loop ``y[d] += p[t] * V[t, d]`` runs over contiguous ``d``.

Parameters, in order: ``q [B, H, S, D]``, ``k [B, KV, S, D]``, ``v [B, KV, S, D]``, ``mask [MB, 1, S, T]``
(bool; ``MB`` is ``B`` or 1), ``k_cache``, ``v_cache`` (updated in place), ``y [B, H, S, D]`` (output).
Key ``t`` counts for query ``s`` when ``mask[b, 0, s, t]``; a row with no such key gives zeros (ONNX gives
NaN there; such rows are padding). Scores are accumulated over all ``T`` keys, 16 at a time, so the
capacity rounded up to 16 must cover ``T`` (asserted).
"""

from __future__ import annotations

from pbs2pc.compiler.tvm_compat import T

#: Keys per vector in the score loop (AVX-512 float32 lanes); the cache capacity is a multiple of it.
KEY_BLOCK = 16


def cached_attention(heads: int, kv_heads: int, head_dim: int, scale: float):
    """The PrimFunc for one attention shape (see the module docstring)."""
    rep = heads // kv_heads
    H, KV, D, KB = heads, kv_heads, head_dim, KEY_BLOCK
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
                 "pbs2pc attention: the KV cache is too small for this call (or its capacity is not a multiple of 16)")
        # 1. Append: the new tokens go to cache positions P .. T-1.
        for bj in T.parallel(B * KV):
            for s, d in T.grid(S, D):
                k_cache[bj // KV, bj % KV, d, TT - S + s] = k[bj // KV, bj % KV, s, d]
                v_cache[bj // KV, bj % KV, TT - S + s, d] = v[bj // KV, bj % KV, s, d]
        # 2. Attend: one (batch, query head, query) row per iteration.
        for row in T.parallel(B * H * S):
            scores = T.alloc_buffer(((TT + KB - 1) // KB * KB,), "float32", scope="local")
            acc = T.alloc_buffer((D,), "float32", scope="local")
            stat = T.alloc_buffer((2,), "float32", scope="local")  # running max, sum of exponentials
            b = row // (H * S)
            h = row // S % H
            s = row % S
            mb = T.if_then_else(MB == 1, T.int64(0), b)
            for t0 in range((TT + KB - 1) // KB):
                for t1 in T.vectorized(KB):
                    scores[t0 * KB + t1] = T.float32(0)
            for d in range(D):
                for t0 in range((TT + KB - 1) // KB):
                    for t1 in T.vectorized(KB):
                        scores[t0 * KB + t1] = scores[t0 * KB + t1] + q[b, h, s, d] * k_cache[b, h // rep, d, t0 * KB + t1]
            stat[0] = T.float32(neg_inf)
            stat[1] = T.float32(0)
            for t in range(TT):
                if mask[mb, 0, s, t]:
                    stat[0] = T.max(stat[0], scores[t])
            for t in range(TT):
                if mask[mb, 0, s, t]:
                    scores[t] = T.exp((scores[t] - stat[0]) * T.float32(scale))
                    stat[1] = stat[1] + scores[t]
                else:
                    scores[t] = T.float32(0)
            for d in T.vectorized(D):
                acc[d] = T.float32(0)
            for t in range(TT):
                for d in T.vectorized(D):
                    acc[d] = acc[d] + scores[t] * v_cache[b, h // rep, t, d]
            for d in T.vectorized(D):
                y[b, h, s, d] = T.if_then_else(stat[1] > T.float32(0), acc[d] / stat[1], T.float32(0))

    return kernel
