"""Helpers shared by the tests (imported as ``testutil``; pytest puts tests/ on the path)."""

from __future__ import annotations

import functools
import os

import numpy as np

#: ``--target x86``: this machine's best x86 preset (x86-avx512 or x86-avx2), what the suite's builds use.
X86 = "x86"

#: The x86 presets' TVM targets, with the 2 cores these machines have (compile-only tests name them;
#: numerics run on :func:`host_target`).
AVX512_TARGET = {"kind": "llvm", "mcpu": "skylake-avx512", "mattr": ["+avx512vnni", "+avx512vpopcntdq", "+avx512vbmi"],
                 "num-cores": 2}
AVX2_TARGET = {"kind": "llvm", "mcpu": "haswell", "mattr": ["+avx2", "+fma", "+f16c"], "num-cores": 2}


def host_lacks(preset_name: str) -> list[str]:
    """The CPU features of the preset ``preset_name`` that this machine lacks (empty: it runs its code)."""
    from pbs2pc import cpu
    from pbs2pc.compiler.targets import PRESETS

    return cpu.missing(PRESETS[preset_name].features)


def requires(preset_name: str):
    """A pytest mark that skips a test which runs ``preset_name``'s code on a CPU lacking its features."""
    import pytest

    lacking = host_lacks(preset_name)
    return pytest.mark.skipif(bool(lacking), reason=f"this CPU lacks {', '.join(lacking[:4])}: {preset_name} code "
                                                    "runs on a machine that has them (compile-only tests cover it here)")


def host_target(num_cores: int = 2):
    """The TVM target of this machine's best x86 preset (what numerics tests run on)."""
    from pbs2pc.compiler.targets import get_preset

    return get_preset("x86", num_cores=num_cores).tvm_target()


def make_ids(batch: int, seq: int, vocab: int = 256, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, seq)).astype(np.int64)


@functools.lru_cache(maxsize=4)
def _decoder(path: str):
    from pbs2pc.runtime.reference import OrtDecoder

    return OrtDecoder(path)


def ort_logits(onnx_path, ids: np.ndarray) -> np.ndarray:
    """Logits from onnxruntime running an exported file on a fresh sequence (sessions cached per path)."""
    return _decoder(str(onnx_path)).logits(ids)


def rel_err(got, ref) -> float:
    return float(np.abs(np.asarray(got, np.float64) - ref).max() / np.abs(ref).max())


def legalize_and_fuse(mod):
    """The pipeline's phases before scheduling: NT-matmul fusion, legalization, op fusion."""
    from pbs2pc.compiler.tvm_compat import relax, tvm

    seq = [relax.transform.FuseTransposeMatmul(), relax.transform.LegalizeOps(),
           relax.transform.AnnotateTIROpPattern(), relax.transform.FuseOps(),
           relax.transform.FuseTIR(), relax.transform.DeadCodeElimination()]
    return tvm.ir.transform.Sequential(seq)(mod)


def mask_plane(rng, n: int, k: int, kind: str):
    """uint8 ``[n, k/8]`` mask plane: ``"6:8"`` / ``"4:8"`` (that many kept of every 8 columns) or ``"random"``."""
    if kind == "random":
        return rng.integers(0, 256, (n, k // 8), dtype=np.uint8)
    kept = int(kind.split(":")[0])
    bits = np.zeros((n, k // 8, 8), np.uint8)
    bits[..., :kept] = 1
    return np.packbits(rng.permuted(bits, axis=2), axis=2, bitorder="little").reshape(n, k // 8)


def run_on_threads(module: str, expression: str, threads: int = 2) -> tuple[int, float]:
    """``expression`` (a number, e.g. a kernel's relative error) evaluated in a child process whose TVM pool
    has ``threads`` threads, with the test module ``module`` imported as ``t``; returns the pool's thread
    count and the value. The suite's own process may run TVM's pool with one thread (half the CPUs of a
    2-CPU machine), where a parallel loop is one task: here the tasks really split."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/passes']; "
            f"import {module} as t, tvm_ffi; "
            f"print(tvm_ffi.get_global_func('runtime.NumThreads')(), {expression})")
    done = subprocess.run([sys.executable, "-c", code, str(tests)], env={**os.environ, "TVM_NUM_THREADS": str(threads)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    count, value = done.stdout.split()[-2:]
    return int(count), float(value)


def random_layer(rows: int, n: int, k: int, g: int, mask_kind: str | None, has_mu: bool, has_bias: bool, seed: int = 0):
    """``(x [rows, K] f32, sign, mask or None, alpha, mu or None, bias or None)``: a random sparse-binary layer in
    the interchange layout (random sign bits, ``mask_plane`` masks, fp16 scales) and its input. The first
    group of inputs is 20x larger and, with several rows, the middle row 100x smaller, so a kernel that mixes
    up groups or rows fails."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    x[:, :g] *= 20
    if rows > 1:
        x[rows // 2] *= 0.01
    sign = rng.integers(0, 256, (n, k // 8), dtype=np.uint8)
    mask = None if mask_kind is None else mask_plane(rng, n, k, mask_kind)
    alpha = (rng.random((n, k // g)) + 0.5).astype(np.float16)
    mu = (rng.standard_normal((n, k // g)) * 0.2).astype(np.float16) if has_mu else None
    bias = rng.standard_normal(n).astype(np.float32) if has_bias else None
    return x, sign, mask, alpha, mu, bias


def random_structure(rng, n: int, k: int, g: int, groups: bool = True, salient: int = 4) -> dict:
    """The op contract v2 inputs of a random layer ``[n, k]``: a random group bitmap with its fp16 scales
    (``groups``) and a residual plane on ``salient`` random columns per ``g``-column block (0: none), as
    keyword arguments of :class:`pbs2pc.models.format.PackedLinear`."""
    out = {}
    if groups:
        out["group"] = rng.integers(0, 256, (n, k // 8), dtype=np.uint8)
        out["group_alpha"] = (rng.random((n, k // g)) + 1.0).astype(np.float16)
        out["group_mu"] = (rng.standard_normal((n, k // g)) * 0.3).astype(np.float16)
    if salient:
        cols = np.zeros(k, bool)
        for start in range(0, k, g):
            cols[start + rng.choice(g, min(salient, g), replace=False)] = True
        out["salient"] = np.packbits(cols[None], axis=1, bitorder="little")
        count = int(cols.sum())
        r = rng.integers(0, 2, (n, -(-count // 8) * 8)).astype(bool)
        out["residual"] = np.packbits(r, axis=1, bitorder="little")
        out["residual_alpha"] = (rng.random((n, k // g)) * 0.5 + 0.1).astype(np.float16)
        out["residual_mu"] = (rng.standard_normal((n, k // g)) * 0.1).astype(np.float16)
    return out


def v2_layer(n: int, k: int, g: int, mask_kind: str | None = "6:8", groups: bool = True, salient: int = 4,
             has_mu: bool = True, has_bias: bool = True, seed: int = 0):
    """A random op contract v2 :class:`~pbs2pc.models.format.PackedLinear` ``[n, k]`` (``random_layer`` planes
    plus ``random_structure``); ``mask_kind="random"`` breaks n:m on purpose (kernels read any mask), so that
    layer is not validated."""
    from pbs2pc.models.format import NMScheme, PackedLinear

    _, sign, mask, alpha, mu, bias = random_layer(1, n, k, g, mask_kind, has_mu, has_bias, seed)
    nm = (8, 8) if mask_kind is None else (int(mask_kind[0]), 8) if mask_kind != "random" else None
    layer = PackedLinear(sign=sign, mask=mask, alpha=alpha, mu=mu, bias=bias, scheme=NMScheme(*(nm or (8, 8)), g),
                         **random_structure(np.random.default_rng(seed + 1), n, k, g, groups, salient))
    return layer if nm is None else layer.validate()


def aarch64_tools_missing() -> str:
    """Why aarch64 code cannot be built and run on this machine ("" when it can: an aarch64 host, or the
    cross compiler and qemu-aarch64 on another)."""
    import shutil

    from pbs2pc.runtime.native.toolchain import host_machine

    if host_machine() == "aarch64":
        return ""
    missing = [t for t in ("aarch64-linux-gnu-g++", "qemu-aarch64") if shutil.which(t) is None]
    if missing:
        return (f"{' and '.join(missing)} not installed (apt-get install g++-aarch64-linux-gnu qemu-user): "
                "aarch64 code is built here and run under qemu")
    return ""


def requires_aarch64():
    """A pytest mark that skips a test which builds aarch64 code and runs it (under qemu on x86)."""
    import pytest

    why = aarch64_tools_missing()
    return pytest.mark.skipif(bool(why), reason=why or "-")


def head_outputs(builder, table, x, target, knob_sets) -> list:
    """The LM head kernel ``builder(vocab, hidden, **knobs)`` run on ``x`` and ``table`` for each setting of
    ``knob_sets`` (outputs NaN-poisoned first): one output array per setting."""
    import tvm

    vocab, hidden = table.shape[0], x.shape[1]
    outs = []
    for knobs in knob_sets:
        func = builder(vocab, hidden, **knobs).with_attr("global_symbol", "head")
        lib = tvm.compile(tvm.IRModule({"head": func}), target=target)
        y = tvm.runtime.tensor(np.full((x.shape[0], vocab), np.nan, np.float32))
        lib["head"](tvm.runtime.tensor(x), tvm.runtime.tensor(table), y)
        outs.append(y.numpy())
    return outs


#: The environment of tune subprocesses (a tune, an RPC tracker and server, the device script): one thread.
TUNE_ENV = {**os.environ, "TVM_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


def tune_records(folder) -> list[dict]:
    """The records of the tuning database in ``folder``."""
    import json
    from pathlib import Path

    return [json.loads(line) for line in (Path(folder) / "records.jsonl").read_text().splitlines()]


def measured_settings(records) -> list[tuple]:
    """``(key, knobs as JSON)`` of each measured record."""
    import json

    return [(r["key"], json.dumps(r["knobs"], sort_keys=True)) for r in records if r.get("us") is not None]


def free_port() -> int:
    """A TCP port nothing listens on at the moment (loopback)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def registry_call(**kw):
    """A kernel registry :class:`~pbs2pc.passes.kernels.registry.Call` of a small v1 layer, one row, 16-row
    byte planes, with ``kw`` replaced."""
    from pbs2pc.passes.kernels.registry import Call

    base = dict(out_features=64, in_features=128, group_size=64, one_row=True, interleave=16, plane_dtype="uint8",
                has_mask=True, has_mu=True, has_bias=False)
    return Call(**{**base, **kw})
