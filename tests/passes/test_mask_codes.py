"""Mask pattern codes (the x86 target layout of n:m masks): the format, its expansion kernel, the GEMVs that
read codes, and the EncodeMaskCodes params transform end to end.

Masks here are valid n:m masks (random patterns of the scheme), never zeros; each coded GEMV is checked
against the same oracle as its plane-reading form (fp32: the float64 dense product; int8: the quantised
integer oracle), with the weights given the way the build stores them (``sign & mask``, codes).
"""

from __future__ import annotations

import re

import numpy as np
import pytest

pytest.importorskip("pbs2pc.compiler.tvm_compat")

from pbs2pc.compiler.tvm_compat import tvm  # noqa: E402
from pbs2pc.errors import FormatError  # noqa: E402
from pbs2pc.passes.interleave_rows import interleave_array  # noqa: E402
from pbs2pc.passes.kernels.x86_avx512 import mask_codes  # noqa: E402
from pbs2pc.passes.kernels.x86_avx512 import sparse_binary_gemv as k32  # noqa: E402
from pbs2pc.passes.kernels.x86_avx512 import sparse_binary_gemv_int8 as k8  # noqa: E402
from testutil import rel_err, requires  # noqa: E402

#: The numerics run the AVX-512 kernels: on a CPU without AVX-512 they skip (their assembly is still checked).
runs_avx512 = requires("x86-avx512")

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512", "mattr": ["+avx512vnni", "+avx512vbmi"],
                            "num-cores": 2})
SCHEMES = [(6, 8), (7, 8), (2, 8), (1, 4), (3, 4), (1, 2)]


def _mask(n_out, k, n, m, rng):
    pats = np.array(mask_codes.patterns(n, m), np.uint8)
    return pats[rng.integers(0, len(pats), (n_out, k // 8))]


def _build(func, name="f"):
    return tvm.compile(tvm.IRModule({name: func.with_attr("global_symbol", name)}), target=TARGET)


def test_which_schemes_have_codes():
    assert len(mask_codes.patterns(6, 8)) == 28 and len(mask_codes.patterns(1, 4)) == 16
    assert all(bin(p).count("1") == 6 for p in mask_codes.patterns(6, 8))
    assert all(mask_codes.has_code(n, m) for n, m in SCHEMES)
    assert not mask_codes.has_code(2, 4)  # 36 patterns per byte
    assert not mask_codes.has_code(4, 8) and not mask_codes.has_code(5, 8)  # 70 and 56
    assert not mask_codes.has_code(8, 8)  # dense: no mask at all
    assert not mask_codes.has_code(8, 16)  # a group spans two bytes
    assert mask_codes.supported(1536, 576, 6, 8) and not mask_codes.supported(40, 576, 6, 8)
    assert not mask_codes.supported(1536, 584, 6, 8)  # K not whole chunks of 32 columns
    # 40 bytes per 16 rows x 32 columns + 24 tail bytes per tile: 0.628 bits per weight at K = 4096
    assert mask_codes.code_width(4096) == 128 * 40 + 24
    assert abs(mask_codes.bits_per_weight(4096) - 0.6279) < 1e-4


@pytest.mark.parametrize("n, m", SCHEMES)
def test_encode_decode_round_trip(n, m):
    rng = np.random.default_rng(n * 10 + m)
    mask = _mask(48, 96, n, m, rng)
    codes = mask_codes.encode(mask, n, m)
    assert codes.shape == (3, mask_codes.code_width(96)) and codes.dtype == np.uint8
    assert not codes[:, -mask_codes.TAIL_BYTES:].any()
    assert (mask_codes.decode(codes, n, m, 96) == mask).all()


def test_encode_rejects_a_mask_outside_its_scheme():
    mask = _mask(16, 64, 6, 8, np.random.default_rng(0))
    mask[3, 2] = 0b00011111  # 5 of 8 kept
    with pytest.raises(FormatError, match=r"mask row 3 is not 6:8"):
        mask_codes.encode(mask, 6, 8)


@runs_avx512
@pytest.mark.parametrize("n_out, k, n, m", [(64, 256, 6, 8), (32, 96, 1, 4), (2048, 256, 7, 8)])
def test_expansion_kernel_writes_the_interleaved_planes(n_out, k, n, m):
    # 2048 x 256: large enough to split its tiles over threads
    mask = _mask(n_out, k, n, m, np.random.default_rng(k))
    out = tvm.runtime.tensor(np.full((n_out // 16, k // 8, 16), 0xAA, np.uint8))
    _build(mask_codes.expand_mask(n_out, k, n, m))["f"](tvm.runtime.tensor(mask_codes.encode(mask, n, m)), out)
    assert (out.numpy() == interleave_array(mask, 16)).all()


def _coded_layer(n_out, k, g, n, m, has_mu, has_bias, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, k)).astype(np.float32)
    x[0, :g] *= 20  # groups with different ranges
    sign = rng.integers(0, 256, (n_out, k // 8)).astype(np.uint8)  # sign bits under pruned weights too
    mask = _mask(n_out, k, n, m, rng)
    alpha = (rng.random((n_out, k // g)) + 0.5).astype(np.float16)
    mu = (rng.standard_normal((n_out, k // g)) * 0.2).astype(np.float16) if has_mu else None
    bias = rng.standard_normal(n_out).astype(np.float32) if has_bias else None
    return x, sign, mask, alpha, mu, bias


def _run_coded(lib, n, m, x, sign, mask, alpha, mu, bias):
    # the arrays as the build stores them: P = sign & mask interleaved, the mask as codes
    args = [x, interleave_array(sign & mask, 16), mask_codes.encode(mask, n, m), interleave_array(alpha, 16)]
    args += ([interleave_array(mu, 16)] if mu is not None else []) + ([bias] if bias is not None else [])
    tensors = [tvm.runtime.tensor(a) for a in args] + [tvm.runtime.tensor(np.zeros((1, sign.shape[0]), np.float32))]
    lib["f"](*tensors)
    return tensors[-1].numpy()[0]


CODED_SHAPES = [
    (1536, 576, 64, 6, 8, True, False),  # SmolLM2 gate/up
    (576, 1536, 64, 6, 8, True, True),  # down, with a bias
    (48, 256, 128, 7, 8, False, False),  # no mu, 3 tiles (one per task)
    (32, 96, 32, 1, 4, True, True),  # the smallest group the codes allow, 3 groups
    (96, 384, 128, 3, 4, True, True),
    (16, 64, 32, 1, 2, False, True),
]


@runs_avx512
@pytest.mark.parametrize("n_out, k, g, n, m, has_mu, has_bias", CODED_SHAPES)
def test_coded_gemvs_match_their_oracles(n_out, k, g, n, m, has_mu, has_bias):
    layer = _coded_layer(n_out, k, g, n, m, has_mu, has_bias)
    fp32 = _build(k32.gemv_fp32(n_out, k, g, True, has_mu, has_bias, codes=(n, m)))
    assert rel_err(_run_coded(fp32, n, m, *layer), k32.reference(layer[0][0], *layer[1:], group_size=g)) < 2e-6
    int8 = _build(k8.gemv_int8(n_out, k, g, True, has_mu, has_bias, codes=(n, m)))
    assert rel_err(_run_coded(int8, n, m, *layer), k8.reference(layer[0][0], *layer[1:], group_size=g)) < 1e-5


def test_coded_gemv_assembly_extracts_codes_and_looks_them_up():
    fp32 = _build(k32.gemv_fp32(64, 256, 64, True, True, False, codes=(6, 8))).mod.inspect_source("asm")
    int8 = _build(k8.gemv_int8(64, 256, 64, True, True, False, codes=(6, 8))).mod.inspect_source("asm")
    for asm in (fp32, int8):
        assert re.search(r"vpmultishiftqb\s+.*%zmm", asm), "codes are not extracted with vpmultishiftqb"
        assert not re.search(r"vpgather|vgather", asm), "the GEMV gathers"
    assert re.search(r"vperm[it]2ps\s+.*%zmm", fp32), "XM is not looked up by code with vpermi2ps"
    assert re.search(r"vperm[it]2b\s+.*%zmm", int8), "IM is not looked up by code with vpermi2b"


@runs_avx512
def test_coded_and_plane_gemvs_agree_on_the_same_layer():
    # the same weights through both layouts: the fp32 kernels sum in different orders, the int8 ones exactly
    layer = _coded_layer(96, 384, 128, 6, 8, True, True, seed=5)
    x, sign, mask, alpha, mu, bias = layer
    planes = [x, interleave_array(sign, 16), interleave_array(mask, 16), interleave_array(alpha, 16),
              interleave_array(mu, 16), bias]
    for kernel, tol in ((k32.gemv_fp32, 1e-6), (k8.gemv_int8, 1e-6)):
        coded = _run_coded(_build(kernel(96, 384, 128, True, True, True, codes=(6, 8))), 6, 8, *layer)
        lib = _build(kernel(96, 384, 128, True, True, True))
        tensors = [tvm.runtime.tensor(a) for a in planes] + [tvm.runtime.tensor(np.zeros((1, 96), np.float32))]
        lib["f"](*tensors)
        assert rel_err(coded, tensors[-1].numpy()[0]) < tol


def test_the_avx512_kernels_choose_coded_interleaved_byte_planes():
    from pbs2pc.compiler.targets import CompileOptions, get_preset
    from pbs2pc.passes.kernels import registry

    layout = registry.target_layout(get_preset("x86-avx512"), CompileOptions())
    assert layout == registry.Layout(word_bits=8, interleave=16, mask_codes=True)
    assert registry.target_layout(get_preset("x86-avx512"), CompileOptions("int8")) == layout
    assert not registry.target_layout(get_preset("x86-avx2"), CompileOptions()).mask_codes  # VBMI expansion
