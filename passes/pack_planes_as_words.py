"""PackPlanesAsWords: re-type the packed sign/mask parameters of pbs2p ops as wider unsigned words.

Where it runs: on the imported module, before the phase pipeline, as the first half of the build's
*params transform* (``pbs2pc.compiler.build.to_target_layout``). It changes ``main``'s signature, so the
weight arrays that the runtime will pass must change the same way; the build applies the recorded
transform to the arrays (``numpy.ndarray.view``) and writes them to the weights file in the new layout.

Why: the interchange planes are uint8 ``[N, K/8]`` with bits packed little-endian. Viewed as uint32
``[N, K/32]`` they hold exactly the same bytes (x86 and AArch64 are little-endian), but the kernel then
fetches one word per 32 weights of a row instead of one per 8, which makes the CPU GEMV's per-row gathers
4x fewer (measured 1.0-1.5x faster at M = 1 on 7 of 8 shapes, docs/performance.md). No bit moves, so the re-layout is free
and exact; it is the simplest of the target layouts the design allows (architecture.md §2).

The module stays valid and runnable: every re-typed parameter reaches the op's reference function
through a zero-copy ``R.memory.view`` back to uint8, and :class:`LowerSparseBinaryLinear` hands the word
tensor itself to the kernel, after which the view is dead code.

Before::

    def main(x, w_sign: R.Tensor((1536, 72), "uint8"), w_mask: R.Tensor((1536, 72), "uint8"), ...):
        y = pbs2p_sparse_binary_linear(x, w_sign, w_mask, alpha, mu)

After (``PackPlanesAsWords(32)``), with ``main`` tagged ``pbs2pc.params_transform = {"w_sign": {"dtype":
"uint32"}, "w_mask": {"dtype": "uint32"}}``::

    def main(x, w_sign: R.Tensor((1536, 18), "uint32"), w_mask: R.Tensor((1536, 18), "uint32"), ...):
        s8 = R.memory.view(w_sign, R.shape([1536, 72]), "uint8")
        m8 = R.memory.view(w_mask, R.shape([1536, 72]), "uint8")
        y = pbs2p_sparse_binary_linear(x, s8, m8, alpha, mu)
"""

from __future__ import annotations

from pbs2pc.compiler.tvm_compat import relax, tvm

#: The attribute on ``main`` listing re-laid-out parameters: ``{param name: {"dtype": new dtype}}``, plus
#: ``"interleave": T`` for those InterleaveRows stored as ``[N/T, C, T]``. The build applies it to the arrays
#: (:func:`pbs2pc.compiler.build.to_target_layout`): first the dtype view, then the interleave.
TRANSFORM_ATTR = "pbs2pc.params_transform"
OP_ATTR = "pbs2p.op"
PLANE_ROLES = ("sign", "mask")
WORD_DTYPES = {8: "uint8", 16: "uint16", 32: "uint32"}


def read_record(func) -> dict:
    """``main``'s params-transform record as plain Python: ``{name: {"dtype": str, ["interleave": int], ...}}``
    (string values stay strings, the others become ints)."""
    if func.attrs is None or TRANSFORM_ATTR not in func.attrs:
        return {}
    out = {}
    for name, entry in dict(func.attrs[TRANSFORM_ATTR]).items():
        if isinstance(entry, str):  # the first form of the record: just the new dtype
            out[str(name)] = {"dtype": entry}
        else:
            out[str(name)] = {str(k): (str(v) if isinstance(v, str) else int(v)) for k, v in dict(entry).items()}
    return out


def merge_record(func, record: dict) -> dict:
    """``func``'s record updated with ``record`` (entries of one parameter are merged key by key)."""
    merged = read_record(func)
    for name, entry in record.items():
        merged[name] = {**merged.get(name, {}), **entry}
    return merged


def pbs2p_reference(mod, expr) -> relax.Function | None:
    """The reference function a call goes to, when it is a pbs2p SparseBinaryLinear call (shared by the
    params-transform passes), else None."""
    if not isinstance(expr, relax.Call) or not isinstance(expr.op, relax.GlobalVar):
        return None
    func = mod[expr.op]
    if isinstance(func, relax.Function) and func.attrs is not None and func.attrs.get(OP_ATTR) == "SparseBinaryLinear":
        return func
    return None


def uses_and_pbs2p_calls(mod, func: relax.Function) -> tuple[dict, list]:
    """How often each variable of ``func``'s body is read, and its pbs2p calls as ``(reference function,
    {role: argument})``: what the params-transform passes decide from (a parameter qualifies when all of
    its reads are the roles a pass re-lays out)."""
    uses, calls = {}, []

    def visit(expr):
        if isinstance(expr, relax.Var):
            uses[expr] = uses.get(expr, 0) + 1
        ref = pbs2p_reference(mod, expr)
        if ref is not None:
            calls.append((ref, dict(zip([p.name for p in ref.params], expr.args))))

    relax.analysis.post_order_visit(func.body, visit)
    return uses, calls


def _plane_params(mod, func: relax.Function, word_bits: int) -> list:
    """Parameters of ``func`` used only as sign/mask planes of pbs2p calls and re-typeable to words.

    A plane qualifies when it is a static uint8 ``[N, K/8]`` tensor, ``word_bits`` divides both K and
    the op's group size (so a word never straddles a scale group), and nothing else reads it.
    """
    params = set(func.params)
    uses, calls = uses_and_pbs2p_calls(mod, func)
    plane_uses = {}
    for ref, roles in calls:
        for role, arg in roles.items():
            if role in PLANE_ROLES and arg in params and _fits(arg, int(ref.attrs["group_size"]), word_bits):
                plane_uses[arg] = plane_uses.get(arg, 0) + 1
    return [p for p in func.params if p in plane_uses and plane_uses[p] == uses[p]]


def static_dims(var, dtype: str | None = None, ndim: int = 2) -> tuple | None:
    """The static shape of a tensor-typed ``var`` (of ``dtype``, when given, and ``ndim`` dims), else None."""
    ty = var.ty
    if (not isinstance(ty, relax.TensorType) or ty.shape is None or ty.ndim != ndim
            or (dtype is not None and str(ty.dtype) != dtype)):
        return None
    dims = [d.value if isinstance(d, tvm.tirx.IntImm) else None for d in ty.shape.values]
    return None if None in dims else tuple(dims)


def _fits(var: relax.Var, group_size: int, word_bits: int) -> bool:
    dims = static_dims(var, "uint8")
    return dims is not None and (dims[1] * 8) % word_bits == 0 and group_size % word_bits == 0


@relax.expr_functor.mutator
class ReplaceParams(relax.PyExprMutator):
    """Replace the uses of re-laid-out parameters by an expression of the new parameter that has the old
    type (``old_from_new(new_var, old_type)``), emitted once, at the first use, so the module stays valid.

    Shared by the params-transform passes (this one: a uint8 view of words; ``InterleaveRows``: the
    inverse permutation), whose lowering then hands the new parameter itself to the kernel.
    """

    def __init__(self, mod, new_params: dict, old_from_new, suffix: str):
        super().__init__(mod)
        self.new_params = new_params  # old Var -> new Var
        self.old_from_new, self.suffix = old_from_new, suffix
        self.bound = {}

    def visit_var_(self, var):
        if var in self.new_params:
            if var not in self.bound:
                self.bound[var] = self.builder_.emit(self.old_from_new(self.builder_, self.new_params[var], var.ty),
                                                     name_hint=f"{var.name}_{self.suffix}")
            return self.bound[var]
        return super().visit_var_(var)


def _uint8_view(_bb, new, old_ty):
    return relax.op.memory.view(new, old_ty.shape, old_ty.dtype)


@tvm.transform.module_pass(opt_level=0, name="PackPlanesAsWords")
class PackPlanesAsWords:
    """Re-type pbs2p sign/mask parameters of ``main`` as ``word_bits``-wide words (see the module docstring)."""

    def __init__(self, word_bits: int = 32):
        if word_bits not in WORD_DTYPES:
            raise ValueError(f"word_bits must be one of {sorted(WORD_DTYPES)}, got {word_bits}")
        self.word_bits = word_bits

    def transform_module(self, mod, _ctx):
        if self.word_bits == 8 or "main" not in [gv.name_hint for gv in mod.get_global_vars()]:
            return mod
        func = mod["main"]
        planes = _plane_params(mod, func, self.word_bits)
        if not planes:
            return mod
        dtype, ratio = WORD_DTYPES[self.word_bits], self.word_bits // 8
        new_params = {}
        for old in planes:
            rows, cols = (int(d) for d in old.ty.shape.values)
            new_params[old] = relax.Var(old.name, relax.TensorType([rows, cols // ratio], dtype))
        retyper = ReplaceParams(mod, new_params, _uint8_view, "u8")
        # Views are emitted where the old parameter is first used: inside the dataflow block, before the call.
        body = retyper.visit_expr(func.body)
        params = [new_params.get(p, p) for p in func.params]
        transform = {p.name: {"dtype": dtype} for p in planes}
        new_func = relax.Function(params, body, func.ret_ty, func.is_pure, func.attrs, func.span)
        new_func = new_func.with_attr(TRANSFORM_ATTR, merge_record(func, transform))
        out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        out["main"] = new_func
        return out
