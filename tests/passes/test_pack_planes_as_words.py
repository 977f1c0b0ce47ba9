"""The x86 target layout: PackPlanesAsWords + InterleaveRows + the build's params transform, end to end.

Each test builds an ONNX graph of pbs2p nodes (``models.onnx_op.make_node``), imports it, applies
``build.to_target_layout`` for a preset, compiles with the real pipeline and compares the Relax VM's output
with the numpy reference (``PackedLinear.matmul``) on random data.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pbs2pc.compiler.tvm_compat")
torch = pytest.importorskip("torch")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from pbs2pc.compiler import frontend  # noqa: E402
from pbs2pc.compiler.build import to_target_layout  # noqa: E402
from pbs2pc.compiler.pipeline import make_pipeline  # noqa: E402
from pbs2pc.compiler.targets import CompileOptions, get_preset  # noqa: E402
from pbs2pc.compiler.tvm_compat import relax, tvm  # noqa: E402
from pbs2pc.models import onnx_op  # noqa: E402
from pbs2pc.models.format import NMScheme  # noqa: E402
from pbs2pc.models.simple import compress_weight  # noqa: E402
from pbs2pc.passes import InterleaveRows, LowerSparseBinaryLinear, PackPlanesAsWords  # noqa: E402
from pbs2pc.passes.interleave_rows import deinterleave_array  # noqa: E402
from pbs2pc.passes.pack_planes_as_words import TRANSFORM_ATTR, read_record  # noqa: E402
from pbs2pc.passes.kernels.registry import Layout  # noqa: E402
from testutil import rel_err, requires  # noqa: E402

#: This machine's best x86 preset: the tests run what they build.
HOST = get_preset("x86")


def _opts(word_bits=32, interleave=16):
    """Options forcing a layout (the registry's x86 layouts keep byte planes, which measured faster once rows
    are interleaved; the word path is what these tests exercise)."""
    return CompileOptions(layout=Layout(word_bits, interleave))


#: The uint32-word layout with 16-row interleaving.
WORDS = _opts()


def _layers(specs, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [compress_weight(torch.randn(n_out, k, generator=gen), NMScheme(n, m, g),
                            bias=torch.randn(n_out, generator=gen) if bias else None)
            for n_out, k, n, m, g, bias in specs]


def _model(layers, rows="M"):
    """Layer i reads X (all layers share K) and writes output Yi."""
    k = layers[0].in_features
    nodes, inits, outputs = [], [], []
    for i, layer in enumerate(layers):
        names = {}
        for role in ("sign", "mask", "alpha", "mu", "bias"):
            value = getattr(layer, role)
            if value is not None:
                names[role] = f"l{i}.{role}"
                inits.append(numpy_helper.from_array(value, names[role]))
        nodes.append(onnx_op.make_node("X", names["sign"], names.get("mask"), names["alpha"], names.get("mu"),
                                       names.get("bias"), f"Y{i}", n=layer.scheme.n, m=layer.scheme.m,
                                       group_size=layer.scheme.group_size, name=f"linear{i}"))
        outputs.append(helper.make_tensor_value_info(f"Y{i}", TensorProto.FLOAT, [rows, layer.out_features]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [rows, k])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", onnx_op.ONNX_OPSET),
                                                    helper.make_opsetid(onnx_op.DOMAIN, onnx_op.OPSET_VERSION)])
    onnx_op.attach_functions(model)
    return model


def _compile_and_run(layers, preset, rows_list, static=None, options=None):
    imported = frontend.import_onnx(_model(layers, static or "M"))
    mod, params = to_target_layout(imported.mod, imported.params, preset, options)
    vm = relax.VirtualMachine(tvm.compile(mod, target=preset.tvm_target(), relax_pipeline=make_pipeline(preset, options)),
                              tvm.cpu())
    args = [tvm.runtime.tensor(np.ascontiguousarray(p)) for p in params.values()]
    for rows in rows_list:
        x = np.random.default_rng(rows).standard_normal((rows, layers[0].in_features)).astype("float32")
        out = vm["main"](tvm.runtime.tensor(x), *args)
        outs = [out] if len(layers) == 1 else [out[i] for i in range(len(layers))]
        for layer, got in zip(layers, outs):
            assert rel_err(got.numpy(), layer.matmul(x)) < 1e-5, (rows, layer.scheme)
    return mod, params


def test_params_transform_retypes_signature_and_arrays():
    """Signature and arrays change together; the record is consumed; uint8 presets change nothing.

    The x86 layout: planes as uint32 words, then planes and scales row-interleaved as [N/16, C, 16] (the
    same bytes in another order: de-interleaving gives back the word view of the interchange bytes).
    """
    layers = _layers([(64, 256, 6, 8, 64, True), (32, 256, 8, 8, 128, False)])
    imported = frontend.import_onnx(_model(layers))
    mod, params = to_target_layout(imported.mod, imported.params, HOST, WORDS)
    types = {p.name: (str(p.ty.dtype), [int(d) for d in p.ty.shape.values]) for p in mod["main"].params[1:]}
    assert types["l0.sign"] == ("uint32", [4, 8, 16]) and types["l0.mask"] == ("uint32", [4, 8, 16])
    assert types["l1.sign"] == ("uint32", [2, 8, 16]) and "l1.mask" not in types  # 8:8 has no mask plane
    assert types["l0.alpha"] == ("float16", [4, 4, 16]) and types["l0.mu"] == ("float16", [4, 4, 16])
    assert types["l0.bias"] == ("float32", [64])  # bias is read once per row: left alone
    assert list(params) == list(types)
    for name, (dtype, shape) in types.items():
        assert str(params[name].dtype) == dtype and list(params[name].shape) == shape
        plain = deinterleave_array(params[name]) if len(shape) == 3 else params[name]
        assert plain.tobytes() == imported.params[name].tobytes()  # the same bytes, reinterpreted and permuted
        if len(shape) == 3:  # element [o, c] of the plain array sits at [o // 16, c, o % 16]
            assert params[name][1, 1, 3] == plain[1 * 16 + 3, 1]
    assert mod["main"].attrs is None or TRANSFORM_ATTR not in mod["main"].attrs
    words_mod, words = to_target_layout(imported.mod, imported.params, HOST, _opts(32, 0))
    assert words["l0.sign"].shape == (64, 8) and words["l0.alpha"] is imported.params["l0.alpha"]
    same_mod, same = to_target_layout(imported.mod, imported.params, HOST, _opts(8, 0))
    assert all(same[n] is imported.params[n] for n in same) and same_mod.same_as(imported.mod)


def test_interleave_record_and_fallback():
    """The record describes the permutation; N not a multiple of 16 keeps the row-major layout."""
    layers = _layers([(48, 256, 6, 8, 64, True), (40, 256, 6, 8, 64, True)])
    mod = InterleaveRows(16)(PackPlanesAsWords(32)(frontend.import_onnx(_model(layers)).mod))
    record = read_record(mod["main"])
    assert record["l0.sign"] == {"dtype": "uint32", "interleave": 16}
    assert record["l0.alpha"] == {"dtype": "float16", "interleave": 16}
    assert record["l1.sign"] == {"dtype": "uint32"} and "l1.alpha" not in record  # 40 rows: not interleaved
    assert "l0.bias" not in record
    assert InterleaveRows(0)(mod).same_as(mod)


def test_lowering_reads_the_words_and_drops_the_view():
    layers = _layers([(64, 256, 6, 8, 64, False)])
    mod = PackPlanesAsWords(32)(frontend.import_onnx(_model(layers)).mod)
    assert "R.memory.view" in mod["main"].script()  # the reference function still gets uint8 planes
    lowered = relax.transform.DeadCodeElimination(["main"])(LowerSparseBinaryLinear()(mod))
    text = lowered["main"].script()
    assert "R.memory.view" not in text and "R.call_tir(sparse_binary_linear_6of8_g64_" in text
    kernel = next(f for _, f in lowered.functions_items() if f.attrs is not None and "pbs2p_info" in f.attrs)
    signature = kernel.script().split("def ", 1)[1].split("\n", 1)[0]
    assert 'l0_sign: T.Buffer((T.int64(64), T.int64(8)), "uint32")' in signature and "uint8" not in signature


def test_lowering_reads_the_interleaved_inputs():
    """The kernel takes the [N/16, C, 16] parameters; the copies back to [N, C] become dead code."""
    layers = _layers([(64, 256, 6, 8, 64, True)])
    mod = InterleaveRows(16)(PackPlanesAsWords(32)(frontend.import_onnx(_model(layers)).mod))
    text = mod["main"].script()
    assert "R.permute_dims" in text and "R.memory.view" in text  # the reference function's [N, C] inputs
    lowered = relax.transform.DeadCodeElimination(["main"])(LowerSparseBinaryLinear()(mod))
    text = lowered["main"].script()
    assert "R.permute_dims" not in text and "R.memory.view" not in text and "R.reshape" not in text
    kernel = next(f for _, f in lowered.functions_items() if f.attrs is not None and "pbs2p_info" in f.attrs)
    signature = kernel.script().split("def ", 1)[1].split("\n", 1)[0]
    assert 'l0_sign: T.Buffer((T.int64(4), T.int64(8), T.int64(16)), "uint32")' in signature
    assert 'l0_mu: T.Buffer((T.int64(4), T.int64(4), T.int64(16)), "float16")' in signature


@pytest.mark.parametrize("word_bits,interleave", [(32, 16), (32, 0), (16, 16), (8, 16)])
def test_word_layouts_match_reference(word_bits, interleave):
    """Every N:M the format allows, odd K (576, 1088), symbolic M at 1, 2, 3, 17 and 128 rows.

    N = 96, 48, 16 are interleaved (with ``interleave``), N = 40 and 72 fall back to the row-major layout.
    """
    layers = _layers([(96, 576, 6, 8, 64, True), (40, 576, 2, 4, 64, False), (72, 576, 5, 8, 64, True),
                      (48, 576, 4, 8, 64, False), (16, 576, 8, 8, 64, True)], seed=word_bits + interleave)
    _, params = _compile_and_run(layers, HOST, [1, 2, 3, 17, 128], options=_opts(word_bits, interleave))
    assert str(params["l0.sign"].dtype) == f"uint{word_bits}"
    assert params["l0.sign"].ndim == (3 if interleave else 2) and params["l1.sign"].ndim == 2


def test_static_gemv_and_groups_a_word_would_straddle():
    """Static M == 1 (the GEMV schedule); G = 24 is not a multiple of 32, so those layers keep uint8
    planes (interleaved all the same where 16 divides N)."""
    layers = _layers([(64, 1088, 6, 8, 64, True), (64, 1088, 6, 8, 64, False)], seed=3)
    _, params = _compile_and_run(layers, HOST, [1], static=1, options=WORDS)
    assert str(params["l0.sign"].dtype) == "uint32" and params["l0.sign"].shape == (4, 34, 16)
    odd = _layers([(40, 576, 6, 8, 24, True), (48, 576, 6, 8, 24, True)], seed=4)
    _, params = _compile_and_run(odd, HOST, [1, 5], options=WORDS)
    assert str(params["l0.sign"].dtype) == "uint8" and str(params["l0.mask"].dtype) == "uint8"
    assert params["l0.sign"].shape == (40, 72) and params["l1.sign"].shape == (3, 72, 16)
    _compile_and_run(odd, HOST, [1], static=1, options=WORDS)


# --------------------------------------------------------------------------------------------------------
# EncodeMaskCodes: the x86 preset's masks as pattern codes (pbs2pc.passes.kernels.x86_avx512.mask_codes)

CODED_SPECS = [(64, 256, 6, 8, 64, True),  # coded
               (32, 256, 2, 4, 64, False),  # 2:4: 36 patterns per byte, keeps its mask plane
               (32, 256, 8, 8, 128, False),  # dense: no mask
               (40, 256, 6, 8, 64, True),  # N % 16 != 0: row-major planes
               (48, 256, 6, 8, 16, True),  # G = 16: the GEMVs read codes in chunks of 32 columns
               (96, 256, 7, 8, 128, True)]  # coded


def test_mask_codes_params_transform():
    from pbs2pc.passes.kernels.x86_avx512 import mask_codes

    layers = _layers(CODED_SPECS, seed=7)
    imported = frontend.import_onnx(_model(layers))
    mod, params = to_target_layout(imported.mod, imported.params, get_preset("x86-avx512"))
    types = {p.name: (str(p.ty.dtype), [int(d) for d in p.ty.shape.values]) for p in mod["main"].params[1:]}
    width = mask_codes.code_width(256)
    assert types["l0.mask"] == ("uint8", [4, width]) and types["l5.mask"] == ("uint8", [6, width])
    assert types["l1.mask"] == ("uint8", [2, 32, 16]) and "l2.mask" not in types
    assert types["l3.mask"] == ("uint8", [40, 32]) and types["l4.mask"] == ("uint8", [3, 32, 16])
    for name, (dtype, shape) in types.items():
        assert str(params[name].dtype) == dtype and list(params[name].shape) == shape
    for i, (n, m) in ((0, (6, 8)), (5, (7, 8))):
        mask, sign = imported.params[f"l{i}.mask"], imported.params[f"l{i}.sign"]
        assert (mask_codes.decode(params[f"l{i}.mask"], n, m, 256) == mask).all()
        assert (deinterleave_array(params[f"l{i}.sign"]) == sign & mask).all()  # P = sign & mask
    assert (deinterleave_array(params["l1.sign"]) == imported.params["l1.sign"]).all()  # uncoded: the sign
    assert mod["main"].attrs is None or TRANSFORM_ATTR not in mod["main"].attrs
    # fewer bytes: 1 + 0.63 + scales instead of 2 + scales bits per weight for the coded layers
    coded = sum(params[f"l{i}.{r}"].nbytes for i in (0, 5) for r in ("sign", "mask", "alpha", "mu"))
    plain = sum(imported.params[f"l{i}.{r}"].nbytes for i in (0, 5) for r in ("sign", "mask", "alpha", "mu"))
    assert 0.8 < coded / plain < 0.87


@pytest.mark.parametrize("activations", ["fp32", "int8"])
def test_one_row_calls_read_the_codes_and_others_the_expansion(activations):
    from pbs2pc.compiler.pipeline import phases

    preset, options = get_preset("x86-avx512"), CompileOptions(activations)  # compile-only: any host
    for rows in (1, "M"):  # l0 and l5 are coded: one expansion each where rows are symbolic
        layers = _layers(CODED_SPECS, seed=8)
        imported = frontend.import_onnx(_model(layers, rows))
        mod, _ = to_target_layout(imported.mod, imported.params, preset, options)
        lower = dict(phases(preset, options))["lower_pbs2p"]
        text = relax.transform.DeadCodeElimination(["main"])(lower(mod))["main"].script()
        assert text.count("R.call_tir(expand_mask_codes_") == (0 if rows == 1 else 2), rows


@requires("x86-avx512")
def test_mask_codes_compile_and_match_reference():
    """Symbolic M (the expansion + the TE kernel) at 1, 2, 3, 17 rows, and static M = 1 (the coded GEMVs)."""
    layers = _layers(CODED_SPECS, seed=9)
    _compile_and_run(layers, get_preset("x86-avx512"), [1, 2, 3, 17])
    _compile_and_run(layers, get_preset("x86-avx512"), [1], static=1)
