"""``pbs2pc run model.so --prompt "..."``: generate text from a compiled model, streaming it as it comes.

The prompt is tokenized with the source model's tokenizer (recorded at export; ``--tokenizer`` overrides
it) and, when that tokenizer has a chat template, wrapped in it as one user message (``--no-chat`` feeds
the text as is). Tokens are chosen greedily by default, or sampled with ``--temperature`` (and
``--top-k``, ``--top-p``, ``--seed``), with the compiled model's KV cache; the text is printed as each token
arrives, and a closing line on stderr gives the time to first token and decode tokens per second.

``--input-ids 1,2,3`` instead runs the ids once and prints the logits' shape and the likeliest next tokens.
"""

from __future__ import annotations

import argparse
import sys
import time


def add_parser(sub):
    p = sub.add_parser("run", help="generate text from a compiled model (or score token ids)", description=__doc__)
    p.add_argument("library", help="the compiled .so (weights and manifest beside it)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="text to continue")
    group.add_argument("--input-ids", help="comma-separated token ids, e.g. 1,2,3: print next-token logits")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens (default 0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set with this much "
                   "probability (default 1.0: all)")
    p.add_argument("--seed", type=int, help="random seed for sampling (default: a fresh one each run)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap the prompt in the model's chat template (default: when it has one)")
    p.add_argument("--top", type=int, default=5, help="with --input-ids: candidates to show (default 5)")
    p.add_argument("--tokenizer", help="model spec or folder for the tokenizer (default: the source model)")
    p.add_argument("--threads", type=int, help="CPU threads for the kernels (default: $TVM_NUM_THREADS, else "
                   "every CPU this process may use)")
    return p


def parse_ids(text: str) -> list[int]:
    from pbs2pc.errors import Pbs2pcError

    try:
        ids = [int(part) for part in text.replace(" ", ",").split(",") if part]
    except ValueError:
        raise Pbs2pcError(f"--input-ids must be comma-separated integers, got {text!r}.") from None
    if not ids:
        raise Pbs2pcError("--input-ids is empty; give at least one token id.")
    return ids


def run(args) -> int:
    import numpy as np

    from pbs2pc.errors import Pbs2pcError
    from pbs2pc.runtime import GenerationStats, SamplingParams, load
    from pbs2pc.runtime.model import load_tokenizer

    if args.max_new_tokens < 1:
        raise Pbs2pcError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}.")
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)  # validates before loading
    if args.prompt is not None and not args.prompt.strip():
        raise Pbs2pcError("--prompt is empty; give some text.")
    model = load(args.library, threads=args.threads)
    if args.input_ids is not None:
        ids = np.array(parse_ids(args.input_ids), dtype=np.int64)
        start = time.perf_counter()
        logits = model.logits(ids)
        elapsed = time.perf_counter() - start
        last = logits[0, -1]
        top = np.argsort(-last)[: args.top]
        print(f"logits {list(logits.shape)} in {elapsed * 1e3:.1f} ms")
        print("next token candidates: " + ", ".join(f"{t} ({last[t]:.3f})" for t in top))
        return 0
    if args.tokenizer:
        model._tokenizer = load_tokenizer(model.manifest, args.tokenizer)
    chat = args.chat if args.chat is not None else bool(getattr(model.tokenizer, "chat_template", None))
    stats = GenerationStats()
    tokens = model.stream(args.prompt, args.max_new_tokens, sampling.temperature, sampling.top_k, sampling.top_p,
                          sampling.seed, chat=chat, stats=stats)
    if not chat:
        print(args.prompt, end="", flush=True)
    for token in tokens:
        print(token.text, end="", flush=True)
    print()
    cache = "KV cache" if model.has_kv_cache else "no KV cache: recomputing"
    print(f"[{stats.summary()}; {sampling.describe()}{', chat template' if chat else ''}; {cache}]",
          file=sys.stderr)
    return 0
