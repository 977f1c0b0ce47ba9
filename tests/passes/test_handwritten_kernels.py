"""The hand-written x86 kernels: numerics against numpy oracles, assembly, and their wiring.

* fp32 (``sparse_binary_gemv``, vpermps lookup tables, the x86 default for one-row calls): against the
  float64 dense product to float32 rounding.
* int8 activations (``sparse_binary_gemv_int8``, vpermb tables, ``--activations int8``): its oracle does the
  same per-group quantisation of ``x`` and then exact integer dot products, so the kernel must match it to
  float32 rounding; against the float64 dense product it may differ by the 8-bit rounding of ``x`` only.
* int8 GEMM (``sparse_binary_gemm_int8``, vpdpbusd, the prompt with ``--activations int8``): the same oracle
  row by row, for M = 1, 2, 3, 17 and 128.
* fp32 GEMM (``sparse_binary_gemm``, vpermps lookup tables, the x86 default for the prompt): the float64
  dense product row by row, for M = 1 to 5, 17, 64, 65, 128 and 130, with tasks owning rows and owning tiles.

The GEMVs' forms that read masks as pattern codes are tested in test_mask_codes.py.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

tvm_compat = pytest.importorskip("pbs2pc.compiler.tvm_compat")

from pbs2pc.compiler.tvm_compat import tvm  # noqa: E402
from pbs2pc.errors import Pbs2pcError, UnsupportedError  # noqa: E402
from pbs2pc.passes.interleave_rows import interleave_array  # noqa: E402
from pbs2pc.passes.kernels.x86_avx512 import sparse_binary_gemm as g32  # noqa: E402
from pbs2pc.passes.kernels.x86_avx512 import sparse_binary_gemm_int8 as g8  # noqa: E402
from pbs2pc.passes.kernels.x86_avx512 import sparse_binary_gemv as k32  # noqa: E402
from pbs2pc.passes.kernels.x86_avx512 import sparse_binary_gemv_int8 as k8  # noqa: E402
from testutil import rel_err, requires  # noqa: E402

#: The numerics run the AVX-512 kernels: on a CPU without AVX-512 they skip (their assembly is still checked).
runs_avx512 = requires("x86-avx512")
AVX512 = "x86-avx512"

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


def _build(n, k, g, has_mask, has_mu, has_bias, kernel=k8.gemv_int8):
    func = kernel(n, k, g, has_mask, has_mu, has_bias).with_attr("global_symbol", "gemv")
    return tvm.compile(tvm.IRModule({"gemv": func}), target=TARGET)


def _run(lib, x, sign, mask, alpha, mu, bias):  # x [M, K] -> y [M, N]
    args = [x, interleave_array(sign, 16)]
    args += [interleave_array(mask, 16)] if mask is not None else []
    args += [interleave_array(alpha, 16)] + ([interleave_array(mu, 16)] if mu is not None else [])
    args += [bias] if bias is not None else []
    out = np.zeros((x.shape[0], sign.shape[0]), np.float32)
    tensors = [tvm.runtime.tensor(a) for a in args] + [tvm.runtime.tensor(out)]
    lib["gemv"](*tensors)
    return tensors[-1].numpy()[0] if x.shape[0] == 1 else tensors[-1].numpy()


def _dense(x, sign, mask, alpha, mu, bias, g):
    return k32.reference(x[0], sign, mask, alpha, mu, bias, g)


SHAPES = [
    (1536, 576, 64, True, True, False),  # SmolLM2 gate/up, 6:8 with mu
    (576, 1536, 64, True, True, True),  # down, with a bias
    (48, 256, 128, True, False, False),  # no mu; 3 tiles of 16 rows (odd tile count: one tile per task)
    (64, 128, 64, False, True, False),  # dense binary (n = m): no mask plane
    (16, 64, 32, False, False, True),  # smallest for int8: one tile, a group of one 64-byte plane load
    (96, 384, 128, True, True, True),  # 6 tiles: tasks of 2 tiles
]


@runs_avx512
@pytest.mark.parametrize("n, k, g, has_mask, has_mu, has_bias", SHAPES + [
    (16, 48, 16, True, True, True),  # fp32 only: the smallest group (one plane byte per row), K = 3 groups
    (32, 24, 8, False, True, False),  # fp32 only: a group of 8
])
def test_fp32_matches_dense_product(n, k, g, has_mask, has_mu, has_bias):
    layer = _layer(n, k, g, has_mask, has_mu, has_bias)
    got = _run(_build(n, k, g, has_mask, has_mu, has_bias, kernel=k32.gemv_fp32), *layer)
    assert rel_err(got, _dense(*layer, g)) < 2e-6  # float32 sums of float32 subset sums


@runs_avx512
@pytest.mark.parametrize("n, k, g, has_mask, has_mu, has_bias", SHAPES)
def test_int8_matches_oracle_and_fp32(n, k, g, has_mask, has_mu, has_bias):
    layer = _layer(n, k, g, has_mask, has_mu, has_bias)
    got = _run(_build(n, k, g, has_mask, has_mu, has_bias), *layer)
    assert rel_err(got, k8.reference(layer[0][0], *layer[1:], group_size=g)) < 1e-5
    # Against the unquantised op: the 8-bit rounding of x (about 0.4 % of a group's range per element).
    err = rel_err(got, _dense(*layer, g))
    assert 1e-6 < err < 2e-2


@runs_avx512
@pytest.mark.parametrize("rows", [1, 2, 3, 17])
@pytest.mark.parametrize("n, k, g, has_mask, has_mu, has_bias", SHAPES + [
    (16, 48, 16, True, True, True),  # the smallest group (16): the GEMV lacks it, the GEMM has it
])
def test_int8_gemm_matches_oracle_row_by_row(rows, n, k, g, has_mask, has_mu, has_bias):
    layer = list(_layer(n, k, g, has_mask, has_mu, has_bias))
    x = np.random.default_rng(rows).standard_normal((rows, k)).astype(np.float32)
    x[:, :g] *= np.arange(1, rows + 1, dtype=np.float32)[:, None] * 10  # rows and groups with their own scales
    layer[0] = x
    got = _run(_build(n, k, g, has_mask, has_mu, has_bias, kernel=g8.gemm_int8), *layer).reshape(rows, n)
    want = np.stack([k8.reference(row, *layer[1:], group_size=g) for row in x])
    assert rel_err(got, want) < 1e-5


@runs_avx512
@pytest.mark.parametrize("n, k, g, has_mask, has_mu, has_bias", SHAPES + [
    (16, 48, 16, True, True, True),  # the smallest group with a mask, K = 3 groups
    (32, 24, 8, False, True, False),  # a group of 8 (one plane byte)
    (80, 640, 64, True, True, False),  # 5 tiles: one tile per task; K = 640 ends in a partial index chunk
])
@pytest.mark.parametrize("split, table_bytes", [
    ("rows", None),  # tasks own rows (the small layers' schedule): 130 rows -> 7 tasks of 20, the last of 10
    ("tiles", g32.TABLE_BYTES),  # tasks own output tiles, every row's tables in one chunk
    ("tiles", 0),  # the same in chunks of 64 rows (65, 130: 2 and 3 chunks)
])
def test_fp32_gemm_matches_dense_product_row_by_row(n, k, g, has_mask, has_mu, has_bias, split, table_bytes,
                                                    monkeypatch):
    monkeypatch.setattr(g32, "ROW_SPLIT_MAX_WEIGHTS", n * k if split == "rows" else n * k - 1)
    if table_bytes is not None:
        monkeypatch.setattr(g32, "TABLE_BYTES", table_bytes)
    layer = list(_layer(n, k, g, has_mask, has_mu, has_bias))
    lib = _build(n, k, g, has_mask, has_mu, has_bias, kernel=g32.gemm_fp32)
    for rows in (1, 2, 3, 4, 5, 17, 64, 65, 128, 130):
        x = np.random.default_rng(rows).standard_normal((rows, k)).astype(np.float32)
        x[:, :g] *= np.arange(1, rows + 1, dtype=np.float32)[:, None]  # rows and groups with their own ranges
        layer[0] = x
        got = _run(lib, *layer).reshape(rows, n)
        want = np.stack([k32.reference(row, *layer[1:], group_size=g) for row in x])
        assert rel_err(got, want) < 2e-6, f"{rows} rows"


def _errors_on_this_process_threads():
    """Every parallel kernel form on SmolLM2-sized layers against its oracle, as ``{form: relative error}``
    (run by the test below in a child process with 3 threads)."""
    errs = {}
    for n, k, g, has_mask, has_mu, has_bias in [(1536, 576, 64, True, True, False), (576, 1536, 64, True, True, True)]:
        layer = list(_layer(n, k, g, has_mask, has_mu, has_bias))
        errs[f"fp32 gemv {n}x{k}"] = rel_err(_run(_build(n, k, g, has_mask, has_mu, has_bias, kernel=k32.gemv_fp32),
                                                  *layer), _dense(*layer, g))
        errs[f"int8 gemv {n}x{k}"] = rel_err(_run(_build(n, k, g, has_mask, has_mu, has_bias), *layer),
                                             k8.reference(layer[0][0], *layer[1:], group_size=g))
        x = np.random.default_rng(1).standard_normal((130, k)).astype(np.float32)
        layer[0] = x
        oracle = {"fp32": np.stack([k32.reference(row, *layer[1:], group_size=g) for row in x]),
                  "int8": np.stack([k8.reference(row, *layer[1:], group_size=g) for row in x])}
        for split, limit in (("rows", n * k), ("tiles", 0)):
            g32.ROW_SPLIT_MAX_WEIGHTS = limit
            lib = _build(n, k, g, has_mask, has_mu, has_bias, kernel=g32.gemm_fp32)
            errs[f"fp32 gemm {split} {n}x{k}"] = rel_err(_run(lib, *layer), oracle["fp32"])
        lib = _build(n, k, g, has_mask, has_mu, has_bias, kernel=g8.gemm_int8)
        errs[f"int8 gemm {n}x{k}"] = rel_err(_run(lib, *layer), oracle["int8"])
    return errs


@runs_avx512
def test_parallel_kernels_match_their_oracles_on_three_threads(tmp_path):
    # The suite's own process runs TVM's default pool (one thread on a 2-CPU machine), where a parallel
    # loop is one task: here the tasks really are split over threads (the GEMVs' tasks read the tables the
    # calling thread built; the GEMM's table stage and tile stage run on all of them).
    import json
    import os
    import subprocess
    import sys

    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import json, sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/passes']; "
            "import test_handwritten_kernels as t, tvm_ffi; "
            "print(json.dumps({'threads': tvm_ffi.get_global_func('runtime.NumThreads')(), "
            "'errors': t._errors_on_this_process_threads()}))")
    env = {**os.environ, "TVM_NUM_THREADS": "3"}
    done = subprocess.run([sys.executable, "-c", code, tests], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["threads"] >= 2
    assert len(result["errors"]) == 10
    for form, err in result["errors"].items():
        assert err < 2e-6 if form.startswith("fp32") else err < 1e-5, f"{form}: {err}"


@runs_avx512
def test_int8_gemm_prompt_sized():
    layer = list(_layer(576, 1536, 64, True, True, True))
    layer[0] = np.random.default_rng(1).standard_normal((128, 1536)).astype(np.float32)
    got = _run(_build(576, 1536, 64, True, True, True, kernel=g8.gemm_int8), *layer)
    want = np.stack([k8.reference(row, *layer[1:], group_size=64) for row in layer[0]])
    assert rel_err(got, want) < 1e-5


@runs_avx512
def test_zero_group_quantises_to_zero():
    x, sign, mask, alpha, mu, bias = _layer(32, 256, 64, True, True, False)
    x[0, 64:128] = 0  # a group of zeros: scale 0, no division by zero
    got = _run(_build(32, 256, 64, True, True, False), x, sign, mask, alpha, mu, bias)
    assert np.isfinite(got).all()
    assert rel_err(got, k8.reference(x[0], sign, mask, alpha, mu, bias, 64)) < 1e-5


def test_fp32_assembly_looks_up_tables_with_vpermps():
    asm = _build(64, 256, 64, True, True, False, kernel=k32.gemv_fp32).mod.inspect_source("asm")
    assert len(re.findall(r"vperm(?:ps|d)\s+%zmm\d+, %zmm\d+, %zmm", asm)) >= 8, "the lookups are not vpermps"
    assert re.search(r"vpermb\s+.*%zmm", asm), "row bytes are not spread over int32 lanes with vpermb"
    assert not re.search(r"vpgather|vgather|vpmovzxbd", asm), "the GEMV gathers or widens bytes one by one"


def test_int8_assembly_looks_up_tables_with_vpermb_and_sums_with_vnni():
    asm = _build(64, 256, 64, True, True, False).mod.inspect_source("asm")
    assert len(re.findall(r"vpermb\s+%zmm\d+, %zmm\d+, %zmm", asm)) >= 8, "the lookups are not 512-bit vpermb"
    assert len(re.findall(r"vpdpbusd\s+%zmm", asm)) >= 8, "table bytes are not summed per row with vpdpbusd"
    assert not re.search(r"(vpunpck[lh]bw|vpaddw)\s+.*%zmm", asm), "table bytes are still widened through int16"
    assert not re.search(r"vpgather|vgather", asm), "the GEMV gathers"


def test_fp32_gemm_assembly_looks_up_tables_without_fmas():
    asm = _build(64, 256, 64, True, True, False, kernel=g32.gemm_fp32).mod.inspect_source("asm")
    # the register block: 4 rows x 2 tiles x 2 planes lookups per 4 inputs, each added into its accumulator
    assert len(re.findall(r"vpermps\s+%zmm\d+, %zmm\d+, %zmm", asm)) >= 16, "the lookups are not vpermps"
    assert not re.search(r"vptestm[bd]", asm), "weights are decoded bit by bit, as in the TE kernel"


def test_int8_gemm_assembly_uses_vnni():
    asm = _build(64, 256, 64, True, True, False, kernel=g8.gemm_int8).mod.inspect_source("asm")
    assert len(re.findall(r"vpdpbusd\s+%zmm", asm)) >= 16, "the row blocks are not 512-bit vpdpbusd"
    assert re.search(r"vptestmb\s+.*%k\d", asm), "plane bits are not tested into mask registers"
    assert re.search(r"vpbroadcastd\s+.*%zmm", asm), "4 int8 inputs are not broadcast per row"
    assert not re.search(r"vpgather|vgather", asm), "the GEMM gathers"


def test_small_gemvs_run_on_one_thread():
    # a parallel launch costs more than a 192x576 layer's work; larger layers split their tiles over threads
    for kernel in (k32.gemv_fp32, k8.gemv_int8):
        assert "T.parallel" not in kernel(192, 576, 64, True, True, False).script()
        assert "T.parallel" in kernel(1536, 576, 64, True, True, False).script()


def test_gemm_splits_small_layers_by_rows_and_large_ones_by_tiles():
    # small: one parallel loop over row slices; large: a parallel table stage, then one over tiles
    assert g32.gemm_fp32(1536, 576, 64, True, True, False).script().count("T.parallel") == 1
    assert g32.gemm_fp32(4096, 4096, 128, True, True, False).script().count("T.parallel") == 2


def test_supported_shapes():
    assert k32.supported(1536, 576, 64, 16, "uint8") and k32.supported(16, 48, 16, 16, "uint8")
    assert not k32.supported(1536, 576, 64, 0, "uint8")  # row-major planes: the TE kernel runs them
    assert not k32.supported(1536, 576, 64, 16, "uint32")
    assert not k32.supported(40, 576, 64, 16, "uint8")  # N not a multiple of 16
    assert not k32.supported(16, 576, 36, 16, "uint8")  # a group that is not whole plane bytes
    assert k8.supported(1536, 576, 64, 16, "uint8")
    assert not k8.supported(1536, 576, 64, 0, "uint8")  # row-major planes: the fp32 kernel runs them
    assert not k8.supported(1536, 576, 64, 16, "uint32")
    assert not k8.supported(40, 576, 64, 16, "uint8")  # N not a multiple of 16
    assert not k8.supported(64, 576, 16, 16, "uint8")  # a group narrower than one 64-byte plane load (32)
    assert not k8.supported(64, 576, 8, 16, "uint8")
    assert k8.supported(64, 4096, 2048, 16, "uint8")  # int32 sums: any group size
    assert g8.supported(16, 48, 16, 16, "uint8") and g8.supported(64, 4096, 2048, 16, "uint8")
    assert not g8.supported(64, 576, 8, 16, "uint8")  # a group narrower than one quantisation vector
    assert not g8.supported(40, 576, 64, 16, "uint8")
    assert g32.supported(16, 48, 16, 16, "uint8") and g32.supported(32, 24, 8, 16, "uint8")
    assert not g32.supported(1536, 576, 64, 0, "uint8")  # row-major planes: the TE kernel runs them
    assert not g32.supported(40, 576, 64, 16, "uint8") and not g32.supported(16, 576, 36, 16, "uint8")


def test_presets_accept_int8_only_where_they_have_its_kernel():
    from pbs2pc.compiler.targets import CompileOptions, get_preset

    for name in ("x86-avx512", "x86-avx2", "arm", "rpi5", "jetson-orin"):
        assert CompileOptions("int8").check(get_preset(name)).activations == "int8"
    with pytest.raises(UnsupportedError, match="no int8-activation kernels"):
        CompileOptions("int8").check(get_preset("cuda"))
    with pytest.raises(Pbs2pcError, match="choose fp32 or int8"):
        CompileOptions("int4")


def _calls(dumped_ir, function, kernel):
    """Calls of ``kernel`` (a PrimFunc name prefix) in one Relax function of a dumped module."""
    start = dumped_ir.index(f"    def {function}(")
    end = dumped_ir.find("\n    @", start)
    return dumped_ir[start:end if end > 0 else None].count(f"cls.{kernel}")


def test_avx512_model_uses_fp32_gemvs_in_decode_and_gemms_in_the_prompt(tiny_onnx, tmp_path):
    """Compile-only (any host): which kernel the registry picks for each call of the x86-avx512 build."""
    from pbs2pc.compiler.build import compile_model

    manifest = compile_model(tiny_onnx, tmp_path / "fp32.so", AVX512, dump_ir=tmp_path / "ir")
    assert manifest["kernels"] == ["x86_avx512.gemm_fp32", "x86_avx512.gemv_fp32"]
    lowered = next((tmp_path / "ir").glob("*_lower_pbs2p.py")).read_text()
    assert _calls(lowered, "decode", "sparse_binary_gemv_g") == 14  # 7 linear layers x 2 decoder layers
    assert _calls(lowered, "main", "sparse_binary_gemv") == _calls(lowered, "prefill", "sparse_binary_gemv") == 0
    assert _calls(lowered, "main", "sparse_binary_gemm_g") == _calls(lowered, "prefill", "sparse_binary_gemm_g") == 14
    assert _calls(lowered, "decode", "sparse_binary_gemm") == _calls(lowered, "main", "sparse_binary_linear") == 0
    # 6:8 masks are pattern codes: the decode GEMVs read them, the prompt expands them into planes
    kept = next((tmp_path / "ir").glob("*_dead_code.py")).read_text()
    assert _calls(kept, "decode", "expand_mask_codes") == 0
    assert _calls(kept, "main", "expand_mask_codes") == _calls(kept, "prefill", "expand_mask_codes") == 14


@runs_avx512
def test_avx512_model_decode_step_matches_its_prompt_path(tiny_onnx, tmp_path):
    """The decode step (the GEMVs) against the prompt path (the GEMMs) on the same tokens."""
    from pbs2pc.compiler.build import compile_model
    from pbs2pc.runtime import load

    compile_model(tiny_onnx, tmp_path / "fp32.so", AVX512)
    ids = [5, 9, 100, 7]
    stepped, whole = load(tmp_path / "fp32.so"), load(tmp_path / "fp32.so")
    stepped.prefill(ids[:3], 64)
    assert rel_err(stepped.step(ids[3]), whole.prefill(ids, 64)) < 1e-5


@runs_avx512
def test_compiled_model_runs_every_linear_in_int8(tiny_onnx, tmp_path):
    from pbs2pc.compiler.build import compile_model
    from pbs2pc.runtime import load

    compile_model(tiny_onnx, tmp_path / "fp32.so", AVX512)
    tiny_library = tmp_path / "fp32.so"
    manifest = compile_model(tiny_onnx, tmp_path / "int8.so", AVX512, dump_ir=tmp_path / "ir", activations="int8")
    assert manifest["activations"] == "int8"
    lowered = next((tmp_path / "ir").glob("*_lower_pbs2p.py")).read_text()
    assert _calls(lowered, "decode", "sparse_binary_gemv_int8") == 14
    assert _calls(lowered, "main", "sparse_binary_gemm_int8") == _calls(lowered, "prefill", "sparse_binary_gemm_int8") == 14
    assert _calls(lowered, "decode", "sparse_binary_gemm_int8") == _calls(lowered, "main", "sparse_binary_linear") == 0

    ids = [5, 9, 100, 7]
    fp32, int8 = load(tiny_library), load(tmp_path / "int8.so")
    steps = {}
    for name, model in (("fp32", fp32), ("int8", int8)):
        prompt = model.prefill(ids[:3], 64)
        steps[name] = (prompt, model.step(ids[3]))
    for i in range(2):  # the prompt (GEMM) and the decode step (GEMV): close to fp32 but not identical
        assert 1e-7 < rel_err(steps["int8"][i], steps["fp32"][i]) < 5e-2
