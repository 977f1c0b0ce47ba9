"""The hand-written AVX2 int8-activation GEMV (``passes/kernels/x86_avx2/sparse_binary_gemv_int8.py``).

* The arithmetic (pure numpy, any host): the ``q = ql + 16 qh`` split and the TL / TH byte tables give every
  subset sum exactly, and 4 lookups fit a byte.
* Numerics against the AVX-512 int8 kernel's oracle (``sparse_binary_gemv_int8.reference``: the same
  quantisation, exact integer dots) on random layers: 6:8, 4:8 and random masks, with and without mask, mu and
  bias, N = 16 up to SmolLM2 shapes, odd group counts, G = 32 / 64 / 128 / 256, a group of zeros in ``x``. The
  output starts as NaN. These run the compiled code, so they skip on a host without AVX2, FMA and F16C.
* The assembly (compile only, any host): ymm ``vpshufb`` lookups, ``vpunpck{l,h}bw`` + ``vpmaddubsw`` sums, no
  zmm register and no AVX-512 instruction.

Timing is not tested here; see docs/avx2_gemv.md (``python tests/passes/test_x86_avx2_int8.py --bench``).
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
from pbs2pc.passes.kernels.x86_avx2 import sparse_binary_gemv_int8 as k8  # noqa: E402
from pbs2pc.passes.kernels.x86_avx512 import sparse_binary_gemv_int8 as k512  # noqa: E402

if __name__ == "__main__":  # run as a script (--bench): pytest puts tests/ on the path, do it here
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from testutil import AVX2_TARGET, random_layer, rel_err, requires, run_on_threads  # noqa: E402

#: The AVX2 target (Haswell: AVX2, FMA, F16C; no AVX-512).
TARGET = tvm.target.Target(AVX2_TARGET)
#: The numerics run the compiled code: they skip on a host without the x86-avx2 preset's features.
needs_avx2 = requires("x86-avx2")


def _layer(n, k, g, mask_kind, has_mu, has_bias, seed=0, zero_group=False):
    layer = random_layer(1, n, k, g, mask_kind, has_mu, has_bias, seed)
    if zero_group:
        layer[0][0, g:2 * g] = 0  # a group of zeros: scale 0, q = 0
    return layer


def _build(n, k, g, has_mask, has_mu, has_bias, **kw):
    func = k8.gemv_int8(n, k, g, has_mask, has_mu, has_bias, **kw).with_attr("global_symbol", "gemv")
    return tvm.compile(tvm.IRModule({"gemv": func}), target=TARGET)


def _tensors(x, sign, mask, alpha, mu, bias, out):
    t = k8.INTERLEAVE
    args = [x, interleave_array(sign, t)] + ([interleave_array(mask, t)] if mask is not None else [])
    args += [interleave_array(alpha, t)] + ([interleave_array(mu, t)] if mu is not None else [])
    args += [bias] if bias is not None else []
    return [tvm.runtime.tensor(a) for a in args] + [tvm.runtime.tensor(out)]


def _run(lib, x, sign, mask, alpha, mu, bias):
    out = np.full((1, sign.shape[0]), np.nan, np.float32)  # poisoned: every output must be written
    tensors = _tensors(x, sign, mask, alpha, mu, bias, out)
    lib["gemv"](*tensors)
    return tensors[-1].numpy()[0]


def _oracle(layer, g):
    return k512.reference(layer[0][0], *layer[1:], group_size=g)


# --------------------------------------------------------------------------------------------------------
# The arithmetic (any host)


def test_split_tables_give_every_subset_sum_exactly_and_four_lookups_fit_a_byte():
    q = np.arange(-127, 128)
    ql, qh = q & 15, q >> 4  # what the kernel stores: q & 15 and the arithmetic shift
    assert (ql + 16 * qh == q).all() and ql.min() == 0 and ql.max() == 15 and qh.min() == -8 and qh.max() == 7
    rng = np.random.default_rng(0)
    quads = np.concatenate([rng.integers(-127, 128, (2000, 4)), [[127] * 4, [-127] * 4, [-128 + 1, 127, 0, -1]]])
    bits = (np.arange(16)[:, None] >> np.arange(4)) & 1  # [e, i]
    tl = (quads & 15) @ bits.T  # [quad, e]
    th = (quads >> 4) @ bits.T + k8.TH_OFFSET
    assert tl.min() >= 0 and th.min() >= 0 and 4 * max(tl.max(), th.max()) <= 255  # 4 lookups add in a byte
    assert (tl + 16 * th - 16 * k8.TH_OFFSET == quads @ bits.T).all()  # TL + 16 TH - 512 = the subset sum
    # a lane's block sum: B / 8 lookups of TL + 16 TH in [0, 1020] from -64 B (their offsets), so it stays in
    # int16; both lanes' total is the exact dot, |I| <= 127 B
    b, top = k8.BLOCK, 60 + 16 * 60
    assert tl.max() + 16 * th.max() <= top and -2 ** 15 <= -64 * b and -64 * b + b // 8 * top < 2 ** 15
    assert 127 * b < 2 ** 15


# --------------------------------------------------------------------------------------------------------
# Numerics (AVX2 hosts)

SHAPES = [
    # (N, K, G, mask, mu, bias)
    (16, 32, 32, "6:8", True, True),  # one tile, one group of one step
    (16, 96, 32, "random", False, True),  # G = 32, 3 groups (odd)
    (48, 384, 128, "6:8", True, False),  # 3 tiles, 3 groups
    (80, 320, 64, "4:8", False, True),  # 5 tiles, 5 groups, no mu
    (64, 128, 64, None, True, False),  # dense binary (n = m): no mask plane
    (32, 96, 32, None, False, False),  # no mask, no mu, G = 32
    (32, 512, 256, "6:8", True, True),  # G = 256: two int16 blocks per group
    (32, 288, 96, "6:8", True, True),  # G = 96: 3 steps per group
    (192, 576, 64, "6:8", True, False),  # SmolLM2 k/v projection (serial tasks)
    (1536, 576, 64, "6:8", True, False),  # SmolLM2 gate/up (parallel tasks)
    (576, 1536, 64, "4:8", True, True),  # SmolLM2 down, with a bias
]


@needs_avx2
@pytest.mark.parametrize("n, k, g, mask_kind, has_mu, has_bias", SHAPES)
def test_int8_matches_the_avx512_kernels_oracle(n, k, g, mask_kind, has_mu, has_bias):
    layer = _layer(n, k, g, mask_kind, has_mu, has_bias, zero_group=k >= 2 * g)
    got = _run(_build(n, k, g, mask_kind is not None, has_mu, has_bias), *layer)
    assert np.isfinite(got).all()
    assert rel_err(got, _oracle(layer, g)) < 1e-6  # exact integer dots: only the fp32 summation order differs


@needs_avx2
def test_int8_is_close_to_the_unquantised_op():
    from pbs2pc.passes.kernels.x86_avx2 import sparse_binary_gemv as k32

    layer = _layer(1536, 576, 64, "6:8", True, True, seed=3)
    got = _run(_build(1536, 576, 64, True, True, True), *layer)
    assert 1e-6 < rel_err(got, k32.reference(layer[0][0], *layer[1:], group_size=64)) < 2e-2


@needs_avx2
@pytest.mark.parametrize("kw", [{"tiles": 2}, {"tiles": 3}, {"widen": "madd"}])
def test_variants_do_not_change_the_result(kw):
    # 6 tiles of 16 rows: tasks of 2 and 3 tiles; the even / odd-row vpmaddubsw widening
    layer = _layer(96, 256, 64, "6:8", True, True, seed=7, zero_group=True)
    assert rel_err(_run(_build(96, 256, 64, True, True, True, **kw), *layer), _oracle(layer, 64)) < 1e-6


def _error_of_a_parallel_layer():
    layer = _layer(1536, 576, 64, "6:8", True, True, seed=5)
    return rel_err(_run(_build(1536, 576, 64, True, True, True), *layer), _oracle(layer, 64))


@needs_avx2
def test_parallel_tasks_on_two_threads():
    threads, err = run_on_threads("test_x86_avx2_int8", "t._error_of_a_parallel_layer()")
    assert threads == 2 and err < 1e-6


# --------------------------------------------------------------------------------------------------------
# Assembly, signature, coverage (any host)


def test_assembly_is_avx2_byte_lookups_without_avx512():
    asm = _build(64, 256, 64, True, True, False).mod.inspect_source("asm")
    # per 32 inputs of 16 rows: 2 loads x 2 nibbles x TL / TH x 2 planes; plus the tables' 16 per 16 inputs
    assert len(re.findall(r"vpshufb\s+%ymm\d+, %ymm\d+, %ymm\d+", asm)) >= 32, "the lookups are not ymm vpshufb"
    assert len(re.findall(r"vpunpck[lh]bw\s+%ymm\d+, %ymm\d+, %ymm\d+", asm)) >= 4, "TL / TH are not paired by row"
    assert len(re.findall(r"vpmaddubsw\s+[^\n]*%ymm\d+, %ymm\d+", asm)) >= 4, "byte sums not widened by vpmaddubsw"
    assert re.search(r"vpaddb\s+.*%ymm", asm) and re.search(r"vpaddw\s+.*%ymm", asm), "no byte / word sums"
    assert re.search(r"vbroadcasti128\s+.*%ymm", asm), "the tables' inputs are not broadcast per lane"
    assert re.search(r"vcvtph2ps\s+.*%ymm", asm), "the fp16 scales are not converted with vcvtph2ps"
    assert not re.search(r"vpgather|vgather|vpermps|vpermd\b", asm), "the GEMV gathers or uses fp32 tables"
    assert "%zmm" not in asm, "zmm registers: AVX-512 code"
    assert not re.search(r"%k[0-7]\b|\{%k|vpermb|vpermi2|vpermt2|vpdpbusd|vptestm|vpbroadcastm|kmov|vpsraq|vpmovw?b\b",
                         asm), "AVX-512 instructions"


def test_small_layers_run_serially():
    assert "T.parallel" not in k8.gemv_int8(192, 576, 64, True, True, False).script()
    assert "T.parallel" not in k8.gemv_int8(576, 576, 64, True, True, False).script()
    assert "T.parallel" in k8.gemv_int8(1536, 576, 64, True, True, False).script()


def test_signature():
    func = k8.gemv_int8(16, 256, 128, True, True, True)
    shapes = [(tuple(int(d) for d in p.shape), str(p.dtype)) for p in func.params]
    assert shapes == [((1, 256), "float32"), ((1, 32, 16), "uint8"), ((1, 32, 16), "uint8"), ((1, 2, 16), "float16"),
                      ((1, 2, 16), "float16"), ((16,), "float32"), ((1, 16), "float32")]
    assert len(k8.gemv_int8(16, 256, 128, False, False, False).params) == 4  # x, sign, alpha, y


def test_supported_shapes():
    assert k8.INTERLEAVE == 16
    assert k8.supported(11008, 4096, 128, 16, "uint8") and k8.supported(4096, 11008, 128, 16, "uint8")
    assert k8.supported(16, 32, 32, 16, "uint8") and k8.supported(64, 4096, 2048, 16, "uint8")
    assert not k8.supported(1536, 576, 64, 8, "uint8")  # another interleave: the fp32 / TE kernels run it
    assert not k8.supported(1536, 576, 64, 0, "uint8")
    assert not k8.supported(1536, 576, 64, 16, "uint32")
    assert not k8.supported(40, 576, 64, 16, "uint8")  # N not a multiple of 16
    assert not k8.supported(16, 48, 16, 16, "uint8")  # a group narrower than one 32-input step
    assert not k8.supported(16, 576, 128, 16, "uint8")  # groups that do not tile K
    assert k8.supported(16, 576, 96, 16, "uint8")  # 3 steps per group
    assert not k8.supported(16, 960, 192, 16, "uint8")  # above one int16 block (128) and not a multiple of it
    with pytest.raises(ValueError, match="does not cover"):
        k8.gemv_int8(40, 576, 64, True, True, False)


# --------------------------------------------------------------------------------------------------------
# The benchmark of docs/avx2_gemv.md (not a test): python tests/passes/test_x86_avx2_int8.py --bench


def _bench(argv):  # pragma: no cover - measurement, run by hand
    import argparse
    import time

    parser = argparse.ArgumentParser()
    parser.add_argument("--bench", action="store_true")
    parser.add_argument("--shapes", default="11008x4096x128,4096x11008x128,576x576x64,1536x576x64,576x1536x64,"
                                            "192x576x64")
    parser.add_argument("--which", default="int8,fp32,torch,nbits4,nbits0",
                        help="comma list of int8 (this kernel), fp32 (the AVX2 fp32 GEMV), torch (F.linear fp32), "
                             "nbits4 / nbits0 (onnxruntime MatMulNBits 4-bit, block 128, accuracy_level 4 / 0), "
                             "int8:KEY=VALUE;... for gemv_int8 keyword variants (e.g. int8:tiles=2)")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    threads = int(os.environ.get("TVM_NUM_THREADS", "0"))
    if threads < 1:
        sys.exit("set TVM_NUM_THREADS (2: the benchmarks' thread count) and OPENBLAS_NUM_THREADS=1 before TVM starts")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from benchmarks import contenders
    from pbs2pc.passes.kernels.x86_avx2 import sparse_binary_gemv as k32

    contenders.THREADS = threads

    def quiet_session(model):
        # contenders._ort_session, with its pool's threads sleeping between runs: spinning ones would steal
        # the cores from the contender that runs next
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    contenders._ort_session = quiet_session
    llc = 32 << 20
    import torch

    torch.set_num_threads(threads)
    big = torch.ones(128 << 20)  # 512 MB: read bandwidth with the benchmark's threads
    bw = []
    for _ in range(5):
        t0 = time.perf_counter()
        big.sum()
        bw.append(big.numel() * 4 / (time.perf_counter() - t0))
    bandwidth = max(bw)
    del big
    print(f"read bandwidth (torch.sum of 512 MB, {threads} threads): {bandwidth / 1e9:.1f} GB/s", flush=True)

    def variant(spec):
        kw = {}
        for item in (spec.split(":", 1)[1].split(";") if ":" in spec else []):
            key, value = item.split("=")
            kw[key] = value if key == "widen" else int(value)
        return kw

    for shape in args.shapes.split(","):
        n, k, g = (int(v) for v in shape.split("x"))
        weight_bytes = 2 * n * k // 8 + 2 * 2 * n * k // g  # sign + mask bits, fp16 alpha + mu
        copies = max(1, min(16, -(-2 * llc // weight_bytes)))  # 2 x LLC between two uses of a copy
        layers = [_layer(n, k, g, "6:8", True, False, seed=i) for i in range(copies)]
        out = np.zeros((1, n), np.float32)
        runners = {}
        for spec in args.which.split(","):
            if spec.startswith("int8") or spec == "fp32":
                kernel = k32.gemv_fp32 if spec == "fp32" else k8.gemv_int8
                func = kernel(n, k, g, True, True, False, **variant(spec)).with_attr("global_symbol", "gemv")
                fn = tvm.compile(tvm.IRModule({"gemv": func}), target=TARGET)["gemv"]
                sets = [_tensors(*layer, out) for layer in layers]
                fn(*sets[0])
                want = (k32.reference if spec == "fp32" else k512.reference)(
                    layers[0][0][0], *layers[0][1:], group_size=g)
                assert rel_err(sets[0][-1].numpy()[0], want) < 1e-5, spec
                runners[spec] = (lambda fn=fn, sets=sets: [fn(*s) for s in sets], len(sets))
            elif spec == "torch":
                dense = [torch.randn(n, k) for _ in range(max(1, min(8, -(-2 * llc // (4 * n * k)))))]
                xx = torch.from_numpy(layers[0][0])

                def run_torch(dense=dense, xx=xx):
                    with torch.inference_mode():
                        for w in dense:
                            torch.nn.functional.linear(xx, w)

                runners["torch"] = (run_torch, len(dense))
            elif spec.startswith("nbits"):
                if k % 128:
                    continue
                nb_bytes = n * k // 2 + 4 * n * k // 128
                nb_copies = max(1, min(16, -(-2 * llc // nb_bytes)))
                run, _ = contenders.ort_runner(n, k, 1, nb_copies, np.random.default_rng(0), bits=4,
                                               accuracy_level=int(spec[len("nbits"):]), block=128)
                runners[f"nbits4 acc{spec[len('nbits'):]}"] = (run, nb_copies)
        times = {name: [] for name in runners}
        for _ in range(args.rounds):
            for name, (run, calls) in runners.items():
                run()  # untimed: wakes this contender's threads while the previous one's stop spinning
                t0 = time.perf_counter()
                run()
                times[name].append((time.perf_counter() - t0) / calls)
        line = ", ".join(f"{name} {np.median(t) * 1e6:.1f} us (min {min(t) * 1e6:.1f})" for name, t in times.items())
        print(f"{n}x{k} G={g}, {copies} copies of {weight_bytes / 1e6:.2f} MB (floor {weight_bytes / bandwidth * 1e6:.0f} "
              f"us at {bandwidth / 1e9:.1f} GB/s): {line}", flush=True)
        base = {name: np.median(t) for name, t in times.items()}
        if "int8" in base:
            print("   int8 speed-up: " + ", ".join(f"vs {name} {v / base['int8']:.2f}x" for name, v in base.items()
                                               if name != "int8"), flush=True)


def test_avx2_model_with_int8_activations_quantises_decode_only(tiny_onnx, tmp_path):
    """Compile-only (any x86 host): ``--activations int8`` on x86-avx2 sends one-token calls to the int8
    GEMV; the prompt's calls stay fp32 (the fp32 GEMM: there is no AVX2 int8 GEMM)."""
    from pbs2pc.compiler.build import compile_model

    manifest = compile_model(tiny_onnx, tmp_path / "m.so", "x86-avx2", dump_ir=tmp_path / "ir", activations="int8")
    assert manifest["activations"] == "int8" and "x86_avx2.gemv_int8" in manifest["kernels"]
    lowered = next((tmp_path / "ir").glob("*_lower_pbs2p.py")).read_text()
    decode = lowered[lowered.index("    def decode("):]
    decode = decode[:decode.find("\n    @") if "\n    @" in decode else None]
    assert decode.count("cls.sparse_binary_gemv_int8_g") == 14


if __name__ == "__main__":  # pragma: no cover
    _bench(sys.argv[1:])
