"""The int8-activation GEMV (vpshufb lookup tables): numerics against its numpy oracle and the fp32 op, assembly,
and its wiring.

The oracle (``sparse_binary_gemv_int8.reference``) does the same per-group quantisation of ``x`` and then
exact integer dot products, so the kernel must match it to float32 rounding; against the fp32 op (the
float64 dense reference of the unquantised product) it may differ by the 8-bit rounding of ``x`` only.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

tvm_compat = pytest.importorskip("pbs2pc.compiler.tvm_compat")

from pbs2pc.compiler.tvm_compat import tvm  # noqa: E402
from pbs2pc.errors import Pbs2pcError, UnsupportedError  # noqa: E402
from pbs2pc.passes.interleave_rows import interleave_array  # noqa: E402
from pbs2pc.passes.kernels import sparse_binary_gemv_int8 as k8  # noqa: E402
from testutil import X86, rel_err  # noqa: E402

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512", "mattr": ["+avx512vnni", "+avx512vbmi"],
                            "num-cores": 2})


def _layer(n, k, g, has_mask, has_mu, has_bias, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, k)).astype(np.float32)
    x[0, :g] *= 20  # groups with different ranges: per-group scales must not be mixed up
    sign = rng.integers(0, 256, (n, k // 8)).astype(np.uint8)
    mask = rng.integers(0, 256, (n, k // 8)).astype(np.uint8) if has_mask else None
    alpha = (rng.random((n, k // g)) + 0.5).astype(np.float16)
    mu = (rng.standard_normal((n, k // g)) * 0.2).astype(np.float16) if has_mu else None
    bias = rng.standard_normal(n).astype(np.float32) if has_bias else None
    return x, sign, mask, alpha, mu, bias


def _build(n, k, g, has_mask, has_mu, has_bias):
    func = k8.gemv_int8(n, k, g, has_mask, has_mu, has_bias).with_attr("global_symbol", "gemv")
    return tvm.compile(tvm.IRModule({"gemv": func}), target=TARGET)


def _run(lib, x, sign, mask, alpha, mu, bias):
    args = [x, interleave_array(sign, 16)]
    args += [interleave_array(mask, 16)] if mask is not None else []
    args += [interleave_array(alpha, 16)] + ([interleave_array(mu, 16)] if mu is not None else [])
    args += [bias] if bias is not None else []
    tensors = [tvm.runtime.tensor(a) for a in args] + [tvm.runtime.tensor(np.zeros((1, sign.shape[0]), np.float32))]
    lib["gemv"](*tensors)
    return tensors[-1].numpy()[0]


def _dense(x, sign, mask, alpha, mu, bias, g):
    s = np.unpackbits(sign, axis=1, bitorder="little").astype(np.float64)
    m = np.ones_like(s) if mask is None else np.unpackbits(mask, axis=1, bitorder="little")
    a = np.repeat(alpha.astype(np.float64), g, axis=1)
    u = 0 if mu is None else np.repeat(mu.astype(np.float64), g, axis=1)
    y = (m * (a * (2 * s - 1) + u)) @ x[0].astype(np.float64)
    return y if bias is None else y + bias


@pytest.mark.parametrize("n, k, g, has_mask, has_mu, has_bias", [
    (1536, 576, 64, True, True, False),  # SmolLM2 gate/up, 6:8 with mu
    (576, 1536, 64, True, True, True),  # down, with a bias
    (48, 256, 128, True, False, False),  # no mu; 3 tiles of 16 rows (odd tile count: one tile per task)
    (64, 128, 64, False, True, False),  # dense binary (n = m): no mask plane
    (16, 64, 32, False, False, True),  # smallest: one tile, the smallest group (32: one 64-byte plane load)
    (96, 384, 128, True, True, True),  # 6 tiles: two tasks of 2 tiles (the 4-tile task does not divide)
])
def test_matches_oracle_and_fp32(n, k, g, has_mask, has_mu, has_bias):
    layer = _layer(n, k, g, has_mask, has_mu, has_bias)
    got = _run(_build(n, k, g, has_mask, has_mu, has_bias), *layer)
    assert rel_err(got, k8.reference(layer[0][0], *layer[1:], group_size=g)) < 1e-5
    # Against the unquantised op: the 8-bit rounding of x (about 0.4 % of a group's range per element).
    err = rel_err(got, _dense(*layer, g))
    assert 1e-6 < err < 2e-2


def test_zero_group_quantises_to_zero():
    x, sign, mask, alpha, mu, bias = _layer(32, 256, 64, True, True, False)
    x[0, 64:128] = 0  # a group of zeros: scale 0, no division by zero
    got = _run(_build(32, 256, 64, True, True, False), x, sign, mask, alpha, mu, bias)
    assert np.isfinite(got).all()
    assert rel_err(got, k8.reference(x[0], sign, mask, alpha, mu, bias, 64)) < 1e-5


def test_assembly_looks_up_tables_with_vpshufb():
    asm = _build(64, 256, 64, True, True, False).mod.inspect_source("asm")
    assert len(re.findall(r"vpshufb\s+%zmm\d+, %zmm", asm)) >= 8, "the lookups are not 512-bit vpshufb"
    assert re.search(r"vpunpcklbw\s+.*%zmm", asm) and re.search(r"vpunpckhbw\s+.*%zmm", asm), \
        "table bytes are not widened to int16 with unpacks"
    assert re.search(r"vpaddw\s+.*%zmm", asm), "no int16 accumulation"
    assert not re.search(r"vpgather|vgather", asm), "the GEMV gathers"


def test_supported_shapes():
    assert k8.supported(1536, 576, 64, 16, "uint8")
    assert not k8.supported(1536, 576, 64, 0, "uint8")  # row-major planes: the fp32 kernel runs them
    assert not k8.supported(1536, 576, 64, 16, "uint32")
    assert not k8.supported(40, 576, 64, 16, "uint8")  # N not a multiple of 16
    assert not k8.supported(64, 576, 16, 16, "uint8")  # a group narrower than one 64-byte plane load (32)
    assert not k8.supported(64, 576, 8, 16, "uint8")


def test_presets_accept_int8_only_with_vnni():
    from pbs2pc.compiler.targets import get_preset

    assert get_preset("x86").with_activations("int8").activations == "int8"
    with pytest.raises(UnsupportedError, match="no int8-activation kernels"):
        get_preset("arm").with_activations("int8")
    with pytest.raises(Pbs2pcError, match="choose fp32 or int8"):
        get_preset("x86").with_activations("int4")


def test_compiled_model_uses_int8_gemvs_in_decode_only(tiny_onnx, tiny_library, tmp_path):
    from pbs2pc.compiler.build import compile_model
    from pbs2pc.runtime import load

    manifest = compile_model(tiny_onnx, tmp_path / "int8.so", X86, dump_ir=tmp_path / "ir", activations="int8")
    assert manifest["activations"] == "int8"
    lowered = (tmp_path / "ir" / "02_lower_pbs2p.py").read_text()

    def calls(function):  # int8 GEMV calls in one Relax function of the dumped module
        start = lowered.index(f"    def {function}(")
        end = lowered.find("\n    @", start)
        return lowered[start:end if end > 0 else None].count("cls.sparse_binary_gemv_int8")

    assert calls("decode") == 14  # 7 linear layers x 2 decoder layers
    assert calls("main") == calls("prefill") == 0  # the prompt keeps fp32 activations

    ids = [5, 9, 100, 7]
    fp32, int8 = load(tiny_library), load(tmp_path / "int8.so")
    steps = {}
    for name, model in (("fp32", fp32), ("int8", int8)):
        prompt = model.prefill(ids[:3], 64)
        steps[name] = (prompt, model.step(ids[3]))
    np.testing.assert_array_equal(steps["fp32"][0], steps["int8"][0])  # the prompt stays fp32
    err = rel_err(steps["int8"][1], steps["fp32"][1])
    assert 1e-7 < err < 5e-2  # decode: int8 activations, close to fp32 but not identical
