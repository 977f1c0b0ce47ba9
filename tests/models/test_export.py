"""ONNX export: the op contract on the wire, the checker, and onnxruntime reproducing PyTorch."""

import onnx
import pytest
import torch

from pbs2pc.errors import UnsupportedError
from pbs2pc.models import export, modules, onnx_op
from testutil import make_ids, ort_logits, rel_err


def test_every_decoder_linear_is_a_pbs2p_node(tiny_onnx, tiny_compressed):
    model = onnx.load(str(tiny_onnx), load_external_data=False)
    nodes = [n for n in model.graph.node if n.domain == onnx_op.DOMAIN]
    assert len(nodes) == len(modules.decoder_linears(tiny_compressed[0])) == 14
    node = nodes[0]
    assert node.op_type == "SparseBinaryLinear" and node.overload == "mask_mu"
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"n": 6, "m": 8, "group_size": 64}
    inits = {t.name: t for t in model.graph.initializer}
    assert inits[node.input[1]].data_type == onnx.TensorProto.UINT8
    assert inits[node.input[3]].data_type == onnx.TensorProto.FLOAT16
    assert not any(n.op_type == "MatMul" and "q_proj" in n.name for n in model.graph.node)


def test_functions_metadata_and_external_data(tiny_onnx):
    model = onnx.load(str(tiny_onnx), load_external_data=False)
    assert {(f.domain, f.name, f.overload) for f in model.functions} == {("pbs2p", "SparseBinaryLinear", "mask_mu")}
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["pbs2p.format_version"] == "1"
    assert meta["source_model"] == "tiny-llama"
    assert '"n": 6' in meta["scheme"]
    assert tiny_onnx.with_name("model.onnx.data").stat().st_size > 100_000
    onnx.checker.check_model(str(tiny_onnx), full_check=True)


def test_onnxruntime_matches_the_compressed_torch_model(tiny_onnx, tiny_compressed):
    model = tiny_compressed[0]
    ids = make_ids(2, 23)
    with torch.inference_mode():
        ref = model(torch.from_numpy(ids), use_cache=False).logits.numpy()
    # fp32 throughout; the two differ only in summation order (measured ~1e-6)
    assert rel_err(ort_logits(tiny_onnx, ids), ref) < 1e-5


def test_untied_head_and_dense_layers_export(tmp_path):
    from pbs2pc.models import compress, hf

    model = hf.tiny_llama(tie_word_embeddings=False, seed=3)
    compress.compress_model(model, "8:8", progress=False)  # dense binary: mask omitted
    path = export.export(model, tmp_path / "m.onnx")
    proto = onnx.load(str(path), load_external_data=False)
    assert {f.overload for f in proto.functions} == {"mu"}
    ids = make_ids(1, 9, seed=4)
    with torch.inference_mode():
        ref = model(torch.from_numpy(ids), use_cache=False).logits.numpy()
    assert rel_err(ort_logits(path, ids), ref) < 1e-5


def test_unsupported_architecture_leaves_nothing_behind(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedError, match="'gpt2' models is not supported"):
        export.export(model, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_compressed_checkpoint_round_trip(tiny_compressed, tmp_path):
    model, info = tiny_compressed
    modules.save_compressed(model, None, tmp_path / "ckpt", info)
    loaded, _, manifest = modules.load_compressed(tmp_path / "ckpt")
    assert manifest["method"] == "simple" and len(manifest["layers"]) == 14
    ids = torch.from_numpy(make_ids(1, 11))
    with torch.inference_mode():
        assert torch.equal(loaded(ids, use_cache=False).logits, model(ids, use_cache=False).logits)
