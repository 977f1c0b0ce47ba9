"""The ordered list of CPU schedule rules (LLVM targets: x86 AVX-512/AVX2, AArch64 NEON).

Use after ``LegalizeOps -> AnnotateTIROpPattern -> FuseOps -> FuseTIR``::

    with target:
        mod = dlight.ApplyDefaultSchedule(*cpu_rules())(mod)

The first rule that returns a schedule wins, so the most specific come first.
"""

from __future__ import annotations

import numpy as np

from pbs2pc.compiler.tvm_compat import dlight

from . import cpu_utils as cu
from .cpu_fallback import Fallback
from .cpu_matmul import Matmul
from .cpu_pbs2p import SparseBinaryLinear


class Guarded(dlight.ScheduleRule):
    """Wrap a rule we do not own (TVM's dlight CPU rules) so that an error declines instead of raising."""

    def __init__(self, rule):
        self.rule = rule

    @cu.declines_on_error
    def apply(self, func, target, tunable):  # noqa: D102 - dlight contract
        return self.rule.apply(func, target, tunable)

    def __repr__(self) -> str:
        return f"Guarded({type(self.rule).__name__})"


class ManyRows(dlight.ScheduleRule):
    """Apply ``rule`` (dlight's CPU Reduction) only to reductions over more than one row.

    dlight's rule parallelises the *tail* of a row reduction and computes the reduction at each tail
    element; for a single row (RMSNorm in a decode step: ``[1, 1, 576]``) that recomputes the row's
    sum once per element (quadratic: it cost 250 us per norm, a third of a SmolLM2 decode step) and
    launches threads for 576 multiplies. Single rows go to :class:`Fallback` instead, which computes
    the reduction once and runs the tail as its own vectorized loop.
    """

    def __init__(self, rule):
        self.rule = rule

    @cu.declines_on_error
    def apply(self, func, target, tunable):  # noqa: D102 - dlight contract
        from pbs2pc.compiler.tvm_compat import s_tir

        sch = s_tir.Schedule(func)
        for block in cu.blocks_in_order(sch):
            kinds = cu.iter_kinds(sch, block)
            if "R" in kinds:
                extents = [cu.const_int(iv.dom.extent) for iv, k in zip(sch.get(block).iter_vars, kinds) if k == "S"]
                if all(e is not None for e in extents) and int(np.prod(extents, dtype=np.int64)) == 1:
                    return None
        return self.rule.apply(func, target, tunable)

    def __repr__(self) -> str:
        return f"ManyRows({type(self.rule).__name__})"


def cpu_rules() -> list:
    """The CPU rules in priority order, most specific first.

    1. :class:`SparseBinaryLinear` - the pbs2p kernel (GEMV / register-tiled GEMM from packed bits);
    2. :class:`Matmul` - dense matmul / batch matmul with fused epilogues (packed GEMM, both GEMVs);
    3. dlight ``cpu.GEMV`` - GEMV shapes ``Matmul`` declines (e.g. symbolic K);
    4. dlight ``cpu.Reduction`` - softmax, RMSNorm and other row reductions with injective tails, when
       there is more than one row (:class:`ManyRows`);
    5. :class:`Fallback` - parallel + vectorized loop nests for everything else.
    """
    return [SparseBinaryLinear(), Matmul(), Guarded(dlight.cpu.GEMV()), Guarded(ManyRows(dlight.cpu.Reduction())), Fallback()]
