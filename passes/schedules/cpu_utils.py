"""Helpers shared by the CPU schedule rules: target facts, block analysis and epilogue handling.

Nothing here schedules a whole function; the rules in ``cpu_pbs2p``, ``cpu_matmul`` and ``cpu_fallback``
compose these pieces. Target facts (vector width, register count) come from the target so the same rules
serve x86 (AVX-512, AVX2) and AArch64 (NEON) without per-target branches in the rules themselves.
"""

from __future__ import annotations

import functools
import logging

from pbs2pc.compiler.tvm_compat import Target, s_tir, tirx
from pbs2pc.compiler.tvm_compat import llvm_get_vector_width

SBlockRV = s_tir.schedule.SBlockRV
logger = logging.getLogger("pbs2pc.passes.schedules")


def declines_on_error(apply):
    """Make a rule's ``apply`` return None (the next rule tries) instead of raising.

    A schedule primitive refusing an unforeseen IR shape must not abort a whole-model compile: the
    function then falls through to the next rule (ultimately the fallback), correct if slower. The
    refusal is logged at debug level with the function's name hint for whoever tunes the rules.
    """

    @functools.wraps(apply)
    def wrapper(self, func, target, tunable):
        try:
            return apply(self, func, target, tunable)
        except Exception as err:  # noqa: BLE001 - TVM raises ScheduleError and TVMError subclasses
            name = func.attrs.get("global_symbol", "?") if getattr(func, "attrs", None) is not None else "?"
            logger.debug("%s declined %s: %s", type(self).__name__, name, str(err).splitlines()[-1:])
            return None

    return wrapper


# --------------------------------------------------------------------------------------------------------
# Target facts


def is_llvm_cpu(target: Target) -> bool:
    """True for LLVM CPU targets (x86, AArch64, ...), the only kind these rules schedule."""
    return target is not None and target.kind.name == "llvm"


def vector_lanes(target: Target, dtype_bits: int = 32) -> int:
    """SIMD lanes for ``dtype_bits``-wide elements: 16 fp32 lanes on AVX-512, 8 on AVX2, 4 on NEON."""
    bits = int(llvm_get_vector_width(target))
    if bits <= 0:
        bits = 128
    return max(bits // dtype_bits, 1)


def num_cores(target: Target) -> int:
    """Cores the target preset declares (``num-cores``), 1 when it does not say."""
    return max(int(target.attrs.get("num-cores", 1) or 1), 1)


def vector_registers(target: Target) -> int:
    """Architectural SIMD registers: 32 on AVX-512 and AArch64, 16 on AVX2/SSE."""
    if int(llvm_get_vector_width(target)) >= 512:
        return 32
    triple = str(target.attrs.get("mtriple", ""))
    if triple.startswith(("aarch64", "arm64")):
        return 32
    return 16


#: Scope for small scratch tiles (accumulators, gathered bit-plane words). TVM's LowerTVMBuiltin keeps a
#: CPU allocation on the stack only if its scope is "global" and it is under ``MAX_STACK_BYTES``
#: (``runtime::kMaxStackAlloca``); "local" or larger ones become heap workspaces. LLVM keeps a stack
#: tile in registers, but must assume a workspace pointer may alias the packed operands and then
#: stores every accumulator back on every k step (measured: 2.5x slower GEMM).
SCRATCH = "global"
MAX_STACK_BYTES = 1024


def micro_kernel(lanes: int, registers: int, dtype_bytes: int = 4) -> tuple[int, int]:
    """``(tile_m, n_vec)`` of a register-tiled GEMM micro-kernel: tile_m rows x n_vec vectors.

    Accumulators plus ``n_vec`` operand vectors and one broadcast must fit the register file, and the
    accumulator tile must stay a stack alloca (see :data:`MAX_STACK_BYTES`). AVX-512: 3 x 4 zmm;
    AVX2: 6 x 2 ymm; NEON: 6 x 4 q registers.
    """
    n_vec = 4 if registers >= 32 else 2
    budget = min(registers - n_vec - 2, (MAX_STACK_BYTES - 1) // (lanes * dtype_bytes))
    return max(1, min(8, budget // n_vec)), n_vec


# --------------------------------------------------------------------------------------------------------
# Block analysis


def const_int(expr):
    """The Python int of a constant extent, or None when it is symbolic."""
    return int(expr.value) if isinstance(expr, tirx.IntImm) else None


def loop_extent(sch: s_tir.Schedule, loop) -> int | None:
    """Constant extent of a loop, or None when symbolic."""
    return const_int(sch.get(loop).extent)


def iter_kinds(sch: s_tir.Schedule, block: SBlockRV) -> str:
    """Iteration kinds of a block as a string: ``"SSR"`` for a matmul, ``"SS"`` for an elementwise op."""
    kinds = {tirx.IterVar.DataPar: "S", tirx.IterVar.CommReduce: "R"}
    return "".join(kinds.get(iv.iter_type, "O") for iv in sch.get(block).iter_vars)


def region_vars(region) -> list:
    """Index expressions of a read/write region (point accesses only), else None."""
    out = []
    for rng in region.region:
        if const_int(rng.extent) != 1:
            return None
        out.append(rng.min)
    return out


def is_var(expr, var) -> bool:
    """Whether ``expr`` is exactly the variable ``var``."""
    return isinstance(expr, tirx.Var) and expr.same_as(var)


def blocks_in_order(sch: s_tir.Schedule) -> list[SBlockRV]:
    """All blocks under the root, in program order."""
    root = sch.get_sblock(sch.mod["main"].body.block.name_hint)
    return list(sch.get_child_blocks(root))


# --------------------------------------------------------------------------------------------------------
# Prologues and epilogues


def inline_prologues(sch: s_tir.Schedule, blocks: list[SBlockRV]) -> list[SBlockRV]:
    """``compute_inline`` injective producers (reshapes, casts); return those that refused."""
    left = []
    for block in blocks:
        try:
            sch.compute_inline(block)
        except Exception:  # noqa: BLE001 - TVM raises ScheduleError subclasses; refusal is an answer
            left.append(block)
    return left


def inline_epilogues(sch: s_tir.Schedule, blocks: list[SBlockRV]) -> list[SBlockRV]:
    """Fold a chain of injective consumers into as few blocks as possible.

    Consumers that feed other consumers are ``compute_inline``-d into them (``silu`` = ``x *
    sigmoid(x)`` becomes one block), then the survivors are ``reverse_compute_inline``-d into the
    producer where possible. Returns the blocks still standing, in program order.
    """
    blocks = list(blocks)
    progress = True
    while progress and blocks:
        progress = False
        for fn in (sch.compute_inline, sch.reverse_compute_inline):
            for idx, block in enumerate(blocks):
                try:
                    fn(block)
                except Exception:  # noqa: BLE001
                    continue
                blocks.pop(idx)
                progress = True
                break
            if progress:
                break
    return blocks


def attach_epilogues(sch: s_tir.Schedule, blocks: list[SBlockRV], loop, lanes: int) -> None:
    """``reverse_compute_at`` leftover epilogues under ``loop`` and vectorize their innermost loop.

    An epilogue that cannot move stays at the root: correct, only unfused.
    """
    for block in blocks:
        try:
            sch.reverse_compute_at(block, loop, preserve_unit_loops=True)
        except Exception:  # noqa: BLE001
            continue
        vectorize_innermost(sch, block, lanes)


def vectorize_innermost(sch: s_tir.Schedule, block: SBlockRV, lanes: int) -> None:
    """Vectorize a block's innermost loop when it has a constant extent that ``lanes`` tiles."""
    loops = sch.get_loops(block)
    if not loops:
        return
    inner = loops[-1]
    extent = loop_extent(sch, inner)
    if extent is None or extent < 2:
        return
    if extent > lanes and extent % lanes == 0:
        inner = sch.split(inner, [None, lanes])[-1]
    elif extent > lanes:
        return
    try:
        sch.vectorize(inner)
    except Exception:  # noqa: BLE001 - e.g. the loop carries a reduction; leave it scalar
        pass


def pick_tile(extent: int, candidates) -> int | None:
    """The first candidate tile that divides ``extent``."""
    for tile in candidates:
        if tile <= extent and extent % tile == 0:
            return tile
    return None
