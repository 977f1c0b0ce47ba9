"""Regenerate docs/accuracy.md's numbers: compress with every method, score perplexity, plot.

    python benchmarks/accuracy.py run --model smollm2-135m --method pbs2p --nm 6:8 --nsamples 32
    python benchmarks/accuracy.py run --model smollm2-135m --method fp          # the starting point
    python benchmarks/accuracy.py report          # table (markdown) + docs/accuracy.png from the results

Every run scores the same held-out tokens (lee.cor, non-overlapping 512-token windows, all of them) with
:func:`pbs2pc.models.evaluate.perplexity`, and writes ``benchmarks/results/<model>_<method>_<nm>.json``
with the perplexity, bits per weight, per-layer errors and times.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"


def run(args) -> dict:
    from pbs2pc.models import hf
    from pbs2pc.models.compress import compress_model
    from pbs2pc.models.data import token_windows
    from pbs2pc.models.evaluate import perplexity, torch_logits_fn

    model, tok, source = hf.load(args.model)
    windows = token_windows(tok, "heldout", args.eval_seqlen)
    t0 = time.perf_counter()
    info = {}
    if args.method != "fp":
        options = dict(tokenizer=tok, nsamples=args.nsamples, seqlen=args.seqlen, device=args.device)
        if args.rescore:
            options["rescore"] = True
        info = compress_model(model, args.nm, None, args.method, **options)
    seconds = time.perf_counter() - t0
    if args.scale_bits < 16:
        # the same compressed model scored before and after rounding its scales: a matched pair
        info["ppl_fp16_scales"] = perplexity(torch_logits_fn(model), windows)
        info["bits_per_weight_fp16_scales"] = info.get("bits_per_weight")
        info["bits_per_weight"] = quantize_model_scales(model, args.scale_bits)
    ppl = perplexity(torch_logits_fn(model), windows)
    suffix = ("-rescore" if args.rescore else "") + (f"-s{args.scale_bits}" if args.scale_bits < 16 else "")
    tag = f"{args.model}_{args.method}{suffix}_{args.nm.replace(':', 'of')}_n{args.nsamples}"
    result = {
        "model": args.model, "nm": args.nm,
        "nsamples": args.nsamples, "seqlen": args.seqlen, "ppl": ppl, "eval_windows": int(windows.shape[0]),
        "eval_seqlen": args.eval_seqlen, "seconds": round(seconds, 1), "source_note": source.note,
        "command": "python benchmarks/accuracy.py " + " ".join(sys.argv[1:]), **info,
        "method": args.method + suffix,  # after info, whose "method" is the registry's name
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{tag}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"{tag}: ppl {ppl:.3f}  bits {info.get('bits_per_weight')}  {seconds:.0f}s")
    return result


def quantize_model_scales(model, bits: int) -> dict:
    """Round every compressed layer's scales to ``bits``-bit integers under per-row fp16 scales
    (:func:`pbs2pc.models.format.quantize_scales`) in place; the honest bits per weight that storage gives."""
    from pbs2pc.models.format import quantize_scales
    from pbs2pc.models.modules import SparseBinaryLinear, decoder_linears, replace_linear

    totals, count = {"interchange": 0.0, "compact": 0.0, "paper": 0.0}, 0
    for name, module in decoder_linears(model).items():
        if not isinstance(module, SparseBinaryLinear):
            raise SystemExit(f"--scale-bits needs a method that writes the pbs2p format; {name} is dense.")
        packed = quantize_scales(module.packed(), bits)
        replace_linear(model, name, packed)
        b, numel = packed.bits(scale_bits=bits), packed.out_features * packed.in_features
        for key in totals:
            totals[key] += getattr(b, key) * numel
        count += numel
    return {k: round(v / count, 4) for k, v in totals.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--model", default="smollm2-135m")
    r.add_argument("--method", default="pbs2p")
    r.add_argument("--nm", default="6:8")
    r.add_argument("--nsamples", type=int, default=32)
    r.add_argument("--seqlen", type=int, default=512)
    r.add_argument("--eval-seqlen", type=int, default=512)
    r.add_argument("--device", default="cpu")
    r.add_argument("--rescore", action="store_true")
    r.add_argument("--scale-bits", type=int, default=16,
                   help="after compressing, round the scales to this many bits under per-row fp16 scales")
    sub.add_parser("report")
    args = p.parse_args(argv)
    if args.cmd == "run":
        run(args)
    else:
        from report_accuracy import report  # noqa: E402  (beside this file)

        report(RESULTS, ROOT.parent / "docs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
