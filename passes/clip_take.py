"""ClipTakeIndices: every gather clamps its indices (``R.take(..., mode="clip")``) instead of TVM's "fast".

TVM's ONNX importer turns each Gather of a language model (the token embedding, the rotary tables' rows
by position) into ``R.take(table, ids)`` in TVM's default mode, "fast": no bounds check, so an index out of
range reads memory outside the table. The runtime refuses such inputs before a call (token ids against the
vocabulary, positions against the cache: :mod:`pbs2pc.runtime.model`), so valid calls never meet one;
with "clip" a library called past those checks (another runner, a bug) reads the table's first or last
row instead, for one min/max per index. TVM also warns at legalization, once per fast gather and entry
function (nine lines per compile of SmolLM2), that fast mode segfaults on out-of-range indices; a clipped
gather has nothing to warn about. Modes "clip" and "wrap" are kept as they are.

Before::

    e = R.take(model_embed_tokens_weight, input_ids, axis=0)

After::

    e = R.take(model_embed_tokens_weight, input_ids, axis=0, mode="clip")
"""

from __future__ import annotations

from pbs2pc.compiler.tvm_compat import relax, tvm

_TAKE = tvm.ir.Op.get("relax.take")


@relax.expr_functor.mutator
class _Clipper(relax.PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        if call.op.same_as(_TAKE) and call.attrs.mode == "fast":
            axis = None if call.attrs.axis is None else int(call.attrs.axis)
            return relax.op.take(call.args[0], call.args[1], axis=axis, mode="clip")
        return call


@tvm.transform.module_pass(opt_level=0, name="ClipTakeIndices")
class ClipTakeIndices:
    """Give every ``R.take`` of the module's Relax functions mode "clip" (see the module docstring)."""

    def transform_module(self, mod, _ctx):
        clipper = _Clipper(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                clipper.builder_.update_func(gv, clipper.visit_expr(func))
        return clipper.builder_.get()
