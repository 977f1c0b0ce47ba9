"""The GPU check of --target cuda: build everything here (nvcc, no GPU), then check and time it on a GPU
machine with TVM's runtime only.

    python benchmarks/gpu_check.py build [--quick]   # here: writes out/gpu_check/ (about 10 min on 2 cores)
    python benchmarks/gpu_check.py run               # there, after `source .device/env.sh` (under 8 min)

``build`` writes, under ``out/gpu_check/``:

* ``gemv_*.so``: the hand-written GEMV (``passes/kernels/cuda/sparse_binary_gemv.py``) for odd and real
  shapes (v1 with and without mask, mu, bias; v2 with magnitude groups), and the benchmark shapes
  4096x11008, 11008x4096, 8192x28672, 28672x8192 (N x K, 6:8, G = 128);
* ``layer_*.so``: one pbs2p layer compiled through the whole pipeline for any number of rows (the prompt
  path: the fp16 tensor-core GEMM, ``passes/kernels/cuda/sparse_binary_gemm.py``), for M = 16 and 64 and
  the odd M = 5 (against the fp32 reference: fp16 inputs and weights, so 3e-3 of the range);
* ``attn_*.so``: the KV-cache attention kernel for SmolLM2's heads and an odd shape;
* ``tiny/``: the tests' random 2-layer Llama compiled for the GPU (``model.so``: decode as CUDA graphs, the
  default; ``nograph.so``: without), with onnxruntime's logits and greedy tokens (the whole compiled-model
  path in a few hundred KB);
* ``smollm2/``: the demo's compressed SmolLM2 (``out/demo/model.onnx``) compiled for the GPU, with
  onnxruntime's (CPU) last-position logits and 16 greedy tokens for 5 prompts; its 179 MB weights file is
  split into 56 MB parts in ``out/gpu_parts/`` (a call to the GPU machine carries at most 64 MiB, so each
  part goes in a call of its own before the run: ``benchmarks/gpu_check.sh`` prints the calls).

Only libraries and specs are stored: ``run`` draws the random weights itself (seeded) on the GPU, decodes
them to a float32 torch reference, and converts them to the target layout (4-row interleaved 32-bit
words) with numpy. Every output buffer is poisoned with NaN before the call. Timings rotate over copies of
the weights until the copies exceed twice the L2 cache, beside torch fp16 ``mv`` / ``matmul`` (cuBLAS) on
the same shapes, the measured device-to-device copy bandwidth and the memory floor of each format.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "out" / "gpu_check"
#: SmolLM2's weights in parts, apart from OUT: each part travels to the GPU machine in a call of its own.
PARTS = ROOT / "out" / "gpu_parts"
NM, G_BENCH = (6, 8), 128
#: GEMV correctness cases: name, N, K, G, mask, mu, bias, groups, residual
GEMV_CASES = [
    ("odd_80x96_g32_plain", 80, 96, 32, False, False, False, False, False),
    ("v1_576x576", 576, 576, 64, True, True, False, False, False),
    ("v1_bias_1552x576", 1552, 576, 64, True, True, True, False, False),
    ("v2_groups_576x1536", 576, 1536, 64, True, True, False, True, False),
    ("v2_groups_nomu_48x4096", 48, 4096, 128, True, False, True, True, False),
    ("v2_full_576x1536", 576, 1536, 64, True, True, False, True, True),
    ("v2_residual_split_1552x16384", 1552, 16384, 128, True, True, True, False, True),
]
SALIENT = 4  # salient columns per scale group in the residual cases
BENCH_SHAPES = [(4096, 11008), (11008, 4096), (8192, 28672), (28672, 8192)]
LAYER_ROWS = (5, 16, 64)
ATTENTION_CASES = [("smollm2_9h3kv64", 9, 3, 64), ("odd_6h2kv16", 6, 2, 16)]
PROMPTS = ["The river flows", "Once upon a time", "The capital of France is", "def fibonacci(n):",
           "In 1969, the first humans"]
#: Weight parts of at most 56 MB: one fits in a call with the working tree (the limit is 64 MiB per call).
PART_BYTES = 56_000_000


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------- build (here)

def _export_func(func, path: Path, arch: str) -> None:
    from pbs2pc.compiler import cuda_export
    from pbs2pc.compiler.targets import get_preset
    from pbs2pc.compiler.tvm_compat import tvm

    target = get_preset("cuda", arch=arch).tvm_target()
    ex = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    cuda_export.export_library(ex, path, arch)


def _layer_onnx(n: int, k: int, g: int):
    """A one-node pbs2p model with symbolic rows (placeholder weights: run draws its own)."""
    from onnx import TensorProto, helper, numpy_helper

    from pbs2pc.models import onnx_op

    z = lambda shape, dt: np.zeros(shape, dt)  # noqa: E731
    inits = [numpy_helper.from_array(z((n, k // 8), np.uint8), "w.sign"),
             numpy_helper.from_array(np.full((n, k // 8), 0x3F, np.uint8), "w.mask"),  # valid 6:8
             numpy_helper.from_array(z((n, k // g), np.float16), "w.alpha"),
             numpy_helper.from_array(z((n, k // g), np.float16), "w.mu")]
    node = onnx_op.make_node("X", "w.sign", "w.mask", "w.alpha", "w.mu", None, "Y", n=NM[0], m=NM[1],
                             group_size=g, name="linear")
    graph = helper.make_graph([node], "layer", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["m", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", onnx_op.ONNX_OPSET),
                                                    helper.make_opsetid(onnx_op.DOMAIN, onnx_op.OPSET_VERSION)])
    onnx_op.attach_functions(model)
    return model


def _export_layer(n: int, k: int, g: int, path: Path, arch: str) -> dict:
    from pbs2pc.compiler import cuda_export, frontend
    from pbs2pc.compiler.build import to_target_layout
    from pbs2pc.compiler.pipeline import make_pipeline
    from pbs2pc.compiler.targets import CompileOptions, get_preset
    from pbs2pc.compiler.tvm_compat import tvm

    preset, options = get_preset("cuda", arch=arch), CompileOptions()
    imported = frontend.import_onnx(_layer_onnx(n, k, g))
    mod, params = to_target_layout(imported.mod, imported.params, preset, options)
    ex = tvm.compile(mod, target=preset.tvm_target(), relax_pipeline=make_pipeline(preset, options))
    cuda_export.export_library(ex, path, arch)
    return {name: {"shape": list(a.shape), "dtype": str(a.dtype)} for name, a in params.items()}


def build(args) -> int:
    from pbs2pc.passes.kernels.cuda import sparse_binary_gemv as gemv
    from pbs2pc.passes.kernels.cuda.attention import cached_attention

    OUT.mkdir(parents=True, exist_ok=True)
    spec = {"arch": args.arch, "nm": list(NM), "gemv": [], "layers": [], "attention": [], "bench": []}
    cases = GEMV_CASES[:2] if args.quick else GEMV_CASES
    for name, n, k, g, *flags in cases:
        t0 = time.perf_counter()
        rbytes = -(-SALIENT * (k // g) // 8)
        _export_func(gemv.gemv(n, k, g, *flags, residual_bytes=rbytes), OUT / f"gemv_{name}.so", args.arch)
        spec["gemv"].append({"name": name, "n": n, "k": k, "g": g, "mask": flags[0], "mu": flags[1],
                             "bias": flags[2], "groups": flags[3], "residual": flags[4],
                             "splits": gemv.splits_for(n, k)})
        log(f"gemv {name}: {time.perf_counter() - t0:.1f} s")
    for n, k in BENCH_SHAPES[:1] if args.quick else BENCH_SHAPES:
        name = f"bench_{n}x{k}"
        _export_func(gemv.gemv(n, k, G_BENCH, True, True, False), OUT / f"gemv_{name}.so", args.arch)
        spec["bench"].append({"name": name, "n": n, "k": k, "g": G_BENCH, "splits": gemv.splits_for(n, k)})
        params = _export_layer(n, k, G_BENCH, OUT / f"layer_{name}.so", args.arch)
        spec["layers"].append({"name": name, "n": n, "k": k, "g": G_BENCH, "params": params})
        log(f"{name}: gemv and layer built")
    params = _export_layer(80, 192, 64, OUT / "layer_odd_80x192.so", args.arch)
    spec["layers"].append({"name": "odd_80x192", "n": 80, "k": 192, "g": 64, "params": params})
    for name, h, kv, d in ATTENTION_CASES:
        _export_func(cached_attention(h, kv, d, 1 / np.sqrt(d)), OUT / f"attn_{name}.so", args.arch)
        spec["attention"].append({"name": name, "heads": h, "kv_heads": kv, "head_dim": d, "scale": 1 / np.sqrt(d)})
    spec["tiny"] = _build_tiny(args)
    if not args.quick:
        spec["smollm2"] = _build_smollm2(args)
    (OUT / "spec.json").write_text(json.dumps(spec, indent=1) + "\n")
    log(f"wrote {OUT}: {sum(f.stat().st_size for f in OUT.rglob('*') if f.is_file()) / 1e6:.1f} MB")
    return 0


def _build_tiny(args) -> dict:
    """A random 2-layer Llama at 6:8 (the tests' model) compiled for the GPU with onnxruntime's logits: the
    whole compiled-model path (Relax VM, KV cache, attention, GEMVs, dlight kernels) in a few hundred KB."""
    from pbs2pc.compiler.build import compile_model
    from pbs2pc.models import compress, export, hf
    from pbs2pc.runtime import generate as gen
    from pbs2pc.runtime.reference import OrtDecoder
    from pbs2pc.runtime.sampling import SamplingParams

    folder = OUT / "tiny"
    folder.mkdir(exist_ok=True)
    model = hf.tiny_llama()
    info = compress.compress_model(model, "6:8", progress=False)
    export.export(model, folder / "model.onnx", {"source_model": "tiny-llama", **info})
    from pbs2pc.compiler.targets import CompileOptions

    compile_model(folder / "model.onnx", folder / "model.so", _arch_preset(args.arch))  # decode as CUDA graphs
    compile_model(folder / "model.onnx", folder / "nograph.so", _arch_preset(args.arch),
                  options=CompileOptions(cuda_graph=False))
    ort = OrtDecoder(folder / "model.onnx")
    cases = []
    for i, (batch, seq) in enumerate(((1, 1), (1, 17), (2, 5), (1, 70))):
        ids = np.random.default_rng(seq).integers(0, 256, (batch, seq))
        np.save(folder / f"ids_{i}.npy", ids)
        np.save(folder / f"ort_logits_{i}.npy", ort.logits(ids).astype(np.float32))
        cases.append(i)
    greedy = gen.generate(ort, [1, 2, 3, 4], 24, SamplingParams(), ()).token_ids
    for name in ("model.onnx", "model.onnx.data"):
        (folder / name).unlink(missing_ok=True)
    return {"cases": cases, "greedy_prompt": [1, 2, 3, 4], "greedy": greedy, "variants": ["model", "nograph"]}


def _build_smollm2(args) -> dict:
    from pbs2pc.compiler.build import compile_model
    from pbs2pc.runtime.reference import OrtDecoder
    from pbs2pc.runtime.sampling import SamplingParams
    from pbs2pc.runtime import generate as gen

    onnx_path = ROOT / "out" / "demo" / "model.onnx"
    folder = OUT / "smollm2"
    folder.mkdir(exist_ok=True)
    lib = folder / "model.so"
    built = ROOT / "out" / "cuda" / "model.so"  # `pbs2pc compile out/demo/model.onnx --target cuda -o out/cuda/model.so`
    if built.exists() and args.arch == "sm_90" and not args.rebuild:
        for suffix in (".so", ".weights.bin", ".manifest.json"):
            dst = folder / f"model{suffix}"
            dst.unlink(missing_ok=True)
            os.link(built.with_name(f"model{suffix}"), dst)
        log(f"smollm2: the library compiled into {built.parent}")
    else:
        t0 = time.perf_counter()
        compile_model(onnx_path, lib, _arch_preset(args.arch))
        log(f"smollm2 compiled for the GPU in {time.perf_counter() - t0:.0f} s")
    weights = folder / "model.weights.bin"
    data = weights.read_bytes()
    parts = []
    PARTS.mkdir(parents=True, exist_ok=True)
    for old in PARTS.glob("model.weights.bin.part*"):
        old.unlink()
    for i in range(0, len(data), PART_BYTES):
        part = PARTS / f"model.weights.bin.part{i // PART_BYTES:02d}"
        part.write_bytes(data[i:i + PART_BYTES])
        parts.append(part.name)
    sha = hashlib.sha256(data).hexdigest()
    weights.unlink()  # the parts replace it (run reassembles them)
    from pbs2pc.runtime.model import load_tokenizer

    tokenizer = load_tokenizer(json.loads((folder / "model.manifest.json").read_text()))
    ort = OrtDecoder(onnx_path)
    refs = []
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        logits = ort.logits(np.array([ids], np.int64))[0, -1]
        tokens = gen.generate(ort, ids, 16, SamplingParams(), ()).token_ids
        refs.append({"prompt": prompt, "ids": ids, "greedy": tokens})
        np.save(folder / f"ort_logits_{len(refs) - 1}.npy", logits.astype(np.float32))
        log(f"onnxruntime: {prompt!r} -> {tokens}")
    return {"parts": parts, "sha256": sha, "bytes": len(data), "prompts": refs}


def _arch_preset(arch: str):
    from pbs2pc.compiler.targets import get_preset

    return get_preset("cuda", arch=arch)


# ------------------------------------------------------------------------------------------ run (GPU machine)

def _runtime():
    """TVM's runtime with its CUDA part, and a log line saying what was loaded (no compiler)."""
    import ctypes

    import tvm

    lib_dir = Path(tvm.__file__).parent / "lib"
    ctypes.CDLL(str(lib_dir / "libtvm_runtime_cuda.so"), ctypes.RTLD_GLOBAL)
    libs = sorted(p.name for p in lib_dir.glob("*.so"))
    loaded = sorted({Path(line.split()[-1]).name for line in open("/proc/self/maps") if "libtvm" in line})
    log(f"TVM {tvm.__version__} from {lib_dir}: {libs}; mapped in this process: {loaded}")
    log("TVM compiler present: " + ("yes" if "libtvm_compiler.so" in loaded else "no (runtime only)"))
    return tvm


def _unpack(plane, k: int):
    import torch

    bits = (plane.unsqueeze(-1) >> torch.arange(8, device=plane.device, dtype=torch.uint8)) & 1
    return bits.reshape(plane.shape[0], -1)[:, :k].float()


def _interleave(a: np.ndarray, t: int = 4) -> np.ndarray:
    return np.ascontiguousarray(a.reshape(a.shape[0] // t, t, *a.shape[1:]).swapaxes(1, 2))


def _random_layer(n: int, k: int, g: int, groups: bool, seed: int, residual: bool = False):
    """Interchange arrays (numpy) of a random layer (docs/format.md), with :data:`SALIENT` salient columns per
    scale group when ``residual``."""
    rng = np.random.default_rng(seed)
    out = {"sign": rng.integers(0, 256, (n, k // 8), np.uint8), "mask": rng.integers(0, 256, (n, k // 8), np.uint8),
           "alpha": (rng.random((n, k // g)) * 0.05 + 0.01).astype(np.float16),
           "mu": (rng.standard_normal((n, k // g)) * 0.01).astype(np.float16),
           "bias": rng.standard_normal(n).astype(np.float32)}
    if groups:
        out.update(group=rng.integers(0, 256, (n, k // 8), np.uint8),
                   group_alpha=(rng.random((n, k // g)) * 0.1 + 0.05).astype(np.float16),
                   group_mu=(rng.standard_normal((n, k // g)) * 0.01).astype(np.float16))
    if residual:
        cols = np.zeros(k, bool)
        for start in range(0, k, g):
            cols[start + rng.choice(g, SALIENT, replace=False)] = True
        count = int(cols.sum())
        out.update(salient=np.packbits(cols[None], axis=1, bitorder="little"),
                   residual=np.packbits(rng.integers(0, 2, (n, -(-count // 8) * 8)).astype(bool), axis=1,
                                        bitorder="little"),
                   residual_alpha=(rng.random((n, k // g)) * 0.02 + 0.01).astype(np.float16),
                   residual_mu=(rng.standard_normal((n, k // g)) * 0.005).astype(np.float16))
    return out


def _dense(layer: dict, k: int, g: int, mask: bool, mu: bool, groups: bool, residual: bool = False):
    """The float32 weight ``[N, K]`` of a layer (docs/format.md's meaning), on the GPU."""
    import torch

    t = {name: torch.from_numpy(a).cuda() for name, a in layer.items()}
    s, m = _unpack(t["sign"], k), _unpack(t["mask"], k) if mask else 1.0
    rep = lambda a: a.float().repeat_interleave(g, dim=1)  # noqa: E731
    a, u = rep(t["alpha"]), rep(t["mu"]) if mu else 0.0
    if groups:
        gb = _unpack(t["group"], k)
        a = torch.where(gb > 0, rep(t["group_alpha"]), a)
        u = torch.where(gb > 0, rep(t["group_mu"]), u if mu else torch.zeros_like(a))
    w = a * (2 * s - 1) + u
    if residual:
        cols = torch.nonzero(_unpack(t["salient"], k)[0] > 0).flatten()
        r = _unpack(t["residual"], len(cols))
        w[:, cols] += rep(t["residual_alpha"])[:, cols] * (2 * r - 1) + rep(t["residual_mu"])[:, cols]
    return m * w


def _gemv_args(layer: dict, case: dict) -> list[np.ndarray]:
    words = lambda p: _interleave(p.view(np.uint32))  # noqa: E731 - little-endian: the same bits
    args = [words(layer["sign"])]
    if case["mask"]:
        args.append(words(layer["mask"]))
    args.append(_interleave(layer["alpha"]))
    if case["mu"]:
        args.append(_interleave(layer["mu"]))
    if case["bias"]:
        args.append(layer["bias"])
    if case["groups"]:
        args += [_interleave(layer["group"]), _interleave(layer["group_alpha"]), _interleave(layer["group_mu"])]
    if case.get("residual"):
        args += [layer["salient"], _interleave(layer["residual"]), _interleave(layer["residual_alpha"]),
                 _interleave(layer["residual_mu"])]
    return args


def _rel(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30)) if np.isfinite(got).all() else float("nan")


def check_gemv(tvm, dev, spec, results) -> None:
    import torch

    for case in spec["gemv"]:
        n, k, g = case["n"], case["k"], case["g"]
        layer = _random_layer(n, k, g, case["groups"], seed=n + k, residual=case["residual"])
        w = _dense(layer, k, g, case["mask"], case["mu"], case["groups"], case["residual"])
        x = np.random.default_rng(1).standard_normal((1, k)).astype(np.float32)
        ref = (torch.from_numpy(x).cuda() @ w.T).cpu().numpy() + (layer["bias"] if case["bias"] else 0)
        f = tvm.runtime.load_module(str(OUT / f"gemv_{case['name']}.so"))["main"]
        y = tvm.runtime.tensor(np.full((1, n), np.nan, np.float32), dev)
        f(tvm.runtime.tensor(x, dev), *[tvm.runtime.tensor(a, dev) for a in _gemv_args(layer, case)], y)
        err = _rel(y.numpy(), ref)
        results["gemv"][case["name"]] = err
        log(f"gemv {case['name']} (splits {case['splits']}): max rel err {err:.2e} {'OK' if err < 1e-4 else 'FAIL'}")


def _layer_args(tvm, dev, layer: dict, entry: dict) -> list:
    """The layer's arrays in the library's parameter layout (the build's params transform, in numpy)."""
    out = []
    for name, p in entry["params"].items():
        role = name.split(".")[-1]
        a = layer[role]
        a = a.view(np.dtype(p["dtype"])) if p["dtype"].startswith("uint") else a
        a = _interleave(a, p["shape"][2]) if len(p["shape"]) == 3 else a
        assert list(a.shape) == p["shape"] and str(a.dtype) == p["dtype"], (name, a.shape, p)
        out.append(tvm.runtime.tensor(a, dev))
    return out


def check_layers(tvm, dev, spec, results) -> None:
    import torch

    for entry in spec["layers"]:
        n, k, g = entry["n"], entry["k"], entry["g"]
        if n * k > 8192 * 8192:
            continue  # the numerics of the prompt path: the small and middle shapes suffice
        layer = _random_layer(n, k, g, False, seed=n * 3 + k)
        w = _dense(layer, k, g, True, True, False)
        vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(str(OUT / f"layer_{entry['name']}.so")), dev)
        args = _layer_args(tvm, dev, layer, entry)
        for m in LAYER_ROWS:
            x = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
            ref = (torch.from_numpy(x).cuda() @ w.T).cpu().numpy()
            err = _rel(vm["main"](tvm.runtime.tensor(x, dev), *args).numpy(), ref)
            results["layers"][f"{entry['name']}_m{m}"] = err
            # fp16 inputs and weights on the tensor cores (passes/kernels/cuda/sparse_binary_gemm.py)
            log(f"layer {entry['name']} M={m}: max rel err {err:.2e} {'OK' if err < 3e-3 else 'FAIL'}")


def check_attention(tvm, dev, spec, results) -> None:
    import torch

    for case in spec["attention"]:
        h, kv, d, scale = case["heads"], case["kv_heads"], case["head_dim"], case["scale"]
        f = tvm.runtime.load_module(str(OUT / f"attn_{case['name']}.so"))["main"]
        rng = np.random.default_rng(h)
        for past, s in ((0, 7), (37, 1), (200, 1), (130, 3)):
            b, t, cap = 1, past + s, ((past + s + 63) // 64) * 64 + 64
            q, k, v = (rng.standard_normal((b, n_, s, d)).astype(np.float32) for n_ in (h, kv, kv))
            kc = np.full((b, kv, d, cap), np.nan, np.float32)
            vc = np.full((b, kv, cap, d), np.nan, np.float32)
            old_k, old_v = rng.standard_normal((b, kv, past, d)).astype(np.float32), rng.standard_normal(
                (b, kv, past, d)).astype(np.float32)
            kc[:, :, :, :past] = old_k.transpose(0, 1, 3, 2)
            vc[:, :, :past] = old_v
            mask = np.tril(np.ones((s, t), bool), k=past)[None, None]
            keys, vals = np.concatenate([old_k, k], 2), np.concatenate([old_v, v], 2)
            kk = torch.from_numpy(keys).repeat_interleave(h // kv, 1)
            vv = torch.from_numpy(vals).repeat_interleave(h // kv, 1)
            sc = torch.from_numpy(q) @ kk.transpose(-1, -2) * scale
            sc = sc.masked_fill(~torch.from_numpy(mask), float("-inf"))
            ref = (torch.softmax(sc, -1) @ vv).numpy()
            tv = [tvm.runtime.tensor(a, dev) for a in (q, k, v, mask, kc, vc)]
            y = tvm.runtime.tensor(np.full(q.shape, np.nan, np.float32), dev)
            f(*tv, y)
            err = _rel(y.numpy(), ref)
            results["attention"][f"{case['name']}_p{past}_s{s}"] = err
            log(f"attention {case['name']} past={past} new={s}: max rel err {err:.2e} {'OK' if err < 1e-4 else 'FAIL'}")


def _time(fn, sync, iters: int) -> float:
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t0) / iters


def bench(tvm, dev, spec, results) -> None:
    import torch

    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_s = _time(lambda: dst.copy_(src), torch.cuda.synchronize, 20)
    bw = 2 * src.numel() / copy_s
    del src, dst
    results["copy_bandwidth_GBs"] = bw / 1e9
    log(f"{props.name}: device-to-device copy {bw / 1e9:.0f} GB/s, L2 {l2 >> 20} MiB")
    sync = dev.sync
    for entry, layer_entry in zip(spec["bench"], spec["layers"]):
        n, k, g = entry["n"], entry["k"], entry["g"]
        pb = n * k // 8 * 2 + n * (k // g) * 4  # sign + mask + fp16 alpha, mu
        copies = max(2, -(-2 * l2 // pb))
        layers = [_random_layer(n, k, g, False, seed=c) for c in range(copies)]
        f = tvm.runtime.load_module(str(OUT / f"gemv_{entry['name']}.so"))["main"]
        case = {"mask": True, "mu": True, "bias": False, "groups": False}
        sets = [[tvm.runtime.tensor(a, dev) for a in _gemv_args(layer, case)] for layer in layers]
        vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(str(OUT / f"layer_{entry['name']}.so")), dev)
        lsets = [_layer_args(tvm, dev, layer, layer_entry) for layer in layers]
        wc = max(1, -(-2 * l2 // (2 * n * k)))
        ws = [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(wc)]
        for m in (1, 16, 64):
            x = tvm.runtime.tensor(np.random.default_rng(0).standard_normal((m, k)).astype(np.float32), dev)
            y = tvm.runtime.tensor(np.zeros((m, n), np.float32), dev)
            state = {"i": 0}
            if m == 1:
                def ours():
                    state["i"] = (state["i"] + 1) % copies
                    f(x, *sets[state["i"]], y)
            else:
                def ours():
                    state["i"] = (state["i"] + 1) % copies
                    vm["main"](x, *lsets[state["i"]])
            t_ours = _time(ours, sync, max(20, 4 * copies))
            xt = torch.randn(m, k, device="cuda", dtype=torch.float16)
            st = {"i": 0}

            def theirs():
                st["i"] = (st["i"] + 1) % wc
                return torch.mv(ws[st["i"]], xt[0]) if m == 1 else xt @ ws[st["i"]].T
            t_torch = _time(theirs, torch.cuda.synchronize, max(20, 4 * wc))
            floor_ours = (pb + 4 * m * (k + n)) / bw
            floor_torch = (2 * n * k + 2 * m * (k + n)) / bw
            row = {"n": n, "k": k, "m": m, "pbs2pc_us": t_ours * 1e6, "torch_fp16_us": t_torch * 1e6,
                   "speedup": t_torch / t_ours, "pbs2pc_floor_us": floor_ours * 1e6, "torch_floor_us": floor_torch * 1e6,
                   "copies": copies, "path": "hand GEMV" if m == 1 else "fp16 tensor-core GEMM (Relax VM call)"}
            results["bench"].append(row)
            log(f"{n}x{k} M={m}: pbs2pc {t_ours * 1e6:8.1f} us (floor {floor_ours * 1e6:6.1f}, {row['path']}), "
                f"torch fp16 {t_torch * 1e6:8.1f} us (floor {floor_torch * 1e6:6.1f}): {row['speedup']:.2f}x")
        del sets, lsets, ws


def check_tiny(tvm, dev, spec, results) -> None:
    from pbs2pc.runtime import load

    folder = OUT / "tiny"
    for variant in spec["tiny"]["variants"]:  # decode as CUDA graphs, and without them
        model = load(folder / f"{variant}.so")
        for i in spec["tiny"]["cases"]:
            ids = np.load(folder / f"ids_{i}.npy")
            err = _rel(model.logits(ids), np.load(folder / f"ort_logits_{i}.npy"))
            results["tiny"][f"{variant}_logits_{ids.shape[0]}x{ids.shape[1]}"] = err
            log(f"tiny Llama ({variant}) logits {ids.shape}: max rel err {err:.2e} against onnxruntime "
                f"{'OK' if err < 1e-4 else 'FAIL'}")
        tokens = model.generate_ids(spec["tiny"]["greedy_prompt"], 24)
        same = sum(a == b for a, b in zip(tokens, spec["tiny"]["greedy"]))
        results["tiny"][f"{variant}_greedy_match"] = f"{same}/24"
        log(f"tiny Llama ({variant}) greedy tokens equal to onnxruntime's: {same}/24")


def check_smollm2(spec, results) -> None:
    import torch

    sm = spec.get("smollm2")
    folder = OUT / "smollm2"
    if not sm:
        log("smollm2: not built (build without --quick)")
        return
    missing = [p for p in sm["parts"] if not (PARTS / p).exists()]
    if missing:
        log(f"smollm2: SKIPPED, weight parts missing here: {missing} (docs/gpu.md: send them in earlier calls)")
        results["smollm2"] = {"skipped": f"missing {missing}"}
        return
    weights = folder / "model.weights.bin"
    with open(weights, "wb") as out:
        for p in sm["parts"]:
            out.write((PARTS / p).read_bytes())
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == sm["sha256"], "weights parts corrupted"
    from pbs2pc.runtime import load

    model = load(folder / "model.so")
    log(f"smollm2 loaded on {model.device}")
    rows = []
    for i, ref in enumerate(sm["prompts"]):
        ids = np.array([ref["ids"]], np.int64)
        logits = model.logits(ids)[0, -1]
        err = _rel(logits, np.load(folder / f"ort_logits_{i}.npy"))
        tokens = model.generate_ids(ref["ids"], 16)
        same = sum(a == b for a, b in zip(tokens, ref["greedy"]))
        rows.append({"prompt": ref["prompt"], "logits_rel_err": err, "greedy_match": f"{same}/16"})
        log(f"smollm2 {ref['prompt']!r}: logits rel err {err:.2e}, greedy tokens equal to onnxruntime's: {same}/16")
    token, steps = int(np.argmax(model.prefill(sm["prompts"][0]["ids"], 256))), 64
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        token = int(np.argmax(model.step(token)))
    ours = steps / (time.perf_counter() - t0)
    theirs = torch_decode_rate(steps)
    results["smollm2"] = {"prompts": rows, "decode_tok_s": ours, "torch_fp16_decode_tok_s": theirs}
    log(f"smollm2 decode: pbs2pc {ours:.1f} tok/s (logits to the host each step), torch fp16 {theirs:.1f} tok/s")


def torch_decode_rate(steps: int, layers=30, hidden=576, inter=1536, heads=9, kv=3, vocab=49152) -> float:
    """Tokens/s of a greedy fp16 decode of a SmolLM2-135M-shaped Llama in plain torch (random weights, a
    KV cache, logits to the host each step like pbs2pc's loop)."""
    import torch

    d, dev, f16 = hidden // heads, "cuda", torch.float16
    W = lambda *s: torch.randn(*s, device=dev, dtype=f16) * 0.02  # noqa: E731
    emb = W(vocab, hidden)
    L = [dict(q=W(hidden, hidden), k=W(kv * d, hidden), v=W(kv * d, hidden), o=W(hidden, hidden),
              g=W(inter, hidden), u=W(inter, hidden), dn=W(hidden, inter)) for _ in range(layers)]
    cache = [(torch.zeros(1, kv, 512, d, device=dev, dtype=f16), torch.zeros(1, kv, 512, d, device=dev, dtype=f16))
             for _ in range(layers)]
    norm = lambda x: x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5).to(f16)  # noqa: E731

    def step(tok, pos):
        x = emb[tok][None]
        for l, (kc, vc) in zip(L, cache):
            h = norm(x)
            q = (h @ l["q"].T).view(1, heads, 1, d)
            kc[:, :, pos] = (h @ l["k"].T).view(1, kv, d)
            vc[:, :, pos] = (h @ l["v"].T).view(1, kv, d)
            kk = kc[:, :, :pos + 1].repeat_interleave(heads // kv, 1)
            vv = vc[:, :, :pos + 1].repeat_interleave(heads // kv, 1)
            a = torch.softmax((q @ kk.transpose(-1, -2)).float() / d ** 0.5, -1).to(f16) @ vv
            x = x + a.reshape(1, hidden) @ l["o"].T
            h = norm(x)
            x = x + (torch.nn.functional.silu(h @ l["g"].T) * (h @ l["u"].T)) @ l["dn"].T
        return (norm(x) @ emb.T).float().cpu()

    with torch.no_grad():
        tok = 1
        for p in range(8):
            tok = int(step(tok, p).argmax())
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for p in range(8, 8 + steps):
            tok = int(step(tok, p).argmax())
        return steps / (time.perf_counter() - t0)


def run(args) -> int:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    start = time.perf_counter()
    spec = json.loads((OUT / "spec.json").read_text())
    tvm = _runtime()
    dev = tvm.cuda(0)
    log(f"GPU {dev.device_name}, compute {dev.compute_version}; libraries built for {spec['arch']}")
    results = {"gemv": {}, "layers": {}, "attention": {}, "tiny": {}, "bench": []}
    for step in (check_gemv, check_layers, check_attention, check_tiny):
        try:
            step(tvm, dev, spec, results)
        except Exception as exc:  # noqa: BLE001 - report and go on: one run has to say as much as it can
            log(f"{step.__name__} FAILED: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:400]}")
    if not args.no_bench:
        try:
            bench(tvm, dev, spec, results)
        except Exception as exc:  # noqa: BLE001
            log(f"bench FAILED: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:400]}")
    try:
        check_smollm2(spec, results)
    except Exception as exc:  # noqa: BLE001
        log(f"smollm2 FAILED: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:400]}")
    results["seconds"] = time.perf_counter() - start
    out = Path(os.environ.get("OUT", OUT))
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1) + "\n")
    log(f"done in {results['seconds']:.0f} s; results in {out / 'gpu_check.json'}")
    return 0


def _import_project() -> None:
    """On the GPU machine the project is a plain folder on PYTHONPATH: map the pbs2pc subpackages onto the
    repository's top-level folders, as the installed package does."""
    sys.path.insert(0, str(ROOT))
    import pbs2pc

    if str(ROOT) not in pbs2pc.__path__:
        pbs2pc.__path__.append(str(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["build", "run"])
    p.add_argument("--arch", default="sm_90")
    p.add_argument("--quick", action="store_true", help="build: two GEMV cases, one benchmark shape, no SmolLM2")
    p.add_argument("--rebuild", action="store_true", help="build: compile SmolLM2 again")
    p.add_argument("--no-bench", action="store_true", help="run: numerics only")
    args = p.parse_args(argv)
    _import_project()
    return build(args) if args.mode == "build" else run(args)


if __name__ == "__main__":
    sys.exit(main())
