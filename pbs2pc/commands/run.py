"""``pbs2pc run model.so --input-ids 1,2,3`` or ``--prompt "..."``: run a compiled model.

With ``--input-ids`` it prints the logits' shape and the most likely next tokens. With ``--prompt`` it
tokenizes the prompt (the tokenizer of the source model recorded at export, or ``--tokenizer``) and
continues it greedily. Generation here recomputes the whole sequence per token (no KV cache yet).
"""

from __future__ import annotations

import time


def add_parser(sub):
    p = sub.add_parser("run", help="run a compiled model on token ids or a prompt", description=__doc__)
    p.add_argument("library", help="the compiled .so (weights and manifest beside it)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--input-ids", help="comma-separated token ids, e.g. 1,2,3")
    group.add_argument("--prompt", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate for --prompt (default 16)")
    p.add_argument("--top", type=int, default=5, help="how many next-token candidates to show (default 5)")
    p.add_argument("--tokenizer", help="model spec or folder for the tokenizer (default: the source model)")
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


def load_tokenizer_for(model, spec: str | None):
    from pbs2pc.errors import Pbs2pcError
    from pbs2pc.models import hf

    spec = spec or model.manifest.get("source", {}).get("source_model")
    if not spec:
        raise Pbs2pcError("the artifact does not record its source model; pass --tokenizer MODEL_OR_FOLDER.")
    return hf.load_tokenizer(hf.resolve(spec))


def run(args) -> int:
    import numpy as np

    from pbs2pc.errors import Pbs2pcError
    from pbs2pc.runtime import load

    if args.max_new_tokens < 1:
        raise Pbs2pcError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}.")
    model = load(args.library)
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
    if not args.prompt.strip():
        raise Pbs2pcError("--prompt is empty; give some text.")
    tokenizer = load_tokenizer_for(model, args.tokenizer)
    ids = tokenizer(args.prompt, add_special_tokens=False).input_ids
    start = time.perf_counter()
    new = model.generate_ids(ids, args.max_new_tokens, tokenizer.eos_token_id)
    elapsed = time.perf_counter() - start
    print(args.prompt + tokenizer.decode(new))
    print(f"[{len(new)} tokens in {elapsed:.2f} s, {len(new) / elapsed:.1f} tokens/s, greedy, no KV cache]")
    return 0
