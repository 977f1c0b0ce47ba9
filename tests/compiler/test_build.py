"""Compiling the tiny Llama: numerics against onnxruntime, the artifact's contents, the pass's effect."""

import json

import numpy as np
import pytest

from pbs2pc.compiler import frontend
from pbs2pc.compiler.targets import get_preset
from pbs2pc.errors import Pbs2pcError, ToolchainError, UnsupportedError
from pbs2pc.passes import LowerSparseBinaryLinear
from pbs2pc.runtime import load
from pbs2pc.runtime.artifact import artifact_paths
from testutil import make_ids, ort_logits, rel_err


@pytest.mark.parametrize("batch,seq", [(1, 1), (1, 17), (2, 5)])
def test_compiled_logits_match_onnxruntime(tiny_library, tiny_onnx, batch, seq):
    ids = make_ids(batch, seq, seed=seq)
    got = load(tiny_library).logits(ids)
    assert got.shape == (batch, seq, 256)
    assert rel_err(got, ort_logits(tiny_onnx, ids)) < 1e-5


def test_lowering_replaces_every_reference_function(tiny_onnx):
    mod = LowerSparseBinaryLinear()(frontend.import_onnx(tiny_onnx).mod)
    funcs = dict(mod.functions_items())
    tagged = [f.attrs[frontend.OP_ATTR] for f in funcs.values() if f.attrs is not None and frontend.OP_ATTR in f.attrs]
    assert tagged and set(tagged) == {"Attention"}  # attention is UseKVCache's
    kernels = [f for f in funcs.values() if f.attrs is not None and "pbs2p_info" in f.attrs]
    assert kernels and all(int(k.attrs["pbs2p_info"]["n"]) == 6 and int(k.attrs["pbs2p_info"]["has_mask"]) for k in kernels)
    main_text = mod["main"].script()
    assert main_text.count("R.call_tir(sparse_binary_linear_6of8_g64_") == 14


def test_artifact_holds_packed_weights_only(tiny_library, tiny_compressed):
    lib, weights, manifest_path = artifact_paths(tiny_library)
    manifest = json.loads(manifest_path.read_text())
    by_name = {p["name"]: p for p in manifest["params"]}
    layer = "model.layers.0.mlp.down_proj"
    # The x86 target layout: byte planes and float16 scales, both row-interleaved in blocks of 16 rows,
    # [N/16, C, 16] (down_proj: N = 64 outputs, K = 128 inputs -> 16 plane bytes, G = 64 -> 2 groups).
    assert by_name[f"{layer}.sign"]["dtype"] == "uint8" and by_name[f"{layer}.alpha"]["dtype"] == "float16"
    assert by_name[f"{layer}.sign"]["shape"] == [4, 16, 16] and by_name[f"{layer}.alpha"]["shape"] == [4, 2, 16]
    assert not any(name.startswith(layer) and p["dtype"] == "float32" for name, p in by_name.items())
    # No dense float32 copy of any compressed weight, in the library or the weights file: search for the
    # bytes of a decoded row.
    module = tiny_compressed[0].get_submodule(layer)
    row = module.decode()[3, :16].numpy().astype(np.float32).tobytes()
    assert row not in lib.read_bytes() and row not in weights.read_bytes()
    assert manifest["target"] == "x86" and manifest["tvm_version"].startswith("0.27")
    assert manifest["summary"]["bits_interchange"] == 2.5
    # 6:8 masks as 5-bit pattern codes: [N/16, K/32 x 40 + 24] bytes; the compiled bits per weight count them
    from pbs2pc.passes.kernels import mask_codes

    assert by_name[f"{layer}.mask"]["shape"] == [4, mask_codes.code_width(128)] == [4, 184]
    stored = sum(np.prod(p["shape"]) * np.dtype(p["dtype"]).itemsize for name, p in by_name.items()
                 if name.rsplit(".", 1)[-1] in ("sign", "mask", "alpha", "mu"))
    assert manifest["summary"]["bits_target"] == round(8 * stored / manifest["summary"]["weights"], 4)
    assert 1.9 < manifest["summary"]["bits_target"] < 2.5  # the tail bytes weigh more at K = 64 and 128


def test_dump_ir_writes_every_phase(tiny_onnx, tmp_path):
    from pbs2pc.compiler.build import compile_model
    from pbs2pc.compiler.pipeline import phases

    compile_model(tiny_onnx, tmp_path / "m.so", "x86", dump_ir=tmp_path / "ir")
    dumps = sorted(p.name for p in (tmp_path / "ir").iterdir())
    assert len(dumps) == len(phases(get_preset("x86"))) + 1
    assert "pbs2p.op" in (tmp_path / "ir" / dumps[0]).read_text()
    assert "call_tir_inplace" in (tmp_path / "ir" / dumps[1]).read_text()
    lowered = (tmp_path / "ir" / dumps[2]).read_text()  # x86: the hand-written lookup-table GEMV and GEMM
    assert "def sparse_binary_gemv_g64_" in lowered and "def sparse_binary_gemm_g64_" in lowered


def test_unsupported_targets_fail_clearly(tiny_onnx, tmp_path):
    from pbs2pc.compiler.build import compile_model

    with pytest.raises(UnsupportedError, match="'cuda' is not supported yet"):
        compile_model(tiny_onnx, tmp_path / "m.so", "cuda")
    with pytest.raises(Pbs2pcError, match="unknown target 'riscv'"):
        compile_model(tiny_onnx, tmp_path / "m.so", "riscv")
    with pytest.raises(Pbs2pcError, match="must be a .so path"):
        compile_model(tiny_onnx, tmp_path / "m.dll", "x86")
    assert list(tmp_path.iterdir()) == []


def test_missing_toolchain_fails_clearly(tiny_onnx, tmp_path, monkeypatch):
    import pbs2pc.compiler.build as build

    monkeypatch.setattr(build, "_host_compiler_present", lambda: False)
    with pytest.raises(ToolchainError, match="no C\\+\\+ compiler"):
        build.compile_model(tiny_onnx, tmp_path / "m.so", "x86")
    assert list(tmp_path.iterdir()) == []
