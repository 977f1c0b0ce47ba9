"""Hand-written kernels for aarch64 with NEON (every ARMv8-A core: Cortex-A53/A72/A76/A78, Neoverse).

They read one layout (:data:`LAYOUT`): byte planes in 16-row blocks (one 16-byte NEON register holds a column
byte of 16 rows) and mask bit planes, the layout of the x86-avx2 kernels. ``KERNELS`` is this folder's part
of the kernel registry (:mod:`pbs2pc.passes.kernels.registry`): with ``--activations int8`` the ``tbl``
lookup-table GEMVs for one-token calls (:mod:`.sparse_binary_gemv_int8` for v1 layers,
:mod:`.sparse_binary_gemv_v2_int8` for op contract v2 layers, one pass over every plane) and, on cores with
the dot-product instructions, the ``sdot`` GEMMs for the prompt (:mod:`.sparse_binary_gemm_int8`,
:mod:`.sparse_binary_gemm_v2_int8`); the other calls (the generic ``arm`` preset's prompts, every fp32 call)
run the TE kernel, which LLVM vectorises for NEON.
Modeled cycles per weight against llama.cpp's Q4_0 dot product: docs/arm.md.
"""

from __future__ import annotations

from pbs2pc.passes.kernels.registry import Call, KernelEntry, Layout, builder_kwargs, parallel_knob, tile_knob

from . import sparse_binary_gemm_int8 as gemm_int8
from . import sparse_binary_gemm_v2_int8 as gemm_v2_int8
from . import sparse_binary_gemv_int8 as gemv_int8
from . import sparse_binary_gemv_v2_int8 as gemv_v2_int8

ISA = "aarch64"
#: 16-row interleaved byte planes, masks as bit planes: a column byte of 16 rows is one ``tbl`` index vector.
LAYOUT = Layout(word_bits=8, interleave=gemv_int8.INTERLEAVE, mask_codes=False)
#: ``tbl``, ``umlal``, ``fcvtl`` (fp16 scales): ARMv8-A Advanced SIMD, which every aarch64 Linux CPU has.
FEATURES = ("asimd",)
#: ``sdot`` (ARMv8.2 dot product: Cortex-A55/A76/A78 and newer).
DOT_FEATURES = ("asimd", "asimddp")


def _shape(call: Call) -> tuple:
    return call.out_features, call.in_features, call.group_size, call.interleave, call.plane_dtype


INTERLEAVE_ROWS = gemv_int8.INTERLEAVE

KERNELS = [
    # op contract v2 layers (groups, residual or both), one-token calls; v1 calls never reach it (covers)
    KernelEntry("arm_neon.gemv_v2_int8", "sparse_binary_gemv_v2_int8", "cpu", ISA, FEATURES, LAYOUT,
                activations="int8", rows="one",
                covers=lambda c: gemv_v2_int8.supported(*_shape(c), c.has_groups, c.has_residual),
                build=lambda c, **k: gemv_v2_int8.gemv_v2_int8(*_shape(c)[:3], c.has_mask, c.has_mu, c.has_bias,
                                                               c.has_groups, c.has_residual, c.residual_bytes,
                                                               **builder_kwargs(k)),
                structure=("groups", "residual"),
                knobs=lambda c: {"parallel": parallel_knob(c.out_features * c.in_features,
                                                           gemv_int8.PARALLEL_MIN_WEIGHTS)}),
    KernelEntry("arm_neon.gemv_int8", "sparse_binary_gemv_int8", "cpu", ISA, FEATURES, LAYOUT,
                activations="int8", rows="one", covers=lambda c: gemv_int8.supported(*_shape(c)),
                build=lambda c, **k: gemv_int8.gemv_int8(*_shape(c)[:3], c.has_mask, c.has_mu, c.has_bias,
                                                         **builder_kwargs(k)),
                knobs=lambda c: {"tiles": tile_knob(c.out_features // INTERLEAVE_ROWS,
                                                    gemv_int8.TILES_PER_TASK[c.has_mask]),
                                 "parallel": parallel_knob(c.out_features * c.in_features,
                                                           gemv_int8.PARALLEL_MIN_WEIGHTS)}),
    # the prompt's v2 calls on dot-product cores (groups and residual decoded with the planes)
    KernelEntry("arm_neon.gemm_v2_int8", "sparse_binary_gemm_v2_int8", "cpu", ISA, DOT_FEATURES, LAYOUT,
                activations="int8", rows="any",
                covers=lambda c: gemm_v2_int8.supported(*_shape(c), c.has_groups, c.has_residual),
                build=lambda c: gemm_v2_int8.gemm_v2_int8(*_shape(c)[:3], c.has_mask, c.has_mu, c.has_bias,
                                                          c.has_groups, c.has_residual, c.residual_bytes),
                structure=("groups", "residual")),
    # the prompt's v1 calls on dot-product cores: weights decoded once per call, sdot against pairs of rows
    KernelEntry("arm_neon.gemm_int8", "sparse_binary_gemm_int8", "cpu", ISA, DOT_FEATURES, LAYOUT,
                activations="int8", rows="any", covers=lambda c: gemm_int8.supported(*_shape(c)),
                build=lambda c: gemm_int8.gemm_int8(*_shape(c)[:3], c.has_mask, c.has_mu, c.has_bias)),
]

__all__ = ["ISA", "KERNELS", "LAYOUT"]
