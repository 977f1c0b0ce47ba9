"""LowerSparseBinaryLinear: replace each pbs2p op with a packed-bit TIR kernel.

Where it runs: right after the ONNX import (``pbs2pc.compiler.frontend``) and before ``LegalizeOps``.
Its input has one private Relax function per pbs2p op, tagged ``pbs2p.op`` and holding the op's reference
meaning in plain Relax ops (a dense decode + matmul); ``main`` calls them. This pass rewrites every such
call into ``call_tir`` of the TE kernel :func:`pbs2pc.passes.kernels.sparse_binary_linear`, which reads the
packed sign and mask bits directly, and removes the reference functions. Inputs that the params transform
re-laid out (uint32 words from PackPlanesAsWords, ``[N/T, C, T]`` blocks from InterleaveRows) reach the
kernel in that layout; the views and copies that kept the reference functions' signature become dead
code. The kernel PrimFunc carries a ``pbs2p_info`` attribute (the scheme and which optional inputs exist)
for the schedule rules, and is marked opaque so fusion leaves it whole.

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

import numpy as np

from pbs2pc.compiler.tvm_compat import relax, tvm
from pbs2pc.passes.kernels import registry
from pbs2pc.passes.kernels.x86_avx512 import mask_codes
from pbs2pc.models.format import ARRAY_FIELDS
from pbs2pc.passes.kernels.sparse_binary_linear import INFO_ATTR, pbs2p_info, sparse_binary_linear

#: The attribute the frontend puts on each reference function (see pbs2pc.compiler.frontend), and its
#: value for this op (``Attention`` functions are UseKVCache's).
OP_ATTR = "pbs2p.op"
OP_TYPE = "SparseBinaryLinear"


def _is_linear(func) -> bool:
    return isinstance(func, relax.Function) and func.attrs is not None and func.attrs.get(OP_ATTR) == OP_TYPE
#: The reference function's parameters: ``x``, then the op's arrays (v1's five, then the v2 groups and residual).
ROLES = ("x", *ARRAY_FIELDS)
GROUP_ROLES = ("group", "group_alpha", "group_mu")
RESIDUAL_ROLES = ("residual", "residual_alpha", "residual_mu")  # with "salient" (plain) and the computed rank
_VIEW = tvm.ir.Op.get("relax.memory.view")
_RESHAPE = tvm.ir.Op.get("relax.reshape")
_PERMUTE = tvm.ir.Op.get("relax.permute_dims")
_CALL_TIR = tvm.ir.Op.get("relax.call_tir")
#: TVM's OpPatternKind.kOpaque: keeps FuseOps from merging the kernel (its schedule rule needs it whole).
OPAQUE = 8


def _kernel(x, sign, mask, alpha, mu, bias, group, group_alpha, group_mu, salient, rank, residual, residual_alpha,
            residual_mu, n, m, group_size):
    return sparse_binary_linear(x, sign, mask, alpha, mu, bias, group, group_alpha, group_mu, salient, rank, residual,
                                residual_alpha, residual_mu, n=n, m=m, group_size=group_size)


@relax.expr_functor.mutator
class _Lowerer(relax.PyExprMutator):
    def __init__(self, mod, kernels: list, used: set | None, knobs=None):
        super().__init__(mod)
        self.mod = mod
        self.kernels = kernels
        self.used = used
        self.knobs = knobs
        self.function = ""  # the name of the Relax function being lowered (for ``knobs``)
        self._kernels = {}  # (registry entry, call) -> GlobalVar of its PrimFunc

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not isinstance(call.op, relax.GlobalVar):
            return call
        func = self.mod[call.op]
        if not _is_linear(func):
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
        has_groups, has_residual = "group" in roles, "salient" in roles
        info = pbs2p_info(n, m, g, "mask" in roles, "mu" in roles, "bias" in roles, has_groups, has_residual)
        planes = [self._target_input(roles[r]) if r in roles else None for r in ("sign", "mask")]
        if planes[1] is not None and str(planes[0].ty.dtype) != str(planes[1].ty.dtype):
            planes = [roles["sign"], roles["mask"]]  # mixed widths: give the kernel the uint8 views
        scales = [self._target_input(roles[r]) if r in roles else None for r in ("alpha", "mu")]
        # v2 inputs in the target layout (InterleaveRows may store them [N/T, C, T]; salient stays [1, K/8])
        v2 = {r: self._target_input(roles[r]) if r in roles else None for r in GROUP_ROLES + RESIDUAL_ROLES}
        v2["salient"] = roles.get("salient")
        handwritten = self._handwritten(x2, lead, k, out_features, g, planes, scales, roles.get("bias"), v2)
        rank = self._salient_rank(v2["salient"], int(k)) if handwritten is None and has_residual else None
        y = handwritten if handwritten is not None else bb.emit(
            bb.call_te(
                _kernel, x2, planes[0], planes[1], scales[0], scales[1], roles.get("bias"),
                v2["group"], v2["group_alpha"], v2["group_mu"], v2["salient"], rank, v2["residual"],
                v2["residual_alpha"], v2["residual_mu"],
                n, m, g,
                primfunc_name_hint=f"sparse_binary_linear_{n}of{m}_g{g}_",
                primfunc_attrs={INFO_ATTR: info, "op_pattern": OPAQUE},
            )
        )
        if x_ty.dtype != "float32":
            y = bb.emit(op.astype(y, x_ty.dtype))
        return op.reshape(y, lead + [out_features]) if len(lead) != 1 else y

    def _handwritten(self, x2, lead, k, out_features, g, planes, scales, bias, v2):
        """``call_tir`` of the first kernel registry entry that covers this call, else None (the TE kernel).

        ``v2``: the op contract v2 inputs by role (None where absent); the call records which sets exist
        (and the residual plane's width), so entries that do not read them never claim the call."""
        if not self.kernels:
            return None
        try:
            n, k = int(out_features), int(k)
        except TypeError:
            return None
        try:
            one_row = all(int(d) == 1 for d in lead)
        except TypeError:  # a symbolic dimension: the prompt
            one_row = False
        sign_ty = planes[0].ty
        rows_of_v2 = [v2[r] for r in GROUP_ROLES + RESIDUAL_ROLES if v2[r] is not None]
        if (any(t.ty.ndim != 3 for t in planes + scales + rows_of_v2 if t is not None)
                or any(str(t.ty.dtype) != "float16" for t in scales if t is not None)
                or any(int(t.ty.shape[2]) != int(sign_ty.shape[2]) for t in rows_of_v2)
                or (v2["group"] is not None and str(v2["group"].ty.dtype) != "uint8")
                or (bias is not None and str(bias.ty.dtype) != "float32")):
            return None
        coded = self._mask_codes(planes[1]) if one_row and planes[1] is not None else None
        codes, scheme = coded if coded else (None, None)
        residual_bytes = int(v2["residual"].ty.shape[1]) if v2["residual"] is not None else 0
        call = registry.Call(n, k, g, one_row, int(sign_ty.shape[2]), str(sign_ty.dtype),
                             planes[1] is not None, scales[1] is not None, bias is not None, scheme,
                             has_groups=v2["group"] is not None, has_residual=v2["salient"] is not None,
                             residual_bytes=residual_bytes)
        chosen = registry.select(self.kernels, call)
        if chosen is None:
            return None
        entry, call = chosen
        if self.used is not None:
            self.used.add(entry.name)
        knobs = self.knobs(self.function, entry, call) if self.knobs else None  # tuned settings, or defaults
        key = (entry.name, call)
        if key not in self._kernels:  # parsing a TVMScript kernel takes ~40 ms: once per shape, not per call
            self._kernels[key] = self.builder_.add_func(entry.build(call, **(knobs or {})), f"{entry.symbol}_g{g}_")
        gv = self._kernels[key]
        mask = codes if call.coded else planes[1]  # a one-row GEMV reads the codes, not their expansion
        args = [x2] + [a for a in (planes[0], mask, scales[0], scales[1], bias, *(v2[r] for r in ARRAY_FIELDS[5:]))
                       if a is not None]
        rows = 1 if one_row else x2.ty.shape[0]
        return self.builder_.emit(relax.call_tir(gv, args, relax.TensorType([rows, n], "float32")))

    def _salient_rank(self, salient, k: int):
        """int32 ``[K]``: the salient columns before each column (an exclusive prefix count of the salient
        bits), what the TE kernel reads to find a salient column's residual bit. Plain Relax ops (unpack,
        ``cumsum``): ``K`` integers per call, a few microseconds beside the layer."""
        bb, op = self.builder_, relax.op
        shifted = bb.emit(op.right_shift(bb.emit(op.expand_dims(salient, -1)),
                                         relax.const(np.arange(8, dtype=np.uint8))))
        bits = bb.emit(op.bitwise_and(shifted, relax.const(np.uint8(1))))
        flat = bb.emit(op.astype(bb.emit(op.reshape(bits, [k])), "int32"))
        return bb.emit(op.subtract(bb.emit(op.cumsum(flat, axis=0, dtype="int32")), flat))

    def _mask_codes(self, planes):
        """``(codes, (n, m))`` when the mask planes are ``call_tir`` of a pattern-code expansion (see
        EncodeMaskCodes), else None."""
        bound = self.lookup_binding(planes) if isinstance(planes, relax.Var) else None
        if not (isinstance(bound, relax.Call) and bound.op.same_as(_CALL_TIR)
                and isinstance(bound.args[0], relax.GlobalVar)):
            return None
        func = self.mod[bound.args[0]] if bound.args[0] in self.mod.get_global_vars() else None
        attrs = getattr(func, "attrs", None)
        if attrs is None or mask_codes.EXPAND_ATTR not in attrs:
            return None
        scheme = attrs[mask_codes.EXPAND_ATTR]
        return bound.args[1].fields[0], (int(scheme["n"]), int(scheme["m"]))

    def _word_plane(self, plane):
        """The word tensor behind a uint8 ``R.memory.view`` of a plane (see PackPlanesAsWords), else ``plane``.

        The kernel reads uint16/uint32 words directly, so the view (there only to keep the reference
        function's uint8 signature) is skipped and becomes dead code.
        """
        bound = self.lookup_binding(plane) if isinstance(plane, relax.Var) else None
        if not (isinstance(bound, relax.Call) and bound.op.same_as(_VIEW) and len(bound.args) >= 3):
            return plane
        source, offset = bound.args[0], bound.args[3] if len(bound.args) > 3 else relax.Tuple([])
        if not (isinstance(offset, relax.Tuple) and len(offset.fields) == 0):
            return plane  # a view at a byte offset: not the whole word tensor
        src_ty = source.ty
        dtype = str(getattr(src_ty, "dtype", ""))
        if not isinstance(src_ty, relax.TensorType) or dtype not in ("uint16", "uint32") or src_ty.ndim != 2:
            return plane
        ratio = int(dtype[4:]) // 8
        try:
            rows, cols = (int(d) for d in src_ty.shape.values)
            out_rows, out_cols = (int(d) for d in plane.ty.shape.values)
        except TypeError:  # symbolic shapes: planes are always static, so this is something else
            return plane
        if (rows, cols * ratio) != (out_rows, out_cols):
            return plane
        return source

    def _interleaved(self, value):
        """The ``[N/T, C, T]`` tensor behind ``reshape(permute_dims(p, [0, 2, 1]), [N, C])`` (see
        InterleaveRows), else ``value``: the kernel reads the interleaved layout itself."""
        reshaped = self.lookup_binding(value) if isinstance(value, relax.Var) else None
        if not (isinstance(reshaped, relax.Call) and reshaped.op.same_as(_RESHAPE)):
            return value
        swapped = reshaped.args[0]
        bound = self.lookup_binding(swapped) if isinstance(swapped, relax.Var) else None
        if not (isinstance(bound, relax.Call) and bound.op.same_as(_PERMUTE)):
            return value
        axes = bound.attrs.axes
        source = bound.args[0]
        src_ty = source.ty
        if axes is None or [int(a) for a in axes] != [0, 2, 1] or not isinstance(src_ty, relax.TensorType):
            return value
        try:
            blocks, cols, t = (int(d) for d in src_ty.shape.values)
            rows, out_cols = (int(d) for d in value.ty.shape.values)
        except (TypeError, ValueError):
            return value
        if (blocks * t, cols) != (rows, out_cols) or str(src_ty.dtype) != str(value.ty.dtype):
            return value
        return source

    def _target_input(self, value):
        """What the kernel reads for a sign/mask/alpha/mu argument: the parameter in its target layout."""
        return self._interleaved(self._word_plane(value))


@tvm.transform.module_pass(opt_level=0, name="LowerSparseBinaryLinear")
class LowerSparseBinaryLinear:
    """Lower every pbs2p reference function call to a packed-bit kernel (see the module docstring).

    ``kernels`` are the kernel registry's entries for the target and the compile options, in priority
    order (:func:`pbs2pc.passes.kernels.registry.for_target`); the first that covers a call runs it (e.g.
    on x86-avx512 the lookup-table GEMV for one-row calls, the GEMM for the prompt's; with
    ``--activations int8`` the int8 ones first, the fp32 ones for calls they do not cover), and the TE
    kernel (fp32) runs every call no entry covers. No entries: the TE kernel everywhere. ``used``, a set,
    receives the names of the entries that ran a call (the manifest lists them). ``knobs``, if given, is
    called as ``knobs(function name, entry, call)`` for every call an entry runs and returns the knob
    setting to build that entry's kernel with (None or ``{}``: the defaults); the tuner
    (:mod:`pbs2pc.compiler.tune`) uses it to list a model's kernels and to apply a tuning database.
    """

    def __init__(self, kernels: list | None = None, used: set | None = None, knobs=None):
        self.kernels = list(kernels or [])
        self.used = used
        self.knobs = knobs

    def transform_module(self, mod, _ctx):
        lowerer = _Lowerer(mod, self.kernels, self.used, self.knobs)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function) and not _is_linear(func):
                lowerer.function = gv.name_hint
                lowerer.builder_.update_func(gv, lowerer.visit_expr(func))
        out = lowerer.builder_.get()
        for gv, func in out.functions_items():
            if _is_linear(func):
                del out[gv]
        return out
