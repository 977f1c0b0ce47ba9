"""StoreLMHeadFP16: keep the LM head's table in fp16 (``pbs2pc compile --lm-head fp16``).

Where it runs: in the params transform (``pbs2pc.compiler.build.to_target_layout``), on ``main`` before
the phase pipeline, like the plane re-layouts; the build rounds the array with ``numpy.astype(float16)``.
:class:`pbs2pc.passes.lower_lm_head.LowerLMHead` then gives the one-token head products the fp16 kernel.

The head is the ``[vocab, hidden]`` float32 parameter ``W`` that the logits are computed from as
``R.matmul(h, R.permute_dims(W))`` (with a tied embedding, the same table the token lookup reads). Every
read of it goes through ``R.astype(W16, "float32")`` afterwards, so the module keeps its meaning with the
rounded table: the only numerical change is that rounding (2^-11 relative at most per entry).

Before::

    def main(ids, ..., model_embed_tokens_weight: R.Tensor((49152, 576), "float32"), ...):
        e = R.take(model_embed_tokens_weight, ids, axis=0)
        ...
        logits = R.matmul(h, R.permute_dims(model_embed_tokens_weight, axes=[1, 0]))

After, with ``main`` tagged ``pbs2pc.params_transform = {"model_embed_tokens_weight": {"cast": "float16"}}``::

    def main(ids, ..., model_embed_tokens_weight: R.Tensor((49152, 576), "float16"), ...):
        w = R.astype(model_embed_tokens_weight, "float32")
        e = R.take(w, ids, axis=0)
        ...
        logits = R.matmul(h, R.permute_dims(w, axes=[1, 0]))
"""

from __future__ import annotations

from pbs2pc.compiler.tvm_compat import relax, tvm
from pbs2pc.errors import UnsupportedError
from pbs2pc.passes.pack_planes_as_words import TRANSFORM_ATTR, ReplaceParams, merge_record, static_dims

_MATMUL = tvm.ir.Op.get("relax.matmul")
_PERMUTE = tvm.ir.Op.get("relax.permute_dims")


def head_params(func: relax.Function, vocab: int) -> list:
    """The float32 ``[vocab, H]`` parameters of ``func`` read as ``matmul(h, permute_dims(W))``."""
    params = set(func.params)
    bound = {b.var: b.value for block in func.body.blocks for b in block.bindings if isinstance(b, relax.VarBinding)}
    heads = []
    for value in bound.values():
        if not (isinstance(value, relax.Call) and value.op.same_as(_MATMUL)):
            continue
        perm = bound.get(value.args[1], value.args[1])
        if not (isinstance(perm, relax.Call) and perm.op.same_as(_PERMUTE)):
            continue
        axes = perm.attrs.axes
        table = perm.args[0]
        dims = static_dims(table, "float32") if table in params else None
        if dims and dims[0] == vocab and (axes is None or [int(a) for a in axes] == [1, 0]) and table not in heads:
            heads.append(table)
    return heads


def the_head(func: relax.Function, vocab: int | None, option: str = "fp16") -> relax.Var:
    """The one head table of ``func`` (see :func:`head_params`), or one clear error naming ``--lm-head
    option``. Called outside the pass (whose constructor takes its name): an error raised inside a TVM pass
    reaches the caller as a RuntimeError."""
    heads = head_params(func, vocab) if vocab else []
    if len(heads) != 1:
        raise UnsupportedError(
            f"--lm-head {option} needs one float32 [vocab, hidden] table that the logits are computed from "
            f"(logits = h @ Wᵀ); this model has {len(heads)}. Compile it with --lm-head fp32.")
    return heads[0]


def _float32_of(_bb, new, _old_ty):
    return relax.op.astype(new, "float32")


@tvm.transform.module_pass(opt_level=0, name="StoreLMHeadFP16")
class StoreLMHeadFP16:
    """Re-type ``main``'s parameter ``table`` (the LM head's, found by :func:`the_head`) as float16 (see the
    module docstring)."""

    def __init__(self, table: str):
        self.table = table

    def transform_module(self, mod, _ctx):
        func = mod["main"]
        table = next(p for p in func.params if p.name == self.table)
        new = relax.Var(table.name, relax.TensorType(table.ty.shape, "float16"))
        body = ReplaceParams(mod, {table: new}, _float32_of, "f32").visit_expr(func.body)
        params = [new if p.same_as(table) else p for p in func.params]
        new_func = relax.Function(params, body, func.ret_ty, func.is_pure, func.attrs, func.span)
        new_func = new_func.with_attr(TRANSFORM_ATTR, merge_record(func, {table.name: {"cast": "float16"}}))
        out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        out["main"] = new_func
        return out
