"""The kernel registry: which kernel runs a pbs2p linear layer, and which weight layout it reads.

Each hand-written kernel is a :class:`KernelEntry` that declares what it needs and what it covers: the
target family and CPU features, the weight layout it reads, the activations, the row counts (one-token
calls or any), and a ``covers`` test on the layer's shape. :func:`select` walks a target's entries in
order and the first that covers the call wins, as dlight picks schedule rules; the TE kernel
(:func:`pbs2pc.passes.kernels.sparse_binary_linear`, scheduled by the family's schedule rules) reads
every layout and is the universal fallback.

The weight layout is data chosen with the kernels: :func:`target_layout` is the layout of the first
entry that serves the target and its options, so the params transform (``pbs2pc.compiler.build``)
re-encodes the weights once for the kernels that read them.

A new target adds a folder of kernels (``x86_avx512/``, ``x86_avx2/``, ``arm_neon/``, ``cuda/``) with
a ``KERNELS`` list, and names it in :data:`KERNEL_FOLDERS`: no branches in the passes.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Layout:
    """How the packed sign/mask planes and the scales are stored for a target's kernels.

    ``word_bits``: the word width the planes are read as (8 keeps the interchange bytes; 16/32 re-type
    them, the same little-endian bits). ``interleave``: rows per interleaved block (``[N, C]`` stored as
    ``[N/T, C, T]``, so the ``T`` rows one SIMD vector covers are contiguous); 0 keeps rows in order.
    ``mask_codes``: n:m masks with at most 32 patterns per byte stored as 5-bit pattern codes (needs
    ``interleave`` = 16 and byte words; see :mod:`pbs2pc.passes.kernels.x86_avx512.mask_codes`).
    """

    word_bits: int = 8
    interleave: int = 0
    mask_codes: bool = False

    def __post_init__(self):
        if self.word_bits not in (8, 16, 32):
            raise ValueError(f"word_bits must be 8, 16 or 32, got {self.word_bits}")
        if self.interleave < 0:
            raise ValueError(f"interleave must be 0 (off) or a number of rows, got {self.interleave}")

    def describe(self) -> str:
        parts = [f"u{self.word_bits} planes"]
        parts.append(f"{self.interleave}-row interleave" if self.interleave else "rows in order")
        if self.mask_codes:
            parts.append("5-bit mask pattern codes")
        return ", ".join(parts)


#: The interchange layout (uint8 planes ``[N, K/8]``, rows in order): what the TE kernel reads by default.
ROW_MAJOR = Layout()


@dataclasses.dataclass(frozen=True)
class Call:
    """One pbs2p linear call as a kernel sees it: the layer's shape, its inputs in the target layout."""

    out_features: int
    in_features: int
    group_size: int
    one_row: bool  # a one-token call (the decode entry); else the prompt's rows (often symbolic)
    interleave: int
    plane_dtype: str
    has_mask: bool
    has_mu: bool
    has_bias: bool
    #: ``(n, m)`` when the mask reaches the kernel as pattern codes (one-row calls on a coded layout).
    coded: tuple[int, int] | None = None
    #: Op contract v2 structure: magnitude groups (``group``, ``group_alpha``, ``group_mu`` in the target
    #: layout), a salient residual (``salient`` ``[1, K/8]``, ``residual`` with ``residual_bytes`` bytes per
    #: row, ``residual_alpha``, ``residual_mu``). A v1 call has neither.
    has_groups: bool = False
    has_residual: bool = False
    residual_bytes: int = 0

    @property
    def structure(self) -> frozenset:
        """The v2 sets the call has: a subset of ``{"groups", "residual"}`` (empty for v1)."""
        return frozenset(name for name, present in (("groups", self.has_groups), ("residual", self.has_residual))
                         if present)


@dataclasses.dataclass(frozen=True)
class KernelEntry:
    """A hand-written kernel and what it needs (see the module docstring)."""

    name: str  # "<folder>.<kernel>", e.g. "x86_avx2.gemv_fp32" (the manifest lists these)
    symbol: str  # the PrimFunc's name prefix in the module, e.g. "sparse_binary_gemv"
    family: str  # "cpu" or "cuda": the preset family it runs on
    isa: str  # the instruction set it is written for, e.g. "x86-avx512"
    features: tuple[str, ...]  # CPU features it executes (``/proc/cpuinfo`` names)
    layout: Layout
    activations: str  # "fp32" or "int8"
    rows: str  # "one": one-token calls only; "any": any number of rows
    covers: Callable[[Call], bool]
    #: ``build(call, **knobs) -> PrimFunc`` (no knobs: the hand-picked defaults) with parameters ``x, sign, [mask], alpha, [mu], [bias], y``, and for an
    #: entry that reads v2, the call's v2 inputs before ``y`` (``[group, group_alpha, group_mu]``,
    #: ``[salient, residual, residual_alpha, residual_mu]``).
    build: Callable[[Call], object]
    #: whether it reads a coded mask as codes (one-row GEMVs); else it reads the expanded planes.
    reads_codes: bool = False
    #: the op contract v2 sets it implements (``"groups"``, ``"residual"``): it is never given a call with
    #: another (a v1 kernel, ``()``, only v1 calls), whatever its ``covers`` says.
    structure: tuple[str, ...] = ()
    #: The tuner's search space for a call: ``knobs(call) -> {knob: candidate values}``, the first value of
    #: each knob the hand-picked default (what ``build(call)`` builds); None: nothing to tune
    #: (:mod:`pbs2pc.compiler.tune`).
    knobs: Callable[[Call], dict] | None = dataclasses.field(default=None, compare=False)

    def serves(self, preset, options) -> bool:
        """Whether the entry runs on ``preset`` and computes what ``options`` ask for (fp32 kernels serve
        int8 options too: they run the calls no int8 kernel covers, exactly)."""
        return (self.family == preset.family and set(self.features) <= set(preset.features)
                and self.activations in (options.activations, "fp32")
                and (options.kernels is None or self.name in options.kernels))

    def accepts(self, call: Call) -> bool:
        return (call.one_row or self.rows == "any") and call.structure <= set(self.structure) and self.covers(call)


#: A ``parallel_min`` (parallel threshold in weights) no layer reaches: the tasks run serially.
SERIAL = 1 << 62


def tile_knob(tiles: int, default: int, choices=(1, 2, 4, 8)) -> tuple:
    """Candidate tiles per task for a layer of ``tiles`` row tiles: ``default`` (as the builder resolves it:
    the largest of it, 2, 1 that divides), then the other ``choices`` that divide ``tiles``."""
    first = next(r for r in (default, 2, 1) if tiles % r == 0)
    return (first, *(r for r in choices if r != first and tiles % r == 0))


def parallel_knob(weights: int, threshold: int) -> tuple:
    """Whether the tasks run in parallel: the default (``weights >= threshold``) first, then the other."""
    default = weights >= threshold
    return (default, not default)


def builder_kwargs(knobs: dict) -> dict:
    """A knob setting as builder keyword arguments: ``parallel`` (a bool) becomes ``parallel_min``."""
    out = dict(knobs)
    if "parallel" in out:
        out["parallel_min"] = 1 if out.pop("parallel") else SERIAL
    return out


#: Folders of hand-written kernels, each a module with a ``KERNELS`` list, in priority order.
KERNEL_FOLDERS = ("pbs2pc.passes.kernels.x86_avx512", "pbs2pc.passes.kernels.x86_avx2",
                  "pbs2pc.passes.kernels.arm_neon", "pbs2pc.passes.kernels.cuda")


def all_kernels() -> list[KernelEntry]:
    """Every registered entry, in priority order."""
    entries = []
    for folder in KERNEL_FOLDERS:
        entries.extend(importlib.import_module(folder).KERNELS)
    return entries


def for_target(preset, options) -> list[KernelEntry]:
    """The entries that serve ``preset`` with ``options``: those of the requested activations first, then
    the fp32 ones, each in priority order."""
    entries = [e for e in all_kernels() if e.serves(preset, options)]
    return sorted(entries, key=lambda e: e.activations != options.activations)


def target_layout(preset, options) -> Layout:
    """The weight layout for ``preset``: ``options.layout`` if given, else the layout of the first entry
    that serves the target (the kernels are chosen together with what they read), else :data:`ROW_MAJOR`."""
    if options.layout is not None:
        return options.layout
    entries = for_target(preset, options)
    return entries[0].layout if entries else ROW_MAJOR


def activations_offered(preset) -> list[str]:
    """The activation types ``preset`` has kernels for: fp32 always (the TE kernel), more with entries."""
    offered = ["fp32"]
    for e in all_kernels():
        if e.family == preset.family and set(e.features) <= set(preset.features) and e.activations not in offered:
            offered.append(e.activations)
    return offered


def select(entries: list[KernelEntry], call: Call) -> tuple[KernelEntry, Call] | None:
    """The first entry of ``entries`` that covers ``call`` (its ``covers`` checks the layout the call's
    inputs arrive in), with the call as that entry sees it (a coded mask as the expanded planes for entries
    that do not read codes); None: the TE kernel runs it."""
    for entry in entries:
        seen = call if entry.reads_codes else dataclasses.replace(call, coded=None)
        if entry.accepts(seen):
            return entry, seen
    return None
