"""Models compressed with the calibrated PBS2P method (per-layer N from CFS, the BiLLM/ARB structure of op
contract v2; and the single-plane variant, v1) export and compile unchanged."""

import numpy as np
import onnx
import torch

from testutil import make_ids, ort_logits, rel_err


def test_pbs2p_with_cfs_exports_and_compiles(tmp_path):
    from pbs2pc.compiler.build import compile_model
    from pbs2pc.models import compress, export, hf
    from pbs2pc.runtime import load

    model = hf.tiny_llama(seed=5, num_hidden_layers=3)
    calib = torch.from_numpy(make_ids(8, 32, seed=6))
    info = compress.compress_model(model, "6:8", method="pbs2p", calib_ids=calib, nsamples=8, seqlen=32,
                                   progress=False)
    path = export.export(model, tmp_path / "m.onnx", info)
    schemes = {onnx.helper.get_attribute_value(a) for n in onnx.load(str(path), load_external_data=False).graph.node
               if n.domain == "pbs2p" for a in n.attribute if a.name == "n"}
    assert schemes <= {5, 6, 7} and len(schemes) > 1  # CFS gave the layers different N
    graph = onnx.load(str(path), load_external_data=False).graph
    # the structure is in the file: every layer has groups and a salient residual (op contract v2)
    assert all(len(n.input) == 13 and n.input[6] and n.input[9] for n in graph.node if n.domain == "pbs2p")
    compile_model(path, tmp_path / "m.so", "x86")
    ids = make_ids(1, 13, seed=7)
    with torch.inference_mode():
        ref = model(torch.from_numpy(ids), use_cache=False).logits.numpy()
    assert rel_err(ort_logits(path, ids), ref) < 1e-5
    assert rel_err(load(tmp_path / "m.so").logits(ids), ref) < 1e-5


def test_single_plane_pbs2p_writes_v1_files(tmp_path):
    from pbs2pc.models import compress, export, hf

    model = hf.tiny_llama(seed=5, num_hidden_layers=2)
    calib = torch.from_numpy(make_ids(4, 32, seed=6))
    info = compress.compress_model(model, "6:8", method="pbs2p-1plane", calib_ids=calib, nsamples=4, seqlen=32,
                                   progress=False)
    path = export.export(model, tmp_path / "m.onnx", info)
    m = onnx.load(str(path), load_external_data=False)
    assert {o.version for o in m.opset_import if o.domain == "pbs2p"} == {1}
    assert all(len(n.input) <= 6 for n in m.graph.node if n.domain == "pbs2p")
