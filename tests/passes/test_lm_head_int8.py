"""``--lm-head int8``: the int8 head kernels against numpy, the params transform, and the compiled tiny model.

* The layout (``passes/kernels/lm_head_int8.py``): one int8 tensor ``[V, H + 2 * H / 32]``, each row's codes
  then its groups' fp16 scales (little-endian); every entry within half a step of the fp32 table, and a
  table that is Q8_0 already (int8 codes times an fp16 scale per 32 columns) comes back bit-exactly.
* The kernels against the float64 product with the dequantised table (outputs NaN-poisoned first): they sum
  in fp32 and scale once per group, so float32 rounding is all they may add; the dequantisation of rows
  (the token lookup, and ``main``'s table) is the same numbers, exactly.
* The params transform changes ``main``'s signature and the array together; the compiled model's one-token
  entries call the int8 kernel with no float32 copy of the table, ``main`` converts it once, and the
  logits sit within the quantisation's error of the fp32 build while the decode steps match the
  model's own whole-prompt path to float32 rounding.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

tvm_compat = pytest.importorskip("pbs2pc.compiler.tvm_compat")

from pbs2pc.compiler.tvm_compat import tvm  # noqa: E402
from pbs2pc.errors import UnsupportedError  # noqa: E402
from pbs2pc.passes.kernels import lm_head_int8 as head  # noqa: E402
from testutil import AVX2_TARGET, AVX512_TARGET, X86, head_outputs, host_target, rel_err  # noqa: E402

#: Numerics on this machine's best x86 target; the assembly of each x86 ISA is checked compile-only.
TARGET = host_target()
TABLE = "model.embed_tokens.weight"


def _build(vocab, hidden, target=None):
    mod = tvm.IRModule({"head": head.lm_head_int8(vocab, hidden).with_attr("global_symbol", "head"),
                        "rows": head.dequantize_rows(hidden).with_attr("global_symbol", "rows")})
    return tvm.compile(mod, target=target or TARGET)


def _table(rng, vocab, hidden):
    table = (rng.standard_normal((vocab, hidden)) * 0.05).astype(np.float32)
    table[1] = 0  # an all-zero row: scale 0
    table[2, 3] = 40.0  # one outlier: its group's step is large, the row's other groups keep theirs
    table[3, :32] = 0  # an all-zero group in a row of others
    table[4] *= 1e-3  # small values: fp16 scales below fp16's smallest normal (6.1e-5), still in range
    return table


def _q8_0(rng, vocab, hidden):
    """A table that is Q8_0 already, as llama.cpp writes it: per 32 columns random codes in [-127, 127] with
    127 in magnitude among them (the group's largest, scaled by d = max / 127), times a random fp16 scale
    (normal and subnormal fp16 values among them, and one all-zero group)."""
    codes = rng.integers(-127, 128, (vocab, hidden // 32, 32))
    codes[:, :, 0] = rng.choice([-127, 127], (vocab, hidden // 32))
    scale = (np.exp(rng.uniform(np.log(1e-7), np.log(1.0), (vocab, hidden // 32, 1)))).astype(np.float16)
    scale[0, 0], codes[0, 0] = 0, 0  # an all-zero group: scale 0 and codes 0
    table = (codes * scale.astype(np.float32)).astype(np.float32).reshape(vocab, hidden)  # exact products
    return table, codes.reshape(vocab, hidden).astype(np.int8), scale.reshape(vocab, hidden // 32)


def test_quantize_layout():
    rng = np.random.default_rng(0)
    table = _table(rng, 64, 96)
    packed = head.quantize(table)
    assert head.row_bytes(96) == 96 + 6 and head.hidden_of(102) == 96
    assert packed.dtype == np.int8 and packed.shape == (64, head.row_bytes(96))
    scale = packed[:, 96:].copy().view("<f2")  # [64, 3] fp16
    groups = table.reshape(64, 3, 32)
    assert np.array_equal(scale, (np.abs(groups).max(2) / np.float32(127)).astype(np.float16))
    codes = packed[:, :96].astype(np.int32).reshape(64, 3, 32)
    assert codes.min() >= -127 and codes.max() <= 127
    assert not codes[1].any() and not scale[1].any() and not codes[3, 0].any() and scale[3, 0] == 0
    assert scale[3, 1] > 0 and np.abs(codes[2, 0]).max() == 127 and scale[2, 1] < scale[2, 0] / 100
    step = np.repeat(scale.astype(np.float64), 32, axis=1)
    assert np.all(np.abs(head.dequantize(packed) - table) <= step / 2 * (1 + 1e-6))
    with pytest.raises(ValueError, match="divisible by 32"):
        head.quantize(np.zeros((4, 48), np.float32))


def test_q8_0_table_round_trips_exactly():
    """A Q8_0 table (the bundled GGUF's token_embd) is stored as it is: the same codes and scales, and both
    dequantisations (numpy, the compiled kernel) give back the table bit for bit; the head kernel is its
    product to fp32 rounding."""
    rng = np.random.default_rng(11)
    vocab, hidden = 1000, 96
    table, codes, scale = _q8_0(rng, vocab, hidden)
    packed = head.quantize(table)
    assert np.array_equal(packed[:, :hidden], codes)
    assert np.array_equal(packed[:, hidden:].copy().view("<f2").view(np.uint16), scale.view(np.uint16))
    assert np.array_equal(head.dequantize(packed).astype(np.float32), table)
    lib = _build(vocab, hidden)
    out = tvm.runtime.tensor(np.full((vocab, hidden), np.nan, np.float32))
    lib["rows"](tvm.runtime.tensor(packed), out)
    assert np.array_equal(out.numpy(), table)
    x = rng.standard_normal((2, hidden)).astype(np.float32)
    y = tvm.runtime.tensor(np.full((2, vocab), np.nan, np.float32))
    lib["head"](tvm.runtime.tensor(x), tvm.runtime.tensor(packed), y)
    assert rel_err(y.numpy(), np.asarray(x, np.float64) @ table.astype(np.float64).T) < 1e-6


@pytest.mark.parametrize("vocab, hidden", [
    (256, 64),  # the tiny model's table: 4 tasks of 64 rows
    (1000, 96),  # 1000 rows: tasks of 8; K = 3 groups
    (49152 // 16, 576),  # SmolLM2's hidden size (a sixteenth of its vocabulary)
])
@pytest.mark.parametrize("rows", [1, 3])
def test_kernel_matches_float64_product(vocab, hidden, rows):
    rng = np.random.default_rng(vocab + rows)
    packed = head.quantize(_table(rng, vocab, hidden))
    x = rng.standard_normal((rows, hidden)).astype(np.float32)
    y = tvm.runtime.tensor(np.full((rows, vocab), np.nan, np.float32))
    _build(vocab, hidden)["head"](tvm.runtime.tensor(x), tvm.runtime.tensor(packed), y)
    ref = head.reference(x, packed)
    got = y.numpy()
    assert not np.isnan(got).any() and rel_err(got, ref) < 1e-6
    assert got[:, 1].tolist() == [0.0] * rows  # the zero row


@pytest.mark.parametrize("knobs", [
    {"step": 1, "prefetch_rows": 0, "k_unroll": 2, "rows_per_task": 16},  # no prefetch, one group a block
    {"step": 4, "prefetch_rows": 8, "locality": 3, "k_unroll": 6, "rows_per_task": 256},
])
def test_every_tuning_knob_gives_the_same_bits(knobs):
    """The tuner's settings change the loops, not the sums (see the fp16 kernel's test)."""
    vocab, hidden = 49152 // 16, 576
    assert all(knobs[k] in head.knobs(vocab, hidden)[k] for k in knobs)
    rng = np.random.default_rng(5)
    packed = head.quantize(_table(rng, vocab, hidden))
    x = rng.standard_normal((1, hidden)).astype(np.float32)
    outs = head_outputs(head.lm_head_int8, packed, x, TARGET, [{}, knobs, {"rows": 1, **knobs}])
    assert rel_err(outs[0], head.reference(x, packed)) < 1e-6
    np.testing.assert_array_equal(outs[1], outs[0])
    np.testing.assert_array_equal(outs[2], outs[0])


def test_dequantize_rows_matches_numpy():
    rng = np.random.default_rng(7)
    packed = head.quantize(_table(rng, 1000, 96))
    lib = _build(1000, 96)
    for taken in (packed[[5]], packed[[3, 2, 999, 1]], packed):  # one token, a few, the whole table
        out = tvm.runtime.tensor(np.full((taken.shape[0], 96), np.nan, np.float32))
        lib["rows"](tvm.runtime.tensor(np.ascontiguousarray(taken)), out)
        assert np.array_equal(out.numpy(), head.dequantize(taken).astype(np.float32))  # one exact product each


@pytest.mark.parametrize("target,reg", [(AVX512_TARGET, "zmm"), (AVX2_TARGET, "ymm")])
def test_kernel_widens_int8_in_vector_registers(target, reg):
    asm = _build(256, 64, tvm.target.Target(target)).mod.inspect_source("asm")
    assert re.search(rf"vpmovsxbd\s+.*%{reg}", asm), "the int8 codes are not sign-extended a vector at a time"
    assert re.search(rf"vcvtdq2ps\s+.*%{reg}", asm), "the codes are not converted to fp32 a vector at a time"
    assert re.search(rf"vfmadd\w+ps\s+.*%{reg}", asm), "the products are not full-width FMAs"
    assert re.search(rf"vcvtph2ps\s+.*%{reg}", asm), "the fp16 group scales are not widened in registers"
    assert "prefetcht2" in asm, "the next rows are not prefetched into L2"
    if reg == "ymm":
        assert "%zmm" not in asm, "AVX-512 registers in an AVX2 build"


def test_supported_shapes_and_presets():
    from pbs2pc.compiler.targets import CompileOptions, get_preset

    assert head.supported(49152, 576) and head.supported(256, 64) and not head.supported(50257, 768)
    assert not head.supported(256, 48) and not head.supported(256, 40)  # H % 32
    for name in ("x86", "x86-avx2", "x86-avx512"):
        assert CompileOptions(lm_head="int8").check(get_preset(name)).lm_head == "int8"
    with pytest.raises(UnsupportedError, match="no int8 LM head kernel"):
        CompileOptions(lm_head="int8").check(get_preset("cuda"))


def test_params_transform_changes_signature_and_array_together(tiny_onnx):
    from pbs2pc.compiler import frontend
    from pbs2pc.compiler.build import _vocab_size, to_target_layout
    from pbs2pc.compiler.targets import CompileOptions, get_preset
    from pbs2pc.passes.pack_planes_as_words import TRANSFORM_ATTR

    imported = frontend.import_onnx(frontend.load_onnx(tiny_onnx))
    original = np.asarray(imported.params[TABLE]).copy()
    mod, params = to_target_layout(imported.mod, imported.params, get_preset(X86), CompileOptions(lm_head="int8"),
                                   vocab=_vocab_size(imported))
    main = mod["main"]
    assert main.attrs is None or TRANSFORM_ATTR not in main.attrs  # the record was applied and dropped
    param = next(p for p in main.params if p.name == TABLE.replace(".", "_") or p.name == TABLE)
    assert str(param.ty.dtype) == "int8" and [int(d) for d in param.ty.shape] == [256, head.row_bytes(64)]
    assert np.array_equal(params[TABLE], head.quantize(original))
    assert head.DEQUANTIZE in [gv.name_hint for gv in mod.get_global_vars()]


def _function(dumped_ir, name):
    start = dumped_ir.index(f"    def {name}(")
    end = dumped_ir.find("\n    @", start)
    return dumped_ir[start:end if end > 0 else None]


def test_compiled_model_with_int8_head(tiny_onnx, tiny_library, tmp_path):
    from pbs2pc.compiler.build import compile_model
    from pbs2pc.runtime import load

    manifest = compile_model(tiny_onnx, tmp_path / "h8.so", X86, dump_ir=tmp_path / "ir", lm_head="int8")
    assert manifest["lm_head"] == "int8" and manifest["options"]["lm_head"] == "int8"
    stored = {p["name"]: p for p in manifest["params"]}
    assert stored[TABLE]["dtype"] == "int8" and stored[TABLE]["shape"] == [256, head.row_bytes(64)]
    fp32_weights = tiny_library.with_name(tiny_library.stem + ".weights.bin").stat().st_size
    assert manifest["sizes"]["weights"] <= fp32_weights - 256 * 64 * 4 + 256 * 68 + 64  # (+ alignment)

    kept = next((tmp_path / "ir").glob("*_dead_code.py")).read_text()
    converted = 'R.Tensor((256, 64), dtype="float32")'  # a float32 copy of the whole table
    for entry in ("decode", "prefill"):  # the kernel, and no copy (the lookup dequantises the rows it takes)
        body = _function(kept, entry)
        assert body.count("cls.lm_head_int8,") == 1 and "NT_matmul" not in body and converted not in body, entry
        assert body.count(f"cls.{head.DEQUANTIZE}") == 1, entry  # the taken rows
    main = _function(kept, "main")  # every position's logits: the product on one converted copy per call
    assert "cls.lm_head_int8," not in main and main.count(converted) == 1

    ids = [5, 9, 100, 7]
    h8, fp32 = load(tmp_path / "h8.so"), load(tiny_library)
    h8.prefill(ids[:3], 64)
    step_logits = h8.step(ids[3])  # decode: the int8 kernel
    prompt_logits = h8.prefill(ids, 64)  # prefill: the int8 kernel on the last position
    main_logits = h8.logits(ids)[0, -1]  # main: the float32 product on the dequantised table
    assert rel_err(step_logits, main_logits) < 1e-5 and rel_err(prompt_logits, main_logits) < 1e-5
    # Each entry is within half a step (about max|group| / 254) of the fp32 table: for these Gaussian rows
    # (groups of 32 values) an rms error under 1 % of the row's rms, so the logits move by about 1 % of their
    # largest (1.2e-2 measured; 1.0e-2 with the former per-row scales); they must move (the tiny model's
    # table is not Q8_0), and by no more than 3 %.
    reference = fp32.logits(ids)[0, -1]
    assert 1e-3 < rel_err(main_logits, reference) < 3e-2

    # Greedy decoding: every step equals the whole-prompt path on the sequence so far.
    seq = list(ids)
    logits = h8.prefill(seq, 64)
    for _ in range(4):
        seq.append(int(np.argmax(logits)))
        logits = h8.step(seq[-1])
        assert rel_err(logits, h8.logits(seq)[0, -1]) < 1e-5
