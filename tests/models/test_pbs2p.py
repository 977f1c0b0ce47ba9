"""PBS2P's parts on synthetic matrices: compensation, SPBO, CFS allocation."""

import torch

from pbs2pc.models.format import NMScheme, check_nm_mask, unpack_bits
from pbs2pc.models.pbs2p import allocate_n, compress_linear, layer_importance, spbo, step_counts


def _correlated_inputs(k, tokens=2000, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    x = torch.randn(tokens, k, generator=g) @ mix * (torch.rand(k, generator=g) * 2 + 0.2)
    return x, 2.0 / tokens * x.T @ x


def test_compensation_lowers_the_output_error():
    torch.manual_seed(0)
    w = torch.randn(48, 256)
    x, h = _correlated_inputs(256)
    for nm in [(6, 8), (4, 8), (8, 8)]:
        scheme = NMScheme(*nm, 32)
        with_c, s1 = compress_linear(w, h, scheme, compensate=True)
        without, s2 = compress_linear(w, h, scheme, compensate=False)
        e1 = ((w - torch.from_numpy(with_c.dense())) @ x.T).square().sum()
        e2 = ((w - torch.from_numpy(without.dense())) @ x.T).square().sum()
        assert e1 < 0.97 * e2, (nm, float(e1), float(e2))
        assert s1["out_err"] < s2["out_err"]


def test_pruned_weights_are_exactly_zero_and_masks_are_nm():
    torch.manual_seed(1)
    w = torch.randn(16, 128)
    _, h = _correlated_inputs(128)
    packed, _ = compress_linear(w, h, NMScheme(5, 8, 64))
    mask = unpack_bits(packed.mask)
    check_nm_mask(mask, 5, 8)
    assert (packed.dense()[~mask] == 0).all()


def test_spbo_final_error_is_below_its_first_step_and_dense_binarization():
    torch.manual_seed(2)
    w = torch.randn(64, 128)
    for n in (7, 6, 5, 4):
        b, errs = spbo(w, w.square(), n, 8, iters=15)
        assert len(errs) == 8 - n + 1
        # the paper's claim on Gaussian weights: pruning the smallest weights and re-fitting lowers the
        # binarization error below the dense (step 0) one, and below the first pruning step's
        assert errs[-1] <= errs[0] and errs[-1] <= errs[1], (n, errs)
        assert (b.dense()[~b.keep] == 0).all()


def test_step_counts():
    assert step_counts(2, None) == [1, 1]
    assert step_counts(4, 2) == [2, 2]
    assert step_counts(3, 2) == [2, 1]
    assert step_counts(0, None) == []


def test_cfs_allocation_has_the_requested_mean_and_respects_bounds_and_order():
    imp = layer_importance([0.5, 0.9, 0.95, 0.97, 0.96, 0.7])
    assert abs(sum(imp) / len(imp) - 1) < 1e-9
    for n, lo, hi in [(6, 5, 7), (4, 3, 5), (5, 4, 6), (6, 6, 6)]:
        alloc = allocate_n(imp, n, 8, lo, hi)
        assert sum(alloc) == n * len(alloc)
        assert all(lo <= a <= hi for a in alloc)
        order = sorted(range(len(imp)), key=lambda i: imp[i])
        assert all(alloc[a] <= alloc[b] for a, b in zip(order, order[1:]))  # more important keeps more
