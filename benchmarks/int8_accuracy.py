"""Accuracy cost of int8 activations (``pbs2pc compile --activations int8``), measured two ways.

    python benchmarks/int8_accuracy.py            # ~4 min on 2 cores
    python benchmarks/int8_accuracy.py --quick    # fewer windows

1. **Where perplexity means something: the original SmolLM2-135M** (fp32, torch). Every decoder linear
   layer's input is rounded exactly as the int8 kernels round it (per group of 64 inputs, symmetric,
   ``round_half_even(x * 127 / max|x|)``) and the model is scored on the held-out corpus (the same
   non-overlapping 512-token windows as ``benchmarks/accuracy.py``). Binarised 135M models score
   perplexities in the thousands and up (docs/accuracy.md), so a small change there says little.
2. **The compiled artifact itself**: SmolLM2 6:8 (simple compressor) compiled twice, with fp32 and with
   int8 activations; each reads held-out windows token by token through ``decode`` (the int8 GEMV; the
   prompt's int8 GEMM rounds the same way). Reported: perplexity of both, how often their greedy next token agrees, and the
   logits' relative difference.

Writes ``benchmarks/results/int8_accuracy.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "int8_accuracy.json"
GROUP = 64  # SmolLM2's scale group: the int8 kernel quantises x per group of G inputs


def fake_quant_int8(x, group: int = GROUP):
    """The int8 kernels' rounding of ``x`` (torch, last dim split into groups), returned dequantised."""
    import torch

    shape = x.shape
    g = x.reshape(-1, shape[-1] // group, group).float()
    amax = g.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax.clamp_min(1e-30), torch.zeros_like(amax))
    q = torch.round(g * inv)  # torch.round is half to even, as the kernel's vrndscaleps
    return (q * (amax / 127)).reshape(shape).to(x.dtype)


def torch_perplexities(model, windows) -> dict:
    """Perplexity of ``model`` as is and with every decoder linear layer's input rounded to int8."""
    import torch

    from pbs2pc.models.evaluate import perplexity, torch_logits_fn

    out = {"fp32": perplexity(torch_logits_fn(model), windows, desc="fp32")}
    hooks = [m.register_forward_pre_hook(lambda _m, args: (fake_quant_int8(args[0]),))
             for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and "layers." in name and m.in_features % GROUP == 0]
    try:
        out["int8"] = perplexity(torch_logits_fn(model), windows, desc="int8 activations")
    finally:
        for h in hooks:
            h.remove()
    out["layers_quantised"] = len(hooks)
    return out


def decode_scores(lib, windows) -> tuple[list[np.ndarray], float]:
    """Logits of every position of every window through ``prefill`` (first token) + ``decode``, and ppl."""
    from pbs2pc.models.evaluate import window_nll
    from pbs2pc.runtime import load

    model = load(lib, threads=2)
    logits, total, count = [], 0.0, 0
    for row in windows:
        row = [int(t) for t in row]
        steps = [model.prefill(row[:1], len(row))] + [model.step(t) for t in row[1:]]
        window = np.stack(steps)
        nll, n = window_nll(window, np.asarray(row))
        total, count = total + nll, count + n
        logits.append(window)
    return logits, math.exp(total / count)


def compiled_pair(model, tokenizer, workdir: Path, quick: bool, builds: dict) -> dict:
    """SmolLM2 6:8 (simple compressor) compiled once per entry of ``builds`` (two: ``{name: compile_model
    keyword arguments}``, each into ``workdir/name/``), both scored token by token through ``decode`` on the
    same held-out windows: ``{name}_ppl`` for each, how often their greedy next token agrees, and the
    median relative difference of their logits. Shared with ``lm_head_fp16_accuracy.py``."""
    from pbs2pc.compiler.build import compile_model
    from pbs2pc.models import compress, data, export

    onnx = workdir / "model.onnx"
    if not onnx.exists():
        small = copy.deepcopy(model)
        info = compress.compress_model(small, "6:8", method="simple", progress=False)
        export.export(small, onnx, {"source_model": "smollm2-135m", **info})
    short = data.token_windows(tokenizer, "heldout", 128, max_windows=2 if quick else 8).numpy()
    out, logits = {}, []
    for name, kwargs in builds.items():
        lib = workdir / name / "model.so"
        if not lib.exists():
            compile_model(onnx, lib, "x86", **kwargs)
        window_logits, out[f"{name}_ppl"] = decode_scores(lib, short)
        logits.append(np.concatenate(window_logits))
    a, b = logits
    return {**out, "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean()),
            "median_rel_logit_diff": float(np.median(np.abs(a - b).max(-1) / np.abs(a).max(-1))),
            "tokens": int(a.shape[0]), "windows": int(short.shape[0]), "window_tokens": 128}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workdir", default="/tmp/pbs2pc-int8-accuracy")
    args = parser.parse_args(argv)

    import torch

    from pbs2pc.models import data, hf

    torch.set_num_threads(2)
    model, tokenizer, _ = hf.load("smollm2-135m")
    model.eval()
    start = time.perf_counter()
    windows = data.token_windows(tokenizer, "heldout", 512, max_windows=3 if args.quick else None)
    original = torch_perplexities(model, windows)
    print(f"original SmolLM2: ppl fp32 {original['fp32']:.3f}, int8 activations {original['int8']:.3f}", flush=True)

    compiled = compiled_pair(model, tokenizer, Path(args.workdir), args.quick,
                             {"fp32": {}, "int8": {"activations": "int8"}})
    fp32_ppl, int8_ppl = compiled["fp32_ppl"], compiled["int8_ppl"]
    agree, rel = compiled["top1_agreement"], compiled["median_rel_logit_diff"]
    result = {
        "command": "python benchmarks/int8_accuracy.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "original_model": {**original, "windows": int(windows.shape[0]), "window_tokens": 512, "group": GROUP},
        "compiled_6of8": compiled,
        "seconds": round(time.perf_counter() - start, 1),
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print("| model | activations in decoder linears | perplexity |")
    print("|---|---|---|")
    print(f"| SmolLM2-135M original (torch, {int(windows.shape[0])}x512 tokens) | fp32 | {original['fp32']:.3f} |")
    print(f"| | int8 per {GROUP} (the kernel's rounding) | {original['int8']:.3f} "
          f"({(original['int8'] / original['fp32'] - 1) * 100:+.2f} %) |")
    print(f"| SmolLM2 6:8 compiled, decode path ({compiled['windows']}x128 tokens) | fp32 | {fp32_ppl:.1f} |")
    print(f"| | int8 | {int8_ppl:.1f} ({(int8_ppl / fp32_ppl - 1) * 100:+.2f} %) |")
    print(f"compiled 6:8: greedy next token agrees on {agree * 100:.1f} % of {compiled['tokens']} positions; "
          f"median relative logit difference {rel:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
