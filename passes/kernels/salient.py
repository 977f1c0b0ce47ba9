"""The salient columns of an op contract v2 layer, listed per call for the kernels that walk them.

A v2 layer's ``salient`` plane (uint8 ``[1, K/8]``, bit ``k % 8`` of byte ``k / 8``) marks the columns that carry
the residual plane. The one-token GEMVs (x86-avx512, x86-avx2, NEON) walk each scale group's salient columns
per tile; :func:`salient_lister` is the listing they share, run once per call before the tiles.

The listing scans the plane a word at a time (64 columns where the scale group has them) and takes each set
bit with a count of trailing zeros, so a call costs one step per word and one per salient column (about a
sixteenth of the columns in a BiLLM-style layer), not one test and branch per column.
"""

from __future__ import annotations

import math

from pbs2pc.compiler.tvm_compat import T, tirx


def word_bytes(group_size: int) -> int:
    """Plane bytes the listing reads at a time: 8 (64 columns), fewer where a scale group has fewer (a word
    never straddles two groups)."""
    return math.gcd(group_size // 8, 8)


def salient_lister(in_features: int, group_size: int, relative: bool = False, inputs: bool = False):
    """A TVMScript macro ``list_salient(salient, cols, start, count, word[, x, xs])``: the salient columns in
    order into ``cols`` (int32 ``[K]``), scale group ``g``'s as ``cols[start[g]:start[g + 1]]`` (``start`` int32
    ``[K/G + 1]``); ``count`` (int32 ``[1]``) and ``word`` (uint64 ``[1]``) are scratch. ``relative``: each
    column within its scale group (``k - g G``), else in the row. ``inputs``: also each column's input
    ``x[0, k]`` into ``xs`` (float32 ``[K]``; filled here, as a loop of its own becomes a gather)."""
    K, G = in_features, group_size
    GB, WB = K // G, word_bytes(group_size)
    WPG = G // (8 * WB)  # words per scale group

    def load(salient, g, w):
        at = g * (G // 8) + w * WB
        if WB == 1:
            return T.Cast("uint64", salient[0, at])
        return T.Cast("uint64", T.reinterpret(f"uint{8 * WB}", salient.vload([0, at], f"uint8x{WB}")))

    def lowest_bit(value):
        return T.Cast("int32", T.call_llvm_pure_intrin("uint64", "llvm.cttz.i64", value, T.bool(False)))

    @T.macro
    def list_salient(salient, cols, start, count, word, x=None, xs=None):
        count[0] = 0
        for g in range(GB):
            start[g] = count[0]
            for w in range(WPG):
                word[0] = load(salient, g, w)
                while tirx.NE(word[0], T.uint64(0)):
                    cols[count[0]] = (0 if relative else g * G) + w * (8 * WB) + lowest_bit(word[0])
                    if inputs:
                        xs[count[0]] = x[0, (g * G if relative else 0) + cols[count[0]]]
                    count[0] = count[0] + 1
                    word[0] = T.bitwise_and(word[0], word[0] - T.uint64(1))
        start[GB] = count[0]

    return list_salient
