"""GPTQ baseline: grids, error against round-to-nearest, honest bits, and the registry on the tiny Llama."""

import math

import numpy as np
import pytest
import torch

from pbs2pc.errors import Pbs2pcError
from pbs2pc.models import hf
from pbs2pc.models.compress import METHODS, PYTORCH_ONLY, compress_model
from pbs2pc.models.format import NMScheme
from pbs2pc.models.gptq import gptq_linear, gptq_quantize, honest_bits
from pbs2pc.models.modules import decoder_linears
from pbs2pc.models.pbs2p import prepare_hessian

ROWS, K, G = 48, 320, 128  # K = 2.5 groups: the last group is partial, as SmolLM2's K = 576


def _problem(seed=0, dead=()):
    """A weight and the Hessian ``2/n X^T X`` of strongly correlated inputs (a few dead columns)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((ROWS, K)) * rng.uniform(0.5, 2.0, (ROWS, 1))
    mix = rng.standard_normal((K // 8, K))
    x = rng.standard_normal((2048, K // 8)) @ mix + 0.1 * rng.standard_normal((2048, K))
    x[:, list(dead)] = 0.0
    h = 2.0 / len(x) * x.T @ x
    return torch.tensor(w, dtype=torch.float32), torch.tensor(h, dtype=torch.float32)


def _rtn(w: np.ndarray, bits: int) -> np.ndarray:
    """Round-to-nearest on the same kind of grid: per row, per 128 columns, min-max containing 0, fp16 scale."""
    maxq = 2**bits - 1
    out = np.empty_like(w)
    for s in range(0, w.shape[1], G):
        blk = w[:, s : s + G]
        lo = np.minimum(blk.min(1, keepdims=True), 0)
        hi = np.maximum(blk.max(1, keepdims=True), 0)
        scale = ((hi - lo) / maxq).astype(np.float16).astype(np.float64)
        zero = np.round(-lo / scale)
        out[:, s : s + G] = scale * (np.clip(np.round(blk / scale) + zero, 0, maxq) - zero)
    return out


def _out_err(w, q, h):
    d = np.asarray(w, np.float64) - np.asarray(q, np.float64)
    return float(np.trace(d @ np.asarray(h, np.float64) @ d.T))


@pytest.mark.parametrize("bits", [2, 3])
def test_every_row_group_lies_on_its_min_max_grid(bits):
    w0, h = _problem(dead=(5, 200))
    w, u = prepare_hessian(w0, h)
    q, scale, zero = gptq_quantize(w, u, bits)
    maxq = 2**bits - 1
    assert scale.shape == zero.shape == (ROWS, math.ceil(K / G))
    assert torch.equal(scale, scale.half().float())  # the scale that is stored (fp16) is the one used
    assert torch.equal(zero, zero.round()) and zero.min() >= 0 and zero.max() <= maxq
    for g in range(scale.shape[1]):
        block = q[:, g * G : (g + 1) * G].double()
        s, z = scale[:, g : g + 1].double(), zero[:, g : g + 1].double()
        levels = torch.round(block / s + z)
        assert levels.min() >= 0 and levels.max() <= maxq
        torch.testing.assert_close(block, s * (levels - z), rtol=0, atol=1e-6)
        for r in range(ROWS):
            assert len(torch.unique(block[r])) <= 2**bits
    # the first group is fitted before any compensation: on the weights themselves
    first = w.numpy()[:, :G]
    span = np.maximum(first.max(1), 0) - np.minimum(first.min(1), 0)
    np.testing.assert_array_equal(scale[:, 0].numpy(), (span / maxq).astype(np.float16).astype(np.float32))
    assert (q[:, [5, 200]] == 0).all()  # dead columns are zeroed and 0 is on every grid


@pytest.mark.parametrize("bits", [2, 3])
def test_gptq_output_error_is_below_round_to_nearest(bits):
    w0, h = _problem(seed=1)
    q, stats = gptq_linear(w0, h, NMScheme(8, 8, 64), bits=bits)
    gptq_err = _out_err(w0, q, h)
    rtn_err = _out_err(w0, _rtn(w0.numpy().astype(np.float64), bits), h)
    assert gptq_err < 0.3 * rtn_err, (gptq_err, rtn_err)
    ref = _out_err(w0, np.zeros_like(w0), h)
    assert stats["out_err"] == pytest.approx(gptq_err / ref, rel=1e-3)


def test_honest_bits_count_a_fp16_scale_and_a_zero_per_group():
    assert honest_bits(2, 576) == pytest.approx(2 + 18 * 5 / 576)  # 2.15625: 4.5 groups round up to 5
    assert honest_bits(3, 576) == pytest.approx(3 + 19 * 5 / 576)
    assert honest_bits(2, 4096) == pytest.approx(2.140625)
    assert honest_bits(3, 4096) == pytest.approx(3.1484375)
    _, stats = gptq_linear(*_problem(), NMScheme(6, 8, 64), bits=3)
    assert stats["bits"] == {"interchange": honest_bits(3, K), "compact": honest_bits(3, K), "paper": 3.0}
    assert stats["n"] == 8  # nothing is pruned


IDS = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(0))


def test_registered_gptq_compresses_the_tiny_llama_in_place():
    assert {"gptq-w2", "gptq-w3"} <= set(METHODS) and {"gptq-w2", "gptq-w3"} <= set(PYTORCH_ONLY)
    model = hf.tiny_llama()
    info = compress_model(model, "6:8", None, "gptq-w3", calib_ids=IDS, progress=False, batch_size=4)
    assert info["exportable"] is False and info["n_per_layer"] == [8, 8]
    assert info["bits_per_weight"]["paper"] == 3.0
    assert 3.1 < info["bits_per_weight"]["compact"] < 3.3  # K = 64 and 128: one group each
    for lin in decoder_linears(model).values():
        assert type(lin) is torch.nn.Linear
        wt = lin.weight.detach()
        for s in range(0, wt.shape[1], G):
            assert max(len(torch.unique(row)) for row in wt[:, s : s + G]) <= 8
    for st in info["layer_stats"]:
        assert all(0 <= lin["out_err"] < 1 for lin in st["linears"].values())


def test_options_of_other_methods_are_refused():
    with pytest.raises(Pbs2pcError, match="does not apply"):
        compress_model(hf.tiny_llama(), "6:8", None, "gptq-w2", calib_ids=IDS, progress=False, iters=15)
