"""The hand-written AVX-512 fp32 GEMV for op contract v2 layers
(``passes/kernels/x86_avx512/sparse_binary_gemv_v2.py``): numerics against the oracle ``PackedLinear.matmul``,
its assembly, and the registry's choice of it.

* Numerics: random v2 layers (``testutil.random_layer`` + ``random_structure``): groups only, residual only,
  both; with and without mask, mu and bias; masks as 5-bit pattern codes (the x86-avx512 layout, sign
  planes stored as ``sign & mask``) and as planes (4:8 and random masks have no codes); one to 96 tiles,
  odd tile counts, G = 8 to 128 (chunks of 1, 2 and 4 column bytes), a scale group without salient columns,
  residual planes of one or many bytes. The output starts as NaN. These run AVX-512 code, so they skip on
  a host without it.
* Assembly (compile only, any host): zmm ``vpermps`` lookups, ``vpermi2ps`` code tables, ``vpermb``
  transposes and pattern expansion, ``vpmultishiftqb`` code extraction, no workspace allocation per task.
* Registry: v2 one-token calls on x86-avx512 get this kernel (codes or planes, with ``--activations int8``
  too), v1 calls the v1 GEMV, v2 prompt calls and layouts it does not read the TE kernel.

Timing: ``python tests/passes/test_x86_avx512_v2.py --bench`` (docs/performance.md).
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
from pbs2pc.passes.kernels.x86_avx512 import mask_codes  # noqa: E402
from pbs2pc.passes.kernels.x86_avx512 import sparse_binary_gemv as k1  # noqa: E402
from pbs2pc.passes.kernels.x86_avx512 import sparse_binary_gemv_v2 as kv  # noqa: E402

if __name__ == "__main__":  # the benchmark, run as a script: tests/ is not on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from testutil import AVX512_TARGET, rel_err, requires, v2_layer  # noqa: E402

TARGET = tvm.target.Target(AVX512_TARGET)
needs_avx512 = requires("x86-avx512")


def codes_of(layer: PackedLinear) -> tuple[int, int] | None:
    """The layer's ``(n, m)`` when the x86-avx512 layout stores its mask as codes (else None: planes)."""
    s = layer.scheme
    coded = layer.mask is not None and mask_codes.supported(layer.out_features, layer.in_features, s.n, s.m)
    return (s.n, s.m) if coded and s.group_size % 32 == 0 else None


def build(layer: PackedLinear, codes=None, tiles=kv.TILES_PER_TASK, **knobs):
    f = kv.gemv_v2(layer.out_features, layer.in_features, layer.scheme.group_size, layer.mask is not None,
                   layer.mu is not None, layer.bias is not None, layer.has_groups, layer.has_residual,
                   layer.residual.shape[1] if layer.has_residual else 0, codes=codes, tiles=tiles, **knobs)
    return tvm.compile(tvm.IRModule({"gemv": f.with_attr("global_symbol", "gemv")}), target=TARGET)


def kernel_args(layer: PackedLinear, codes=None, roles=ARRAY_FIELDS) -> list:
    """The layer's arrays in the kernel's order and the x86-avx512 layout: 16-row blocks (salient and bias
    plain); with ``codes`` the mask as pattern codes and the sign plane as ``sign & mask``."""
    out = []
    for role in roles:
        array = getattr(layer, role)
        if array is None:
            continue
        if codes and role == "mask":
            out.append(mask_codes.encode(array, *codes))
        elif codes and role == "sign":
            out.append(interleave_array(array & layer.mask, kv.LANES))
        else:
            out.append(array if role in ("bias", "salient") else interleave_array(array, kv.LANES))
    return out


def run(lib, layer, x, codes=None):
    out = np.full((1, layer.out_features), np.nan, np.float32)
    tensors = [tvm.runtime.tensor(a) for a in [x[None], *kernel_args(layer, codes), out]]
    lib["gemv"](*tensors)
    return tensors[-1].numpy()[0]


CASES = [
    # (N, K, G, mask, groups, salient per G, mu, bias)
    (16, 64, 32, "6:8", True, 4, True, True),  # one tile, both sets, codes (G = 32: one chunk per group)
    (48, 384, 128, "6:8", True, 0, True, False),  # groups only, 3 tiles
    (48, 384, 128, "6:8", False, 8, True, True),  # residual only, a 6-byte residual plane
    (80, 320, 64, "4:8", True, 3, False, True),  # 4:8 has no codes: mask planes; no mu; 5 tiles
    (64, 128, 64, None, True, 4, True, False),  # no mask (n = m): XM is the group's sum of x
    (32, 128, 32, None, False, 2, False, False),  # no mask, residual only
    (16, 48, 16, "random", True, 1, True, True),  # any mask bits (planes); G = 16: chunks of 2 column bytes
    (32, 24, 8, "6:8", True, 1, True, True),  # G = 8: chunks of one column byte, planes
    (1536, 576, 64, "6:8", True, 4, True, False),  # SmolLM2 gate/up: parallel tasks, codes
]


@needs_avx512
@pytest.mark.parametrize("n, k, g, mask_kind, groups, salient, has_mu, has_bias", CASES)
def test_v2_gemv_matches_the_oracle(n, k, g, mask_kind, groups, salient, has_mu, has_bias):
    layer = v2_layer(n, k, g, mask_kind, groups, salient, has_mu, has_bias, seed=n + k)
    x = np.random.default_rng(k).standard_normal(k).astype(np.float32)
    x[:g] *= 20
    codes = codes_of(layer)
    got = run(build(layer, codes), layer, x, codes)
    assert np.isfinite(got).all()
    assert rel_err(got, layer.matmul(x[None])[0]) < 1e-5


@needs_avx512
def test_coded_6of8_masks_also_read_as_planes():
    """The same layer through both mask forms (planes: a v2 layer whose scheme the code layout skips)."""
    layer = v2_layer(48, 256, 64, seed=5)
    x = np.random.default_rng(2).standard_normal(256).astype(np.float32)
    want = layer.matmul(x[None])[0]
    assert rel_err(run(build(layer, (6, 8)), layer, x, (6, 8)), want) < 1e-5
    assert rel_err(run(build(layer, None), layer, x, None), want) < 1e-5


@needs_avx512
@pytest.mark.parametrize("codes", [(6, 8), None])
def test_every_unroll_groups_matches_the_oracle(codes):
    """The tuner's ``unroll_groups`` knob (scale groups unrolled: 1, 2, 3, 4 of 12), with tiles and serial or
    parallel tasks, on codes and on planes; a scale group without salient columns among them."""
    layer = v2_layer(64, 384, 32, groups=True, salient=2, seed=11)
    x = np.random.default_rng(3).standard_normal(384).astype(np.float32)
    want = layer.matmul(x[None])[0]
    assert kv.unroll_groups_knob(384, 32) == (1, 2, 3, 4)
    for unroll in kv.unroll_groups_knob(384, 32):
        for tiles, parallel_min in ((1, 1), (2, None)):
            got = run(build(layer, codes, tiles, unroll_groups=unroll, parallel_min=parallel_min), layer, x, codes)
            assert rel_err(got, want) < 1e-5, (unroll, tiles, parallel_min)


@needs_avx512
@pytest.mark.parametrize("codes", [(6, 8), None])
def test_prefetching_ahead_gives_the_same_bits(codes):
    """The tuner's ``prefetch`` knob (lines of the task ahead into L2) changes no arithmetic: the same bits as
    without, serial and parallel, one and two tiles per task, the last task's prefetch kept in range."""
    layer = v2_layer(80, 384, 64, groups=True, salient=3, seed=5)
    x = np.random.default_rng(4).standard_normal(384).astype(np.float32)
    for tiles, parallel_min in ((1, 1), (1, None), (5, 1)):
        plain = run(build(layer, codes, tiles, parallel_min=parallel_min), layer, x, codes)
        for ahead in (1, 2, 7):
            got = run(build(layer, codes, tiles, parallel_min=parallel_min, prefetch=ahead), layer, x, codes)
            np.testing.assert_array_equal(got, plain)
    assert rel_err(plain, layer.matmul(x[None])[0]) < 1e-5
    with pytest.raises(ValueError, match="prefetch=-1"):
        build(layer, codes, prefetch=-1)


def test_unroll_groups_that_do_not_divide_the_row_are_refused():
    assert kv.unroll_groups_knob(576, 64) == (1, 3)
    with pytest.raises(ValueError, match="unroll_groups=2 does not divide the 9 scale groups"):
        build(v2_layer(16, 576, 64), (6, 8), unroll_groups=2)


@needs_avx512
def test_a_scale_group_without_salient_columns():
    layer = v2_layer(32, 256, 64, groups=True, salient=4, seed=7)
    cols = np.zeros(256, bool)
    cols[[3, 70, 77, 200]] = True  # groups 0, 1, 1, 3: group 2 has none
    layer.salient = np.packbits(cols[None], axis=1, bitorder="little")
    layer.residual = layer.residual[:, :1]
    layer.validate()
    x = np.random.default_rng(1).standard_normal(256).astype(np.float32)
    assert rel_err(run(build(layer, (6, 8)), layer, x, (6, 8)), layer.matmul(x[None])[0]) < 1e-5


def test_assembly_reads_codes_and_planes_in_zmm_registers():
    lib = build(v2_layer(512, 512, 128), (6, 8))  # 2^18 weights: tasks run in parallel
    asm = lib.mod.inspect_source("asm")
    assert len(re.findall(r"vperm(?:ps|d)\s+(?:-?\d*\(%\w+(?:,%\w+)*(?:,\d)?\)|%zmm\d+), %zmm\d+, %zmm", asm)) >= 24, \
        "the nibble lookups are not zmm vpermps"
    assert re.search(r"vperm[it]2ps\s+.*%zmm", asm), "XM is not looked up by code (vpermi2ps)"
    assert len(re.findall(r"vpermb\s+.*%zmm", asm)) >= 3, "planes are not transposed / codes expanded with vpermb"
    assert "vpmultishiftqb" in asm and re.search(r"vcvtph2ps\s+.*%zmm", asm)
    assert not re.search(r"vpgather|vgather", asm), "the GEMV gathers"
    lambdas = re.findall(r"define private[^\n]*parallel_lambda.*?\n}", lib.mod.inspect_source("ll"), re.S)
    assert lambdas and not any("AllocWorkspace" in body for body in lambdas), "a workspace allocation per task"


def _call(one_row=True, groups=True, residual=True, interleave=16, coded=(6, 8), g=64):
    return registry.Call(1536, 576, g, one_row, interleave, "uint8", True, True, False, coded if one_row else None,
                         has_groups=groups, has_residual=residual, residual_bytes=36 if residual else 0)


def _chosen(call, options=CompileOptions(), preset="x86-avx512"):
    chosen = registry.select(registry.for_target(get_preset(preset), options), call)
    return None if chosen is None else chosen[0].name


def test_registry_picks_the_v2_gemv_for_v2_one_token_calls():
    for groups, residual in ((True, True), (True, False), (False, True)):
        for coded in ((6, 8), None):
            call = _call(groups=groups, residual=residual, coded=coded)
            assert _chosen(call) == "x86_avx512.gemv_v2_fp32"
            assert _chosen(call, CompileOptions("int8")) == "x86_avx512.gemv_v2_fp32"
            assert _chosen(call, preset="x86-avx2") == "x86_avx2.gemv_v2_fp32"  # AVX2 machines: their own
    chosen = registry.select(registry.for_target(get_preset("x86-avx512"), CompileOptions()), _call())
    assert chosen[1].coded == (6, 8)  # it is handed the codes, not their expansion
    assert _chosen(_call(groups=False, residual=False)) == "x86_avx512.gemv_fp32"  # v1: the v1 GEMV
    assert _chosen(_call(one_row=False)) is None  # the prompt: the TE kernel (no v1 GEMM claims it)
    assert _chosen(_call(interleave=0, coded=None)) is None  # rows in order: the TE kernel
    assert _chosen(_call(g=8, coded=None)) == "x86_avx512.gemv_v2_fp32"
    v1_entries = [e for e in registry.all_kernels() if not e.structure]  # every entry that reads v1 only
    assert all(not e.accepts(dataclasses.replace(_call(), coded=None)) for e in v1_entries)


def bench(shapes=((4096, 4096, 128), (1536, 576, 64)), rounds=15, calls=20):
    """Microseconds per call of the v1 GEMV (codes) and the v2 GEMV (groups, residual, both; 2 groups, 4 of
    64 salient columns; codes, and planes for both sets) on one weight each (cache-resident where it fits:
    the kernels' compute cost), and the bytes each reads. Rounds alternate over the variants."""
    for n, k, g in shapes:
        x = np.random.default_rng(0).standard_normal(k).astype(np.float32)
        runs = {}
        for name, groups, salient, coded in (("v1", False, 0, True), ("groups", True, 0, True),
                                             ("residual", False, 4, True), ("groups+residual", True, 4, True),
                                             ("both, mask planes", True, 4, False)):
            layer = v2_layer(n, k, g, "6:8", groups, salient, True, False)
            codes = (6, 8) if coded else None
            if layer.version == 1:
                f = k1.gemv_fp32(n, k, g, True, True, False, codes=codes).with_attr("global_symbol", "gemv")
                lib, args = tvm.compile(tvm.IRModule({"gemv": f}), target=TARGET), kernel_args(layer, codes,
                                                                                                ARRAY_FIELDS[:5])
            else:
                lib, args = build(layer, codes), kernel_args(layer, codes)
            tensors = [tvm.runtime.tensor(a) for a in [x[None], *args, np.zeros((1, n), np.float32)]]
            runs[name] = (lib["gemv"], tensors, 8 * sum(a.nbytes for a in args) / (n * k), [])
        for _ in range(rounds):
            for fn, tensors, _, times in runs.values():
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn(*tensors)
                times.append((time.perf_counter() - t0) / calls)
        for name, (_, _, bits, times) in runs.items():
            print(f"{n}x{k} G={g} {name:<18} {bits:.3f} bits/weight  median {np.median(times) * 1e6:7.1f} us  "
                  f"min {min(times) * 1e6:7.1f} us", flush=True)


if __name__ == "__main__" and "--bench" in sys.argv:
    bench()
