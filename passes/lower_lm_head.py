"""LowerLMHead: run the one-token LM head on its fp16 table (after StoreLMHeadFP16), without a fp32 copy.

Where it runs: in the phase pipeline after ``lower_pbs2p`` and before ``fuse_transpose_matmul``. It does
nothing unless the params transform stored the head's table in fp16
(:class:`pbs2pc.passes.store_lm_head_fp16.StoreLMHeadFP16`, ``pbs2pc compile --lm-head fp16``), where
every read of the table ``W16`` goes through ``w = R.astype(W16, "float32")``. Taken literally that
writes a float32 copy of the whole table on every call. This pass moves the conversion to what is read:

* in every function, the token lookup ``R.take(w, ids)`` becomes ``R.astype(R.take(W16, ids), "float32")``
  (the same numbers: the conversion is exact and per element);
* in the one-token entries (``decode``, and ``prefill``, which computes the logits of the last position
  only), the head ``R.matmul(h, R.permute_dims(w))`` becomes ``call_tir`` of
  :func:`pbs2pc.passes.kernels.lm_head_fp16.lm_head_fp16`, which widens the table's rows in registers.

``w`` is then dead in those entries. ``main`` (the logits of every position: a matrix product with as
many rows as tokens) keeps its head: one conversion of the table per call is small against that product.

Before (``decode``)::

    w = R.astype(model_embed_tokens_weight, "float32")      # float16 [49152, 576] parameter
    e = R.take(w, ids, axis=0)
    ...
    logits = R.matmul(h, R.permute_dims(w, axes=[1, 0]))     # h: [1, 1, 576]

After::

    e = R.astype(R.take(model_embed_tokens_weight, ids, axis=0), "float32")
    ...
    h2 = R.reshape(h, [1, 576])
    y = R.call_tir(lm_head_fp16, (h2, model_embed_tokens_weight), R.Tensor((1, 49152), "float32"))
    logits = R.reshape(y, [1, 1, 49152])
"""

from __future__ import annotations

from pbs2pc.compiler.tvm_compat import relax, tvm
from pbs2pc.passes.kernels import lm_head_fp16
from pbs2pc.passes.kv_cache import DECODE, PREFILL

#: Target families with an fp16 LM head kernel (pbs2pc.passes.kernels.lm_head_fp16 is a CPU loop nest).
FP16_HEAD_FAMILIES = ("cpu",)

_ASTYPE = tvm.ir.Op.get("relax.astype")
_MATMUL = tvm.ir.Op.get("relax.matmul")
_PERMUTE = tvm.ir.Op.get("relax.permute_dims")
_TAKE = tvm.ir.Op.get("relax.take")
#: The entries whose head products have one row per sequence.
ONE_TOKEN_ENTRIES = (DECODE, PREFILL)


@relax.expr_functor.mutator
class _Lowerer(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.head = False  # whether the function being visited is a one-token entry
        self._kernels = {}  # (vocab, hidden) -> GlobalVar of its PrimFunc

    def _bound(self, value):
        return self.lookup_binding(value) if isinstance(value, relax.Var) else None

    def _fp16_table(self, value):
        """``W16`` when ``value`` is ``R.astype(W16, "float32")`` of a 2-D float16 tensor, else None."""
        cast = self._bound(value)
        if not (isinstance(cast, relax.Call) and cast.op.same_as(_ASTYPE)):
            return None
        source = cast.args[0]
        ty = source.ty
        if not (isinstance(ty, relax.TensorType) and str(ty.dtype) == "float16" and ty.ndim == 2
                and str(cast.attrs.dtype) == "float32"):
            return None
        return source

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if call.op.same_as(_TAKE):
            table = self._fp16_table(call.args[0])
            if table is not None and int(call.attrs.axis) == 0:
                taken = self.builder_.emit(relax.op.take(table, call.args[1], axis=0, mode=call.attrs.mode))
                return relax.op.astype(taken, "float32")
        if self.head and call.op.same_as(_MATMUL):
            lowered = self._head(call)
            return call if lowered is None else lowered
        return call

    def _head(self, call):
        perm = self._bound(call.args[1])
        if not (isinstance(perm, relax.Call) and perm.op.same_as(_PERMUTE)):
            return None
        axes = perm.attrs.axes
        table = self._fp16_table(perm.args[0])
        if table is None or not (axes is None or [int(a) for a in axes] == [1, 0]):
            return None
        vocab, hidden = (int(d) for d in table.ty.shape.values)
        x = call.args[0]
        lead = list(x.ty.shape)[:-1]
        if not lm_head_fp16.supported(vocab, hidden) or int(x.ty.shape[-1]) != hidden or str(x.ty.dtype) != "float32":
            return None
        bb = self.builder_
        if (vocab, hidden) not in self._kernels:
            self._kernels[vocab, hidden] = bb.add_func(lm_head_fp16.lm_head_fp16(vocab, hidden), "lm_head_fp16")
        x2 = bb.emit(relax.op.reshape(x, [-1, hidden])) if len(lead) != 1 else x
        y = bb.emit(relax.call_tir(self._kernels[vocab, hidden], [x2, table],
                                   relax.TensorType([x2.ty.shape[0], vocab], "float32")))
        return relax.op.reshape(y, lead + [vocab]) if len(lead) != 1 else y


@tvm.transform.module_pass(opt_level=0, name="LowerLMHead")
class LowerLMHead:
    """Read an fp16 LM head table without a float32 copy (see the module docstring); ``enabled=False`` (an
    fp32 head) leaves the module as it is."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def transform_module(self, mod, _ctx):
        if not self.enabled:
            return mod
        lowerer = _Lowerer(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                lowerer.head = gv.name_hint in ONE_TOKEN_ENTRIES
                lowerer.builder_.update_func(gv, lowerer.visit_expr(func))
        return lowerer.builder_.get()
