"""The hand-written AVX2 fp32 GEMM (``passes/kernels/x86_avx2/sparse_binary_gemm.py``): numerics and assembly.

* Numerics against the float64 dense product (``reference`` per row) on random layers: random sign bits, 6:8,
  4:8 or random masks, random fp16 alpha / mu, with and without mask, mu and bias; M = 1, 2, 3, 17, 128 (the
  last row block ragged or whole), N = 16 (one tile) up to SmolLM2 shapes, odd tile and group counts, G = 8 to
  128, tile chunks split. The output buffer starts as NaN. These run the compiled code, so they skip on a host
  without AVX2, FMA and F16C.
* The assembly (compile only, any host): the lookups are ymm ``vaddps`` with a memory operand indexed by a
  plane byte, the scales ``vcvtph2ps`` and FMAs, and there is no zmm register or AVX-512 instruction.

Timing is not tested here; see docs/avx2_gemv.md, "The AVX2 fp32 GEMM"
(``python tests/passes/test_x86_avx2_gemm.py --bench``).
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
from pbs2pc.passes.kernels.x86_avx2 import sparse_binary_gemm as kg  # noqa: E402
from pbs2pc.passes.kernels.x86_avx512.sparse_binary_gemv import reference  # noqa: E402

if __name__ == "__main__":  # the benchmark, run as a script: tests/ is not on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from testutil import AVX2_TARGET, random_layer, rel_err, requires, run_on_threads  # noqa: E402

#: The AVX2 target (Haswell: AVX2, FMA, F16C; no AVX-512).
TARGET = tvm.target.Target(AVX2_TARGET)
#: The numerics run the compiled code: they skip on a host without the x86-avx2 preset's features.
needs_avx2 = requires("x86-avx2")


def _layer(rows, n, k, g, mask_kind, has_mu, has_bias, seed=0):
    return random_layer(rows, n, k, g, mask_kind, has_mu, has_bias, seed)


def _want(x, sign, mask, alpha, mu, bias, g):
    return np.stack([reference(row, sign, mask, alpha, mu, bias, group_size=g) for row in x])


def _build(n, k, g, has_mask, has_mu, has_bias, **kw):
    func = kg.gemm_fp32(n, k, g, has_mask, has_mu, has_bias, **kw).with_attr("global_symbol", "gemm")
    return tvm.compile(tvm.IRModule({"gemm": func}), target=TARGET)


def _tensors(x, sign, mask, alpha, mu, bias):
    t = kg.INTERLEAVE
    args = [x, interleave_array(sign, t)] + ([interleave_array(mask, t)] if mask is not None else [])
    args += [interleave_array(alpha, t)] + ([interleave_array(mu, t)] if mu is not None else [])
    args += [bias] if bias is not None else []
    out = np.full((x.shape[0], sign.shape[0]), np.nan, np.float32)  # poisoned: every output must be written
    return [tvm.runtime.tensor(a) for a in args] + [tvm.runtime.tensor(out)]


def _run(lib, *layer):
    tensors = _tensors(*layer)
    lib["gemm"](*tensors)
    return tensors[-1].numpy()


SHAPES = [
    # (N, K, G, mask, mu, bias)
    (16, 64, 64, "6:8", True, True),  # one tile of 16 rows, one group
    (48, 384, 128, "6:8", True, False),  # 3 tiles, 3 groups
    (80, 320, 64, "4:8", False, True),  # 5 tiles, 5 groups, no mu
    (64, 128, 64, None, True, False),  # dense binary (n = m): no mask plane
    (16, 48, 16, "random", True, True),  # G = 16: two column bytes per group
    (32, 24, 8, None, False, False),  # G = 8 without mask and mu
    (192, 576, 64, "6:8", True, False),  # SmolLM2 k/v projection
]


@needs_avx2
@pytest.mark.parametrize("n, k, g, mask_kind, has_mu, has_bias", SHAPES)
def test_fp32_matches_dense_product(n, k, g, mask_kind, has_mu, has_bias):
    lib = _build(n, k, g, mask_kind is not None, has_mu, has_bias)
    for rows in (1, 2, 3, 17, 128):  # one library: M is symbolic
        layer = _layer(rows, n, k, g, mask_kind, has_mu, has_bias, seed=rows)
        got = _run(lib, *layer)
        assert np.isfinite(got).all(), rows
        assert rel_err(got, _want(*layer, g)) < 1e-5, rows


@needs_avx2
@pytest.mark.parametrize("chunk, rows, step", [(1, 3, 2), (2, 40, 1), (3, 33, 4), (7, 20, 1)])
def test_tile_chunks_and_steps_do_not_change_the_result(chunk, rows, step):
    # 7 tiles of 16 rows in chunks of 1, 2 (ragged), 3 (ragged) or 7 tiles, several row blocks; 1, 2 or 4
    # output rows per lookup step
    layer = _layer(rows, 112, 256, 128, "6:8", True, True, seed=chunk)
    got = _run(_build(112, 256, 128, True, True, True, tiles_per_chunk=chunk, outputs_per_step=step), *layer)
    assert rel_err(got, _want(*layer, 128)) < 1e-5


@needs_avx2
def test_no_rows():
    # M = 0: no row blocks, no tasks (and no division by zero in the task split)
    layer = _layer(1, 32, 128, 64, "6:8", True, True)
    assert _run(_build(32, 128, 64, True, True, True), np.zeros((0, 128), np.float32), *layer[1:]).shape == (0, 32)


def _error_of_a_parallel_layer():
    layer = _layer(37, 1536, 576, 64, "6:8", True, True, seed=5)
    return rel_err(_run(_build(1536, 576, 64, True, True, True), *layer), _want(*layer, 64))


@needs_avx2
def test_parallel_tasks_on_two_threads():
    threads, err = run_on_threads("test_x86_avx2_gemm", "t._error_of_a_parallel_layer()")
    assert threads == 2 and err < 1e-5


def test_assembly_is_avx2_table_lookups_without_avx512():
    asm = _build(64, 256, 64, True, True, True).mod.inspect_source("asm")
    # per output row and column byte: the P and M bytes, shifted to a 64-byte line offset, index the tables:
    # two ymm vaddps with a memory operand (base + index) per plane
    lookups = re.findall(r"vaddps\s+-?\d*\(%\w+,%\w+\), %ymm\d+, %ymm\d+", asm)
    assert len(lookups) >= 4 * 8, "the lookups are not ymm vaddps from the tables"
    assert re.search(r"shl[lq]\s+\$6,", asm), "plane bytes are not scaled to 64-byte table lines"
    assert re.search(r"vcvtph2ps\s+.*%[xy]mm", asm), "the fp16 scales are not converted with vcvtph2ps"
    assert re.search(r"vfmadd\d+ps\s+.*%ymm", asm), "the group sums are not scaled with FMAs"
    assert not re.search(r"vpgather|vgather", asm), "the GEMM gathers"
    assert "%zmm" not in asm, "zmm registers: AVX-512 code"
    assert not re.search(r"%k[0-7]\b|\{%k|vpermb|vpermi2|vpermt2|vpdpbusd|vptestm|vpbroadcastm|kmov", asm), \
        "AVX-512 instructions"


def test_signature():
    from pbs2pc.compiler.tvm_compat import tirx

    func = kg.gemm_fp32(16, 256, 128, True, True, True)
    buffers = list(func.params)
    assert [str(b.dtype) for b in buffers] == ["float32", "uint8", "uint8", "float16", "float16", "float32", "float32"]
    dims = [[int(d) if isinstance(d, tirx.IntImm) else None for d in b.shape] for b in buffers]
    assert dims == [[None, 256], [1, 32, 16], [1, 32, 16], [1, 2, 16], [1, 2, 16], [16], [None, 16]]
    assert buffers[0].shape[0].same_as(buffers[-1].shape[0])  # one symbolic M
    assert len(kg.gemm_fp32(16, 256, 128, False, False, False).params) == 4  # x, sign, alpha, y


def test_supported_shapes():
    assert kg.INTERLEAVE == 16 and kg.ROWS == 16
    assert kg.supported(11008, 4096, 128, 16, "uint8") and kg.supported(16, 24, 8, 16, "uint8")
    assert not kg.supported(1536, 576, 64, 8, "uint8")  # another interleave: the TE kernel runs it
    assert not kg.supported(1536, 576, 64, 0, "uint8")  # row-major planes
    assert not kg.supported(1536, 576, 64, 16, "uint32")
    assert not kg.supported(8, 576, 64, 16, "uint8")  # N not a multiple of 16
    assert not kg.supported(16, 576, 36, 16, "uint8")  # a group that is not whole plane bytes
    assert not kg.supported(16, 576, 128, 16, "uint8")  # groups that do not tile K
    with pytest.raises(ValueError, match="does not cover"):
        kg.gemm_fp32(40, 576, 64, True, True, False)


# --------------------------------------------------------------------------------------------------------
# The benchmark of docs/avx2_gemv.md (not a test): python tests/passes/test_x86_avx2_gemm.py --bench


def _bench(argv):  # pragma: no cover - measurement, run by hand
    import argparse
    import time

    parser = argparse.ArgumentParser()
    parser.add_argument("--bench", action="store_true")
    parser.add_argument("--shapes", default="11008x4096x128,4096x11008x128,576x576x64,1536x576x64,576x1536x64,"
                                            "192x576x64")
    parser.add_argument("--rows", default="16,128,512", help="comma list of M")
    parser.add_argument("--which", default="avx2,te,torch", help="comma list of avx2, te, torch")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=None, help="tiles per chunk (default TILES_PER_CHUNK)")
    args = parser.parse_args(argv)
    threads = int(os.environ.get("TVM_NUM_THREADS", "0"))
    if threads < 1:
        sys.exit("set TVM_NUM_THREADS (2: the benchmarks' thread count) and OPENBLAS_NUM_THREADS=1 before TVM starts")
    from pbs2pc.compiler.tvm_compat import dlight, te, tirx
    from pbs2pc.passes.kernels.sparse_binary_linear import pbs2p_info, sparse_binary_linear
    from pbs2pc.passes.schedules import cpu_rules

    llc = 32 << 20

    def te_kernel(n, k, g):
        t = kg.INTERLEAVE
        x = te.placeholder((tirx.Var("m", "int64"), k), "float32", "x")  # symbolic M, as in the prompt

        def weight(cols, dtype, name):
            return te.placeholder((n // t, cols, t), dtype, name)

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

    if "torch" in args.which:
        import torch

        torch.set_num_threads(threads)
    for shape in args.shapes.split(","):
        n, k, g = (int(v) for v in shape.split("x"))
        weight_bytes = 2 * n * k // 8 + 2 * 2 * n * k // g  # sign + mask bits, fp16 alpha + mu
        copies = max(1, min(16, -(-2 * llc // weight_bytes)))  # 2 x LLC between two uses of a copy
        layers = [_layer(1, n, k, g, "6:8", True, False, seed=i)[1:] for i in range(copies)]
        fns = {}
        if "avx2" in args.which:
            fns["avx2"] = _build(n, k, g, True, True, False, tiles_per_chunk=args.chunk)["gemm"]
        if "te" in args.which:
            fns["te"] = te_kernel(n, k, g)
        for rows in (int(r) for r in args.rows.split(",")):
            x = np.random.default_rng(rows).standard_normal((rows, k)).astype(np.float32)
            want = _want(x[:4], *layers[0], g)
            xt = tvm.runtime.tensor(x)
            out = tvm.runtime.tensor(np.zeros((rows, n), np.float32))

            def planes(layer):
                return [xt] + [tvm.runtime.tensor(interleave_array(p, kg.INTERLEAVE)) for p in layer[:4]] + [out]

            weights = [planes(layer) for layer in layers]
            runners = {name: (fn, weights) for name, fn in fns.items()}
            for name, (fn, cs) in runners.items():
                fn(*cs[0])
                assert rel_err(out.numpy()[:4], want) < 1e-5, name
            if "torch" in args.which:
                dense = [torch.randn(n, k) for _ in range(max(1, min(8, -(-2 * llc // (4 * n * k)))))]
                xx = torch.from_numpy(x)
                runners["torch"] = (lambda w: torch.nn.functional.linear(xx, w), [[w] for w in dense])
            times = rounds(runners)
            med = {name: np.median(t) for name, t in times.items()}
            line = ", ".join(f"{name} {med[name] * 1e3:.3f} ms (min {min(t) * 1e3:.3f})" for name, t in times.items())
            ratios = ", ".join(f"avx2 vs {name} {med[name] / med['avx2']:.2f}x" for name in med
                               if name != "avx2" and "avx2" in med)
            print(f"{n}x{k} G={g} M={rows}, {copies} copies of {weight_bytes / 1e6:.2f} MB: {line}; {ratios}",
                  flush=True)


# --------------------------------------------------------------------------------------------------------
# In a compiled model, with the registry entry the integrator adds to passes/kernels/x86_avx2/__init__.py


def _entry():
    """The ``KernelEntry`` for this GEMM: the prompt's calls (any M) on the x86-avx2 layout."""
    from pbs2pc.passes.kernels import x86_avx2 as folder
    from pbs2pc.passes.kernels.registry import KernelEntry

    def shape(c):
        return c.out_features, c.in_features, c.group_size, c.interleave, c.plane_dtype

    return KernelEntry("x86_avx2.gemm_fp32", "sparse_binary_gemm", "cpu", folder.ISA, folder.FEATURES, folder.LAYOUT,
                       activations="fp32", rows="any", covers=lambda c: kg.supported(*shape(c)),
                       build=lambda c: kg.gemm_fp32(*shape(c)[:3], c.has_mask, c.has_mu, c.has_bias))


@needs_avx2
def test_avx2_model_prompt_runs_the_gemm_and_matches_onnxruntime(tiny_onnx, tmp_path, monkeypatch):
    from pbs2pc.compiler.build import compile_model
    from pbs2pc.passes.kernels import x86_avx2 as folder
    from pbs2pc.runtime import load
    from testutil import ort_logits, rel_err

    if not any(e.name == "x86_avx2.gemm_fp32" for e in folder.KERNELS):
        monkeypatch.setattr(folder, "KERNELS", [*folder.KERNELS, _entry()])
    manifest = compile_model(tiny_onnx, tmp_path / "m.so", "x86-avx2")
    assert "x86_avx2.gemm_fp32" in manifest["kernels"] and "x86_avx2.gemv_fp32" in manifest["kernels"]
    ids = [5, 9, 100, 7, 3, 11, 42, 8, 1, 77, 31, 6, 2, 90, 15, 4, 60, 12]  # 18 rows: two row blocks
    model = load(tmp_path / "m.so")
    assert rel_err(model.prefill(ids, 64), ort_logits(tiny_onnx, [ids])[0, -1]) < 1e-5


if __name__ == "__main__":  # pragma: no cover
    _bench(sys.argv[1:])
