"""The phase pipeline: one ordered list from the imported Relax module to code generation.

Each phase is a ``(name, pass)`` pair with a comment saying why it is there; ``--dump-ir DIR`` writes the
module after every phase (``DIR/NN_name.py``) so a reader can follow a model through the compiler.
Per-target differences are data: the preset's family selects the schedule rules
(``pbs2pc.passes.schedules.SCHEDULE_RULES``) and the kernel registry the hand-written kernels
(``pbs2pc.passes.kernels.registry``), never ``if target.kind == ...`` ladders inside passes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from pbs2pc.compiler.targets import CompileOptions, TargetPreset
from pbs2pc.errors import UnsupportedError
from pbs2pc.compiler.tvm_compat import dlight, relax, tvm
from pbs2pc.passes import ClipTakeIndices, FastSigmoid, LowerLMHead, LowerSparseBinaryLinear, UseKVCache
from pbs2pc.passes.kernels import registry
from pbs2pc.passes.kv_cache import DECODE, PREFILL


def schedule_rules(preset: TargetPreset) -> list:
    """The dlight-style schedule rules of a target family, in priority order."""
    from pbs2pc.passes.schedules import SCHEDULE_RULES

    if preset.family not in SCHEDULE_RULES:
        raise UnsupportedError(f"target {preset.name!r}: no schedule rules for the {preset.family} family yet.")
    return SCHEDULE_RULES[preset.family]()


def _dead_code(entries: list[str]) -> "tvm.transform.Pass":
    """DeadCodeElimination over those of ``entries`` the module has (a graph without attention, such as a
    single-layer benchmark, has no ``decode`` entry, and TVM's pass fails on a missing name)."""

    @tvm.transform.module_pass(opt_level=0, name="DeadCodeEliminationOfEntries")
    def dead_code(mod, _ctx):
        names = {gv.name_hint for gv in mod.get_global_vars()}
        return relax.transform.DeadCodeElimination([e for e in entries if e in names])(mod)

    return dead_code


def _cuda_graphs() -> "tvm.transform.Pass":
    """TVM's RewriteCUDAGraph, switched on: the regions of a function whose shapes and allocations are
    static (a decode step's kernels between two attention calls: norms, GEMVs, rotary) are lifted into
    functions that the runtime captures as a CUDA graph on the first call and replays after, one launch
    instead of dozens. Parameters after the graph inputs (``num_input``: the weights) are taken as fixed
    tensors, which the runtime's are; inputs and the KV caches stay outside the graphs."""

    @tvm.transform.module_pass(opt_level=0, name="RewriteCUDAGraphOn")
    def rewrite(mod, _ctx):
        with tvm.transform.PassContext(config={"relax.backend.use_cuda_graph": True}):
            return relax.transform.RewriteCUDAGraph()(mod)

    return rewrite


#: Each target family's phases after memory planning, from the compile options.
FAMILY_PHASES = {"cuda": lambda options: [("rewrite_cuda_graph", _cuda_graphs())] if options.cuda_graph else []}


def fp32_lanes(preset: TargetPreset) -> int:
    """A CPU preset's fp32 vector lanes (the fp32 LM head kernel's unit); 0 for other families."""
    from pbs2pc.passes.schedules.cpu_utils import vector_lanes

    return vector_lanes(preset.tvm_target()) if preset.family == "cpu" else 0


def phases(preset: TargetPreset, options: CompileOptions | None = None,
           used_kernels: set | None = None, knobs=None) -> list[tuple[str, "tvm.transform.Pass"]]:
    """The ordered phases for ``preset`` with ``options`` (default options when None); ``used_kernels``, a
    set, receives the names of the kernel registry entries the lowering chose; ``knobs``: the registry
    kernels' tuned settings (see :class:`~pbs2pc.passes.LowerSparseBinaryLinear`)."""
    options = options or CompileOptions()
    kernels = registry.for_target(preset, options)
    rt = relax.transform
    return [
        # Gathers (token embedding, rotary rows) clamp their indices: TVM's default reads past the table.
        ("clip_take", ClipTakeIndices()),
        # Attention against caches the runtime owns, updated in place; adds the one-token "decode" entry and the
        # one-sequence "prefill" (on CUDA its batch stays symbolic: see UseKVCache).
        ("use_kv_cache", UseKVCache(one_sequence_prefill=preset.family != "cuda")),
        # pbs2p ops (reference functions from the frontend) -> call_tir of packed-bit kernels: the first kernel
        # registry entry for the target that covers the call (hand-written GEMVs and GEMMs), else the TE kernel.
        ("lower_pbs2p", LowerSparseBinaryLinear(kernels, used_kernels, knobs)),
        # With --lm-head fp16 / int8: the token lookup reads the fp16 / int8 table's rows, the one-token
        # entries' head the fp16 / int8 GEMV; neither converts the whole table per call.
        # An fp32 head with tuned settings (--tuning-db) runs the matmul rule's GEMV with them.
        ("lower_lm_head", LowerLMHead(enabled=options.lm_head != "fp32", knobs=knobs, fp32_lanes=fp32_lanes(preset))),
        # matmul(x, permute_dims(w)) -> one "NT" matmul: the tied LM head reads the embedding table in
        # place instead of materialising its transpose on every call.
        ("fuse_transpose_matmul", rt.FuseTransposeMatmul()),
        # On CPUs: float32 sigmoid / SiLU with a vectorised polynomial exp (TVM's calls expf per element).
        *([("fast_sigmoid", FastSigmoid())] if preset.family == "cpu" else []),
        # The remaining high-level ops -> TIR, then fuse elementwise chains into their producers.
        # cumsum / sort / top-k have no LegalizeOps rule: TVM dispatches them to target kernels first.
        ("dispatch_sort_scan", relax.backend.DispatchSortScan()),
        ("legalize", rt.LegalizeOps()),
        ("annotate_patterns", rt.AnnotateTIROpPattern()),
        ("fold_constants", rt.FoldConstant()),
        ("fuse_ops", rt.FuseOps()),
        ("fuse_tir", rt.FuseTIR()),
        ("dead_code", _dead_code(["main", DECODE, PREFILL])),
        # Schedule every PrimFunc with the target family's rules (first rule that applies wins).
        ("schedule", dlight.ApplyDefaultSchedule(*schedule_rules(preset))),
        # Standard Relax lowering to VM bytecode (as in TVM's default CPU pipeline).
        ("rewrite_reshape", rt.RewriteDataflowReshape()),
        ("to_non_dataflow", rt.ToNonDataflow()),
        ("remove_purity_checking", rt.RemovePurityChecking()),
        ("call_tir_rewrite", rt.CallTIRRewrite()),
        ("plan_memory", rt.StaticPlanBlockMemory()),
        # The target family's additions once memory is planned (CUDA: decode's static regions as graphs).
        *FAMILY_PHASES.get(preset.family, lambda _options: [])(options),
        ("lower_alloc_tensor", rt.LowerAllocTensor()),
        ("kill_after_last_use", rt.KillAfterLastUse()),
        ("lower_runtime_builtin", rt.LowerRuntimeBuiltin()),
        ("compute_prim_value", rt.ComputePrimValue()),
        ("vm_shape_lower", rt.VMShapeLower()),
        ("attach_global_symbol", rt.AttachGlobalSymbol()),
    ]


def make_pipeline(preset: TargetPreset, options: CompileOptions | None = None, dump_ir: str | Path | None = None,
                  on_phase: Callable[[str], None] | None = None,
                  used_kernels: set | None = None, knobs=None) -> "tvm.transform.Pass":
    """A module pass running :func:`phases` under the preset's target, optionally dumping IR.

    ``on_phase`` is called with each phase's name before it runs, then with ``"codegen"``; ``used_kernels``
    and ``knobs``: see :func:`phases`.
    """
    target = preset.tvm_target()
    steps = phases(preset, options, used_kernels, knobs)
    dump = Path(dump_ir) if dump_ir else None

    @tvm.transform.module_pass(opt_level=0, name="Pbs2pcPipeline")
    def pipeline(mod, _ctx):
        if dump:
            dump.mkdir(parents=True, exist_ok=True)
            (dump / "00_imported.py").write_text(mod.script())
        with target:
            for index, (name, step) in enumerate(steps, start=1):
                if on_phase:
                    on_phase(name)
                mod = step(mod)
                if dump:
                    (dump / f"{index:02d}_{name}.py").write_text(mod.script())
        if on_phase:
            on_phase("codegen")  # TVM's TIR lowering and LLVM code generation follow this pass
        return mod

    return pipeline
