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

from pbs2pc.cpu import cpu_threads
from pbs2pc.errors import Pbs2pcError
from pbs2pc.runtime import generate as gen
from pbs2pc.runtime.artifact import artifact_paths, check_host, read_manifest, read_weights
from pbs2pc.runtime.generate import Generation, GenerationStats, Token
from pbs2pc.runtime.sampling import SamplingParams


#: TVM's environment variable for its CPU thread pool's size.
THREADS_ENV = "TVM_NUM_THREADS"


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


def cuda_device(tvm, gpu: dict, name: str):
    """GPU 0, after checking what the library needs (one sentence each): TVM's CUDA runtime (a runtime-only
    install registers it by loading ``libtvm_runtime_cuda.so``), a CUDA device, and an architecture that
    runs the library's code (its SASS on the same major version, at or above the minor; newer majors
    translate its PTX)."""
    import ctypes

    import tvm_ffi

    if tvm_ffi.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True) is None:
        lib = Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"
        try:
            ctypes.CDLL(str(lib), ctypes.RTLD_GLOBAL)
        except OSError as exc:
            raise Pbs2pcError(f"{name} needs TVM's CUDA runtime and the NVIDIA driver (libcuda.so.1): "
                              f"{str(exc).strip()}") from None
    dev = tvm.cuda(0)
    if not dev.exist:
        raise Pbs2pcError(f"{name} was built for an NVIDIA GPU ({gpu['arch']}) and this machine has none.")
    have = tuple(int(v) for v in dev.compute_version.split("."))
    need = (int(gpu["arch"][3:-1]), int(gpu["arch"][-1]))
    if have < need:
        raise Pbs2pcError(f"{name} was built for {gpu['arch']} and this GPU ({dev.device_name}) is sm_"
                          f"{have[0]}{have[1]}; compile again with --target cuda --arch sm_{have[0]}{have[1]}.")
    return dev


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
    """A compiled graph: ``run(feeds)`` for any graph; for a causal LM also ``logits``, and text generation
    with a KV cache (``generate``, ``stream``).

    Parameters
    ----------
    library : path
        The ``.so`` written by ``pbs2pc compile`` (its ``.weights.bin`` and ``.manifest.json`` beside it).
    device : str, optional
        ``"cpu"`` or ``"cuda"``; default: the library's (``cuda`` for a ``--target cuda`` build, whose
        manifest has a ``gpu`` entry).
    threads : int, optional
        CPU threads for the kernels (default: ``TVM_NUM_THREADS`` if set, else every CPU this process may
        use; see :func:`configure_threads`).

    Example
    -------
    >>> model = pbs2pc.runtime.load("model.so")                                    # doctest: +SKIP
    >>> print(model.generate("The river", max_new_tokens=20).text)                 # doctest: +SKIP
    >>> for token in model.stream("The river", temperature=0.8, seed=0): ...       # doctest: +SKIP
    >>> pbs2pc.runtime.load("layer.so").run({"x": x})                              # doctest: +SKIP
    {'y': array(...)}
    """

    def __init__(self, library: str | os.PathLike, device: str | None = None, threads: int | None = None):
        lib, weights, _ = artifact_paths(library)
        self.manifest = read_manifest(lib)
        if not lib.exists():
            raise Pbs2pcError(f"{lib} does not exist; compile a model first.")
        check_host(self.manifest, lib)  # before TVM loads any code: a missing CPU feature is an error, not SIGILL
        if not weights.exists():
            raise Pbs2pcError(f"{weights.name} is missing beside {lib.name}; compile the model again.")
        gpu = self.manifest.get("gpu")
        device = device or ("cuda" if gpu else "cpu")
        if device != ("cuda" if gpu else "cpu"):
            raise Pbs2pcError(f"{lib.name} was built for target {self.manifest.get('target')!r}, which runs on "
                              f"{'cuda' if gpu else 'cpu'}, not {device}.")
        self.threads = configure_threads(threads)
        tvm, VirtualMachine = _tvm_runtime()
        self._tvm = tvm
        self.device = cuda_device(tvm, gpu, lib.name) if gpu else tvm.cpu()
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
        if not self.is_language_model:
            raise Pbs2pcError(f"this graph is not a language model (it takes {', '.join(self.manifest['inputs'])}, "
                              "not token ids); call run({name: array}) instead.")
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

    # -- any graph ---------------------------------------------------------------------------------------

    @property
    def outputs(self) -> list[str]:
        """The graph's output names, in order (with a KV cache: without the ``present`` caches)."""
        return list(self.manifest["outputs"])

    @property
    def is_language_model(self) -> bool:
        """Whether the graph takes token ids (``input_ids``, and at most ``attention_mask`` and
        ``position_ids`` besides): what ``logits``, ``generate`` and ``stream`` need."""
        inputs = set(self.manifest["inputs"])
        return "input_ids" in inputs and inputs <= set(LM_INPUTS)

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run the compiled graph's ``main`` once: ``{input name: array}`` in, ``{output name: array}`` out.

        Like onnxruntime's ``InferenceSession.run`` (every graph input must be given, with the dtype and
        rank the graph takes; no conversion is made) but returning the outputs by name, all of them or
        those in ``output_names``, in that order. A model with a KV cache runs on a fresh cache sized for
        the sequence (as :meth:`logits`): ``attention_mask``, if the graph takes it, covers the new tokens
        only, and the outputs are the non-cache ones (the logits).

        Example
        -------
        >>> model = pbs2pc.runtime.load("layer.so")                                    # doctest: +SKIP
        >>> model.run({"x": np.ones((2, 96), np.float32)})["y"].shape                  # doctest: +SKIP
        """
        arrays = self._check_feeds(feeds)
        names = self._check_output_names(output_names)
        extra = []
        if self.has_kv_cache:
            batch, sequence = self._check_sequence_feeds(arrays)
            extra = KVCache(self, sequence, batch).tensors
        self._check_index_feeds(arrays)
        tensor = self._tvm.runtime.tensor
        args = [tensor(arrays[name], self.device) for name in self.manifest["inputs"]]
        try:
            out = self.vm["main"](*args, *extra, *self._params)
        except Exception as exc:  # TVM's checks of the arguments at main's entry: the feeds' dtypes and shapes
            error = _feed_error(str(exc), arrays)
            if error is None:
                raise
            raise error from None
        results = [out] if hasattr(out, "numpy") else list(out)
        produced = self.outputs
        if len(results) < len(produced):
            raise Pbs2pcError(f"main returned {len(results)} outputs but the manifest lists {len(produced)} "
                              f"({', '.join(produced)}); compile the model again.")
        by_name = dict(zip(produced, results))
        return {name: by_name[name].numpy() for name in names}

    def _check_feeds(self, feeds) -> dict[str, np.ndarray]:
        """The feeds as contiguous native-byte-order arrays, after the checks that need no TVM."""
        if not hasattr(feeds, "items"):
            raise Pbs2pcError(f"run() takes a dict {{input name: array}}, got {type(feeds).__name__}.")
        expected = list(self.manifest["inputs"])
        takes = ", ".join(expected) or "no inputs"
        unknown = [name for name in feeds if name not in expected]
        if unknown:
            raise Pbs2pcError(f"unknown input {unknown[0]!r}; the graph takes {takes}.")
        missing = [name for name in expected if name not in feeds]
        if missing:
            raise Pbs2pcError(f"missing input{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}; "
                              f"the graph takes {takes}.")
        specs = self.manifest.get(INPUT_TYPES_KEY) or {}
        arrays, sizes = {}, {}
        for name in expected:
            array = np.asarray(feeds[name])
            if array.dtype.kind not in "biuf":
                raise Pbs2pcError(f"input {name!r} must be a numeric array, got dtype {array.dtype}.")
            if not array.dtype.isnative:
                array = array.astype(array.dtype.newbyteorder("="))
            array = np.ascontiguousarray(array)
            spec = specs.get(name)
            if spec is not None:
                _check_against_spec(name, array, spec, sizes)
            arrays[name] = array
        return arrays

    def _check_output_names(self, output_names) -> list[str]:
        produced = self.outputs
        if output_names is None:
            return produced
        if isinstance(output_names, str):
            output_names = [output_names]
        for name in output_names:
            if name not in produced:
                raise Pbs2pcError(f"unknown output {name!r}; the graph's outputs are {', '.join(produced)}.")
        return list(output_names)

    def _check_sequence_feeds(self, arrays: dict[str, np.ndarray]) -> tuple[int, int]:
        """``(batch, sequence)`` of a KV-cache model's feeds; the attention mask must cover the new tokens
        exactly (a fresh cache holds no earlier ones, and the attention kernel trusts the mask's length)."""
        ids = arrays.get("input_ids")
        if ids is None or ids.ndim != 2 or ids.shape[1] == 0:
            raise Pbs2pcError(f"input_ids must be a non-empty [batch, sequence] array, got shape "
                              f"{None if ids is None else ids.shape}.")
        mask = arrays.get("attention_mask")
        if mask is not None and mask.shape != ids.shape:
            raise Pbs2pcError(f"attention_mask must have the shape of input_ids {ids.shape} (run() starts a "
                              f"fresh sequence: no earlier tokens), got {mask.shape}.")
        if self.max_sequence and ids.shape[1] > self.max_sequence:
            raise Pbs2pcError(f"the sequence has {ids.shape[1]} tokens, more than the model's {self.max_sequence}.")
        return ids.shape[0], ids.shape[1]

    def _check_index_feeds(self, arrays: dict[str, np.ndarray]) -> None:
        """Token and position ids index tables with TVM's unchecked gathers: a bad one must never reach them."""
        bounds = {"input_ids": self.vocab_size, "position_ids": self.max_sequence}
        for name, bound in bounds.items():
            array = arrays.get(name)
            if array is None or not bound or array.size == 0 or array.dtype.kind not in "iu":
                continue
            low, high = int(array.min()), int(array.max())
            if low < 0 or high >= int(bound):
                raise Pbs2pcError(f"{name} must be in [0, {bound}), got {low}..{high}.")

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


#: The inputs of a language model graph as pbs2pc exports it (``input_ids`` is the one always there).
LM_INPUTS = ("input_ids", "attention_mask", "position_ids")

#: The manifest entry (optional) with each graph input's dtype and shape, ``{name: {"dtype": "float32",
#: "shape": ["batch", 3, 96]}}`` (a symbolic dimension as its name). With it, :meth:`CompiledModel.run`
#: checks feeds before calling TVM; without it, TVM's own checks at ``main``'s entry are translated.
INPUT_TYPES_KEY = "input_types"


def _describe(dtype, shape) -> str:
    return f"{dtype} [{', '.join(str(d) for d in shape)}]"


def _check_against_spec(name: str, array: np.ndarray, spec: dict, sizes: dict) -> None:
    """Check a feed against its manifest entry; ``sizes`` collects the symbolic dimensions seen so far."""
    dtype, shape = spec.get("dtype"), list(spec.get("shape") or [])
    wanted = _describe(dtype, shape)
    got = _describe(array.dtype, array.shape)
    if dtype and np.dtype(dtype) != array.dtype:
        raise Pbs2pcError(f"input {name!r} must be {wanted} but has dtype {array.dtype} ({got}); "
                          f"convert it with .astype(np.{np.dtype(dtype).name}).")
    if spec.get("shape") is None:
        return
    if array.ndim != len(shape):
        raise Pbs2pcError(f"input {name!r} must be {wanted} (rank {len(shape)}) but has rank {array.ndim} ({got}).")
    for axis, (want, have) in enumerate(zip(shape, array.shape)):
        if isinstance(want, int):
            if want != have:
                raise Pbs2pcError(f"input {name!r} must be {wanted} but its dimension {axis} is {have} ({got}).")
        elif sizes.setdefault(want, (have, name))[0] != have:
            first, where = sizes[want]
            raise Pbs2pcError(f"input {name!r} has {want} = {have} ({got}) but input {where!r} has {want} = {first}.")


#: TVM's check of an argument at a function's entry, e.g. ``ErrorContext(fn=main, loc=param[0], param=x,
#: annotation=R.Tensor((batch, 3, 96), dtype="float32"))  expect Tensor with dtype float32 but get int64``.
_ENTRY_CHECK = r"ErrorContext\(fn=\w+, loc=param\[\d+\], param=(?P<param>[^,]+), annotation=(?P<ann>.*?\))\)\s+(?P<why>.*)"


def _feed_error(message: str, arrays: dict[str, np.ndarray]) -> Pbs2pcError | None:
    """A one-sentence error for TVM's rejection of a feed, or ``None`` if ``message`` is about something else."""
    import re

    match = re.search(_ENTRY_CHECK, message)
    if match is None or match["param"].strip() not in arrays:
        return None
    name, why = match["param"].strip(), match["why"]
    array = arrays[name]
    got = _describe(array.dtype, array.shape)
    tensor = re.fullmatch(r'R\.Tensor\(\((?P<shape>[^)]*)\), dtype="(?P<dtype>\w+)"\)', match["ann"].strip())
    if tensor is None:
        return Pbs2pcError(f"input {name!r} must be {match['ann'].strip()}, got {got}.")
    shape = [d.strip() for d in tensor["shape"].split(",") if d.strip()]
    wanted = _describe(tensor["dtype"], shape)
    if "dtype" in why:
        return Pbs2pcError(f"input {name!r} must be {wanted} but has dtype {array.dtype} ({got}); "
                           f"convert it with .astype(np.{tensor['dtype']}).")
    if "ndim" in why:
        return Pbs2pcError(f"input {name!r} must be {wanted} (rank {len(shape)}) but has rank {array.ndim} ({got}).")
    axis = re.search(r"shape\[(\d+)\]", why)
    if axis is not None:
        axis = int(axis[1])
        if axis >= array.ndim:
            return Pbs2pcError(f"input {name!r} must be {wanted}, got {got}.")
        want = shape[axis] if axis < len(shape) else "?"
        reason = (f"its dimension {axis} is {array.shape[axis]}" if want.isdigit() else
                  f"its dimension {axis} ({want} = {array.shape[axis]}) differs from {want} in another input")
        return Pbs2pcError(f"input {name!r} must be {wanted} but {reason} ({got}).")
    return Pbs2pcError(f"input {name!r} must be {wanted}, got {got}.")


def _eos_ids(tokenizer) -> tuple[int, ...]:
    return () if tokenizer.eos_token_id is None else (int(tokenizer.eos_token_id),)


def load_tokenizer(manifest: dict, spec: str | None = None):
    """The tokenizer of the model an artifact was compiled from (``spec`` overrides the recorded one)."""
    from pbs2pc.models import hf

    spec = spec or manifest.get("source", {}).get("source_model")
    if not spec:
        raise Pbs2pcError("the artifact does not record its source model; pass --tokenizer MODEL_OR_FOLDER.")
    return hf.load_tokenizer(hf.resolve(spec))


def load(path: str | os.PathLike, device: str | None = None, threads: int | None = None) -> CompiledModel:
    """Load a compiled artifact (the ``.so`` path, or its manifest); ``threads``: see :class:`CompiledModel`."""
    path = Path(path)
    if path.name.endswith(".manifest.json"):
        path = path.with_name(path.name[: -len(".manifest.json")] + ".so")
    return CompiledModel(path, device, threads)
