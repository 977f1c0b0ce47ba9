"""The ordered list of GPU schedule rules (CUDA targets).

Use after ``LegalizeOps -> AnnotateTIROpPattern -> FuseOps -> FuseTIR``::

    with target:
        mod = dlight.ApplyDefaultSchedule(*gpu_rules())(mod)

The pbs2p linear layers that a ``cuda/`` kernel registry entry covers and the KV-cache attention arrive
already scheduled (``tirx.is_scheduled``: thread-bound TIR); everything else is TVM's dlight GPU rules,
as mlc-llm uses them: the first rule that returns a schedule wins, so the most specific come first.
A rule that raises declines instead (:class:`Guarded`), so an odd fused function falls through to
``Fallback`` rather than failing the build.
"""

from __future__ import annotations

from pbs2pc.compiler.tvm_compat import dlight

from .cpu import Guarded


def gpu_rules() -> list:
    """dlight's GPU rules in priority order.

    1. ``Matmul`` - the prompt's dense matmuls (the LM head, the TE pbs2p GEMM), tiled into shared memory;
    2. ``GEMV`` - one-token matmuls (the LM head of a decode step, the TE pbs2p GEMV): a warp per row
       block with a shuffle reduction;
    3. ``LowBatchGEMV`` - GEMVs with a few rows;
    4. ``Reduction`` / ``GeneralReduction`` - RMSNorm, softmax and other row reductions;
    5. ``Transpose``, then ``Fallback`` - every injective loop nest, one thread per element.
    """
    gpu = dlight.gpu
    return [Guarded(gpu.Matmul()), Guarded(gpu.GEMV()), Guarded(gpu.LowBatchGEMV()),
            Guarded(gpu.Reduction()), Guarded(gpu.GeneralReduction()), Guarded(gpu.Transpose()),
            gpu.Fallback()]
