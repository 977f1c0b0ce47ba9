"""Real English text for calibration and evaluation, shipped inside the ``gensim`` wheel.

- ``lee_background.cor`` (300 news articles, ~60k words): calibration;
- ``lee.cor`` (50 other articles, ~4k words): held out, for perplexity.

Both are latin-1 encoded. gensim itself is never imported (its import pulls optional dependencies); only
its data files are read.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from pbs2pc.errors import Pbs2pcError

CORPORA = {"calib": "lee_background.cor", "heldout": "lee.cor"}


def corpus_path(name: str) -> Path:
    """Path of a named corpus (``calib`` or ``heldout``) or of any text file."""
    if name not in CORPORA:
        path = Path(name)
        if not path.is_file():
            raise Pbs2pcError(f"text file {name!r} not found; give a path or one of: {', '.join(CORPORA)}.")
        return path
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise Pbs2pcError("the text corpora come from gensim's test data; run: pip install --no-deps gensim")
    path = Path(spec.submodule_search_locations[0]) / "test" / "test_data" / CORPORA[name]
    if not path.exists():
        raise Pbs2pcError(f"{path} is missing from the installed gensim; reinstall it with pip install --no-deps gensim")
    return path


def read_text(name: str) -> str:
    """The text of a corpus: one article per line, joined with blank lines."""
    raw = corpus_path(name).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return "\n\n".join(lines)


def token_windows(tokenizer, name: str, seqlen: int, max_windows: int | None = None):
    """Non-overlapping windows of ``seqlen`` tokens of a corpus, as a LongTensor ``[windows, seqlen]``.

    The whole text is tokenized once, with no special tokens, and cut from the start; the tail that does not
    fill a window is dropped. Every method and runtime is scored on exactly these tokens.
    """
    import torch

    ids = tokenizer(read_text(name), add_special_tokens=False, return_tensors="pt").input_ids[0]
    count = ids.numel() // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise Pbs2pcError(f"corpus {name!r} has only {ids.numel()} tokens, fewer than one window of {seqlen}.")
    return ids[: count * seqlen].view(count, seqlen)


def calibration_batches(tokenizer, name: str = "calib", nsamples: int = 128, seqlen: int = 512, seed: int = 0):
    """``nsamples`` random windows of ``seqlen`` tokens from a corpus (BiLLM/GPTQ style), ``[nsamples, seqlen]``."""
    import torch

    ids = tokenizer(read_text(name), add_special_tokens=False, return_tensors="pt").input_ids[0]
    if ids.numel() <= seqlen:
        raise Pbs2pcError(f"corpus {name!r} has {ids.numel()} tokens, too few for windows of {seqlen}.")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
