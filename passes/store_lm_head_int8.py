"""StoreLMHeadInt8: keep the LM head's table in int8, one fp16 scale per 32 columns (``pbs2pc compile --lm-head int8``).

Where it runs: in the params transform (``pbs2pc.compiler.build.to_target_layout``), on ``main`` before
the phase pipeline, like StoreLMHeadFP16; the build applies the record with
:func:`pbs2pc.passes.kernels.lm_head_int8.quantize`. :class:`pbs2pc.passes.lower_lm_head.LowerLMHead` then
gives the token lookup and the one-token head products the int8 kernels.

The table becomes one int8 parameter ``[V, H + 2 * H / 32]`` of the same name (GGUF's Q8_0): each row's
codes ``round(W[v, k] / s[v, g])`` (``s[v, g] = fp16(max|W[v, group g]| / 127)``, groups of 32 columns)
followed by the group scales as fp16 byte pairs (:mod:`pbs2pc.passes.kernels.lm_head_int8`). One parameter rather than codes and scales apart: a lookup
takes a whole row with ``R.take``, and the record, the weights file and the manifest keep one entry per
parameter (a second parameter would need the record to create arrays, not only re-encode them). Every read
of the table goes through ``call_tir(lm_head_int8_dequantize, W8)`` (fp32 ``[V, H]``), so the module keeps
its meaning with the quantised table: the only numerical change is the quantisation (at most half a step,
``s[v, g] / 2``, per entry; none for a table that is Q8_0 already).

Before::

    def main(ids, ..., model_embed_tokens_weight: R.Tensor((49152, 576), "float32"), ...):
        e = R.take(model_embed_tokens_weight, ids, axis=0)
        ...
        logits = R.matmul(h, R.permute_dims(model_embed_tokens_weight, axes=[1, 0]))

After, with ``main`` tagged ``pbs2pc.params_transform = {"model_embed_tokens_weight": {"quantize": "int8"}}``::

    def main(ids, ..., model_embed_tokens_weight: R.Tensor((49152, 612), "int8"), ...):
        w = R.call_tir(cls.lm_head_int8_dequantize, (model_embed_tokens_weight,), R.Tensor((49152, 576), "float32"))
        e = R.take(w, ids, axis=0)
        ...
        logits = R.matmul(h, R.permute_dims(w, axes=[1, 0]))
"""

from __future__ import annotations

from pbs2pc.compiler.tvm_compat import relax, tvm
from pbs2pc.passes.kernels import lm_head_int8
from pbs2pc.passes.pack_planes_as_words import TRANSFORM_ATTR, ReplaceParams, merge_record

#: The params-transform record of the table (``to_target_layout`` applies ``lm_head_int8.quantize``).
RECORD = {"quantize": "int8"}


@tvm.transform.module_pass(opt_level=0, name="StoreLMHeadInt8")
class StoreLMHeadInt8:
    """Re-type ``main``'s parameter ``table`` (the LM head's, found by
    :func:`pbs2pc.passes.store_lm_head_fp16.the_head`) as int8 rows with their scales (see the module
    docstring)."""

    def __init__(self, table: str):
        self.table = table

    def transform_module(self, mod, _ctx):
        func = mod["main"]
        table = next(p for p in func.params if p.name == self.table)
        vocab, hidden = (int(d) for d in table.ty.shape.values)
        new = relax.Var(table.name, relax.TensorType([vocab, lm_head_int8.row_bytes(hidden)], "int8"))
        holder = {}

        def float32_of(_bb, new_var, old_ty):
            return relax.call_tir(holder["gv"], [new_var], relax.TensorType(old_ty.shape, "float32"))

        retyper = ReplaceParams(mod, {table: new}, float32_of, "f32")
        holder["gv"] = retyper.builder_.add_func(lm_head_int8.dequantize_rows(hidden), lm_head_int8.DEQUANTIZE)
        body = retyper.visit_expr(func.body)
        params = [new if p.same_as(table) else p for p in func.params]
        new_func = relax.Function(params, body, func.ret_ty, func.is_pure, func.attrs, func.span)
        new_func = new_func.with_attr(TRANSFORM_ATTR, merge_record(func, {table.name: RECORD}))
        out = retyper.builder_.get()
        out["main"] = new_func
        return out
