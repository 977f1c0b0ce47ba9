"""``--lm-head fp16``: the fp16 head kernel against numpy, and the compiled tiny model with its table in fp16.

* The kernel (``passes/kernels/lm_head_fp16.py``) against the float64 product with the fp16 table widened:
  it accumulates in fp32, so float32 rounding is all it may add.
* The compiled model: the params transform stores the table as float16 (weights file and manifest), the
  one-token entries call the kernel and ``main`` keeps its product, every entry looks tokens up in the
  fp16 table without a float32 copy of it, and the logits differ from the fp32 build by the table's
  rounding only: the decode step (the kernel) and the whole-prompt path (``main``'s product on the
  converted table) agree to float32 rounding, and both sit within fp16 rounding of the fp32 library.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

tvm_compat = pytest.importorskip("pbs2pc.compiler.tvm_compat")

from pbs2pc.compiler.tvm_compat import tvm  # noqa: E402
from pbs2pc.errors import Pbs2pcError, UnsupportedError  # noqa: E402
from pbs2pc.passes.kernels import lm_head_fp16 as head  # noqa: E402
from testutil import AVX2_TARGET, AVX512_TARGET, X86, head_outputs, host_target, rel_err  # noqa: E402

#: Numerics on this machine's best x86 target; the assembly of each x86 ISA is checked compile-only.
TARGET = host_target()


def _build(vocab, hidden, target=None):
    func = head.lm_head_fp16(vocab, hidden).with_attr("global_symbol", "head")
    return tvm.compile(tvm.IRModule({"head": func}), target=target or TARGET)


@pytest.mark.parametrize("vocab, hidden", [
    (256, 64),  # the tiny model's table: 4 tasks of 64 rows
    (1000, 48),  # 1000 rows: tasks of 8; K = 3 vectors
    (49152 // 16, 576),  # SmolLM2's hidden size
])
@pytest.mark.parametrize("rows", [1, 3])
def test_kernel_matches_float64_product(vocab, hidden, rows):
    rng = np.random.default_rng(vocab + rows)
    table = (rng.standard_normal((vocab, hidden)) * 0.05).astype(np.float16)
    x = rng.standard_normal((rows, hidden)).astype(np.float32)
    y = tvm.runtime.tensor(np.zeros((rows, vocab), np.float32))
    _build(vocab, hidden)["head"](tvm.runtime.tensor(x), tvm.runtime.tensor(table), y)
    assert rel_err(y.numpy(), head.reference(x, table)) < 1e-6


@pytest.mark.parametrize("knobs", [
    {"step": 1, "prefetch_rows": 0, "k_unroll": 1, "rows_per_task": 16},  # no prefetch, nothing unrolled
    {"step": 4, "prefetch_rows": 8, "locality": 3, "k_unroll": 6, "rows_per_task": 256},
])
def test_every_tuning_knob_gives_the_same_bits(knobs):
    """The tuner's settings (:func:`head.knobs`) change the loops, not the sums: the same bits as the
    default, within float32 rounding of the float64 product; the one-row build the tuner times too."""
    vocab, hidden = 49152 // 16, 576
    assert all(knobs[k] in head.knobs(vocab, hidden)[k] for k in knobs)
    rng = np.random.default_rng(3)
    table = (rng.standard_normal((vocab, hidden)) * 0.05).astype(np.float16)
    x = rng.standard_normal((1, hidden)).astype(np.float32)
    outs = head_outputs(head.lm_head_fp16, table, x, TARGET, [{}, knobs, {"rows": 1, **knobs}])
    assert rel_err(outs[0], head.reference(x, table)) < 1e-6
    np.testing.assert_array_equal(outs[1], outs[0])
    np.testing.assert_array_equal(outs[2], outs[0])


@pytest.mark.parametrize("target,reg", [(AVX512_TARGET, "zmm"), (AVX2_TARGET, "ymm")])
def test_kernel_widens_fp16_in_vector_registers(target, reg):
    asm = _build(256, 64, tvm.target.Target(target)).mod.inspect_source("asm")
    assert re.search(rf"vcvtph2ps\s+.*%{reg}", asm), "the fp16 rows are not widened a vector at a time"
    assert re.search(rf"vfmadd\w+ps\s+.*%{reg}", asm), "the products are not full-width FMAs"
    if reg == "ymm":
        assert "%zmm" not in asm, "AVX-512 registers in an AVX2 build"
    # TVM's module defines __extendhfsf2 as a helper; the kernel must not call it per value
    assert not re.search(r"call\w*\s+(__extendhfsf2|__gnu_h2f_ieee)", asm), "fp16 is converted by a library call"


def test_supported_shapes():
    assert head.supported(49152, 576) and head.supported(32000, 4096)
    assert not head.supported(50257, 768)  # GPT-2's vocabulary: not a multiple of 4 rows
    assert not head.supported(256, 40)  # the hidden size must fill 16-lane vectors


def test_presets_accept_fp16_head_on_cpus_only():
    from pbs2pc.compiler.targets import CompileOptions, get_preset

    for name in ("x86", "x86-avx2", "x86-avx512"):
        assert CompileOptions(lm_head="fp16").check(get_preset(name)).lm_head == "fp16"
    with pytest.raises(UnsupportedError, match="no fp16 LM head kernel"):
        CompileOptions(lm_head="fp16").check(get_preset("cuda"))
    with pytest.raises(Pbs2pcError, match="choose fp32, fp16 or int8"):
        CompileOptions(lm_head="bf16")


def _function(dumped_ir, name):
    start = dumped_ir.index(f"    def {name}(")
    end = dumped_ir.find("\n    @", start)
    return dumped_ir[start:end if end > 0 else None]


def test_compiled_model_with_fp16_head(tiny_onnx, tiny_library, tmp_path):
    from pbs2pc.compiler.build import compile_model
    from pbs2pc.runtime import load

    manifest = compile_model(tiny_onnx, tmp_path / "h16.so", X86, dump_ir=tmp_path / "ir", lm_head="fp16")
    assert manifest["lm_head"] == "fp16"
    stored = {p["name"]: p for p in manifest["params"]}
    assert stored["model.embed_tokens.weight"]["dtype"] == "float16"
    fp32_weights = tiny_library.with_name(tiny_library.stem + ".weights.bin").stat().st_size
    assert manifest["sizes"]["weights"] == fp32_weights - 256 * 64 * 2  # the table's half

    kept = next((tmp_path / "ir").glob("*_dead_code.py")).read_text()
    converted = 'R.Tensor((256, 64), dtype="float32")'  # a float32 copy of the whole table
    for entry in ("decode", "prefill"):  # the kernel, and no copy (the lookup reads fp16 rows)
        body = _function(kept, entry)
        assert body.count("cls.lm_head_fp16") == 1 and "NT_matmul" not in body and converted not in body, entry
    main = _function(kept, "main")  # every position's logits: the product on one converted copy per call
    assert "cls.lm_head_fp16" not in main and main.count(converted) == 1

    ids = [5, 9, 100, 7]
    h16, fp32 = load(tmp_path / "h16.so"), load(tiny_library)
    h16.prefill(ids[:3], 64)
    step_logits = h16.step(ids[3])  # decode: the fp16 kernel
    prompt_logits = h16.prefill(ids, 64)  # prefill: the fp16 kernel on the last position
    main_logits = h16.logits(ids)[0, -1]  # main: the float32 product on the converted table
    assert rel_err(step_logits, main_logits) < 1e-5 and rel_err(prompt_logits, main_logits) < 1e-5
    reference = fp32.logits(ids)[0, -1]
    assert 1e-6 < rel_err(main_logits, reference) < 3e-3  # the table's rounding to fp16, and only that


def test_fp16_head_needs_a_head(tmp_path):
    from pbs2pc.compiler.build import compile_model
    from pbs2pc.models import onnx_op
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    sign = rng.integers(0, 256, (16, 8), dtype=np.uint8)
    mask = np.full((16, 8), 0b00111111, np.uint8)
    alpha = np.ones((16, 1), np.float16)
    inits = [numpy_helper.from_array(a, n) for a, n in ((sign, "s"), (mask, "m"), (alpha, "a"))]
    node = onnx_op.make_node("X", "s", "m", "a", None, None, "Y", n=6, m=8, group_size=64, name="linear")
    graph = helper.make_graph([node], "one", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", onnx_op.ONNX_OPSET),
                                                    helper.make_opsetid(onnx_op.DOMAIN, onnx_op.OPSET_VERSION)])
    onnx_op.attach_functions(model)
    path = tmp_path / "one.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(UnsupportedError, match="--lm-head fp32"):
        compile_model(path, tmp_path / "one.so", X86, lm_head="fp16")
    assert not list(tmp_path.glob("one.so*")) and not (tmp_path / "one.weights.bin").exists()
