"""Op contract v2 through the compiler: single-node ONNX files with magnitude groups and/or a salient
residual, compiled for x86-avx2 and checked against the numpy oracle ``PackedLinear.matmul``.

Each file holds one ``pbs2p.SparseBinaryLinear`` node built with ``onnx.helper`` (pbs2p opset 2), its
weights random (``testutil.random_layer`` and ``random_structure``). Each is compiled twice: with ``X`` of
shape ``[rows, K]`` (a symbolic row count: M = 2 and 17, and M = 1 through the same code) and ``[1, K]``
(the one-token call, which the kernel registry serves on x86-avx2). Tolerance: the oracle is float64, the
kernels accumulate in float32 (relative error ~1e-7 measured; 1e-5 allows for long sums, not a wrong bit:
one wrong weight of 192 moves the output by ~1e-2).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("pbs2pc.compiler.tvm_compat")

from pbs2pc.compiler import frontend  # noqa: E402
from pbs2pc.errors import FormatError, UnsupportedError  # noqa: E402
from pbs2pc.models.format import ARRAY_FIELDS, NMScheme, PackedLinear  # noqa: E402
from testutil import random_layer, random_structure, rel_err, requires  # noqa: E402

TOLERANCE = 1e-5


def v2_layer(n, k, g, nm=(6, 8), groups=True, salient=4, has_mu=True, has_bias=True, seed=0) -> PackedLinear:
    """A random layer ``[n, k]`` with the v2 sets asked for (``salient``: salient columns per ``g`` columns)."""
    rng = np.random.default_rng(seed + 100)
    mask_kind = None if nm[0] == nm[1] else f"{nm[0]}:{nm[1]}"
    _, sign, mask, alpha, mu, bias = random_layer(1, n, k, g, mask_kind, has_mu, has_bias, seed)
    return PackedLinear(sign=sign, mask=mask, alpha=alpha, mu=mu, bias=bias, scheme=NMScheme(*nm, g),
                        **random_structure(rng, n, k, g, groups=groups, salient=salient)).validate()


def single_node_model(layer: PackedLinear, rows="rows", opset: int | None = None) -> onnx.ModelProto:
    """One SparseBinaryLinear node ``y = layer(x)``, ``x`` of shape ``[rows, K]``, inputs in ARRAY_FIELDS order."""
    names, inits = [], []
    for role in ARRAY_FIELDS:
        array = getattr(layer, role)
        names.append("" if array is None else f"w.{role}")
        if array is not None:
            inits.append(numpy_helper.from_array(array, f"w.{role}"))
    while not names[-1]:
        names.pop()
    s = layer.scheme
    node = helper.make_node("SparseBinaryLinear", ["x", *names], ["y"], domain="pbs2p", name="layer",
                            n=s.n, m=s.m, group_size=s.group_size)
    graph = helper.make_graph(
        [node], "v2", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, layer.in_features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, layer.out_features])], inits)
    return helper.make_model(graph, ir_version=10, opset_imports=[
        helper.make_opsetid("", 18), helper.make_opsetid("pbs2p", opset or layer.version)])


def compile_and_load(model, path, target="x86-avx2"):
    """``(run(x) -> y, manifest)`` of ``model`` compiled for ``target`` into ``path`` (a distinct .so per model:
    the loader caches libraries by path)."""
    from pbs2pc.compiler.build import compile_model
    from pbs2pc.compiler.tvm_compat import tvm
    from pbs2pc.runtime.artifact import artifact_paths, read_weights
    from tvm.runtime.vm import VirtualMachine

    onnx.save(model, str(path.with_suffix(".onnx")))
    manifest = compile_model(path.with_suffix(".onnx"), path, target)
    vm = VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())
    params = [tvm.runtime.tensor(np.ascontiguousarray(a))
              for a in read_weights(artifact_paths(path)[1], manifest["params"])]

    def run(x):
        return vm["main"](tvm.runtime.tensor(x), *params).numpy()

    return run, manifest


CASES = [
    # (N, K, G, n:m, groups, salient per G, mu, bias)
    (48, 192, 64, (6, 8), True, 4, True, True),  # both sets
    (48, 192, 64, (6, 8), False, 4, True, False),  # residual only
    (32, 128, 64, (4, 8), True, 0, False, True),  # groups only, no mu (group-0 mu is 0)
    (32, 128, 32, (8, 8), True, 3, True, False),  # dense binary: no mask plane; 3 salient of 32
    (40, 96, 32, (6, 8), True, 5, False, False),  # N = 40: no 16-row tiles (plain layout), odd salient count
    (16, 64, 64, (2, 8), False, 1, True, True),  # one salient column: a one-byte residual plane
]


@requires("x86-avx2")
@pytest.mark.parametrize("n, k, g, nm, groups, salient, has_mu, has_bias", CASES)
def test_v2_file_compiles_and_matches_the_oracle(tmp_path, n, k, g, nm, groups, salient, has_mu, has_bias):
    layer = v2_layer(n, k, g, nm, groups, salient, has_mu, has_bias, seed=n + k)
    rng = np.random.default_rng(k)
    run, manifest = compile_and_load(single_node_model(layer), tmp_path / "rows.so")
    for rows in (1, 2, 17):
        x = rng.standard_normal((rows, k)).astype(np.float32)
        assert rel_err(run(x), layer.matmul(x)) < TOLERANCE, rows
    one, manifest1 = compile_and_load(single_node_model(layer, rows=1), tmp_path / "one.so")
    x = rng.standard_normal((1, k)).astype(np.float32)
    got = one(x)
    assert np.isfinite(got).all() and rel_err(got, layer.matmul(x)) < TOLERANCE
    # the one-token call runs the hand-written v2 GEMV where N has 16-row tiles, else the TE kernel
    assert manifest1["kernels"] == (["x86_avx2.gemv_v2_fp32"] if n % 16 == 0 else [])
    assert "x86_avx2.gemm_fp32" not in manifest["kernels"]  # a v1 kernel never claims a v2 call
    # the v2 inputs ship in the weights file, per-row ones in the target layout (16-row blocks where N allows)
    by_name = {p["name"]: p for p in manifest1["params"]}
    t = manifest1["layout"]["interleave"] if n % 16 == 0 else 0
    if groups:
        assert by_name["w.group"]["shape"] == ([n // t, k // 8, t] if t else [n, k // 8])
    if salient:
        assert by_name["w.salient"]["shape"] == [1, k // 8]


def test_a_wrong_v2_input_is_one_line_naming_the_node():
    layer = v2_layer(32, 128, 64)
    layer.group_alpha = layer.group_alpha.astype(np.float32)
    with pytest.raises(FormatError, match=r"^node 'layer': group_alpha must be float16 \[32, 2\]") as err:
        frontend.import_onnx(single_node_model(layer))
    assert len(str(err.value).splitlines()) == 1
    layer = v2_layer(32, 128, 64)
    layer.residual = layer.residual[:, :-1]
    with pytest.raises(FormatError, match="node 'layer': residual must be uint8 .32, 1. for 8 salient columns"):
        frontend.import_onnx(single_node_model(layer))
    layer = v2_layer(32, 128, 64, salient=0)
    layer.group_mu = None
    with pytest.raises(FormatError, match="node 'layer': group_mu must be float16"):
        frontend.import_onnx(single_node_model(layer))


def test_opsets_one_and_two_are_read():
    v1 = v2_layer(32, 128, 64, groups=False, salient=0)
    assert v1.version == 1
    frontend.check_model(single_node_model(v1, opset=1))
    frontend.check_model(single_node_model(v2_layer(32, 128, 64), opset=2))
    with pytest.raises(UnsupportedError, match="pbs2p opset 3, this pbs2pc compiles opsets 1 and 2"):
        frontend.check_model(single_node_model(v1, opset=3))


def test_reference_function_and_kernel_carry_the_structure():
    """The imported reference function takes the v2 inputs by role and computes their meaning (run here as
    plain Relax on the generic LLVM target); the lowered TE kernel's pbs2p_info records the structure."""
    from pbs2pc.compiler.tvm_compat import relax, tvm
    from pbs2pc.passes import LowerSparseBinaryLinear

    layer = v2_layer(32, 128, 32, salient=3)
    imported = frontend.import_onnx(single_node_model(layer))
    ref = next(f for _, f in imported.mod.functions_items() if f.attrs is not None and frontend.OP_ATTR in f.attrs)
    assert [p.name for p in ref.params] == ["x", *ARRAY_FIELDS]
    vm = relax.VirtualMachine(tvm.compile(imported.mod, target="llvm"), tvm.cpu())
    x = np.random.default_rng(3).standard_normal((3, 128)).astype(np.float32)
    got = vm["main"](tvm.runtime.tensor(x), *[tvm.runtime.tensor(a) for a in imported.params.values()]).numpy()
    assert rel_err(got, layer.matmul(x)) < TOLERANCE
    lowered = LowerSparseBinaryLinear()(imported.mod)
    infos = [dict(f.attrs["pbs2p_info"]) for _, f in lowered.functions_items()
             if f.attrs is not None and "pbs2p_info" in f.attrs]
    assert len(infos) == 1 and int(infos[0]["has_groups"]) == 1 and int(infos[0]["has_residual"]) == 1
    assert int(infos[0]["format_version"]) == 2
    v1 = LowerSparseBinaryLinear()(frontend.import_onnx(single_node_model(v2_layer(32, 128, 32, groups=False,
                                                                                   salient=0))).mod)
    info = next(dict(f.attrs["pbs2p_info"]) for _, f in v1.functions_items()
                if f.attrs is not None and "pbs2p_info" in f.attrs)
    assert int(info["has_groups"]) == 0 and int(info["has_residual"]) == 0


AVX512_CASES = [
    # (N, K, G, n:m, groups, salient per G): the kernel reads codes / planes / (N % 16 != 0) the TE kernel runs
    (48, 256, 64, (6, 8), True, 4),
    (32, 128, 64, (4, 8), True, 3),
    (40, 96, 32, (6, 8), True, 5),
]


@pytest.mark.parametrize("n, k, g, nm, groups, salient", AVX512_CASES)
def test_x86_avx512_build_runs_the_avx512_v2_gemv_on_mask_codes(tmp_path, n, k, g, nm, groups, salient):
    """The AVX-512 layout stores 6:8 masks as codes; a v2 one-token call runs the AVX-512 v2 GEMV, which reads
    the codes itself: no expansion is left in the library. Compiled on any host (LLVM cross-generates); the
    numerics run where the CPU has AVX-512."""
    from pbs2pc.compiler.tvm_compat import tvm
    from pbs2pc.passes.kernels.x86_avx512 import mask_codes
    from testutil import host_lacks

    layer = v2_layer(n, k, g, nm, groups, salient, seed=n + k)
    run, manifest = compile_and_load(single_node_model(layer, rows=1), tmp_path / "one.so", "x86-avx512")
    assert manifest["kernels"] == (["x86_avx512.gemv_v2_fp32"] if n % 16 == 0 else [])
    coded = mask_codes.supported(n, k, *nm) and g % 32 == 0
    assert manifest["layout"]["mask_codes"]
    by_name = {p["name"]: p for p in manifest["params"]}
    assert by_name["w.mask"]["shape"] == ([n // 16, mask_codes.code_width(k)] if coded else
                                          [n // 16, k // 8, 16] if n % 16 == 0 else [n, k // 8])
    if coded:
        lib = tvm.runtime.load_module(str(tmp_path / "one.so"))
        assert not lib.implements_function(f"expand_mask_codes_{nm[0]}of{nm[1]}_{n}x{k}", True)
    if not host_lacks("x86-avx512"):
        x = np.random.default_rng(k).standard_normal((1, k)).astype(np.float32)
        got = run(x)
        assert np.isfinite(got).all() and rel_err(got, layer.matmul(x)) < TOLERANCE
