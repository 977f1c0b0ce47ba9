"""Mask pattern codes: an n:m mask stored as one 5-bit code per row and column byte (the x86 target layout).

An n:m mask has few possible bytes: with 6:8, a byte (8 consecutive columns of one row) is one of
C(8, 6) = 28 patterns, 4.8 bits of information stored in 8. Where a scheme has at most 32 patterns per byte
(6:8, 7:8, 1:8, 2:8, 1:4, 3:4, 1:2; not 2:4, 4:8 or 5:8) the x86 preset stores each mask byte as its
index in the sorted list of those patterns, 5 bits: 0.625 bits per weight instead of 1. Kernels then
never rebuild the mask: the GEMVs look ``IM`` (the sum of the inputs a row keeps in 8 columns) up by the
code directly, from a 32-entry table per column byte.

Layout. ``[N/16, K/32 * 40 + 24]`` uint8: per tile of 16 rows, one 40-byte chunk per 4 column bytes (32
inputs) holds the 64 codes of 16 rows x 4 column bytes, code ``i = 4 r + c'`` (row ``r``, column byte
``c'``: row-major, so after extraction a row's 4 codes share an int32 lane) at bits ``5 i .. 5 i + 4``,
little-endian. 24 zero bytes end each tile's row so that a 64-byte load of its last chunk stays inside the
array. With the sign plane (1 bit) and fp16 alpha and mu per 128 columns that is 1.878 bits per weight
(2.25 with the mask plane).

Extraction (:func:`extract`, 3 instructions per 64 codes): one 64-byte load, a ``vpermb`` that copies the
5 bytes of codes ``8 q .. 8 q + 7`` into qword ``q``, a ``vpmultishiftqb`` that moves code ``8 q + b`` to
byte ``b`` of that qword (shift ``5 b``), and a mask of the low 5 bits.
"""

from __future__ import annotations

from pbs2pc.compiler.tvm_compat import T

#: Bits per code, codes at most, rows per tile (the row interleave), column bytes and bytes per chunk.
CODE_BITS = 5
MAX_PATTERNS = 1 << CODE_BITS
ROWS = 16
CHUNK_COLUMN_BYTES = 4
CHUNK_BYTES = ROWS * CHUNK_COLUMN_BYTES * CODE_BITS // 8
#: Bytes after a tile's last chunk, so its 64-byte load ends inside the array.
TAIL_BYTES = 64 - CHUNK_BYTES
#: The tag on the expansion PrimFunc (``{"n": n, "m": m}``), which LowerSparseBinaryLinear looks for.
EXPAND_ATTR = "pbs2p_mask_codes"


def patterns(n: int, m: int) -> list[int]:
    """The mask bytes an n:m mask can hold (exactly ``n`` set bits in each aligned group of ``m`` of its 8
    bits), ascending; empty when ``m`` does not divide 8 (a group would span bytes)."""
    if m < 1 or 8 % m:
        return []
    return [b for b in range(256) if all(bin((b >> s) & ((1 << m) - 1)).count("1") == n for s in range(0, 8, m))]


def has_code(n: int, m: int) -> bool:
    """Whether masks of this scheme fit 5-bit codes (a dense scheme, n = m, has no mask to code)."""
    return n < m and 0 < len(patterns(n, m)) <= MAX_PATTERNS


def code_width(in_features: int) -> int:
    """Bytes per tile of 16 rows in the code layout."""
    return in_features // (8 * CHUNK_COLUMN_BYTES) * CHUNK_BYTES + TAIL_BYTES


def supported(out_features: int, in_features: int, n: int, m: int) -> bool:
    """Whether a layer's mask can be stored as codes: a coded scheme, whole tiles and whole chunks."""
    return has_code(n, m) and out_features % ROWS == 0 and in_features % (8 * CHUNK_COLUMN_BYTES) == 0


def bits_per_weight(in_features: int) -> float:
    """Bits per weight of the codes alone (with the tail bytes)."""
    return 8 * code_width(in_features) / (ROWS * in_features)


def encode(mask, n: int, m: int):
    """numpy: the interchange mask ``[N, K/8]`` uint8 as codes ``[N/16, K/32 * 40 + 24]`` uint8."""
    import numpy as np

    from pbs2pc.errors import FormatError

    pats = patterns(n, m)
    lookup = np.full(256, MAX_PATTERNS, np.uint8)
    lookup[pats] = np.arange(len(pats), dtype=np.uint8)
    codes = lookup[np.asarray(mask, np.uint8)]
    if (codes == MAX_PATTERNS).any():
        row = int(np.argwhere(codes == MAX_PATTERNS)[0][0])
        raise FormatError(f"mask row {row} is not {n}:{m} (a byte holds another pattern); re-export the model.")
    rows, cols = codes.shape
    chunks = cols // CHUNK_COLUMN_BYTES
    # [tile, row, chunk, c'] -> [tile, chunk, row, c']: code 4 r + c' of each chunk
    codes = codes.reshape(rows // ROWS, ROWS, chunks, CHUNK_COLUMN_BYTES).transpose(0, 2, 1, 3)
    bits = (codes.reshape(rows // ROWS, chunks, ROWS * CHUNK_COLUMN_BYTES, 1) >> np.arange(CODE_BITS)) & 1
    packed = np.packbits(bits.reshape(rows // ROWS, chunks, -1).astype(np.uint8), axis=-1, bitorder="little")
    tail = np.zeros((rows // ROWS, TAIL_BYTES), np.uint8)
    return np.ascontiguousarray(np.concatenate([packed.reshape(rows // ROWS, -1), tail], axis=1))


def decode(codes, n: int, m: int, in_features: int):
    """numpy inverse of :func:`encode`: codes ``[N/16, W]`` -> the interchange mask ``[N, K/8]``."""
    import numpy as np

    tiles = codes.shape[0]
    chunks = in_features // (8 * CHUNK_COLUMN_BYTES)
    body = np.asarray(codes, np.uint8)[:, : chunks * CHUNK_BYTES].reshape(tiles, chunks, CHUNK_BYTES)
    bits = np.unpackbits(body, axis=-1, bitorder="little").reshape(tiles, chunks, ROWS * CHUNK_COLUMN_BYTES, CODE_BITS)
    index = (bits.astype(np.int64) << np.arange(CODE_BITS)).sum(-1)
    table = np.zeros(MAX_PATTERNS, np.uint8)
    table[: len(patterns(n, m))] = patterns(n, m)
    mask = table[index].reshape(tiles, chunks, ROWS, CHUNK_COLUMN_BYTES).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(mask.reshape(tiles * ROWS, chunks * CHUNK_COLUMN_BYTES))


# --------------------------------------------------------------------------------------------------------
# TIR helpers


def extract(codes, tile, chunk):
    """The 64 codes of one chunk (uint8x64, byte ``4 r + c'``, values < 32) from the code buffer
    ``[N/16, W]``."""
    raw = codes.vload([tile, chunk * CHUNK_BYTES], "uint8x64")
    # qword q gets bytes 5q .. 5q+4 (codes 8q .. 8q+7 start at its bit 0); its bytes 5-7 are not read
    arranged = T.Shuffle([raw], [CODE_BITS * (i // 8) + min(i % 8, CODE_BITS - 1) for i in range(64)])
    shifts = T.reinterpret("uint8x64", T.broadcast(T.uint64(sum(CODE_BITS * b << 8 * b for b in range(8))), 8))
    moved = T.call_llvm_pure_intrin("uint8x64", "llvm.x86.avx512.pmultishift.qb.512", shifts, arranged)
    return T.bitwise_and(moved, T.broadcast(T.uint8(MAX_PATTERNS - 1), 64))


def pattern_of(code, n: int, m: int):
    """The mask byte of ``code`` (an int32 TIR expression; 0 past the last pattern), as int32."""
    expr = T.int32(0)
    for index, pattern in enumerate(patterns(n, m)):
        expr = T.Select(code == index, T.int32(pattern), expr)
    return expr


def pattern_bits(n: int, m: int, dtype: str):
    """A TVMScript macro ``fill(kept)``: ``kept[i, e]`` [8, 32] = bit ``i`` of pattern ``e`` as ``dtype`` (the
    0/1 weights with which the GEMVs build their per-code tables of kept-input sums)."""

    @T.macro
    def fill(kept):
        for i in range(8):
            for e in T.vectorized(MAX_PATTERNS):
                kept[i, e] = T.Cast(dtype, T.bitwise_and(T.shift_right(pattern_of(e, n, m), i), 1))

    return fill


def pattern_table(n: int, m: int):
    """The patterns as a ``vpermb`` table (uint8x64, entry ``i`` = pattern ``i``; a constant LLVM folds)."""
    lanes = T.ramp(0, 1, 64)
    expr = T.broadcast(T.uint8(0), 64)
    for index, pattern in enumerate(patterns(n, m)):
        expr = T.Select(lanes == T.broadcast(index, 64), T.broadcast(T.uint8(pattern), 64), expr)
    return expr


def expand_mask(out_features: int, in_features: int, n: int, m: int):
    """The PrimFunc ``(codes [N/16, W] uint8) -> mask [N/16, K/8, 16] uint8``: the row-interleaved mask
    planes the other kernels read (the prompt's GEMMs, the TE kernel); per chunk: :func:`extract`, a
    ``vpermb`` from the pattern table and a ``vpermb`` back to column-major, one 64-byte store."""
    NT, C, W = out_features // ROWS, in_features // 8, code_width(in_features)
    chunks = C // CHUNK_COLUMN_BYTES
    table = pattern_table(n, m)
    column_major = [CHUNK_COLUMN_BYTES * (b % ROWS) + b // ROWS for b in range(64)]  # byte 16 c' + r <- 4 r + c'
    tiles = T.parallel if out_features * in_features >= (1 << 18) else T.serial

    @T.prim_func(private=True, check_well_formed=False)
    def expand(codes: T.Buffer((NT, W), "uint8"), mask: T.Buffer((NT, C, ROWS), "uint8")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, EXPAND_ATTR: {"n": n, "m": m}})
        # one root block: Relax's RewriteDataflowReshape inspects every one-input call_tir and needs one
        with T.sblock("root"):
            for t in tiles(NT):
                for ch in range(chunks):
                    mask[t, ch * CHUNK_COLUMN_BYTES, T.ramp(0, 1, 64)] = T.Shuffle([T.call_llvm_pure_intrin(
                        "uint8x64", "llvm.x86.avx512.permvar.qi.512", table, extract(codes, t, ch))], column_major)

    return expand
