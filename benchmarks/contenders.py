"""The contenders of the kernel benchmark (``kernel_bench.py``): random 6:8 layers and, per format, a runner that
builds the weights and returns a function running ``copies`` layers on one input.

* pbs2pc: a ``copies``-node ONNX model compiled the way ``pbs2pc compile`` compiles (``pbs2pc_runner``),
  in the layout a format name says (``pbs2pc_variant``);
* torch fp32 ``x @ W.T`` (``torch_runner``);
* onnxruntime: fp32 ``MatMul`` or ``com.microsoft.MatMulNBits`` nodes (``ort_runner``).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

#: Threads for every contender (the machine's 2 cores).
THREADS = 2
#: The sparse-binary scheme of every pbs2pc layer.
NM = (6, 8)

#: Every 8-bit pattern with exactly six bits set: one 6:8 mask byte (m = 8: a byte is one group).
_MASKS_6OF8 = np.array([b for b in range(256) if bin(b).count("1") == 6], np.uint8)


@dataclasses.dataclass
class Layer:
    sign: np.ndarray
    mask: np.ndarray
    alpha: np.ndarray
    mu: np.ndarray


def random_layer(n_out: int, k: int, g: int, rng) -> Layer:
    """A valid 6:8 layer with random signs, random 6:8 masks and non-zero scales and offsets."""
    mask = _MASKS_6OF8[rng.integers(0, len(_MASKS_6OF8), (n_out, k // 8))]
    sign = rng.integers(0, 256, (n_out, k // 8), dtype=np.uint8)
    alpha = rng.uniform(0.01, 0.05, (n_out, k // g)).astype(np.float16)
    mu = (rng.uniform(0.001, 0.005, (n_out, k // g)) * rng.choice([-1, 1], (n_out, k // g))).astype(np.float16)
    return Layer(sign, mask, alpha, mu)


#: The v2 structure of the ``pbs2pc_v2`` format: 2 magnitude groups (a random group bitmap, half the weights
#: in each) and a residual on SALIENT of every SALIENT_OF columns (BiLLM-style: 4 of 64).
SALIENT, SALIENT_OF = 4, 64


def random_structure(n_out: int, k: int, g: int, rng) -> dict:
    """The op contract v2 arrays of a ``pbs2pc_v2`` layer (see ``SALIENT``), by role."""
    cols = np.zeros(k, bool)
    for start in range(0, k, SALIENT_OF):
        cols[start + rng.choice(SALIENT_OF, SALIENT, replace=False)] = True
    count = int(cols.sum())
    scale = lambda lo, hi: rng.uniform(lo, hi, (n_out, k // g)).astype(np.float16)  # noqa: E731
    return {
        "group": rng.integers(0, 256, (n_out, k // 8), dtype=np.uint8),
        "group_alpha": scale(0.05, 0.1), "group_mu": scale(-0.005, 0.005),
        "salient": np.packbits(cols[None], axis=1, bitorder="little"),
        "residual": rng.integers(0, 256, (n_out, -(-count // 8)), dtype=np.uint8),
        "residual_alpha": scale(0.01, 0.02), "residual_mu": scale(-0.002, 0.002),
    }


def group_size(k: int) -> int:
    return 128 if k % 128 == 0 else 64


def pbs2pc_variant(fmt: str) -> tuple[int, bool, str, bool]:
    """``(plane word bits, mask codes, activations, lookup-table kernels)`` of a pbs2pc format: ``pbs2pc_u8``
    (the x86 preset: byte planes, masks as pattern codes), ``pbs2pc_u8_planes`` (mask planes instead),
    ``pbs2pc_u32``, ``pbs2pc_te`` (the TE kernel at every M, mask planes), ``pbs2pc_int8[_planes]``,
    ``pbs2pc_v2`` (op contract v2 layers, ``random_structure``, in the x86 preset's layout)."""
    planes = fmt.endswith("_planes")
    if fmt == "pbs2pc_v2":
        return 8, True, "fp32", True
    if fmt == "pbs2pc_te":
        return 8, False, "fp32", False
    if fmt.startswith("pbs2pc_int8"):
        return 8, not planes, "int8", True
    bits = int(fmt[len("pbs2pc_u"):].split("_")[0])
    return bits, bits == 8 and not planes, "fp32", True


def pbs2pc_runner(n_out, k, rows, copies, layout_bits, rng, interleave=None, activations="fp32", lut=True,
                  mask_codes=True, v2=False):
    """Build a ``copies``-node ONNX model and compile it the way ``pbs2pc compile`` does; return a runner.
    ``lut=False`` runs every call on the TE kernel instead of the kernel registry's hand-written GEMV and
    GEMM; ``mask_codes=False`` keeps mask planes where the target's layout would store pattern codes;
    ``interleave=None`` keeps the target layout's row interleave; ``v2``: the layers carry the op contract v2
    structure of ``random_structure`` (pbs2p opset 2)."""
    from onnx import TensorProto, helper, numpy_helper

    from pbs2pc.compiler import frontend
    from pbs2pc.compiler.build import to_target_layout
    from pbs2pc.compiler.pipeline import make_pipeline
    from pbs2pc.compiler.targets import CompileOptions, get_preset
    from pbs2pc.compiler.tvm_compat import relax, tvm
    from pbs2pc.models import onnx_op
    from pbs2pc.passes.kernels import registry

    g = group_size(k)
    nodes, inits, outputs = [], [], []
    for c in range(copies):
        layer = random_layer(n_out, k, g, rng)
        arrays = {role: getattr(layer, role) for role in ("sign", "mask", "alpha", "mu")}
        arrays.update(random_structure(n_out, k, g, rng) if v2 else {})
        names = {role: f"w{c}.{role}" for role in arrays}
        for role, name in names.items():
            inits.append(numpy_helper.from_array(arrays[role], name))
        structure = {role: name for role, name in names.items() if role not in ("sign", "mask", "alpha", "mu")}
        nodes.append(onnx_op.make_node("X", names["sign"], names["mask"], names["alpha"], names["mu"], None, f"Y{c}",
                                       n=NM[0], m=NM[1], group_size=g, name=f"linear{c}", **structure))
        outputs.append(helper.make_tensor_value_info(f"Y{c}", TensorProto.FLOAT, [rows, n_out]))
    graph = helper.make_graph(nodes, "kernels", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [rows, k])],
                              outputs, inits)
    opset = onnx_op.OPSET_VERSION_V2 if v2 else onnx_op.OPSET_VERSION
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", onnx_op.ONNX_OPSET),
                                                    helper.make_opsetid(onnx_op.DOMAIN, opset)])
    onnx_op.attach_functions(model)
    preset = get_preset("x86")  # this machine's best x86 target
    chosen = registry.target_layout(preset, CompileOptions(activations))
    layout = registry.Layout(layout_bits, chosen.interleave if interleave is None else interleave,
                             mask_codes and chosen.mask_codes)
    options = CompileOptions(activations, layout=layout, kernels=None if lut else ()).check(preset)
    imported = frontend.import_onnx(model)
    mod, params = to_target_layout(imported.mod, imported.params, preset, options)
    t0 = time.perf_counter()
    ex = tvm.compile(mod, target=preset.tvm_target(), relax_pipeline=make_pipeline(preset, options))
    compile_s = time.perf_counter() - t0
    vm = relax.VirtualMachine(ex, tvm.cpu())
    args = [tvm.runtime.tensor(np.ascontiguousarray(p)) for p in params.values()]
    x = tvm.runtime.tensor(rng.standard_normal((rows, k)).astype(np.float32))
    main = vm["main"]
    sign = params["w0.sign"]
    return (lambda: main(x, *args)), {"compile_s": round(compile_s, 2), "planes": str(sign.dtype),
                                      "interleave": sign.shape[2] if sign.ndim == 3 else 0}


def torch_runner(n_out, k, rows, copies, rng):
    import torch

    torch.set_num_threads(THREADS)
    ws = [torch.from_numpy(rng.standard_normal((n_out, k), dtype=np.float32)) for _ in range(copies)]
    x = torch.from_numpy(rng.standard_normal((rows, k), dtype=np.float32))

    def run():
        with torch.inference_mode():
            for w in ws:
                x @ w.T

    return run, {}


def _ort_session(model):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def ort_runner(n_out, k, rows, copies, rng, bits=None, accuracy_level=0, block=None):
    """onnxruntime: ``copies`` MatMul (fp32, ``bits=None``) or MatMulNBits nodes (block size ``block``,
    default the layer's G) on one input."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, outputs = [], [], []
    g = block or group_size(k)
    for c in range(copies):
        if bits is None:
            inits.append(numpy_helper.from_array(rng.standard_normal((k, n_out), dtype=np.float32), f"W{c}"))
            nodes.append(helper.make_node("MatMul", ["X", f"W{c}"], [f"Y{c}"]))
        else:
            blocks = k // g
            packed = rng.integers(0, 256, (n_out, blocks, g * bits // 8), dtype=np.uint8)
            scales = rng.uniform(0.01, 0.05, n_out * blocks).astype(np.float32)
            inits += [numpy_helper.from_array(packed, f"B{c}"), numpy_helper.from_array(scales, f"S{c}")]
            nodes.append(helper.make_node("MatMulNBits", ["X", f"B{c}", f"S{c}"], [f"Y{c}"], domain="com.microsoft",
                                          K=k, N=n_out, bits=bits, block_size=g, accuracy_level=accuracy_level))
        outputs.append(helper.make_tensor_value_info(f"Y{c}", TensorProto.FLOAT, [rows, n_out]))
    graph = helper.make_graph(nodes, "ort", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [rows, k])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid("com.microsoft", 1)])
    session = _ort_session(model)
    feeds = {"X": rng.standard_normal((rows, k), dtype=np.float32)}
    return (lambda: session.run(None, feeds)), {}


def ort_supports(bits: int) -> bool:
    """Whether this onnxruntime runs MatMulNBits at ``bits`` on the CPU (tried on a tiny layer)."""
    try:
        run, _ = ort_runner(8, 128, 1, 1, np.random.default_rng(0), bits=bits)
        run()
        return True
    except Exception:  # noqa: BLE001 - ORT raises its own error types for unsupported kernels
        return False
