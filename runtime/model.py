"""Running a compiled artifact: ``pbs2pc.runtime.load(path)`` and the :class:`CompiledModel` it returns.

Only TVM's runtime is used (``tvm.runtime``): no compiler code is imported, so this works where just the
runtime is installed. The weights file is memory-mapped and handed to the VM once at load time. A model
compiled from a graph with past keys and values keeps them in a :class:`KVCache` on the device that the
compiled ``main`` (prompt) and ``decode`` (one token) functions update in place; generation
(:mod:`pbs2pc.runtime.generate`) calls ``prefill`` once and ``step`` per new token.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np

from pbs2pc.errors import Pbs2pcError
from pbs2pc.runtime import generate as gen
from pbs2pc.runtime.artifact import artifact_paths, read_manifest, read_weights
from pbs2pc.runtime.generate import Generation, GenerationStats, Token
from pbs2pc.runtime.sampling import SamplingParams


#: TVM's environment variable for its CPU thread pool's size.
THREADS_ENV = "TVM_NUM_THREADS"


def cpu_threads() -> int:
    """CPUs this process may run on (its affinity mask, which a container's cpuset also limits)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def configure_threads(threads: int | None = None) -> int:
    """Size TVM's CPU thread pool; returns the number of threads the compiled kernels will use.

    TVM creates its pool at the first parallel kernel, with ``TVM_NUM_THREADS`` threads, or else half
    the hardware threads on x86 (it assumes two hyper-threads per core): one thread on a 2-vCPU machine,
    where that halves decode speed (SmolLM2 6:8 decode step: 14.2 ms with 1 thread, 8.1 ms with 2).
    pbs2pc therefore sets ``TVM_NUM_THREADS`` to ``threads``, or to every CPU this process may use, unless
    the user set it already. Call before the first kernel runs: TVM does not resize a running pool.
    """
    if threads is not None:
        if threads < 1:
            raise Pbs2pcError(f"--threads must be at least 1, got {threads}.")
        os.environ[THREADS_ENV] = str(threads)
    elif not os.environ.get(THREADS_ENV):
        os.environ[THREADS_ENV] = str(cpu_threads())
    return int(os.environ[THREADS_ENV])


def _tvm_runtime():
    try:
        import tvm
        from tvm.runtime.vm import VirtualMachine
    except ImportError:
        raise Pbs2pcError("the TVM runtime is not installed; run: pip install apache-tvm==0.27.0.post1 "
                          "apache-tvm-ffi==0.1.14.post1") from None
    return tvm, VirtualMachine


class KVCache:
    """One sequence batch's keys and values on the device: the caches ``main``/``decode`` update in place.

    ``capacity`` is a multiple of 64 (the attention kernel reads keys 64 at a time); ``length`` tokens are
    filled. Layouts are in the manifest's ``kv_cache`` entry (keys ``[B, KV, D, C]``, values ``[B, KV, C, D]``).
    """

    def __init__(self, model: "CompiledModel", capacity: int, batch: int = 1):
        spec = model.manifest["kv_cache"]
        multiple = int(spec["capacity_multiple"])
        self.capacity = -(-max(int(capacity), 1) // multiple) * multiple
        self.batch, self.length = batch, 0
        kv, d = int(spec["kv_heads"]), int(spec["head_dim"])
        tvm, dev = model._tvm, model.device
        key = np.zeros((batch, kv, d, self.capacity), np.float32)
        value = np.zeros((batch, kv, self.capacity, d), np.float32)
        self.tensors = [tvm.runtime.tensor(a, dev) for _ in range(int(spec["layers"])) for a in (key, value)]


class CompiledModel:
    """A compiled causal LM: ``logits``, and text generation with a KV cache (``generate``, ``stream``).

    Parameters
    ----------
    library : path
        The ``.so`` written by ``pbs2pc compile`` (its ``.weights.bin`` and ``.manifest.json`` beside it).
    device : str
        ``"cpu"`` (the only device of the x86 target).
    threads : int, optional
        CPU threads for the kernels (default: ``TVM_NUM_THREADS`` if set, else every CPU this process may
        use; see :func:`configure_threads`).

    Example
    -------
    >>> model = pbs2pc.runtime.load("model.so")                                    # doctest: +SKIP
    >>> print(model.generate("The river", max_new_tokens=20).text)                 # doctest: +SKIP
    >>> for token in model.stream("The river", temperature=0.8, seed=0): ...       # doctest: +SKIP
    """

    def __init__(self, library: str | os.PathLike, device: str = "cpu", threads: int | None = None):
        lib, weights, _ = artifact_paths(library)
        self.manifest = read_manifest(lib)
        if not lib.exists():
            raise Pbs2pcError(f"{lib} does not exist; compile a model first.")
        if not weights.exists():
            raise Pbs2pcError(f"{weights.name} is missing beside {lib.name}; compile the model again.")
        if device != "cpu":
            raise Pbs2pcError(f"device {device!r} is not supported yet; use cpu.")
        self.threads = configure_threads(threads)
        tvm, VirtualMachine = _tvm_runtime()
        self._tvm = tvm
        self.device = tvm.cpu()
        try:
            module = tvm.runtime.load_module(str(lib))
        except Exception as exc:
            raise Pbs2pcError(f"cannot load {lib} ({str(exc).strip().splitlines()[-1]}); was it built for "
                              f"this machine? It targets {self.manifest.get('target')!r}.") from None
        self.vm = VirtualMachine(module, self.device)
        arrays = read_weights(weights, self.manifest["params"])
        self._params = [tvm.runtime.tensor(np.ascontiguousarray(a), self.device) for a in arrays]
        self.inputs = self.manifest["inputs"]
        self.vocab_size = int(self.manifest.get("vocab_size") or 0)
        self.max_sequence = self.manifest.get("max_sequence")
        self._tokenizer = None
        self._cache: KVCache | None = None  # the sequence prefill/step continue
        self._recompute: list[int] = []  # the same, for a graph without a cache (recomputed every step)

    @property
    def target(self) -> str:
        return self.manifest["target"]

    @property
    def has_kv_cache(self) -> bool:
        return bool(self.manifest.get("kv_cache"))

    # -- logits ------------------------------------------------------------------------------------------

    def _check_ids(self, ids, position_ids, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None, :]
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise Pbs2pcError(f"input_ids must be a non-empty [batch, sequence] array, got shape {ids.shape}.")
        if self.vocab_size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise Pbs2pcError(f"token ids must be in [0, {self.vocab_size}), got {ids.min()}..{ids.max()}.")
        max_len = self.max_sequence
        if max_len and start + ids.shape[1] > max_len:
            raise Pbs2pcError(f"the sequence has {start + ids.shape[1]} tokens, more than the model's {max_len}.")
        if position_ids is None:
            position_ids = np.broadcast_to(np.arange(start, start + ids.shape[1], dtype=np.int64), ids.shape)
        position_ids = np.ascontiguousarray(position_ids, dtype=np.int64)
        # The compiled gathers do not bounds-check (TVM's fast take): a bad index must never reach them.
        if position_ids.shape != ids.shape:
            raise Pbs2pcError(f"position_ids must have the shape of input_ids {ids.shape}, got {position_ids.shape}.")
        if position_ids.min() < 0 or (max_len and position_ids.max() >= max_len):
            raise Pbs2pcError(f"position ids must be in [0, {max_len}), got {position_ids.min()}..{position_ids.max()}.")
        return ids, position_ids

    def _run(self, ids: np.ndarray, position_ids: np.ndarray, cache: KVCache | None,
             last_only: bool = False) -> np.ndarray:
        """One call of the compiled model: ``main``, ``decode`` for a single token, or ``prefill`` when only
        the last position's logits are wanted; updates ``cache``."""
        tensor = self._tvm.runtime.tensor
        function, extra = "main", []
        total = ids.shape[1]
        if cache is not None:
            total += cache.length
            if total > cache.capacity or ids.shape[0] != cache.batch:
                raise Pbs2pcError(f"the KV cache holds {cache.capacity} tokens of batch {cache.batch}; this call "
                                  f"needs {total} of batch {ids.shape[0]}.")
            extra = cache.tensors
            functions = self.manifest.get("functions", ())
            if ids.shape == (1, 1) and "decode" in functions:
                function = "decode"
            elif last_only and "prefill" in functions:
                function = "prefill"
        feeds = {"input_ids": ids, "position_ids": position_ids,
                 "attention_mask": np.ones((ids.shape[0], total), np.int64)}
        args = [tensor(np.ascontiguousarray(feeds[name]), self.device) for name in self.inputs]
        out = self.vm[function](*args, *extra, *self._params)
        if cache is not None:
            cache.length = total
        return out.numpy()

    def logits(self, input_ids, position_ids=None) -> np.ndarray:
        """Float32 logits ``[batch, sequence, vocab]`` for int64 ``input_ids`` ``[batch, sequence]`` (or 1-D).

        A fresh sequence: no earlier tokens are attended to.
        """
        ids, position_ids = self._check_ids(input_ids, position_ids)
        cache = KVCache(self, ids.shape[1], ids.shape[0]) if self.has_kv_cache else None
        return self._run(ids, position_ids, cache)

    # -- the decoder interface (pbs2pc.runtime.generate) ---------------------------------------------

    def prefill(self, prompt_ids, capacity: int) -> np.ndarray:
        """Start a sequence with room for ``capacity`` tokens; the logits after its last prompt token."""
        ids, positions = self._check_ids(prompt_ids, None)
        if ids.shape[0] != 1:
            raise Pbs2pcError("generation runs one sequence at a time; give a 1-D prompt.")
        if not self.has_kv_cache:
            self._recompute = [int(t) for t in ids[0]]
            return self._run(ids, positions, None)[0, -1]
        self._cache = KVCache(self, max(capacity, ids.shape[1]))
        return self._run(ids, positions, self._cache, last_only=True)[0, -1]

    def step(self, token_id: int) -> np.ndarray:
        """Append one token to the sequence :meth:`prefill` started; the logits after it."""
        if not self.has_kv_cache:  # a graph without past inputs: recompute the whole sequence
            self._recompute.append(int(token_id))
            ids, positions = self._check_ids(self._recompute, None)
            return self._run(ids, positions, None)[0, -1]
        if self._cache is None:
            raise Pbs2pcError("step() needs a sequence; call prefill() first.")
        ids, positions = self._check_ids([[token_id]], None, start=self._cache.length)
        return self._run(ids, positions, self._cache)[0, -1]

    # -- text --------------------------------------------------------------------------------------------

    @property
    def tokenizer(self):
        """The source model's tokenizer (recorded at export), loaded on first use."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.manifest)
        return self._tokenizer

    def encode(self, prompt, chat: bool = False) -> list[int]:
        """Token ids of ``prompt`` (text, or ids as given); ``chat`` applies the model's chat template."""
        if not isinstance(prompt, str):
            return [int(t) for t in np.asarray(prompt).reshape(-1)]
        if not prompt.strip():
            raise Pbs2pcError("the prompt is empty; give some text.")
        tok = self.tokenizer
        if chat:
            if not getattr(tok, "chat_template", None):
                raise Pbs2pcError("this model's tokenizer has no chat template; run without chat.")
            return list(tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                tokenize=True, return_dict=False))
        return list(tok(prompt, add_special_tokens=False).input_ids)

    def stream(self, prompt, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int | None = None, chat: bool = False,
               stats: GenerationStats | None = None) -> Iterator[Token]:
        """Yield generated :class:`Token` s (id and text) one by one; see :meth:`generate`."""
        sampling = SamplingParams(temperature, top_k, top_p, seed)
        ids = self.encode(prompt, chat)
        tokenizer = self.tokenizer if isinstance(prompt, str) else None
        eos = _eos_ids(self.tokenizer) if isinstance(prompt, str) else ()
        return gen.stream(self, ids, max_new_tokens, sampling, eos, tokenizer, stats)

    def generate(self, prompt, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, chat: bool = False) -> Generation:
        """Continue ``prompt`` (text, or token ids); greedy unless ``temperature > 0``.

        Returns the new text (empty for a prompt given as ids), the new token ids and timings. Text prompts
        stop at the tokenizer's end-of-sequence token.
        """
        stats = GenerationStats()
        tokens = list(self.stream(prompt, max_new_tokens, temperature, top_k, top_p, seed, chat, stats))
        return Generation("".join(t.text for t in tokens), [t.id for t in tokens], stats)

    def generate_ids(self, prompt_ids, max_new_tokens: int = 16, eos_token_id: int | None = None) -> list[int]:
        """Greedy continuation of ``prompt_ids`` (token ids in, token ids out)."""
        eos = () if eos_token_id is None else (eos_token_id,)
        return gen.generate(self, prompt_ids, max_new_tokens, SamplingParams(), eos).token_ids


def _eos_ids(tokenizer) -> tuple[int, ...]:
    return () if tokenizer.eos_token_id is None else (int(tokenizer.eos_token_id),)


def load_tokenizer(manifest: dict, spec: str | None = None):
    """The tokenizer of the model an artifact was compiled from (``spec`` overrides the recorded one)."""
    from pbs2pc.models import hf

    spec = spec or manifest.get("source", {}).get("source_model")
    if not spec:
        raise Pbs2pcError("the artifact does not record its source model; pass --tokenizer MODEL_OR_FOLDER.")
    return hf.load_tokenizer(hf.resolve(spec))


def load(path: str | os.PathLike, device: str = "cpu", threads: int | None = None) -> CompiledModel:
    """Load a compiled artifact (the ``.so`` path, or its manifest); ``threads``: see :class:`CompiledModel`."""
    path = Path(path)
    if path.name.endswith(".manifest.json"):
        path = path.with_name(path.name[: -len(".manifest.json")] + ".so")
    return CompiledModel(path, device, threads)
