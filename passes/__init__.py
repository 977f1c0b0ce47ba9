"""Relax passes (one per file), TE kernels (``kernels/``) and schedule rules (``schedules/``).

This module only exports pass constructors.
"""

from pbs2pc.passes.lower_sparse_binary_linear import LowerSparseBinaryLinear

__all__ = ["LowerSparseBinaryLinear"]
