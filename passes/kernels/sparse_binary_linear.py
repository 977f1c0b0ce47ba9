"""TE compute for the ``pbs2p.SparseBinaryLinear`` op (op contract v2) and its PrimFunc description.

The kernel is written as two TE stages, following mlc-llm's decode-then-matmul idea:

1. ``decode`` turns the packed bit planes and the fp16 scales into the float32 weight
   ``W[o, j] = mask(o, j) * (alpha[o, j // G] * (2 * sign(o, j) - 1) + mu[o, j // G])``;
2. ``matmul`` is a plain reduction ``Y[i, o] = sum_k X[i, k] * W[o, k]`` (plus ``bias`` as a last stage).

The compute knows nothing about schedules. Unscheduled, ``decode`` would materialise a dense ``[N, K]``
float copy of the weight; the CPU schedule rule (``pbs2pc.passes.schedules``) instead computes it at a
tile of output rows into a small local buffer, or inlines it into the reduction, so each weight is decoded
once per call from the packed bits and no dense copy ever reaches global memory.

The Relax lowering creates the PrimFunc with
``bb.call_te(sparse_binary_linear, x, sign, ..., n=n, m=m, group_size=g, primfunc_attrs={"pbs2p_info":
pbs2p_info(...)})``. Schedule rules recognise the kernel by its structure (bit-plane decode feeding a
reduction), cross-checked against that attribute, never by its name; FuseTIR drops attributes when it
fuses epilogues into the kernel, so structure is what survives.

Op contract v2 (``pbs2pc.models.format``) adds two optional sets, read in the same ``decode`` stage:
magnitude groups (a ``group`` plane in the sign plane's layout; group-1 weights take ``group_alpha`` /
``group_mu`` instead of ``alpha`` / ``mu``: one more bit test and blend of the two scale pairs), and a
salient residual (``salient`` ``[1, K/8]``, ``residual`` ``[N, ceil(S/8)]`` in salient-column order with
``residual_alpha`` / ``residual_mu``). The residual bit of column ``j`` is bit ``rank[j]`` of the row's
residual bits, where ``rank`` (int32 ``[K]``, the number of salient columns before ``j``) is computed once
per call from the salient plane by the lowering (an exclusive ``cumsum``): a prefix count needs a scan,
which a TE ``decode`` expression cannot hold, and ``K`` integers are a few microseconds against the layer.

The bit planes may also be passed as uint16 or uint32 words (``plane.view(np.uint32)``: the same bits,
since the packing is little-endian and x86/AArch64 are little-endian machines); the compute reads bit
``j % bits`` of word ``j // bits``. Wider words make the CPU GEMV's per-row gathers 2-4x cheaper.

Any of sign, mask, alpha and mu may also come **row-interleaved** (pbs2pc.passes.InterleaveRows): a 3-D
``[N/T, C, T]`` tensor holding element ``[o, c]`` of the 2-D one at ``[o // T, c, o % T]``, so the ``T``
rows of a tile that a SIMD vector covers are contiguous for each word or scale. The compute reads
either layout (decided per input by its rank); the values and bits are the same.

Example
-------
>>> from pbs2pc.compiler.tvm_compat import te, tirx
>>> m = tirx.Var("m", "int64")
>>> x = te.placeholder((m, 576), "float32", name="x")
>>> sign = te.placeholder((1536, 72), "uint8", name="sign")
>>> mask = te.placeholder((1536, 72), "uint8", name="mask")
>>> alpha = te.placeholder((1536, 576 // 64), "float16", name="alpha")
>>> y = sparse_binary_linear(x, sign, mask, alpha, None, None, n=6, m=8, group_size=64)
>>> [int(d) if isinstance(d, tirx.IntImm) else str(d) for d in y.shape]
['m', 1536]
"""

from __future__ import annotations

from pbs2pc.compiler.tvm_compat import te, tirx

#: Version of the op contract this kernel implements (architecture.md §2; v1 layers are v2 layers without
#: the optional groups and residual).
FORMAT_VERSION = 2

#: Name of the PrimFunc attribute that marks the kernel for schedule rules.
INFO_ATTR = "pbs2p_info"


def pbs2p_info(n: int, m: int, group_size: int, has_mask: bool, has_mu: bool, has_bias: bool,
               has_groups: bool = False, has_residual: bool = False) -> dict:
    """Describe a sparse-binary linear kernel for the ``pbs2p_info`` PrimFunc attribute.

    Parameters
    ----------
    n, m : int
        The N:M scheme: ``n`` weights kept of every ``m`` consecutive ones along K.
    group_size : int
        Columns sharing one ``alpha`` / ``mu`` scale.
    has_mask, has_mu, has_bias : bool
        Which optional inputs the PrimFunc takes (in the order x, sign, mask, alpha, mu, bias).
    has_groups, has_residual : bool
        The v2 structure: magnitude groups (``group``, ``group_alpha``, ``group_mu`` follow) and a salient
        residual (``salient``, ``rank``, ``residual``, ``residual_alpha``, ``residual_mu`` follow).

    Returns
    -------
    dict
        Plain ints only (TVM stores it as a ``Map``): ``format_version``, ``n``, ``m``, ``group_size``,
        ``has_mask``, ``has_mu``, ``has_bias``, ``has_groups``, ``has_residual``.
    """
    return {
        "format_version": FORMAT_VERSION,
        "n": int(n),
        "m": int(m),
        "group_size": int(group_size),
        "has_mask": int(bool(has_mask)),
        "has_mu": int(bool(has_mu)),
        "has_bias": int(bool(has_bias)),
        "has_groups": int(bool(has_groups)),
        "has_residual": int(bool(has_residual)),
    }


def word_bits(plane: te.Tensor) -> int:
    """Bits per element of a packed plane: 8 for the interchange ``uint8``, 16/32 for a word view."""
    dtype = str(plane.dtype)
    if dtype not in ("uint8", "uint16", "uint32"):
        raise ValueError(f"a packed bit plane must be uint8, uint16 or uint32, got {dtype}")
    return int(dtype[4:])


def interleave_of(tensor: te.Tensor) -> int:
    """Rows per interleaved block ``T`` of a row-interleaved ``[N/T, C, T]`` input; 0 for a plain ``[N, C]`` one."""
    if len(tensor.shape) == 2:
        return 0
    if len(tensor.shape) == 3 and isinstance(tensor.shape[2], tirx.IntImm):
        return int(tensor.shape[2])
    raise ValueError(f"a weight input must be [N, C] or row-interleaved [N/T, C, T], got shape {list(tensor.shape)}")


def rows_of(tensor: te.Tensor):
    """``N`` of a plain or row-interleaved weight input."""
    t, n = interleave_of(tensor), tensor.shape[0]
    if not t:
        return n
    return n * t  # IntImm * int folds to an IntImm


def _at(tensor: te.Tensor, o, c):
    """Element ``[o, c]`` of the logical ``[N, C]`` input, whichever layout it is stored in."""
    t = interleave_of(tensor)
    return tensor[o // t, c, o % t] if t else tensor[o, c]


def _bit_set(plane: te.Tensor, o, j):
    """Whether weight ``(o, j)`` has its bit set in a little-endian packed plane.

    Written as ``word & (1 << j % bits) != 0`` rather than a shift-then-and: once a schedule unrolls the
    bits of a word, the bit mask is a constant and x86 tests a vector of words with one ``vptestmd``.
    """
    bits = word_bits(plane)
    dtype = str(plane.dtype)
    bit = tirx.const(1, dtype) << (j % bits).astype(dtype)
    return (_at(plane, o, j // bits) & bit) != tirx.const(0, dtype)


def sparse_binary_linear(x, sign, mask, alpha, mu, bias, group=None, group_alpha=None, group_mu=None, salient=None,
                         rank=None, residual=None, residual_alpha=None, residual_mu=None, *, n: int, m: int,
                         group_size: int) -> te.Tensor:
    """``Y = X @ Wᵀ (+ bias)`` reading the packed sparse-binary weight directly.

    Parameters
    ----------
    x : te.Tensor
        float32 ``[M, K]``; ``M`` may be a symbolic ``tirx.Var`` (dynamic sequence length).
    sign : te.Tensor
        uint8 ``[N, K/8]``, bit ``j % 8`` of byte ``[o, j // 8]`` is 1 where ``W[o, j] > 0``; or the
        same plane viewed as uint16 ``[N, K/16]`` / uint32 ``[N, K/32]`` words. This and the three
        inputs below may instead be row-interleaved, ``[N/T, C, T]`` (see the module docstring).
    mask : te.Tensor or None
        Same layout and dtype as ``sign``, 1 where the weight is kept; ``None`` only when ``n == m``.
    alpha : te.Tensor
        float16 ``[N, K/G]`` scales.
    mu : te.Tensor or None
        float16 ``[N, K/G]`` offsets.
    bias : te.Tensor or None
        float32 ``[N]``.
    group, group_alpha, group_mu : te.Tensor or None
        v2 magnitude groups: a plane in ``sign``'s dtype or uint8 (plain or row-interleaved) and fp16
        ``[N, K/G]`` scales for the weights whose group bit is set; all three or none.
    salient, rank, residual, residual_alpha, residual_mu : te.Tensor or None
        v2 salient residual: uint8 ``[1, K/8]`` salient columns, int32 ``[K]`` ranks (salient columns
        before each column), uint8 ``[N, ceil(S/8)]`` residual bits in salient-column order and fp16
        ``[N, K/G]`` scales (each plain or row-interleaved); all five or none.
    n, m, group_size : int
        The scheme; ``group_size`` is ``G``.

    Returns
    -------
    te.Tensor
        float32 ``[M, N]``.
    """
    if mask is None and n != m:
        raise ValueError(f"the mask may be omitted only when n == m, got {n}:{m}")
    rows, k = x.shape
    out_features = rows_of(sign)
    for t in (mask, alpha, mu):
        rows_t = None if t is None else rows_of(t)
        static = isinstance(rows_t, tirx.IntImm) and isinstance(out_features, tirx.IntImm)
        if static and int(rows_t) != int(out_features):
            raise ValueError(f"{t.name} has {int(rows_t)} rows, the sign plane {int(out_features)}")
    if x.dtype != "float32":
        raise ValueError(f"x must be float32, got {x.dtype}")
    g = group_size
    if mask is not None and mask.dtype != sign.dtype:
        raise ValueError(f"sign and mask must share a word type, got {sign.dtype} and {mask.dtype}")
    groups = [group, group_alpha, group_mu]
    residuals = [salient, rank, residual, residual_alpha, residual_mu]
    for name, tensors in (("group", groups), ("residual", residuals)):
        if any(t is None for t in tensors) and any(t is not None for t in tensors):
            raise ValueError(f"the {name} inputs must be given all together or not at all")
    has_groups, has_residual = group is not None, salient is not None

    def decode(o, j):
        # W = alpha * (2s - 1) + mu is written as select(s, mu + alpha, mu - alpha): the same float32
        # values (one rounding either way), but both arms depend on the group only, so a schedule that
        # loops over the bits of a group hoists them and a weight costs one bit test and one blend.
        a = _at(alpha, o, j // g).astype("float32")
        u = None if mu is None else _at(mu, o, j // g).astype("float32")
        if has_groups:
            in_group = _bit_set(group, o, j)
            a = tirx.Select(in_group, _at(group_alpha, o, j // g).astype("float32"), a)
            u = tirx.Select(in_group, _at(group_mu, o, j // g).astype("float32"),
                            u if u is not None else tirx.const(0.0, "float32"))
        if u is None:
            w = tirx.Select(_bit_set(sign, o, j), a, -a)
        else:
            w = tirx.Select(_bit_set(sign, o, j), u + a, u - a)
        if has_residual:
            t = rank[j]
            r_bit = (_at(residual, o, t // 8) >> (t % 8).astype("uint8")) & tirx.const(1, "uint8")
            ra = _at(residual_alpha, o, j // g).astype("float32")
            ru = _at(residual_mu, o, j // g).astype("float32")
            extra = tirx.Select(r_bit != tirx.const(0, "uint8"), ru + ra, ru - ra)
            w = tirx.Select(_bit_set(salient, 0, j), w + extra, w)
        if mask is not None:
            w = tirx.Select(_bit_set(mask, o, j), w, tirx.const(0.0, "float32"))
        return w

    weight = te.compute((out_features, k), decode, name="decode")
    r = te.reduce_axis((0, k), name="k")
    y = te.compute(
        (rows, out_features),
        lambda i, o: te.sum(x[i, r] * weight[o, r], axis=r),
        name="matmul",
    )
    if bias is None:
        return y
    return te.compute((rows, out_features), lambda i, o: y[i, o] + bias[o], name="bias_add")
