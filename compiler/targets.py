"""Named target presets: the TVM target dict, the host, the cross compiler and its flags.

Tests and the CLI name presets explicitly (never auto-detect), so ``--target arm`` compiles the same
everywhere. A preset that is designed but not implemented yet says so with one clear error.
"""

from __future__ import annotations

import dataclasses
import shutil

from pbs2pc.errors import Pbs2pcError, ToolchainError, UnsupportedError


@dataclasses.dataclass(frozen=True)
class TargetPreset:
    """Everything pbs2pc needs to build for one kind of device."""

    name: str
    family: str  # "cpu" or "cuda": selects the schedule rules
    target: dict  # the TVM target as a JSON dict
    host: dict | None = None
    cross_compiler: str | None = None  # e.g. "aarch64-linux-gnu-g++"; None: the host's C++ compiler
    description: str = ""
    supported: bool = True
    issue: str = ""  # where an unsupported preset's work is tracked
    #: Target layout of the packed sign/mask planes: the word width the kernels read them as (8 keeps the
    #: interchange uint8 bytes). Applied at compile time by the build's params transform
    #: (:func:`pbs2pc.compiler.build.to_target_layout`); measured in docs/performance.md.
    plane_word_bits: int = 8
    #: Rows per interleaved block of the planes and scales (``[N, C]`` stored as ``[N/T, C, T]``, so the
    #: ``T`` rows a SIMD vector covers are contiguous); 0 keeps the row-major layout. Layers whose N is not a
    #: multiple of T keep it too. Applied by the same params transform (pbs2pc.passes.InterleaveRows).
    plane_interleave: int = 0
    #: Activations of the sparse-binary linear layers: ``"fp32"``, or ``"int8"`` (quantised per scale group:
    #: ``vpermb`` lookup-table GEMV for one row, AVX-512 VNNI GEMM for the prompt; ``pbs2pc compile
    #: --activations int8``). Only presets with ``int8_activations`` accept it.
    activations: str = "fp32"
    int8_activations: bool = False
    #: fp32 linear layers run the hand-written AVX-512 lookup-table kernels where they cover the layer,
    #: instead of the TE kernel: the GEMV (pbs2pc.passes.kernels.sparse_binary_gemv) for one-row calls (the
    #: ``decode`` entry), the GEMM (sparse_binary_gemm) for the prompt's.
    lut_kernels: bool = False
    #: n:m masks whose bytes have at most 32 patterns (6:8, 7:8, ...) are stored as 5-bit pattern codes and
    #: their sign planes as ``sign & mask`` (pbs2pc.passes.kernels.mask_codes, applied by the params
    #: transform): 1.878 instead of 2.25 bits per weight at 6:8, G = 128. Applies with 16-row interleaved byte
    #: planes (plane_word_bits=8, plane_interleave=16), the layout the codes' kernels read; ignored otherwise.
    mask_codes: bool = False
    #: The LM head's table (the tied embedding, or the head's own weight): ``"fp32"`` as exported, or
    #: ``"fp16"`` (``pbs2pc compile --lm-head fp16``): stored rounded to fp16 (half the bytes of the
    #: largest read of a decode step) and read by pbs2pc.passes.kernels.lm_head_fp16 in the one-token
    #: entries. CPU presets only (the kernel is a CPU loop nest).
    lm_head: str = "fp32"

    def __post_init__(self):
        if self.family not in ("cpu", "cuda"):
            raise ValueError(f"unknown family {self.family}")
        if self.plane_word_bits not in (8, 16, 32):
            raise ValueError(f"plane_word_bits must be 8, 16 or 32, got {self.plane_word_bits}")
        if self.activations not in ("fp32", "int8"):
            raise ValueError(f"activations must be fp32 or int8, got {self.activations!r}")
        if self.lm_head not in ("fp32", "fp16"):
            raise ValueError(f"lm_head must be fp32 or fp16, got {self.lm_head!r}")
        if self.plane_interleave < 0:
            raise ValueError(f"plane_interleave must be 0 (off) or a number of rows, got {self.plane_interleave}")

    def tvm_target(self):
        """The ``tvm.target.Target`` of this preset."""
        from pbs2pc.compiler.tvm_compat import Target

        return Target(self.target, host=self.host) if self.host else Target(self.target)

    def require(self) -> "TargetPreset":
        """Raise a clear error unless this preset can be built on this machine."""
        if not self.supported:
            raise UnsupportedError(f"target {self.name!r} is not supported yet ({self.issue}); use --target x86.")
        if self.cross_compiler and shutil.which(self.cross_compiler) is None:
            raise ToolchainError(
                f"the cross compiler {self.cross_compiler} for target {self.name!r} is not installed; "
                "run: apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu"
            )
        return self

    def with_activations(self, activations: str) -> "TargetPreset":
        """This preset with ``activations`` (``"fp32"`` or ``"int8"``), or one clear error."""
        if activations not in ("fp32", "int8"):
            raise Pbs2pcError(f"unknown activation type {activations!r}; choose fp32 or int8.")
        if activations == "int8" and not self.int8_activations:
            raise UnsupportedError(f"target {self.name!r} has no int8-activation kernels; use --activations fp32.")
        return dataclasses.replace(self, activations=activations)

    def with_lm_head(self, dtype: str) -> "TargetPreset":
        """This preset with the LM head's table in ``dtype`` (``"fp32"`` or ``"fp16"``), or one clear error."""
        if dtype not in ("fp32", "fp16"):
            raise Pbs2pcError(f"unknown LM head type {dtype!r}; choose fp32 or fp16.")
        if dtype == "fp16" and self.family != "cpu":
            raise UnsupportedError(f"target {self.name!r} has no fp16 LM head kernel; use --lm-head fp32.")
        return dataclasses.replace(self, lm_head=dtype)


#: x86-64 with AVX-512 (F/BW/VL/VNNI/VBMI/VPOPCNTDQ): the development machine's CPU.
X86 = TargetPreset(
    name="x86",
    family="cpu",
    target={"kind": "llvm", "mcpu": "skylake-avx512", "mattr": ["+avx512vnni", "+avx512vpopcntdq", "+avx512vbmi"]},
    description="x86-64 AVX-512 (Skylake-SP and newer), host C++ compiler",
    plane_word_bits=8,  # with interleaved rows, byte planes beat uint32 words: 1.2-1.35x at M = 1 (docs/performance.md)
    plane_interleave=16,  # 16 rows (the fp32 lanes of a zmm register): word and scale vectors without gathers
    int8_activations=True,  # passes/kernels/sparse_binary_gemv_int8.py (vpermb + vpdpbusd), sparse_binary_gemm_int8.py (VNNI)
    lut_kernels=True,  # vpermps lookup tables: GEMV 1.7x the TE kernel at 11008x4096 M = 1, GEMM 1.5x at M = 128
    mask_codes=True,  # 17 % fewer weight bytes at 6:8; the GEMVs look IM up by code (docs/performance.md)
)

#: 64-bit ARM Linux boards with NEON (and dot-product instructions on newer cores).
ARM = TargetPreset(
    name="arm",
    family="cpu",
    target={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]},
    cross_compiler="aarch64-linux-gnu-g++",
    description="aarch64 Linux, NEON, cross-compiled",
    supported=False,
    issue="the ARM backend and edge bundle are a later issue",
)

#: NVIDIA GPUs; sm_90 (H100/H200) by default, other archs with --arch (e.g. sm_87 for Jetson Orin).
CUDA = TargetPreset(
    name="cuda",
    family="cuda",
    target={"kind": "cuda", "arch": "sm_90", "max_shared_memory_per_block": 49152, "max_threads_per_block": 1024},
    host={"kind": "llvm"},
    description="NVIDIA GPU, sm_90 by default, compiled code (cubin) embedded",
    supported=False,
    issue="the CUDA backend is a later issue",
)

PRESETS: dict[str, TargetPreset] = {p.name: p for p in (X86, ARM, CUDA)}


def get_preset(name: str) -> TargetPreset:
    """The preset called ``name``, or one clear error listing the known ones."""
    if name not in PRESETS:
        raise Pbs2pcError(f"unknown target {name!r}; choose one of: {', '.join(PRESETS)}.")
    return PRESETS[name]
