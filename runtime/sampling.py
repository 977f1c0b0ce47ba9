"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus), seeded.

The order is the one Hugging Face ``generate`` and llama.cpp use: temperature scales the logits, top-k keeps
the k largest, top-p keeps the smallest set of the most likely tokens whose probability reaches p, then one
token is drawn. ``temperature == 0`` is greedy (argmax; ties go to the lowest token id, as in torch).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from pbs2pc.errors import Pbs2pcError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. The defaults are greedy decoding."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise Pbs2pcError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}.")
        if self.top_k < 0:
            raise Pbs2pcError(f"top_k must be >= 0 (0 keeps every token), got {self.top_k}.")
        if not 0 < self.top_p <= 1:
            raise Pbs2pcError(f"top_p must be in (0, 1], got {self.top_p}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def describe(self) -> str:
        if self.greedy:
            return "greedy"
        parts = [f"temperature {self.temperature:g}"]
        if self.top_k:
            parts.append(f"top-k {self.top_k}")
        if self.top_p < 1:
            parts.append(f"top-p {self.top_p:g}")
        return ", ".join(parts + [f"seed {self.seed}"])


class Sampler:
    """Picks one token id from a 1-D row of logits (see :class:`SamplingParams`)."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        p = self.params
        logits = np.asarray(logits, dtype=np.float64).reshape(-1)
        if p.greedy:
            return int(np.argmax(logits))
        scaled = logits / p.temperature
        order = np.argsort(-scaled, kind="stable")
        if p.top_k:
            order = order[: p.top_k]
        probs = np.exp(scaled[order] - scaled[order[0]])
        probs /= probs.sum()
        if p.top_p < 1:
            # Keep the most likely tokens until their mass reaches top_p (always at least one).
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        return int(order[self.rng.choice(len(order), p=probs)])
