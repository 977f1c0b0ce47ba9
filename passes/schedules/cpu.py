"""The ordered list of CPU schedule rules (LLVM targets: x86 AVX-512/AVX2, AArch64 NEON).

Use after ``LegalizeOps -> AnnotateTIROpPattern -> FuseOps -> FuseTIR``::

    with target:
        mod = dlight.ApplyDefaultSchedule(*cpu_rules())(mod)

The first rule that returns a schedule wins, so the most specific come first.
"""

from __future__ import annotations

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


def cpu_rules() -> list:
    """The CPU rules in priority order, most specific first.

    1. :class:`SparseBinaryLinear` - the pbs2p kernel (GEMV / register-tiled GEMM from packed bits);
    2. :class:`Matmul` - dense matmul / batch matmul with fused epilogues (packed GEMM, both GEMVs);
    3. dlight ``cpu.GEMV`` - GEMV shapes ``Matmul`` declines (e.g. symbolic K);
    4. dlight ``cpu.Reduction`` - softmax, RMSNorm and other row reductions with injective tails;
    5. :class:`Fallback` - parallel + vectorized loop nests for everything else.
    """
    return [SparseBinaryLinear(), Matmul(), Guarded(dlight.cpu.GEMV()), Guarded(dlight.cpu.Reduction()), Fallback()]
