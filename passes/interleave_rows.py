"""InterleaveRows: store pbs2p weight inputs row-interleaved for the SIMD width, ``[N, C] -> [N/T, C, T]``.

Where it runs: on the imported module, before the phase pipeline, as the second half of the build's
*params transform* (``pbs2pc.compiler.build.to_target_layout``), after :class:`PackPlanesAsWords`. Like
that pass it changes ``main``'s signature, records the change in ``main``'s ``pbs2pc.params_transform``
attribute (``{param name: {"dtype": ..., "interleave": T}}``), and the build applies the same permutation
to the numpy arrays (:func:`interleave_array`) before writing the weights file.

Why: the CPU GEMV runs its SIMD lanes over ``T`` consecutive output rows. In the interchange layout the
``T`` plane words (or fp16 scales) that one vector needs lie a row pitch apart, so the kernel gathers them
one by one. Interleaved, element ``[o, c]`` lives at ``[o // T, c, o % T]``: the words of one column chunk
for a tile of ``T`` rows are contiguous, and so are the scales of one group, and each becomes one vector
load. It is a pure permutation of bytes (the same bits per weight); only the order on disk changes.

Which inputs: the sign and mask planes (after PackPlanesAsWords they are uint32 words), the ``alpha`` /
``mu`` scales and the v2 per-row inputs (group plane and scales, residual plane and scales) of pbs2p calls, when they are static 2-D parameters of ``main`` with ``T`` dividing ``N`` and
nothing but pbs2p ops reads them (directly, or through the uint8 ``R.memory.view`` PackPlanesAsWords
left). Anything else keeps its layout (odd ``N`` falls back to the plain layout).

The module stays valid and runnable: each re-laid-out parameter reaches its old uses through
``R.reshape(R.permute_dims(p, [0, 2, 1]), [N, C])`` (a real copy, but only in the reference functions),
and :class:`LowerSparseBinaryLinear` hands the 3-D tensor itself to the kernel, after which the copy is
dead code.

Before (after ``PackPlanesAsWords(32)``)::

    def main(x, w_sign: R.Tensor((1536, 18), "uint32"), w_alpha: R.Tensor((1536, 9), "float16"), ...):
        s8 = R.memory.view(w_sign, R.shape([1536, 72]), "uint8")
        y = pbs2p_sparse_binary_linear(x, s8, m8, w_alpha, mu)

After (``InterleaveRows(16)``)::

    def main(x, w_sign: R.Tensor((96, 18, 16), "uint32"), w_alpha: R.Tensor((96, 9, 16), "float16"), ...):
        st = R.permute_dims(w_sign, [0, 2, 1]); s2 = R.reshape(st, [1536, 18])
        s8 = R.memory.view(s2, R.shape([1536, 72]), "uint8")
        at = R.permute_dims(w_alpha, [0, 2, 1]); a2 = R.reshape(at, [1536, 9])
        y = pbs2p_sparse_binary_linear(x, s8, m8, a2, mu)
"""

from __future__ import annotations

from pbs2pc.compiler.tvm_compat import relax, tvm
from pbs2pc.passes.pack_planes_as_words import (TRANSFORM_ATTR, ReplaceParams, merge_record, static_dims,
                                                 uses_and_pbs2p_calls)

#: The pbs2p reference-function parameters this pass may re-lay out: every per-row input (op contract v2's
#: group plane and scales, residual plane and scales too; ``salient``, one row shared by all, stays ``[1, K/8]``).
ROLES = ("sign", "mask", "alpha", "mu", "group", "group_alpha", "group_mu", "residual", "residual_alpha", "residual_mu")
_VIEW = tvm.ir.Op.get("relax.memory.view")


def interleave_array(array, t: int):
    """The numpy side of the transform: ``[N, C] -> [N/T, C, T]`` with ``out[o // T, c, o % T] = a[o, c]``."""
    import numpy as np

    rows, cols = array.shape
    return np.ascontiguousarray(array.reshape(rows // t, t, cols).transpose(0, 2, 1))


def deinterleave_array(array):
    """Inverse of :func:`interleave_array`: ``[N/T, C, T] -> [N, C]``."""
    import numpy as np

    blocks, cols, t = array.shape
    return np.ascontiguousarray(array.transpose(0, 2, 1).reshape(blocks * t, cols))


def _static_2d(var, t: int) -> bool:
    dims = static_dims(var)
    return dims is not None and dims[0] % t == 0 and dims[0] > 0


def _candidates(mod, func: relax.Function, t: int) -> list:
    """Parameters of ``func`` read only as sign/mask/alpha/mu of pbs2p calls (maybe through a uint8 view)."""
    params = set(func.params)
    view_of = {}  # view var -> param
    # Bindings first (a view of a parameter is bound before the call that uses it).
    for block in func.body.blocks:
        for binding in block.bindings:
            value = binding.value
            if (isinstance(value, relax.Call) and value.op.same_as(_VIEW) and value.args[0] in params
                    and (len(value.args) < 4 or (isinstance(value.args[3], relax.Tuple) and not value.args[3].fields))):
                view_of[binding.var] = value.args[0]
    uses, calls = uses_and_pbs2p_calls(mod, func)
    role_uses, view_role_uses = {}, {}
    for _ref, roles in calls:
        for role, arg in roles.items():
            if role not in ROLES:
                continue
            if arg in params:
                role_uses[arg] = role_uses.get(arg, 0) + 1
            elif arg in view_of:
                view_role_uses[arg] = view_role_uses.get(arg, 0) + 1
    for view, param in view_of.items():
        # A view of a parameter counts as one use of it; it is a role use when every use of the view is.
        if uses.get(view, 0) == view_role_uses.get(view, 0):
            role_uses[param] = role_uses.get(param, 0) + 1
    return [p for p in func.params if p in role_uses and role_uses[p] == uses[p] and _static_2d(p, t)]


def _row_major(bb, new, old_ty):
    """``[N/T, C, T]`` back to ``[N, C]``: ``reshape(permute_dims(new, [0, 2, 1]))``."""
    swapped = bb.emit(relax.op.permute_dims(new, [0, 2, 1]))
    return relax.op.reshape(swapped, old_ty.shape)


@tvm.transform.module_pass(opt_level=0, name="InterleaveRows")
class InterleaveRows:
    """Store pbs2p planes and scales of ``main`` as ``[N/T, C, T]`` (see the module docstring); ``T <= 1``: no-op."""

    def __init__(self, rows: int = 16):
        if rows < 0:
            raise ValueError(f"the interleave must be a positive number of rows (or 0: off), got {rows}")
        self.rows = rows

    def transform_module(self, mod, _ctx):
        t = self.rows
        if t <= 1 or "main" not in [gv.name_hint for gv in mod.get_global_vars()]:
            return mod
        func = mod["main"]
        if not isinstance(func.body, relax.SeqExpr):
            return mod
        chosen = _candidates(mod, func, t)
        if not chosen:
            return mod
        new_params = {}
        for old in chosen:
            rows, cols = (int(d) for d in old.ty.shape.values)
            new_params[old] = relax.Var(old.name, relax.TensorType([rows // t, cols, t], old.ty.dtype))
        body = ReplaceParams(mod, new_params, _row_major, "2d").visit_expr(func.body)
        params = [new_params.get(p, p) for p in func.params]
        record = {p.name: {"dtype": str(p.ty.dtype), "interleave": t} for p in chosen}
        new_func = relax.Function(params, body, func.ret_ty, func.is_pure, func.attrs, func.span)
        new_func = new_func.with_attr(TRANSFORM_ATTR, merge_record(func, record))
        out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        out["main"] = new_func
        return out
