"""Hand-written kernels for x86-64 with AVX2, FMA and F16C (Haswell, Zen 1 and newer).

``KERNELS`` is this folder's part of the kernel registry (:mod:`pbs2pc.passes.kernels.registry`).
"""

from __future__ import annotations

ISA = "x86-avx2"
KERNELS = []
