"""CPU schedule rule for the pbs2p sparse-binary linear kernel (``passes/kernels/sparse_binary_linear``).

The kernel is found by structure: a spatial ``decode`` block that reads packed unsigned bit planes
(uint8/16/32) and fp16 scales and writes a float ``W[o, k]``, consumed by a reduction block
``Y[i, o] += X[i, k] * W[o, k]``, with injective epilogues (bias, activations fused by FuseOps) after
it. The ``pbs2p_info`` attribute marks the kernel when the Relax pass creates it, but FuseTIR drops
PrimFunc attributes when it fuses epilogues in, so the attribute is a hint, never a requirement.

Two schedules, both decoding every weight once per call straight from the bits:

* **GEMV** (M == 1): ``decode`` is inlined into the reduction. Vector lanes run over output rows; per
  tile of rows the bit-plane words of one column chunk and the scales of one group are gathered into
  tiny stack buffers, then every bit of a word is one ``vptestmd`` + blend per 16 rows. Planes viewed
  as uint16/uint32 words (same bits, little-endian) cut the gathers 2-4x: about 1.4x faster; planes and
  scales row-interleaved for the SIMD width (``[N/16, C, 16]``, the x86 target layout) need no gather
  at all: each word or scale vector is one contiguous load.
* **GEMM** (M > 1 or symbolic): per tile of output rows, ``decode`` fills a local ``Wᵀ[K, tile_n]``
  (laid out k-major so rows are the contiguous vector dim), then a register-tiled micro-kernel
  (``tile_m`` rows x ``micro_n`` columns of accumulators) streams X. Symbolic or ragged M is padded
  with ``pad_einsum`` so the micro-kernel never carries a bounds check.
"""

from __future__ import annotations

import dataclasses

from pbs2pc.compiler.tvm_compat import dlight, s_tir, tirx
from pbs2pc.passes.kernels.sparse_binary_linear import INFO_ATTR

from . import cpu_utils as cu


@dataclasses.dataclass
class _Kernel:
    decode: cu.SBlockRV
    matmul: cu.SBlockRV
    prologues: list
    epilogues: list
    rows: object  # M: int or symbolic
    out_features: int
    in_features: int
    group_size: int
    word_bits: int


def _find_kernel(sch: s_tir.Schedule) -> _Kernel | None:
    """Match decode -> matmul -> injective epilogues; None if the function is something else."""
    blocks = cu.blocks_in_order(sch)
    for pos, block in enumerate(blocks):
        stmt = sch.get(block)
        if cu.iter_kinds(sch, block) != "SS" or len(stmt.writes) != 1:
            continue
        weight = stmt.writes[0].source
        planes = [r.source for r in stmt.reads if str(r.source.dtype) in ("uint8", "uint16", "uint32")]
        scales = [r.source for r in stmt.reads if str(r.source.dtype).startswith("float")]
        if not planes or not scales or str(weight.dtype) != "float32" or len(weight.shape) != 2:
            continue
        consumers = sch.get_consumers(block)
        if len(consumers) != 1 or not _is_matmul_nt(sch, consumers[0], weight):
            return None
        matmul = consumers[0]
        mpos = next(i for i, b in enumerate(blocks) if sch.get(b).same_as(sch.get(matmul)))
        epilogues = blocks[mpos + 1 :]
        if any("R" in cu.iter_kinds(sch, b) for b in epilogues):
            return None
        n_out, k = (cu.const_int(d) for d in weight.shape)
        groups = cu.const_int(scales[0].shape[1])
        bits = int(str(planes[0].dtype)[4:])
        if None in (n_out, k, groups) or k % groups or k % bits:
            return None
        rows = sch.get(matmul).iter_vars[0].dom.extent
        return _Kernel(
            decode=block,
            matmul=matmul,
            prologues=[b for b in blocks[:mpos] if b is not block and "R" not in cu.iter_kinds(sch, b)],
            epilogues=epilogues,
            rows=rows if cu.const_int(rows) is None else cu.const_int(rows),
            out_features=n_out,
            in_features=k,
            group_size=k // groups,
            word_bits=bits,
        )
    return None


def _is_matmul_nt(sch: s_tir.Schedule, block, weight) -> bool:
    """``Y[i, o] += X[i, k] * W[o, k]`` with W the decoded weight (iteration kinds S, S, R)."""
    stmt = sch.get(block)
    if cu.iter_kinds(sch, block) != "SSR" or len(stmt.reads) != 2 or len(stmt.writes) != 1:
        return False
    vi, vo, vk = (iv.var for iv in stmt.iter_vars)
    x_idx = cu.region_vars(stmt.reads[0])
    w_idx = cu.region_vars(stmt.reads[1])
    y_idx = cu.region_vars(stmt.writes[0])
    if not stmt.reads[1].source.same_as(weight) or None in (x_idx, w_idx, y_idx):
        return False
    return (
        len(x_idx) == 2 and cu.is_var(x_idx[0], vi) and cu.is_var(x_idx[1], vk)
        and cu.is_var(w_idx[0], vo) and cu.is_var(w_idx[1], vk)
        and len(y_idx) == 2 and cu.is_var(y_idx[0], vi) and cu.is_var(y_idx[1], vo)
    )


def _cache_decode_inputs(sch: s_tir.Schedule, block, word_loop, group_loop) -> None:
    """Gather bit-plane words at ``word_loop`` and scales at ``group_loop`` into small local buffers.

    The gathers read one word (or scale) per output row, strided by the row pitch; the decode then
    reads them as contiguous vectors, which is what lets the bit test and blend run over SIMD lanes.
    Row-interleaved inputs (``[N/T, C, T]``, pbs2pc.passes.InterleaveRows) already hold a tile's words
    and scales contiguously: they are read in place with vector loads, no gather.
    """
    reads = [r.source for r in sch.get(block).reads]
    for idx, source in enumerate(reads):
        dtype = str(source.dtype)
        at = word_loop if dtype.startswith("uint") else group_loop if dtype == "float16" else None
        if at is None or len(source.shape) == 3:
            continue
        cached = sch.cache_read(block, idx, cu.SCRATCH)
        sch.compute_at(cached, at, preserve_unit_loops=True)


class SparseBinaryLinear(dlight.ScheduleRule):
    """Schedule the pbs2p kernel for LLVM CPUs (GEMV for M == 1, register-tiled GEMM otherwise)."""

    @cu.declines_on_error
    def apply(self, func: tirx.PrimFunc, target, tunable: bool):  # noqa: D102 - dlight contract
        if not isinstance(func, tirx.PrimFunc) or not cu.is_llvm_cpu(target):
            return None
        sch = s_tir.Schedule(func)
        kernel = _find_kernel(sch)
        if kernel is None:
            return None
        info = func.attrs.get(INFO_ATTR) if func.attrs is not None else None
        if info is not None and int(info["group_size"]) != kernel.group_size:
            return None  # the attribute and the IR disagree: do not guess
        cu.inline_prologues(sch, kernel.prologues)
        lanes = cu.vector_lanes(target)
        tile_n = self._tile_n(kernel, lanes, cu.num_cores(target))
        if tile_n is None or kernel.group_size % kernel.word_bits:
            return self._plain(sch, kernel)
        lanes = min(lanes, tile_n)
        if kernel.rows == 1:
            return self._gemv(sch, kernel, tile_n, lanes)
        return self._gemm(sch, kernel, tile_n, lanes, cu.vector_registers(target))

    @staticmethod
    def _tile_n(kernel: _Kernel, lanes: int, cores: int) -> int | None:
        """Output rows per parallel task.

        At most 64 (four vectors of accumulators on AVX-512) and at most 8 vectors (32 rows on NEON: 64 rows,
        16 unrolled vectors per bit, made LLVM's aarch64 code generation of a v2 GEMV take 92 s instead of
        35), fewer for GEMV when that leaves under 4 tasks per core.
        Long K does not want narrower tiles, although the decoded ``Wᵀ`` tile (K x 64 fp32) then outgrows
        L2: with the row-interleaved layout, 64 against the former 32 (K <= 4096) / 16 (longer K) measured
        1.1x faster at 4096² and 11008×4096 and 1.5x at 4096×11008 for M = 128, and 1.5x for the M = 1
        GEMV at 4096×11008.
        """
        tiles = [t for t in (64, 32, 16, 8, 4) if t <= min(64, 8 * lanes) and kernel.out_features % t == 0]
        if kernel.rows == 1:
            balanced = [t for t in tiles if t >= lanes and kernel.out_features // t >= 4 * cores]
            tiles = balanced or tiles
        return tiles[0] if tiles else None

    @staticmethod
    def _gemv(sch, kernel: _Kernel, tile_n: int, lanes: int):
        sch.compute_inline(kernel.decode)
        matmul = kernel.matmul
        _, o, k = sch.get_loops(matmul)
        o_tile, o_vecs, o_lane = sch.split(o, [None, tile_n // lanes, lanes])
        k_group, k_word, k_bit = sch.split(k, [None, kernel.group_size // kernel.word_bits, kernel.word_bits])
        sch.reorder(o_tile, k_group, k_word, k_bit, o_vecs, o_lane)
        acc = sch.cache_write(matmul, 0, cu.SCRATCH)
        sch.reverse_compute_at(acc, o_tile, preserve_unit_loops=True)
        cu.attach_epilogues(sch, cu.inline_epilogues(sch, kernel.epilogues), o_tile, lanes)
        _cache_decode_inputs(sch, matmul, k_word, k_group)
        sch.unroll(k_bit)
        sch.unroll(o_vecs)
        sch.vectorize(o_lane)
        cu.vectorize_innermost(sch, acc, lanes)
        sch.parallel(o_tile)
        sch.decompose_reduction(matmul, k_group)
        return sch

    @staticmethod
    def _gemm(sch, kernel: _Kernel, tile_n: int, lanes: int, registers: int):
        tile_m, n_vec = cu.micro_kernel(lanes, registers)
        n_vec = max(1, min(tile_n // lanes, n_vec))
        micro_n = n_vec * lanes
        rows = kernel.rows
        if isinstance(rows, int) and rows < tile_m:
            tile_m = rows
        matmul = kernel.matmul
        padded = not isinstance(rows, int) or rows % tile_m != 0
        if padded:
            sch.pad_einsum(matmul, [tile_m, 1, 1])
            decode_stmt = sch.get(kernel.decode)
            x_pad = next(b for b in sch.get_producers(matmul) if not sch.get(b).same_as(decode_stmt))
            out_copy = sch.get_consumers(matmul)[0]
        i, o, k = sch.get_loops(matmul)
        o_tile, o_in = sch.split(o, [None, tile_n])
        i_tile, i_in = sch.split(i, [None, tile_m])
        o_blk, o_vec = sch.split(o_in, [None, micro_n])
        sch.reorder(o_tile, i_tile, o_blk, k, i_in, o_vec)
        if padded:
            # The padded output tile becomes the accumulator itself; the copy back (with its
            # row < M guard) runs once per micro-tile, outside the k loop.
            sch.set_scope(matmul, 0, cu.SCRATCH)
            sch.reverse_compute_at(out_copy, o_blk, preserve_unit_loops=True)
            sch.compute_at(x_pad, i_tile, preserve_unit_loops=True)
            cu.vectorize_innermost(sch, x_pad, lanes)
            writeback = out_copy
        else:
            writeback = sch.cache_write(matmul, 0, cu.SCRATCH)
            sch.reverse_compute_at(writeback, o_blk, preserve_unit_loops=True)
        cu.attach_epilogues(sch, cu.inline_epilogues(sch, kernel.epilogues), o_blk, lanes)
        cu.vectorize_innermost(sch, writeback, lanes)
        _schedule_tile_decode(sch, kernel, o_tile, lanes)
        sch.unroll(i_in)
        sch.vectorize(o_vec)
        sch.parallel(o_tile)
        init = sch.decompose_reduction(matmul, k)
        cu.vectorize_innermost(sch, init, micro_n)
        return sch

    @staticmethod
    def _plain(sch, kernel: _Kernel):
        """Shapes the tiled schedules do not cover (odd N): decode inlined, rows in parallel."""
        sch.compute_inline(kernel.decode)
        i, o, _ = sch.get_loops(kernel.matmul)
        cu.inline_epilogues(sch, kernel.epilogues)
        sch.parallel(sch.fuse(i, o))
        return sch


def _schedule_tile_decode(sch, kernel: _Kernel, o_tile, lanes: int) -> None:
    """Decode ``tile_n`` output rows into a local k-major ``Wᵀ`` tile once per parallel task."""
    decode = kernel.decode
    sch.compute_at(decode, o_tile, preserve_unit_loops=True)
    sch.transform_layout(decode, ("write", 0), lambda o, j: (j, o))
    rows, cols = sch.get_loops(decode)[-2:]
    k_group, k_word, k_bit = sch.split(cols, [None, kernel.group_size // kernel.word_bits, kernel.word_bits])
    r_vecs, r_lane = sch.split(rows, [None, lanes])
    sch.reorder(k_group, k_word, k_bit, r_vecs, r_lane)
    _cache_decode_inputs(sch, decode, k_word, k_group)
    sch.unroll(k_bit)
    sch.unroll(r_vecs)
    sch.vectorize(r_lane)
