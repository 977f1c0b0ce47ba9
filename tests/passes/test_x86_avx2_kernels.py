"""The hand-written AVX2 fp32 GEMV (``passes/kernels/x86_avx2/sparse_binary_gemv.py``): numerics and assembly.

* Numerics against the float64 dense product (``reference``) on random layers: random sign bits, 6:8, 4:8 or
  random masks, random fp16 alpha / mu, with and without mask, mu and bias; N = 8 (one tile) up to SmolLM2
  shapes (parallel tasks), odd tile and group counts, G = 8 to 128. The output buffer starts as NaN. These
  run the compiled code, so they skip on a host without AVX2, FMA and F16C.
* The assembly (compile only, any host): the lookups are ymm ``vpermps``/``vpermd`` + ``vpermilps``, the
  scales ``vcvtph2ps``, the group sums FMAs, and there is no zmm register or AVX-512 instruction.

Timing is not tested here; see docs/avx2_gemv.md (``python tests/passes/test_x86_avx2_kernels.py --bench``).
"""

from __future__ import annotations

import os
import re
import sys

import numpy as np
import pytest

tvm_compat = pytest.importorskip("pbs2pc.compiler.tvm_compat")

from pbs2pc.compiler.tvm_compat import tvm  # noqa: E402
from pbs2pc.passes.interleave_rows import interleave_array  # noqa: E402
from pbs2pc.passes.kernels.registry import SERIAL  # noqa: E402
from pbs2pc.passes.kernels.x86_avx2 import sparse_binary_gemv as k2  # noqa: E402
from pbs2pc.passes.kernels.x86_avx2 import sparse_binary_gemv_v2 as k2v2  # noqa: E402
from pbs2pc.passes.kernels.x86_avx512.sparse_binary_gemv import PARALLEL_MIN_WEIGHTS as PARALLEL_MIN_WEIGHTS_AVX512  # noqa: E402

if __name__ == "__main__":  # the benchmark, run as a script: tests/ is not on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from testutil import AVX2_TARGET, random_layer, rel_err, requires, run_on_threads  # noqa: E402

#: The AVX2 target (Haswell: AVX2, FMA, F16C; no AVX-512).
TARGET = tvm.target.Target(AVX2_TARGET)
#: The numerics run the compiled code: they skip on a host without the x86-avx2 preset's features.
needs_avx2 = requires("x86-avx2")


def _layer(n, k, g, mask_kind, has_mu, has_bias, seed=0):
    return random_layer(1, n, k, g, mask_kind, has_mu, has_bias, seed)


def _build(n, k, g, has_mask, has_mu, has_bias, **kw):
    func = k2.gemv_fp32(n, k, g, has_mask, has_mu, has_bias, **kw).with_attr("global_symbol", "gemv")
    return tvm.compile(tvm.IRModule({"gemv": func}), target=TARGET)


def _run(lib, x, sign, mask, alpha, mu, bias):
    t = k2.INTERLEAVE
    args = [x, interleave_array(sign, t)] + ([interleave_array(mask, t)] if mask is not None else [])
    args += [interleave_array(alpha, t)] + ([interleave_array(mu, t)] if mu is not None else [])
    args += [bias] if bias is not None else []
    out = np.full((1, sign.shape[0]), np.nan, np.float32)  # poisoned: every output must be written
    tensors = [tvm.runtime.tensor(a) for a in args] + [tvm.runtime.tensor(out)]
    lib["gemv"](*tensors)
    return tensors[-1].numpy()[0]


SHAPES = [
    # (N, K, G, mask, mu, bias)
    (16, 64, 64, "6:8", True, True),  # one tile of 16 rows, one group
    (48, 384, 128, "6:8", True, False),  # 3 tiles, 3 groups
    (80, 320, 64, "4:8", False, True),  # 5 tiles, 5 groups, no mu
    (64, 128, 64, None, True, False),  # dense binary (n = m): no mask plane
    (16, 48, 16, "random", True, True),  # G = 16: two column bytes per group
    (16, 24, 8, "6:8", True, True),  # G = 8: one column byte per group
    (32, 24, 8, None, False, False),  # G = 8 without mask and mu
    (192, 576, 64, "6:8", True, False),  # SmolLM2 k/v projection (serial tasks)
    (1536, 576, 64, "6:8", True, False),  # SmolLM2 gate/up (parallel tasks)
    (576, 1536, 64, "4:8", True, True),  # SmolLM2 down, with a bias
]


@needs_avx2
@pytest.mark.parametrize("n, k, g, mask_kind, has_mu, has_bias", SHAPES)
def test_fp32_matches_dense_product(n, k, g, mask_kind, has_mu, has_bias):
    layer = _layer(n, k, g, mask_kind, has_mu, has_bias)
    got = _run(_build(n, k, g, mask_kind is not None, has_mu, has_bias), *layer)
    assert np.isfinite(got).all()
    assert rel_err(got, k2.reference(layer[0][0], *layer[1:], group_size=g)) < 1e-5


@needs_avx2
@pytest.mark.parametrize("tiles", [2, 3, 4])
def test_tiles_per_task_do_not_change_the_result(tiles):
    # 6 tiles of 16 rows: tasks of 2 and 3 tiles; 4 does not divide 6 and falls back to 2
    layer = _layer(96, 256, 128, "6:8", True, True, seed=tiles)
    want = k2.reference(layer[0][0], *layer[1:], group_size=128)
    assert rel_err(_run(_build(96, 256, 128, True, True, True, tiles=tiles), *layer), want) < 1e-5


@needs_avx2
@pytest.mark.parametrize("n, k, g, mask_kind, has_mu, has_bias", [
    (8, 64, 64, "6:8", True, True),  # N = 8: one 8-row tile
    (24, 384, 128, "4:8", True, False),  # 3 tiles of 8 rows (one per task): two column bytes per AND
    (16, 24, 8, "random", False, True),  # G = 8: one column byte per AND
    (32, 128, 64, None, True, False),  # no mask plane
])
def test_interleave_of_8(n, k, g, mask_kind, has_mu, has_bias, monkeypatch):
    # the kernel also reads [N/8, K/8, 8] planes (INTERLEAVE = 8), 5-10 % slower on the 7B shapes
    monkeypatch.setattr(k2, "INTERLEAVE", 8)
    assert k2.supported(n, k, g, 8, "uint8")
    layer = _layer(n, k, g, mask_kind, has_mu, has_bias, seed=n)
    got = _run(_build(n, k, g, mask_kind is not None, has_mu, has_bias), *layer)
    assert rel_err(got, k2.reference(layer[0][0], *layer[1:], group_size=g)) < 1e-5


def _error_of_a_parallel_layer():
    layer = _layer(1536, 576, 64, "6:8", True, True, seed=5)
    got = _run(_build(1536, 576, 64, True, True, True), *layer)
    return rel_err(got, k2.reference(layer[0][0], *layer[1:], group_size=64))


@needs_avx2
def test_parallel_tasks_on_two_threads():
    threads, err = run_on_threads("test_x86_avx2_kernels", "t._error_of_a_parallel_layer()")
    assert threads == 2 and err < 1e-5


def test_assembly_is_avx2_lookups_without_avx512():
    asm = _build(64, 256, 64, True, True, True).mod.inspect_source("asm")
    # per column byte: 2 vectors of 8 rows x 2 planes, 2 vpermps and 1 vpermilps each (LLVM may spell
    # vpermps as its integer twin vpermd: the same 8-entry lookup)
    lookups = re.findall(r"vperm(?:ps|d)\s+[^,\n]+, %ymm\d+, %ymm\d+", asm)
    assert len(lookups) >= 8, "the 3-bit lookups are not ymm vpermps"
    assert len(re.findall(r"vpermilps\s+[^,\n]+, %ymm\d+, %ymm\d+", asm)) >= 4, "the 2-bit lookups are not vpermilps"
    assert len(re.findall(r"vpmulhuw\s+.*%ymm", asm)) >= 8, "the index shifts are not vpmulhuw"
    assert re.search(r"vpmovzxbd\s+.*%ymm", asm), "row bytes are not widened to int32 lanes with vpmovzxbd"
    assert re.search(r"vcvtph2ps\s+.*%ymm", asm), "the fp16 scales are not converted with vcvtph2ps"
    assert re.search(r"vfmadd\d+ps\s+.*%ymm", asm), "the group sums are not scaled with FMAs"
    assert not re.search(r"vpgather|vgather", asm), "the GEMV gathers"
    assert "%zmm" not in asm, "zmm registers: AVX-512 code"
    assert not re.search(r"%k[0-7]\b|\{%k|vpermb|vpermi2|vpermt2|vpdpbusd|vptestm|vpbroadcastm|kmov", asm), \
        "AVX-512 instructions"


def test_small_layers_run_serially():
    # this module's threshold, below the AVX-512 kernels': a parallel launch costs more than a 128x576 layer's
    # work here, less than a 192x576 layer's (measured in turns, see PARALLEL_MIN_WEIGHTS); the v2 GEMV shares it
    assert k2.PARALLEL_MIN_WEIGHTS < PARALLEL_MIN_WEIGHTS_AVX512
    assert "T.parallel" not in k2.gemv_fp32(128, 576, 64, True, True, False).script()
    assert "T.parallel" in k2.gemv_fp32(192, 576, 64, True, True, False).script()
    assert "T.parallel" in k2.gemv_fp32(1536, 576, 64, True, True, False).script()
    assert "T.parallel" not in k2v2.gemv_v2(128, 576, 64, True, True, False, True, True).script()
    assert "T.parallel" in k2v2.gemv_v2(192, 576, 64, True, True, False, True, True).script()
    assert "T.parallel" not in k2.gemv_fp32(192, 576, 64, True, True, False, parallel_min=SERIAL).script()


def test_signature():
    func = k2.gemv_fp32(16, 256, 128, True, True, True)
    shapes = [(tuple(int(d) for d in p.shape), str(p.dtype)) for p in func.params]
    assert shapes == [((1, 256), "float32"), ((1, 32, 16), "uint8"), ((1, 32, 16), "uint8"), ((1, 2, 16), "float16"),
                      ((1, 2, 16), "float16"), ((16,), "float32"), ((1, 16), "float32")]
    assert len(k2.gemv_fp32(16, 256, 128, False, False, False).params) == 4  # x, sign, alpha, y


def test_supported_shapes():
    assert k2.LANES == 8 and k2.INTERLEAVE == 16
    assert k2.supported(11008, 4096, 128, 16, "uint8") and k2.supported(16, 24, 8, 16, "uint8")
    assert not k2.supported(1536, 576, 64, 8, "uint8")  # another interleave: the TE kernel runs it
    assert not k2.supported(1536, 576, 64, 0, "uint8")  # row-major planes
    assert not k2.supported(1536, 576, 64, 16, "uint32")
    assert not k2.supported(8, 576, 64, 16, "uint8")  # N not a multiple of 16
    assert not k2.supported(40, 576, 64, 16, "uint8")
    assert not k2.supported(16, 576, 36, 16, "uint8")  # a group that is not whole plane bytes
    assert not k2.supported(16, 576, 128, 16, "uint8")  # groups that do not tile K
    with pytest.raises(ValueError, match="does not cover"):
        k2.gemv_fp32(40, 576, 64, True, True, False)


# --------------------------------------------------------------------------------------------------------
# The benchmark of docs/avx2_gemv.md (not a test): python tests/passes/test_x86_avx2_kernels.py --bench


def _bench(argv):  # pragma: no cover - measurement, run by hand
    import argparse
    import time

    parser = argparse.ArgumentParser()
    parser.add_argument("--bench", action="store_true")
    parser.add_argument("--shapes", default="11008x4096x128,4096x11008x128,576x576x64,1536x576x64,576x1536x64,"
                                            "192x576x64")
    parser.add_argument("--which", default="avx2,te,torch", help="comma list of avx2, te, torch")
    parser.add_argument("--te-interleave", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    threads = int(os.environ.get("TVM_NUM_THREADS", "0"))
    if threads < 1:
        sys.exit("set TVM_NUM_THREADS (2: the benchmarks' thread count) and OPENBLAS_NUM_THREADS=1 before TVM starts")
    from pbs2pc.compiler.tvm_compat import dlight, te
    from pbs2pc.passes.kernels.sparse_binary_linear import pbs2p_info, sparse_binary_linear
    from pbs2pc.passes.schedules import cpu_rules

    llc = 32 << 20

    def te_kernel(n, k, g, t):
        x = te.placeholder((1, k), "float32", "x")

        def weight(cols, dtype, name):
            return te.placeholder((n // t, cols, t) if t else (n, cols), dtype, name)

        s, m = weight(k // 8, "uint8", "sign"), weight(k // 8, "uint8", "mask")
        a, u = weight(k // g, "float16", "alpha"), weight(k // g, "float16", "mu")
        y = sparse_binary_linear(x, s, m, a, u, None, n=6, m=8, group_size=g)
        func = te.create_prim_func([x, s, m, a, u, y]).with_attr("pbs2p_info", pbs2p_info(6, 8, g, True, True, False))
        with TARGET:
            mod = dlight.ApplyDefaultSchedule(*cpu_rules())(tvm.IRModule({"main": func}))
        return tvm.compile(mod, target=TARGET)["main"]

    def rounds(runners):
        """{name: [seconds per call]}: the contenders in turn, ``--rounds`` times over all their copies."""
        times = {name: [] for name in runners}
        for _ in range(args.rounds):
            for name, (fn, copies) in runners.items():
                t0 = time.perf_counter()
                for c in copies:
                    fn(*c)
                times[name].append((time.perf_counter() - t0) / len(copies))
        return times

    for shape in args.shapes.split(","):
        n, k, g = (int(v) for v in shape.split("x"))
        weight_bytes = 2 * n * k // 8 + 2 * 2 * n * k // g  # sign + mask bits, fp16 alpha + mu
        copies = max(1, min(16, -(-2 * llc // weight_bytes)))  # 2 x LLC between two uses of a copy
        layers = [_layer(n, k, g, "6:8", True, False, seed=i) for i in range(copies)]
        x = layers[0][0]
        want = k2.reference(x[0], *layers[0][1:], group_size=g)
        xt, out = tvm.runtime.tensor(x), tvm.runtime.tensor(np.zeros((1, n), np.float32))

        def tensors(layer, t):
            planes = [layer[1], layer[2], layer[3], layer[4]]
            return [xt] + [tvm.runtime.tensor(interleave_array(p, t) if t else p) for p in planes] + [out]

        runners = {}
        if "avx2" in args.which:
            runners["avx2"] = (_build(n, k, g, True, True, False)["gemv"],
                               [tensors(layer, k2.INTERLEAVE) for layer in layers])
        if "te" in args.which:
            runners[f"te(T={args.te_interleave})"] = (te_kernel(n, k, g, args.te_interleave),
                                                      [tensors(layer, args.te_interleave) for layer in layers])
        for name, (fn, cs) in runners.items():
            fn(*cs[0])
            assert rel_err(out.numpy()[0], want) < 1e-5, name
        if "torch" in args.which:
            import torch

            torch.set_num_threads(threads)
            dense = [torch.randn(n, k) for _ in range(max(1, min(8, -(-2 * llc // (4 * n * k)))))]
            xx = torch.from_numpy(x)
            runners["torch"] = (lambda w: torch.nn.functional.linear(xx, w), [[w] for w in dense])
        times = rounds(runners)
        line = ", ".join(f"{name} {np.median(t) * 1e6:.1f} us (min {min(t) * 1e6:.1f})" for name, t in times.items())
        print(f"{n}x{k} G={g}, {copies} copies of {weight_bytes / 1e6:.2f} MB: {line}", flush=True)


# --------------------------------------------------------------------------------------------------------
# In a compiled model: the registry sends one-token calls here and the prompt's to the TE kernel


def _calls(dumped_ir, function, kernel):
    start = dumped_ir.index(f"    def {function}(")
    end = dumped_ir.find("\n    @", start)
    return dumped_ir[start:end if end > 0 else None].count(f"cls.{kernel}")


def test_avx2_model_uses_the_gemv_in_decode_and_the_gemm_in_the_prompt(tiny_onnx, tmp_path):
    """Compile-only (any x86 host)."""
    from pbs2pc.compiler.build import compile_model

    manifest = compile_model(tiny_onnx, tmp_path / "m.so", "x86-avx2", dump_ir=tmp_path / "ir")
    assert manifest["kernels"] == ["x86_avx2.gemm_fp32", "x86_avx2.gemv_fp32"] and manifest["isa"] == "x86-avx2"
    assert manifest["layout"] == {"word_bits": 8, "interleave": 16, "mask_codes": False}
    assert not any(f.startswith("avx512") for f in manifest["cpu_features"])
    lowered = next((tmp_path / "ir").glob("*_lower_pbs2p.py")).read_text()
    assert _calls(lowered, "decode", "sparse_binary_gemv_g") == 14  # 7 linear layers x 2 decoder layers
    assert _calls(lowered, "main", "sparse_binary_gemv") == _calls(lowered, "prefill", "sparse_binary_gemv") == 0
    assert _calls(lowered, "main", "sparse_binary_gemm_g") == _calls(lowered, "prefill", "sparse_binary_gemm_g") == 14
    assert _calls(lowered, "main", "sparse_binary_linear") == 0
    asm = (tmp_path / "m.so").read_bytes()
    assert b"expand_mask_codes" not in asm  # no VBMI code expansion in an AVX2 library


@needs_avx2
def test_avx2_model_decode_step_matches_its_prompt_path_and_onnxruntime(tiny_onnx, tmp_path):
    """The decode step (the AVX2 GEMVs) against the prompt path (the AVX2 GEMMs) and onnxruntime."""
    from pbs2pc.compiler.build import compile_model
    from pbs2pc.runtime import load
    from testutil import ort_logits

    compile_model(tiny_onnx, tmp_path / "m.so", "x86-avx2")
    ids = [5, 9, 100, 7]
    stepped, whole = load(tmp_path / "m.so"), load(tmp_path / "m.so")
    stepped.prefill(ids[:3], 64)
    step = stepped.step(ids[3])
    assert rel_err(step, whole.prefill(ids, 64)) < 1e-5
    assert rel_err(step, ort_logits(tiny_onnx, [ids])[0, -1]) < 1e-5


if __name__ == "__main__":  # pragma: no cover
    _bench(sys.argv[1:])
