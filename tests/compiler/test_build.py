"""Compiling the tiny Llama: numerics against onnxruntime, the artifact's contents, the pass's effect."""

import json

import numpy as np
import pytest

from pbs2pc.compiler import frontend
from pbs2pc.compiler.targets import get_preset
from pbs2pc.errors import Pbs2pcError, ToolchainError
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
    # The target layout the registry chose for this machine's x86 preset: byte planes and float16 scales,
    # row-interleaved in blocks of T rows, [N/T, C, T] (down_proj: N = 64 outputs, K = 128 inputs -> 16 plane
    # bytes, G = 64 -> 2 groups), or rows in order.
    layout = manifest["layout"]
    t = layout["interleave"]
    assert by_name[f"{layer}.sign"]["dtype"] == "uint8" and by_name[f"{layer}.alpha"]["dtype"] == "float16"
    assert by_name[f"{layer}.sign"]["shape"] == ([64 // t, 16, t] if t else [64, 16])
    assert by_name[f"{layer}.alpha"]["shape"] == ([64 // t, 2, t] if t else [64, 2])
    assert not any(name.startswith(layer) and p["dtype"] == "float32" for name, p in by_name.items())
    # No dense float32 copy of any compressed weight, in the library or the weights file: search for the
    # bytes of a decoded row.
    module = tiny_compressed[0].get_submodule(layer)
    row = module.decode()[3, :16].numpy().astype(np.float32).tobytes()
    assert row not in lib.read_bytes() and row not in weights.read_bytes()
    assert manifest["target"] == get_preset("x86").name and manifest["tvm_version"].startswith("0.27")
    assert manifest["summary"]["bits_interchange"] == 2.5
    _assert_bits_target(manifest, by_name)
    assert by_name[f"{layer}.mask"]["shape"] == by_name[f"{layer}.sign"]["shape"] or layout["mask_codes"]


def _assert_bits_target(manifest, by_name):
    stored = sum(np.prod(p["shape"]) * np.dtype(p["dtype"]).itemsize for name, p in by_name.items()
                 if name.rsplit(".", 1)[-1] in ("sign", "mask", "alpha", "mu"))
    assert manifest["summary"]["bits_target"] == round(8 * stored / manifest["summary"]["weights"], 4)


def test_manifest_records_the_target_and_what_the_cpu_needs(tiny_library):
    from pbs2pc import cpu

    manifest = json.loads(artifact_paths(tiny_library)[2].read_text())
    preset = get_preset("x86")
    assert manifest["target"] == preset.name and manifest["isa"] == preset.isa and manifest["machine"] == "x86_64"
    assert manifest["cpu_features"] == list(preset.features) and not cpu.missing(manifest["cpu_features"])
    assert {"avx2", "fma", "f16c"} <= set(manifest["cpu_features"])
    assert manifest["target_dict"]["num-cores"] >= 1 and manifest["options"] == {"activations": "fp32", "lm_head": "fp32"}


def test_a_library_refuses_a_cpu_without_its_features(tiny_onnx, tmp_path, monkeypatch):
    """An x86-avx512 library on a CPU without AVX-512 (forced with PBS2PC_CPU_FEATURES on any host): one
    sentence naming the missing features and the target to recompile with, before any code is loaded."""
    from pbs2pc.compiler.build import compile_model
    from pbs2pc.compiler.targets import X86_AVX2
    from pbs2pc.cpu import FEATURES_ENV

    compile_model(tiny_onnx, tmp_path / "m.so", "x86-avx512")
    monkeypatch.setenv(FEATURES_ENV, ",".join(X86_AVX2.features))
    with pytest.raises(Pbs2pcError, match=r"needs the CPU features avx512f, .* --target x86-avx2") as err:
        load(tmp_path / "m.so")
    assert len(str(err.value).splitlines()) == 1
    # a manifest naming a feature no CPU has is refused on every host, with no override
    monkeypatch.delenv(FEATURES_ENV)
    path = artifact_paths(tmp_path / "m.so")[2]
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "cpu_features": ["avx2", "pbs2pc_no_such_feature"]}))
    with pytest.raises(Pbs2pcError, match="pbs2pc_no_such_feature"):
        load(tmp_path / "m.so")
    path.write_text(json.dumps({**manifest, "cpu_features": [], "machine": "aarch64"}))
    with pytest.raises(Pbs2pcError, match="was built for aarch64"):
        load(tmp_path / "m.so")


def test_avx512_build_dumps_every_phase_and_stores_mask_codes(tiny_onnx, tmp_path):
    """Compile-only (LLVM cross-generates AVX-512 code on any x86 host)."""
    from pbs2pc.compiler.build import compile_model
    from pbs2pc.compiler.pipeline import phases
    from pbs2pc.passes.kernels.x86_avx512 import mask_codes

    manifest = compile_model(tiny_onnx, tmp_path / "m.so", "x86-avx512", dump_ir=tmp_path / "ir")
    # 6:8 masks as 5-bit pattern codes: [N/16, K/32 x 40 + 24] bytes; the compiled bits per weight count them
    by_name = {p["name"]: p for p in manifest["params"]}
    assert by_name["model.layers.0.mlp.down_proj.mask"]["shape"] == [4, mask_codes.code_width(128)] == [4, 184]
    _assert_bits_target(manifest, by_name)
    assert 1.9 < manifest["summary"]["bits_target"] < 2.5  # the tail bytes weigh more at K = 64 and 128
    assert manifest["layout"] == {"word_bits": 8, "interleave": 16, "mask_codes": True}
    assert "avx512vbmi" in manifest["cpu_features"] and manifest["isa"] == "x86-avx512"
    dumps = sorted(p.name for p in (tmp_path / "ir").iterdir())
    assert len(dumps) == len(phases(get_preset("x86-avx512"))) + 1
    assert dumps[:4] == ["00_imported.py", "01_clip_take.py", "02_use_kv_cache.py", "03_lower_pbs2p.py"]
    assert "pbs2p.op" in (tmp_path / "ir" / dumps[0]).read_text()
    assert "call_tir_inplace" in (tmp_path / "ir" / dumps[2]).read_text()
    lowered = (tmp_path / "ir" / dumps[3]).read_text()  # x86: the hand-written lookup-table GEMV and GEMM
    assert "def sparse_binary_gemv_g64_" in lowered and "def sparse_binary_gemm_g64_" in lowered


def test_unsupported_targets_fail_clearly(tiny_onnx, tmp_path):
    from pbs2pc.compiler.build import compile_model

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
