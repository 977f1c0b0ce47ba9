"""The pbs2p sparse-binary weight format (op contract version 2) and its numpy reference.

A compressed linear weight ``W`` of shape ``[N, K]`` (out x in) is stored as

- ``sign``  uint8 ``[N, K/8]``: bit ``j % 8`` of byte ``[o, j // 8]`` is 1 where ``W[o, j] > 0``;
- ``mask``  uint8 ``[N, K/8]``, same packing: 1 where the weight is kept (omitted when ``n == m``);
- ``alpha`` float16 ``[N, K/G]`` and ``mu`` float16 ``[N, K/G]`` (optional): per row, per group of
  ``G`` columns;
- ``bias``  float32 ``[N]`` (optional).

and means ``W[o, j] = mask[o, j] * (alpha[o, j // G] * (2 * sign[o, j] - 1) + mu[o, j // G])``, with
exactly ``n`` mask bits in every aligned group of ``m`` columns of every row. Bits are packed
little-endian within a byte (``numpy.packbits(..., bitorder="little")``).

Version 2 adds the BiLLM/ARB structure as two optional sets (with neither present a layer is exactly v1):

- **magnitude groups**: ``group`` uint8 ``[N, K/8]`` (1 = the weight belongs to group 1) with
  ``group_alpha``, ``group_mu`` float16 ``[N, K/G]``: group-1 weights use these scales instead of
  ``alpha``, ``mu``;
- **salient residual**: ``salient`` uint8 ``[1, K/8]`` (1 = a salient column, shared by all rows),
  ``residual`` uint8 ``[N, ceil(S/8)]`` (the second sign plane of the ``S`` salient columns only, in
  column order: bit ``t`` is the ``t``-th salient column) and ``residual_alpha``, ``residual_mu``
  float16 ``[N, K/G]``; on a salient column a kept weight adds
  ``residual_alpha[o, j // G] * (2 * r[o, j] - 1) + residual_mu[o, j // G]``.

Everything numeric in pbs2pc (the PyTorch modules, the ONNX reference, the TVM kernels) is tested
against the functions here. This module imports numpy only.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from pbs2pc.errors import FormatError


@dataclasses.dataclass(frozen=True)
class NMScheme:
    """An N:M sparse-binary scheme: keep ``n`` of every ``m`` weights along K; scales per ``group_size``."""

    n: int
    m: int
    group_size: int = 128

    def __post_init__(self):
        if not (isinstance(self.n, int) and isinstance(self.m, int) and isinstance(self.group_size, int)):
            raise FormatError(f"n, m and group_size must be integers, got {self.n!r}, {self.m!r}, {self.group_size!r}.")
        if not 1 <= self.m <= 64:
            raise FormatError(f"m must be between 1 and 64, got m={self.m}; use a scheme such as 6:8.")
        if not 1 <= self.n <= self.m:
            raise FormatError(f"invalid N:M {self.n}:{self.m}: n must be between 1 and m; use e.g. 6:8 or 4:8.")
        if self.group_size < 8 or self.group_size % 8:
            raise FormatError(f"group_size must be a positive multiple of 8, got {self.group_size}.")
        if self.group_size % self.m:
            raise FormatError(
                f"group_size {self.group_size} is not a multiple of m={self.m}; pick a group size that m divides."
            )

    @classmethod
    def parse(cls, text: str, group_size: int | None = 128) -> "NMScheme":
        """Parse ``"6:8"`` into a scheme (``group_size=None``: the smallest valid one, for checking n:m alone)."""
        try:
            n, m = (int(part) for part in text.split(":"))
        except ValueError:
            raise FormatError(f"cannot read N:M scheme {text!r}; write it as two integers like 6:8.") from None
        if group_size is None:
            group_size = math.lcm(8, max(m, 1))
        return cls(n, m, group_size)

    @property
    def dense(self) -> bool:
        """True when nothing is pruned (``n == m``): the mask plane is omitted."""
        return self.n == self.m

    def check_shape(self, out_features: int, in_features: int) -> None:
        """Raise :class:`FormatError` if a ``[out, in]`` weight cannot use this scheme."""
        k = in_features
        if k % 8:
            raise FormatError(f"in_features K={k} is not a multiple of 8, which bit packing needs.")
        if k % self.m:
            raise FormatError(f"in_features K={k} is not divisible by m={self.m}; choose an m that divides K.")
        if k % self.group_size:
            raise FormatError(
                f"in_features K={k} is not divisible by group_size={self.group_size}; "
                f"choose a group size that divides K (e.g. {largest_group_size([k], self.m)})."
            )
        if out_features < 1:
            raise FormatError(f"out_features must be positive, got {out_features}.")

    def __str__(self) -> str:
        return f"nm={self.n}:{self.m} g={self.group_size}"


def largest_group_size(in_features_list, m: int = 8, limit: int = 128) -> int:
    """The largest power-of-two group size <= ``limit`` that divides every K and is a multiple of ``m``."""
    g = limit
    while g >= 8:
        if g % m == 0 and all(k % g == 0 for k in in_features_list):
            return g
        g //= 2
    raise FormatError(f"no group size between 8 and {limit} divides every in_features {sorted(set(in_features_list))}.")


# --------------------------------------------------------------------------------------------------------
# Bit planes


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """Pack a boolean ``[N, K]`` plane into uint8 ``[N, K/8]``, little-endian within each byte."""
    bits = np.asarray(bits, dtype=bool)
    if bits.ndim != 2 or bits.shape[1] % 8:
        raise FormatError(f"a bit plane must be 2-D with K a multiple of 8, got shape {bits.shape}.")
    return np.packbits(bits, axis=1, bitorder="little")


def unpack_bits(packed: np.ndarray, k: int | None = None) -> np.ndarray:
    """Unpack uint8 ``[N, K/8]`` into a boolean ``[N, K]`` plane."""
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.ndim != 2:
        raise FormatError(f"a packed bit plane must be a 2-D uint8 array, got {packed.dtype} {packed.shape}.")
    bits = np.unpackbits(packed, axis=1, bitorder="little").astype(bool)
    return bits if k is None else bits[:, :k]


def check_nm_mask(mask_bits: np.ndarray, n: int, m: int) -> None:
    """Raise :class:`FormatError` unless every aligned group of ``m`` has exactly ``n`` kept bits."""
    rows, k = mask_bits.shape
    counts = mask_bits.reshape(rows, k // m, m).sum(axis=2)
    bad = np.argwhere(counts != n)
    if bad.size:
        row, group = (int(v) for v in bad[0])
        raise FormatError(
            f"mask breaks {n}:{m}: row {row}, columns {group * m}..{group * m + m - 1} keep "
            f"{int(counts[row, group])} weights instead of {n} ({len(bad)} groups are wrong)."
        )


# --------------------------------------------------------------------------------------------------------
# A packed linear layer

#: The optional inputs op contract v2 adds, in the op's input order (after ``bias``).
V2_FIELDS = ("group", "group_alpha", "group_mu", "salient", "residual", "residual_alpha", "residual_mu")
#: Every array a :class:`PackedLinear` may hold, in the op's input order.
ARRAY_FIELDS = ("sign", "mask", "alpha", "mu", "bias", *V2_FIELDS)


@dataclasses.dataclass
class PackedLinear:
    """One compressed linear layer in the interchange form (see the module docstring)."""

    sign: np.ndarray
    mask: np.ndarray | None
    alpha: np.ndarray
    mu: np.ndarray | None
    scheme: NMScheme
    bias: np.ndarray | None = None
    # op contract v2 (optional; see the module docstring)
    group: np.ndarray | None = None
    group_alpha: np.ndarray | None = None
    group_mu: np.ndarray | None = None
    salient: np.ndarray | None = None
    residual: np.ndarray | None = None
    residual_alpha: np.ndarray | None = None
    residual_mu: np.ndarray | None = None

    @property
    def has_groups(self) -> bool:
        return self.group is not None

    @property
    def has_residual(self) -> bool:
        return self.salient is not None

    @property
    def version(self) -> int:
        """2 when any v2 input is present, else 1."""
        return 2 if self.has_groups or self.has_residual else 1

    def salient_columns(self) -> np.ndarray:
        """Indices of the salient columns (empty without a residual)."""
        if self.salient is None:
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero(unpack_bits(self.salient, self.in_features)[0])

    @property
    def out_features(self) -> int:
        return int(self.sign.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.sign.shape[1]) * 8

    def validate(self) -> "PackedLinear":
        """Check dtypes, shapes and the N:M property; raise :class:`FormatError` on the first problem."""
        s = self.scheme
        if self.sign.dtype != np.uint8 or self.sign.ndim != 2:
            raise FormatError(f"sign must be uint8 [N, K/8], got {self.sign.dtype} {self.sign.shape}.")
        n_out, k = self.out_features, self.in_features
        s.check_shape(n_out, k)
        groups = k // s.group_size
        if self.mask is None:
            if not s.dense:
                raise FormatError(f"the mask may be omitted only when n == m, but the scheme is {s.n}:{s.m}.")
        else:
            if self.mask.dtype != np.uint8 or self.mask.shape != self.sign.shape:
                raise FormatError(f"mask must be uint8 {self.sign.shape}, got {self.mask.dtype} {self.mask.shape}.")
            check_nm_mask(unpack_bits(self.mask), s.n, s.m)
        for name in ("alpha", "mu"):
            arr = getattr(self, name)
            if arr is None:
                if name == "alpha":
                    raise FormatError("alpha is required.")
                continue
            if arr.dtype != np.float16 or arr.shape != (n_out, groups):
                raise FormatError(f"{name} must be float16 [{n_out}, {groups}], got {arr.dtype} {arr.shape}.")
        if self.bias is not None and self.bias.shape != (n_out,):
            raise FormatError(f"bias must have shape [{n_out}], got {self.bias.shape}.")
        self._validate_v2(n_out, k, groups)
        return self

    def _validate_v2(self, n_out: int, k: int, groups: int) -> None:
        def scales(*names):
            for name in names:
                arr = getattr(self, name)
                if arr is None or arr.dtype != np.float16 or arr.shape != (n_out, groups):
                    got = "missing" if arr is None else f"{arr.dtype} {arr.shape}"
                    raise FormatError(f"{name} must be float16 [{n_out}, {groups}], got {got}.")

        group_set = (self.group, self.group_alpha, self.group_mu)
        if any(a is not None for a in group_set):
            if self.group is None or self.group.dtype != np.uint8 or self.group.shape != self.sign.shape:
                got = "missing" if self.group is None else f"{self.group.dtype} {self.group.shape}"
                raise FormatError(f"group must be uint8 {self.sign.shape} when group scales are given, got {got}.")
            scales("group_alpha", "group_mu")
        residual_set = (self.salient, self.residual, self.residual_alpha, self.residual_mu)
        if any(a is not None for a in residual_set):
            if self.salient is None or self.salient.dtype != np.uint8 or self.salient.shape != (1, k // 8):
                got = "missing" if self.salient is None else f"{self.salient.dtype} {self.salient.shape}"
                raise FormatError(f"salient must be uint8 [1, {k // 8}] when a residual is given, got {got}.")
            count = len(self.salient_columns())
            want = (n_out, max(1, -(-count // 8)))
            if self.residual is None or self.residual.dtype != np.uint8 or self.residual.shape != want:
                got = "missing" if self.residual is None else f"{self.residual.dtype} {self.residual.shape}"
                raise FormatError(f"residual must be uint8 {list(want)} for {count} salient columns, got {got}.")
            scales("residual_alpha", "residual_mu")

    def dense(self) -> np.ndarray:
        """The float32 ``[N, K]`` weight this layer means (the reference decode)."""
        g = self.scheme.group_size

        def per_column(scale):
            return np.repeat(scale.astype(np.float32), g, axis=1)

        sign = unpack_bits(self.sign).astype(np.float32) * 2.0 - 1.0
        alpha = per_column(self.alpha)
        mu = per_column(self.mu) if self.mu is not None else np.zeros_like(alpha)
        if self.group is not None:
            in_group = unpack_bits(self.group)
            alpha = np.where(in_group, per_column(self.group_alpha), alpha)
            mu = np.where(in_group, per_column(self.group_mu), mu)
        w = alpha * sign + mu
        if self.salient is not None:
            cols = self.salient_columns()
            r = unpack_bits(self.residual)[:, : len(cols)].astype(np.float32) * 2.0 - 1.0
            w[:, cols] += per_column(self.residual_alpha)[:, cols] * r + per_column(self.residual_mu)[:, cols]
        if self.mask is not None:
            w *= unpack_bits(self.mask)
        return w

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """Reference ``Y = X @ W.T (+ bias)`` for ``X`` of shape ``[..., K]``, computed in float64."""
        y = np.asarray(x, dtype=np.float64) @ self.dense().astype(np.float64).T
        if self.bias is not None:
            y += self.bias.astype(np.float64)
        return y

    def bits(self, scale_bits: float = 16.0) -> "BitsPerWeight":
        """Honest bits per weight of this layer (see :func:`bits_per_weight`)."""
        return bits_per_weight(self.scheme, has_mu=self.mu is not None, groups=self.has_groups,
                               salient_fraction=len(self.salient_columns()) / self.in_features if self.has_residual else None,
                               rows=self.out_features, scale_bits=scale_bits, in_features=self.in_features)


# --------------------------------------------------------------------------------------------------------
# Honest bit accounting


@dataclasses.dataclass(frozen=True)
class BitsPerWeight:
    """Storage cost of one weight, in bits, counted three ways.

    ``interchange``: the ONNX form (1 sign bit + 1 mask bit when pruned + fp16 scales / G; v2 adds 1
    group bit, the residual plane of the salient columns and the salient-column bitmap).
    ``compact``: the best exact N:M encoding (ceil(log2 C(m, n)) pattern bits per group + n sign bits
    per group + scales), which a target layout can reach; v2's group and residual bits are counted for
    kept weights only.
    ``paper``: what the PBS2P / STBLLM / BiLLM tables count: only the sign planes of kept weights
    (``n / m`` times ``1 + salient fraction``); masks, pattern indices, group bitmaps and scales are left
    out. Reported for comparison, never as our cost.
    """

    interchange: float
    compact: float
    paper: float
    scales: float


def bits_per_weight(scheme: NMScheme, has_mu: bool = True, *, groups: bool = False,
                    salient_fraction: float | None = None, rows: int | None = None,
                    scale_bits: float = 16.0, in_features: int | None = None) -> BitsPerWeight:
    """Bits per weight of ``scheme`` (scales of ``scale_bits`` each, float16 in the format).

    ``groups``: a group bitmap with its alpha and mu; ``salient_fraction``: the share of columns with a
    residual plane (``None``: no residual; with one, its alpha and mu and the salient-column bitmap,
    ``1 / rows`` per weight, are counted too). ``scale_bits < 16`` counts scales quantized as by
    :func:`quantize_scales`, which adds one fp16 scale per row and scale array (``16 / in_features``).
    """
    n, m, g = scheme.n, scheme.m, scheme.group_size
    count = (2 if has_mu else 1) + (2 if groups else 0) + (2 if salient_fraction is not None else 0)
    scales = scale_bits * count / g
    if scale_bits < 16:
        if in_features is None:
            raise FormatError("counting quantized scales needs in_features (their per-row fp16 scales).")
        scales += 16.0 * count / in_features
    mask_bits = 0.0 if scheme.dense else 1.0
    pattern = math.ceil(math.log2(math.comb(m, n))) if n < m else 0
    density = n / m
    frac = salient_fraction or 0.0
    extra = (1.0 / rows if rows else 0.0) if salient_fraction is not None else 0.0
    return BitsPerWeight(
        interchange=1.0 + mask_bits + (1.0 if groups else 0.0) + frac + extra + scales,
        compact=pattern / m + density * (1.0 + (1.0 if groups else 0.0) + frac) + extra + scales,
        paper=density * (1.0 + frac),
        scales=scales,
    )


def quantize_scales(packed: PackedLinear, bits: int = 8) -> PackedLinear:
    """``packed`` with every scale array (alpha, mu and the v2 ones) rounded to signed ``bits``-bit integers
    under one fp16 scale per row and array (``max |row| / (2^(bits-1) - 1)``, as llama.cpp's K-quants
    store their block scales under a super-block fp16). The result keeps the format's fp16 arrays, holding
    the values the integers decode to, so everything downstream measures what such storage would give;
    count its bits with ``bits_per_weight(..., scale_bits=bits, in_features=K)``.
    """
    levels = 2 ** (bits - 1) - 1
    out = {}
    for name in ("alpha", "mu", "group_alpha", "group_mu", "residual_alpha", "residual_mu"):
        arr = getattr(packed, name)
        if arr is None:
            continue
        a = arr.astype(np.float32)
        step = np.float16(np.abs(a).max(axis=1, keepdims=True) / levels).astype(np.float32)
        q = np.where(step > 0, np.round(a / np.where(step > 0, step, 1)), 0).clip(-levels, levels)
        out[name] = (q * step).astype(np.float16)
    return dataclasses.replace(packed, **out)
