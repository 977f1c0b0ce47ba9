"""Schedule rules per target family (dlight ``ScheduleRule`` s). ``cpu_rules()`` serves LLVM CPU targets."""

from .cpu import cpu_rules
from .cpu_fallback import Fallback
from .cpu_matmul import Matmul
from .cpu_pbs2p import SparseBinaryLinear

__all__ = ["cpu_rules", "SparseBinaryLinear", "Matmul", "Fallback"]
