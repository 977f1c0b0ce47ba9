"""The packed format's numpy reference: bit order, validation, decode, bit accounting."""

import numpy as np
import pytest
import torch

from pbs2pc.errors import FormatError
from pbs2pc.models.format import NMScheme, PackedLinear, bits_per_weight, check_nm_mask, pack_bits, unpack_bits
from pbs2pc.models.simple import compress_weight


def test_bit_order_is_little_endian_within_a_byte():
    bits = np.zeros((1, 16), bool)
    bits[0, 0] = bits[0, 9] = True  # weight j is bit j % 8 of byte j // 8
    packed = pack_bits(bits)
    assert packed.tolist() == [[0b00000001, 0b00000010]]
    np.testing.assert_array_equal(unpack_bits(packed), bits)


def test_pack_unpack_round_trip_random():
    bits = np.random.default_rng(0).random((7, 64)) < 0.5
    np.testing.assert_array_equal(unpack_bits(pack_bits(bits)), bits)


@pytest.mark.parametrize("n,m,g", [(9, 8, 64), (0, 8, 64), (6, 8, 60), (3, 8, 4), (5, 6, 64)])
def test_invalid_schemes_are_rejected(n, m, g):
    with pytest.raises(FormatError):
        NMScheme(n, m, g)


def test_parse_rejects_garbage():
    with pytest.raises(FormatError, match="6:8"):
        NMScheme.parse("six-of-eight")


@pytest.mark.parametrize("k,msg", [(576 + 4, "multiple of 8"), (576, "group_size=128")])
def test_shape_checks_name_the_problem(k, msg):
    with pytest.raises(FormatError, match=msg):
        NMScheme(6, 8, 128).check_shape(64, k)


def test_a_row_that_breaks_n_m_is_reported():
    mask = np.zeros((3, 16), bool)
    mask[:, [0, 1, 8, 9]] = True
    check_nm_mask(mask, 2, 8)
    mask[2, 10] = True
    with pytest.raises(FormatError, match="row 2, columns 8..15 keep 3"):
        check_nm_mask(mask, 2, 8)


def _layer(n=6, m=8, g=64, rows=12, k=128, seed=0):
    torch.manual_seed(seed)
    return compress_weight(torch.randn(rows, k), NMScheme(n, m, g), bias=torch.randn(rows))


def test_dense_decode_matches_the_definition():
    layer = _layer()
    sign, keep = unpack_bits(layer.sign), unpack_bits(layer.mask)
    o, j = 5, 77
    g = j // 64
    expected = keep[o, j] * (float(layer.alpha[o, g]) * (2 * sign[o, j] - 1) + float(layer.mu[o, g]))
    assert layer.dense()[o, j] == pytest.approx(expected)
    assert (layer.dense() != 0).sum(axis=1).max() <= 128 * 6 // 8


def test_matmul_reference_includes_bias():
    layer = _layer()
    x = np.random.default_rng(1).standard_normal((3, 128))
    np.testing.assert_allclose(layer.matmul(x), x @ layer.dense().T.astype(np.float64) + layer.bias, rtol=1e-12)


def test_validate_catches_wrong_dtype_shape_and_mask():
    layer = _layer()
    bad = PackedLinear(layer.sign, layer.mask, layer.alpha.astype(np.float32), layer.mu, layer.scheme)
    with pytest.raises(FormatError, match="alpha must be float16"):
        bad.validate()
    with pytest.raises(FormatError, match="mask must be uint8"):
        PackedLinear(layer.sign, layer.mask[:, :4], layer.alpha, layer.mu, layer.scheme).validate()
    broken = layer.mask.copy()
    broken[0, 0] ^= 0xFF
    with pytest.raises(FormatError, match="breaks 6:8"):
        PackedLinear(layer.sign, broken, layer.alpha, layer.mu, layer.scheme).validate()
    with pytest.raises(FormatError, match="only when n == m"):
        PackedLinear(layer.sign, None, layer.alpha, layer.mu, layer.scheme).validate()


def test_bits_per_weight_counts_masks_and_scales():
    b = bits_per_weight(NMScheme(6, 8, 128))
    assert b.interchange == pytest.approx(1 + 1 + 32 / 128)
    assert b.compact == pytest.approx((5 + 6) / 8 + 0.25)  # C(8,6) = 28 patterns -> 5 bits
    assert b.paper == pytest.approx(0.75)
    four = bits_per_weight(NMScheme(4, 8, 128), has_mu=False)
    assert four.compact == pytest.approx((7 + 4) / 8 + 0.125)  # 70 patterns -> 7 bits; alpha only
    dense = bits_per_weight(NMScheme(8, 8, 64))
    assert dense.interchange == pytest.approx(1 + 0.5) and dense.compact == pytest.approx(1.5)


def _loop_decode(p: PackedLinear) -> np.ndarray:
    """Op contract v2 written out weight by weight, as docs/format.md states it."""
    g = p.scheme.group_size
    sign, group = unpack_bits(p.sign), unpack_bits(p.group) if p.group is not None else None
    keep = unpack_bits(p.mask) if p.mask is not None else np.ones_like(sign)
    salient = unpack_bits(p.salient)[0] if p.salient is not None else np.zeros(p.in_features, bool)
    res = unpack_bits(p.residual) if p.residual is not None else None
    w = np.zeros((p.out_features, p.in_features))
    for o in range(p.out_features):
        t = 0
        for j in range(p.in_features):
            b = j // g
            in_group = group is not None and group[o, j]
            a = float(p.group_alpha[o, b] if in_group else p.alpha[o, b])
            u = float(p.group_mu[o, b] if in_group else p.mu[o, b])
            v = a * (2 * sign[o, j] - 1) + u
            if salient[j]:
                v += float(p.residual_alpha[o, b]) * (2 * res[o, t] - 1) + float(p.residual_mu[o, b])
                t += 1
            w[o, j] = v * keep[o, j]
    return w


@pytest.mark.parametrize("groups,salient", [(True, 4), (True, 0), (False, 3), (True, 1)])
def test_v2_decode_matches_the_contract_weight_by_weight(groups, salient):
    from testutil import random_layer, random_structure

    rng = np.random.default_rng(3)
    _, sign, mask, alpha, mu, bias = random_layer(1, 24, 128, 64, "5:8", True, True, seed=4)
    p = PackedLinear(sign=sign, mask=mask, alpha=alpha, mu=mu, bias=bias, scheme=NMScheme(5, 8, 64),
                     **random_structure(rng, 24, 128, 64, groups, salient)).validate()
    assert p.version == 2
    np.testing.assert_array_equal(p.dense(), _loop_decode(p).astype(np.float32))
    from pbs2pc.models.modules import SparseBinaryLinear

    np.testing.assert_array_equal(SparseBinaryLinear(p).decode().numpy(), p.dense())


def test_v2_validation_names_the_bad_input():
    from testutil import random_layer, random_structure

    rng = np.random.default_rng(0)
    _, sign, mask, alpha, mu, _ = random_layer(1, 16, 64, 64, "6:8", True, False)
    st = random_structure(rng, 16, 64, 64, True, 2)
    base = dict(sign=sign, mask=mask, alpha=alpha, mu=mu, scheme=NMScheme(6, 8, 64))
    with pytest.raises(FormatError, match="group_mu must be float16"):
        PackedLinear(**base, **{**st, "group_mu": None}).validate()
    with pytest.raises(FormatError, match="residual must be uint8 \\[16, 1\\] for 2 salient columns"):
        PackedLinear(**base, **{**st, "residual": np.zeros((16, 2), np.uint8)}).validate()
    with pytest.raises(FormatError, match="salient must be uint8"):
        PackedLinear(**base, **{**st, "salient": None}).validate()


def test_v2_bits_count_groups_residual_and_scales():
    b = bits_per_weight(NMScheme(6, 8, 64), groups=True, salient_fraction=4 / 64, rows=576)
    assert b.scales == 16 * 6 / 64
    assert abs(b.paper - 0.75 * (1 + 4 / 64)) < 1e-12  # 0.797: the 0.80 the PBS2P/STBLLM tables print
    assert abs(b.interchange - (1 + 1 + 1 + 4 / 64 + 1 / 576 + 1.5)) < 1e-12
    assert abs(b.compact - (5 / 8 + 0.75 * (2 + 4 / 64) + 1 / 576 + 1.5)) < 1e-12


def test_quantized_scales_stay_within_half_a_step_and_count_their_row_scales():
    from testutil import random_layer, random_structure

    from pbs2pc.models.format import quantize_scales

    rng = np.random.default_rng(5)
    _, sign, mask, alpha, mu, _ = random_layer(1, 32, 128, 64, "6:8", True, False)
    p = PackedLinear(sign=sign, mask=mask, alpha=alpha, mu=mu, scheme=NMScheme(6, 8, 64),
                     **random_structure(rng, 32, 128, 64)).validate()
    q = quantize_scales(p, 8).validate()
    for name in ("alpha", "mu", "group_alpha", "group_mu", "residual_alpha", "residual_mu"):
        a, b = getattr(p, name).astype(np.float32), getattr(q, name).astype(np.float32)
        step = np.abs(a).max(axis=1, keepdims=True) / 127
        assert (np.abs(a - b) <= step * 0.5 + np.abs(a) * 2e-3 + 1e-7).all(), name
        assert len(np.unique(b[0])) <= 255
    b16, b8 = p.bits(), p.bits(scale_bits=8)
    assert abs((b16.scales - b8.scales) - (6 * 8 / 64 - 6 * 16 / 128)) < 1e-12
