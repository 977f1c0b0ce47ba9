"""The token-by-token generation loop, shared by the compiled model and the onnxruntime reference.

A *decoder* is anything with two methods (the compiled library, :class:`pbs2pc.runtime.reference.OrtDecoder`):

* ``prefill(prompt_ids, capacity) -> logits``: start a sequence with room for ``capacity`` tokens and
  return the logits ``[vocab]`` of the prompt's last position;
* ``step(token_id) -> logits``: append one token and return the logits after it.

:func:`stream` drives a decoder with a :class:`~pbs2pc.runtime.sampling.Sampler` and yields
:class:`Token` s as they are chosen, with their text when a tokenizer is given (decoded incrementally, so
multi-byte characters split across tokens come out whole), and fills a :class:`GenerationStats`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Iterator, Protocol

import numpy as np

from pbs2pc.errors import Pbs2pcError
from pbs2pc.runtime.sampling import Sampler, SamplingParams


class Decoder(Protocol):
    max_sequence: int | None

    def prefill(self, prompt_ids: list[int], capacity: int) -> np.ndarray: ...

    def step(self, token_id: int) -> np.ndarray: ...


@dataclasses.dataclass
class Token:
    id: int
    text: str = ""  # the text this token adds ("" without a tokenizer, or while a character is incomplete)


@dataclasses.dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    time_to_first_token_s: float = 0.0  # prompt processing + choosing the first token
    decode_s: float = 0.0  # the remaining new_tokens - 1 steps
    stop_reason: str = ""  # "eos", "max_new_tokens" or "context"

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.time_to_first_token_s if self.time_to_first_token_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.new_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s else 0.0

    def summary(self) -> str:
        return (f"{self.prompt_tokens} prompt tokens, {self.new_tokens} new; time to first token "
                f"{self.time_to_first_token_s * 1e3:.0f} ms ({self.prefill_tokens_per_s:.1f} prompt tokens/s); "
                f"decode {self.decode_tokens_per_s:.1f} tokens/s; stopped: {self.stop_reason}")


@dataclasses.dataclass
class Generation:
    text: str
    token_ids: list[int]
    stats: GenerationStats


def check_prompt(prompt_ids, max_sequence: int | None, vocab_size: int | None = None) -> list[int]:
    ids = [int(t) for t in np.asarray(prompt_ids).reshape(-1)]
    if not ids:
        raise Pbs2pcError("the prompt is empty; give at least one token.")
    if vocab_size and (min(ids) < 0 or max(ids) >= vocab_size):
        raise Pbs2pcError(f"token ids must be in [0, {vocab_size}), got {min(ids)}..{max(ids)}.")
    if max_sequence and len(ids) >= max_sequence:
        raise Pbs2pcError(f"the prompt has {len(ids)} tokens; the model's context is {max_sequence}, so it "
                          f"must be shorter than that to generate anything. Shorten the prompt.")
    return ids


def stream(decoder: Decoder, prompt_ids, max_new_tokens: int = 32, sampling: SamplingParams | None = None,
           eos_token_ids=(), tokenizer=None, stats: GenerationStats | None = None) -> Iterator[Token]:
    """Generate up to ``max_new_tokens`` tokens after ``prompt_ids``; yield each as soon as it is chosen.

    Stops early at a token in ``eos_token_ids`` (which is yielded) or when the context is full.
    """
    if max_new_tokens < 1:
        raise Pbs2pcError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    ids = check_prompt(prompt_ids, decoder.max_sequence)
    sampler = Sampler(sampling or SamplingParams())
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(ids)
    limit = max_new_tokens
    if decoder.max_sequence:
        limit = min(limit, decoder.max_sequence - len(ids))
    eos = set(int(t) for t in eos_token_ids)
    text = _IncrementalText(tokenizer)

    start = time.perf_counter()
    logits = decoder.prefill(ids, len(ids) + limit)
    token = sampler(logits)
    stats.time_to_first_token_s = time.perf_counter() - start
    stats.new_tokens = 1
    yield Token(token, text.add(token))
    start = time.perf_counter()
    try:
        while True:
            if token in eos:
                stats.stop_reason = "eos"
                return
            if stats.new_tokens >= limit:
                stats.stop_reason = "max_new_tokens" if limit == max_new_tokens else "context"
                return
            token = sampler(decoder.step(token))
            stats.new_tokens += 1
            stats.decode_s = time.perf_counter() - start
            yield Token(token, text.add(token))
    finally:
        stats.decode_s = time.perf_counter() - start


def generate(decoder: Decoder, prompt_ids, max_new_tokens: int = 32, sampling: SamplingParams | None = None,
             eos_token_ids=(), tokenizer=None) -> Generation:
    """Run :func:`stream` to the end; return the text, the new token ids and the timings."""
    stats = GenerationStats()
    tokens = list(stream(decoder, prompt_ids, max_new_tokens, sampling, eos_token_ids, tokenizer, stats))
    return Generation("".join(t.text for t in tokens), [t.id for t in tokens], stats)


class _IncrementalText:
    """Text of a growing token list, handed out as deltas; holds back an incomplete UTF-8 character."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.emitted = tokenizer, [], 0

    def add(self, token: int) -> str:
        if self.tokenizer is None:
            return ""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        delta, self.emitted = text[self.emitted:], len(text)
        return delta
