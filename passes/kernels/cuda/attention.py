"""The KV-cache attention kernel for CUDA: the same contract as :mod:`pbs2pc.passes.kernels.attention`.

Same parameters (``q, k, v, mask, k_cache, v_cache, y``), the same cache layouts (keys ``[B, KV, D, C]``,
values ``[B, KV, C, D]``, updated in place) and the same meaning; thread-bound TIR in two launches:

1. *append*: one block per (batch, kv head, new token), one thread per element of the head: the new keys
   and values go to cache positions ``T - S .. T - 1``;
2. *attend*: one block of :data:`THREADS` threads per (batch, kv head, query), for the ``R`` query heads
   that share the kv head. Keys are taken :data:`THREADS` at a time, one per thread: its score for every
   head (``q · K[:, t]``: the keys' layout makes the threads' loads of ``K[d, t0 .. t0 + 127]`` one
   coalesced line per ``d``) goes to shared memory, then the chunk's max and sum update a running softmax
   (flash-decoding's online rescaling), and each thread accumulates its share of the ``R x D`` outputs
   from the chunk's probabilities and the values' rows (coalesced over ``d``).

Masked keys and keys past ``T`` weigh exactly 0; a row with no unmasked key gives zeros (as on the CPU).
Every thread takes the chunk's max and sum itself (broadcast reads of the shared scores) and keeps the
running statistics in registers: no shared state is written under a condition, and the reads are small
next to the score and value loops for head sizes of 64 and more (the cost is in the reads of the cache).
"""

from __future__ import annotations

from pbs2pc.compiler.tvm_compat import T

#: Threads of the attend kernel, and keys per chunk (one per thread).
THREADS = 128


def cached_attention(heads: int, kv_heads: int, head_dim: int, scale: float, block: int = 64):
    """The PrimFunc for one attention shape; ``block`` is the CPU kernel's key block (unused here: the
    cache capacity stays a multiple of 64, which this kernel does not need)."""
    del block
    H, KV, D, NT = heads, kv_heads, head_dim, THREADS
    R = heads // kv_heads
    PAIRS = (R * D + NT - 1) // NT  # outputs (head, d) per thread
    neg = -3.4028234663852886e38

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
        T.Assert(TT <= C and S <= TT, "pbs2pc attention: the KV cache is too small for this call")
        # 1. Append.
        for row in T.thread_binding(B * KV * S, thread="blockIdx.x"):
            for d in T.thread_binding(D, thread="threadIdx.x"):
                bj = row // S
                s = row % S
                k_cache[bj // KV, bj % KV, d, TT - S + s] = k[bj // KV, bj % KV, s, d]
                v_cache[bj // KV, bj % KV, TT - S + s, d] = v[bj // KV, bj % KV, s, d]
        # 2. Attend.
        for row in T.thread_binding(B * KV * S, thread="blockIdx.x"):
            for tx in T.thread_binding(NT, thread="threadIdx.x"):
                p = T.alloc_buffer((R, NT), "float32", scope="shared")
                # Per thread, for every head: running max, running sum, the chunk's rescale (every thread
                # keeps its own copy: no shared state written under a condition, so no divergent syncs).
                stat = T.alloc_buffer((R, 3), "float32", scope="local")
                acc = T.alloc_buffer((PAIRS,), "float32", scope="local")
                sc = T.alloc_buffer((1,), "float32", scope="local")
                b = row // (KV * S)
                j = row // S % KV
                s = row % S
                h0 = j * R
                mb = T.if_then_else(MB == 1, T.int64(0), b)
                for i in range(PAIRS):
                    acc[i] = T.float32(0)
                for r in range(R):
                    stat[r, 0] = T.float32(neg)
                    stat[r, 1] = T.float32(0)
                for c in range((TT + NT - 1) // NT):
                    # Scores of this thread's key for every head.
                    for r in range(R):
                        sc[0] = T.float32(0)
                        if c * NT + tx < TT:
                            for d in range(D):
                                sc[0] = sc[0] + q[b, h0 + r, s, d] * k_cache[b, j, d, c * NT + tx]
                        p[r, tx] = T.if_then_else(
                            c * NT + tx < TT and mask[mb, 0, s, T.min(c * NT + tx, TT - 1)],
                            sc[0] * T.float32(scale), T.float32(neg))
                    T.tvm_storage_sync("shared")
                    # The chunk's max (a broadcast read of the shared row): new running max and rescale.
                    for r in range(R):
                        sc[0] = stat[r, 0]
                        for i in range(NT):
                            sc[0] = T.max(sc[0], p[r, i])
                        stat[r, 2] = T.exp(stat[r, 0] - sc[0])
                        stat[r, 0] = sc[0]
                    T.tvm_storage_sync("shared")
                    for r in range(R):
                        p[r, tx] = T.if_then_else(p[r, tx] > T.float32(neg), T.exp(p[r, tx] - stat[r, 0]),
                                                  T.float32(0))
                    T.tvm_storage_sync("shared")
                    for r in range(R):
                        sc[0] = T.float32(0)
                        for i in range(NT):
                            sc[0] = sc[0] + p[r, i]
                        stat[r, 1] = stat[r, 1] * stat[r, 2] + sc[0]
                    # Values: this thread's (head, d) outputs over the chunk's keys.
                    for i in range(PAIRS):
                        if i * NT + tx < R * D:
                            acc[i] = acc[i] * stat[(i * NT + tx) // D, 2]
                            for t in range(T.min(NT, TT - c * NT)):
                                acc[i] = acc[i] + p[(i * NT + tx) // D, t] * v_cache[
                                    b, j, c * NT + t, (i * NT + tx) % D]
                    T.tvm_storage_sync("shared")
                for i in range(PAIRS):
                    if i * NT + tx < R * D:
                        y[b, h0 + (i * NT + tx) // D, s, (i * NT + tx) % D] = T.if_then_else(
                            stat[(i * NT + tx) // D, 1] > T.float32(0),
                            acc[i] / stat[(i * NT + tx) // D, 1], T.float32(0))

    return kernel
