"""The int8-activation GEMM (any M, the prompt) for op contract v2 layers on ARMv8.2 NEON: ``sdot``, one pass.

The v1 GEMM's design and builder (:func:`.sparse_binary_gemm_int8.build_gemm`: weights decoded once per call and
16-row tile, ``sdot`` against pairs of quantised rows of ``x``) with the v2 structure (``pbs2pc.models.format``):

* **Groups**: the tile is decoded into ``t0 = mask (1 - grp) (2 sign - 1)``, ``m0 = mask (1 - grp)``,
  ``t1 = mask grp (2 sign - 1)`` and ``m1 = mask grp``; per scale group ``alpha IT0 + mu IM0 + ga IT1 + gmu
  IM1`` (without a mask plane ``m0`` is not decoded: ``IM0 = sum(q) - IM1``).
* **Residual**: the salient columns of each scale group, padded to a multiple of 4 with columns of zero
  weight, are a second, short ``K``: per call the kernel lists them (``cols``, ``-1`` for padding; scale group
  ``g``'s are ``[start[g], start[g+1])``) and gathers ``q`` at them (0 at padding); per tile it decodes
  ``tr = mask (2 r - 1)`` and ``mr = mask`` at the salient columns into the same ``sdot`` layout; per scale group
  ``ra ITR + rmu IMR``.

The numbers equal the v2 GEMV's (:mod:`.sparse_binary_gemv_v2_int8`): exact integer dots of the same
quantised activation, scaled per group in fp32. Oracle: :func:`.sparse_binary_gemv_v2_int8.reference` per row.
"""

from __future__ import annotations

from .sparse_binary_gemm_int8 import build_gemm, supported as v1_supported
from .sparse_binary_gemv_int8 import INTERLEAVE


def supported(out_features: int, in_features: int, group_size: int, interleave: int, plane_dtype: str,
              has_groups: bool, has_residual: bool) -> bool:
    """Whether the kernel covers this layer: a v2 layer (groups, residual or both) in the v1 GEMM's shapes."""
    return (has_groups or has_residual) and v1_supported(out_features, in_features, group_size, interleave,
                                                         plane_dtype)


def gemm_v2_int8(out_features: int, in_features: int, group_size: int, has_mask: bool, has_mu: bool,
                 has_bias: bool, has_groups: bool, has_residual: bool, residual_bytes: int = 1):
    """The PrimFunc ``(x [M, K], sign, [mask], alpha, [mu], [bias], [group, group_alpha, group_mu], [salient,
    residual, residual_alpha, residual_mu], y [M, N])``, ``M`` symbolic; planes and scales 16-row interleaved,
    ``salient`` ``[1, K/8]``."""
    if not supported(out_features, in_features, group_size, INTERLEAVE, "uint8", has_groups, has_residual):
        raise ValueError(f"the NEON v2 int8 GEMM does not cover N={out_features}, K={in_features}, G={group_size} "
                         f"(groups={has_groups}, residual={has_residual})")
    return build_gemm(out_features, in_features, group_size, has_mask, has_mu, has_bias, has_groups, has_residual,
                      residual_bytes)
