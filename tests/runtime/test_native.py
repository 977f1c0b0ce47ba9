"""The native runner's ``func`` mode: aarch64 kernels built here run under qemu and match numpy.

These need the aarch64 cross compiler and qemu-aarch64 (CI installs both); they skip without them. The
aarch64 TVM runtime is downloaded once into the pbs2pc cache (~/.cache/pbs2pc/aarch64).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from pbs2pc.errors import Pbs2pcError
from testutil import aarch64_tools_missing, requires_aarch64

AARCH64_TARGET = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"], "num-cores": 2}
needs_aarch64 = requires_aarch64()


def export_aarch64(funcs: dict, path) -> str:
    """Build PrimFuncs for aarch64 and link them with the cross compiler; returns the library path."""
    from pbs2pc.compiler.tvm_compat import IRModule, Target, cc, tvm

    funcs = {name: f.with_attr("global_symbol", name) for name, f in funcs.items()}
    lib = tvm.compile(IRModule(funcs), target=Target(AARCH64_TARGET))
    lib.export_library(str(path), fcompile=cc.cross_compiler("aarch64-linux-gnu-g++"))
    return str(path)


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    if aarch64_tools_missing():
        pytest.skip(aarch64_tools_missing())
    from pbs2pc.compiler.tvm_compat import T, te

    n, k = 37, 64  # 37: a tail the vectorized loops must handle
    a, b = te.placeholder((n,), "float32", name="a"), te.placeholder((n,), "float32", name="b")
    c = te.compute((n,), lambda i: a[i] + b[i], name="c")
    x = te.placeholder((4, k), "float32", name="x")
    w = te.placeholder((n, k), "int8", name="w")
    r = te.reduce_axis((0, k), name="r")
    y = te.compute((4, n), lambda i, j: te.sum(x[i, r] * w[j, r].astype("float32"), axis=r), name="y")

    @T.prim_func
    def scale_rows(p: T.handle, q: T.handle):
        # a parallel loop: it calls TVMBackendParallelLaunch, which libtvm_runtime's thread pool provides
        A = T.match_buffer(p, (64, 16), "float32")
        B = T.match_buffer(q, (64, 16), "float32")
        for i in T.parallel(64):
            for j in T.vectorized(16):
                B[i, j] = A[i, j] * T.Cast("float32", i + 1)

    funcs = {"vadd": te.create_prim_func([a, b, c]), "matmul_i8": te.create_prim_func([x, w, y]),
             "scale_rows": scale_rows}
    return export_aarch64(funcs, tmp_path_factory.mktemp("native") / "kernels_aarch64.so")


@needs_aarch64
def test_vector_add_and_int8_matmul_match_numpy(library):
    from pbs2pc.runtime.native import library_machine, run_function

    assert library_machine(library) == "aarch64"
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 37)).astype(np.float32)
    c, = run_function(library, "vadd", [a, b], [np.full(37, np.nan, np.float32)])
    np.testing.assert_array_equal(c, a + b)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    w = rng.integers(-128, 128, (37, 64), dtype=np.int8)
    y, = run_function(library, "matmul_i8", [x, w], [np.full((4, 37), np.nan, np.float32)])
    np.testing.assert_allclose(y, x @ w.T.astype(np.float32), rtol=1e-5, atol=1e-4)


@needs_aarch64
def test_parallel_loop_runs_on_the_thread_pool(library):
    from pbs2pc.runtime.native import run_function

    a = np.random.default_rng(1).standard_normal((64, 16)).astype(np.float32)
    b, = run_function(library, "scale_rows", [a], [np.full((64, 16), np.nan, np.float32)], threads=2)
    np.testing.assert_array_equal(b, a * np.arange(1, 65, dtype=np.float32)[:, None])


@needs_aarch64
def test_errors_are_one_sentence(library, tmp_path):
    from pbs2pc.runtime.native import run_function

    with pytest.raises(Pbs2pcError, match="has no function 'nope'"):
        run_function(library, "nope", [np.zeros(37, np.float32)], [np.zeros(37, np.float32)])
    with pytest.raises(Pbs2pcError, match="not a shared library"):
        (tmp_path / "x.so").write_text("hello")
        run_function(tmp_path / "x.so", "vadd", [], [])


def test_npy_reader_and_writer_on_this_machine(tmp_path):
    """The runner's .npy code for every dtype it supports, natively (no qemu): an identity copy kernel."""
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed")
    from pbs2pc.compiler.tvm_compat import IRModule, te, tvm
    from pbs2pc.runtime.native import run_function
    from testutil import host_target

    funcs = {}
    dtypes = ["float32", "float16", "int8", "uint8", "int16", "int32", "int64", "uint16", "uint32"]
    for dtype in dtypes:
        a = te.placeholder((3, 5), dtype, name="a")
        func = te.create_prim_func([a, te.compute((3, 5), lambda i, j: a[i, j], name="b")])
        funcs[f"copy_{dtype}"] = func.with_attr("global_symbol", f"copy_{dtype}")
    path = tmp_path / "copy.so"
    tvm.compile(IRModule(funcs), target=host_target()).export_library(str(path))
    rng = np.random.default_rng(2)
    for dtype in dtypes:
        a = (rng.standard_normal((3, 5)) * 50).astype(dtype)
        b, = run_function(path, f"copy_{dtype}", [a], [np.zeros((3, 5), dtype)])
        assert b.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(b, a)
