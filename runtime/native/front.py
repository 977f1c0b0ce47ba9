#!/usr/bin/env python3
"""Continue a text prompt with this bundle's model, streaming the text as the native runner makes tokens.

    ./run.sh --prompt "The river" [--max-new-tokens 64] [--temperature 0.8 --top-k 40 --top-p 0.9 --seed 0]
             [--threads 4] [--no-chat]

Written into a bundle as ``generate.py`` by ``pbs2pc compile --bundle``. Needs Python 3.9+ and the
``tokenizers`` package (never transformers): the bundle carries it in ``py/``, built for the bundle's
machine; on another machine (tests run an aarch64 bundle under qemu on x86) the environment's is used.
``PBS2PC_RUNNER_PREFIX`` (e.g. ``qemu-aarch64 -L /usr/aarch64-linux-gnu``) runs the runner through an
emulator.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def fail(message: str) -> None:
    print(f"generate.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def load_tokenizer(config: dict):
    if not config.get("tokenizer"):
        fail("this bundle has no tokenizer; run the model on token ids: ./runner generate . --prompt-ids 1,2,3")
    machine = platform.machine().lower().replace("arm64", "aarch64").replace("amd64", "x86_64")
    if machine == config["machine"]:
        # The bundled wheel is built for the board; a script beside its own packages puts them on the path.
        sys.path.insert(0, os.path.join(HERE, "py"))
    try:
        from tokenizers import Tokenizer
    except ImportError:
        fail("the tokenizers package is missing; run: pip install tokenizers")
    return Tokenizer.from_file(os.path.join(HERE, config["tokenizer"]))


def parse_args(argv):
    p = argparse.ArgumentParser(prog="run.sh", description="Continue a prompt with this bundle's model.")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens (default: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set with this mass")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    p.add_argument("--threads", type=int, help="CPU threads for the kernels (default: every CPU)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap the prompt in the model's chat template as one user message (default: when the "
                        "model has one)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    with open(os.path.join(HERE, "bundle.json")) as f:
        config = json.load(f)
    tokenizer = load_tokenizer(config)
    chat = config.get("chat")
    if args.chat and not chat:
        fail("this model has no chat template; run without --chat")
    text = args.prompt
    if chat and args.chat is not False:
        text = chat["prefix"] + text + chat["suffix"]
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if not ids:
        fail("the prompt is empty; give some text")
    command = shlex.split(os.environ.get("PBS2PC_RUNNER_PREFIX", "")) + [
        os.path.join(HERE, "runner"), "generate", HERE, "--prompt-ids", ",".join(map(str, ids)),
        "--max-new-tokens", str(args.max_new_tokens), "--temperature", str(args.temperature),
        "--top-k", str(args.top_k), "--top-p", str(args.top_p), "--seed", str(args.seed), "--stats"]
    if config.get("eos_token_ids"):
        command += ["--eos", ",".join(map(str, config["eos_token_ids"]))]
    if args.threads:
        command += ["--threads", str(args.threads)]
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    made, emitted = [], 0
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, bufsize=1) as runner:
        for line in runner.stdout:
            made.append(int(line))
            new = tokenizer.decode(made, skip_special_tokens=True)
            if new.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for the next token
                continue
            sys.stdout.write(new[emitted:])
            sys.stdout.flush()
            emitted = len(new)
    sys.stdout.write("\n")
    if runner.returncode != 0:
        return runner.returncode
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
