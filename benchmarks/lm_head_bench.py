"""Speed of the LM head table types (``pbs2pc compile --lm-head fp32 / fp16 / int8``), two ways.

    python benchmarks/lm_head_bench.py kernel                     # the head kernel alone, ~1 min
    python benchmarks/lm_head_bench.py decode DIR/fp16/model.so DIR/int8/model.so [...]   # decode ms/token

``kernel``: y = x @ Wᵀ at SmolLM2's 49152 x 576 (one token), with the table in fp32 (the fp16 kernel's loops
on an fp32 table), fp16 (``passes/kernels/lm_head_fp16.py``) and int8 (``passes/kernels/lm_head_int8.py``),
2 threads; each contender rotates through enough copies of its table (at least 96 MB) that every call
streams it from memory past the 32 MB L3; the contenders take turns call by call in one process, so the
machine's drift hits them alike. Reported: median ms per call and table GB/s.

``decode``: each library (compiled from the same model with different ``--lm-head``) is loaded in this
process, given the same 128-token prompt (``prefill``) and then decodes in turns, ``--steps`` tokens per turn
and ``--rounds`` turns each, alternating libraries; reported: the median ms per token of each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402

V, H = 49152, 576


def kernel_bench(calls: int) -> dict:
    from pbs2pc.compiler.tvm_compat import tvm
    from pbs2pc.passes.kernels import lm_head_fp16, lm_head_int8
    from pbs2pc.compiler.targets import get_preset

    target = get_preset("x86").tvm_target()
    rng = np.random.default_rng(0)
    base = (rng.standard_normal((V, H)) * 0.05).astype(np.float32)
    contenders = {
        "fp32": (lm_head_fp16.lm_head_fp16(V, H, "float32"), base),
        "fp16": (lm_head_fp16.lm_head_fp16(V, H), base.astype(np.float16)),
        "int8": (lm_head_int8.lm_head_int8(V, H), lm_head_int8.quantize(base)),
    }
    x = tvm.runtime.tensor(rng.standard_normal((1, H)).astype(np.float32))
    y = tvm.runtime.tensor(np.zeros((1, V), np.float32))
    runs = {}
    for name, (func, table) in contenders.items():
        lib = tvm.compile(tvm.IRModule({"head": func.with_attr("global_symbol", "head")}), target=target)
        copies = max(3, -(-96_000_000 // table.nbytes))
        tables = [tvm.runtime.tensor(table + np.zeros_like(table)) for _ in range(copies)]
        runs[name] = (lib["head"], tables, table.nbytes, [])
    for i in range(calls):
        for fn, tables, _, times in runs.values():
            start = time.perf_counter()
            fn(x, tables[i % len(tables)], y)
            times.append(time.perf_counter() - start)
    out = {}
    for name, (_, tables, nbytes, times) in runs.items():
        ms = statistics.median(times[5:]) * 1e3
        out[name] = {"ms": round(ms, 3), "best_ms": round(min(times) * 1e3, 3), "GB/s": round(nbytes / ms / 1e6, 1),
                     "MB": round(nbytes / 1e6, 1), "copies": len(tables)}
    return out


def decode_bench(libs: list[str], steps: int, rounds: int, prompt: int) -> dict:
    from pbs2pc.runtime import load

    rng = np.random.default_rng(0)
    ids = [int(t) for t in rng.integers(100, 40000, prompt)]
    models = {lib: load(lib, threads=2) for lib in libs}
    times = {lib: [] for lib in libs}
    for _ in range(rounds):
        for lib, m in models.items():
            m.prefill(ids, prompt + steps + 8)
            token = 1000
            start = time.perf_counter()
            for _ in range(steps):
                token = int(np.argmax(m.step(token)))
            times[lib].append((time.perf_counter() - start) / steps * 1e3)
    return {lib: {"ms_per_token": round(statistics.median(t), 3), "best": round(min(t), 3),
                  "tok_s": round(1e3 / statistics.median(t), 1), "rounds": [round(v, 2) for v in t]}
            for lib, t in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    k = sub.add_parser("kernel")
    k.add_argument("--calls", type=int, default=200)
    d = sub.add_parser("decode")
    d.add_argument("libs", nargs="+")
    d.add_argument("--steps", type=int, default=32)
    d.add_argument("--rounds", type=int, default=8)
    d.add_argument("--prompt", type=int, default=128)
    args = parser.parse_args(argv)
    print(f"load average {os.getloadavg()}", flush=True)
    if args.what == "kernel":
        result = kernel_bench(args.calls)
    else:
        result = decode_bench(args.libs, args.steps, args.rounds, args.prompt)
    for name, row in result.items():
        print(name, row)
    print(f"load average {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
