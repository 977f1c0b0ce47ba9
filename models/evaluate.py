"""Perplexity with one fixed protocol, for every model and runtime.

Protocol: the held-out text is tokenized once without special tokens and cut into non-overlapping windows of
``seqlen`` tokens (:func:`pbs2pc.models.data.token_windows`); each window is scored independently (no
context carried over); every token but the first of each window is predicted; perplexity is
``exp(mean negative log-likelihood)`` over all predicted tokens. PyTorch, onnxruntime and the compiled
library are all scored through :func:`perplexity` with a function that maps ``[1, seqlen]`` int64 ids to
``[1, seqlen, vocab]`` float logits, so they see exactly the same tokens.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

LogitsFn = Callable[[np.ndarray], np.ndarray]


def window_nll(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    """Summed negative log-likelihood of ``ids[1:]`` under ``logits[:-1]`` (float64), and the count."""
    logits = np.asarray(logits, dtype=np.float64).reshape(-1, logits.shape[-1])[:-1]
    target = np.asarray(ids).reshape(-1)[1:]
    peak = logits.max(axis=-1, keepdims=True)
    logz = np.log(np.exp(logits - peak).sum(axis=-1)) + peak[:, 0]
    return float((logz - logits[np.arange(len(target)), target]).sum()), len(target)


def perplexity(logits_fn: LogitsFn, windows, desc: str = "perplexity", progress: bool = True) -> float:
    """Perplexity of ``logits_fn`` over token ``windows`` (``[count, seqlen]``), per the module protocol."""
    windows = np.asarray(windows, dtype=np.int64)
    total, count = 0.0, 0
    for row in tqdm(windows, desc=desc, unit="window", disable=not progress, leave=False):
        nll, n = window_nll(logits_fn(row[None, :]), row)
        total, count = total + nll, count + n
    return math.exp(total / count)


def torch_logits_fn(model) -> LogitsFn:
    """A :data:`LogitsFn` for a PyTorch causal LM."""
    import torch

    def run(ids: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(ids), use_cache=False).logits.float().numpy()

    return run


class TorchDecoder:
    """A PyTorch causal LM with Hugging Face's KV cache, as a decoder for :mod:`pbs2pc.runtime.generate`.

    Lets the same loop and sampler drive PyTorch, onnxruntime and the compiled library, so their tokens can
    be compared one for one.
    """

    max_sequence = None

    def __init__(self, model):
        self.model = model
        self._past = None

    def _run(self, ids) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.model(torch.as_tensor(ids, dtype=torch.long).reshape(1, -1), cache=self._past, use_cache=True)
        self._past = out["cache"]  # transformers >= 5.2 names the KV cache "cache" (was past_key_values)
        return out.logits[0, -1].float().numpy()

    def prefill(self, prompt_ids, capacity: int) -> np.ndarray:
        self._past = None
        return self._run(prompt_ids)

    def step(self, token_id: int) -> np.ndarray:
        return self._run([token_id])
