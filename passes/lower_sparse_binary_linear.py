"""LowerSparseBinaryLinear: replace each pbs2p op with a packed-bit TIR kernel.

Where it runs: right after the ONNX import (``pbs2pc.compiler.frontend``) and before ``LegalizeOps``.
Its input has one private Relax function per pbs2p op, tagged ``pbs2p.op`` and holding the op's reference
meaning in plain Relax ops (a dense decode + matmul); ``main`` calls them. This pass rewrites every such
call into ``call_tir`` of the TE kernel :func:`pbs2pc.passes.kernels.sparse_binary_linear`, which reads the
packed sign and mask bits directly, and removes the reference functions. The kernel PrimFunc carries a
``pbs2p_info`` attribute (the scheme and which optional inputs exist) for the schedule rules, and is marked
opaque so fusion leaves it whole.

Before::

    @R.function(private=True, attrs={"pbs2p.op": "SparseBinaryLinear", "n": 6, "m": 8, "group_size": 64})
    def pbs2p_sparse_binary_linear(x: R.Tensor((d0, d1, 576)), sign, mask, alpha, mu): ...decode, matmul...

    lv = pbs2p_sparse_binary_linear(h, sign, mask, alpha, mu)          # in main

After::

    x2 = R.reshape(h, (d0 * d1, 576))
    y2 = R.call_tir(sparse_binary_linear, (x2, sign, mask, alpha, mu), R.Tensor((d0 * d1, 1536)))
    lv = R.reshape(y2, (d0, d1, 1536))
"""

from __future__ import annotations

from pbs2pc.compiler.tvm_compat import relax, tvm
from pbs2pc.passes.kernels.sparse_binary_linear import INFO_ATTR, pbs2p_info, sparse_binary_linear

#: The attribute the frontend puts on each reference function (see pbs2pc.compiler.frontend).
OP_ATTR = "pbs2p.op"
ROLES = ("x", "sign", "mask", "alpha", "mu", "bias")
#: TVM's OpPatternKind.kOpaque: keeps FuseOps from merging the kernel (its schedule rule needs it whole).
_OPAQUE = 8


def _kernel(x, sign, mask, alpha, mu, bias, n, m, group_size):
    return sparse_binary_linear(x, sign, mask, alpha, mu, bias, n=n, m=m, group_size=group_size)


@relax.expr_functor.mutator
class _Lowerer(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.mod = mod

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not isinstance(call.op, relax.GlobalVar):
            return call
        func = self.mod[call.op]
        if not isinstance(func, relax.Function) or func.attrs is None or OP_ATTR not in func.attrs:
            return call
        return self._lower(call, func)

    def _lower(self, call, func):
        bb, op = self.builder_, relax.op
        roles = dict(zip([p.name for p in func.params], call.args))
        if set(roles) - set(ROLES) or "x" not in roles:
            raise ValueError(f"malformed pbs2p reference function with parameters {list(roles)}")
        n, m, g = (int(func.attrs[key]) for key in ("n", "m", "group_size"))
        x = roles["x"]
        x_ty = x.ty
        k = x_ty.shape[-1]
        out_features = roles["sign"].ty.shape[0]
        lead = list(x_ty.shape)[:-1]
        x2 = bb.emit(op.reshape(x, [-1, k])) if len(lead) != 1 else x
        if x_ty.dtype != "float32":
            x2 = bb.emit(op.astype(x2, "float32"))
        info = pbs2p_info(n, m, g, "mask" in roles, "mu" in roles, "bias" in roles)
        y = bb.emit(
            bb.call_te(
                _kernel, x2, roles["sign"], roles.get("mask"), roles["alpha"], roles.get("mu"), roles.get("bias"),
                n, m, g,
                primfunc_name_hint=f"sparse_binary_linear_{n}of{m}_g{g}_",
                primfunc_attrs={INFO_ATTR: info, "op_pattern": _OPAQUE},
            )
        )
        if x_ty.dtype != "float32":
            y = bb.emit(op.astype(y, x_ty.dtype))
        return op.reshape(y, lead + [out_features]) if len(lead) != 1 else y


@tvm.transform.module_pass(opt_level=0, name="LowerSparseBinaryLinear")
class LowerSparseBinaryLinear:
    """Lower every pbs2p reference function call to a packed-bit kernel (see the module docstring)."""

    def transform_module(self, mod, _ctx):
        lowerer = _Lowerer(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function) and (func.attrs is None or OP_ATTR not in func.attrs):
                lowerer.builder_.update_func(gv, lowerer.visit_expr(func))
        out = lowerer.builder_.get()
        for gv, func in out.functions_items():
            if isinstance(func, relax.Function) and func.attrs is not None and OP_ATTR in func.attrs:
                del out[gv]
        return out
