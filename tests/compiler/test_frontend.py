"""The ONNX -> Relax adapter: foreign (hand-written) files, validation of the op contract, clear errors."""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from pbs2pc.compiler import frontend
from pbs2pc.errors import FormatError, Pbs2pcError, UnsupportedError
from pbs2pc.models import onnx_op
from pbs2pc.models.format import NMScheme
from pbs2pc.models.simple import compress_weight
from testutil import rel_err


def hand_written_model(n=4, m=8, g=32, k=96, hidden=40, out=24, with_mu=False, mutate=None, attrs=None):
    """Two pbs2p layers around a Relu, written with onnx.helper only (not by pbs2pc's exporter).

    Layer 1: ``n:m`` with bias and no mu; layer 2: dense binary (mask omitted) with mu. ``mutate`` edits
    the weight arrays and ``attrs`` overrides layer 1's attributes, to build files that break the contract.
    """
    torch.manual_seed(0)
    l1 = compress_weight(torch.randn(hidden, k), NMScheme(n, m, g), bias=torch.randn(hidden))
    if not with_mu:
        l1.mu = None
    l2 = compress_weight(torch.randn(out, hidden), NMScheme(8, 8, 8))
    arrays = {"w1_sign": l1.sign, "w1_mask": l1.mask, "w1_alpha": l1.alpha, "w1_bias": l1.bias,
              "w2_sign": l2.sign, "w2_alpha": l2.alpha, "w2_mu": l2.mu}
    if with_mu:
        arrays["w1_mu"] = l1.mu
    if mutate:
        mutate(arrays)
    nodes = [
        helper.make_node("SparseBinaryLinear", ["x", "w1_sign", "w1_mask", "w1_alpha", "w1_mu" if with_mu else "", "w1_bias"],
                         ["h"], domain="pbs2p", overload="mask_mu_bias" if with_mu else "mask_bias", **{"n": n, "m": m, "group_size": g, **(attrs or {})}),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("SparseBinaryLinear", ["r", "w2_sign", "", "w2_alpha", "w2_mu"], ["y"], domain="pbs2p",
                         overload="mu", n=8, m=8, group_size=8),
    ]
    graph = helper.make_graph(
        nodes, "hand",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, out])],
        [numpy_helper.from_array(v, name) for name, v in arrays.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("pbs2p", 1)],
                              ir_version=10)
    onnx_op.attach_functions(model)
    return model, (l1, l2)


def test_hand_written_file_compiles_and_matches_onnxruntime(tmp_path):
    import onnxruntime as ort

    from pbs2pc.compiler.build import compile_model
    from pbs2pc.runtime.artifact import artifact_paths

    model, (l1, l2) = hand_written_model()
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / "hand.onnx"
    onnx.save(model, str(path))
    compile_model(path, tmp_path / "hand.so", "x86")

    import tvm
    from tvm.runtime.vm import VirtualMachine

    from pbs2pc.runtime.artifact import read_manifest, read_weights

    manifest = read_manifest(tmp_path / "hand.so")
    vm = VirtualMachine(tvm.runtime.load_module(str(tmp_path / "hand.so")), tvm.cpu())
    params = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in read_weights(artifact_paths(tmp_path / "hand.so")[1], manifest["params"])]
    x = np.random.default_rng(1).standard_normal((2, 3, 96)).astype(np.float32)
    got = vm["main"](tvm.runtime.tensor(x), *params).numpy()
    ref = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    oracle = l2.matmul(np.maximum(l1.matmul(x), 0))
    assert rel_err(ref, oracle) < 1e-5  # onnxruntime runs the FunctionProto faithfully
    assert rel_err(got, ref) < 1e-5
    assert manifest["summary"]["schemes"] == ["4:8 g=32", "8:8 g=8"]


def test_reference_functions_carry_the_scheme():
    model, _ = hand_written_model(with_mu=True)
    imported = frontend.import_onnx(model)
    tagged = [f for _, f in imported.mod.functions_items() if f.attrs is not None and frontend.OP_ATTR in f.attrs]
    assert sorted((int(f.attrs["n"]), int(f.attrs["m"]), int(f.attrs["group_size"])) for f in tagged) == [(4, 8, 32), (8, 8, 8)]
    assert imported.inputs == ["x"] and list(imported.params)[:2] == ["w1_sign", "w1_mask"]


def _break_row(arrays):
    arrays["w1_mask"] = arrays["w1_mask"].copy()
    arrays["w1_mask"][3, 0] |= 0xFF


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(mutate=_break_row), FormatError, "row 3, columns 0..7"),
    (dict(attrs={"n": 9}), FormatError, "invalid N:M 9:8"),
    (dict(attrs={"group_size": 64}), FormatError, "K=96 is not divisible by group_size=64"),
    (dict(mutate=lambda a: a.update(w1_alpha=a["w1_alpha"].astype(np.float32))), FormatError, "alpha must be float16"),
    (dict(mutate=lambda a: a.update(w1_sign=a["w1_sign"][:, :-1])), FormatError, "K=88 is not divisible"),
    (dict(mutate=lambda a: a.update(w1_mask=a["w1_mask"][:-1])), FormatError, "mask must be uint8 .40, 12."),
])
def test_contract_violations_are_named(kwargs, error, match):
    model, _ = hand_written_model(**kwargs)
    with pytest.raises(error, match=match):
        frontend.import_onnx(model)


def test_input_width_must_match_the_weights():
    model, _ = hand_written_model()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 80
    with pytest.raises(FormatError, match="X has 80 columns but its weights have K=96"):
        frontend.import_onnx(model)


def test_foreign_domain_and_unknown_ops_are_rejected():
    model, _ = hand_written_model()
    model.graph.node[1].domain = "com.example"
    with pytest.raises(UnsupportedError, match="com.example.Relu"):
        frontend.check_model(model)
    model, _ = hand_written_model()
    model.graph.node[1].op_type = "NoSuchOp"
    with pytest.raises(UnsupportedError, match="NoSuchOp"):
        frontend.check_model(model)
    model, _ = hand_written_model()
    model.graph.node[0].op_type = "DenseBinaryLinear"
    with pytest.raises(UnsupportedError, match="pbs2p.DenseBinaryLinear"):
        frontend.check_model(model)


def test_computed_weights_are_rejected():
    model, _ = hand_written_model()
    model.graph.node[0].input[1] = "x"
    with pytest.raises(UnsupportedError, match="constant initializer"):
        frontend.check_model(model)


@pytest.mark.parametrize("content", [b"", b"hello, I am not an ONNX file\n", bytes(range(256)) * 10])
def test_unreadable_files(tmp_path, content):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(Pbs2pcError):
        frontend.import_onnx(path)


def test_truncated_file(tmp_path):
    model, _ = hand_written_model()
    data = model.SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(Pbs2pcError):
        frontend.import_onnx(path)
