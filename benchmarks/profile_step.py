"""Per-kernel profile of one compiled decode step or prompt, from the Relax VM's instrument hook.

    python benchmarks/profile_step.py model.so                      # decode step at 40 cached tokens
    python benchmarks/profile_step.py model.so --cached 560         # decode step at 560 cached tokens
    python benchmarks/profile_step.py model.so --prompt 512         # the prompt entry (prefill), 512 tokens

Prints the step's wall time without the hook (median), then the time per kernel with it (summed over the
calls in one step, averaged over ``--steps`` steps). The hook itself costs a few microseconds per call,
so the per-kernel sum exceeds the plain step time; compare kernels with each other, not with the total.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("library", help="a compiled model.so (with a KV cache)")
    parser.add_argument("--cached", type=int, default=40, help="tokens already in the cache (decode)")
    parser.add_argument("--prompt", type=int, help="profile the prompt entry on this many tokens instead")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--threads", type=int, help="kernel threads (default: every CPU)")
    args = parser.parse_args(argv)

    import tvm

    from pbs2pc.runtime import KVCache, load

    model = load(args.library, threads=args.threads)
    tensor = tvm.runtime.tensor
    rng = np.random.default_rng(0)
    if args.prompt:
        function, length, past = "prefill", args.prompt, 0
    else:
        function, length, past = "decode", 1, args.cached
    cache = KVCache(model, past + length)
    ids = rng.integers(0, model.vocab_size, (1, length))
    inputs = {"input_ids": ids, "attention_mask": np.ones((1, past + length), np.int64),
              "position_ids": np.arange(past, past + length)[None]}
    call_args = [tensor(inputs[n]) for n in model.inputs] + cache.tensors + model._params
    vm = model.vm[function]

    def step():
        cache.length = past
        start = time.perf_counter()
        vm(*call_args)
        return time.perf_counter() - start

    step()
    wall = statistics.median(step() for _ in range(args.steps))
    seconds, calls, started = collections.defaultdict(float), collections.Counter(), {}

    def instrument(func, name, before_run, ret_value, *rest):
        if before_run:
            started[name] = time.perf_counter()
        else:
            seconds[name] += time.perf_counter() - started[name]
            calls[name] += 1
        return 0

    model.vm.set_instrument(instrument)
    for _ in range(args.steps):
        step()
    print(f"{function}: {length} token(s) after {past} cached; {wall * 1e3:.2f} ms per call (median, no hook)")
    for name, total in sorted(seconds.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"{total / args.steps * 1e3:9.3f} ms {calls[name] // args.steps:5d} calls  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
