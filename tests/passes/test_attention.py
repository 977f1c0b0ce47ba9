"""The KV-cache attention kernel and the UseKVCache pass, against a numpy oracle and onnxruntime."""

import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from pbs2pc.compiler.tvm_compat import relax, tvm
from pbs2pc.passes.kernels.attention import cached_attention

from testutil import AVX2_TARGET, AVX512_TARGET, host_target  # noqa: E402

#: Numerics on this machine's best x86 target; the assembly of each x86 ISA is checked compile-only.
TARGET = host_target()


def _compile(target):
    func = cached_attention(6, 2, 64, 0.125).with_attr("global_symbol", "main")
    return tvm.compile(tvm.IRModule({"main": func}), target=target)


@pytest.fixture(scope="module")
def kernel():
    return _compile(TARGET)


def _asm(ex):
    return ex.mod.imports[0].inspect_source("asm") if ex.mod.imports else ex.mod.inspect_source("asm")


def oracle(q, k, v, mask, past_k, past_v, scale=0.125):
    """ONNX Attention-23 semantics in float64: concat the past, grouped-query heads, boolean mask."""
    keys, values = np.concatenate([past_k, k], 2), np.concatenate([past_v, v], 2)
    rep = q.shape[1] // k.shape[1]
    keys, values = np.repeat(keys, rep, 1).astype(np.float64), np.repeat(values, rep, 1).astype(np.float64)
    scores = np.where(mask, q.astype(np.float64) @ keys.transpose(0, 1, 3, 2) * scale, -np.inf)
    with np.errstate(invalid="ignore"):
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
    return np.nan_to_num(probs) @ values, keys, values


def run_kernel(kernel, batch, past, seq, capacity, padding=0, seed=0):
    rng = np.random.default_rng(seed)
    heads, kv, d, total = 6, 2, 64, past + seq
    q = rng.standard_normal((batch, heads, seq, d), dtype=np.float32)
    k, v = (rng.standard_normal((batch, kv, seq, d), dtype=np.float32) for _ in range(2))
    past_k, past_v = (rng.standard_normal((batch, kv, past, d), dtype=np.float32) for _ in range(2))
    # Caches start as garbage (not zeros) beyond what the past filled: the kernel must not read it.
    k_cache = rng.standard_normal((batch, kv, d, capacity), dtype=np.float32) * 1e3
    v_cache = rng.standard_normal((batch, kv, capacity, d), dtype=np.float32) * 1e3
    k_cache[..., :past] = past_k.transpose(0, 1, 3, 2)
    v_cache[:, :, :past] = past_v
    key_index = np.arange(total)
    mask = (key_index[None, :] <= np.arange(past, total)[:, None])[None, None].repeat(batch, 0)
    mask[-1, ..., :padding] = False  # left padding on the last sequence of the batch
    args = [tvm.runtime.tensor(a) for a in (q, k, v, mask, k_cache, v_cache, np.zeros_like(q))]
    kernel["main"](*args)
    y, keys, values = oracle(q, k, v, mask, past_k, past_v)
    return args, y, keys, values


@pytest.mark.parametrize("batch,past,seq,capacity", [(1, 0, 1, 64), (1, 0, 7, 64), (1, 63, 1, 64), (1, 64, 1, 128),
                                                     (2, 5, 3, 64), (1, 37, 30, 128), (1, 200, 1, 256),
                                                     (1, 0, 130, 192)])
def test_kernel_matches_the_oracle_and_appends_in_place(kernel, batch, past, seq, capacity):
    args, y, keys, values = run_kernel(kernel, batch, past, seq, capacity, padding=2 if batch > 1 else 0)
    total = past + seq
    np.testing.assert_allclose(args[-1].numpy(), y, rtol=2e-5, atol=2e-5)
    # The caches now hold past + new, in their layouts, and nothing beyond was touched.
    np.testing.assert_array_equal(args[4].numpy()[..., :total], keys[:, ::3].transpose(0, 1, 3, 2))
    np.testing.assert_array_equal(args[5].numpy()[:, :, :total], values[:, ::3])


def test_fully_masked_rows_give_zeros(kernel):
    args, _, _, _ = run_kernel(kernel, 2, 0, 1, 64, padding=1)  # batch 1's only key is padding
    assert np.all(args[-1].numpy()[1] == 0) and np.all(np.isfinite(args[-1].numpy()))


def test_too_small_cache_is_an_error_not_a_crash(kernel):
    with pytest.raises(Exception, match="KV cache is too small"):
        run_kernel(kernel, 1, 64, 1, 64)
    with pytest.raises(Exception, match="multiple of 64"):
        run_kernel(kernel, 1, 0, 1, 96)


@pytest.mark.parametrize("isa,target,reg", [("avx512", AVX512_TARGET, "zmm"), ("avx2", AVX2_TARGET, "ymm")])
def test_assembly_scores_and_values_with_vector_fma(isa, target, reg):
    """Compile-only: the score and value loops are full-width FMAs (16 lanes on AVX-512, 8 on AVX2: the
    point of the cache layouts), the softmax's exponential is vectorised (no call to expf), and an AVX2
    build has no AVX-512 register in it."""
    asm = _asm(_compile(tvm.target.Target(target)))
    assert len(re.findall(rf"vfmadd\d+ps\s+[^\n]*%{reg}", asm)) >= 2
    assert "expf" not in asm
    if isa == "avx2":
        assert "%zmm" not in asm


def attention_graph(with_past: bool, **attrs):
    h, kv, d = 4, 2, 8
    inputs = ["q", "k", "v", "mask"] + (["pk", "pv"] if with_past else [])
    outputs = ["y"] + (["presk", "presv"] if with_past else [])
    value = lambda name, shape, t=TensorProto.FLOAT: helper.make_tensor_value_info(name, t, shape)  # noqa: E731
    graph = helper.make_graph(
        [helper.make_node("Attention", inputs, outputs, name="att", **attrs)], "g",
        [value("q", ["b", h, "s", d]), value("k", ["b", kv, "s", d]), value("v", ["b", kv, "s", d]),
         value("mask", ["b", 1, "s", "t"], TensorProto.BOOL)]
        + ([value("pk", ["b", kv, "p", d]), value("pv", ["b", kv, "p", d])] if with_past else []),
        [value("y", ["b", h, "s", d])] + ([value("presk", ["b", kv, "t", d]), value("presv", ["b", kv, "t", d])]
                                          if with_past else []))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)


def test_attention_without_past_compiles_to_the_reference_and_matches_onnxruntime(tmp_path):
    """A hand-written Attention node with no cache keeps its reference function (no in-place kernel)."""
    import onnxruntime as ort

    from pbs2pc.compiler import frontend
    from pbs2pc.compiler.build import compile_model
    from pbs2pc.compiler.tvm_compat import tvm as ttvm
    from pbs2pc.passes import UseKVCache

    model = attention_graph(False)
    onnx.save(model, tmp_path / "att.onnx")
    mod = UseKVCache()(frontend.import_onnx(tmp_path / "att.onnx").mod)
    assert "decode" not in [gv.name_hint for gv in mod.get_global_vars()]
    compile_model(tmp_path / "att.onnx", tmp_path / "att.so", "x86")
    rng = np.random.default_rng(0)
    feeds = {"q": rng.standard_normal((2, 4, 5, 8), dtype=np.float32),
             "k": rng.standard_normal((2, 2, 5, 8), dtype=np.float32),
             "v": rng.standard_normal((2, 2, 5, 8), dtype=np.float32),
             "mask": np.tril(np.ones((5, 5), bool))[None, None].repeat(2, 0)}
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    vm = relax.VirtualMachine(ttvm.runtime.load_module(str(tmp_path / "att.so")), ttvm.cpu())
    got = vm["main"](*[ttvm.runtime.tensor(feeds[n]) for n in ("q", "k", "v", "mask")]).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attrs,match", [({"is_causal": 1}, "is_causal"), ({"softcap": 2.0}, "softcap")])
def test_unsupported_attention_forms_are_named(tmp_path, attrs, match):
    from pbs2pc.compiler import frontend
    from pbs2pc.errors import UnsupportedError

    onnx.save(attention_graph(True, **attrs), tmp_path / "att.onnx")
    with pytest.raises(UnsupportedError, match=match):
        frontend.import_onnx(tmp_path / "att.onnx")


def test_decode_and_prefill_are_one_sequence_main_any_batch(tiny_onnx):
    """UseKVCache's entries: ``decode`` binds batch and sequence to 1, ``prefill`` binds batch to 1 (one
    sequence, any length; its head is then a one-row GEMV) and returns the last position's logits, ``main``
    keeps both symbolic."""
    from pbs2pc.compiler import frontend
    from pbs2pc.compiler.tvm_compat import tirx as ttirx
    from pbs2pc.passes import UseKVCache

    mod = UseKVCache()(frontend.import_onnx(tiny_onnx).mod)

    def ids_shape(name):
        param = next(p for p in mod[name].params if p.name == "input_ids")
        return [int(d) if isinstance(d, ttirx.IntImm) else str(d) for d in param.ty.shape]

    def out_shape(name):
        return [int(d) if isinstance(d, ttirx.IntImm) else str(d) for d in mod[name].ret_ty.shape]

    assert ids_shape("main") == ["batch", "sequence"] and out_shape("main")[:2] == ["batch", "sequence"]
    assert ids_shape("decode") == [1, 1] and out_shape("decode")[:2] == [1, 1]
    assert ids_shape("prefill") == [1, "sequence"] and out_shape("prefill")[:2] == [1, 1]
    # the CUDA pipeline's: prefill keeps the batch symbolic (TVM's GPU norm schedule of a (1, sequence) prompt
    # does not compile)
    mod = UseKVCache(one_sequence_prefill=False)(frontend.import_onnx(tiny_onnx).mod)
    assert ids_shape("prefill") == ["batch", "sequence"] and out_shape("prefill")[:2] == ["batch", 1]
