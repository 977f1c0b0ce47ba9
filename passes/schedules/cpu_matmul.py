"""CPU schedule rule for dense matmul / batch matmul PrimFuncs produced by Relax legalization.

Matches a function with exactly one reduction block of the form ``C[S, I, J] += A[S, I, K] * B[S, J, K]``
up to axis order and transposes (``R.matmul`` with or without ``permute_dims``, attention's batched
``q @ kᵀ`` and ``p @ v``), with injective producers and epilogues (bias add, scale, SiLU) fused around it.

* **GEMM** (I present): a reindex normalisation (dlight's, except that an axis one operand broadcasts
  becomes a batch axis rather than part of I or J: see :func:`_gemm_index_maps`) turns the block into
  the canonical form above; then, per ``tile_n`` columns of one batch, ``B`` is packed into a local
  k-major tile (contiguous along J), and a register-tiled micro-kernel (``tile_m`` x ``micro_n``
  accumulators, FMAs with a broadcast of A) runs over I. Symbolic or ragged I/J are padded with
  ``pad_einsum`` so the inner loops carry no bounds checks. Parallel over (batch, column tiles);
  broadcast batch axes (grouped-query attention's ``rep``) run serially inside a task.
* **GEMV** (I absent, e.g. decode-time ``[1, 1, K] x [K, N]``): with J contiguous in B, each task
  streams wide strips of B's rows, ``k_unroll`` rows per pass, vectorised along J; with K contiguous
  (``x @ Wᵀ``, the tied LM head after FuseTransposeMatmul), ``rfactor`` gives per-row vector partial
  sums over K for a few rows at a time. Parallel over column strips / row tiles.

Returns None for anything else (the next rules in ``cpu_rules()`` take over).
"""

from __future__ import annotations

import dataclasses

from pbs2pc.compiler.tvm_compat import MatmulIterKind, dlight, matmul_iter_traits, s_tir, tirx

from . import cpu_utils as cu


def _reduction_block(sch: s_tir.Schedule):
    """The single reduction block, or None when there are zero or several (or opaque blocks)."""
    found = None
    for block in cu.blocks_in_order(sch):
        kinds = cu.iter_kinds(sch, block)
        if "O" in kinds:
            return None
        if "R" in kinds:
            if found is not None:
                return None
            found = block
    return found


def _gemm_index_maps(block):
    """Index maps normalising ``block`` to ``C[S.., I, J] += A[S.., I, K] * B[S.., J, K]``.

    Like dlight's ``get_index_map``, except that I and J are each **one** original axis. dlight fuses every
    axis found in A and C only into I (likewise J), so a batch axis that one operand broadcasts - the
    ``rep`` axis of grouped-query attention, ``[B, KV, rep, S, D] @ [B, KV, 1, D, S]`` - becomes part of
    I = rep * S. A row tile of that fused axis is not a box of the original axes when ``tile_m`` does not
    divide S (symbolic S: almost never), and the region analysis behind ``compute_at`` /
    ``reverse_compute_at`` then widens the A copy and the writeback to the bounding box: the writeback
    stores rows of other tiles from outside the accumulator tile (wrong results, stack/heap overruns).

    Here such extra axes become batch axes of their own: ``R`` (in A and C, broadcast in B) and ``C`` (in
    B and C, broadcast in A), giving ``C[S, R, C, I, J] += A[S, R, I, K] * B[S, C, J, K]`` (R and C only
    when present, so ordinary matmuls keep dlight's exact form). Every access stays a plain einsum (what
    ``pad_einsum`` needs), every tile sits at one point of the batch axes (exact regions), and only the
    innermost I and J axes are tiled. K may stay fused: it is never tiled. Returns ``(block_map, a_map,
    b_map, c_map, batch)`` with ``batch`` the labels of the leading block axes (``["S", "R"]`` for GQA),
    or None when the block is not a GEMM.
    """
    traits = matmul_iter_traits(block)
    if traits is None:
        return None
    a_traits, b_traits, c_traits, block_traits = traits  # the lists share one IterTrait per block axis
    kinds = {MatmulIterKind.kIter_S: "S", MatmulIterKind.kIter_I: "I", MatmulIterKind.kIter_J: "J",
             MatmulIterKind.kIter_K: "K"}
    label = {id(t): kinds.get(t.kind) for t in block_traits}  # None: a unit axis, dropped
    for kind, extra in (("I", "R"), ("J", "C")):
        for trait in [t for t in block_traits if label[id(t)] == kind][:-1]:
            label[id(trait)] = extra
    present = set(label.values())
    batch = ["S"] + [g for g in ("R", "C") if g in present]

    def fuse(trait_list, order):
        order = [g for g in order if g in ("S", "I", "J", "K") or g in present]
        fused, inputs = {}, []
        for n, trait in enumerate(trait_list):
            var = tirx.Var(f"i{n}", trait.extent.ty)
            inputs.append(var)
            group = label[id(trait)]
            if group is not None:
                fused[group] = fused[group] * trait.extent + var if group in fused else var
        zero = tirx.IntImm(trait_list[0].extent.ty, 0)
        return tirx.IndexMap(inputs, [fused.get(g, zero) for g in order], None)

    return (fuse(block_traits, batch + ["I", "J", "K"]), fuse(a_traits, ["S", "R", "I", "K"]),
            fuse(b_traits, ["S", "C", "J", "K"]), fuse(c_traits, batch + ["I", "J"]), batch)


def _producer_of(sch: s_tir.Schedule, block, buffer):
    """The block among ``block``'s producers that writes ``buffer`` (None for a function input)."""
    for prod in sch.get_producers(block):
        if any(w.source.same_as(buffer) for w in sch.get(prod).writes):
            return prod
    return None


def _inline_producers(sch: s_tir.Schedule, block) -> None:
    """Inline every injective producer chain into ``block`` (transposes, casts, reindex copies)."""
    progress = True
    while progress:
        progress = False
        for prod in sch.get_producers(block):
            try:
                sch.compute_inline(prod)
                progress = True
            except Exception:  # noqa: BLE001 - refusal is an answer
                continue


class Matmul(dlight.ScheduleRule):
    """Register-tiled, packed GEMM and streaming GEMV for LLVM CPUs."""

    @cu.declines_on_error
    def apply(self, func: tirx.PrimFunc, target, tunable: bool):  # noqa: D102 - dlight contract
        if not isinstance(func, tirx.PrimFunc) or not cu.is_llvm_cpu(target):
            return None
        sch = s_tir.Schedule(func)
        main = _reduction_block(sch)
        if main is None:
            return None
        stmt = sch.get(main)
        if len(stmt.reads) != 2 or len(stmt.writes) != 1 or str(stmt.writes[0].source.dtype) != "float32":
            return None
        if not isinstance(stmt.body, tirx.BufferStore) or not isinstance(stmt.body.value, tirx.Add):
            return None
        _inline_producers(sch, main)
        lanes = cu.vector_lanes(target)
        maps = _gemm_index_maps(sch.get(main))
        if maps is not None:
            return self._gemm(sch, main, maps, lanes, cu.vector_registers(target))
        return self._gemv(sch, main, lanes)

    # ----------------------------------------------------------------------------------------------
    @staticmethod
    def _gemm(sch: s_tir.Schedule, main, maps, lanes: int, registers: int):
        ra = sch.reindex(main, ("read", 0))
        rb = sch.reindex(main, ("read", 1))
        rc = sch.reindex(main, ("write", 0))
        block_map, a_map, b_map, c_map, batch_labels = maps
        sch.transform_layout(ra, ("write", 0), a_map)
        sch.transform_layout(rb, ("write", 0), b_map)
        sch.transform_layout(rc, ("read", 0), c_map)
        sch.transform_block_layout(main, block_map)

        tile_m, n_vec = cu.micro_kernel(lanes, registers)
        micro_n = n_vec * lanes
        *_, i_ext, j_ext, _ = (iv.dom.extent for iv in sch.get(main).iter_vars)
        n_batch = len(batch_labels)  # S, then R and/or C when present
        i_ext, j_ext = cu.const_int(i_ext), cu.const_int(j_ext)
        if j_ext is not None and j_ext < micro_n:
            micro_n = tile_n = j_ext if j_ext % lanes == 0 else None
            if tile_n is None:
                return None
        else:
            tile_n = 64 if micro_n <= 64 else micro_n
        if i_ext is not None and i_ext < tile_m:
            tile_m = i_ext
        pad_i = i_ext is None or i_ext % tile_m != 0
        pad_j = j_ext is None or j_ext % tile_n != 0
        if pad_i or pad_j:
            sch.pad_einsum(main, [1] * n_batch + [tile_m if pad_i else 1, tile_n if pad_j else 1, 1])

        stmt = sch.get(main)
        a_pack = _producer_of(sch, main, stmt.reads[0].source)
        b_pack = _producer_of(sch, main, stmt.reads[1].source)
        for pack in (a_pack, b_pack):
            _inline_producers(sch, pack)
        writeback = sch.get_consumers(main)[0]

        *batch, i, j, k = sch.get_loops(main)
        loop_of = dict(zip(batch_labels, batch))
        j_tile, j_in = sch.split(j, [None, tile_n])
        i_tile, i_in = sch.split(i, [None, tile_m])
        j_blk, j_vec = sch.split(j_in, [None, micro_n])
        # Parallel over (S, column tiles); the broadcast batch axes run serially inside a task (C, then R):
        # the packed B tile is reused across R, and no tile index needs a division by a symbolic extent
        # (LLVM cannot hoist one out of the guarded writeback, and then scatters the stores lane by lane).
        inner_batch = [loop_of[g] for g in ("C", "R") if g in loop_of]
        sch.reorder(loop_of["S"], j_tile, *inner_batch, i_tile, j_blk, k, i_in, j_vec)
        outer = sch.fuse(loop_of["S"], j_tile)

        # The output tile lives in registers; writeback (+ fused epilogues) runs per micro-tile.
        # Epilogues are inlined into the writeback *before* it moves under the tile loops: once there it
        # carries the predicate that drops padded rows/columns, and reverse_compute_inline rebuilds a
        # block's predicate from the consumer's domain alone, so inlining afterwards loses that guard
        # whenever the batch axes are symbolic (padding rows stored past the output: heap corruption).
        sch.set_scope(main, 0, cu.SCRATCH)
        leftover = cu.inline_epilogues(sch, _consumer_chain(sch, writeback))
        sch.reverse_compute_at(writeback, j_blk, preserve_unit_loops=True)
        cu.attach_epilogues(sch, leftover, j_blk, lanes)
        cu.vectorize_innermost(sch, writeback, lanes)

        # A: read in place unless padding made a copy; then copy one row tile per i_tile.
        if pad_i:
            sch.compute_at(a_pack, i_tile, preserve_unit_loops=True)
            cu.vectorize_innermost(sch, a_pack, lanes)
        else:
            sch.compute_inline(a_pack)
        # B: pack one k-major column tile per parallel task (per C point when B has a C axis), contiguous
        # loads in the micro-kernel.
        sch.transform_layout(b_pack, ("write", 0), lambda *idx: (*idx[:-2], idx[-1], idx[-2]))
        sch.compute_at(b_pack, loop_of.get("C", outer), preserve_unit_loops=True)
        jj, kk = sch.get_loops(b_pack)[-2:]
        sch.reorder(kk, jj)
        cu.vectorize_innermost(sch, b_pack, lanes)

        sch.unroll(i_in)
        sch.vectorize(j_vec)
        sch.parallel(outer)
        init = sch.decompose_reduction(main, k)
        cu.vectorize_innermost(sch, init, micro_n)
        return sch

    # ----------------------------------------------------------------------------------------------
    @staticmethod
    def _gemv(sch: s_tir.Schedule, main, lanes: int):
        """Matrix-vector product (no I axis): dispatch on which axis of B is contiguous."""
        found = _gemv_dims(sch, main)
        if found is None:
            return None
        dims, contiguous = found
        return (_gemv_outer if contiguous == "J" else _gemv_inner)(sch, main, dims, lanes)


def _gemv_dims(sch: s_tir.Schedule, main):
    """``(dims, "J" or "K")`` of a matrix-vector block ``C[.., j] += A[.., k] * B[..]``, with B's contiguous
    axis; None when the block is not one."""
    stmt = sch.get(main)
    a_idx, b_idx, c_idx = (cu.region_vars(r) for r in (stmt.reads[0], stmt.reads[1], stmt.writes[0]))
    iters = list(stmt.iter_vars)
    loops = sch.get_loops(main)
    k_pos = [n for n, iv in enumerate(iters) if iv.iter_type == tirx.IterVar.CommReduce]
    if not (a_idx and b_idx and c_idx) or len(loops) != len(iters) or len(k_pos) != 1:
        return None
    j_var, k_var = c_idx[-1], iters[k_pos[0]].var
    j_pos = next((n for n, iv in enumerate(iters) if cu.is_var(j_var, iv.var)), None)
    if j_pos is None or not cu.is_var(a_idx[-1], k_var):
        return None
    dims = _GemvDims(loops, j_pos, k_pos[0], cu.const_int(iters[j_pos].dom.extent),
                     cu.const_int(iters[k_pos[0]].dom.extent))
    if cu.is_var(b_idx[-1], j_var):
        return dims, "J"
    if cu.is_var(b_idx[-1], k_var):
        return dims, "K"
    return None


@dataclasses.dataclass
class _GemvDims:
    loops: list
    j_pos: int
    k_pos: int
    j_ext: int | None
    k_ext: int | None

    def others(self):
        return [lp for n, lp in enumerate(self.loops) if n not in (self.j_pos, self.k_pos)]


def _gemv_outer(sch: s_tir.Schedule, main, dims: _GemvDims, lanes: int, tasks: int = 8, k_unroll: int = 8):
    """``C[j] += A[k] * B[k, j]``: stream rows of B, vectorised along J.

    Each of about ``tasks`` parallel tasks owns a wide strip of J, so every row of B is read in long
    contiguous runs the hardware prefetcher can follow, and ``k_unroll`` rows of B are combined per pass
    over the strip so the accumulator strip (L1/L2) is loaded and stored once per ``k_unroll`` rows.
    Measured on [576] x [576, 49152], one core: 4 KB strips one row at a time 13.7 ms; 8 strips x 8
    rows 4.4 ms (torch 4.2 ms).
    """
    if dims.j_ext is None:
        return None
    micro_n = cu.pick_tile(dims.j_ext, [4 * lanes, 2 * lanes, lanes, lanes // 2, lanes // 4])
    if micro_n is None or micro_n < 4:
        return None
    fits = [d for d in range(micro_n, dims.j_ext // tasks + 1, micro_n) if dims.j_ext % d == 0]
    strip = max(fits) if fits else micro_n
    k_unroll = k_unroll if dims.k_ext is not None and dims.k_ext % k_unroll == 0 else 1
    epilogues = sch.get_consumers(main)
    j_tile, j_blk, j_vec = sch.split(dims.loops[dims.j_pos], [None, strip // micro_n, micro_n])
    k_out, k_in = sch.split(dims.loops[dims.k_pos], [None, k_unroll])
    sch.reorder(*dims.others(), j_tile, k_out, j_blk, k_in, j_vec)
    outer = sch.fuse(*dims.others(), j_tile)
    acc = sch.cache_write(main, 0, cu.SCRATCH)
    sch.reverse_compute_at(acc, outer, preserve_unit_loops=True)
    cu.attach_epilogues(sch, cu.inline_epilogues(sch, epilogues), outer, lanes)
    cu.vectorize_innermost(sch, acc, lanes)
    sch.unroll(k_in)
    sch.vectorize(j_vec)
    sch.parallel(outer)
    init = sch.decompose_reduction(main, k_out)
    cu.vectorize_innermost(sch, init, micro_n)
    return sch


#: Rows of B per tile of ``x @ Wᵀ`` (the first that divides J): the default of :func:`_gemv_inner`.
GEMV_INNER_ROWS = (16, 8, 4, 2, 1)


def _gemv_inner_defaults(j_ext: int, k_ext: int, lanes: int) -> tuple[int, bool]:
    """The rule's own ``(rows, unroll_k)`` for :func:`_gemv_inner` (the knobs' first values): the first of
    :data:`GEMV_INNER_ROWS` that divides J, and K unrolled where it is 64 vectors or fewer."""
    return cu.pick_tile(j_ext, GEMV_INNER_ROWS), k_ext // lanes <= 64


def gemv_inner_knobs(j_ext: int, k_ext: int, lanes: int) -> dict:
    """The tuner's search space for :func:`_gemv_inner` on a ``[J, K]`` operand (the fp32 LM head's
    table; :mod:`pbs2pc.passes.kernels.lm_head_fp32`), the rule's defaults first: ``rows`` of B per tile
    (their partial sums side by side), ``k_lanes`` (the K elements each row's partial sums span: one
    vector, or two or four, more independent FMA chains per row), ``unroll_k`` (the K loop unrolled).
    Settings whose partial sums outgrow a stack tile (:data:`cpu_utils.MAX_STACK_BYTES`) get a heap
    workspace and measure slow: the search drops them."""
    default_rows, default_unroll = _gemv_inner_defaults(j_ext, k_ext, lanes)
    return {"rows": tuple(dict.fromkeys(r for r in (default_rows, 8, 4, 16, 12, 2, 32) if j_ext % r == 0)),
            "k_lanes": tuple(w * lanes for w in (1, 2, 4) if k_ext % (w * lanes) == 0),
            "unroll_k": (default_unroll, not default_unroll)}


def gemv_inner(func: tirx.PrimFunc, lanes: int, rows: int | None = None, k_lanes: int | None = None,
               unroll_k: bool | None = None) -> tirx.PrimFunc:
    """``func`` (one reduction block ``C[.., j] += A[.., k] * B[j, k]``) scheduled by :func:`_gemv_inner`
    with these knobs (None: the rule's defaults), marked scheduled: how the tuner builds the fp32 LM head."""
    sch = s_tir.Schedule(func)
    main = _reduction_block(sch)
    found = _gemv_dims(sch, main) if main is not None else None
    if found is None or found[1] != "K":
        raise ValueError("the x @ W^T GEMV schedule does not apply to this function")
    dims = found[0]
    if dims.k_ext is None or dims.k_ext % (k_lanes or lanes) or (rows and dims.j_ext % rows):
        raise ValueError(f"the x @ W^T GEMV schedule cannot take {rows} rows, {k_lanes} lanes at J={dims.j_ext}, "
                         f"K={dims.k_ext}")
    if _gemv_inner(sch, main, dims, lanes, rows, k_lanes, unroll_k) is None:
        raise ValueError(f"the x @ W^T GEMV schedule does not apply at J={dims.j_ext}, K={dims.k_ext}")
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _gemv_inner(sch: s_tir.Schedule, main, dims: _GemvDims, lanes: int, rows: int | None = None,
                k_lanes: int | None = None, unroll_k: bool | None = None):
    """``C[j] += A[k] * B[j, k]``: dot products vectorised along K, a few rows of B per A load.

    ``rfactor`` splits the reduction into ``lanes`` partial sums per row (vector FMAs); the final
    horizontal sum and any epilogue run per tile of rows, so partials stay in a stack tile. Sixteen rows
    per tile keep 16 zmm accumulators busy per load of A: measured on the tied LM head
    ``[1, 576] x [49152, 576]ᵀ``, 2 threads: 4 rows 9.9 ms, 8 rows 7.5 ms, 16 rows 6.1 ms, 32 rows
    6.3 ms (torch fp32 10.3 ms in the same run). ``rows``, ``k_lanes`` (K elements per row's partial
    sums, a multiple of ``lanes``), ``unroll_k``: the tuner's knobs (:func:`gemv_inner_knobs`), None the
    defaults above.
    """
    k_lanes = k_lanes or lanes
    if dims.j_ext is None or dims.k_ext is None or dims.k_ext % k_lanes:
        return None
    default_rows, default_unroll = _gemv_inner_defaults(dims.j_ext, dims.k_ext, lanes)
    rows = rows or default_rows
    epilogues = sch.get_consumers(main)
    j_tile, j_row = sch.split(dims.loops[dims.j_pos], [None, rows])
    k_out, k_lane = sch.split(dims.loops[dims.k_pos], [None, k_lanes])
    sch.reorder(*dims.others(), j_tile, k_out, j_row, k_lane)
    partial = sch.rfactor(k_lane, factor_axis=len(sch.get(main).writes[0].region))
    # rfactor leaves the original loops to the final sum; the partial-sum block gets fresh ones.
    rf_loops = sch.get_loops(partial)
    n_out = len(dims.others()) + 1
    outer = sch.fuse(*rf_loops[:n_out]) if n_out > 1 else rf_loops[0]
    _, rf_k, rf_row, rf_lane = sch.get_loops(partial)[-4:]
    sch.set_scope(partial, 0, cu.SCRATCH)
    sch.reverse_compute_at(main, outer, preserve_unit_loops=True)
    cu.attach_epilogues(sch, cu.inline_epilogues(sch, epilogues), outer, lanes)
    sch.unroll(rf_row)
    sch.vectorize(rf_lane)
    sch.parallel(outer)
    init = sch.decompose_reduction(partial, rf_k)
    if default_unroll if unroll_k is None else unroll_k:  # short rows (the LM head's K = 576) unrolled:
        sch.unroll(rf_k)  # 6.1 -> 5.7 ms
    cu.vectorize_innermost(sch, init, k_lanes)
    return sch


def _consumer_chain(sch: s_tir.Schedule, block) -> list:
    """All blocks downstream of ``block`` (transitively), in program order."""
    order = cu.blocks_in_order(sch)
    seen = {}
    frontier = list(sch.get_consumers(block))
    while frontier:
        nxt = frontier.pop()
        key = sch.get(nxt).name_hint
        if key not in seen:
            seen[key] = nxt
            frontier.extend(sch.get_consumers(nxt))
    names = [sch.get(b).name_hint for b in order]
    return [seen[n] for n in names if n in seen]
