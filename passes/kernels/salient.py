"""The salient columns of an op contract v2 layer, listed per call for the kernels that walk them.

A v2 layer's ``salient`` plane (uint8 ``[1, K/8]``, bit ``k % 8`` of byte ``k / 8``) marks the columns that carry
the residual plane. The one-token GEMVs (x86-avx2, NEON) walk each scale group's salient columns per tile;
:func:`salient_lister` is the listing they share, run once per call before the tiles.
"""

from __future__ import annotations

from pbs2pc.compiler.tvm_compat import T, tirx


def salient_lister(in_features: int, group_size: int):
    """A TVMScript macro ``list_salient(salient, cols, start, count)``: the salient columns in order into ``cols``
    (int32 ``[K]``), scale group ``g``'s as ``cols[start[g]:start[g + 1]]`` (``start`` int32 ``[K/G + 1]``);
    ``count`` is an int32 ``[1]`` scratch."""
    K, G = in_features, group_size
    GB = K // G

    @T.macro
    def list_salient(salient, cols, start, count):
        count[0] = 0
        for g in range(GB):
            start[g] = count[0]
            for k in range(G):
                if tirx.NE(T.bitwise_and(T.shift_right(salient[0, (g * G + k) // 8], T.uint8(k % 8)), T.uint8(1)),
                           T.uint8(0)):
                    cols[count[0]] = g * G + k
                    count[0] = count[0] + 1
        start[GB] = count[0]

    return list_salient
