"""The closed-form binarizer and the N:M masks, on small synthetic matrices with known answers."""

import torch

from pbs2pc.models.binarize import arb_fit, nm_keep_from_scores, nm_ranks, sq_error


def _err(w, keep, alpha, mu, sign):
    b = sign.float() * 2 - 1
    return (((w - alpha[..., None] * b - mu[..., None]) * keep).square()).sum(-1)


def test_alpha_mu_are_the_least_squares_minimisers_for_their_signs():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 4, 64, generator=g) * 0.3 + 0.1
    keep = torch.rand(16, 4, 64, generator=g) > 0.3
    fit = arb_fit(w, keep, iters=100)
    b = fit.sign.float() * 2 - 1
    # the joint least-squares solution of w ~ alpha b + mu on the kept entries, for the same signs
    k = keep.float()
    n, sb, sw, swb = k.sum(-1), (b * k).sum(-1), (w * k).sum(-1), (w * b * k).sum(-1)
    det = n * n - sb * sb
    alpha_ls = (n * swb - sb * sw) / det
    mu_ls = (n * sw - sb * swb) / det
    torch.testing.assert_close(fit.alpha, alpha_ls, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(fit.mu, mu_ls, atol=1e-4, rtol=1e-3)
    # and the signs are optimal for that alpha, mu: no perturbation of alpha, mu or one sign helps
    base = _err(w, keep, fit.alpha, fit.mu, fit.sign)
    for da, dm in [(1e-3, 0), (-1e-3, 0), (0, 1e-3), (0, -1e-3)]:
        assert (_err(w, keep, fit.alpha + da, fit.mu + dm, fit.sign) >= base - 1e-6).all()
    flipped = fit.sign.clone()
    flipped[..., 0] = ~flipped[..., 0]
    assert (_err(w, keep, fit.alpha, fit.mu, flipped) >= base - 1e-6).all()


def test_refinement_never_increases_the_error_and_pruned_entries_are_zero():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 128, generator=g).exp()  # skewed, so refinement has work to do
    keep = nm_keep_from_scores(w.abs(), 6, 8)
    errs = [float(sq_error(w, arb_fit(w, keep, iters=i).dense()).sum()) for i in range(6)]
    assert all(b <= a + 1e-4 for a, b in zip(errs, errs[1:]))
    assert (arb_fit(w, keep, 5).dense()[~keep] == 0).all()


def test_sign_only_fit_is_mean_abs():
    w = torch.tensor([[1.0, -3.0, 2.0, -2.0]])
    fit = arb_fit(w, None, iters=0, use_mu=False)
    assert float(fit.alpha) == 2.0 and float(fit.mu) == 0.0


def test_every_nm_mask_keeps_exactly_n_per_group_even_with_ties():
    g = torch.Generator().manual_seed(2)
    for n, m in [(6, 8), (5, 8), (4, 8), (2, 4), (1, 8), (8, 8)]:
        for score in (torch.rand(7, 64, generator=g), torch.zeros(7, 64), torch.randint(0, 3, (7, 64), generator=g).float()):
            keep = nm_keep_from_scores(score, n, m)
            assert (keep.reshape(7, -1, m).sum(-1) == n).all()
            ranks = nm_ranks(score, m).reshape(7, -1, m)
            assert (ranks.sort(-1).values == torch.arange(m)).all()  # a permutation in every group
            # kept entries score at least as high as pruned ones, both by topk and by rank
            grouped = score.reshape(7, -1, m)
            for kept in (keep.reshape(7, -1, m), ranks >= m - n):
                if n < m:
                    low = torch.where(kept, grouped, torch.inf).amin(-1)
                    high = torch.where(kept, -torch.inf, grouped).amax(-1)
                    assert (low >= high).all()
