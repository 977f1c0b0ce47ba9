"""Op contract v2 on the wire: the v2 inputs of the ONNX op, their reference functions run by onnxruntime
against the numpy oracle, the opset / format-version rule, a whole-model export with v2 layers, and what
``pbs2pc inspect`` reports for it."""

import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from pbs2pc.errors import FormatError
from pbs2pc.models import export, modules, onnx_op, report
from pbs2pc.models.format import V2_FIELDS, NMScheme, PackedLinear
from testutil import make_ids, ort_logits, random_layer, random_structure, rel_err


def _layer(rows, n_out=40, k=256, g=64, mask_kind="6:8", has_mu=True, has_bias=False, groups=True, salient=4,
           seed=0):
    """``(x, PackedLinear)``: a random v2 layer (``salient``: columns per group of ``g``; ``None``: no residual,
    ``0``: a residual set with no salient column) and its input."""
    x, sign, mask, alpha, mu, bias = random_layer(rows, n_out, k, g, mask_kind, has_mu, has_bias, seed=seed)
    rng = np.random.default_rng(seed + 100)
    structure = random_structure(rng, n_out, k, g, groups=groups, salient=salient or 0)
    if salient == 0:  # the residual set present, with no salient column: a one-byte residual plane per row
        structure.update(salient=np.zeros((1, k // 8), np.uint8), residual=np.zeros((n_out, 1), np.uint8),
                         residual_alpha=np.ones((n_out, k // g), np.float16),
                         residual_mu=np.ones((n_out, k // g), np.float16))
    n = 8 if mask_kind is None else int(mask_kind.split(":")[0])
    return x, PackedLinear(sign, mask, alpha, mu, NMScheme(n, 8, g), bias, **structure).validate()


def _single_node_model(p: PackedLinear, x_shape) -> onnx.ModelProto:
    """One pbs2p node holding ``p``, written with ``onnx_op.make_node`` (the weights as initializers)."""
    names = {k: f"w.{k}" for k in onnx_op.INPUTS[1:] if getattr(p, k) is not None}
    node = onnx_op.make_node("X", names["sign"], names.get("mask"), names["alpha"], names.get("mu"),
                             names.get("bias"), "Y", n=p.scheme.n, m=p.scheme.m, group_size=p.scheme.group_size,
                             name="layer", **{k: names.get(k) for k in V2_FIELDS})
    graph = helper.make_graph(
        [node], "v2",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [*x_shape[:-1], p.in_features])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [*x_shape[:-1], p.out_features])],
        [numpy_helper.from_array(getattr(p, k), name) for k, name in names.items()],
    )
    model = helper.make_model(graph, ir_version=10, opset_imports=[
        helper.make_opsetid("", onnx_op.ONNX_OPSET), helper.make_opsetid(onnx_op.DOMAIN, onnx_op.OPSET_VERSION)])
    onnx_op.attach_functions(model)
    return model


def _v1(p: PackedLinear) -> PackedLinear:
    return PackedLinear(p.sign, p.mask, p.alpha, p.mu, p.scheme, p.bias)


# (mask kind, mu, bias, groups, salient columns per group of 64 or None) -> overload
CASES = [
    ("6:8", True, False, True, None, "mask_mu_groups"),
    ("6:8", True, False, False, 4, "mask_mu_residual"),
    ("6:8", True, True, True, 4, "mask_mu_bias_groups_residual"),
    ("4:8", False, True, True, None, "mask_bias_groups"),
    ("4:8", False, False, False, 3, "mask_residual"),  # 6 salient columns: a partly used residual byte
    (None, True, False, True, 5, "mu_groups_residual"),
    (None, False, True, False, 64, "bias_residual"),  # every column salient
    (None, False, False, True, 4, "groups_residual"),
    ("6:8", True, True, False, 0, "mask_mu_bias_residual"),  # a residual set with no salient column
]


@pytest.mark.parametrize("rows", [1, 2, 17])
@pytest.mark.parametrize("mask_kind,has_mu,has_bias,groups,salient,overload", CASES)
def test_onnxruntime_runs_the_v2_reference_function(mask_kind, has_mu, has_bias, groups, salient, overload, rows):
    import onnxruntime as ort

    x, p = _layer(rows, mask_kind=mask_kind, has_mu=has_mu, has_bias=has_bias, groups=groups, salient=salient,
                  seed=rows)
    model = _single_node_model(p, x.shape)
    onnx.checker.check_model(model, full_check=True)
    node = model.graph.node[0]
    assert node.overload == overload
    assert {(f.domain, f.name, f.overload) for f in model.functions} == {(onnx_op.DOMAIN, onnx_op.OP_TYPE, overload)}
    assert {o.domain: o.version for o in model.opset_import}[onnx_op.DOMAIN] == 2
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"X": x})[0]
    ref = p.matmul(x)
    # float32 decode and matmul against the float64 oracle: the same weights, summation order only (~1e-7)
    assert got.shape == ref.shape and rel_err(got, ref) < 1e-5
    if salient != 0:  # the v2 structure changes the result far beyond the tolerance
        assert rel_err(_v1(p).matmul(x), ref) > 1e-2


def test_v2_function_with_batched_input():
    import onnxruntime as ort

    x, p = _layer(6, has_bias=True, seed=7)
    x = x.reshape(2, 3, -1)
    model = _single_node_model(p, x.shape)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"X": x})[0]
    assert got.shape == (2, 3, p.out_features) and rel_err(got, p.matmul(x)) < 1e-5


def test_overload_names_keep_the_v1_names():
    assert onnx_op.overload_name(True, True, False) == "mask_mu"
    assert onnx_op.overload_name(False, False, False) == ""
    assert onnx_op.overload_name(True, True, True, True, True) == "mask_mu_bias_groups_residual"
    assert onnx_op.overload_name(False, False, False, False, True) == "residual"
    assert onnx_op.parse_overload("mu_groups") == {"mask": False, "mu": True, "bias": False, "groups": True,
                                                   "residual": False}
    for bad in ("mu_mask", "mask_group_alpha", "salient"):
        with pytest.raises(FormatError, match="not a pbs2p overload"):
            onnx_op.parse_overload(bad)


def test_make_node_places_v2_inputs_after_bias():
    node = onnx_op.make_node("X", "s", "m", "a", None, None, "Y", n=6, m=8, group_size=64, name="l",
                             salient="sal", residual="r", residual_alpha="ra", residual_mu="rm")
    assert list(node.input) == ["X", "s", "m", "a", "", "", "", "", "", "sal", "r", "ra", "rm"]
    assert node.overload == "mask_residual"
    node = onnx_op.make_node("X", "s", None, "a", "u", None, "Y", n=8, m=8, group_size=64, name="l",
                             group="g", group_alpha="ga", group_mu="gm")
    assert list(node.input) == ["X", "s", "", "a", "u", "", "g", "ga", "gm"] and node.overload == "mu_groups"
    assert onnx_op.node_roles(node)["group_mu"] == "gm" and onnx_op.node_roles(node)["residual"] == ""
    v1 = onnx_op.make_node("X", "s", "m", "a", "u", None, "Y", n=6, m=8, group_size=64, name="l")
    assert list(v1.input) == ["X", "s", "m", "a", "u"] and onnx_op.node_version(v1) == 1
    assert onnx_op.node_version(node) == 2


def test_a_partial_v2_set_is_refused():
    with pytest.raises(FormatError, match="group, group_alpha, group_mu go together; missing group_mu"):
        onnx_op.make_node("X", "s", "m", "a", "u", None, "Y", n=6, m=8, group_size=64, name="l",
                          group="g", group_alpha="ga")
    with pytest.raises(FormatError, match="missing residual_alpha, residual_mu"):
        onnx_op.make_node("X", "s", "m", "a", "u", None, "Y", n=6, m=8, group_size=64, name="l",
                          salient="sal", residual="r")


def test_opset_and_version_follow_the_nodes():
    _, p = _layer(1, groups=True, salient=None)
    model = _single_node_model(_v1(p), (1, p.in_features))
    assert onnx_op.contract_version(model) == 1
    assert {o.domain: o.version for o in model.opset_import}[onnx_op.DOMAIN] == onnx_op.OPSET_VERSION == 1
    v2 = _single_node_model(p, (1, p.in_features))
    assert onnx_op.contract_version(v2) == 2
    assert {o.domain: o.version for o in v2.opset_import}[onnx_op.DOMAIN] == onnx_op.OPSET_VERSION_V2 == 2
    onnx_op.attach_functions(v2)  # idempotent
    assert len(v2.functions) == 1 and [o.domain for o in v2.opset_import].count(onnx_op.DOMAIN) == 1


def test_v1_export_is_unchanged(tiny_onnx):
    model = onnx.load(str(tiny_onnx), load_external_data=False)
    assert {o.domain: o.version for o in model.opset_import}[onnx_op.DOMAIN] == 1
    assert {p.key: p.value for p in model.metadata_props}[onnx_op.METADATA_KEY] == "1"
    nodes = [n for n in model.graph.node if n.domain == onnx_op.DOMAIN]
    assert nodes and all(len(n.input) <= 6 and n.overload == "mask_mu" for n in nodes)
    (function,) = model.functions
    assert list(function.input) == ["X", "sign", "mask", "alpha", "mu"]
    assert function.SerializeToString() == onnx_op.make_function(True, True, False).SerializeToString()
    assert not any(n.op_type in ("Where", "CumSum", "Gather") for n in function.node)
    layers = report.onnx_layers(model)
    assert all(layer.version == 1 and layer.salient_columns == 0 for layer in layers)
    summary = report.summarize(layers)
    assert summary["format_version"] == 1 and summary["layers_with_groups"] == summary["layers_with_residual"] == 0
    assert summary["bits_interchange"] == 2.5


V2_LAYERS = {  # decoder linear -> (groups, salient columns per group of 64 or None)
    "model.layers.0.self_attn.q_proj": (True, None),
    "model.layers.0.mlp.down_proj": (False, 3),
    "model.layers.1.self_attn.o_proj": (True, 5),
}


@pytest.fixture(scope="module")
def v2_model(tiny_compressed):
    """The tiny compressed Llama with three decoder linears given v2 structure (random groups / residuals)."""
    model = copy.deepcopy(tiny_compressed[0])
    rng = np.random.default_rng(11)
    for name, (groups, salient) in V2_LAYERS.items():
        p = model.get_submodule(name).packed()
        structure = random_structure(rng, p.out_features, p.in_features, p.scheme.group_size, groups=groups,
                                     salient=salient or 0)
        modules.replace_linear(model, name, PackedLinear(**{**vars(p), **structure}))
    return model


@pytest.fixture(scope="module")
def v2_onnx(v2_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx_v2") / "model.onnx"
    export.export(v2_model, path, {"source_model": "tiny-llama-v2"})
    return path


def test_v2_export_carries_the_structure(v2_onnx, v2_model):
    model = onnx.load(str(v2_onnx), load_external_data=False)
    assert {o.domain: o.version for o in model.opset_import}[onnx_op.DOMAIN] == 2
    assert {p.key: p.value for p in model.metadata_props}[onnx_op.METADATA_KEY] == "2"
    assert {f.overload for f in model.functions} == {"mask_mu", "mask_mu_groups", "mask_mu_residual",
                                                     "mask_mu_groups_residual"}
    nodes = {n.name: n for n in model.graph.node if n.domain == onnx_op.DOMAIN}
    assert nodes["model.layers.0.self_attn.q_proj"].overload == "mask_mu_groups"
    roles = onnx_op.node_roles(nodes["model.layers.1.self_attn.o_proj"])
    assert roles["group"] == "model.layers.1.self_attn.o_proj.group"
    assert roles["residual_mu"] == "model.layers.1.self_attn.o_proj.residual_mu"
    onnx.checker.check_model(str(v2_onnx), full_check=True)

    layers = {layer.name: layer for layer in report.onnx_layers(model)}
    for name, (groups, salient) in V2_LAYERS.items():
        packed = v2_model.get_submodule(name).packed()
        layer = layers[name]
        assert (layer.has_groups, layer.has_residual) == (groups, salient is not None)
        assert layer.salient_columns == len(packed.salient_columns())
        assert layer.bits() == packed.bits()
    assert layers["model.layers.1.mlp.up_proj"].version == 1
    weights = report.weight_inputs(model)
    assert "model.layers.1.self_attn.o_proj.salient" in weights and "model.layers.0.self_attn.q_proj.group_mu" in weights
    assert not any(name.endswith(".bias") for name in weights)
    summary = report.summarize(list(layers.values()))
    assert summary["format_version"] == 2 and summary["layers_with_groups"] == 2
    assert summary["layers_with_residual"] == 2 and summary["salient_columns"] == 3 * 2 + 5
    assert summary["bits_interchange"] > 2.5 and summary["bits_paper"] > 0.75


def test_onnxruntime_matches_the_v2_torch_model(v2_onnx, v2_model, tiny_compressed):
    ids = make_ids(2, 19, seed=5)
    with torch.inference_mode():
        ref = v2_model(torch.from_numpy(ids), use_cache=False).logits.numpy()
        v1_ref = tiny_compressed[0](torch.from_numpy(ids), use_cache=False).logits.numpy()
    assert rel_err(ort_logits(v2_onnx, ids), ref) < 1e-5  # fp32 throughout, summation order only
    assert rel_err(v1_ref, ref) > 1e-2  # the v2 layers matter


def test_salient_columns_are_counted_from_external_data(v2_model, tmp_path):
    proto = export.to_onnx(v2_model)
    onnx.save_model(proto, str(tmp_path / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx.data", size_threshold=0)
    model = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    exact = {layer.name: layer.salient_columns for layer in report.onnx_layers(model, base_dir=tmp_path)}
    assert exact["model.layers.0.mlp.down_proj"] == 3 * 2 and exact["model.layers.1.self_attn.o_proj"] == 5
    # without the data the residual plane's width bounds the count
    bound = {layer.name: layer.salient_columns for layer in report.onnx_layers(model)}
    assert bound["model.layers.0.mlp.down_proj"] == 8 and bound["model.layers.1.self_attn.o_proj"] == 8


def test_inspect_shows_the_v2_structure(v2_onnx, capsys):
    from pbs2pc.cli import main

    assert main(["inspect", str(v2_onnx), "--layers"]) == 0
    out = capsys.readouterr().out
    assert "'pbs2p': 2" in out and "pbs2p.format_version: 2" in out
    assert "op contract v2 structure: magnitude groups in 2 of 14 layers, a salient residual in 2 (11 salient" in out
    assert "v2 layers add a group bit, residual signs and the salient bitmap" in out
    row = next(line for line in out.splitlines() if line.startswith("model.layers.0.mlp.down_proj"))
    assert "6 (4.7%)" in row
    assert main(["inspect", str(v2_onnx), "--json"]) == 0
    import json

    summary = json.loads(capsys.readouterr().out)["summary"]
    assert summary["layers_with_residual"] == 2 and summary["format_version"] == 2
