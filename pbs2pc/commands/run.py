"""``pbs2pc run model.so --prompt "..."``: generate text from a compiled model, streaming it as it comes.

The prompt is tokenized with the source model's tokenizer (recorded at export; ``--tokenizer`` overrides
it) and, when that tokenizer has a chat template, wrapped in it as one user message (``--no-chat`` feeds
the text as is). Tokens are chosen greedily by default, or sampled with ``--temperature`` (and
``--top-k``, ``--top-p``, ``--seed``), with the compiled model's KV cache; the text is printed as each token
arrives, and a closing line on stderr gives the time to first token and decode tokens per second.

``--input-ids 1,2,3`` instead runs the ids once and prints the logits' shape and the likeliest next tokens.

Any compiled graph, language model or not, runs with ``--input NAME=FILE.npy`` (once per graph input):
the arrays go in as saved (dtype and rank must be what the graph takes), ``main`` runs once, and each
output's name, shape and dtype is printed, with a few summary statistics, or with ``-o out.npz`` the outputs
are saved by name into one ``.npz`` file (written atomically: nothing is left behind on an error).
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def add_parser(sub):
    p = sub.add_parser("run", help="generate text from a compiled model, or run any compiled graph on .npy inputs",
                       description=__doc__)
    p.add_argument("library", help="the compiled .so (weights and manifest beside it)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="text to continue")
    group.add_argument("--input-ids", help="comma-separated token ids, e.g. 1,2,3: print next-token logits")
    group.add_argument("--input", action="append", metavar="NAME=FILE.npy",
                       help="run the graph once on this input (repeat for each graph input)")
    p.add_argument("-o", "--output", help="with --input: save the outputs by name into this .npz file")
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


def parse_input_specs(specs: list[str]) -> dict[str, str]:
    """``["x=x.npy", ...]`` -> ``{"x": "x.npy", ...}``, in order; one clear error per malformed spec."""
    from pbs2pc.errors import Pbs2pcError

    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise Pbs2pcError(f"--input must be NAME=FILE.npy (a graph input's name and a .npy file), got {spec!r}.")
        if name in out:
            raise Pbs2pcError(f"--input {name}= is given twice; give each graph input once.")
        out[name] = path
    return out


def load_npy(name: str, path: str):
    """The array in the ``.npy`` file ``path`` (fed as input ``name``)."""
    from pathlib import Path

    import numpy as np

    from pbs2pc.errors import Pbs2pcError

    file = Path(path)
    if not file.is_file():
        raise Pbs2pcError(f"--input {name}={path}: {path} " + ("is a folder, not a .npy file." if file.exists() else "does not exist."))
    with open(file, "rb") as f:
        magic = f.read(6)
    if magic.startswith(b"PK"):
        raise Pbs2pcError(f"--input {name}={path}: {path} is an .npz archive; save each input as its own .npy file.")
    if magic != b"\x93NUMPY":
        raise Pbs2pcError(f"--input {name}={path}: {path} is not a .npy file; save the array with numpy.save.")
    try:
        return np.load(file, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc) or "Object arrays" in str(exc):
            raise Pbs2pcError(f"--input {name}={path}: {path} holds Python objects, not a numeric array.") from None
        raise Pbs2pcError(f"--input {name}={path}: {path} is not a readable .npy file ({_last_line(exc)}).") from None
    except (OSError, EOFError) as exc:
        raise Pbs2pcError(f"--input {name}={path}: {path} is not a readable .npy file ({_last_line(exc)}).") from None


def _last_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1].rstrip(".") if text else type(exc).__name__


def _summary(array) -> str:
    import numpy as np

    if array.size == 0:
        return "empty"
    if array.dtype.kind == "b":
        return f"{int(array.sum())} true of {array.size}"
    values = array.astype(np.float64)
    finite = np.isfinite(values)
    text = ""
    if not finite.all():
        text = f"{int((~finite).sum())} non-finite; "
        values = values[finite]
        if values.size == 0:
            return text.rstrip("; ")
    if array.dtype.kind in "iu":
        return text + f"min {int(values.min())} max {int(values.max())} mean {values.mean():.4g}"
    return text + f"min {values.min():.4g} max {values.max():.4g} mean {values.mean():.4g} std {values.std():.4g}"


def run_graph(model, args) -> int:
    """``--input NAME=FILE.npy ...``: run ``main`` once; print (and with ``-o`` save) the outputs."""
    import numpy as np

    from pbs2pc.fileio import atomic_outputs

    paths = parse_input_specs(args.input)
    feeds = {name: load_npy(name, path) for name, path in paths.items()}
    start = time.perf_counter()
    outputs = model.run(feeds)
    elapsed = time.perf_counter() - start
    width = max(len(name) for name in outputs)
    for name, array in outputs.items():
        line = f"{name:<{width}}  {str(list(array.shape)):<16} {array.dtype}"
        if not args.output:
            line += f"  {_summary(array)}"
        print(line)
    saved = ""
    if args.output:
        with atomic_outputs([args.output]) as (tmp,):
            with open(tmp, "wb") as f:  # a file object: numpy appends no .npz to the name
                np.savez(f, **outputs)
        saved = f"; saved {len(outputs)} output{'s' if len(outputs) > 1 else ''} to {args.output}"
    print(f"[main in {elapsed * 1e3:.1f} ms{saved}]", file=sys.stderr)
    return 0


def _not_a_language_model(model, option: str):
    from pbs2pc.errors import Pbs2pcError

    inputs = model.manifest["inputs"]
    takes = ", ".join(inputs)
    example = " ".join(f"--input {name}={name}.npy" for name in inputs[:3])
    return Pbs2pcError(f"{option} needs a language model, but this graph takes {takes}; run it with "
                       f"--input NAME=FILE.npy instead (e.g. {example}).")


def run(args) -> int:
    import numpy as np

    from pbs2pc.errors import Pbs2pcError
    from pbs2pc.runtime import GenerationStats, SamplingParams, load
    from pbs2pc.runtime.model import load_tokenizer

    if args.output and args.input is None:
        raise Pbs2pcError("-o/--output saves the outputs of an --input NAME=FILE.npy run; use it with --input.")
    if args.output and os.path.isdir(args.output):
        raise Pbs2pcError(f"-o {args.output} is a folder; give a file name, e.g. -o {os.path.join(args.output, 'out.npz')}.")
    if args.input is not None:
        parse_input_specs(args.input)  # malformed specs fail before the model loads
        return run_graph(load(args.library, threads=args.threads), args)
    if args.max_new_tokens < 1:
        raise Pbs2pcError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}.")
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)  # validates before loading
    if args.prompt is not None and not args.prompt.strip():
        raise Pbs2pcError("--prompt is empty; give some text.")
    model = load(args.library, threads=args.threads)
    if not model.is_language_model:
        raise _not_a_language_model(model, "--input-ids" if args.input_ids is not None else "--prompt")
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
