"""``pbs2pc compress MODEL -o DIR``: compress a Hugging Face causal LM into a checkpoint folder.

A thin adapter over :func:`pbs2pc.models.compress.compress_model`. Calibrated methods run layer by layer
with a progress bar (and a time-left estimate); the state after every finished layer is kept in a hidden
folder beside ``DIR`` (``.DIR.pbs2pc-resume``), so running the same command again after an interruption
resumes from the last finished layer. The folder is written atomically and feeds ``pbs2pc export``.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

HELP = "compress a model with PBS2P (or a baseline) into a checkpoint folder"


def add_parser(subparsers) -> argparse.ArgumentParser:
    from pbs2pc.models.compress import METHODS

    p = subparsers.add_parser("compress", help=HELP, description=HELP)
    p.add_argument("model", help="bundled model name (smollm2-135m, gemma3-270m), a transformers folder or a .gguf")
    p.add_argument("-o", "--output", required=True, help="checkpoint folder to write")
    p.add_argument("--method", default="pbs2p", choices=sorted(METHODS), help="compression method (default pbs2p)")
    p.add_argument("--nm", default="6:8", help="N:M: keep N of every M weights along K (default 6:8)")
    p.add_argument("--group-size", type=int, default=None,
                   help="columns per alpha/mu block (default 128, or the largest power of two dividing every K)")
    p.add_argument("--calib", default="calib", help="calibration text: 'calib' (lee_background.cor) or a text file")
    p.add_argument("--nsamples", type=int, default=128,
                   help="calibration sequences (default 128 as in BiLLM/ARB; the fast setting is 32)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration sequence (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed for drawing calibration windows")
    p.add_argument("--device", default="cpu", help="torch device for the layer being compressed (cpu, cuda)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass during calibration")
    p.add_argument("--n-low", type=int, default=None, help="CFS lower bound on a layer's N (default N-1)")
    p.add_argument("--n-high", type=int, default=None, help="CFS upper bound on a layer's N (default N+1, at most M)")
    p.add_argument("--spbo-steps", type=int, default=None, help="SPBO steps tau (default M-N: one weight per group per step)")
    p.add_argument("--iters", type=int, default=None, help="ARB refinement rounds per fit (default 15; billm 0)")
    p.add_argument("--no-resume", action="store_true", help="ignore and delete any saved state of an interrupted run")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _options(args) -> dict:
    options = dict(calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, device=args.device,
                   batch_size=args.batch_size, progress=not args.quiet)
    if args.method.startswith(("pbs2p", "nm-then-binarize")):
        options.update(n_low=args.n_low, n_high=args.n_high, steps=args.spbo_steps)
    if args.iters is not None:
        options["iters"] = args.iters
    return options


def run(args) -> int:
    from pbs2pc.errors import Pbs2pcError
    from pbs2pc.fileio import atomic_outputs
    from pbs2pc.models import hf
    from pbs2pc.models.compress import METHODS, PYTORCH_ONLY, compress_model
    from pbs2pc.models.format import NMScheme
    from pbs2pc.models.modules import save_compressed

    if args.nsamples < 1 or args.seqlen < 2:
        raise Pbs2pcError("--nsamples must be at least 1 and --seqlen at least 2.")
    if args.method not in METHODS:
        raise Pbs2pcError(f"unknown method {args.method!r}; choose one of: {', '.join(sorted(METHODS))}.")
    # Check the scheme before loading anything, so a typo fails at once with one line.
    NMScheme.parse(args.nm, args.group_size)
    out = Path(args.output)
    resume = out.parent / f".{out.name}.pbs2pc-resume"
    if args.no_resume and resume.exists():
        shutil.rmtree(resume)
    model, tokenizer, source = hf.load(args.model)
    options = _options(args)
    if args.method != "simple":
        options.update(tokenizer=tokenizer, resume_dir=resume)
    info = compress_model(model, args.nm, args.group_size, args.method, **options)
    info.update(source_model=args.model, source_note=source.note,
                command="pbs2pc compress " + " ".join(_argv(args)))
    if args.method in PYTORCH_ONLY:
        info["exportable"] = False
    with atomic_outputs([out]) as (tmp,):
        save_compressed(model, tokenizer, tmp, info)
    shutil.rmtree(resume, ignore_errors=True)
    bits = info.get("bits_per_weight")
    line = f"wrote {out} ({args.method}, {args.nm}"
    if bits:
        line += f", {bits['interchange']:.3f} bits/weight interchange, {bits['compact']:.3f} compact, {bits['paper']:.3f} as the paper counts"
    print(line + f", {info['seconds']:.0f} s)")
    return 0


def _argv(args) -> list[str]:
    parts = [args.model, "-o", str(args.output), "--method", args.method, "--nm", args.nm,
             "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
    if args.calib != "calib":
        parts += ["--calib", args.calib]
    if args.device != "cpu":
        parts += ["--device", args.device]
    return parts
