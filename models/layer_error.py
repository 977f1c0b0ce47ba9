"""Per-layer reconstruction error, per method, from the statistics the calibrated methods record.

Every calibrated method (PBS2P, its ablations, the baselines) records for every linear, on its own
calibration inputs (the compressed model's activations, as the pipeline propagates them):

- ``out_err = ||(W - W_hat) X||^2 / ||W X||^2 = tr(dW H dW^T) / tr(W H W^T)`` with ``H = 2/n X X^T``;
- ``w_err = ||W - W_hat||^2 / ||W||^2``;
- for PBS2P, ``step_w_err``: the block-local weight error after every SPBO step, where step 0 is the plain
  dense ARB binarization of the same (compensated) block: the paper's "SPBO vs plain binarization" claim.
"""

from __future__ import annotations


def per_layer(info: dict, key: str = "out_err") -> list[float]:
    """Mean ``key`` over the linears of every decoder layer."""
    return [sum(l[key] for l in st["linears"].values()) / len(st["linears"]) for st in info["layer_stats"]]


def per_linear_type(info: dict, key: str = "out_err") -> dict[str, float]:
    """Mean ``key`` per linear type (``self_attn.q_proj``, ``mlp.down_proj``...) over all layers."""
    sums: dict[str, list[float]] = {}
    for st in info["layer_stats"]:
        for name, lin in st["linears"].items():
            sums.setdefault(name, []).append(lin[key])
    return {name: sum(v) / len(v) for name, v in sums.items()}


def spbo_vs_plain(info: dict) -> dict:
    """Parameter-weighted block weight error of plain binarization (SPBO step 0) and after SPBO's last step.

    ``steps`` follows the error through every step, over the linears of the most common N (layers with
    another N, from CFS, take a different number of steps).
    """
    lins = [lin for st in info["layer_stats"] for lin in st["linears"].values() if lin.get("step_w_err")]
    if not lins:
        return {"plain": None, "final": None, "steps": [], "n": None}
    total = sum(l["numel"] for l in lins)
    plain = sum(l["step_w_err"][0] * l["numel"] for l in lins) / total
    final = sum(l["step_w_err"][-1] * l["numel"] for l in lins) / total
    counts: dict[int, int] = {}
    for l in lins:
        counts[l["n"]] = counts.get(l["n"], 0) + l["numel"]
    n = max(counts, key=counts.get)
    same = [l for l in lins if l["n"] == n]
    size = sum(l["numel"] for l in same)
    steps = [sum(l["step_w_err"][i] * l["numel"] for l in same) / size for i in range(len(same[0]["step_w_err"]))]
    return {"plain": plain, "final": final, "steps": steps, "n": n}
