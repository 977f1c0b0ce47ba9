#!/usr/bin/env python3
"""Time the tuning candidates of this folder on this machine: ``pbs2pc tune`` wrote them here.

    python3 measure.py                 # in the folder, or: python3 tune_db/device/measure.py
    python3 measure.py --repeats 25    # timed repeats per candidate (the median is its time)

Needs numpy and TVM's runtime only (no compiler, no pbs2pc): on a GPU machine with the runtime-only
bundle (``source .device/env.sh``), on a board with the aarch64 ``apache-tvm`` wheel. Each candidate is a
shared library with a function ``main``; its inputs are ``inputs/<kernel>.npz`` (the model's kind of
planes and scales), in the parameters' order. Per candidate:

1. its output is checked against the default setting's (same kernel, same inputs): a setting that
   computes something else is recorded as a failed run, never as the fastest;
2. it is timed as a decode step runs it: calls back to back over copies of its arguments that together
   exceed the last-level cache (weights come from memory), the time of one pass divided by the copies,
   per repeat; on a CUDA device with PyTorch importable, the kernels' own device time from CUPTI
   (``torch.profiler``), so the launch overhead of this Python loop does not count (a decode step
   replays its kernels in a CUDA graph); else wall-clock time.

Each result is one JSON line of ``results.jsonl``, flushed and fsynced as it is measured; a run that is
killed and started again measures only what is missing. Copy ``results.jsonl`` back to the same folder
on the machine that tuned, and run the same ``pbs2pc tune`` command again: it takes the results in.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PLAN, RESULTS = "plan.json", "results.jsonl"
#: Relative difference (to the largest output) beyond which a setting's output is not the default's.
TOLERANCE = 1e-4


def log(message: str) -> None:
    print(message, flush=True)


def runtime(device: str):
    """TVM's runtime, with its CUDA part for a CUDA device (the runtime-only bundle loads it on demand)."""
    import tvm

    if device == "cuda":
        import ctypes

        lib = Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"
        if lib.exists():
            ctypes.CDLL(str(lib), ctypes.RTLD_GLOBAL)
    return tvm


def cupti_timer(device: str):
    """A function ``(run, calls) -> seconds of device time per call`` from CUPTI through torch.profiler, or
    None where there is no such thing (a CPU device, no torch, no CUDA in torch)."""
    if device != "cuda":
        return None
    try:
        import torch
        from torch.profiler import ProfilerActivity, profile

        if not torch.cuda.is_available():
            return None
    except Exception:  # noqa: BLE001 - no usable torch: wall-clock time
        return None

    def timed(run, calls: int) -> float | None:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run()
        total_us = sum(getattr(e, "device_time_total", 0) or 0 for e in prof.key_averages())
        return total_us * 1e-6 / calls if total_us > 0 else None

    return timed


def append(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def finished(path: Path) -> set:
    """``(key, knobs)`` of the candidates ``results.jsonl`` has (a line cut short by a kill is dropped)."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    done = set()
    for line in data[:end].decode("utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            done.add((r["key"], json.dumps(r["knobs"], sort_keys=True)))
    return done


def output(func, args, dev):
    """The output (the last argument) of one call of ``func``."""
    func(*args)
    dev.sync()
    return args[-1].numpy()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", default=str(HERE), help="the candidates' folder (default: this script's)")
    parser.add_argument("--repeats", type=int, default=25, help="timed repeats per candidate (default 25)")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    plan = json.loads((folder / PLAN).read_text())
    device_kind = plan["device"]
    if plan.get("threads") and not os.environ.get("TVM_NUM_THREADS"):
        # the kernel threads the model gets on its target (TVM's default is half the hardware threads on x86)
        os.environ["TVM_NUM_THREADS"] = str(plan["threads"])
    try:
        tvm = runtime(device_kind)
        dev = tvm.cuda(0) if device_kind == "cuda" else tvm.cpu(0)
        present, why = dev.exist, ""
    except OSError as exc:  # no CUDA driver: TVM's CUDA runtime does not load
        present, why = False, f" ({exc})"
    if not present:
        log(f"no {device_kind} device on this machine{why}; run this where the target runs.")
        return 2
    timer = cupti_timer(device_kind)
    results = folder / RESULTS
    done = finished(results)
    todo = [c for c in plan["candidates"] if (c["key"], json.dumps(c["knobs"], sort_keys=True)) not in done]
    log(f"{len(todo)} of {len(plan['candidates'])} candidates to time on {device_kind} "
        f"({'CUPTI kernel time' if timer else 'wall-clock time'}); results: {results}")
    arrays: dict = {}
    reference: dict = {}
    start = time.perf_counter()
    for number, cand in enumerate(todo, start=1):
        key = cand["key"]
        record = {"key": key, "knobs": cand["knobs"], "default": cand["default"], "us": None, "runs_us": None,
                  "error": None, "timer": "cupti" if timer else "wall", "device": device_kind}
        try:
            if key not in arrays:
                with np.load(folder / cand["inputs"]) as npz:
                    arrays[key] = [npz[name] for name in sorted(npz.files)]
            host = arrays[key]
            per_copy = sum(a.nbytes for a in host)
            copies = max(2, min(1024, -(-plan["rotate_bytes"] // per_copy)))
            func = tvm.runtime.load_module(str(folder / cand["library"]))["main"]
            args_list = [[tvm.runtime.tensor(a, dev) for a in host] for _ in range(copies)]
            out = output(func, args_list[0], dev)
            if cand["default"]:
                reference[key] = out
            else:
                if key not in reference:  # the default was timed by an earlier run of this script
                    default = next(c for c in plan["candidates"] if c["key"] == key and c["default"])
                    reference[key] = output(tvm.runtime.load_module(str(folder / default["library"]))["main"],
                                            [tvm.runtime.tensor(a, dev) for a in host], dev)
                ref = reference[key]
                err = float(np.abs(out - ref).max() / max(float(np.abs(ref).max()), 1e-30))
                if not np.isfinite(err) or err > TOLERANCE:
                    raise ValueError(f"its output differs from the default setting's by {err:.1e} (relative)")

            def one_pass():
                for a in args_list:
                    func(*a)
                dev.sync()

            one_pass()
            runs = []
            for _ in range(args.repeats):
                seconds = timer(one_pass, copies) if timer else None
                if seconds is None:
                    t0 = time.perf_counter()
                    one_pass()
                    seconds = (time.perf_counter() - t0) / copies
                    record["timer"] = "wall"
                runs.append(seconds * 1e6)
            record["runs_us"] = [round(t, 3) for t in runs]
            record["us"] = round(statistics.median(runs), 3)
        except Exception as exc:  # noqa: BLE001 - one candidate's failure is its record, the run goes on
            record["error"] = f"run: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else ''}"
        append(results, record)
        left = (time.perf_counter() - start) / number * (len(todo) - number)
        what = f"{record['us']:.2f} us" if record["us"] is not None else record["error"]
        log(f"[{number}/{len(todo)}] {key} {json.dumps(cand['knobs'], sort_keys=True)}: {what} (about {left:.0f} s left)")
    log(f"done: {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
