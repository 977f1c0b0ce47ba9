"""ONNX -> Relax: TVM's importer for standard ops, plus the project's converter for pbs2p ops.

TVM's Relax ONNX importer matches converters by ``op_type`` only and has no hook for custom domains
(apache/tvm#10950). This adapter

1. loads and validates the file (one clear error for a missing, corrupt, truncated or foreign file);
2. checks every node *before* importing: pbs2p nodes against the op contract (attributes, dtypes, shapes,
   the N:M property of every mask row), other custom domains and unsupported standard ops are rejected;
3. imports with the converter map extended, for the duration of the call only, by
   :class:`SparseBinaryLinearConverter`, with weights kept as function parameters (so they ship in a
   weights file in the target layout, never inside the library).

Every ``SparseBinaryLinear`` becomes a call to a private Relax function tagged ``pbs2p.op`` whose body is
the op's reference meaning in plain Relax ops (decode + matmul), like a composite function in TVM's BYOC
flow: the module stays runnable as is, and :func:`pbs2pc.passes.LowerSparseBinaryLinear` later replaces
each call with a packed-bit TIR kernel. The standard ``Attention`` op (opset 23, which TVM's importer does
not know: its ``Attention`` converter is Microsoft's contrib op of the same name) is imported the same way,
tagged ``pbs2p.op = "Attention"``; :func:`pbs2pc.passes.UseKVCache` turns the calls whose past keys and
values are graph inputs into an in-place KV-cache kernel, and inlines the others.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import warnings

import numpy as np
import onnx
from onnx import numpy_helper

from pbs2pc.errors import FormatError, Pbs2pcError, UnsupportedError
from pbs2pc.models import onnx_op
from pbs2pc.models.onnx_file import load_onnx
from pbs2pc.models.format import ARRAY_FIELDS, NMScheme, PackedLinear
from pbs2pc.compiler.tvm_compat import onnx_frontend, relax, tirx

#: attribute carried by the private Relax function of every pbs2p op (matched by the lowering pass).
OP_ATTR = "pbs2p.op"
_DENSE_PARAM_DTYPES = {np.dtype("float32"), np.dtype("float16")}
#: The op's inputs in order (op contract v2: v1's six, then the optional magnitude groups and salient
#: residual, ``pbs2pc.models.format.ARRAY_FIELDS``); omitted optional inputs are empty names.
INPUTS = ("X", *ARRAY_FIELDS)
#: The pbs2p opset versions this compiler reads: 1 (v1 files) and 2 (files with any v2 input).
OPSET_VERSIONS = (1, 2)


@dataclasses.dataclass
class ImportedModel:
    """A Relax module whose ``main(inputs..., params...)`` computes the ONNX graph, and its weights."""

    mod: "tvm.IRModule"  # noqa: F821
    params: dict[str, np.ndarray]  # in main's parameter order, after the graph inputs
    inputs: list[str]
    outputs: list[str]
    metadata: dict[str, str]


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    try:
        return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    except Exception as exc:
        raise FormatError(f"cannot read the weights of the ONNX file ({exc}); its external data may be missing or truncated.") from None


def _check_pbs2p_node(node: onnx.NodeProto, weights: dict[str, np.ndarray]) -> None:
    """Validate one pbs2p node against the op contract, with the node's name in every message."""
    where = f"node {node.name or node.output[0]!r}"
    if node.op_type != onnx_op.OP_TYPE:
        raise UnsupportedError(f"{where}: op pbs2p.{node.op_type} is not supported; pbs2pc knows pbs2p.{onnx_op.OP_TYPE}.")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    missing = [a for a in ("n", "m", "group_size") if a not in attrs]
    if missing:
        raise FormatError(f"{where}: attribute(s) {', '.join(missing)} missing; SparseBinaryLinear needs n, m and group_size.")
    if len(node.input) > len(INPUTS):
        raise FormatError(f"{where}: {len(node.input)} inputs, SparseBinaryLinear takes at most {len(INPUTS)} "
                          f"({', '.join(INPUTS)}).")
    names = list(node.input) + [""] * (len(INPUTS) - len(node.input))
    arrays = {}
    for role, name in zip(INPUTS[1:], names[1:]):
        if not name:
            continue
        if name not in weights:
            raise UnsupportedError(f"{where}: input {role} ({name!r}) must be a constant initializer; computed weights are not supported.")
        arrays[role] = weights[name]
    for role in ("sign", "alpha"):
        if role not in arrays:
            raise FormatError(f"{where}: required input {role} is missing.")
    if "bias" in arrays and arrays["bias"].dtype not in _DENSE_PARAM_DTYPES:
        raise FormatError(f"{where}: bias must be float32 or float16, got {arrays['bias'].dtype}.")
    try:
        PackedLinear(
            scheme=NMScheme(int(attrs["n"]), int(attrs["m"]), int(attrs["group_size"])),
            **{role: arrays.get(role) for role in ARRAY_FIELDS},
        ).validate()
    except FormatError as exc:
        raise FormatError(f"{where}: {exc}") from None


def check_model(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Check that pbs2pc can compile ``model``; return its initializers. Raises one clear error otherwise."""
    domains = {o.domain: o.version for o in model.opset_import}
    if onnx_op.DOMAIN in domains and domains[onnx_op.DOMAIN] not in OPSET_VERSIONS:
        raise UnsupportedError(
            f"the file uses pbs2p opset {domains[onnx_op.DOMAIN]}, this pbs2pc compiles opsets "
            f"{' and '.join(map(str, OPSET_VERSIONS))}; re-export it with this version."
        )
    weights = _initializers(model)
    known = onnx_frontend._get_convert_map()
    unknown = set()
    for node in model.graph.node:
        if node.domain == onnx_op.DOMAIN:
            _check_pbs2p_node(node, weights)
        elif node.domain not in ("", "ai.onnx"):
            raise UnsupportedError(f"op {node.domain}.{node.op_type} (node {node.name!r}) is not supported; "
                                   "only standard ONNX ops and pbs2p ops compile.")
        elif node.op_type not in known:
            unknown.add(node.op_type)
    if unknown:
        raise UnsupportedError(f"ONNX op(s) {', '.join(sorted(unknown))} are not supported by the TVM importer; "
                               "rewrite them with supported ops.")
    for value in model.graph.input:
        if value.name not in weights and value.type.tensor_type.elem_type == 0:
            raise UnsupportedError(f"graph input {value.name!r} is not a tensor; only tensor inputs are supported.")
    return weights


def _reference_function(x_ty, n: int, m: int, group_size: int, present: dict[str, object]) -> relax.Function:
    """The op's meaning in plain Relax ops, as a private function (leading dims of X stay symbolic).

    Parameters are named by role (``x``, then the present ones of ``ARRAY_FIELDS`` in order). Version 2:
    group-1 weights take ``group_alpha``/``group_mu`` (a ``where`` on the group bits), and a salient
    column's residual bit is found by the column's rank among the salient columns (an exclusive
    ``cumsum`` of the salient bits, a ``take`` from the unpacked residual plane), its term added where the
    column is salient; the mask multiplies last, as in ``PackedLinear.dense``.
    """
    lead = [tirx.Var(f"d{i}", "int64") for i in range(len(x_ty.shape) - 1)]
    k = int(x_ty.shape[-1])
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(lead + [k], x_ty.dtype))
    params = {"x": x}
    for role, ty in present.items():
        params[role] = relax.Var(role, ty)
    op = relax.op
    gs = k // group_size
    with bb.function("pbs2p_sparse_binary_linear", list(params.values()), private=True):
        with bb.dataflow():
            e = bb.emit  # every intermediate is bound, so each op sees typed inputs
            f32 = lambda value: relax.const(np.float32(value))  # noqa: E731

            def bits(plane, width=k):  # uint8 [R, width/8] -> uint8 0/1 [R, width]
                shifted = e(op.right_shift(e(op.expand_dims(plane, -1)), relax.const(np.arange(8, dtype=np.uint8))))
                return e(op.reshape(e(op.bitwise_and(shifted, relax.const(np.uint8(1)))), [-1, width]))

            def unpack(plane, width=k):  # uint8 [R, width/8] -> float32 0/1 [R, width]
                return e(op.astype(bits(plane, width), "float32"))

            def grouped(plane):  # [N, K] -> [N, K/G, G]
                return e(op.reshape(plane, [-1, gs, group_size]))

            def scale(role):  # fp16 [N, K/G] -> float32 [N, K/G, 1]
                return e(op.expand_dims(e(op.astype(params[role], "float32")), -1))

            pm1 = e(op.subtract(e(op.multiply(unpack(params["sign"]), f32(2))), f32(1)))
            alpha = scale("alpha")
            mu = scale("mu") if "mu" in params else None
            if "group" in params:
                in_group = grouped(e(op.astype(bits(params["group"]), "bool")))
                alpha = e(op.where(in_group, scale("group_alpha"), alpha))
                mu = e(op.where(in_group, scale("group_mu"), mu if mu is not None else f32(0)))
            w = e(op.multiply(grouped(pm1), alpha))
            if mu is not None:
                w = e(op.add(w, mu))
            if "salient" in params:
                salient = e(op.reshape(e(op.astype(bits(params["salient"]), "int32")), [k]))
                rank = e(op.subtract(e(op.cumsum(salient, axis=0, dtype="int32")), salient))
                width = 8 * int(params["residual"].ty.shape[1])
                rank = e(op.minimum(rank, relax.const(np.int32(width - 1))))  # non-salient columns: any bit
                r = e(op.take(unpack(params["residual"], width), rank, axis=1, mode="clip"))  # [N, K]
                r_pm1 = e(op.subtract(e(op.multiply(r, f32(2))), f32(1)))
                extra = e(op.add(e(op.multiply(grouped(r_pm1), scale("residual_alpha"))), scale("residual_mu")))
                w = e(op.add(w, e(op.multiply(extra, e(op.reshape(e(op.astype(salient, "float32")), [1, gs, group_size]))))))
            w = e(op.reshape(w, [-1, k]))
            if "mask" in params:
                w = e(op.multiply(w, unpack(params["mask"])))
            y = e(op.matmul(x, e(op.permute_dims(e(op.astype(w, x_ty.dtype))))))
            if "bias" in params:
                y = e(op.add(y, e(op.astype(params["bias"], x_ty.dtype))))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    func = bb.get()["pbs2p_sparse_binary_linear"]
    return func.with_attrs({OP_ATTR: onnx_op.OP_TYPE, "n": n, "m": m, "group_size": group_size})


class SparseBinaryLinearConverter(onnx_frontend.OnnxOpConverter):
    """Converts ``pbs2p.SparseBinaryLinear`` into a call of a ``pbs2p.op``-tagged private Relax function."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        x = bb.normalize(inputs[0])  # converters may receive unnormalised expressions without types
        roles = list(INPUTS[1:])
        present = {role: value for role, value in zip(roles, list(inputs[1:])) if value is not None}
        name = attr.get("tvm_custom", {}).get("name") or "SparseBinaryLinear"
        if x.ty.dtype not in ("float32", "float16"):
            raise UnsupportedError(f"node {name!r}: input X must be float32 or float16, got {x.ty.dtype}.")
        k = int(present["sign"].ty.shape[1]) * 8
        if x.ty.shape is None or not isinstance(x.ty.shape[-1], tirx.IntImm) or int(x.ty.shape[-1]) != k:
            width = "unknown" if x.ty.shape is None else x.ty.shape[-1]
            width = int(width) if isinstance(width, tirx.IntImm) else width
            raise FormatError(f"node {name!r}: input X has {width} columns but its weights have K={k}; "
                              "the last dimension of X must be static and equal K.")
        func = _reference_function(x.ty, int(attr["n"]), int(attr["m"]), int(attr["group_size"]),
                                   {role: value.ty for role, value in present.items()})
        gv = bb.add_func(func, "pbs2p_sparse_binary_linear")
        return relax.Call(gv, [x, *present.values()])


def _attention_reference(q_ty, k_ty, v_ty, mask_ty, past_k_ty, past_v_ty, scale: float) -> relax.Function:
    """ONNX ``Attention`` (4-D, grouped-query, boolean mask, optional past) in plain Relax ops.

    Returns ``(y, present_key, present_value)``; ``present = concat(past, new)`` along the sequence axis.
    """
    op = relax.op
    bb = relax.BlockBuilder()
    names = ("q", "k", "v", "attn_mask", "past_key", "past_value")
    types = (q_ty, k_ty, v_ty, mask_ty, past_k_ty, past_v_ty)
    params = [relax.Var(name, ty) for name, ty in zip(names, types) if ty is not None]
    by_name = {p.name: p for p in params}
    heads, kv_heads, head_dim = (int(q_ty.shape[1]), int(k_ty.shape[1]), int(q_ty.shape[3]))
    with bb.function("onnx_attention", params, private=True):
        with bb.dataflow():
            e = bb.emit
            k, v = by_name["k"], by_name["v"]
            if "past_key" in by_name:
                k = e(op.concat([by_name["past_key"], k], axis=2))
                v = e(op.concat([by_name["past_value"], v], axis=2))
            q = by_name["q"]
            batch, seq = q_ty.shape[0], q_ty.shape[2]
            # Query head h reads kv head h // rep: view q as [B, KV, rep, S, D], broadcast K and V over rep.
            q5 = e(op.reshape(q, [batch, kv_heads, heads // kv_heads, seq, head_dim]))
            scores = e(op.matmul(q5, e(op.expand_dims(e(op.permute_dims(k, [0, 1, 3, 2])), 2))))
            scores = e(op.multiply(scores, relax.const(np.float32(scale))))
            # The mask's key axis is the keys' length (past + new): say so, for shape inference (checked at run time).
            mask = by_name["attn_mask"]
            mask = bb.match_cast(mask, relax.TensorType([mask.ty.shape[0], 1, seq, k.ty.shape[2]], "bool"))
            mask = e(op.expand_dims(mask, 1))  # [B, 1, 1, S, T] over (KV, rep)
            scores = e(op.where(mask, scores, relax.const(np.float32(-np.inf))))
            probs = e(op.nn.softmax(scores, axis=-1))
            y = e(op.reshape(e(op.matmul(probs, e(op.expand_dims(v, 2)))), [batch, heads, seq, head_dim]))
            out = bb.emit_output(relax.Tuple([y, k, v]))
        bb.emit_func_output(out)
    return bb.get()["onnx_attention"].with_attrs({OP_ATTR: "Attention", "scale": float(scale)})


class AttentionConverter(onnx_frontend.OnnxOpConverter):
    """Converts the standard ``Attention`` op (opset 23) into a call of a ``pbs2p.op``-tagged function.

    Supported: 4-D ``Q/K/V`` ``[B, heads, S, D]`` with grouped-query heads, a boolean ``attn_mask``
    ``[B or 1, 1, S, T]``, ``past_key``/``past_value`` (both or neither), no softcap, ``is_causal = 0``
    (the mask says what is causal, as exporters do: the spec's causal alignment ignores the past).
    """

    @classmethod
    def _impl_v23(cls, bb, inputs, attr, params):
        name = attr.get("tvm_custom", {}).get("name") or "Attention"
        where = f"node {name!r} (Attention)"
        args = [None if value is None else bb.normalize(value) for value in list(inputs)[:6]]
        args += [None] * (6 - len(args))
        if len(inputs) > 6 and inputs[6] is not None:
            raise UnsupportedError(f"{where}: nonpad_kv_seqlen is not supported; give the padding in attn_mask.")
        q, k, v, mask, past_k, past_v = args
        for role, value in (("Q", q), ("K", k), ("V", v)):
            if value is None or value.ty.ndim != 4 or value.ty.dtype != "float32":
                raise UnsupportedError(f"{where}: {role} must be a 4-D float32 [batch, heads, sequence, head_dim] "
                                       "tensor; 3-D inputs are not supported.")
        if any(int(attr.get(key, 0)) for key in ("is_causal", "qk_matmul_output_mode")) or float(attr.get("softcap", 0.0)):
            raise UnsupportedError(f"{where}: is_causal, softcap and qk_matmul_output_mode are not supported; "
                                   "pass causality as a boolean attn_mask.")
        if mask is None or mask.ty.dtype != "bool" or mask.ty.ndim != 4:
            raise UnsupportedError(f"{where}: attn_mask must be a boolean [batch, 1, sequence, total] tensor.")
        if (past_k is None) != (past_v is None):
            raise UnsupportedError(f"{where}: past_key and past_value must be given together.")
        try:
            heads, kv_heads, head_dim = int(q.ty.shape[1]), int(k.ty.shape[1]), int(q.ty.shape[3])
        except TypeError:
            raise UnsupportedError(f"{where}: head counts and head_dim must be static.") from None
        if heads % kv_heads or int(k.ty.shape[3]) != head_dim or int(v.ty.shape[3]) != head_dim:
            raise UnsupportedError(f"{where}: {heads} query heads cannot share {kv_heads} kv heads, or the "
                                   "head sizes of Q, K and V differ.")
        scale = float(attr.get("scale", head_dim ** -0.5))
        func = _attention_reference(q.ty, k.ty, v.ty, mask.ty, None if past_k is None else past_k.ty,
                                    None if past_v is None else past_v.ty, scale)
        gv = bb.add_func(func, "onnx_attention")
        return relax.Call(gv, [a for a in args if a is not None])


@contextlib.contextmanager
def _pbs2p_converters():
    """Extend the importer's converter map with pbs2p ops for the duration of one import."""
    original = onnx_frontend._get_convert_map
    onnx_frontend._get_convert_map = lambda: {**original(), onnx_op.OP_TYPE: SparseBinaryLinearConverter,
                                              "Attention": AttentionConverter}
    try:
        yield
    finally:
        onnx_frontend._get_convert_map = original


#: Initializers with at most this many elements (shape vectors, axes, scalars such as epsilon) become
#: constants the compiler can fold; the rest, and every pbs2p weight, are parameters that ship in the
#: weights file.
SMALL_CONSTANT = 16


def _small_initializers_to_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    pbs2p_inputs = {name for node in model.graph.node if node.domain == onnx_op.DOMAIN for name in node.input}
    small = [t for t in model.graph.initializer
             if t.name not in pbs2p_inputs and int(np.prod(t.dims, dtype=np.int64)) <= SMALL_CONSTANT]
    if not small:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    names = {t.name for t in small}
    kept = [t for t in out.graph.initializer if t.name not in names]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    inputs = [v for v in out.graph.input if v.name not in names]
    del out.graph.input[:]
    out.graph.input.extend(inputs)
    nodes = [onnx.helper.make_node("Constant", [], [t.name], value=t) for t in small] + list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def import_onnx(model: onnx.ModelProto | str | os.PathLike) -> ImportedModel:
    """Import an ONNX model that follows the pbs2p op contract into Relax (see the module docstring)."""
    if not isinstance(model, onnx.ModelProto):
        model = load_onnx(model)
    weights = check_model(model)
    model = _small_initializers_to_constants(model)
    inputs = [v.name for v in model.graph.input if v.name not in weights]
    # The importer prints and warns as it goes; errors reach the user as one sentence instead.
    with _pbs2p_converters(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            mod = onnx_frontend.from_onnx(model, keep_params_in_input=True, sanitize_input_names=False)
        except Pbs2pcError:
            raise
        except Exception as exc:
            raise UnsupportedError(f"TVM could not import the graph: {str(exc).strip().splitlines()[-1]}") from None
    main = mod["main"]
    # The importer stores the weight values as a function attribute; they travel in the weights file instead.
    mod["main"] = main.without_attr("params")
    param_names = [p.name for p in main.params[len(inputs):]]
    by_var_name = {name.removeprefix("onnx::"): array for name, array in weights.items()}
    params = {name: by_var_name[name] for name in param_names}
    meta = {p.key: p.value for p in model.metadata_props}
    return ImportedModel(mod, params, inputs, [v.name for v in model.graph.output], meta)
