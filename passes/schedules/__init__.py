"""Schedule rules per target family (dlight ``ScheduleRule`` s). ``cpu_rules()`` serves LLVM CPU targets, ``gpu_rules()`` CUDA."""

from .cpu import cpu_rules
from .cpu_fallback import Fallback
from .cpu_matmul import Matmul
from .cpu_pbs2p import SparseBinaryLinear
from .gpu import gpu_rules

#: The schedule rules of each target family (a function returning them in priority order).
SCHEDULE_RULES = {"cpu": cpu_rules, "cuda": gpu_rules}

__all__ = ["SCHEDULE_RULES", "cpu_rules", "gpu_rules", "SparseBinaryLinear", "Matmul", "Fallback"]
