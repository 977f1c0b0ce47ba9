"""The aarch64 NEON kernels (``passes/kernels/arm_neon/``) and the TE kernel built for aarch64.

* Numerics under qemu (the native runner, :func:`pbs2pc.runtime.native.run_function`): the ``tbl`` int8 GEMVs
  (v1 and op contract v2) and the ``sdot`` int8 GEMM against their numpy oracles on random layers: every supported n:m (2:4, 4:8, 5:8,
  6:8, and 8:8 without a mask plane), with and without mu and bias, N from one 16-row tile to odd tile counts
  and SmolLM2 shapes, G = 16 to 512 (several uint16 blocks per group), a group of zeros in ``x``; the TE kernel
  (the prompt's path and every fp32 call) at M = 1, 2 and 17 in both layouts. Outputs start as NaN. They
  skip, saying why, where the cross compiler or qemu is missing (``.ci/run`` installs both).
* Assembly (compile only): the instructions the design relies on (``tbl``, ``umlal``, ``uaddw``, ``ushr``,
  ``fcvtl`` for the fp16 scales, ``bic`` for group 0's planes), and no dot-product or fp16-arithmetic
  instruction in a build for the generic ``arm`` preset, which must run on any ARMv8-A core.
* Registry: which kernel the ARM presets pick for each call (the sdot GEMM only where the preset has the
  dot-product instructions).
"""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest

pytest.importorskip("pbs2pc.compiler.tvm_compat")

from pbs2pc.compiler.targets import CompileOptions, get_preset  # noqa: E402
from pbs2pc.compiler.tvm_compat import cc, dlight, te, tirx, tvm  # noqa: E402
from pbs2pc.models.format import ARRAY_FIELDS  # noqa: E402
from pbs2pc.passes.interleave_rows import interleave_array  # noqa: E402
from pbs2pc.passes.kernels import arm_neon, registry  # noqa: E402
from pbs2pc.passes.kernels.arm_neon import sparse_binary_gemm_int8 as kg  # noqa: E402
from pbs2pc.passes.kernels.arm_neon import sparse_binary_gemm_v2_int8 as kg2  # noqa: E402
from pbs2pc.passes.kernels.arm_neon import sparse_binary_gemv_int8 as k8  # noqa: E402
from pbs2pc.passes.kernels.arm_neon import sparse_binary_gemv_v2_int8 as kv  # noqa: E402
from pbs2pc.passes.kernels.sparse_binary_linear import pbs2p_info, sparse_binary_linear  # noqa: E402
from pbs2pc.passes.kernels.x86_avx512 import sparse_binary_gemv_int8 as k512  # noqa: E402
from pbs2pc.passes.schedules import cpu_rules  # noqa: E402
from testutil import random_layer, rel_err, v2_layer  # noqa: E402

RPI5 = get_preset("rpi5")
ARM = get_preset("arm")
#: The int8 kernels against their oracle: exact integer dots, so only the fp32 order of the per-group sums
#: and the final scaling differ (measured about 1e-7).
TOL_INT8 = 2e-6
#: The TE kernel against the float64 oracle: fp32 accumulation over K <= 1024.
TOL_FP32 = 1e-5

missing = [tool for tool in (RPI5.cross_compiler, "qemu-aarch64") if shutil.which(tool) is None]
needs_qemu = pytest.mark.skipif(bool(missing), reason=f"{', '.join(missing)} not installed (apt-get install "
                                "gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user)")


def build(func, path, preset=RPI5):
    """``func`` compiled for ``preset`` and linked with its cross compiler into ``path``."""
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=preset.tvm_target())
    lib.export_library(str(path), fcompile=cc.cross_compiler(preset.cross_compiler, options=list(preset.cross_flags)))
    return lib


def run(path, inputs, out_shape):
    from pbs2pc.runtime.native import run_function

    out, = run_function(path, "main", inputs, [np.full(out_shape, np.nan, np.float32)], threads=2)
    return out


def interleaved(arrays):
    return [a if a is None else interleave_array(a, k8.INTERLEAVE) for a in arrays]


# --------------------------------------------------------------------------------------------------------
# numerics under qemu

V1_CASES = [
    # (N, K, G, mask, mu, bias, zero group)
    (16, 64, 64, "6:8", True, True, False),  # one tile, one group
    (48, 384, 128, "6:8", True, False, True),  # odd tile count (tasks of one tile), a group of zeros
    (64, 512, 128, "4:8", False, True, False),
    (32, 160, 32, "5:8", True, True, False),
    (32, 128, 16, "2:4", True, False, False),  # G = 16: one step per group
    (64, 256, 256, None, True, True, False),  # 8:8: no mask plane (IM = the group's sum of q)
    (32, 1024, 512, "6:8", True, True, False),  # two uint16 blocks per group
    (48, 96, 32, "random", True, True, False),  # any mask bits
    (1536, 576, 64, "6:8", True, False, False),  # SmolLM2 gate/up: parallel tasks
]


@needs_qemu
@pytest.mark.parametrize("n,k,g,mask,mu,bias,zero", V1_CASES)
def test_int8_gemv_matches_oracle(tmp_path, n, k, g, mask, mu, bias, zero):
    x, sign, m, alpha, u, b = random_layer(1, n, k, g, None if mask == "2:4" else mask, mu, bias, seed=n + k)
    if mask == "2:4":  # two kept of every four columns
        rng = np.random.default_rng(7)
        bits = np.zeros((n, k // 4, 4), np.uint8)
        bits[..., :2] = 1
        m = np.packbits(rng.permuted(bits, axis=2).reshape(n, k), axis=1, bitorder="little")
    if zero:
        x[0, g:2 * g] = 0
    build(k8.gemv_int8(n, k, g, m is not None, mu, bias), tmp_path / "k.so")
    args = [x, *[a for a in interleaved([sign, m, alpha, u]) if a is not None]] + ([b] if bias else [])
    got = run(tmp_path / "k.so", args, (1, n))[0]
    ref = k512.reference(x[0], sign, m, alpha, u, b, group_size=g)
    assert not np.isnan(got).any()
    assert rel_err(got, ref) < TOL_INT8


GEMM_CASES = [
    # (N, K, G, mask, mu, bias)
    (32, 256, 64, "6:8", True, True),
    (48, 128, 32, None, True, False),  # no mask plane: IM = the group's sum of q
    (16, 64, 64, "4:8", False, True),  # no mu: the mask plane is decoded but only t counts
    (64, 192, 16, "5:8", True, False),  # G = 16: four sdot steps per group
]


@needs_qemu
@pytest.mark.parametrize("n,k,g,mask,mu,bias", GEMM_CASES)
def test_int8_gemm_matches_oracle_at_m_1_2_17(tmp_path, n, k, g, mask, mu, bias):
    """The sdot GEMM (the prompt) computes the GEMV's numbers row by row; one build serves every M."""
    x, sign, m, alpha, u, b = random_layer(17, n, k, g, mask, mu, bias, seed=n + g)
    build(kg.gemm_int8(n, k, g, m is not None, mu, bias), tmp_path / "k.so")
    weights = [a for a in interleaved([sign, m, alpha, u]) if a is not None] + ([b] if bias else [])
    for rows in (1, 2, 17):
        got = run(tmp_path / "k.so", [x[:rows], *weights], (rows, n))
        ref = np.stack([k512.reference(x[r], sign, m, alpha, u, b, group_size=g) for r in range(rows)])
        assert not np.isnan(got).any()
        assert rel_err(got, ref) < TOL_INT8, rows


V2_CASES = [
    # (N, K, G, mask, groups, salient per G, mu, bias)
    (16, 64, 64, "6:8", True, 4, True, True),  # both sets, one tile
    (48, 384, 128, "6:8", True, 0, True, False),  # groups only
    (48, 384, 128, "6:8", False, 8, True, True),  # residual only, a 6-byte residual plane
    (80, 320, 64, "4:8", True, 3, False, True),  # no mu
    (64, 128, 64, None, True, 4, True, False),  # no mask plane: IM0 = sum(q) - IM1
    (32, 128, 32, None, False, 2, False, False),  # no mask, residual only
    (16, 48, 16, "random", True, 1, True, True),  # any mask bits; one salient column per 16
    (32, 1024, 512, "6:8", True, 40, True, True),  # two blocks per group, many salient columns
    (576, 1536, 128, "6:8", True, 12, True, False),  # SmolLM2 down projection: parallel tasks
]


@needs_qemu
@pytest.mark.parametrize("n,k,g,mask,groups,salient,mu,bias", V2_CASES)
def test_v2_int8_gemv_matches_oracle(tmp_path, n, k, g, mask, groups, salient, mu, bias):
    layer = v2_layer(n, k, g, mask, groups, salient, mu, bias, seed=n)
    x = np.random.default_rng(n + 1).standard_normal((1, k)).astype(np.float32)
    x[0, :g] *= 20  # groups of very different scales
    build(kv.gemv_v2_int8(n, k, g, layer.mask is not None, mu, bias, layer.has_groups, layer.has_residual,
                          layer.residual.shape[1] if layer.has_residual else 0), tmp_path / "k.so")
    args = [x] + [getattr(layer, r) if r in ("bias", "salient") else interleave_array(getattr(layer, r), 16)
                  for r in ARRAY_FIELDS if getattr(layer, r) is not None]
    got = run(tmp_path / "k.so", args, (1, n))[0]
    assert not np.isnan(got).any()
    assert rel_err(got, kv.reference(layer, x[0])) < TOL_INT8
    # and the int8 activations cost what quantising them costs, not more
    assert rel_err(got, layer.matmul(x)[0]) < 2e-2


@needs_qemu
@pytest.mark.parametrize("n,k,g,mask,groups,salient,mu,bias", [
    (16, 64, 64, "6:8", True, 4, True, True),
    (48, 384, 128, "6:8", False, 8, True, True),  # residual only
    (64, 128, 64, None, True, 4, True, False),  # no mask plane
    (32, 256, 64, "4:8", True, 61, False, True),  # 61 salient columns of 64: padding to 64
    (16, 48, 16, "random", True, 1, True, True),
])
def test_v2_int8_gemm_matches_oracle_at_m_1_2_17(tmp_path, n, k, g, mask, groups, salient, mu, bias):
    layer = v2_layer(n, k, g, mask, groups, salient, mu, bias, seed=n)
    x = np.random.default_rng(n + 1).standard_normal((17, k)).astype(np.float32)
    x[:, :g] *= 20
    build(kg2.gemm_v2_int8(n, k, g, layer.mask is not None, mu, bias, layer.has_groups, layer.has_residual,
                           layer.residual.shape[1] if layer.has_residual else 0), tmp_path / "k.so")
    args = [getattr(layer, r) if r in ("bias", "salient") else interleave_array(getattr(layer, r), 16)
            for r in ARRAY_FIELDS if getattr(layer, r) is not None]
    for rows in (1, 2, 17):
        got = run(tmp_path / "k.so", [x[:rows], *args], (rows, n))
        ref = np.stack([kv.reference(layer, x[r]) for r in range(rows)])
        assert not np.isnan(got).any()
        assert rel_err(got, ref) < TOL_INT8, rows


def te_kernel(layer, rows, interleave):
    """The TE kernel (the prompt's path) as the Relax lowering creates it, scheduled by the CPU rules for rpi5."""
    n_out, k, g = layer[1].shape[0], layer[0].shape[1], layer[1].shape[1] * 8 // layer[3].shape[1]

    def weight(cols, dtype, name):
        shape = (n_out // interleave, cols, interleave) if interleave else (n_out, cols)
        return te.placeholder(shape, dtype, name)

    _, sign, mask, alpha, mu, bias = layer
    x = te.placeholder((rows, k), "float32", "x")
    tensors = [x, weight(k // 8, "uint8", "sign"), None if mask is None else weight(k // 8, "uint8", "mask"),
               weight(k // g, "float16", "alpha"), None if mu is None else weight(k // g, "float16", "mu"),
               None if bias is None else te.placeholder((n_out,), "float32", "bias")]
    y = sparse_binary_linear(*tensors, n=6, m=8, group_size=g)
    func = te.create_prim_func([t for t in tensors if t is not None] + [y])
    func = func.with_attr("pbs2p_info", pbs2p_info(6, 8, g, mask is not None, mu is not None, bias is not None))
    with RPI5.tvm_target():
        mod = dlight.ApplyDefaultSchedule(*cpu_rules())(tvm.IRModule({"main": func}))
    return mod["main"]


@needs_qemu
@pytest.mark.parametrize("interleave", [0, 16])
def test_te_kernel_on_aarch64_at_m_1_2_17(tmp_path, interleave):
    """The TE kernel built once with symbolic M for aarch64 (the prompt's calls, and every fp32 call)."""
    n, k, g = 96, 256, 64
    layer = random_layer(17, n, k, g, "6:8", True, True, seed=5)
    x, sign, mask, alpha, mu, bias = layer
    build(te_kernel(layer, tirx.Var("m", "int64"), interleave), tmp_path / "te.so")
    weights = [sign, mask, alpha, mu]
    weights = interleaved(weights) if interleave else weights
    from pbs2pc.models.format import NMScheme, PackedLinear

    packed = PackedLinear(sign=sign, mask=mask, alpha=alpha, mu=mu, bias=bias, scheme=NMScheme(6, 8, g))
    for rows in (1, 2, 17):
        got = run(tmp_path / "te.so", [x[:rows], *weights, bias], (rows, n))
        assert not np.isnan(got).any()
        assert rel_err(got, packed.matmul(x[:rows])) < TOL_FP32, rows


@needs_qemu
@pytest.mark.parametrize("past,seq,capacity", [(0, 1, 64), (37, 30, 128), (200, 1, 256), (0, 130, 192)])
def test_attention_on_aarch64_matches_onnx_semantics(tmp_path, past, seq, capacity):
    """The KV-cache attention with NEON's key block (16 keys: four q registers per query head)."""
    from pbs2pc.passes.kernels.attention import cached_attention, key_block

    block = key_block(RPI5.tvm_target())
    assert block == 16
    build(cached_attention(6, 2, 64, 0.125, block), tmp_path / "att.so")
    rng = np.random.default_rng(past + seq)
    heads, kv, d, total = 6, 2, 64, past + seq
    q = rng.standard_normal((1, heads, seq, d), dtype=np.float32)
    k, v = (rng.standard_normal((1, kv, seq, d), dtype=np.float32) for _ in range(2))
    k_cache = rng.standard_normal((1, kv, d, capacity), dtype=np.float32)
    v_cache = rng.standard_normal((1, kv, capacity, d), dtype=np.float32)
    k_cache[..., total:] *= 1e3  # garbage beyond what this call fills: the kernel must not read it
    v_cache[:, :, total:] *= 1e3
    mask = (np.arange(total)[None, :] <= np.arange(past, total)[:, None])[None, None]
    keys = np.concatenate([k_cache[..., :past].transpose(0, 1, 3, 2), k], 2).repeat(3, 1).astype(np.float64)
    values = np.concatenate([v_cache[:, :, :past], v], 2).repeat(3, 1).astype(np.float64)
    scores = np.where(mask, q.astype(np.float64) @ keys.transpose(0, 1, 3, 2) * 0.125, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    want = (probs / probs.sum(-1, keepdims=True)) @ values
    got = run(tmp_path / "att.so", [q, k, v, mask, k_cache, v_cache], q.shape)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@needs_qemu
@pytest.mark.parametrize("kind", ["fp16", "int8"])
def test_lm_heads_on_aarch64_match_float64(tmp_path, kind):
    from pbs2pc.passes.kernels import lm_head_fp16, lm_head_int8

    vocab, hidden = 1000, 576
    rng = np.random.default_rng(3)
    table = (rng.standard_normal((vocab, hidden)) * 0.05).astype(np.float32)
    x = rng.standard_normal((3, hidden)).astype(np.float32)
    if kind == "fp16":
        func, stored = lm_head_fp16.lm_head_fp16(vocab, hidden), table.astype(np.float16)
        want = lm_head_fp16.reference(x, stored)
    else:
        func, stored = lm_head_int8.lm_head_int8(vocab, hidden), lm_head_int8.quantize(table)
        want = lm_head_int8.reference(x, stored)
    build(func, tmp_path / "head.so")
    got = run(tmp_path / "head.so", [x, stored], (3, vocab))
    assert rel_err(got, want) < 1e-6


# --------------------------------------------------------------------------------------------------------
# assembly (compile only)


def assembly(func, preset) -> str:
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=preset.tvm_target())
    return lib.mod.inspect_source("asm") if hasattr(lib, "mod") else lib.inspect_source("asm")


def count(asm: str, instruction: str) -> int:
    return len(re.findall(rf"^\s+{instruction}\s", asm, flags=re.M))


@pytest.mark.parametrize("preset", [RPI5, ARM], ids=lambda p: p.name)
def test_v1_assembly_has_the_lookups_and_widening(preset):
    asm = assembly(k8.gemv_int8(64, 512, 128, True, True, False), preset)
    # 16 lookups per 16-input step of a tile (2 planes x 2 nibbles x 2 columns x TL/TH), 16 per table build
    assert count(asm, "tbl") >= 32
    assert count(asm, "umlal") + count(asm, "umlal2") >= 4, "TH sums are widened with umlal (x 16)"
    assert count(asm, "uaddw") >= 4 and count(asm, "ushr") >= 4
    assert count(asm, "fcvtl") + count(asm, "fcvtl2") >= 2, "fp16 scales are converted with fcvtl"
    assert "zmm" not in asm and "ymm" not in asm


def test_gemm_assembly_is_sdot_against_broadcast_inputs():
    asm = assembly(kg.gemm_int8(256, 512, 128, True, True, False), RPI5)
    # per 4 inputs: 2 rows x 4 row groups x 2 planes
    assert count(asm, "sdot") >= 16 and count(asm, "ld1r") >= 2
    assert count(asm, "tbl") >= 8 and count(asm, "cmtst") >= 1, "the planes are expanded with tbl and cmtst"


def test_generic_arm_build_uses_no_armv8_2_instructions():
    """The ``arm`` preset runs on any ARMv8-A core: no dot product (sdot/udot), no fp16 arithmetic."""
    asm = assembly(kv.gemv_v2_int8(64, 512, 128, True, True, True, True, True, 2), ARM)
    assert count(asm, "sdot") == count(asm, "udot") == 0
    assert not re.search(r"^\s+f(add|mul|mla)\s+v\d+\.(8|4)h", asm, flags=re.M)
    assert count(asm, "bif") + count(asm, "bsl") + count(asm, "cmtst") >= 1, "the residual walk selects by plane bits"
    assert count(asm, "bic") >= 1, "group 0's planes are P & ~grp (bic)"


# --------------------------------------------------------------------------------------------------------
# registry


def call(one_row=True, groups=False, residual=False, k=576):
    return registry.Call(1536, k, 64, one_row, 16, "uint8", True, True, False, has_groups=groups,
                         has_residual=residual, residual_bytes=2 if residual else 0)


@pytest.mark.parametrize("preset", [get_preset(name) for name in ("arm", "rpi5", "jetson-orin")], ids=lambda p: p.name)
def test_registry_picks_the_neon_kernels(preset):
    int8 = registry.for_target(preset, CompileOptions("int8"))
    assert registry.target_layout(preset, CompileOptions("int8")) == arm_neon.LAYOUT
    assert registry.select(int8, call())[0].name == "arm_neon.gemv_int8"
    assert registry.select(int8, call(groups=True, residual=True))[0].name == "arm_neon.gemv_v2_int8"
    prompt = registry.select(int8, call(one_row=False))
    if "asimddp" in preset.features:  # dot-product cores: the sdot GEMM
        assert prompt[0].name == "arm_neon.gemm_int8"
    else:  # the generic preset: the TE kernel
        assert prompt is None
    v2_prompt = registry.select(int8, call(one_row=False, groups=True, residual=True))
    assert (v2_prompt[0].name == "arm_neon.gemm_v2_int8") if "asimddp" in preset.features else v2_prompt is None
    # fp32 activations: no NEON fp32 kernel yet, the TE kernel reads the interchange layout
    assert registry.for_target(preset, CompileOptions()) == []
    assert registry.target_layout(preset, CompileOptions()) == registry.ROW_MAJOR
    # x86 kernels never serve an ARM preset, nor NEON kernels an x86 one
    assert all(e.isa == "aarch64" for e in int8)
    assert not any(e.isa == "aarch64" for e in registry.for_target(get_preset("x86-avx2"), CompileOptions("int8")))
