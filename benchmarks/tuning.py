"""Default against tuned: each tuned kernel re-timed in an interleaved A/B beside its memory floor, and the
decode speed of the untuned and the tuned library.

    pbs2pc tune out/demo/model.onnx --trials 64 -o out/tune_db --library out/demo/model.so
    pbs2pc compile out/demo/model.onnx --tuning-db out/tune_db -o out/tuned/model.so
    python benchmarks/tuning.py out/demo/model.onnx out/tune_db --default out/demo/model.so --tuned out/tuned/model.so

The tuner keeps the fastest setting it measured, so its own table carries a selection bias on a noisy
machine (the best of several noisy times is low). Here each kernel's default and tuned settings are
built again and timed in turns, ``--rounds`` rounds of ``--repeats`` passes, as the tuner times them
(``pbs2pc.compiler.tune.search._run_rotating``: calls back to back over copies of the arguments larger
than the last-level cache, so weights come from memory as in a decode step), the median of all. The floor is the kernel's argument bytes over the read bandwidth of a 1 GiB array
(``machine.read_bandwidth``). Decode: a 16-token prompt, then ``--tokens`` steps, libraries in turns.
Writes ``benchmarks/results/tuning.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "tuning.json"


def kernel_ab(onnx: str, db: str, rounds: int, repeats: int, lm_head: str = "fp32", target: str = "x86") -> list[dict]:
    from pbs2pc.compiler.targets import CompileOptions, get_preset
    from pbs2pc.compiler.tune import confirm, extract, open_database

    preset = get_preset(target)
    database = open_database(db, preset)
    best = database.best()
    rows = []
    for kernel in extract(onnx, preset, CompileOptions(lm_head=lm_head)):
        record = best.get(kernel.key)
        if record is None:
            continue
        result = confirm.ab(kernel, record["knobs"], preset, rounds, repeats)
        default = database.default(kernel.key)
        rows.append({"key": kernel.key, "calls": kernel.calls, "knobs": record["knobs"],
                     "default_knobs": kernel.space()[0], **result,
                     "tuner_default_us": default["us"] if default else None, "tuner_tuned_us": record["us"]})
    return rows


def decode_rates(libraries: dict, tokens: int, rounds: int) -> dict:
    from pbs2pc.runtime import load

    models = {name: load(path) for name, path in libraries.items()}
    rates = {name: [] for name in models}
    prompt = list(range(1, 17))
    for _ in range(rounds):
        for name, model in models.items():
            model.prefill(prompt, capacity=len(prompt) + tokens + 1)
            start = time.perf_counter()
            for i in range(tokens):
                model.step(17 + i)
            rates[name].append(tokens / (time.perf_counter() - start))
    return {name: {"median": statistics.median(r), "all": [round(x, 1) for x in r]} for name, r in rates.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("db")
    parser.add_argument("--default", required=True, help="the library compiled without --tuning-db")
    parser.add_argument("--tuned", required=True, help="the library compiled with --tuning-db")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--lm-head", default="fp32", choices=["fp32", "fp16", "int8"],
                        help="the --lm-head the database was tuned and the libraries compiled with")
    parser.add_argument("--target", default="x86", help="the CPU target the database was tuned for (x86, "
                        "x86-avx2, x86-avx512: one this machine runs)")
    parser.add_argument("--out", default=str(RESULTS), help=f"the JSON results (default {RESULTS})")
    args = parser.parse_args(argv)

    import sys

    from pbs2pc.runtime.model import configure_threads

    configure_threads()  # before the first kernel: the model's threads for kernels and steps (TVM's default is fewer)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import read_bandwidth

    bandwidth = read_bandwidth()
    rows = kernel_ab(args.model, args.db, args.rounds, args.repeats, args.lm_head, args.target)
    decode = decode_rates({"default": args.default, "tuned": args.tuned}, args.tokens, args.rounds)
    data = {"target": args.target, "read_gbps": bandwidth, "threads": int(os.environ["TVM_NUM_THREADS"]),
            "kernels": rows, "decode_tokens_per_s": decode}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"read bandwidth {bandwidth} GB/s\n")
    print("| kernel | calls/step | default us | tuned us | speed-up | floor us | default / floor | tuned knobs |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        floor = r["bytes"] / (bandwidth * 1e3)
        knobs = ", ".join(f"{k}={v}" for k, v in sorted(r["knobs"].items()))
        if r["knobs"] == r["default_knobs"]:
            knobs += " (the default: the same code twice, the ratio is this run's noise)"
        print(f"| {r['key']} | {r['calls']} | {r['default_us']:.1f} | {r['tuned_us']:.1f} | "
              f"{r['default_us'] / r['tuned_us']:.2f}x | {floor:.1f} | {r['default_us'] / floor:.2f} | {knobs} |")
    d, t = decode["default"]["median"], decode["tuned"]["median"]
    print(f"\ndecode tokens/s: default {d:.1f}, tuned {t:.1f} ({t / d:.3f}x); rounds {decode}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
