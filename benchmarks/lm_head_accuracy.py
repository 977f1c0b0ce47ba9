"""Accuracy cost of ``pbs2pc compile --lm-head fp16`` and ``--lm-head int8`` (SmolLM2's tied table).

    python benchmarks/lm_head_accuracy.py            # ~6 min on 2 cores
    python benchmarks/lm_head_accuracy.py --quick    # fewer windows
    python benchmarks/lm_head_accuracy.py --torch-windows 4   # part 1 on the first 4 windows only
    python benchmarks/lm_head_accuracy.py --torch-windows 0   # part 2 only

1. **The original model in torch** (fp32) on the held-out windows of ``benchmarks/accuracy.py`` (512
   tokens each), with the table (input embedding and LM head together: they are tied) as loaded, rounded
   to fp16, quantised to int8 per 32 columns with fp16 scales (``lm_head_int8.quantize``: what
   ``--lm-head int8`` stores; the bundled GGUF's table is Q8_0, so this reproduces it exactly) and, for
   comparison, to int8 per row (fp32 scales: the layout before) and per group of 64 columns.
2. **The compiled artifact of the original model**: SmolLM2-135M *uncompressed* exported to ONNX (its
   decoder linears stay float32 MatMuls; a binarised 135M model's perplexity is in the millions, which
   would hide the head's own cost) and compiled three times, with ``--lm-head fp32``, ``fp16`` and
   ``int8``; each reads the same held-out windows (128 tokens) token by token through ``prefill`` (first
   token) and ``decode`` (the head kernels). Reported: each perplexity; against the fp32 head, how often
   the greedy next token agrees, the median and the max over positions of the relative logit error
   (``max|Δlogit| / max|logit|`` per position).

Writes ``benchmarks/results/lm_head_accuracy.json``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "lm_head_accuracy.json"
HEADS = ("fp32", "fp16", "int8")


def _int8_stored(table):
    """The table ``--lm-head int8`` stores (``lm_head_int8.quantize``: per 32 columns, fp16 scales), dequantised."""
    import torch

    from pbs2pc.passes.kernels import lm_head_int8

    packed = lm_head_int8.quantize(table.detach().cpu().numpy())
    return torch.from_numpy(lm_head_int8.dequantize(packed).astype(np.float32))


def _int8_groups(table, group: int | None = 64):
    """int8 per ``group`` columns (None: per row) with fp32 scales, dequantised."""
    import torch

    v, h = table.shape
    group = group or h
    g = table.reshape(v, h // group, group)
    s = g.abs().amax(-1, keepdim=True) / 127
    q = torch.round(g / torch.where(s > 0, s, torch.ones_like(s))).clamp(-127, 127)
    return (q * s).reshape(v, h)


def torch_perplexities(model, windows) -> dict:
    import torch

    from pbs2pc.models.evaluate import perplexity, torch_logits_fn

    table = model.get_input_embeddings().weight
    original = table.data.clone()
    variants = {"fp32": original, "fp16": original.half().float(), "int8": _int8_stored(original),
                "int8_rows": _int8_groups(original, None), "int8_groups64": _int8_groups(original, 64)}
    out = {}
    with torch.no_grad():
        try:
            for name, values in variants.items():
                table.data.copy_(values)
                out[name] = perplexity(torch_logits_fn(model), windows, desc=f"{name} table")
                out[f"{name}_table_change"] = ((values - original).norm() / original.norm()).item()
        finally:
            table.data.copy_(original)
    return out


def compiled_heads(model, tokenizer, workdir: Path, quick: bool) -> dict:
    from int8_accuracy import decode_scores
    from pbs2pc.compiler.build import compile_model
    from pbs2pc.models import data, export

    onnx = workdir / "original.onnx"
    if not onnx.exists():
        export.export(model, onnx, {"source_model": "smollm2-135m"})
    short = data.token_windows(tokenizer, "heldout", 128, max_windows=2 if quick else 8).numpy()
    logits, out = {}, {}
    for head in HEADS:
        lib = workdir / head / "model.so"
        if not lib.exists():
            compile_model(onnx, lib, "x86", lm_head=head)
        window_logits, out[f"{head}_ppl"] = decode_scores(lib, short)
        logits[head] = np.concatenate(window_logits)
        print(f"compiled original, {head} head: perplexity {out[f'{head}_ppl']:.4f}", flush=True)
    ref = logits["fp32"]
    for head in HEADS[1:]:
        rel = np.abs(logits[head] - ref).max(-1) / np.abs(ref).max(-1)
        out[f"{head}_top1_agreement"] = float((logits[head].argmax(-1) == ref.argmax(-1)).mean())
        out[f"{head}_median_rel_logit_err"] = float(np.median(rel))
        out[f"{head}_max_rel_logit_err"] = float(rel.max())
    return {**out, "tokens": int(ref.shape[0]), "windows": int(short.shape[0]), "window_tokens": 128}


def main(argv=None) -> int:
    import argparse

    import torch

    from pbs2pc.models import data, hf

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--torch-windows", type=int, default=None,
                        help="held-out windows of part 1 (default: all, 3 with --quick; 0 skips it)")
    parser.add_argument("--workdir", default="/tmp/pbs2pc-lm-head-accuracy-all")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    model, tokenizer, _ = hf.load("smollm2-135m")
    model.eval()
    start = time.perf_counter()
    count = args.torch_windows if args.torch_windows is not None else (3 if args.quick else None)
    original, windows = {}, None
    if count != 0:
        windows = data.token_windows(tokenizer, "heldout", 512, max_windows=count)
        original = torch_perplexities(model, windows)
        print("torch:", {k: round(v, 5) for k, v in original.items()}, flush=True)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    compiled = compiled_heads(model, tokenizer, workdir, args.quick)
    result = {
        "command": " ".join(["python benchmarks/lm_head_accuracy.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "model": "smollm2-135m (uncompressed)",
        "torch": {**original, "windows": int(windows.shape[0]), "window_tokens": 512} if original else None,
        "compiled_original": compiled, "seconds": round(time.perf_counter() - start, 1),
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print("| table | torch perplexity | compiled perplexity (decode path) | top-1 agrees | median / max rel. logit error |")
    print("|---|---|---|---|---|")
    for head, key in (("fp32", "fp32"), ("fp16", "fp16"), ("int8", "int8")):
        extra = (" | — | —" if head == "fp32" else
                 f" | {compiled[f'{head}_top1_agreement'] * 100:.1f} % | {compiled[f'{head}_median_rel_logit_err']:.2e} / "
                 f"{compiled[f'{head}_max_rel_logit_err']:.2e}")
        torch_ppl = f"{original[key]:.4f}" if original else "—"
        print(f"| {head} | {torch_ppl} | {compiled[f'{head}_ppl']:.4f}{extra} |")
    if original:
        print(f"| int8 per row, fp32 scales (torch only) | {original['int8_rows']:.4f} | | | |")
        print(f"| int8 per 64 columns (torch only) | {original['int8_groups64']:.4f} | | | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
