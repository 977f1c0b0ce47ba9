"""Text-generation benchmark: compiled SmolLM2-135M (6:8) against PyTorch and onnxruntime fp32 with KV caches.

    python benchmarks/generation.py                    # prompts of 32, 128, 512 tokens, 64 new (~6 min)
    python benchmarks/generation.py --quick            # one prompt length, 16 new tokens, 1 repeat

In one process and one run, for each prompt length (real held-out English text, the same tokens for all):

* **pbs2pc**: SmolLM2 compressed at 6:8 (the simple compressor: speed does not depend on how the bits were
  chosen), exported, compiled for this machine's x86 target (``--target x86``: x86-avx512 or x86-avx2), run
  through ``pbs2pc.runtime`` with its in-place KV cache: the ``main`` function for the prompt, ``decode``
  for each new token.
* **pbs2pc int8**: the same model compiled with ``--activations int8`` (int8 inputs to the sparse-binary
  linear layers: prompt and decode on x86-avx512, decode on x86-avx2; accuracy cost in
  ``benchmarks/int8_accuracy.py``), where the target has int8 kernels.
* **pbs2pc fp16 head** / **pbs2pc int8 head**: the same model compiled with ``--lm-head fp16`` / ``int8``
  (the tied embedding table stored in fp16 / int8: a half / about a quarter of the LM head's bytes;
  accuracy cost in ``benchmarks/lm_head_accuracy.py``); **pbs2pc int8 + int8 head** both options.
* **torch generate**: the original model in float32, ``model.generate(do_sample=False)`` with its default
  dynamic cache, 2 threads. Prefill = one call with ``max_new_tokens=1``; decode rate from the difference
  of two calls (``N`` and 1 new tokens, ``min_new_tokens`` set so both run to length).
* **torch loop**: the same model stepped by pbs2pc's own loop (:class:`pbs2pc.models.evaluate.TorchDecoder`),
  i.e. without ``generate``'s per-token overhead: the fairest view of PyTorch's kernels.
* **onnxruntime**: the original model exported by pbs2pc (dense fp32 ``MatMul``s, the same ``Attention``
  op with past/present) on onnxruntime's CPU provider, 2 intra-op threads, driven by the same loop.
* **llama.cpp (Q4_1)**: the bundled GGUF file itself (SmolLM2-135M-Instruct, Q4_1 weights) in llama.cpp's
  CPU backend, built from source with ``-DGGML_NATIVE=ON`` by ``benchmarks/llama_cpp.py`` (under
  ``benchmarks/.llama.cpp/``; about 10 minutes on 2 cores, once), measured by its own ``llama-bench`` with
  2 threads: prefill = one batch of the prompt's length from an empty cache; decode = ``--new-tokens``
  tokens one at a time after a context of the prompt's length (``-d``); mean of ``--repeats``. Its prompt
  is llama-bench's own random tokens, not the held-out text (speed does not depend on which tokens).
  On by default when llama.cpp is built or can be built here (cmake and a C++ compiler); ``--no-llama-cpp``
  skips it.

Greedy decoding, no early stop (all runs produce exactly ``--new-tokens`` tokens). Every figure is the
median of ``--repeats`` repeats. Beside the decode rates: the memory floor of one decode step (bytes of
weights each runtime reads per token / the read bandwidth measured at the start, 2 threads).
Results go to ``benchmarks/results/generation.json`` and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import llama_cpp  # benchmarks/llama_cpp.py (this folder comes first on sys.path), not llama-cpp-python
from machine import machine_record, read_bandwidth, timed

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "generation.json"
LLAMA_CPP = "llama.cpp (Q4_1)"


def build(workdir: Path, rebuild: bool):
    """The original model (torch), its dense ONNX export, and the compiled 6:8 libraries for this machine's
    x86 target (with int8 activations only where the target has those kernels)."""
    from pbs2pc.compiler.build import compile_model
    from pbs2pc.compiler.targets import CompileOptions, get_preset
    from pbs2pc.models import compress, export, hf
    from pbs2pc.passes.kernels import registry

    preset = get_preset("x86")

    def stale(lib: Path) -> bool:  # missing, or built by another pbs2pc or for another target
        from pbs2pc.runtime.artifact import read_manifest

        try:
            return rebuild or read_manifest(lib)["target"] != preset.name
        except Exception:  # noqa: BLE001 - no artifact or an old manifest version
            return True

    model, tokenizer, source = hf.load("smollm2-135m")
    model.eval()
    dense_onnx, lib = workdir / "original" / "model.onnx", workdir / "pbs2p" / "model.so"
    if rebuild or not dense_onnx.exists():
        print("exporting the original model (dense fp32) ...", flush=True)
        export.export(model, dense_onnx, {"source_model": "smollm2-135m"})
    onnx = workdir / "pbs2p" / "model.onnx"
    if rebuild or not onnx.exists():
        print("compressing (6:8, simple) and exporting ...", flush=True)
        small = copy.deepcopy(model)
        info = compress.compress_model(small, "6:8", method="simple", progress=False)
        export.export(small, onnx, {"source_model": "smollm2-135m", **info})
        del small
    libs = {"pbs2pc": (lib, CompileOptions())}
    if "int8" in registry.activations_offered(preset):
        libs["pbs2pc int8"] = (workdir / "pbs2p-int8" / "model.so", CompileOptions(activations="int8"))
    libs["pbs2pc fp16 head"] = (workdir / "pbs2p-fp16-head" / "model.so", CompileOptions(lm_head="fp16"))
    libs["pbs2pc int8 head"] = (workdir / "pbs2p-int8-head" / "model.so", CompileOptions(lm_head="int8"))
    if "int8" in registry.activations_offered(preset):
        libs["pbs2pc int8 + int8 head"] = (workdir / "pbs2p-int8-int8-head" / "model.so",
                                           CompileOptions(activations="int8", lm_head="int8"))
    for name, (path, options) in libs.items():
        if stale(path):
            print(f"compiling {name} for {preset.name} ...", flush=True)
            compile_model(onnx, path, preset, options=options)
    return model, tokenizer, dense_onnx, {name: path for name, (path, _) in libs.items()}


def prompts(tokenizer, lengths: list[int]) -> dict[int, list[int]]:
    from pbs2pc.models import data

    longest = max(lengths)
    window = data.token_windows(tokenizer, "heldout", longest, max_windows=1)[0].tolist()
    return {n: window[:n] for n in lengths}


def loop_rates(decoder, ids: list[int], new_tokens: int, repeats: int) -> dict:
    """Prefill seconds and decode tokens/s through pbs2pc's generation loop (greedy, no early stop)."""
    from pbs2pc.runtime import generate as gen

    ttft, rate = [], []
    for _ in range(repeats):
        stats = gen.generate(decoder, ids, new_tokens).stats
        ttft.append(stats.time_to_first_token_s)
        rate.append(stats.decode_tokens_per_s)
    return {"prefill_s": statistics.median(ttft), "decode_tok_s": statistics.median(rate)}


def torch_generate_rates(model, ids: list[int], new_tokens: int, repeats: int) -> dict:
    import torch

    x = torch.tensor([ids])

    def run(n):
        with torch.inference_mode():
            return timed(lambda: model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False))

    run(2)
    one = statistics.median(run(1) for _ in range(repeats))
    full = statistics.median(run(new_tokens) for _ in range(repeats))
    return {"prefill_s": one, "decode_tok_s": (new_tokens - 1) / max(full - one, 1e-9)}


def llama_cpp_setup(args):
    """Path of llama-bench (built now if need be), or None when llama.cpp is off or, in auto mode, cannot be
    built (a one-line warning then; an explicit ``--llama-cpp`` fails instead, before anything is measured)."""
    explicit = args.llama_cpp is True
    if args.llama_cpp is None:
        args.llama_cpp = llama_cpp.buildable()
        if not args.llama_cpp:
            print(f"llama.cpp skipped: {', '.join(llama_cpp.missing_tools())} not found "
                  f"({llama_cpp.INSTALL_HINT})", flush=True)
    if not args.llama_cpp:
        return None
    try:
        return llama_cpp.build()
    except llama_cpp.LlamaCppError as exc:
        if explicit:
            raise
        print(f"llama.cpp skipped: {exc}", flush=True)
        args.llama_cpp = False
        return None


def llama_cpp_rows(bench, args) -> tuple[dict, dict]:
    """``({prompt length: row entry}, record for the JSON)`` from llama-bench on the bundled GGUF file.

    Row entries have the keys of :func:`loop_rates` (``prefill_s``, ``decode_tok_s``), so the table handles
    them like every other runtime's, plus llama-bench's own ``prefill_tok_s`` and standard deviations."""
    gguf = llama_cpp.bundled_gguf("smollm2-135m")
    print(f"llama.cpp: llama-bench on {gguf.name} ...", flush=True)
    result = llama_cpp.bench(bench, gguf, threads=2, n_gen=args.new_tokens, n_prompt=tuple(args.prompt_lengths),
                             repeats=args.repeats, depths=tuple(args.prompt_lengths))
    entries = {}
    for length in args.prompt_lengths:
        pp, tg = result["prefill_tok_s"].get(length), result["decode_tok_s"].get(length)
        if pp and tg:
            entries[length] = {"prefill_s": length / pp, "decode_tok_s": tg, "prefill_tok_s": pp,
                               "prefill_tok_s_sd": result["prefill_tok_s_sd"].get(length),
                               "decode_tok_s_sd": result["decode_tok_s_sd"].get(length)}
    record = {"version": llama_cpp.version(bench), "gguf": gguf.name, "gguf_bytes": gguf.stat().st_size,
              "commands": result["commands"], "cmake_flags": list(llama_cpp.CMAKE_FLAGS),
              "cpu_info": result["cpu_info"], "model_type": result["model_type"], "settings": result["settings"]}
    return entries, record


def run_benchmark(args) -> dict:
    import torch

    from pbs2pc.models.evaluate import TorchDecoder
    from pbs2pc.runtime import load
    from pbs2pc.runtime.reference import OrtDecoder

    torch.set_num_threads(2)
    llama_bench = llama_cpp_setup(args)  # built before anything is measured: the build takes all cores
    bandwidth = read_bandwidth()
    model, tokenizer, dense_onnx, libs = build(args.workdir, args.rebuild)
    compiled = {name: load(lib, threads=2) for name, lib in libs.items()}  # 2 threads, as torch and onnxruntime
    ort = OrtDecoder(dense_onnx, threads=2)
    torch_loop = TorchDecoder(model)
    weight_bytes = {name: sum(p["nbytes"] for p in c.manifest["params"]) for name, c in compiled.items()
                    if name not in ("pbs2pc int8", "pbs2pc int8 + int8 head")}  # int8 activations: the same bytes
    weight_bytes["torch"] = sum(p.numel() * p.element_size() for p in model.parameters())
    weight_bytes["onnxruntime"] = weight_bytes["torch"]
    rows = []
    for length, ids in prompts(tokenizer, args.prompt_lengths).items():
        print(f"prompt {length} tokens ...", flush=True)
        row = {"prompt_tokens": length, "new_tokens": args.new_tokens}
        for d in (*compiled.values(), ort, torch_loop):  # warm-up of every runtime on this length
            loop_rates(d, ids, 2, 1)
        for name, c in compiled.items():
            row[name] = loop_rates(c, ids, args.new_tokens, args.repeats)
        row["torch generate"] = torch_generate_rates(model, ids, args.new_tokens, args.repeats)
        row["torch loop"] = loop_rates(torch_loop, ids, args.new_tokens, args.repeats)
        row["onnxruntime"] = loop_rates(ort, ids, args.new_tokens, args.repeats)
        rows.append(row)
        print(json.dumps(row), flush=True)
    llama_record = None
    if llama_bench is not None:  # one llama-bench run covers every prompt length
        entries, llama_record = llama_cpp_rows(llama_bench, args)
        for row in rows:
            if row["prompt_tokens"] in entries:
                row[LLAMA_CPP] = entries[row["prompt_tokens"]]
        weight_bytes[LLAMA_CPP] = llama_record["gguf_bytes"]  # the tied Q4_1 head reads (nearly) the whole file
        print(json.dumps({"llama.cpp": entries}), flush=True)
    return {
        "command": "python benchmarks/generation.py " + " ".join(args.argv),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        **machine_record(),
        "threads": 2,
        "read_bandwidth_gb_s": bandwidth,
        "weight_bytes_per_token": weight_bytes,
        "decode_floor_ms": {k: round(v / bandwidth / 1e6, 2) for k, v in weight_bytes.items()},
        "load_average": os.getloadavg()[0],
        **({"llama_cpp": llama_record} if llama_record else {}),
        "rows": rows,
    }


RUNTIMES = ("pbs2pc", "pbs2pc int8", "pbs2pc fp16 head", "pbs2pc int8 head", "pbs2pc int8 + int8 head",
            "torch generate", "torch loop", "onnxruntime", LLAMA_CPP)


def table(data: dict) -> str:
    lines = ["| prompt | runtime | time to first token (ms) | prefill tok/s | decode tok/s | decode ms/token | "
             "pbs2pc decode speed-up |",
             "|---|---|---|---|---|---|---|"]
    for row in data["rows"]:
        ours = row["pbs2pc"]["decode_tok_s"]
        for name in RUNTIMES:
            if name not in row:  # a result file from before the runtime was added
                continue
            r = row[name]
            lines.append(f"| {row['prompt_tokens']} | {name} | {r['prefill_s'] * 1e3:.0f} | "
                         f"{row['prompt_tokens'] / r['prefill_s']:.0f} | {r['decode_tok_s']:.1f} | "
                         f"{1e3 / r['decode_tok_s']:.1f} | {ours / r['decode_tok_s']:.2f}x |")
    floor = data["decode_floor_ms"]
    lines.append("")
    lines.append(f"Read bandwidth {data['read_bandwidth_gb_s']} GB/s (2 threads). Weights read per decode step: "
                 f"pbs2pc {data['weight_bytes_per_token']['pbs2pc'] / 1e6:.0f} MB (floor {floor['pbs2pc']} ms), "
                 + "".join(f"with the {h} head {data['weight_bytes_per_token'][f'pbs2pc {h} head'] / 1e6:.0f} MB "
                           f"(floor {floor[f'pbs2pc {h} head']} ms), " for h in ("fp16", "int8")
                           if f"pbs2pc {h} head" in floor) +
                 f"torch / onnxruntime fp32 {data['weight_bytes_per_token']['torch'] / 1e6:.0f} MB "
                 f"(floor {floor['torch']} ms). Load average at the end: {data['load_average']:.2f}.")
    if data.get("llama_cpp"):
        ll = data["llama_cpp"]
        lines.append("")
        lines.append(f"{LLAMA_CPP}: llama.cpp {ll['version']}, CPU backend built with "
                     f"{' '.join(f for f in ll['cmake_flags'] if 'NATIVE' in f)}, measured by llama-bench "
                     f"(2 threads; prefill = one batch from an empty cache, its time stands for the time to "
                     f"first token; decode after a context of the prompt's length; mean of the repeats); "
                     f"{ll['gguf']} is {ll['gguf_bytes'] / 1e6:.0f} MB"
                     + (f" (floor {floor[LLAMA_CPP]} ms)." if LLAMA_CPP in floor else "."))
    if "simd_features" in data:  # result files from before machine_record() lack it
        simd = [f for f, on in data.get("simd_features", {}).items() if on]
        lines.append(f"CPU: {data.get('cpu')}, pbs2pc target {data.get('x86_isa')}, SIMD: {' '.join(simd) or '?'}.")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-lengths", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one 32-token prompt, 16 new tokens, 1 repeat")
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "pbs2pc-bench-generation")
    parser.add_argument("--rebuild", action="store_true", help="export and compile again even if present")
    parser.add_argument("-o", "--output", type=Path, default=RESULTS)
    parser.add_argument("--llama-cpp", action=argparse.BooleanOptionalAction, default=None,
                        help="add llama.cpp (Q4_1, llama-bench) rows; default: on when llama.cpp is built or "
                             "buildable here (benchmarks/llama_cpp.py builds it on first use, ~10 min)")
    args = parser.parse_args(argv)
    args.argv = argv
    if args.quick:
        args.prompt_lengths, args.new_tokens, args.repeats = [32], 16, 1
        if args.output == RESULTS:  # a smoke run does not replace the recorded run
            args.output = RESULTS.with_name("generation_quick.json")
    data = run_benchmark(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(data, indent=1) + "\n")
    print(table(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
