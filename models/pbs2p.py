"""PBS2P: progressive binarization with semi-structured pruning (SPBO + CFS + OBS compensation).

Reconstructed from the published material (figures, tables, reviews; no code was released): see
docs/accuracy.md "What was implemented" for every decision and the method notes for the sources.

Per linear layer ``W`` (out x in) with Hessian ``H = 2/n sum x x^T`` of its calibration inputs:

1. dead columns (``H_jj = 0``) are zeroed; ``H += 0.01 * mean(diag H) * I``; ``U = chol(H^-1)`` (upper);
2. the columns are processed in blocks of ``B`` (= the format's group size: 128, or 64 for SmolLM2);
   for each block ``F`` of the *current* (compensated) weights:
   - fine stage of CFS: the OBS saliency ``s_ij = w_ij^2 / U_jj^2`` ranks the weights inside every aligned
     group of ``M`` columns; the ``M - N_l`` lowest are pruned (``N_l`` from the coarse stage);
   - SPBO: binarize the dense block (``alpha_0 B_0 + mu_0``), then prune in ``tau`` steps (default
     ``tau = M - N_l``, one more weight per group each step, lowest saliency first), re-fitting ``alpha``,
     ``mu`` and ``B`` with the ARB closed forms after every step, warm-started from the previous step;
     pruned weights are exactly zero;
   - OBS/GPTQ compensation: ``W[:, R] -= (W_F - Q_F) U_FF^-1 U_FR`` for the columns ``R`` after the block
     (the exact OBS update for fixing a whole block; BiLLM/ARB use ``diag(U_FF)^-1`` instead);
3. CFS coarse stage (:func:`allocate_n`): per decoder layer ``N_l`` from the reciprocal of the cosine
   similarity of the layer's input and output hidden states, in ``[N_low, N_high]``, averaging to ``N``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from pbs2pc.errors import Pbs2pcError
from pbs2pc.models import structure
from pbs2pc.models.binarize import Binary, arb_fit, nm_keep_from_scores, nm_ranks, sq_error
from pbs2pc.models.format import NMScheme, bits_per_weight

# ----------------------------------------------------------------------------------------------------------
# Hessian preparation and the block loop with compensation


def prepare_hessian(w: torch.Tensor, h: torch.Tensor, percdamp: float = 0.01):
    """``(w, U)``: dead columns zeroed, ``U`` the upper Cholesky factor of ``(H + damp I)^-1`` (float32)."""
    w = w.clone().float()
    h = h.float().clone()  # float32 as in GPTQ/BiLLM: float64 Cholesky costs 2-3x on this CPU
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    damp = percdamp * torch.mean(torch.diag(h))
    h.diagonal().add_(damp)
    try:
        lower = torch.linalg.cholesky(h)
    except torch.linalg.LinAlgError:
        h.diagonal().add_(damp * 10)
        lower = torch.linalg.cholesky(h)
    hinv = torch.cholesky_inverse(lower)
    u = torch.linalg.cholesky(hinv, upper=True)
    return w, u.float()


#: A block quantizer: (block index, current block weights [rows, B], diag(U) of the block [B]) -> (Q, info)
BlockQuantizer = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, object]]


def obs_quantize(w: torch.Tensor, u: torch.Tensor, block: int, quantize: BlockQuantizer, compensate: bool = True):
    """Quantize ``w`` block by block, compensating each block's error into the later columns.

    Returns the quantized weight and the list of the quantizer's per-block infos.
    """
    w = w.clone()
    k = w.shape[1]
    q_all = torch.zeros_like(w)
    infos = []
    for bi, start in enumerate(range(0, k, block)):
        end = start + block
        wb = w[:, start:end]
        q, info = quantize(bi, wb, torch.diagonal(u)[start:end])
        q_all[:, start:end] = q
        infos.append(info)
        if compensate and end < k:
            # exact OBS update for the whole block: delta_R = -delta_F U_FF^-1 U_FR
            err = torch.linalg.solve_triangular(u[start:end, start:end], wb - q, upper=True, left=False)
            w[:, end:] -= err @ u[start:end, end:]
    return q_all, infos


def layer_errors(w0: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> dict:
    """Relative errors of ``q`` against the original ``w0``: weight ``||dW||^2/||W||^2`` and output
    ``||dW X||^2 / ||W X||^2 = tr(dW H dW^T) / tr(W H W^T)`` (``H`` the undamped calibration Hessian)."""
    d = (w0 - q).float()
    w0 = w0.float()
    h = h.float()
    out = float(((d @ h) * d).sum() / ((w0 @ h) * w0).sum().clamp_min(1e-30))
    wt = float(d.square().sum() / w0.square().sum().clamp_min(1e-30))
    return {"out_err": out, "w_err": wt}


# ----------------------------------------------------------------------------------------------------------
# SPBO


def step_counts(tau: int, steps: int | None) -> list[int]:
    """Split ``tau`` pruned weights per group into ``steps`` nearly equal steps (default: one per step)."""
    steps = tau if steps is None else max(1, min(steps, tau))
    if tau == 0:
        return []
    base, extra = divmod(tau, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


def spbo(w: torch.Tensor, score: torch.Tensor, n: int, m: int, steps: int | None = None, iters: int = 15,
         progressive: bool = True, rescore_diag: torch.Tensor | None = None):
    """Prune ``w`` (``[..., B]``, one alpha/mu per leading index) to ``n:m`` with binarization.

    ``progressive=True`` is SPBO: dense binarization, then ``tau = m - n`` pruning steps (see
    :func:`step_counts`), each followed by ARB re-fitting warm-started from the previous step.
    ``progressive=False`` is the no-SPBO ablation: the final mask at once, fitted from scratch.
    ``rescore_diag`` (an option, not the default) re-ranks before every step by the binarization-aware
    OBS score ``(w^2 - (w - w_hat)^2) / d`` instead of the fixed ``score``.

    Returns the final :class:`Binary` and the block's squared error after every step (step 0 = dense).
    """
    tau = m - n
    if not progressive or tau == 0:
        keep = nm_keep_from_scores(score, n, m) if tau else None
        b = arb_fit(w, keep, iters)
        return b, [float(sq_error(w, b.dense()).sum())]
    b = arb_fit(w, None, iters)
    errs = [float(sq_error(w, b.dense()).sum())]
    ranks = nm_ranks(score, m)
    pruned = 0
    keep = torch.ones_like(w, dtype=torch.bool)
    for count in step_counts(tau, steps):
        if rescore_diag is not None:
            gain = (w.square() - (w - b.dense()).square()) / rescore_diag
            gain = torch.where(keep, gain, torch.full_like(gain, -math.inf))
            ranks = nm_ranks(gain, m)
        keep = ranks >= pruned + count  # with rescoring, the already-pruned (-inf) rank lowest
        pruned += count
        b = arb_fit(w, keep, iters, alpha=b.alpha, mu=b.mu)
        errs.append(float(sq_error(w, b.dense()).sum()))
    return b, errs


def spbo_structured(w: torch.Tensor, score: torch.Tensor, n: int, m: int, group: torch.Tensor,
                    salient: torch.Tensor, steps: int | None = None, iters: int = 15, progressive: bool = True,
                    keep: torch.Tensor | None = None):
    """SPBO with the BiLLM/ARB structure (:mod:`.structure`): the same steps as :func:`spbo`, and after
    every step *every* group and the residual are re-fitted (warm-started ARB updates).

    ``keep`` (optional) is a final mask chosen elsewhere (N:M-then-binarize); then there are no steps.
    Returns the final :class:`~.structure.Structured` and the block's squared error after every step.
    """
    tau = m - n
    if keep is not None or not progressive or tau == 0:
        if keep is None:
            keep = nm_keep_from_scores(score, n, m) if tau else torch.ones_like(w, dtype=torch.bool)
        st = structure.fit(w, keep, group, salient, iters)
        return st, [float(sq_error(w, st.dense()).sum())]
    st = structure.fit(w, torch.ones_like(w, dtype=torch.bool), group, salient, iters)
    errs = [float(sq_error(w, st.dense()).sum())]
    ranks = nm_ranks(score, m)
    pruned = 0
    for count in step_counts(tau, steps):
        pruned += count
        st = structure.fit(w, ranks >= pruned, group, salient, iters, warm=st)
        errs.append(float(sq_error(w, st.dense()).sum()))
    return st, errs


# ----------------------------------------------------------------------------------------------------------
# CFS coarse stage


def allocate_n(importance, n: int, m: int, n_low: int, n_high: int) -> list[int]:
    """Per-layer ``N_l`` in ``[n_low, n_high]`` with mean exactly ``n``, proportional to importance.

    ``N_l = floor(n * I_l / mean(I) + 1/2)`` clipped to the bounds; then the total is corrected to
    ``L * n`` one unit at a time, moving the layer whose target ``n * I_l / mean(I)`` is closest to the
    next rounding (largest remainder), so more important layers keep more weights.
    """
    if not (1 <= n_low <= n <= n_high <= m):
        raise Pbs2pcError(f"CFS bounds must satisfy 1 <= N_low <= N <= N_high <= M, got {n_low} <= {n} <= {n_high} <= {m}.")
    imp = torch.as_tensor(importance, dtype=torch.float64)
    target = n * imp / imp.mean()
    alloc = torch.clamp(torch.floor(target + 0.5), n_low, n_high)
    total = n * len(alloc)
    while alloc.sum() > total:
        cand = torch.where(alloc > n_low, alloc - target, torch.full_like(target, -math.inf))
        alloc[int(cand.argmax())] -= 1
    while alloc.sum() < total:
        cand = torch.where(alloc < n_high, target - alloc, torch.full_like(target, -math.inf))
        alloc[int(cand.argmax())] += 1
    return [int(v) for v in alloc]


def layer_importance(cosines) -> list[float]:
    """``I_l = 1 / cos(h_in, h_out)``, normalised to mean 1 (layers that change the stream more matter more)."""
    inv = [1.0 / max(c, 1e-3) for c in cosines]
    mean = sum(inv) / len(inv)
    return [v / mean for v in inv]


# ----------------------------------------------------------------------------------------------------------
# One linear layer


def compress_linear(w0: torch.Tensor, h: torch.Tensor, scheme: NMScheme, *, spbo_on: bool = True,
                    steps: int | None = None, iters: int = 15, percdamp: float = 0.01, compensate: bool = True,
                    rescore: bool = False, mask_first: bool = False, groups: bool = True, residual: bool = True,
                    bias=None):
    """Compress one linear with PBS2P (or, with ``mask_first``, N:M-then-binarize); ``(PackedLinear, stats)``.

    ``groups`` / ``residual`` switch the two parts of the BiLLM/ARB structure (:mod:`.structure`, op
    contract v2); with both off every kept weight of a row and block shares one ``alpha B + mu`` (the
    single-plane variant, ``pbs2p-1plane``, op contract v1). Per block of the compensated weights, the
    salient columns are searched on the saliency matrix ``s = w^2 / U_jj^2`` and the magnitude split on
    the weights, both once on the dense block, before SPBO prunes.

    ``mask_first=True`` is the STBLLM ordering: the N:M mask of the whole matrix is chosen first from the
    original weights (same OBS saliency), then the kept weights are binarized once, block by block, with
    the same compensation; no SPBO.
    """
    n, m, g = scheme.n, scheme.m, scheme.group_size
    w, u = prepare_hessian(w0, h, percdamp)
    dinv = torch.diagonal(u).square()
    fixed_keep = nm_keep_from_scores(w.square() / dinv, n, m) if mask_first and n < m else None
    structured = groups or residual

    def quantize(bi, wb, du):
        d2 = du.square()
        score = wb.square() / d2
        keep = fixed_keep[:, bi * g : (bi + 1) * g] if fixed_keep is not None else None
        if structured:
            sal = structure.search_salient(score) if residual else torch.zeros(wb.shape[1], dtype=torch.bool)
            grp = (wb.abs() >= structure.search_split(wb, ~sal.expand_as(wb))) if groups else torch.zeros_like(wb, dtype=torch.bool)
            b, errs = spbo_structured(wb, score, n, m, grp, sal, steps, iters, progressive=spbo_on, keep=keep)
        elif keep is not None:
            b = arb_fit(wb, keep, iters)
            errs = [float(sq_error(wb, b.dense()).sum())]
        else:
            b, errs = spbo(wb, score, n, m, steps, iters, progressive=spbo_on, rescore_diag=d2 if rescore else None)
        return b.dense(), (b, errs, float(wb.square().sum()))

    q, infos = obs_quantize(w, u, g, quantize, compensate)
    blocks = [i[0] for i in infos]
    packed = structure.pack_structured(blocks, scheme, bias) if structured else structure.pack_single(blocks, scheme, bias)
    # errors of what is actually stored (fp16 scales), against the original weights
    stored = torch.from_numpy(packed.dense()).to(w0.device)
    stats = layer_errors(w0.float(), stored, h)
    step_errs = torch.tensor([i[1] for i in infos], dtype=torch.float64).sum(0)
    norm = sum(i[2] for i in infos)
    stats["step_w_err"] = [float(e) / norm for e in step_errs]  # block-local weight error after each SPBO step
    stats["n"] = n
    b = packed.bits()
    stats["bits"] = {"interchange": b.interchange, "compact": b.compact, "paper": b.paper}
    if packed.has_residual:
        stats["salient_fraction"] = round(len(packed.salient_columns()) / packed.in_features, 4)
    return packed, stats


def bits_dict(scheme: NMScheme, has_mu: bool = True) -> dict:
    """Bits per weight of one layer: interchange (ONNX form), compact (best exact N:M code), paper (n/m)."""
    b = bits_per_weight(scheme, has_mu)
    return {"interchange": b.interchange, "compact": b.compact, "paper": b.paper}


# ----------------------------------------------------------------------------------------------------------
# The whole model


def default_bounds(n: int, m: int, n_low: int | None, n_high: int | None) -> tuple[int, int]:
    """CFS bounds: ``[N-1, N+1]`` clipped to ``[1, M]`` unless given (see docs/accuracy.md for why)."""
    return (max(1, n - 1) if n_low is None else n_low, min(m, n + 1) if n_high is None else n_high)


#: options of the PBS2P family that other calibrated methods do not take
PBS2P_OPTIONS = ("iters", "rescore", "steps", "n_low", "n_high")


def refuse_options(method: str, options: dict, keys=PBS2P_OPTIONS) -> None:
    """Raise one clear error if ``options`` sets any of ``keys`` (a method that does not use them); drop
    the ones left at their defaults (``None``/``False``), which the CLI passes for every method."""
    for key in keys:
        if options.pop(key, None) not in (None, False):
            raise Pbs2pcError(f"option {key!r} does not apply to method {method}; leave it out.")


def run_calibrated(model, scheme: NMScheme, compress_one, *, method: str, tokenizer=None, calib_ids=None,
                   calib: str = "calib", nsamples: int = 128, seqlen: int = 512, seed: int = 0, device: str = "cpu",
                   batch_size: int = 8, resume_dir=None, progress: bool = True, stop_after_layer=None,
                   cfs: bool = False, n_low: int | None = None, n_high: int | None = None,
                   importance_samples: int = 32, settings: dict | None = None) -> dict:
    """Shared driver of every calibrated method: sequential compression with ``compress_one`` per linear.

    ``compress_one(w, h, layer_scheme, bias) -> (PackedLinear | dense tensor, stats)``. With ``cfs`` the
    coarse stage runs first on the uncompressed model (``importance_samples`` calibration sequences).
    """
    from pbs2pc.models.calibration import calibration_ids, layer_cosines, sequential_compress

    ids = calibration_ids(tokenizer, calib_ids, calib, nsamples, seqlen, seed)
    lo, hi = default_bounds(scheme.n, scheme.m, n_low, n_high)
    if cfs:
        allocate_n([1.0], scheme.n, scheme.m, lo, hi)  # validates the bounds before any work

    def prepare(hidden, kwargs):
        if not cfs:
            return None
        cos = layer_cosines(model, hidden[:importance_samples], kwargs, device, batch_size)
        imp = layer_importance(cos)
        return {"cosine": cos, "importance": imp, "n_per_layer": allocate_n(imp, scheme.n, scheme.m, lo, hi)}

    def compress_layer(i, linears, hessians, prepared):
        n_i = prepared["n_per_layer"][i] if prepared else scheme.n
        layer_scheme = NMScheme(n_i, scheme.m, scheme.group_size)
        reps, stats = {}, {}
        for name, lin in linears.items():
            w = lin.weight.detach().float()
            rep, st = compress_one(w, hessians[name].to(w.device), layer_scheme, lin.bias)
            reps[name] = rep
            stats[name] = {**st, "numel": w.numel()}
        return reps, {"n": next(iter(stats.values()))["n"], "linears": stats}

    all_settings = {"method": method, "scheme": str(scheme), "cfs": cfs, "bounds": [lo, hi], "nsamples": len(ids),
                    "seqlen": int(ids.shape[1]), **(settings or {})}
    result = sequential_compress(model, ids, compress_layer, all_settings, device=device, batch_size=batch_size,
                                 resume_dir=resume_dir, progress=progress, desc=method, prepare=prepare,
                                 stop_after_layer=stop_after_layer)
    return summarize(result, all_settings)


def summarize(result: dict, settings: dict) -> dict:
    """Manifest info: settings, per-layer N and time, per-linear errors, mean errors, honest bits."""
    layers = result["layers"]
    sizes, bits = [], {"interchange": 0.0, "compact": 0.0, "paper": 0.0}
    total = 0
    for st in layers:
        for lin in st["linears"].values():
            total += lin["numel"]
            for k in bits:
                bits[k] += lin["bits"][k] * lin["numel"]
    info = {
        "settings": settings,
        "bits_per_weight": {k: round(v / total, 4) for k, v in bits.items()},
        "n_per_layer": [st["n"] for st in layers],
        "seconds_per_layer": [st["seconds"] for st in layers],
        "compress_seconds": round(sum(st["seconds"] for st in layers), 2),
        "mean_out_err": round(sum(l["out_err"] for st in layers for l in st["linears"].values())
                              / sum(len(st["linears"]) for st in layers), 6),
        "layer_stats": layers,
    }
    if result.get("prepared"):
        info["cfs"] = result["prepared"]
    return info


def make_method(name: str, spbo_on: bool = True, cfs: bool = True, mask_first: bool = False,
                groups: bool = True, residual: bool = True):
    """A ``compress_model`` method: PBS2P or one of its ablations / the N:M-then-binarize baseline."""

    def method(model, scheme: NMScheme, *, steps: int | None = None, iters: int = 15, percdamp: float = 0.01,
               rescore: bool = False, compensate: bool = True, **options) -> dict:
        def one(w, h, layer_scheme, bias):
            return compress_linear(w, h, layer_scheme, spbo_on=spbo_on, steps=steps, iters=iters, percdamp=percdamp,
                                   compensate=compensate, rescore=rescore, mask_first=mask_first, groups=groups,
                                   residual=residual, bias=bias)

        settings = {"steps": steps, "iters": iters, "percdamp": percdamp, "rescore": rescore,
                    "compensate": compensate, "spbo": spbo_on, "mask_first": mask_first, "groups": groups,
                    "residual": residual}
        return run_calibrated(model, scheme, one, method=name, cfs=cfs, settings=settings, **options)

    method.__name__ = name.replace("-", "_")
    method.__doc__ = (f"{name}: spbo={spbo_on}, cfs={cfs}, mask_first={mask_first}, groups={groups}, "
                      f"residual={residual} (see :mod:`.pbs2p`).")
    return method
