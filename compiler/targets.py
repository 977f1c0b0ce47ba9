"""Named target presets and the user's compile options.

A :class:`TargetPreset` is what pbs2pc builds for: the TVM target (canonical JSON, so presets are
hashable and can key a tuning database), the CPU features the generated code executes, the cross
compiler. Which kernels run and which weight layout they read is not here: it comes from the kernel
registry (:mod:`pbs2pc.passes.kernels.registry`), from the entries whose features the preset has.
:class:`CompileOptions` holds what the user chooses on top (``--activations``, ``--lm-head``).

``--target x86`` means "this machine's best x86 target": :func:`get_preset` resolves it from the host
CPU's features (:mod:`pbs2pc.cpu`). Every other name compiles the same on any machine, so an AVX2
machine can build for ``x86-avx512`` (the library then refuses to load on a CPU without AVX-512).
A preset that is designed but not implemented yet says so with one clear error.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

from pbs2pc.errors import Pbs2pcError, ToolchainError, UnsupportedError

from pbs2pc.cpu import X86_TARGET_FEATURES


def canonical_json(value) -> str:
    """``value`` as JSON with sorted keys and no spaces: equal targets give equal strings."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


@dataclasses.dataclass(frozen=True)
class TargetPreset:
    """Everything pbs2pc needs to build for one kind of device (frozen and hashable)."""

    name: str
    family: str  # "cpu" or "cuda": selects the schedule rules and the registry entries
    isa: str  # the instruction set the kernels are written for: "x86-avx512", "x86-avx2", "aarch64", "cuda"
    target_json: str  # the TVM target, canonical JSON (see :attr:`target`)
    host_json: str | None = None
    #: CPU features the generated code executes (``/proc/cpuinfo`` names); the manifest records them and
    #: the runtime checks them against the host before any kernel runs.
    features: tuple[str, ...] = ()
    machine: str = "x86_64"  # the architecture the library runs on
    cross_compiler: str | None = None  # e.g. "aarch64-linux-gnu-g++"; None: the host's C++ compiler
    cross_flags: tuple[str, ...] = ()  # flags for the cross compiler (the board's CPU), e.g. ("-mcpu=cortex-a76",)
    #: CPUs of the board a cross-compiled preset is for (the parallel loops are sized by it; ``--cores``
    #: overrides it); None: this machine's.
    board_cores: int | None = None
    #: ``--activations`` when the user gives none: int8 where the preset's hand-written kernels are int8 (ARM:
    #: the ``tbl`` GEMVs and ``sdot`` GEMMs; its fp32 calls run the generic TE kernel), fp32 elsewhere.
    default_activations: str = "fp32"
    #: The GPU architecture a CUDA preset's device code is compiled for (``"sm_90"``); None for CPUs.
    gpu_arch: str | None = None
    description: str = ""
    supported: bool = True
    issue: str = ""  # where an unsupported preset's work is tracked

    def __post_init__(self):
        if self.family not in ("cpu", "cuda"):
            raise ValueError(f"unknown family {self.family}")
        json.loads(self.target_json)

    @property
    def target(self) -> dict:
        """The TVM target as a dict."""
        return json.loads(self.target_json)

    @property
    def host(self) -> dict | None:
        return json.loads(self.host_json) if self.host_json else None

    def tvm_target(self):
        """The ``tvm.target.Target`` of this preset."""
        from pbs2pc.compiler.tvm_compat import Target

        return Target(self.target, host=self.host) if self.host else Target(self.target)

    def with_num_cores(self, cores: int) -> "TargetPreset":
        """This preset with the TVM target's ``num-cores`` (the schedules size their parallel loops by it)."""
        return dataclasses.replace(self, target_json=canonical_json({**self.target, "num-cores": int(cores)}))

    def with_arch(self, arch: str) -> "TargetPreset":
        """This CUDA preset for the GPU architecture ``arch`` (one of :data:`CUDA_ARCHS`)."""
        if self.family != "cuda":
            raise Pbs2pcError(f"--arch is for --target cuda; target {self.name!r} is a CPU target.")
        if arch not in CUDA_ARCHS:
            raise Pbs2pcError(f"unknown GPU architecture {arch!r}; choose one of: {', '.join(CUDA_ARCHS)}.")
        return dataclasses.replace(self, gpu_arch=arch, target_json=canonical_json({**self.target, "arch": arch}))

    def require(self) -> "TargetPreset":
        """Raise a clear error unless this preset can be built on this machine."""
        if not self.supported:
            raise UnsupportedError(f"target {self.name!r} is not supported yet ({self.issue}); "
                                   "use --target x86.")
        if self.family == "cuda":
            from pbs2pc.compiler.cuda_export import NVCC_INSTALL, nvcc_path

            if nvcc_path() is None:
                raise ToolchainError(f"--target {self.name} needs nvcc (the CUDA compiler) to compile the GPU code "
                                     f"into the library; {NVCC_INSTALL}.")
        if self.cross_compiler and shutil.which(self.cross_compiler) is None:
            raise ToolchainError(
                f"the cross compiler {self.cross_compiler} for target {self.name!r} is not installed; "
                f"run: {AARCH64_INSTALL}"
            )
        return self


#: ``--lm-head`` choices: the LM head table as exported, in fp16, or in int8 with an fp16 scale per 32 columns.
LM_HEAD_TYPES = ("fp32", "fp16", "int8")


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    """What the user chooses on top of the target (recorded in the manifest beside it).

    ``activations``: ``"fp32"``, or ``"int8"`` (``--activations int8``: the sparse-binary layers quantise
    their inputs per scale group; targets whose registry has int8 kernels). ``lm_head``: ``"fp32"`` as
    exported, ``"fp16"`` (``--lm-head fp16``: the LM head's table stored rounded to fp16) or ``"int8"``
    (``--lm-head int8``: stored as int8 with one fp16 scale per 32 columns, GGUF's Q8_0).
    ``layout`` and ``kernels`` are for experiments and benchmarks: a weight layout instead of the
    registry's choice, and the names of the registry entries allowed (``()``: the TE kernel only);
    ``cuda_graph=False`` leaves CUDA graphs out of a CUDA build (:data:`pbs2pc.compiler.pipeline.FAMILY_PHASES`).
    """

    activations: str = "fp32"
    lm_head: str = "fp32"
    layout: object | None = None  # pbs2pc.passes.kernels.registry.Layout
    kernels: tuple[str, ...] | None = None
    cuda_graph: bool = True

    def __post_init__(self):
        if self.activations not in ("fp32", "int8"):
            raise Pbs2pcError(f"unknown activation type {self.activations!r}; choose fp32 or int8.")
        if self.lm_head not in LM_HEAD_TYPES:
            raise Pbs2pcError(f"unknown LM head type {self.lm_head!r}; choose fp32, fp16 or int8.")

    def check(self, preset: TargetPreset) -> "CompileOptions":
        """These options, or one clear error where ``preset`` has no kernels for them."""
        from pbs2pc.passes.kernels import registry
        from pbs2pc.passes.lower_lm_head import HEAD_KERNEL_FAMILIES

        offered = registry.activations_offered(preset)
        if self.activations not in offered:
            raise UnsupportedError(f"target {preset.name!r} has no {self.activations}-activation kernels; "
                                   f"use --activations {offered[0]}.")
        if self.lm_head != "fp32" and preset.family not in HEAD_KERNEL_FAMILIES:
            raise UnsupportedError(f"target {preset.name!r} has no {self.lm_head} LM head kernel; use --lm-head fp32.")
        return self

    def record(self) -> dict:
        """The manifest's ``options`` entry."""
        out = {"activations": self.activations, "lm_head": self.lm_head}
        if self.layout is not None:
            out["layout"] = dataclasses.asdict(self.layout)
        if self.kernels is not None:
            out["kernels"] = list(self.kernels)
        if not self.cuda_graph:
            out["cuda_graph"] = False
        return out


def _preset(name, family, isa, target, host=None, **kw) -> TargetPreset:
    return TargetPreset(name=name, family=family, isa=isa, target_json=canonical_json(target),
                        host_json=canonical_json(host) if host else None, **kw)


#: x86-64 with AVX-512 (F/BW/CD/DQ/VL/VNNI/VBMI/VPOPCNTDQ): Ice Lake and Sapphire Rapids servers, Zen 4+.
X86_AVX512 = _preset(
    "x86-avx512", "cpu", "x86-avx512",
    {"kind": "llvm", "mcpu": "skylake-avx512", "mattr": ["+avx512vnni", "+avx512vpopcntdq", "+avx512vbmi"]},
    features=X86_TARGET_FEATURES["x86-avx512"],
    description="x86-64 AVX-512 with VNNI and VBMI (Ice Lake-SP, Sapphire Rapids, Zen 4 and newer)",
)

#: x86-64 with AVX2, FMA and F16C (x86-64-v3): Haswell and newer, every Zen, Intel client CPUs.
X86_AVX2 = _preset(
    "x86-avx2", "cpu", "x86-avx2",
    {"kind": "llvm", "mcpu": "haswell", "mattr": ["+avx2", "+fma", "+f16c"]},
    features=X86_TARGET_FEATURES["x86-avx2"],
    description="x86-64 AVX2 + FMA + F16C (Haswell, Zen 1 and newer)",
)

#: The cross toolchain every aarch64 preset links with, and the command that installs it.
AARCH64_CXX = "aarch64-linux-gnu-g++"
AARCH64_INSTALL = "apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu"

#: 64-bit ARM Linux with NEON only (armv8-a: Cortex-A53/A72, Raspberry Pi 3/4): the portable aarch64 build.
ARM = _preset(
    "arm", "cpu", "aarch64",
    {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "generic", "mattr": ["+neon"]},
    features=("asimd",),
    machine="aarch64",
    cross_compiler=AARCH64_CXX,
    cross_flags=("-march=armv8-a",),
    default_activations="int8",
    board_cores=4,
    description="aarch64 Linux, armv8-a NEON (Cortex-A53/A72 and newer), cross-compiled",
)

#: Raspberry Pi 5: 4x Cortex-A76 at 2.4 GHz (armv8.2-a: dot product, fp16 arithmetic).
RPI5 = _preset(
    "rpi5", "cpu", "aarch64",
    {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76",
     "mattr": ["+neon", "+dotprod", "+fullfp16"]},
    features=("asimd", "asimddp", "fphp", "asimdhp"),
    machine="aarch64",
    cross_compiler=AARCH64_CXX,
    cross_flags=("-mcpu=cortex-a76",),
    default_activations="int8",
    board_cores=4,
    description="Raspberry Pi 5 (4x Cortex-A76: NEON, dot product, fp16), cross-compiled",
)

#: Jetson Orin's CPU: Cortex-A78AE (armv8.2-a: dot product, fp16); 6 cores on Orin Nano, 8 on NX, 12 on AGX.
JETSON_ORIN = _preset(
    "jetson-orin", "cpu", "aarch64",
    {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a78ae",
     "mattr": ["+neon", "+dotprod", "+fullfp16"]},
    features=("asimd", "asimddp", "fphp", "asimdhp"),
    machine="aarch64",
    cross_compiler=AARCH64_CXX,
    cross_flags=("-mcpu=cortex-a78ae",),
    default_activations="int8",
    board_cores=6,
    description="Jetson Orin CPU (Cortex-A78AE: NEON, dot product, fp16), cross-compiled",
)

#: GPU architectures ``--arch`` accepts: Ampere (A100 sm_80, RTX 30 sm_86, Jetson Orin sm_87), Ada (sm_89),
#: Hopper (H100/H200 sm_90). sm_80 is the floor: the prompt GEMM uses mma.sync with fp16 inputs.
CUDA_ARCHS = ("sm_80", "sm_86", "sm_87", "sm_89", "sm_90")

#: NVIDIA GPUs; sm_90 (H100/H200) by default, other archs with --arch (e.g. sm_87 for Jetson Orin). The
#: library's device code is a fatbin (SASS for the arch and its PTX) compiled by nvcc at build time
#: (:mod:`pbs2pc.compiler.cuda_export`); the host code is x86-64.
CUDA = _preset(
    "cuda", "cuda", "cuda",
    {"kind": "cuda", "arch": "sm_90", "max_shared_memory_per_block": 49152, "max_threads_per_block": 1024},
    host={"kind": "llvm", "mtriple": "x86_64-linux-gnu"},
    gpu_arch="sm_90",
    description="NVIDIA GPU, sm_90 by default (--arch sm_80/86/87/89), compiled device code (fatbin) embedded",
)

PRESETS: dict[str, TargetPreset] = {p.name: p for p in (X86_AVX512, X86_AVX2, ARM, RPI5, JETSON_ORIN, CUDA)}
#: x86 presets from the best to the most portable: ``--target x86`` takes the first this CPU can run.
X86_PRESETS = (X86_AVX512, X86_AVX2)
#: The names ``--target`` accepts: the presets, and ``x86`` (this machine's best x86 preset).
TARGET_NAMES = ("x86", *PRESETS)


def host_x86_preset() -> TargetPreset:
    """The best x86 preset this machine runs, or one clear error."""
    from pbs2pc import cpu

    arch = cpu.architecture()
    if arch != "x86_64":
        raise Pbs2pcError(f"--target x86 means this machine's best x86 target, but this machine is {arch}; "
                          f"name one: {', '.join(p.name for p in X86_PRESETS)}.")
    for preset in X86_PRESETS:
        if not cpu.missing(preset.features):
            return preset
    lacking = cpu.missing(X86_AVX2.features)
    raise UnsupportedError(f"this CPU ({cpu.model_name()}) lacks {', '.join(lacking)}, which every pbs2pc x86 "
                           "target needs (x86-64-v3: AVX2, FMA, F16C); use a newer x86 machine.")


def explain_host_choice(preset: TargetPreset) -> str:
    """One line saying why ``--target x86`` chose ``preset`` on this machine."""
    from pbs2pc import cpu

    names = [p.name for p in X86_PRESETS]
    better = X86_PRESETS[: names.index(preset.name)] if preset.name in names else ()
    why = "".join(f"; not {p.name}: no {', '.join(cpu.missing(p.features)[:3])}" for p in better)
    return f"target x86 -> {preset.name} ({cpu.model_name()}{why})"


def get_preset(name: str, num_cores: int | None = None, arch: str | None = None) -> TargetPreset:
    """The preset called ``name`` (``x86``: this machine's best x86 preset), or one clear error listing the
    known ones. LLVM (CPU) targets get ``num-cores``: ``num_cores``, else the board's (a cross-compiled
    preset's ``board_cores``), else this machine's CPUs. ``arch``: a CUDA preset's GPU architecture
    (:meth:`TargetPreset.with_arch`)."""
    if name == "x86":
        preset = host_x86_preset()
    elif name in PRESETS:
        preset = PRESETS[name]
    else:
        raise Pbs2pcError(f"unknown target {name!r}; choose one of: {', '.join(TARGET_NAMES)}.")
    if preset.target.get("kind") == "llvm":
        from pbs2pc.cpu import cpu_threads

        preset = preset.with_num_cores(num_cores or preset.board_cores or cpu_threads())
    if arch is not None:
        preset = preset.with_arch(arch)
    return preset
