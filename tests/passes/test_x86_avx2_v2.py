"""The hand-written AVX2 fp32 GEMV for op contract v2 layers (``passes/kernels/x86_avx2/sparse_binary_gemv_v2.py``):
numerics against the oracle ``PackedLinear.matmul``, its assembly, and the registry's choice of it.

* Numerics: random v2 layers (``testutil.random_layer`` + ``random_structure``): groups only, residual only,
  both; with and without mask, mu and bias; one to several tiles, G = 8 to 128, salient counts that leave a
  scale group without salient columns and residual planes of one or many bytes. The output starts as NaN.
  These run the compiled code, so they skip on a host without AVX2, FMA and F16C.
* Assembly (compile only, any host): ymm lookups (``vpermps``, ``vpermilps``), ``vcvtph2ps`` scales, no zmm;
  no workspace allocation inside the parallel loop.
* Registry: v2 one-token calls get this kernel (with ``--activations int8`` too: the int8 GEMV is v1 only),
  v1 calls the v1 GEMV, v2 prompt calls and layouts it does not read the TE kernel.

Timing: ``python tests/passes/test_x86_avx2_v2.py --bench`` (docs/avx2_gemv.md).
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import time

import numpy as np
import pytest

pytest.importorskip("pbs2pc.compiler.tvm_compat")

from pbs2pc.compiler.targets import CompileOptions, get_preset  # noqa: E402
from pbs2pc.compiler.tvm_compat import tvm  # noqa: E402
from pbs2pc.models.format import ARRAY_FIELDS, PackedLinear  # noqa: E402
from pbs2pc.passes.interleave_rows import interleave_array  # noqa: E402
from pbs2pc.passes.kernels import registry  # noqa: E402
from pbs2pc.passes.kernels.x86_avx2 import sparse_binary_gemv as k1  # noqa: E402
from pbs2pc.passes.kernels.x86_avx2 import sparse_binary_gemv_v2 as kv  # noqa: E402

if __name__ == "__main__":  # the benchmark, run as a script: tests/ is not on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from testutil import AVX2_TARGET, rel_err, requires, v2_layer  # noqa: E402

TARGET = tvm.target.Target(AVX2_TARGET)
needs_avx2 = requires("x86-avx2")


def build(layer: PackedLinear, **knobs):
    f = kv.gemv_v2(layer.out_features, layer.in_features, layer.scheme.group_size, layer.mask is not None,
                   layer.mu is not None, layer.bias is not None, layer.has_groups, layer.has_residual,
                   layer.residual.shape[1] if layer.has_residual else 0, **knobs)
    return tvm.compile(tvm.IRModule({"gemv": f.with_attr("global_symbol", "gemv")}), target=TARGET)


def kernel_args(layer: PackedLinear, roles=ARRAY_FIELDS) -> list:
    """The layer's arrays in the kernel's order and the x86-avx2 layout (16-row blocks; salient and bias plain)."""
    out = []
    for role in roles:
        array = getattr(layer, role)
        if array is not None:
            out.append(array if role in ("bias", "salient") else interleave_array(array, kv.INTERLEAVE))
    return out


def run(lib, layer, x):
    out = np.full((1, layer.out_features), np.nan, np.float32)
    tensors = [tvm.runtime.tensor(a) for a in [x[None], *kernel_args(layer), out]]
    lib["gemv"](*tensors)
    return tensors[-1].numpy()[0]


CASES = [
    # (N, K, G, mask, groups, salient per G, mu, bias)
    (16, 64, 64, "6:8", True, 4, True, True),  # one tile, one group, both sets
    (48, 384, 128, "6:8", True, 0, True, False),  # groups only
    (48, 384, 128, "6:8", False, 8, True, True),  # residual only, a 6-byte residual plane
    (80, 320, 64, "4:8", True, 3, False, True),  # no mu: group 0 has none, group 1 its own
    (64, 128, 64, None, True, 4, True, False),  # no mask plane (n = m): XM0 = sum(x) - XM1
    (32, 128, 32, None, False, 2, False, False),  # no mask, residual only
    (16, 48, 16, "random", True, 1, True, True),  # any mask bits; one salient column per 16
    (32, 24, 8, "6:8", True, 1, True, True),  # G = 8: one column byte per group
    (1536, 576, 64, "6:8", True, 4, True, False),  # SmolLM2 gate/up: parallel tasks
]


@needs_avx2
@pytest.mark.parametrize("n, k, g, mask_kind, groups, salient, has_mu, has_bias", CASES)
def test_v2_gemv_matches_the_oracle(n, k, g, mask_kind, groups, salient, has_mu, has_bias):
    layer = v2_layer(n, k, g, mask_kind, groups, salient, has_mu, has_bias, seed=n + k)
    x = np.random.default_rng(k).standard_normal(k).astype(np.float32)
    x[:g] *= 20
    got = run(build(layer), layer, x)
    assert np.isfinite(got).all()
    assert rel_err(got, layer.matmul(x[None])[0]) < 1e-5


@needs_avx2
@pytest.mark.parametrize("n, k, g, mask_kind, groups, salient", [(48, 384, 128, "6:8", True, 4),
                                                                  (64, 128, 64, None, True, 4),
                                                                  (32, 96, 32, "random", False, 2)])
def test_every_unroll_matches_the_oracle(n, k, g, mask_kind, groups, salient):
    """The tuner's ``unroll`` knob: every divisor of a scale group's column bytes, serial or parallel
    tasks, gives the oracle's output."""
    layer = v2_layer(n, k, g, mask_kind, groups, salient, True, True, seed=k)
    x = np.random.default_rng(n).standard_normal(k).astype(np.float32)
    want = layer.matmul(x[None])[0]
    assert kv.unroll_knob(g) == (1, *[u for u in (2, 4, 8, 16) if u <= g // 8 and (g // 8) % u == 0])
    for unroll in kv.unroll_knob(g):
        for parallel_min in (1, None):
            got = run(build(layer, unroll=unroll, parallel_min=parallel_min), layer, x)
            assert rel_err(got, want) < 1e-5, (unroll, parallel_min)


def test_an_unroll_that_does_not_divide_the_group_is_refused():
    with pytest.raises(ValueError, match="unroll=3 does not divide the 8 column bytes"):
        build(v2_layer(16, 128, 64), unroll=3)


@needs_avx2
def test_a_scale_group_without_salient_columns():
    layer = v2_layer(32, 256, 64, groups=False, salient=4, seed=7)
    cols = np.zeros(256, bool)
    cols[[3, 70, 77, 200]] = True  # groups 0, 1, 1, 3: group 2 has none
    layer.salient = np.packbits(cols[None], axis=1, bitorder="little")
    layer.residual = layer.residual[:, :1]
    layer.validate()
    x = np.random.default_rng(1).standard_normal(256).astype(np.float32)
    assert rel_err(run(build(layer), layer, x), layer.matmul(x[None])[0]) < 1e-5


def test_assembly_is_avx2_without_avx512():
    asm = build(v2_layer(64, 256, 64)).mod.inspect_source("asm")
    assert re.search(r"vperm(ps|d)\s+%ymm", asm) and "vpermilps" in asm and "vcvtph2ps" in asm
    assert "zmm" not in asm and not re.search(r"\bk[1-7]\b", asm)


def test_no_workspace_allocation_per_tile():
    """Named values in the kernel body are inlined: a Python binding of a vector would be a workspace
    allocation (and free) per tile inside the parallel loop."""
    ll = build(v2_layer(512, 512, 128)).mod.inspect_source("ll")  # 2^18 weights: a parallel loop
    lambdas = re.findall(r"define private[^\n]*parallel_lambda.*?\n}", ll, re.S)
    assert lambdas and not any("AllocWorkspace" in body for body in lambdas)


def _call(one_row=True, groups=True, residual=True, interleave=16):
    return registry.Call(1536, 576, 64, one_row, interleave, "uint8", True, True, False,
                         has_groups=groups, has_residual=residual, residual_bytes=36 if residual else 0)


def _chosen(call, options=CompileOptions(), preset="x86-avx2"):
    chosen = registry.select(registry.for_target(get_preset(preset), options), call)
    return None if chosen is None else chosen[0].name


def test_registry_picks_the_v2_gemv_for_v2_one_token_calls():
    for groups, residual in ((True, True), (True, False), (False, True)):
        assert _chosen(_call(groups=groups, residual=residual)) == "x86_avx2.gemv_v2_fp32"
        assert _chosen(_call(groups=groups, residual=residual), CompileOptions("int8")) == "x86_avx2.gemv_v2_fp32"
    assert _chosen(_call(groups=False, residual=False)) == "x86_avx2.gemv_fp32"  # v1: the v1 GEMV
    assert _chosen(_call(one_row=False)) is None  # the prompt: the TE kernel (no v1 GEMM claims it)
    assert _chosen(_call(interleave=0)) is None  # rows in order: the TE kernel
    # AVX-512 machines run their own v2 GEMV (tests/passes/test_x86_avx512_v2.py), on codes or planes
    assert _chosen(_call(), preset="x86-avx512") == "x86_avx512.gemv_v2_fp32"
    assert _chosen(dataclasses.replace(_call(), coded=(6, 8)), preset="x86-avx512") == "x86_avx512.gemv_v2_fp32"
    v1_entries = [e for e in registry.all_kernels() if not e.structure]  # every entry that reads v1 only
    assert all(not e.accepts(dataclasses.replace(_call(), coded=None)) for e in v1_entries)


def bench(shapes=((4096, 4096, 128), (11008, 4096, 128)), rounds=15, calls=20):
    """Microseconds per call of the v1 GEMV and the v2 GEMV (groups, residual, both; 2 groups, 4 of 64
    salient columns) on one weight each (cache-resident where it fits: the kernels' compute cost), and
    the bytes each reads."""
    for n, k, g in shapes:
        for groups, salient in ((False, 0), (True, 0), (False, 4), (True, 4)):
            layer = v2_layer(n, k, g, "6:8", groups, salient, True, False)
            x = np.random.default_rng(0).standard_normal(k).astype(np.float32)
            if layer.version == 1:
                f = k1.gemv_fp32(n, k, g, True, True, False).with_attr("global_symbol", "gemv")
                lib, args = tvm.compile(tvm.IRModule({"gemv": f}), target=TARGET), kernel_args(layer, ARRAY_FIELDS[:5])
            else:
                lib, args = build(layer), kernel_args(layer)
            tensors = [tvm.runtime.tensor(a) for a in [x[None], *args, np.zeros((1, n), np.float32)]]
            fn = lib["gemv"]
            times = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn(*tensors)
                times.append((time.perf_counter() - t0) / calls)
            bits = 8 * sum(a.nbytes for a in args) / (n * k)
            name = "v1" if layer.version == 1 else "+".join(s for s, on in (("groups", groups), ("residual", salient)) if on)
            print(f"{n}x{k} G={g} {name:<16} {bits:.3f} bits/weight  median {np.median(times) * 1e6:7.0f} us  "
                  f"min {min(times) * 1e6:7.0f} us", flush=True)


if __name__ == "__main__" and "--bench" in sys.argv:
    bench()
