"""The x86 target layout: PackPlanesAsWords + the build's params transform, end to end on small graphs.

Each test builds an ONNX graph of pbs2p nodes (``models.onnx_op.make_node``), imports it, applies
``build.to_target_layout`` for a preset, compiles with the real pipeline and compares the Relax VM's output
with the numpy reference (``PackedLinear.matmul``) on random data.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip("pbs2pc.compiler.tvm_compat")
torch = pytest.importorskip("torch")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from pbs2pc.compiler import frontend  # noqa: E402
from pbs2pc.compiler.build import to_target_layout  # noqa: E402
from pbs2pc.compiler.pipeline import make_pipeline  # noqa: E402
from pbs2pc.compiler.targets import get_preset  # noqa: E402
from pbs2pc.compiler.tvm_compat import relax, tvm  # noqa: E402
from pbs2pc.models import onnx_op  # noqa: E402
from pbs2pc.models.format import NMScheme  # noqa: E402
from pbs2pc.models.simple import compress_weight  # noqa: E402
from pbs2pc.passes import LowerSparseBinaryLinear, PackPlanesAsWords  # noqa: E402
from pbs2pc.passes.pack_planes_as_words import TRANSFORM_ATTR  # noqa: E402
from testutil import rel_err  # noqa: E402

X86 = get_preset("x86")


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


def _compile_and_run(layers, preset, rows_list, static=None):
    imported = frontend.import_onnx(_model(layers, static or "M"))
    mod, params = to_target_layout(imported.mod, imported.params, preset)
    vm = relax.VirtualMachine(tvm.compile(mod, target=preset.tvm_target(), relax_pipeline=make_pipeline(preset)),
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
    """Signature and arrays change together; the record is consumed; uint8 presets change nothing."""
    layers = _layers([(64, 256, 6, 8, 64, True), (32, 256, 8, 8, 128, False)])
    imported = frontend.import_onnx(_model(layers))
    mod, params = to_target_layout(imported.mod, imported.params, X86)
    types = {p.name: (str(p.ty.dtype), [int(d) for d in p.ty.shape.values]) for p in mod["main"].params[1:]}
    assert types["l0.sign"] == ("uint32", [64, 8]) and types["l0.mask"] == ("uint32", [64, 8])
    assert types["l1.sign"] == ("uint32", [32, 8]) and "l1.mask" not in types  # 8:8 has no mask plane
    assert types["l0.alpha"] == ("float16", [64, 4])
    assert list(params) == list(types)
    for name, (dtype, shape) in types.items():
        assert str(params[name].dtype) == dtype and list(params[name].shape) == shape
        assert params[name].tobytes() == imported.params[name].tobytes()  # the same bytes, reinterpreted
    assert mod["main"].attrs is None or TRANSFORM_ATTR not in mod["main"].attrs
    same_mod, same = to_target_layout(imported.mod, imported.params, dataclasses.replace(X86, plane_word_bits=8))
    assert all(same[n] is imported.params[n] for n in same) and same_mod.same_as(imported.mod)


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


@pytest.mark.parametrize("word_bits", [32, 16, 8])
def test_word_layouts_match_reference(word_bits):
    """Every N:M the format allows, odd K (576, 1088), symbolic M at 1, 2, 3, 17 and 128 rows."""
    layers = _layers([(96, 576, 6, 8, 64, True), (40, 576, 2, 4, 64, False), (72, 576, 5, 8, 64, True),
                      (48, 576, 4, 8, 64, False), (16, 576, 8, 8, 64, True)], seed=word_bits)
    preset = dataclasses.replace(X86, plane_word_bits=word_bits)
    _, params = _compile_and_run(layers, preset, [1, 2, 3, 17, 128])
    assert str(params["l0.sign"].dtype) == f"uint{word_bits}"


def test_static_gemv_and_groups_a_word_would_straddle():
    """Static M == 1 (the GEMV schedule); G = 24 is not a multiple of 32, so that layer keeps uint8."""
    layers = _layers([(64, 1088, 6, 8, 64, True), (64, 1088, 6, 8, 64, False)], seed=3)
    _, params = _compile_and_run(layers, X86, [1], static=1)
    assert str(params["l0.sign"].dtype) == "uint32"
    odd = _layers([(40, 576, 6, 8, 24, True)], seed=4)
    _, params = _compile_and_run(odd, X86, [1, 5])
    assert str(params["l0.sign"].dtype) == "uint8" and str(params["l0.mask"].dtype) == "uint8"
