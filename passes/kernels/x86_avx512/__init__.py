"""Hand-written kernels for x86-64 with AVX-512 (F, BW, VL, VBMI; VNNI for int8 activations).

They read one layout (:data:`LAYOUT`): byte planes in 16-row blocks (the fp32 lanes of a zmm register) with
6:8-style masks as 5-bit pattern codes (:mod:`.mask_codes`). ``KERNELS`` is this folder's part of the
kernel registry (:mod:`pbs2pc.passes.kernels.registry`), in priority order: with ``--activations int8``
the int8 GEMV (one row) and GEMM (any rows), else the fp32 lookup-table GEMV and GEMM. One-token calls of
op contract v2 layers (magnitude groups, salient residual) run the v2 fp32 GEMV (:mod:`.sparse_binary_gemv_v2`:
the same tables, four sums per column byte with groups, the codes expanded in registers, the salient
columns walked per tile), with ``--activations int8`` too; their prompt calls run the TE kernel.
"""

from __future__ import annotations

from pbs2pc.passes.kernels.registry import Call, KernelEntry, Layout, builder_kwargs, parallel_knob, tile_knob

from . import mask_codes
from . import sparse_binary_gemm as gemm_fp32
from . import sparse_binary_gemm_int8 as gemm_int8
from . import sparse_binary_gemv as gemv_fp32
from . import sparse_binary_gemv_int8 as gemv_int8
from . import sparse_binary_gemv_v2 as gemv_v2

ISA = "x86-avx512"
#: 16-row interleaved byte planes (one zmm of fp32 per 16 rows) and mask pattern codes (17 % fewer weight
#: bytes at 6:8; docs/performance.md).
LAYOUT = Layout(word_bits=8, interleave=gemv_fp32.LANES, mask_codes=True)
#: vpermb / vpermi2b / vpmultishiftqb (VBMI), byte and word ops on zmm (BW), 128/256-bit forms (VL).
FP32_FEATURES = ("avx512f", "avx512bw", "avx512vl", "avx512vbmi")
INT8_FEATURES = FP32_FEATURES + ("avx512_vnni",)


def _shape(call: Call) -> tuple:
    return call.out_features, call.in_features, call.group_size, call.interleave, call.plane_dtype


def _has(call: Call) -> tuple:
    return call.has_mask, call.has_mu, call.has_bias


def _codes(call: Call) -> dict:
    return {"codes": call.coded} if call.coded else {}


def _gemv_knobs(default_tiles: int):
    """The one-row GEMVs' search space: 16-row tiles per parallel task, and whether the tasks run in
    parallel (the hand-picked threshold: :data:`gemv_fp32.PARALLEL_MIN_WEIGHTS`)."""
    def knobs(call: Call) -> dict:
        return {"tiles": tile_knob(call.out_features // gemv_fp32.LANES, default_tiles),
                "parallel": parallel_knob(call.out_features * call.in_features, gemv_fp32.PARALLEL_MIN_WEIGHTS)}
    return knobs


KERNELS = [
    KernelEntry("x86_avx512.gemv_int8", "sparse_binary_gemv_int8", "cpu", ISA, INT8_FEATURES, LAYOUT,
                activations="int8", rows="one", covers=lambda c: gemv_int8.supported(*_shape(c)),
                build=lambda c, **k: gemv_int8.gemv_int8(*_shape(c)[:3], *_has(c), **_codes(c), **builder_kwargs(k)),
                reads_codes=True, knobs=_gemv_knobs(gemv_int8.TILES_PER_TASK)),
    KernelEntry("x86_avx512.gemm_int8", "sparse_binary_gemm_int8", "cpu", ISA, INT8_FEATURES, LAYOUT,
                activations="int8", rows="any", covers=lambda c: gemm_int8.supported(*_shape(c)),
                build=lambda c, **_: gemm_int8.gemm_int8(*_shape(c)[:3], *_has(c))),
    # op contract v2 layers (groups, residual or both), one-token calls, masks as codes or planes
    KernelEntry("x86_avx512.gemv_v2_fp32", "sparse_binary_gemv_v2", "cpu", ISA, FP32_FEATURES, LAYOUT,
                activations="fp32", rows="one",
                covers=lambda c: gemv_v2.supported(*_shape(c), c.has_groups, c.has_residual, coded=c.coded is not None),
                build=lambda c, **k: gemv_v2.gemv_v2(*_shape(c)[:3], *_has(c), c.has_groups, c.has_residual,
                                                     c.residual_bytes, **_codes(c), **builder_kwargs(k)),
                reads_codes=True, structure=("groups", "residual"),
                knobs=lambda c: {**_gemv_knobs(gemv_v2.TILES_PER_TASK)(c),
                                 "unroll_groups": gemv_v2.unroll_groups_knob(c.in_features, c.group_size),
                                 "prefetch": (gemv_v2.PREFETCH_TILES, 1)}),
    KernelEntry("x86_avx512.gemv_fp32", "sparse_binary_gemv", "cpu", ISA, FP32_FEATURES, LAYOUT,
                activations="fp32", rows="one",
                covers=lambda c: gemv_fp32.supported(*_shape(c), coded=c.coded is not None),
                build=lambda c, **k: gemv_fp32.gemv_fp32(*_shape(c)[:3], *_has(c), **_codes(c), **builder_kwargs(k)),
                reads_codes=True, knobs=_gemv_knobs(gemv_fp32.TILES_PER_TASK)),
    KernelEntry("x86_avx512.gemm_fp32", "sparse_binary_gemm", "cpu", ISA, FP32_FEATURES, LAYOUT,
                activations="fp32", rows="any", covers=lambda c: gemm_fp32.supported(*_shape(c)),
                build=lambda c, **_: gemm_fp32.gemm_fp32(*_shape(c)[:3], *_has(c))),
]

__all__ = ["ISA", "KERNELS", "LAYOUT", "mask_codes"]
