"""The simple compressor: exact N:M masks and closed-form scales that minimise what they claim to."""

import numpy as np
import pytest
import torch

from pbs2pc.models.format import NMScheme, check_nm_mask, unpack_bits
from pbs2pc.models.modules import SparseBinaryLinear
from pbs2pc.models.simple import compress_weight, fit_binary, nm_magnitude_mask


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (5, 8), (6, 8)])
def test_mask_keeps_exactly_n_largest_per_group(n, m):
    w = torch.randn(9, 64)
    keep = nm_magnitude_mask(w, n, m)
    check_nm_mask(keep.numpy(), n, m)
    groups = w.abs().reshape(9, -1, m)
    kept = keep.reshape(9, -1, m)
    assert (groups[kept].reshape(9, -1, n).min(-1).values >= groups[~kept].reshape(9, -1, m - n).max(-1).values).all()


def _error(w, keep, alpha, mu, g):
    rows, k = w.shape
    wg = w.reshape(rows, k // g, g)
    kg = keep.reshape(rows, k // g, g)
    s = torch.where(wg - mu[..., None] >= 0, 1.0, -1.0)
    return (((wg - alpha[..., None] * s - mu[..., None]) ** 2) * kg).sum()


def test_closed_form_scales_are_a_local_minimum():
    torch.manual_seed(0)
    w = torch.randn(6, 128, dtype=torch.float64) * 0.3 + 0.05
    keep = nm_magnitude_mask(w, 6, 8)
    alpha, mu, _ = fit_binary(w, keep, 64, iters=50)
    base = _error(w, keep, alpha, mu, 64)
    for d_alpha, d_mu in [(1e-3, 0), (-1e-3, 0), (0, 1e-3), (0, -1e-3)]:
        assert _error(w, keep, alpha + d_alpha, mu + d_mu, 64) > base


def test_refinement_never_increases_the_error():
    torch.manual_seed(1)
    w = torch.randn(8, 128, dtype=torch.float64)
    keep = nm_magnitude_mask(w, 5, 8)
    errors = [float(_error(w, keep, *fit_binary(w, keep, 64, iters=i)[:2], 64)) for i in range(0, 6)]
    assert all(b <= a + 1e-9 for a, b in zip(errors, errors[1:]))


def test_torch_module_decodes_like_the_numpy_reference():
    torch.manual_seed(2)
    packed = compress_weight(torch.randn(24, 128), NMScheme(4, 8, 64), bias=torch.randn(24))
    module = SparseBinaryLinear(packed)
    np.testing.assert_array_equal(module.decode().numpy(), packed.dense())
    x = torch.randn(3, 128)
    np.testing.assert_allclose(module(x).detach().numpy(), packed.matmul(x.numpy()), rtol=1e-5, atol=1e-5)
    assert set(module.state_dict()) == {"sign", "mask", "alpha", "mu", "bias"}
    assert unpack_bits(packed.mask).sum() == 24 * 128 // 2
