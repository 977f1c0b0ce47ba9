"""--target cuda: builds here need nvcc only; what they embed is read back with cuobjdump (no GPU needed).
Numerics need a GPU: those tests are skipped, with the reason, on machines without one
(``benchmarks/gpu_check.py`` runs the full check on a GPU machine)."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from pbs2pc.compiler import cuda_export

pytestmark = pytest.mark.skipif(cuda_export.nvcc_path() is None, reason="no nvcc: CUDA builds need the CUDA toolkit")


def _cuobjdump():
    tool = cuda_export.cuda_tool("cuobjdump")
    if tool is None:
        pytest.skip("no cuobjdump: pip install -e '.[cuda]'")
    return tool


def _gpu_reason() -> str:
    """Why GPU tests cannot run here ("" when they can); never raises."""
    try:
        import ctypes.util

        if ctypes.util.find_library("cuda") is None:
            return "no NVIDIA driver (libcuda) on this machine"
        from pbs2pc.runtime.model import cuda_device
        from pbs2pc.compiler.tvm_compat import tvm

        cuda_device(tvm, {"arch": "sm_80"}, "test")
        return ""
    except Exception as exc:  # noqa: BLE001 - a probe: any failure means no usable GPU
        return f"no usable CUDA GPU ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"


requires_gpu = pytest.mark.skipif(bool(_gpu_reason()), reason=_gpu_reason() or "GPU present")


@pytest.fixture(scope="module")
def cuda_library(tiny_onnx, tmp_path_factory):
    from pbs2pc.compiler.build import compile_model

    path = tmp_path_factory.mktemp("cuda") / "model.so"
    manifest = compile_model(tiny_onnx, path, "cuda")
    return path, manifest


def _sass(tool, fatbin: bytes, tmp_path) -> str:
    path = tmp_path / "code.fatbin"
    path.write_bytes(fatbin)
    return subprocess.run([tool, "-sass", str(path)], capture_output=True, text=True, check=True).stdout


def test_library_embeds_sm90_sass_and_no_source(cuda_library, tmp_path):
    lib, manifest = cuda_library
    data = lib.read_bytes()
    modules = cuda_export.device_modules(lib)
    assert modules and all(fmt == "fatbin" for fmt, _ in modules)
    # No CUDA source, nothing that would compile at load time.
    assert b"__global__" not in data and b"tvm_callback_cuda_compile" not in data and b"extern \"C\"" not in data
    assert b"vm.builtin.cuda_graph.run_or_capture" in data  # decode's static regions run as CUDA graphs
    fatbin = modules[0][1]
    assert sorted(cuda_export.fatbin_archs(fatbin)) == ["compute_90", "sm_90"]
    listing = subprocess.run([_cuobjdump(), "-lelf", "-lptx", str(_write(tmp_path / "m.fatbin", fatbin))],
                             capture_output=True, text=True, check=True).stdout
    assert "sm_90.cubin" in listing and "sm_90.ptx" in listing
    gpu = manifest["gpu"]
    assert gpu["arch"] == "sm_90" and gpu["cuda_version"] == cuda_export.nvcc_version() and gpu["min_driver"]
    assert manifest["layout"] == {"word_bits": 32, "interleave": 4, "mask_codes": False}
    assert manifest["kernels"] == ["cuda.gemv_fp32"]


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_inspect_shows_the_embedded_archs(cuda_library, capsys):
    from pbs2pc.cli import main

    lib, _ = cuda_library
    assert main(["inspect", str(lib)]) == 0
    out = capsys.readouterr().out
    assert "runs on NVIDIA GPUs sm_90" in out and "device code embedded: compute_90, sm_90" in out


def _kernel_fatbin(func, arch: str, tmp_path) -> tuple[str, bytes]:
    """The CUDA source and fatbin of one PrimFunc built for ``arch``."""
    from pbs2pc.compiler.targets import get_preset
    from pbs2pc.compiler.tvm_compat import tvm

    target = get_preset("cuda", arch=arch).tvm_target()
    ex = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    source = ex.mod.imports[0].inspect_source("cuda")
    return source, cuda_export.compile_fatbin(source, arch, tmp_path)


@pytest.mark.parametrize("groups", [False, True])
def test_gemv_sass_has_128_bit_loads_and_lop3(groups, tmp_path):
    from pbs2pc.passes.kernels.cuda import sparse_binary_gemv as gemv

    func = gemv.gemv(4096, 11008, 128, True, True, True, has_groups=groups)
    source, fatbin = _kernel_fatbin(func, "sm_90", tmp_path)
    sass = _sass(_cuobjdump(), fatbin, tmp_path)
    assert "uint4" in source  # the planes' words of 4 rows: one 16-byte vector
    assert "LDG.E.128" in sass and "LOP3" in sass and "BAR.SYNC" in sass
    assert gemv.splits_for(4096, 11008) == 2  # 344 words per row: two K splits, added atomically
    assert "REDG.E.ADD.F32" in sass and "main_kernel_1" in source  # y set to the bias first, then the splits


def test_gemv_split_k_and_arch_choice(tmp_path):
    from pbs2pc.passes.kernels.cuda import sparse_binary_gemv as gemv

    # Tall K, few row tiles: split until the grid fills the GPU; each split at most 256 words.
    assert gemv.splits_for(8192, 28672) == 4 and gemv.splits_for(28672, 8192) == 1
    assert gemv.splits_for(576, 1536) == 1  # 48 words: halves would leave lanes idle
    assert not gemv.supported(4100, 4096, 128, 4, "uint32") and gemv.supported(80, 96, 32, 4, "uint32")
    _source, fatbin = _kernel_fatbin(gemv.gemv(80, 96, 32, False, False, False), "sm_80", tmp_path)
    assert sorted(cuda_export.fatbin_archs(fatbin)) == ["compute_80", "sm_80"]


def test_attention_kernel_builds(tmp_path):
    from pbs2pc.passes.kernels.cuda.attention import cached_attention

    _source, fatbin = _kernel_fatbin(cached_attention(9, 3, 64, 0.125), "sm_90", tmp_path)
    sass = _sass(_cuobjdump(), fatbin, tmp_path)
    assert "BAR.SYNC" in sass and "STS" in sass and "LDS" in sass


def test_blob_round_trip():
    tree = (np.array([4, 0, 1, 2, 2], "<u8").tobytes() + np.array([2, 1, 2], "<u8").tobytes())
    modules = [("relax.VMExecutable", b"exe"), ("_lib", None), ("cuda", b"\x04" + b"\0" * 7 + b"cuda" + b"tab"
                                                                      + np.array([3], "<u8").tobytes() + b"src")]
    blob = cuda_export.build_blob(tree, modules)
    assert cuda_export.parse_blob(blob) == (tree, modules)
    assert cuda_export.split_cuda_module(modules[2][1]) == ("cuda", b"tab", b"src")


@requires_gpu
def test_compiled_logits_match_onnxruntime_on_the_gpu(cuda_library, tiny_onnx):
    from pbs2pc.runtime import load
    from testutil import make_ids, ort_logits, rel_err

    lib, _ = cuda_library
    model = load(lib)
    for batch, seq in ((1, 1), (1, 17), (2, 5)):
        ids = make_ids(batch, seq, seed=seq)
        assert rel_err(model.logits(ids), ort_logits(tiny_onnx, ids)) < 1e-4


@pytest.mark.parametrize("groups, salient", [(True, 4), (False, 4)])
def test_v2_one_token_layers_run_the_gpu_gemv(groups, salient, tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from pbs2pc.compiler.build import compile_model
    from pbs2pc.models.format import ARRAY_FIELDS
    from testutil import v2_layer

    layer = v2_layer(48, 192, 64, groups=groups, salient=salient, has_bias=False)
    names = [f"w.{r}" if getattr(layer, r) is not None else "" for r in ARRAY_FIELDS]
    while not names[-1]:
        names.pop()
    inits = [numpy_helper.from_array(getattr(layer, r), f"w.{r}") for r in ARRAY_FIELDS if getattr(layer, r) is not None]
    node = helper.make_node("SparseBinaryLinear", ["x", *names], ["y"], domain="pbs2p", name="layer",
                            n=6, m=8, group_size=64)
    graph = helper.make_graph([node], "v2", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 192])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 48])], inits)
    path = tmp_path / "layer.onnx"
    onnx.save(helper.make_model(graph, ir_version=10, opset_imports=[
        helper.make_opsetid("", 18), helper.make_opsetid("pbs2p", layer.version)]), str(path))
    manifest = compile_model(path, tmp_path / "layer.so", "cuda")
    assert manifest["kernels"] == ["cuda.gemv_fp32"]
    assert all(fmt == "fatbin" for fmt, _ in cuda_export.device_modules(tmp_path / "layer.so"))
    if not _gpu_reason():
        from pbs2pc.runtime import load

        x = np.random.default_rng(0).standard_normal((1, 192)).astype(np.float32)
        got = load(tmp_path / "layer.so").run({"x": x})["y"]
        assert np.abs(got - layer.matmul(x)).max() < 1e-4 * np.abs(layer.matmul(x)).max()


def test_prompt_gemm_uses_tensor_cores(tmp_path):
    from pbs2pc.passes.kernels.cuda import sparse_binary_gemm as gemm
    from pbs2pc.passes.schedules import gpu_rules
    from pbs2pc.compiler.targets import get_preset
    from pbs2pc.compiler.tvm_compat import dlight, tvm

    target = get_preset("cuda").tvm_target()
    mod = tvm.IRModule({"main": gemm.gemm(128, 256, 128, True, True, True).with_attr("global_symbol", "main")})
    with target:
        mod = dlight.ApplyDefaultSchedule(*gpu_rules())(mod)
    ex = tvm.compile(mod, target=target)
    fatbin = cuda_export.compile_fatbin(ex.mod.imports[0].inspect_source("cuda"), "sm_90", tmp_path)
    assert "HMMA.16816.F32" in _sass(_cuobjdump(), fatbin, tmp_path)


@pytest.mark.parametrize("groups", [False, True])
def test_prompt_gemm_compute_on_the_cpu(groups):
    """The GEMM's compute (decode, fp16 rounding, fp32 sums, bias), unscheduled and built for the CPU."""
    from pbs2pc.passes.kernels.cuda import sparse_binary_gemm as gemm
    from pbs2pc.compiler.tvm_compat import tvm
    from testutil import v2_layer

    n, k, g = 80, 96, 32
    layer = v2_layer(n, k, g, groups=groups, salient=0)
    func = gemm.gemm(n, k, g, True, True, True, has_groups=groups).with_attr("global_symbol", "main")
    f = tvm.compile(tvm.IRModule({"main": func}), target="llvm")["main"]
    inter = lambda a: np.ascontiguousarray(a.reshape(n // 4, 4, -1).swapaxes(1, 2))  # noqa: E731
    args = [inter(layer.sign.view(np.uint32)), inter(layer.mask.view(np.uint32)), inter(layer.alpha),
            inter(layer.mu), layer.bias]
    if groups:
        args += [inter(layer.group), inter(layer.group_alpha), inter(layer.group_mu)]
    x = np.random.default_rng(0).standard_normal((5, k)).astype(np.float32)
    y = tvm.runtime.tensor(np.full((5, n), np.nan, np.float32))
    f(tvm.runtime.tensor(x), *[tvm.runtime.tensor(a) for a in args], y)
    w16 = layer.dense().astype(np.float16).astype(np.float64)
    ref = x.astype(np.float16).astype(np.float64) @ w16.T + layer.bias
    assert np.abs(y.numpy() - ref).max() < 1e-5 * np.abs(ref).max()
    # against the fp32 layer: the cost of fp16 inputs and weights
    assert np.abs(y.numpy() - layer.matmul(x)).max() < 3e-3 * np.abs(layer.matmul(x)).max()


@pytest.mark.skipif(not _gpu_reason(), reason="this machine has a GPU")
def test_without_a_gpu_running_says_so_in_one_line(cuda_library, capsys):
    from pbs2pc.cli import main

    lib, _ = cuda_library
    assert main(["run", str(lib), "--input-ids", "1,2,3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and ("NVIDIA" in err or "GPU" in err), err
