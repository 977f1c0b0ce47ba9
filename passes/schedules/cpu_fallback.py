"""Fallback CPU schedule rule: parallel outer loops and vectorized inner loops for everything else.

Runs last (after the pbs2p, matmul, GEMV and reduction rules), on injective functions (embedding
gather, rotary, residual adds, casts, reshapes) and on reductions the earlier rules declined. Per
block left after inlining: fuse the leading spatial loops into one parallel loop and vectorize the
innermost loop when it is spatial, constant and a multiple of the vector width. A reduction loop is
never parallelised or vectorised, so the rule is always legal; small functions stay serial because a
parallel launch costs more than it saves.
"""

from __future__ import annotations

from pbs2pc.compiler.tvm_compat import dlight, get_sblock_realize, s_tir, tirx

from . import cpu_utils as cu

#: Below this many iterations of a loop nest a parallel launch (a few microseconds) is not worth it.
MIN_PARALLEL_WORK = 1 << 14


class Fallback(dlight.ScheduleRule):
    """Parallelise and vectorize any remaining loop nest; None only when nothing can be scheduled."""

    @cu.declines_on_error
    def apply(self, func: tirx.PrimFunc, target, tunable: bool):  # noqa: D102 - dlight contract
        if not isinstance(func, tirx.PrimFunc) or not cu.is_llvm_cpu(target):
            return None
        sch = s_tir.Schedule(func)
        try:
            blocks = cu.blocks_in_order(sch)
        except Exception:  # noqa: BLE001 - no root block (already lowered): leave it alone
            return None
        if not blocks or any("O" in cu.iter_kinds(sch, b) for b in blocks):
            return None
        # Inline injective intermediates so each output is one loop nest (no temporaries).
        remaining = cu.inline_epilogues(sch, [b for b in blocks if "R" not in cu.iter_kinds(sch, b)])
        keep = {sch.get(b).name_hint for b in remaining}
        blocks = [b for b in cu.blocks_in_order(sch) if "R" in cu.iter_kinds(sch, b) or sch.get(b).name_hint in keep]
        lanes = cu.vector_lanes(target)
        for block in blocks:
            self._schedule_block(sch, block, lanes)
        return sch

    @staticmethod
    def _schedule_block(sch: s_tir.Schedule, block, lanes: int) -> None:
        loops = sch.get_loops(block)
        kinds = _loop_kinds(sch, block, loops)
        if kinds is None or not loops:
            return
        n_spatial = len(kinds) - len(kinds.lstrip("S"))
        if n_spatial == 0:
            return
        spatial = list(loops[:n_spatial])
        inner = spatial[-1]
        inner_ext = cu.loop_extent(sch, inner)
        vec = None
        if n_spatial == len(loops) and inner_ext is not None and inner_ext % lanes == 0:
            # Innermost contiguous loop: split off one vector; LLVM emits it as SIMD.
            spatial[-1], vec = sch.split(inner, [None, lanes])
        work = _static_work(sch, spatial)
        if work is None or work >= MIN_PARALLEL_WORK // lanes:
            outer = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
            sch.parallel(outer)
        if vec is not None:
            sch.vectorize(vec)


def _loop_kinds(sch: s_tir.Schedule, block, loops) -> str | None:
    """Kind of each loop ("S"/"R"), read off the block bindings; None if a loop is not bound 1:1."""
    binding = list(zip(sch.get(block).iter_vars, get_sblock_realize(sch, block).iter_values))
    kinds = []
    for loop in loops:
        var = sch.get(loop).loop_var
        kind = None
        for iv, value in binding:
            if isinstance(value, tirx.Var) and value.same_as(var):
                kind = "S" if iv.iter_type == tirx.IterVar.DataPar else "R"
        if kind is None:
            # A unit loop, or a loop feeding a composite binding: treat conservatively.
            if cu.loop_extent(sch, loop) == 1:
                kind = "S"
            else:
                return None
        kinds.append(kind)
    return "".join(kinds)


def _static_work(sch: s_tir.Schedule, loops) -> int | None:
    """Product of constant loop extents; None when any is symbolic (then assume it is large)."""
    work = 1
    for loop in loops:
        ext = cu.loop_extent(sch, loop)
        if ext is None:
            return None
        work *= ext
    return work
