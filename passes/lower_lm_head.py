"""LowerLMHead: run the one-token LM head on its fp16 or int8 table (after StoreLMHeadFP16 or
StoreLMHeadInt8), without a fp32 copy.

Where it runs: in the phase pipeline after ``lower_pbs2p`` and before ``fuse_transpose_matmul``. It does
nothing unless the params transform stored the head's table in fp16 or int8 (int8: at the end). In fp16
(:class:`pbs2pc.passes.store_lm_head_fp16.StoreLMHeadFP16`, ``pbs2pc compile --lm-head fp16``)
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

With ``--lm-head int8`` (:class:`pbs2pc.passes.store_lm_head_int8.StoreLMHeadInt8`) every read of the
int8 table ``W8`` (``[V, H + 2 * H / 32]``: codes, then each 32 columns' fp16 scale) goes through ``w = R.call_tir(
lm_head_int8_dequantize, (W8,))``, and the same two rewrites apply: the lookup takes the int8 rows and
dequantises only those (``call_tir(lm_head_int8_dequantize, (reshape(take(W8, ids), [-1, H + 2 * H / 32]),))``, the
same PrimFunc on N rows instead of V), and the one-token head calls
:func:`pbs2pc.passes.kernels.lm_head_int8.lm_head_int8`. ``main`` keeps one dequantisation of the table
per call and its fp32 product.

An fp32 head (no ``--lm-head``) is left to the schedule rules, unless the tuner's settings for it are
given (``knobs`` and ``fp32_lanes``, from ``compile --tuning-db``): then the one-token head becomes
``call_tir`` of :func:`pbs2pc.passes.kernels.lm_head_fp32.lm_head_fp32`, the matmul rule's GEMV schedule of
the same product with those settings.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from pbs2pc.compiler.tvm_compat import relax, tvm
from pbs2pc.passes.kernels import lm_head_fp16, lm_head_fp32, lm_head_int8
from pbs2pc.passes.kv_cache import DECODE, PREFILL

#: Target families with the fp16 and int8 LM head kernels (pbs2pc.passes.kernels.lm_head_fp16 and
#: lm_head_int8 are CPU loop nests).
HEAD_KERNEL_FAMILIES = ("cpu",)

_ASTYPE = tvm.ir.Op.get("relax.astype")
_CALL_TIR = tvm.ir.Op.get("relax.call_tir")
_MATMUL = tvm.ir.Op.get("relax.matmul")
_PERMUTE = tvm.ir.Op.get("relax.permute_dims")
_TAKE = tvm.ir.Op.get("relax.take")
#: The entries whose head products have one row per sequence.
ONE_TOKEN_ENTRIES = (DECODE, PREFILL)


@dataclasses.dataclass(frozen=True)
class HeadCall:
    """A one-token LM head as its kernel sees it (what the tuner keys and measures it by)."""

    kernel: str  # "lm_head_fp16", "lm_head_int8" or "lm_head_fp32"
    vocab: int
    hidden: int
    one_row: bool = True
    lanes: int = 0  # lm_head_fp32: the target's fp32 vector lanes (its schedule's unit)


@dataclasses.dataclass(frozen=True)
class HeadEntry:
    """An LM head kernel as the tuner (:mod:`pbs2pc.compiler.tune`) sees a kernel registry entry: a name,
    ``build(call, **knobs)`` (one row, as a decode step calls it) and ``knobs(call)``, its search space."""

    name: str
    build: Callable  # (HeadCall, **knobs) -> PrimFunc
    knobs: Callable  # (HeadCall) -> {knob: candidate values, default first}


HEAD_ENTRIES = {entry.name: entry for entry in (
    HeadEntry("lm_head_fp16", lambda c, **k: lm_head_fp16.lm_head_fp16(c.vocab, c.hidden, rows=1, **k),
              lambda c: lm_head_fp16.knobs(c.vocab, c.hidden)),
    HeadEntry("lm_head_int8", lambda c, **k: lm_head_int8.lm_head_int8(c.vocab, c.hidden, rows=1, **k),
              lambda c: lm_head_int8.knobs(c.vocab, c.hidden)),
    HeadEntry("lm_head_fp32", lambda c, **k: lm_head_fp32.lm_head_fp32(c.vocab, c.hidden, c.lanes, **k),
              lambda c: lm_head_fp32.knobs(c.vocab, c.hidden, c.lanes)),
)}


@relax.expr_functor.mutator
class _Lowerer(relax.PyExprMutator):
    def __init__(self, mod, knobs=None, fp32_lanes: int = 0):
        self.knobs = knobs  # (function, entry, call) -> knob settings or None: see LowerLMHead
        self.fp32_lanes = fp32_lanes  # > 0: an fp32 head with tuned settings runs lm_head_fp32
        self.function = None
        super().__init__(mod)
        self.head = False  # whether the function being visited is a one-token entry
        self._kernels = {}  # (kernel name, vocab, hidden) -> GlobalVar of its PrimFunc

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

    def _int8_table(self, value):
        """``(W8, dequantize GlobalVar)`` when ``value`` is ``call_tir(lm_head_int8_dequantize, (W8,))`` of a
        2-D int8 tensor (StoreLMHeadInt8), else None."""
        call = self._bound(value)
        if not (isinstance(call, relax.Call) and call.op.same_as(_CALL_TIR)
                and isinstance(call.args[0], relax.GlobalVar) and call.args[0].name_hint == lm_head_int8.DEQUANTIZE):
            return None
        args = call.args[1].fields if isinstance(call.args[1], relax.Tuple) else [call.args[1]]
        ty = args[0].ty if len(args) == 1 else None
        if not (isinstance(ty, relax.TensorType) and str(ty.dtype) == "int8" and ty.ndim == 2):
            return None
        return args[0], call.args[0]

    def _take_int8(self, call, table, dequantize):
        """The rows ``call`` (``take(w, ids)``) reads, taken from ``W8`` and dequantised."""
        bb = self.builder_
        width = int(table.ty.shape[1])
        hidden = lm_head_int8.hidden_of(width)
        taken = bb.emit(relax.op.take(table, call.args[1], axis=0, mode=call.attrs.mode))
        lead = list(taken.ty.shape)[:-1]
        rows = bb.emit(relax.op.reshape(taken, [-1, width])) if len(lead) != 1 else taken
        out = bb.emit(relax.call_tir(dequantize, [rows], relax.TensorType([rows.ty.shape[0], hidden], "float32")))
        return relax.op.reshape(out, lead + [hidden]) if len(lead) != 1 else out

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if call.op.same_as(_TAKE) and int(call.attrs.axis) == 0:
            table = self._fp16_table(call.args[0])
            if table is not None:
                taken = self.builder_.emit(relax.op.take(table, call.args[1], axis=0, mode=call.attrs.mode))
                return relax.op.astype(taken, "float32")
            int8 = self._int8_table(call.args[0])
            if int8 is not None:
                return self._take_int8(call, *int8)
        if self.head and call.op.same_as(_MATMUL):
            lowered = self._head(call)
            return call if lowered is None else lowered
        return call

    def _head(self, call):
        perm = self._bound(call.args[1])
        if not (isinstance(perm, relax.Call) and perm.op.same_as(_PERMUTE)):
            return None
        axes = perm.attrs.axes
        if not (axes is None or [int(a) for a in axes] == [1, 0]):
            return None
        table, kernels = self._fp16_table(perm.args[0]), lm_head_fp16
        if table is None:
            int8 = self._int8_table(perm.args[0])
            table, kernels = (int8[0], lm_head_int8) if int8 is not None else (None, None)
        if table is None:
            return self._head_fp32(call, perm.args[0])
        vocab, hidden = (int(d) for d in table.ty.shape.values)
        if kernels is lm_head_int8:
            hidden = lm_head_int8.hidden_of(hidden)
        x = call.args[0]
        lead = list(x.ty.shape)[:-1]
        if not kernels.supported(vocab, hidden) or int(x.ty.shape[-1]) != hidden or str(x.ty.dtype) != "float32":
            return None
        bb = self.builder_
        name = kernels.__name__.rsplit(".", 1)[1]  # lm_head_fp16 / lm_head_int8: the PrimFunc's builder too
        if (name, vocab, hidden) not in self._kernels:
            settings = self.knobs(self.function, HEAD_ENTRIES[name], HeadCall(name, vocab, hidden)) if self.knobs else None
            self._kernels[name, vocab, hidden] = bb.add_func(getattr(kernels, name)(vocab, hidden, **(settings or {})),
                                                             name)
        x2 = bb.emit(relax.op.reshape(x, [-1, hidden])) if len(lead) != 1 else x
        y = bb.emit(relax.call_tir(self._kernels[name, vocab, hidden], [x2, table],
                                   relax.TensorType([x2.ty.shape[0], vocab], "float32")))
        return relax.op.reshape(y, lead + [vocab]) if len(lead) != 1 else y

    def _head_fp32(self, call, table):
        """The one-token head on an fp32 table as :func:`lm_head_fp32.lm_head_fp32` with its tuned settings
        (``knobs`` gives some), else None: the matmul stays for the schedule rules, which build the same
        product with the defaults."""
        ty, x = table.ty, call.args[0]
        if not (self.fp32_lanes and self.knobs and isinstance(ty, relax.TensorType) and ty.ndim == 2
                and str(ty.dtype) == "float32" and str(x.ty.dtype) == "float32"):
            return None
        shape = [d for d in x.ty.shape.values]
        if not all(isinstance(d, tvm.tirx.IntImm) for d in shape) or any(int(d) != 1 for d in shape[:-1]):
            return None  # one row of x only (the decode step's, the prefill's last position)
        vocab, hidden = (int(d) for d in ty.shape.values)
        if int(shape[-1]) != hidden or not lm_head_fp32.supported(vocab, hidden, self.fp32_lanes):
            return None
        head = HeadCall("lm_head_fp32", vocab, hidden, lanes=self.fp32_lanes)
        settings = self.knobs(self.function, HEAD_ENTRIES["lm_head_fp32"], head)
        if settings is None:
            return None
        bb = self.builder_
        if ("lm_head_fp32", vocab, hidden) not in self._kernels:
            self._kernels["lm_head_fp32", vocab, hidden] = bb.add_func(
                lm_head_fp32.lm_head_fp32(vocab, hidden, self.fp32_lanes, **settings), "lm_head_fp32")
        x2 = bb.emit(relax.op.reshape(x, [1, hidden])) if len(shape) != 2 else x
        y = bb.emit(relax.call_tir(self._kernels["lm_head_fp32", vocab, hidden], [x2, table],
                                   relax.TensorType([1, vocab], "float32")))
        return relax.op.reshape(y, [*shape[:-1], vocab]) if len(shape) != 2 else y


@tvm.transform.module_pass(opt_level=0, name="LowerLMHead")
class LowerLMHead:
    """Read an fp16 or int8 LM head table without a float32 copy (see the module docstring);
    ``enabled=False`` (an fp32 head) leaves the module as it is. ``knobs(function, entry, call)``, as for
    :class:`~pbs2pc.passes.LowerSparseBinaryLinear`: the head kernel's tuned settings (``entry`` one of
    :data:`HEAD_ENTRIES`, ``call`` a :class:`HeadCall`), or None for its defaults. ``fp32_lanes`` (a CPU
    target's fp32 vector lanes; 0: none): an fp32 head (``enabled=False``) whose ``knobs`` give settings runs
    :func:`~pbs2pc.passes.kernels.lm_head_fp32.lm_head_fp32` with them; without settings it stays a matmul."""

    def __init__(self, enabled: bool = True, knobs=None, fp32_lanes: int = 0):
        self.enabled = enabled
        self.knobs = knobs
        self.fp32_lanes = fp32_lanes

    def transform_module(self, mod, _ctx):
        if not self.enabled and not (self.fp32_lanes and self.knobs):
            return mod
        lowerer = _Lowerer(mod, self.knobs, self.fp32_lanes)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                lowerer.function = gv.name_hint
                lowerer.head = gv.name_hint in ONE_TOKEN_ENTRIES
                lowerer.builder_.update_func(gv, lowerer.visit_expr(func))
        return lowerer.builder_.get()
