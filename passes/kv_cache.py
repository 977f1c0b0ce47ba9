"""UseKVCache: run attention against a KV cache the caller owns, in place, and add a ``decode`` entry.

Where it runs: first, on the imported module (before ``LowerSparseBinaryLinear``). The frontend imports each
ONNX ``Attention`` node as a call to a private Relax function tagged ``pbs2p.op = "Attention"`` that returns
``(y, present_key, present_value)`` with ``present = concat(past, new)``. Taken literally, that copies every
layer's whole cache on every generated token. This pass instead:

1. replaces each graph input ``past_key_values.{i}.key`` / ``.value`` that feeds exactly one attention
   call by a fixed-capacity cache parameter ``cache.{i}.key [B, KV, D, C]`` / ``cache.{i}.value
   [B, KV, C, D]`` (layouts in :mod:`pbs2pc.passes.kernels.attention`; ``C`` is one symbolic capacity);
2. rewrites those calls into ``call_tir_inplace`` of the cached-attention kernel, which writes this call's
   keys and values at positions ``T - S .. T - 1`` (``T`` = the mask's last dimension) and attends over
   ``0 .. T - 1`` without copying anything;
3. drops the ``present`` outputs (they are the caches themselves), so ``main`` returns the other outputs
   (the logits) alone;
4. adds ``decode``: ``main`` with ``batch = sequence = 1`` bound, so one-token steps get kernels built for
   a static single row (the GEMV schedules) instead of the symbolic-size ones;
5. adds ``prefill``: ``main`` returning the logits of the last position only (``[1, 1, vocab]``),
   when the logits come from a matmul of the hidden states (the LM head): generation needs no others, and
   the head is the largest matmul of a prompt (SmolLM2, 512 tokens: 14.5 GFLOP, ~0.3 s on 2 cores). It
   binds ``batch = 1``, as ``decode`` does: generation runs one sequence, and ``decode`` continues it in
   batch-1 caches. So on a CPU the head's one row is the decode step's GEMV, not a packed GEMM over a
   symbolic batch, which copied the whole table per call (SmolLM2's fp32 head: 10.3 against 4.2 ms); on
   CUDA ``batch`` stays symbolic (:class:`UseKVCache`).

Before::

    def main(input_ids, attention_mask, position_ids, past_key_values_0_key, past_key_values_0_value, ...):
        lv61 = onnx_attention(q, k, v, mask, past_key_values_0_key, past_key_values_0_value)
        ...
        return (logits, lv61[1], lv61[2], ...)

After::

    def main(input_ids, attention_mask, position_ids, cache_0_key, cache_0_value, ...):
        lv61 = R.call_tir_inplace(cached_attention, (q, k, v, mask, cache_0_key, cache_0_value),
                                  out_sinfo=[...], inplace_indices=[-1, 4, 5])
        ...
        return logits
    def decode(...): the same with batch = 1, sequence = 1

Attention calls whose past keys are not graph inputs (or that have none) keep their reference function.
Precondition the caller keeps (the runtime does): the cache tensors passed in hold the first ``T - S``
positions from earlier calls and have room for ``T`` (rounded up to 64), and are not shared.
"""

from __future__ import annotations

import dataclasses

from pbs2pc.compiler.tvm_compat import copy_with_new_vars, relax, tirx, tvm
from pbs2pc.passes.kernels.attention import builder as attention_builder, key_block

OP_ATTR = "pbs2p.op"
ATTENTION = "Attention"
#: The entry points added for one-token steps and for prompts (last-position logits).
DECODE = "decode"
PREFILL = "prefill"
#: Names of the symbolic dimensions the exporter uses (``batch``, ``sequence``) that ``decode`` binds to 1,
#: and that ``prefill`` binds (one sequence, any length).
DECODE_BINDINGS = {"batch": 1, "sequence": 1}
PREFILL_BINDINGS = {"batch": 1}


@dataclasses.dataclass
class CacheLayout:
    """What the runtime needs to allocate the caches: recorded in the artifact manifest."""

    layers: int
    kv_heads: int
    head_dim: int
    key_layout: str = "[batch, kv_heads, head_dim, capacity]"
    value_layout: str = "[batch, kv_heads, capacity, head_dim]"
    capacity_multiple: int = 64


def _attention_func(mod, call):
    if not isinstance(call, relax.Call) or not isinstance(call.op, relax.GlobalVar):
        return None
    func = mod[call.op]
    if isinstance(func, relax.Function) and func.attrs is not None and func.attrs.get(OP_ATTR) == ATTENTION:
        return func
    return None


@relax.expr_functor.mutator
class _CacheRewriter(relax.PyExprMutator):
    def __init__(self, mod, caches: dict):
        super().__init__(mod)
        self.mod = mod
        self.caches = caches  # old past param -> new cache param
        self.kernels: dict = {}

    def visit_call_(self, call):
        func = _attention_func(self.mod, call)
        if func is None or len(call.args) != 6 or call.args[4] not in self.caches:
            return super().visit_call_(call)
        q, k, v, mask = (self.visit_expr(a) for a in call.args[:4])
        k_cache, v_cache = self.caches[call.args[4]], self.caches[call.args[5]]
        heads, kv_heads, head_dim = int(q.ty.shape[1]), int(k.ty.shape[1]), int(q.ty.shape[3])
        key = (heads, kv_heads, head_dim, float(func.attrs["scale"]), key_block())
        if key not in self.kernels:
            self.kernels[key] = self.builder_.add_func(attention_builder()(*key),
                                                      f"cached_attention_{heads}h{kv_heads}kv")
        return relax.call_tir_inplace(self.kernels[key], [q, k, v, mask, k_cache, v_cache], [-1, 4, 5],
                                      [q.ty, k_cache.ty, v_cache.ty])


def _cache_params(mod, main) -> tuple[dict, list]:
    """Map each past-key/value parameter used by exactly one attention call to its new cache parameter."""
    uses: dict = {}

    def count(expr):
        if isinstance(expr, relax.Var):
            uses[expr] = uses.get(expr, 0) + 1

    calls = []

    def visit(expr):
        if isinstance(expr, relax.Call):
            for arg in expr.args:
                count(arg)
            if _attention_func(mod, expr) is not None and len(expr.args) == 6:
                calls.append(expr)
        elif isinstance(expr, relax.Tuple):
            for field in expr.fields:
                count(field)
        elif isinstance(expr, relax.TupleGetItem):
            count(expr.tuple_value)

    relax.analysis.post_order_visit(main.body, visit)
    params = set(main.params)
    capacity = tirx.Var("capacity", "int64")
    caches, layers = {}, []
    for call in calls:
        past_k, past_v = call.args[4], call.args[5]
        if not all(p in params and uses.get(p) == 1 for p in (past_k, past_v)):
            continue
        batch, kv_heads, _, head_dim = past_k.ty.shape
        index = len(layers)
        caches[past_k] = relax.Var(f"cache_{index}_key",
                                   relax.TensorType([batch, kv_heads, head_dim, capacity], "float32"))
        caches[past_v] = relax.Var(f"cache_{index}_value",
                                   relax.TensorType([batch, kv_heads, capacity, head_dim], "float32"))
        layers.append((int(kv_heads), int(head_dim)))
    return caches, layers


def cache_layout(mod) -> CacheLayout | None:
    """The caches :class:`UseKVCache` gives ``mod``'s ``main`` (None: it has no cacheable attention)."""
    return _layout(_cache_params(mod, mod["main"])[1])


def _layout(layers: list) -> CacheLayout | None:
    """One cache shape for every layer, or a clear error."""
    if not layers:
        return None
    if len(set(layers)) != 1:
        raise ValueError(f"attention layers with different cache shapes are not supported: {sorted(set(layers))}")
    return CacheLayout(len(layers), *layers[0])


@tvm.transform.module_pass(opt_level=0, name="UseKVCache")
class UseKVCache:
    """See the module docstring; :func:`cache_layout` describes the caches it introduces. ``one_sequence_prefill``
    (default True): ``prefill`` binds ``batch = 1`` (step 5); the CUDA pipeline keeps it symbolic, since TVM's
    GPU reduction rule schedules the norms of a ``(1, sequence)`` prompt with a shared buffer of symbolic
    size that its CUDA code generation refuses ("Can only handle constant size stack allocation")."""

    def __init__(self, one_sequence_prefill: bool = True):
        self.one_sequence_prefill = one_sequence_prefill

    def transform_module(self, mod, _ctx):
        main = mod["main"]
        caches, layers = _cache_params(mod, main)
        if _layout(layers) is None:
            return mod
        rewriter = _CacheRewriter(mod, caches)
        body = rewriter.visit_expr(main.body)
        body = _drop_cache_outputs(body)
        params = [caches.get(p, p) for p in main.params]
        new_main = relax.Function(params, body, body.body.ty, main.is_pure, main.attrs, main.span)
        rewriter.builder_.update_func(mod.get_global_var("main"), new_main)
        out = rewriter.builder_.get()
        # A copy with fresh variables: functions of one module must not share bindings (SSA).
        decode = copy_with_new_vars(out["main"])
        names = {var.name for var in relax.analysis.defined_symbolic_vars(decode)}
        decode = decode.bind_symbolic_vars({k: v for k, v in DECODE_BINDINGS.items() if k in names})
        out[DECODE] = decode.with_attr("global_symbol", DECODE)
        prefill = _last_position_logits(copy_with_new_vars(out["main"]))
        if prefill is not None:
            if self.one_sequence_prefill:
                names = {var.name for var in relax.analysis.defined_symbolic_vars(prefill)}
                prefill = prefill.bind_symbolic_vars({k: v for k, v in PREFILL_BINDINGS.items() if k in names})
            out[PREFILL] = prefill.with_attr("global_symbol", PREFILL)
        # The reference functions of the rewritten calls are dead now.
        called = set()
        for _, func in out.functions_items():
            if isinstance(func, relax.Function):
                relax.analysis.post_order_visit(
                    func.body, lambda e: called.add(e) if isinstance(e, relax.GlobalVar) else None)
        for gv, func in list(out.functions_items()):
            if gv not in called and isinstance(func, relax.Function) and (func.attrs or {}).get(OP_ATTR) == ATTENTION:
                del out[gv]
        return out


def _drop_cache_outputs(body):
    """``return (logits, present...)`` -> ``return logits``: the present values are the caches themselves.

    The imported ``main`` ends with one dataflow block whose output ``gv`` is bound to the output tuple.
    """
    if not isinstance(body, relax.SeqExpr) or not body.blocks:
        return body
    block = body.blocks[-1]
    last = block.bindings[-1]
    if not (isinstance(last, relax.VarBinding) and last.var.same_as(body.body) and isinstance(last.value, relax.Tuple)):
        return body
    # Which bound values are the caches (TupleGetItem 1/2 of a rewritten call)?
    inplace_outputs = set()
    producers = {}
    for b in block.bindings:
        if isinstance(b, relax.VarBinding):
            producers[b.var] = b.value
    for field in last.value.fields:
        value = producers.get(field)
        if isinstance(value, relax.TupleGetItem) and value.index in (1, 2):
            call = producers.get(value.tuple_value)
            if isinstance(call, relax.Call) and call.op.same_as(tvm.ir.Op.get("relax.call_tir_inplace")):
                inplace_outputs.add(field)
    kept = [f for f in last.value.fields if f not in inplace_outputs]
    if len(kept) == len(last.value.fields):
        return body
    value = kept[0] if len(kept) == 1 else relax.Tuple(kept)
    new_var = relax.Var(last.var.name, value.ty if len(kept) == 1 else relax.TupleType([f.ty for f in kept]))
    bindings = list(block.bindings[:-1]) + [relax.VarBinding(new_var, value)]
    new_block = relax.DataflowBlock(bindings) if isinstance(block, relax.DataflowBlock) else relax.BindingBlock(bindings)
    return relax.SeqExpr(list(body.blocks[:-1]) + [new_block], new_var)


@relax.expr_functor.mutator
class _SliceBeforeHead(relax.PyExprMutator):
    """Rebind ``head = matmul(h, w)`` as ``matmul(h[:, S-1:S], w)``; the bindings after it follow."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def visit_var_binding_(self, binding):
        if not binding.var.same_as(self.head):
            return super().visit_var_binding_(binding)
        h, w = (self.visit_expr(a) for a in binding.value.args)
        seq = h.ty.shape[1]
        last = self.builder_.emit(relax.op.strided_slice(h, axes=[1], begin=[seq - 1], end=[seq], assume_inbound=True),
                                  name_hint="last_hidden")
        new = self.builder_.emit(relax.op.matmul(last, w, out_dtype=binding.value.attrs.out_dtype), name_hint="logits")
        self.set_var_remap(binding.var, new)


def _last_position_logits(func):
    """``func`` computing only the last position's logits, or None when its output is not ``matmul(h, w)``
    of a 3-D ``h [batch, sequence, hidden]``."""
    body = func.body
    if not isinstance(body, relax.SeqExpr) or not body.blocks:
        return None
    bindings = {b.var: b.value for block in body.blocks for b in block.bindings if isinstance(b, relax.VarBinding)}
    var = body.body
    while var in bindings and isinstance(bindings[var], relax.Var):  # gv = lv139
        var = bindings[var]
    value = bindings.get(var)
    if not (isinstance(value, relax.Call) and value.op.same_as(tvm.ir.Op.get("relax.matmul"))
            and value.args[0].ty.ndim == 3 and value.ty.ndim == 3):
        return None
    new_body = _SliceBeforeHead(var).visit_expr(body)
    return relax.Function(func.params, new_body, new_body.body.ty, func.is_pure, func.attrs, func.span)
