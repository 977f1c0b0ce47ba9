"""``pbs2pc eval TARGET``: perplexity of a compressed checkpoint folder or of an uncompressed model.

Fixed protocol (:mod:`pbs2pc.models.evaluate`): the held-out text (``lee.cor`` by default) is tokenized
once, cut into non-overlapping windows of ``--seqlen`` tokens (all of them unless ``--max-windows``), each
window scored on its own; the same tokens for every model and method.
"""

from __future__ import annotations

import argparse
import json

HELP = "perplexity of a compressed checkpoint (or an uncompressed model) on held-out text"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help=HELP, description=HELP)
    p.add_argument("target", help="a folder written by pbs2pc compress, or a model (smollm2-135m, a folder, a .gguf)")
    p.add_argument("--text", default="heldout", help="'heldout' (lee.cor, default) or a text file")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first windows (default all)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a sentence")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run(args) -> int:
    from pbs2pc.errors import Pbs2pcError
    from pbs2pc.models import hf
    from pbs2pc.models.data import token_windows
    from pbs2pc.models.evaluate import perplexity, torch_logits_fn
    from pbs2pc.models.modules import is_compressed_dir, load_compressed

    if args.seqlen < 2:
        raise Pbs2pcError("--seqlen must be at least 2.")
    if is_compressed_dir(args.target):
        model, tokenizer, manifest = load_compressed(args.target)
        if tokenizer is None:
            raise Pbs2pcError(f"{args.target} has no tokenizer files; compress the model again with pbs2pc compress.")
        what = f"{manifest.get('method', '?')} {manifest.get('scheme', {})}"
    else:
        model, tokenizer, source = hf.load(args.target)
        what = f"uncompressed ({source.note or 'as loaded'})"
    windows = token_windows(tokenizer, args.text, args.seqlen, args.max_windows)
    ppl = perplexity(torch_logits_fn(model), windows, progress=not args.quiet)
    if args.json:
        print(json.dumps({"target": args.target, "perplexity": ppl, "windows": int(windows.shape[0]),
                          "seqlen": args.seqlen, "text": args.text, "model": what}))
    else:
        print(f"{args.target}: perplexity {ppl:.3f} on {windows.shape[0]} windows of {args.seqlen} tokens of {args.text} ({what})")
    return 0
