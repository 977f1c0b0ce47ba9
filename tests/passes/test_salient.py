"""The salient-column listing the v2 GEMVs share (``passes/kernels/salient.py``), against numpy.

It scans the plane a word at a time (1, 2, 4 or 8 bytes: what divides a scale group) and takes the set bits
with a count of trailing zeros; each case here is checked against ``np.flatnonzero`` of the unpacked
plane: groups with no salient column, dense words, the top bit of a 64-bit word, and each word width.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pbs2pc.compiler.tvm_compat")

from pbs2pc.compiler.tvm_compat import T, tvm  # noqa: E402
from pbs2pc.passes.kernels.salient import salient_lister, word_bytes  # noqa: E402


def _lister(K: int, G: int, relative: bool):
    C, GB = K // 8, K // G
    list_salient = salient_lister(K, G, relative=relative, inputs=True)

    @T.prim_func(private=True)
    def main(salient: T.Buffer((1, C), "uint8"), x: T.Buffer((1, K), "float32"), cols: T.Buffer((K,), "int32"),
             start: T.Buffer((GB + 1,), "int32"), xs: T.Buffer((K,), "float32")):
        count = T.alloc_buffer((1,), "int32")
        word = T.alloc_buffer((1,), "uint64")
        list_salient(salient, cols, start, count, word, x, xs)

    return tvm.compile(tvm.IRModule({"main": main.with_attr("global_symbol", "main")}), target="llvm")["main"]


@pytest.mark.parametrize("K,G", [(64, 8), (96, 16), (96, 24), (128, 32), (192, 64), (384, 128)])
@pytest.mark.parametrize("density", [0.0625, 0.5, 1.0])
def test_lists_the_salient_columns_of_each_group_in_order(K, G, density):
    rng = np.random.default_rng(K + G)
    bits = (rng.random(K) < density).astype(np.uint8)
    bits[:G] = 0  # a scale group without salient columns
    bits[-1] = 1  # the top bit of the last word
    plane = np.packbits(bits, bitorder="little")[None]
    x = rng.standard_normal((1, K)).astype(np.float32)
    for relative in (False, True):
        cols, start, xs = np.full(K, -1, np.int32), np.full(K // G + 1, -1, np.int32), np.zeros(K, np.float32)
        args = [tvm.runtime.tensor(a) for a in (plane, x, cols, start, xs)]
        _lister(K, G, relative)(*args)
        cols, start, xs = (a.numpy() for a in args[2:])
        want = np.flatnonzero(bits)
        count = len(want)
        assert start[-1] == count and start[0] == 0
        for g in range(K // G):
            in_group = want[(want >= g * G) & (want < (g + 1) * G)]
            assert start[g + 1] - start[g] == len(in_group), (g, start)
            got = cols[start[g]:start[g + 1]] + (g * G if relative else 0)
            np.testing.assert_array_equal(got, in_group)
        np.testing.assert_array_equal(xs[:count], x[0, want])


def test_word_widths():
    assert [word_bytes(g) for g in (8, 16, 24, 32, 64, 128)] == [1, 2, 1, 4, 8, 8]
