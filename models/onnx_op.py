"""The ``pbs2p.SparseBinaryLinear`` ONNX op (contract version 1): node builder and reference FunctionProto.

The op (docs/format.md has the full contract)::

    Y = SparseBinaryLinear(X, sign, mask?, alpha, mu?, bias?)   domain "pbs2p", attributes n, m, group_size
    W[o, j] = mask[o, j] * (alpha[o, j // G] * (2 * sign[o, j] - 1) + mu[o, j // G]);   Y = X @ W.T + bias

Optional inputs are omitted the ONNX way (an empty name, trailing ones dropped). Because an ONNX function
body cannot test whether an optional input is present, the reference meaning is attached as one
FunctionProto per *overload*: the overload names the optional inputs the node passes, joined by ``_``
(``"mask_mu"``, ``"mask_mu_bias"``, ``"mu"``, ``""`` for none), and every node carries the overload that
matches its inputs. Each body is written in standard ONNX ops only (BitShift, BitwiseAnd, Cast, Mul, Add,
Reshape, Transpose, MatMul), so onnxruntime, or any ONNX runtime, executes the file as the reference.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DOMAIN = "pbs2p"
OP_TYPE = "SparseBinaryLinear"
OPSET_VERSION = 1
#: The standard ONNX opset of exported models (the KV-cache ``Attention`` op needs 23). The function
#: bodies import the model's own version (the checker insists), which must be at least MIN_ONNX_OPSET.
ONNX_OPSET = 23
MIN_ONNX_OPSET = 18  # BitwiseAnd
INPUTS = ("X", "sign", "mask", "alpha", "mu", "bias")
OPTIONAL = ("mask", "mu", "bias")


def overload_name(has_mask: bool, has_mu: bool, has_bias: bool) -> str:
    """The overload that a node with these optional inputs present must carry."""
    present = {"mask": has_mask, "mu": has_mu, "bias": has_bias}
    return "_".join(name for name in OPTIONAL if present[name])


def make_node(x: str, sign: str, mask: str | None, alpha: str, mu: str | None, bias: str | None,
              y: str, *, n: int, m: int, group_size: int, name: str) -> onnx.NodeProto:
    """A ``SparseBinaryLinear`` node; ``None`` inputs are omitted."""
    inputs = [x, sign, mask or "", alpha, mu or "", bias or ""]
    while inputs[-1] == "":
        inputs.pop()
    return helper.make_node(
        OP_TYPE, inputs, [y], name=name, domain=DOMAIN,
        overload=overload_name(mask is not None, mu is not None, bias is not None),
        n=n, m=m, group_size=group_size,
    )


def _unpack(nodes: list, plane: str, out: str) -> None:
    """Append nodes turning a uint8 ``[N, K/8]`` plane into a 0/1 uint8 ``[N, K]`` tensor ``out``."""
    nodes += [
        helper.make_node("Unsqueeze", [plane, "c_last"], [f"{plane}_3d"]),            # [N, K/8, 1]
        helper.make_node("BitShift", [f"{plane}_3d", "c_shifts"], [f"{plane}_sh"], direction="RIGHT"),
        helper.make_node("BitwiseAnd", [f"{plane}_sh", "c_one"], [f"{plane}_bits"]),  # [N, K/8, 8]
        helper.make_node("Reshape", [f"{plane}_bits", "c_nk"], [out]),                 # [N, K]
    ]


def make_function(has_mask: bool, has_mu: bool, has_bias: bool, opset: int = ONNX_OPSET) -> onnx.FunctionProto:
    """The reference FunctionProto of one overload, written against default-domain ``opset``."""
    present = {"mask": has_mask, "mu": has_mu, "bias": has_bias}
    formal = [name for name in INPUTS if name not in OPTIONAL or present[name]]
    # Positional binding: an omitted optional input before a present one keeps its slot.
    last = max(INPUTS.index(name) for name in formal)
    inputs = [name if name in formal else f"unused_{name}" for name in INPUTS[: last + 1]]

    def const(name, array):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(array), name))

    nodes = [
        const("c_last", np.array([-1], np.int64)),
        const("c_shifts", np.arange(8, dtype=np.uint8)),
        const("c_one", np.array(1, np.uint8)),
        const("c_nk", np.array([0, -1], np.int64)),
        const("c_two", np.array(2.0, np.float32)),
        const("c_fone", np.array(1.0, np.float32)),
    ]
    _unpack(nodes, "sign", "sign_01")
    nodes += [
        # s = 2 * bit - 1, as float; groups of G columns: [N, K/G, G]
        helper.make_node("Cast", ["sign_01"], ["sign_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["sign_f", "c_two"], ["sign_2"]),
        helper.make_node("Sub", ["sign_2", "c_fone"], ["pm1"]),
        helper.make_node("Shape", ["alpha"], ["groups"], start=1, end=2),
        helper.make_node("Concat", ["c_zero_1", "groups", "c_last"], ["c_ngg"], axis=0),
        helper.make_node("Reshape", ["pm1", "c_ngg"], ["pm1_g"]),
        helper.make_node("Cast", ["alpha"], ["alpha_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["alpha_f", "c_last"], ["alpha_3d"]),
        helper.make_node("Mul", ["pm1_g", "alpha_3d"], ["w_a"]),
    ]
    nodes.insert(0, const("c_zero_1", np.array([0], np.int64)))
    w = "w_a"
    if has_mu:
        nodes += [
            helper.make_node("Cast", ["mu"], ["mu_f"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["mu_f", "c_last"], ["mu_3d"]),
            helper.make_node("Add", [w, "mu_3d"], ["w_mu"]),
        ]
        w = "w_mu"
    nodes.append(helper.make_node("Reshape", [w, "c_nk"], ["w_dense"]))
    w = "w_dense"
    if has_mask:
        _unpack(nodes, "mask", "mask_01")
        nodes += [
            helper.make_node("Cast", ["mask_01"], ["mask_f"], to=TensorProto.FLOAT),
            helper.make_node("Mul", [w, "mask_f"], ["w_masked"]),
        ]
        w = "w_masked"
    nodes += [
        helper.make_node("CastLike", [w, "X"], ["w_x"]),
        helper.make_node("Transpose", ["w_x"], ["w_t"], perm=[1, 0]),
    ]
    if has_bias:
        nodes += [
            helper.make_node("MatMul", ["X", "w_t"], ["xw"]),
            helper.make_node("CastLike", ["bias", "X"], ["bias_x"]),
            helper.make_node("Add", ["xw", "bias_x"], ["Y"]),
        ]
    else:
        nodes.append(helper.make_node("MatMul", ["X", "w_t"], ["Y"]))
    return helper.make_function(
        DOMAIN, OP_TYPE, inputs, ["Y"], nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=["n", "m", "group_size"],
        overload=overload_name(has_mask, has_mu, has_bias),
    )


def attach_functions(model: onnx.ModelProto) -> None:
    """Attach the reference function of every overload the model's pbs2p nodes use (idempotent)."""
    have = {(f.domain, f.name, f.overload) for f in model.functions}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), ONNX_OPSET)
    for node in model.graph.node:
        if node.domain != DOMAIN or node.op_type != OP_TYPE or (DOMAIN, OP_TYPE, node.overload) in have:
            continue
        names = set(node.overload.split("_")) if node.overload else set()
        model.functions.append(make_function("mask" in names, "mu" in names, "bias" in names, max(opset, MIN_ONNX_OPSET)))
        have.add((DOMAIN, OP_TYPE, node.overload))
