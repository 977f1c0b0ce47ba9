"""EncodeMaskCodes: store n:m masks of ``main`` as 5-bit pattern codes, and sign planes as ``sign & mask``.

Where it runs: first in the build's *params transform* (``pbs2pc.compiler.build.to_target_layout``),
before PackPlanesAsWords and InterleaveRows, on the interchange layout. Like them it rewrites ``main``'s
signature, records the change in ``main``'s ``pbs2pc.params_transform`` attribute, and the build applies
the same change to the arrays: the mask becomes ``{"mask_codes": 1, "n": n, "m": m}`` (encoded by
:func:`pbs2pc.passes.kernels.x86_avx512.mask_codes.encode`), its sign plane ``{"and_mask": mask name}`` (the build
stores ``sign & mask``, which every kernel may read as the sign: where the mask is 0 the sign bit is never
used, and the one-row GEMVs then need no mask for ``P``).

Why: an n:m mask byte has few possible values (28 for 6:8), so a 5-bit code carries it: 0.625 bits per
weight instead of 1, 17 % fewer weight bytes in all at 6:8 and G = 128 (1.878 instead of 2.25 bits per
weight). At batch 1 the linear layers stream their weights from memory, and the x86 GEMVs look ``IM`` up
by code directly (docs/performance.md).

Which masks: parameters read only as the mask of pbs2p calls of one scheme whose masks fit codes
(:func:`mask_codes.has_code`: 6:8, 7:8, ...), with N % 16 = 0, K % 32 = 0 and G % 32 = 0 (the GEMVs read
codes in chunks of 32 columns), whose sign planes are parameters read only as the sign of those calls.

The module stays valid and runnable: the old uses read ``R.reshape(R.permute_dims(call_tir(expand, codes),
[0, 2, 1]), [N, K/8])``, where ``expand`` (:func:`mask_codes.expand_mask`) writes the row-interleaved mask
planes ``[N/16, K/8, 16]``. LowerSparseBinaryLinear hands the codes themselves to the one-row GEMVs (the
expansion is then dead code) and the expanded planes to the other kernels (the prompt's GEMMs), which pay
one expansion per call: a read of the codes and a write of the mask, small next to an M-row product.

Before::

    def main(x, w_sign: R.Tensor((1536, 72), "uint8"), w_mask: R.Tensor((1536, 72), "uint8"), ...):
        y = pbs2p_sparse_binary_linear(x, w_sign, w_mask, w_alpha, w_mu)

After::

    def main(x, w_sign: R.Tensor((1536, 72), "uint8"), w_mask: R.Tensor((96, 760), "uint8"), ...):
        m16 = R.call_tir(expand_mask_codes_6of8_1536x576, (w_mask,), R.Tensor((96, 72, 16), "uint8"))
        mt = R.permute_dims(m16, [0, 2, 1]); m2 = R.reshape(mt, [1536, 72])
        y = pbs2p_sparse_binary_linear(x, w_sign, m2, w_alpha, w_mu)
"""

from __future__ import annotations

from pbs2pc.compiler.tvm_compat import relax, tvm
from pbs2pc.passes.kernels.x86_avx512 import mask_codes
from pbs2pc.passes.lower_sparse_binary_linear import OPAQUE
from pbs2pc.passes.pack_planes_as_words import (TRANSFORM_ATTR, ReplaceParams, merge_record, static_dims,
                                                 uses_and_pbs2p_calls)


def coded_masks(mod, func: relax.Function) -> dict:
    """``{mask param: (sign param, n, m)}`` for the masks of ``func`` this pass stores as codes."""
    params = set(func.params)
    uses, calls = uses_and_pbs2p_calls(mod, func)
    role_uses = {}  # (param, role) -> uses as that role of a pbs2p call
    schemes = {}  # mask param -> {(sign arg, n, m, group size)} over its calls
    for ref, roles in calls:
        for role in ("sign", "mask"):
            if roles.get(role) in params:
                role_uses[(roles[role], role)] = role_uses.get((roles[role], role), 0) + 1
        if roles.get("mask") in params:
            scheme = (roles.get("sign"), int(ref.attrs["n"]), int(ref.attrs["m"]), int(ref.attrs["group_size"]))
            schemes.setdefault(roles["mask"], set()).add(scheme)
    chosen = {}
    for mask, found in schemes.items():
        if len(found) != 1:
            continue  # one mask read with two signs or schemes: leave it alone
        sign, n, m, group = next(iter(found))
        shape = static_dims(mask, "uint8")
        if (shape is None or sign not in params or static_dims(sign, "uint8") != shape or group % 32
                or role_uses.get((mask, "mask")) != uses[mask] or role_uses.get((sign, "sign")) != uses[sign]):
            continue
        if mask_codes.supported(shape[0], 8 * shape[1], n, m):
            chosen[mask] = (sign, n, m)
    signs = [sign for sign, _, _ in chosen.values()]
    return {mask: v for mask, v in chosen.items() if signs.count(v[0]) == 1}  # a sign shared by two masks: neither


@tvm.transform.module_pass(opt_level=0, name="EncodeMaskCodes")
class EncodeMaskCodes:
    """Store the n:m masks of ``main`` as pattern codes (see the module docstring)."""

    def transform_module(self, mod, _ctx):
        if "main" not in [gv.name_hint for gv in mod.get_global_vars()]:
            return mod
        func = mod["main"]
        if not isinstance(func.body, relax.SeqExpr):
            return mod
        chosen = coded_masks(mod, func)
        if not chosen:
            return mod
        builder = relax.BlockBuilder(mod)
        expanders, new_params, record = {}, {}, {}
        for mask, (sign, n, m) in chosen.items():
            rows, cols = static_dims(mask, "uint8")
            key = (rows, cols, n, m)
            if key not in expanders:
                # opaque: FuseOps leaves the expansion alone
                prim = mask_codes.expand_mask(rows, 8 * cols, n, m).with_attr("op_pattern", OPAQUE)
                expanders[key] = builder.add_func(prim, f"expand_mask_codes_{n}of{m}_{rows}x{8 * cols}")
            new_params[mask] = relax.Var(mask.name, relax.TensorType(
                [rows // mask_codes.ROWS, mask_codes.code_width(8 * cols)], "uint8"))
            record[mask.name] = {"mask_codes": 1, "n": n, "m": m}
            record[sign.name] = {"and_mask": mask.name}
        with_expanders = builder.get()

        def expanded(bb, new, old_ty):
            rows, cols = (int(d) for d in old_ty.shape.values)
            scheme = next(v for k, v in chosen.items() if k.name == new.name)
            gv = expanders[(rows, cols, scheme[1], scheme[2])]
            planes = bb.emit(relax.call_tir(gv, [new], relax.TensorType([rows // mask_codes.ROWS, cols,
                                                                         mask_codes.ROWS], "uint8")))
            swapped = bb.emit(relax.op.permute_dims(planes, [0, 2, 1]))
            return relax.op.reshape(swapped, old_ty.shape)

        body = ReplaceParams(with_expanders, new_params, expanded, "mask").visit_expr(func.body)
        params = [new_params.get(p, p) for p in func.params]
        new_func = relax.Function(params, body, func.ret_ty, func.is_pure, func.attrs, func.span)
        new_func = new_func.with_attr(TRANSFORM_ATTR, merge_record(func, record))
        out = tvm.IRModule(dict(with_expanders.functions_items()), attrs=mod.attrs)
        out["main"] = new_func
        return out
