"""The ``pbs2p.SparseBinaryLinear`` ONNX op (contract versions 1 and 2): node builder and reference FunctionProto.

The op (docs/format.md has the full contract)::

    Y = SparseBinaryLinear(X, sign, mask?, alpha, mu?, bias?,                          domain "pbs2p",
                           group?, group_alpha?, group_mu?,                            attributes n, m, group_size
                           salient?, residual?, residual_alpha?, residual_mu?)
    W[o, j] = mask[o, j] * (a[o, j] * (2 * sign[o, j] - 1) + u[o, j]
                            + salient[j] * (residual_alpha[o, j // G] * (2 * r[o, j] - 1) + residual_mu[o, j // G]))
    Y = X @ W.T + bias

where ``a``, ``u`` are ``group_alpha``, ``group_mu`` on group-1 weights and ``alpha``, ``mu`` elsewhere, and
``r[o, j]`` is bit ``t`` of ``residual``'s row ``o`` for the ``t``-th salient column ``j``. The inputs after
``bias`` are contract version 2 and come in two sets, each entirely present or absent: the magnitude
groups (``group``, ``group_alpha``, ``group_mu``) and the salient residual (``salient``, ``residual``,
``residual_alpha``, ``residual_mu``). With neither, a node is exactly a version-1 node.

Optional inputs are omitted the ONNX way (an empty name, trailing ones dropped). Because an ONNX function
body cannot test whether an optional input is present, the reference meaning is attached as one
FunctionProto per *overload*: the overload names the optional parts the node passes, joined by ``_`` in the
order ``mask``, ``mu``, ``bias``, ``groups``, ``residual`` (``"mask_mu"``, ``"mask_mu_bias"``, ``"mu"``,
``""`` for none, ``"mask_mu_groups_residual"``, ...), and every node carries the overload that matches its
inputs. Each body is written in standard ONNX ops only (BitShift, BitwiseAnd, Cast, Mul, Add, Where, CumSum,
Gather, Reshape, Transpose, MatMul), so onnxruntime, or any ONNX runtime, executes the file as the reference.

Versioning (:func:`contract_version`, the one place for the rule): a model whose pbs2p nodes use no
version-2 input imports the ``pbs2p`` domain at opset 1 and records ``pbs2p.format_version = "1"``, exactly
as version-1 producers wrote it; a model with any version-2 input imports opset 2 and records ``"2"``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pbs2pc.errors import FormatError
from pbs2pc.models.format import ARRAY_FIELDS

DOMAIN = "pbs2p"
OP_TYPE = "SparseBinaryLinear"
#: The pbs2p opset of a model with no version-2 input (what version-1 readers accept).
OPSET_VERSION = 1
#: The pbs2p opset of a model with at least one version-2 input (magnitude groups or a salient residual).
OPSET_VERSION_V2 = 2
#: Every pbs2p opset this pbs2pc writes and reads; the opset equals the op contract version.
OPSET_VERSIONS = (OPSET_VERSION, OPSET_VERSION_V2)
#: The ``metadata_props`` key recording the op contract version of a model file.
METADATA_KEY = "pbs2p.format_version"
#: The standard ONNX opset of exported models (the KV-cache ``Attention`` op needs 23). The function
#: bodies import the model's own version (the checker insists), which must be at least MIN_ONNX_OPSET.
ONNX_OPSET = 23
MIN_ONNX_OPSET = 18  # BitwiseAnd
#: The op's inputs in order: ``X``, then every array of :class:`pbs2pc.models.format.PackedLinear`.
INPUTS = ("X", *ARRAY_FIELDS)
#: The optional inputs (everything but ``X``, ``sign`` and ``alpha``).
OPTIONAL = tuple(name for name in INPUTS if name not in ("X", "sign", "alpha"))
#: The version-2 input sets, each entirely present or absent, by the overload token that names them.
V2_SETS = {"groups": ("group", "group_alpha", "group_mu"),
           "residual": ("salient", "residual", "residual_alpha", "residual_mu")}
#: The overload tokens in their order in an overload name.
OVERLOAD_TOKENS = ("mask", "mu", "bias", *V2_SETS)


def overload_name(has_mask: bool, has_mu: bool, has_bias: bool, has_groups: bool = False,
                  has_residual: bool = False) -> str:
    """The overload that a node with these optional inputs present must carry (version-1 names unchanged)."""
    present = (has_mask, has_mu, has_bias, has_groups, has_residual)
    return "_".join(token for token, on in zip(OVERLOAD_TOKENS, present) if on)


def parse_overload(overload: str) -> dict[str, bool]:
    """``{"mask": ..., "mu": ..., "bias": ..., "groups": ..., "residual": ...}`` from an overload name."""
    tokens = overload.split("_") if overload else []
    unknown = [t for t in tokens if t not in OVERLOAD_TOKENS]
    if unknown or tokens != [t for t in OVERLOAD_TOKENS if t in tokens]:
        raise FormatError(f"overload {overload!r} is not a pbs2p overload; it names, in this order, some of "
                          f"{', '.join(OVERLOAD_TOKENS)} joined by '_'.")
    return {token: token in tokens for token in OVERLOAD_TOKENS}


def node_roles(node: onnx.NodeProto) -> dict[str, str]:
    """``{input role: name}`` of a pbs2p node, ``""`` for an omitted input."""
    names = list(node.input) + [""] * (len(INPUTS) - len(node.input))
    return dict(zip(INPUTS, names))


def node_version(node: onnx.NodeProto) -> int:
    """The op contract version a pbs2p node needs: 2 when it passes any version-2 input, else 1."""
    roles = node_roles(node)
    return OPSET_VERSION_V2 if any(roles[name] for names in V2_SETS.values() for name in names) else OPSET_VERSION


def contract_version(model: onnx.ModelProto) -> int:
    """The op contract version of ``model``: 2 when any pbs2p node uses a version-2 input, else 1.

    It is the ``pbs2p`` opset the model imports and its ``pbs2p.format_version`` metadata.
    """
    return max((node_version(node) for node in model.graph.node if node.domain == DOMAIN), default=OPSET_VERSION)


def make_node(x: str, sign: str, mask: str | None, alpha: str, mu: str | None, bias: str | None,
              y: str, *, n: int, m: int, group_size: int, name: str,
              group: str | None = None, group_alpha: str | None = None, group_mu: str | None = None,
              salient: str | None = None, residual: str | None = None, residual_alpha: str | None = None,
              residual_mu: str | None = None) -> onnx.NodeProto:
    """A ``SparseBinaryLinear`` node; ``None`` inputs are omitted.

    The version-2 inputs come as sets: ``group``, ``group_alpha`` and ``group_mu`` together, and
    ``salient``, ``residual``, ``residual_alpha`` and ``residual_mu`` together.
    """
    given = {"group": group, "group_alpha": group_alpha, "group_mu": group_mu, "salient": salient,
             "residual": residual, "residual_alpha": residual_alpha, "residual_mu": residual_mu}
    present = {}
    for token, names in V2_SETS.items():
        have = [bool(given[k]) for k in names]
        if any(have) and not all(have):
            raise FormatError(f"node {name!r}: {', '.join(names)} go together; "
                              f"missing {', '.join(k for k, h in zip(names, have) if not h)}.")
        present[token] = all(have)
    inputs = [x, sign, mask or "", alpha, mu or "", bias or "", *(given[k] or "" for k in INPUTS[6:])]
    while inputs[-1] == "":
        inputs.pop()
    return helper.make_node(
        OP_TYPE, inputs, [y], name=name, domain=DOMAIN,
        overload=overload_name(mask is not None, mu is not None, bias is not None,
                               present["groups"], present["residual"]),
        n=n, m=m, group_size=group_size,
    )


def _unpack(nodes: list, plane: str, out: str) -> None:
    """Append nodes turning a uint8 ``[R, C/8]`` plane into a 0/1 uint8 ``[R, C]`` tensor ``out``."""
    nodes += [
        helper.make_node("Unsqueeze", [plane, "c_last"], [f"{plane}_3d"]),            # [R, C/8, 1]
        helper.make_node("BitShift", [f"{plane}_3d", "c_shifts"], [f"{plane}_sh"], direction="RIGHT"),
        helper.make_node("BitwiseAnd", [f"{plane}_sh", "c_one"], [f"{plane}_bits"]),  # [R, C/8, 8]
        helper.make_node("Reshape", [f"{plane}_bits", "c_nk"], [out]),                 # [R, C]
    ]


def _scale_3d(nodes: list, scale: str) -> str:
    """Append nodes turning an fp16 ``[N, K/G]`` scale into float32 ``[N, K/G, 1]``; return its name."""
    nodes += [
        helper.make_node("Cast", [scale], [f"{scale}_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", [f"{scale}_f", "c_last"], [f"{scale}_3d"]),
    ]
    return f"{scale}_3d"


def _plus_minus_one(nodes: list, bits01: str, out: str) -> None:
    """Append nodes turning a 0/1 uint8 tensor into float32 ``2 * bit - 1``."""
    nodes += [
        helper.make_node("Cast", [bits01], [f"{out}_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", [f"{out}_f", "c_two"], [f"{out}_2"]),
        helper.make_node("Sub", [f"{out}_2", "c_fone"], [out]),
    ]


def make_function(has_mask: bool, has_mu: bool, has_bias: bool, opset: int = ONNX_OPSET, *,
                  has_groups: bool = False, has_residual: bool = False) -> onnx.FunctionProto:
    """The reference FunctionProto of one overload, written against default-domain ``opset``."""
    present = {"mask": has_mask, "mu": has_mu, "bias": has_bias,
               **{name: has_groups for name in V2_SETS["groups"]},
               **{name: has_residual for name in V2_SETS["residual"]}}
    formal = [name for name in INPUTS if name not in OPTIONAL or present[name]]
    # Positional binding: an omitted optional input before a present one keeps its slot.
    last = max(INPUTS.index(name) for name in formal)
    inputs = [name if name in formal else f"unused_{name}" for name in INPUTS[: last + 1]]

    def const(name, array):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(array), name))

    nodes = [
        const("c_zero_1", np.array([0], np.int64)),
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
    ]
    alpha = _scale_3d(nodes, "alpha")
    if has_groups:
        # group-1 weights take group_alpha and group_mu instead of alpha and mu
        _unpack(nodes, "group", "group_01")
        nodes += [
            helper.make_node("Cast", ["group_01"], ["group_b"], to=TensorProto.BOOL),
            helper.make_node("Reshape", ["group_b", "c_ngg"], ["group_g"]),             # [N, K/G, G]
        ]
        group_alpha = _scale_3d(nodes, "group_alpha")
        nodes.append(helper.make_node("Where", ["group_g", group_alpha, alpha], ["alpha_w"]))
        alpha = "alpha_w"
    nodes.append(helper.make_node("Mul", ["pm1_g", alpha], ["w_a"]))
    w, mu = "w_a", _scale_3d(nodes, "mu") if has_mu else None
    if has_groups:
        if mu is None:
            nodes.append(const("c_fzero", np.array(0.0, np.float32)))
        group_mu = _scale_3d(nodes, "group_mu")
        nodes.append(helper.make_node("Where", ["group_g", group_mu, mu or "c_fzero"], ["mu_w"]))
        mu = "mu_w"
    if mu is not None:
        nodes.append(helper.make_node("Add", [w, mu], ["w_mu"]))
        w = "w_mu"
    if has_residual:
        # Column j's residual bit is bit rank(j) of its row, rank(j) = (salient columns before j); the
        # gathered bits of other columns are multiplied by salient[j] = 0.
        _unpack(nodes, "salient", "salient_01")                                       # [1, K]
        _unpack(nodes, "residual", "residual_01")                                     # [N, 8 * ceil(S/8)]
        _plus_minus_one(nodes, "residual_01", "r_pm1")
        nodes += [
            helper.make_node("Reshape", ["salient_01", "c_last"], ["salient_k"]),    # [K]
            helper.make_node("Cast", ["salient_k"], ["salient_i"], to=TensorProto.INT64),
            const("c_axis0", np.array(0, np.int64)),
            const("c_izero", np.array(0, np.int64)),
            const("c_ione", np.array(1, np.int64)),
            helper.make_node("CumSum", ["salient_i", "c_axis0"], ["salient_cum"]),
            helper.make_node("Sub", ["salient_cum", "c_ione"], ["rank_raw"]),
            helper.make_node("Max", ["rank_raw", "c_izero"], ["rank"]),
            helper.make_node("Gather", ["r_pm1", "rank"], ["r_cols"], axis=1),     # [N, K]
            helper.make_node("Reshape", ["r_cols", "c_ngg"], ["r_g"]),
            helper.make_node("Cast", ["salient_01"], ["salient_f"], to=TensorProto.FLOAT),
            helper.make_node("Reshape", ["salient_f", "c_ngg"], ["salient_g"]),      # [1, K/G, G]
        ]
        residual_alpha, residual_mu = _scale_3d(nodes, "residual_alpha"), _scale_3d(nodes, "residual_mu")
        nodes += [
            helper.make_node("Mul", ["r_g", residual_alpha], ["res_a"]),
            helper.make_node("Add", ["res_a", residual_mu], ["res_mu"]),
            helper.make_node("Mul", ["res_mu", "salient_g"], ["res_w"]),
            helper.make_node("Add", [w, "res_w"], ["w_res"]),
        ]
        w = "w_res"
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
        overload=overload_name(has_mask, has_mu, has_bias, has_groups, has_residual),
    )


def set_contract_version(model: onnx.ModelProto) -> int:
    """Import the ``pbs2p`` domain at :func:`contract_version`'s opset (replacing any other version of it)."""
    version = contract_version(model)
    for entry in model.opset_import:
        if entry.domain == DOMAIN:
            entry.version = version
            break
    else:
        model.opset_import.append(helper.make_opsetid(DOMAIN, version))
    return version


def attach_functions(model: onnx.ModelProto) -> None:
    """Attach the reference function of every overload the model's pbs2p nodes use and import the pbs2p
    opset those nodes need (:func:`contract_version`); idempotent."""
    have = {(f.domain, f.name, f.overload) for f in model.functions}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), ONNX_OPSET)
    for node in model.graph.node:
        if node.domain != DOMAIN or node.op_type != OP_TYPE or (DOMAIN, OP_TYPE, node.overload) in have:
            continue
        p = parse_overload(node.overload)
        model.functions.append(make_function(p["mask"], p["mu"], p["bias"], max(opset, MIN_ONNX_OPSET),
                                             has_groups=p["groups"], has_residual=p["residual"]))
        have.add((DOMAIN, OP_TYPE, node.overload))
    set_contract_version(model)
