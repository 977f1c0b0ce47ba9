"""Hand-written kernels for x86-64 with AVX2, FMA and F16C (Haswell, Zen 1 and newer).

They read one layout (:data:`LAYOUT`): byte planes in 16-row blocks (two ymm registers of fp32 rows) and
mask bit planes (the AVX-512 layout's pattern codes need VBMI to expand). ``KERNELS`` is this folder's
part of the kernel registry (:mod:`pbs2pc.passes.kernels.registry`): with ``--activations int8`` the int8
GEMV for one-token calls (``vpshufb`` byte tables, the AVX-512 int8 kernel's quantisation), else the fp32
lookup-table GEMV; the prompt's calls run the fp32 GEMM (256-entry subset-sum tables over 16 input rows
per column byte, looked up by a scalar plane byte: two ``vaddps`` per 8 weights and 16 rows), in fp32
with ``--activations int8`` too (no AVX2 int8 GEMM yet). One-token calls of op contract v2 layers (magnitude
groups, salient residual) run the v2 fp32 GEMV (:mod:`.sparse_binary_gemv_v2`: the same tables, four sums
per column byte with groups, the salient columns walked per tile), with ``--activations int8`` too; their
prompt calls run the TE kernel. Measurements: docs/avx2_gemv.md.
"""

from __future__ import annotations

from pbs2pc.passes.kernels.registry import Call, KernelEntry, Layout, builder_kwargs, parallel_knob, tile_knob

from . import sparse_binary_gemm as gemm_fp32
from . import sparse_binary_gemv as gemv_fp32
from . import sparse_binary_gemv_int8 as gemv_int8
from . import sparse_binary_gemv_v2 as gemv_v2

ISA = "x86-avx2"
#: 16-row interleaved byte planes, masks as bit planes: 5-10 % faster for the GEMV than 8 rows, and the TE
#: kernel's faster layout on AVX2 too (docs/avx2_gemv.md).
LAYOUT = Layout(word_bits=8, interleave=gemv_fp32.INTERLEAVE, mask_codes=False)
#: vpermps / vpmovzxbd / vpmulhuw on ymm (AVX2), vcvtph2ps (F16C), vfmadd (FMA).
FEATURES = ("avx2", "fma", "f16c")


def _shape(call: Call) -> tuple:
    return call.out_features, call.in_features, call.group_size, call.interleave, call.plane_dtype


def _tiles(call: Call, default: int) -> tuple:
    return tile_knob(call.out_features // INTERLEAVE, default)


def _parallel(call: Call, threshold: int = gemv_fp32.PARALLEL_MIN_WEIGHTS) -> tuple:
    return parallel_knob(call.out_features * call.in_features, threshold)


INTERLEAVE = gemv_fp32.INTERLEAVE

KERNELS = [
    KernelEntry("x86_avx2.gemv_int8", "sparse_binary_gemv_int8", "cpu", ISA, FEATURES, LAYOUT,
                activations="int8", rows="one", covers=lambda c: gemv_int8.supported(*_shape(c)),
                build=lambda c, **k: gemv_int8.gemv_int8(*_shape(c)[:3], c.has_mask, c.has_mu, c.has_bias,
                                                         **builder_kwargs(k)),
                knobs=lambda c: {"tiles": _tiles(c, gemv_int8.TILES_PER_TASK),
                                 "widen": (gemv_int8.WIDEN, *({"unpack", "madd"} - {gemv_int8.WIDEN})),
                                 "parallel": _parallel(c, gemv_int8.PARALLEL_MIN_WEIGHTS)}),
    # op contract v2 layers (groups, residual or both), one-token calls; v1 calls never reach it (covers)
    KernelEntry("x86_avx2.gemv_v2_fp32", "sparse_binary_gemv_v2", "cpu", ISA, FEATURES, LAYOUT,
                activations="fp32", rows="one",
                covers=lambda c: gemv_v2.supported(*_shape(c), c.has_groups, c.has_residual),
                build=lambda c, **k: gemv_v2.gemv_v2(*_shape(c)[:3], c.has_mask, c.has_mu, c.has_bias, c.has_groups,
                                                     c.has_residual, c.residual_bytes, **builder_kwargs(k)),
                structure=("groups", "residual"),
                knobs=lambda c: {"parallel": _parallel(c), "unroll": gemv_v2.unroll_knob(c.group_size)}),
    KernelEntry("x86_avx2.gemv_fp32", "sparse_binary_gemv", "cpu", ISA, FEATURES, LAYOUT,
                activations="fp32", rows="one", covers=lambda c: gemv_fp32.supported(*_shape(c)),
                build=lambda c, **k: gemv_fp32.gemv_fp32(*_shape(c)[:3], c.has_mask, c.has_mu, c.has_bias,
                                                         **builder_kwargs(k)),
                knobs=lambda c: {"tiles": _tiles(c, gemv_fp32.TILES_PER_TASK), "parallel": _parallel(c)}),
    KernelEntry("x86_avx2.gemm_fp32", "sparse_binary_gemm", "cpu", ISA, FEATURES, LAYOUT,
                activations="fp32", rows="any", covers=lambda c: gemm_fp32.supported(*_shape(c)),
                build=lambda c, **_: gemm_fp32.gemm_fp32(*_shape(c)[:3], c.has_mask, c.has_mu, c.has_bias)),
]

__all__ = ["ISA", "KERNELS", "LAYOUT"]
