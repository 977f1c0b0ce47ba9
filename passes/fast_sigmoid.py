"""FastSigmoid: ``R.sigmoid`` and ``R.nn.silu`` on float32 as ``1 / (1 + exp(-x))`` with a vectorisable exp.

TVM legalizes ``R.sigmoid`` to ``tirx.sigmoid``, which LLVM code generation expands to ``1 / (1 + exp(-x))``
with LLVM's ``exp``: with no vector math library that is one call of the C library's ``expf`` per element,
the loop's vectorisation undone. SmolLM2's MLP gates every hidden unit with SiLU (``x * sigmoid(x)``), so
each layer runs it on 1536 values per token: a 128-token prompt spent 10.8 ms of 151 ms in it on a 2-core
AVX-512 Xeon (docs/performance.md, "SiLU"). Here the exp is TVM's ``topi.fast_exp`` (the Cephes polynomial
of ``2^x`` after range reduction, inputs clamped to +-88.38; relative error about 2e-7 here against float64,
as large as ``expf``'s in float32), which vectorises: the same kernel ran 8x faster. A NaN input stays NaN
(the clamp would make it a number). Other dtypes and targets keep TVM's sigmoid.

The new call is a ``call_tir`` of an elementwise PrimFunc, so FuseOps fuses it with the multiplies around it
as it fused the sigmoid.

Before::

    lv = R.sigmoid(gate)

After::

    lv = R.call_tir(fast_sigmoid, (gate,), out_sinfo=R.Tensor((1, n, 1536), "float32"))
"""

from __future__ import annotations

from pbs2pc.compiler.tvm_compat import relax, tirx, topi, tvm

_SIGMOID = tvm.ir.Op.get("relax.sigmoid")
_SILU = tvm.ir.Op.get("relax.nn.silu")


def fast_sigmoid(x):
    """TE: the sigmoid of ``x`` (float32) with ``topi.fast_exp``; NaN stays NaN."""
    one = tirx.const(1.0, "float32")
    value = topi.divide(one, topi.add(one, topi.fast_exp(topi.negative(x))))
    return topi.where(topi.equal(x, x), value, x)


def fast_silu(x):
    """TE: ``x * sigmoid(x)`` with :func:`fast_sigmoid`."""
    return topi.multiply(x, fast_sigmoid(x))


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        op = call.op
        if not (op.same_as(_SIGMOID) or op.same_as(_SILU)):
            return call
        ty = call.args[0].ty
        if not (isinstance(ty, relax.TensorType) and str(ty.dtype) == "float32" and ty.ndim >= 0):
            return call
        te_func = fast_sigmoid if op.same_as(_SIGMOID) else fast_silu
        return self.builder_.call_te(te_func, call.args[0], primfunc_name_hint=te_func.__name__)


@tvm.transform.module_pass(opt_level=0, name="FastSigmoid")
class FastSigmoid:
    """Rewrite every float32 ``R.sigmoid`` / ``R.nn.silu`` of the module's Relax functions (see the module
    docstring)."""

    def transform_module(self, mod, _ctx):
        rewriter = _Rewriter(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        return rewriter.builder_.get()
