"""A model's distinct registry kernels, their search spaces and realistic inputs to time them on.

:func:`extract` runs the compiler's phases as far as the lowering of the pbs2p ops
(:class:`~pbs2pc.passes.LowerSparseBinaryLinear`) and records every call a kernel registry entry takes.
Calls are grouped into *tuning kernels* by :func:`kernel_key`: the entry, the layer's shape and the
inputs it has. Two calls of one key differ only in what does not change the code's shape (the n:m
pattern table of a coded mask, the width of the salient residual plane), so one knob setting serves
them all; the call measured for a key is its most common one. A kernel's search space is its registry
entry's ``knobs(call)``, every combination, the hand-picked default first.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json

from pbs2pc.errors import UnsupportedError


@dataclasses.dataclass
class Kernel:
    """One tuning kernel: a registry entry and the call it is measured on; ``calls`` per decode step."""

    key: str
    entry: object  # pbs2pc.passes.kernels.registry.KernelEntry
    call: object  # pbs2pc.passes.kernels.registry.Call
    calls: int  # calls per decode step (one-token entry), or per run of the graph without one

    def space(self) -> list[dict]:
        """Every knob setting, the default (each knob's first value) first."""
        knobs = self.entry.knobs(self.call) if self.entry.knobs else {}
        names = sorted(knobs)
        return [dict(zip(names, values)) for values in itertools.product(*(knobs[n] for n in names))]

    def build(self, knobs: dict):
        """The kernel's PrimFunc with ``knobs``, as a module with one ``main`` (what the builder takes)."""
        from pbs2pc.compiler.tvm_compat import IRModule

        func = self.entry.build(self.call, **knobs)
        return IRModule({"main": func.with_attr("global_symbol", "main")})


def knob_id(knobs: dict) -> str:
    """A knob setting as canonical JSON (how records name it)."""
    return json.dumps(knobs, sort_keys=True, separators=(",", ":"))


def kernel_key(entry, call) -> str:
    """The tuning key of ``call`` run by ``entry``: ``entry:NxK/gG`` and the inputs it has, e.g.
    ``x86_avx512.gemv_v2_fp32:576x576/g64+mask+mu+groups+residual+codes``."""
    if hasattr(call, "vocab"):  # the LM head (pbs2pc.passes.lower_lm_head.HeadCall)
        return f"{entry.name}:{call.vocab}x{call.hidden}"
    parts = [f"{entry.name}:{call.out_features}x{call.in_features}/g{call.group_size}"]
    flags = (("mask", call.has_mask), ("mu", call.has_mu), ("bias", call.has_bias), ("groups", call.has_groups),
             ("residual", call.has_residual), ("codes", call.coded is not None))
    parts.extend(name for name, present in flags if present)
    rows = "" if call.one_row else "/rows"
    return "+".join(parts) + rows


def extract(onnx_path, preset, options) -> list[Kernel]:
    """The distinct tunable registry kernels of the model at ``onnx_path`` for ``preset`` and ``options``,
    the most called first."""
    from pbs2pc.compiler import frontend
    from pbs2pc.compiler.build import _vocab_size, to_target_layout
    from pbs2pc.compiler.pipeline import fp32_lanes
    from pbs2pc.passes import LowerLMHead, LowerSparseBinaryLinear, UseKVCache
    from pbs2pc.passes.kernels import registry
    from pbs2pc.passes.kv_cache import DECODE

    model = frontend.load_onnx(onnx_path)
    imported = frontend.import_onnx(model)
    del model
    mod, _params = to_target_layout(imported.mod, imported.params, preset, options, vocab=_vocab_size(imported))
    seen: dict[str, list] = collections.defaultdict(list)  # key -> [(function, entry, call)]

    def observe(function, entry, call):
        seen[kernel_key(entry, call)].append((function, entry, call))
        return None

    with preset.tvm_target():
        mod = UseKVCache()(mod)
        names = {gv.name_hint for gv in mod.get_global_vars()}
        LowerSparseBinaryLinear(registry.for_target(preset, options), None, observe)(mod)
        # the head kernel: --lm-head fp16 / int8, or the fp32 head's GEMV schedule on a CPU
        LowerLMHead(options.lm_head != "fp32", observe, fp32_lanes(preset))(mod)
    step = DECODE if DECODE in names else "main"
    kernels = []
    for key, uses in seen.items():
        entry = uses[0][1]
        if entry.knobs is None:
            continue
        common = collections.Counter(call for _f, _e, call in uses).most_common(1)[0][0]
        if not common.one_row:
            continue  # prompt kernels take symbolic rows: not tuned yet
        kernels.append(Kernel(key, entry, common, sum(1 for f, _e, _c in uses if f == step)))
    if not kernels:
        raise UnsupportedError(f"the model has no tunable kernels for target {preset.name!r} (no registry kernel with "
                               "knobs runs its one-token calls); compile it without --tuning-db.")
    return sorted(kernels, key=lambda k: (-k.calls * weights(k.call), k.key))


def weights(call) -> int:
    """The weights a call reads: a layer's ``N x K``, the LM head's ``vocab x hidden``."""
    return call.vocab * call.hidden if hasattr(call, "vocab") else call.out_features * call.in_features


def inputs(kernel: Kernel, seed: int = 0) -> list:
    """Numpy arrays for the kernel's parameters, in order, as a layer of the model holds them: random bits
    and inputs, fp16 scales near the model's, and a salient plane with as many columns as the residual
    plane holds (so the residual walk does the model's work)."""
    import numpy as np

    from pbs2pc.compiler.tvm_compat import meta_schedule

    func = kernel.entry.build(kernel.call)
    rng = np.random.default_rng(seed)
    names = [str(getattr(p, "name", None) or p) for p in func.params]  # the buffers' names (x, sign, mask, ..., y)
    specs = {name: (info.as_json()[1], [int(d) for d in info.as_json()[2]])
             for name, info in zip(names, meta_schedule().arg_info.ArgInfo.from_prim_func(func))}
    out = []
    for name in names:
        dtype, shape = specs[name]
        if name == "salient":
            columns = shape[1] * 8
            count = min(columns, max(1, specs["residual"][1][1] * 8 - 4)) if "residual" in specs else 0
            bits = np.zeros(columns, np.uint8)
            bits[rng.choice(columns, count, replace=False)] = 1
            out.append(np.packbits(bits, bitorder="little").reshape(shape))
        elif name == "table" and dtype == "int8":  # the int8 LM head: a quantised table (codes and fp16 scales)
            from pbs2pc.passes.kernels import lm_head_int8

            vocab, width = shape
            table = rng.standard_normal((vocab, lm_head_int8.hidden_of(width))).astype(np.float32) * 0.05
            out.append(lm_head_int8.quantize(table))
        elif dtype == "uint8":
            out.append(rng.integers(0, 256, shape, dtype=np.uint8))
        elif dtype == "float16":
            out.append((rng.standard_normal(shape) * 0.02).astype(np.float16))
        elif dtype.startswith("float"):
            out.append(rng.standard_normal(shape).astype(dtype) if name != "y" else np.zeros(shape, dtype))
        else:
            out.append(np.zeros(shape, dtype))
    return out
