"""Accuracy cost of storing SmolLM2's tied embedding / LM head table in fp16 (a measurement for a future change).

    python benchmarks/lm_head_fp16_accuracy.py     # ~1 min on 2 cores

The LM head (49152 x 576 fp32, 113 MB) is about half of a compiled decode step and already runs at the
memory floor (docs/performance.md), so the next decode speed-up is fewer bytes there. This script scores
the original model (torch, fp32) on the held-out windows of ``benchmarks/accuracy.py`` as is and with the
table rounded to fp16 (input embedding and LM head together, as they are tied), and writes
``benchmarks/results/lm_head_fp16_accuracy.json``. Nothing in the compiler uses an fp16 table yet.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "lm_head_fp16_accuracy.json"


def main() -> int:
    import torch

    from pbs2pc.models import data, hf
    from pbs2pc.models.evaluate import perplexity, torch_logits_fn

    torch.set_num_threads(2)
    model, tokenizer, _ = hf.load("smollm2-135m")
    model.eval()
    windows = data.token_windows(tokenizer, "heldout", 512)
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
    result = {
        "command": "python benchmarks/lm_head_fp16_accuracy.py", "date": time.strftime("%Y-%m-%d %H:%M"),
        "model": "smollm2-135m", "windows": len(windows), "window_tokens": 512, "tied": tied,
        "perplexity_fp32_table": fp32, "perplexity_fp16_table": fp16, "table_relative_change": change,
        "seconds": round(time.perf_counter() - start, 1),
    }
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"perplexity with the fp32 table {fp32:.4f}, with the table rounded to fp16 {fp16:.4f} "
          f"(relative change of the table {change:.1e}; tied: {tied})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
