"""Every registered method on the tiny Llama: format, statistics, resume."""

import numpy as np
import pytest
import torch

from pbs2pc.models import hf
from pbs2pc.models.compress import METHODS, compress_model
from pbs2pc.models.modules import SparseBinaryLinear, decoder_linears

IDS = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(0))


def _compress(method, nm="6:8", **options):
    model = hf.tiny_llama()
    info = compress_model(model, nm, None, method, calib_ids=IDS, progress=False, batch_size=4, **options)
    return model, info


@pytest.mark.parametrize("method", ["pbs2p", "pbs2p-nospbo", "pbs2p-nocfs", "nm-then-binarize", "sign"])
def test_methods_produce_the_interchange_format(method):
    model, info = _compress(method)
    layers = decoder_linears(model)
    assert all(isinstance(m, SparseBinaryLinear) for m in layers.values())
    for mod in layers.values():
        mod.packed().validate()
    assert len(info["seconds_per_layer"]) == 2 and info["bits_per_weight"]["interchange"] > 1
    expect_n = 8 if method == "sign" else 6
    assert sum(info["n_per_layer"]) == expect_n * 2  # CFS keeps the mean N
    for st in info["layer_stats"]:
        for lin in st["linears"].values():
            assert 0 <= lin["out_err"] < 2


@pytest.mark.parametrize("method", ["billm", "arb"])
def test_dense_residual_baselines_are_pytorch_only(method):
    model, info = _compress(method)
    assert info["exportable"] is False
    assert all(isinstance(m, torch.nn.Linear) for m in decoder_linears(model).values())
    assert 1.0 < info["bits_per_weight"]["paper"] < 2.0


def test_methods_are_registered():
    for name in ["pbs2p", "pbs2p-nospbo", "pbs2p-nocfs", "nm-then-binarize", "sign", "billm", "arb", "simple"]:
        assert name in METHODS


def _planes(model):
    return {name: {k: v for k, v in vars(mod.packed()).items() if isinstance(v, np.ndarray)}
            for name, mod in decoder_linears(model).items()}


def test_resume_gives_the_same_result_as_an_uninterrupted_run(tmp_path):
    whole, info = _compress("pbs2p", resume_dir=tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        _compress("pbs2p", resume_dir=tmp_path / "b", stop_after_layer=0)
    resumed, info2 = _compress("pbs2p", resume_dir=tmp_path / "b")
    assert info2["n_per_layer"] == info["n_per_layer"]
    a, b = _planes(whole), _planes(resumed)
    assert a.keys() == b.keys()
    for name in a:
        for plane in a[name]:
            np.testing.assert_array_equal(a[name][plane], b[name][plane], err_msg=f"{name}.{plane}")


def test_compressed_model_beats_sign_in_layer_error():
    _, pb = _compress("pbs2p", nm="8:8")
    _, sg = _compress("sign")
    assert pb["mean_out_err"] < sg["mean_out_err"]


def test_arb_nm_experiment_prunes_exactly_to_nm():
    model, info = _compress("arb-nm")
    assert info["exportable"] is False
    for lin in decoder_linears(model).values():
        nonzero = (lin.weight != 0).reshape(lin.weight.shape[0], -1, 8).sum(-1)
        assert (nonzero <= 6).all()


def test_sign_refuses_pbs2p_options_with_one_sentence():
    from pbs2pc.errors import Pbs2pcError
    from pbs2pc.models import compress, hf

    with pytest.raises(Pbs2pcError, match="option 'iters' does not apply to method sign"):
        compress.compress_model(hf.tiny_llama(), "6:8", method="sign", iters=3, calib_ids=[[1, 2, 3, 4]])
