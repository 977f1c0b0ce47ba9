"""Accuracy cost of ``pbs2pc compile --lm-head fp16`` (SmolLM2's tied embedding / LM head table in fp16).

    python benchmarks/lm_head_fp16_accuracy.py            # ~3 min on 2 cores
    python benchmarks/lm_head_fp16_accuracy.py --quick    # fewer windows

1. **The original model** (torch, fp32) on the held-out windows of ``benchmarks/accuracy.py``, as is and
   with the table rounded to fp16 (input embedding and LM head together, as they are tied): where
   perplexity means something.
2. **The compiled artifact itself**: SmolLM2 6:8 (simple compressor) compiled with ``--lm-head fp32`` and
   ``--lm-head fp16``; each reads held-out windows token by token through ``decode`` (the fp16 head
   kernel). Reported: both perplexities, how often the greedy next token agrees, the logits' relative
   difference.

Writes ``benchmarks/results/lm_head_fp16_accuracy.json``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "lm_head_fp16_accuracy.json"


def main(argv=None) -> int:
    import argparse

    import torch

    from int8_accuracy import compiled_pair
    from pbs2pc.models import data, hf
    from pbs2pc.models.evaluate import perplexity, torch_logits_fn

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workdir", default="/tmp/pbs2pc-lm-head-accuracy")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    model, tokenizer, _ = hf.load("smollm2-135m")
    model.eval()
    windows = data.token_windows(tokenizer, "heldout", 512, max_windows=3 if args.quick else None)
    table = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight.data_ptr() == table.data_ptr()
    start = time.perf_counter()
    fp32 = perplexity(torch_logits_fn(model), windows, desc="fp32 table")
    with torch.no_grad():
        original = table.data.clone()
        table.data.copy_(original.half().float())
        change = ((table.data - original).norm() / original.norm()).item()
        fp16 = perplexity(torch_logits_fn(model), windows, desc="fp16 table")
        table.data.copy_(original)
    print(f"original model: perplexity with the fp32 table {fp32:.4f}, with the table rounded to fp16 {fp16:.4f} "
          f"(relative change of the table {change:.1e}; tied: {tied})", flush=True)
    compiled = compiled_pair(model, tokenizer, Path(args.workdir), args.quick,
                             {"fp32_head": {}, "fp16_head": {"lm_head": "fp16"}})
    result = {
        "command": " ".join(["python benchmarks/lm_head_fp16_accuracy.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "model": "smollm2-135m", "windows": len(windows), "window_tokens": 512, "tied": tied,
        "perplexity_fp32_table": fp32, "perplexity_fp16_table": fp16, "table_relative_change": change,
        "compiled_6of8": compiled, "seconds": round(time.perf_counter() - start, 1),
    }
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"compiled 6:8, decode path ({compiled['windows']}x128 tokens): perplexity with the fp32 head "
          f"{compiled['fp32_head_ppl']:.2f}, with the fp16 head {compiled['fp16_head_ppl']:.2f}; greedy next "
          f"token agrees on {compiled['top1_agreement'] * 100:.1f} % of {compiled['tokens']} positions; median "
          f"relative logit difference {compiled['median_rel_logit_diff']:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
