"""Running a compiled artifact: ``pbs2pc.runtime.load(path)`` and the :class:`CompiledModel` it returns.

Only TVM's runtime is used (``tvm.runtime``): no compiler code is imported, so this works where just the
runtime is installed. The weights file is memory-mapped and handed to the VM once at load time.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pbs2pc.errors import Pbs2pcError
from pbs2pc.runtime.artifact import artifact_paths, read_manifest, read_weights


def _tvm_runtime():
    try:
        import tvm
        from tvm.runtime.vm import VirtualMachine
    except ImportError:
        raise Pbs2pcError("the TVM runtime is not installed; run: pip install apache-tvm==0.27.0.post1 "
                          "apache-tvm-ffi==0.1.14.post1") from None
    return tvm, VirtualMachine


class CompiledModel:
    """A compiled causal LM: ``logits(input_ids)`` and a simple ``generate``.

    Parameters
    ----------
    library : path
        The ``.so`` written by ``pbs2pc compile`` (its ``.weights.bin`` and ``.manifest.json`` beside it).
    device : str
        ``"cpu"`` (the only device of the x86 target).
    """

    def __init__(self, library: str | os.PathLike, device: str = "cpu"):
        lib, weights, _ = artifact_paths(library)
        self.manifest = read_manifest(lib)
        if not lib.exists():
            raise Pbs2pcError(f"{lib} does not exist; compile a model first.")
        if not weights.exists():
            raise Pbs2pcError(f"{weights.name} is missing beside {lib.name}; compile the model again.")
        if device != "cpu":
            raise Pbs2pcError(f"device {device!r} is not supported yet; use cpu.")
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

    @property
    def target(self) -> str:
        return self.manifest["target"]

    def logits(self, input_ids, position_ids=None) -> np.ndarray:
        """Float32 logits ``[batch, sequence, vocab]`` for int64 ``input_ids`` ``[batch, sequence]`` (or 1-D)."""
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None, :]
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise Pbs2pcError(f"input_ids must be a non-empty [batch, sequence] array, got shape {ids.shape}.")
        if self.vocab_size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise Pbs2pcError(f"token ids must be in [0, {self.vocab_size}), got {ids.min()}..{ids.max()}.")
        max_len = self.manifest.get("max_sequence")
        if max_len and ids.shape[1] > max_len:
            raise Pbs2pcError(f"the sequence has {ids.shape[1]} tokens, more than the model's {max_len}.")
        feeds = {"input_ids": ids}
        if "position_ids" in self.inputs:
            if position_ids is None:
                position_ids = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape)
            position_ids = np.ascontiguousarray(position_ids, dtype=np.int64)
            # The compiled gathers do not bounds-check (TVM's fast take): a bad index must never reach them.
            if position_ids.shape != ids.shape:
                raise Pbs2pcError(f"position_ids must have the shape of input_ids {ids.shape}, got {position_ids.shape}.")
            if position_ids.min() < 0 or (max_len and position_ids.max() >= max_len):
                raise Pbs2pcError(f"position ids must be in [0, {max_len}), got {position_ids.min()}..{position_ids.max()}.")
            feeds["position_ids"] = position_ids
        args = [self._tvm.runtime.tensor(feeds[name], self.device) for name in self.inputs]
        return self.vm["main"](*args, *self._params).numpy()

    def generate_ids(self, prompt_ids, max_new_tokens: int = 16, eos_token_id: int | None = None) -> list[int]:
        """Greedy continuation of ``prompt_ids`` (recomputes the whole sequence each step: no KV cache yet)."""
        ids = [int(t) for t in np.asarray(prompt_ids).reshape(-1)]
        out = []
        for _ in range(max_new_tokens):
            nxt = int(np.argmax(self.logits(np.array(ids))[0, -1]))
            out.append(nxt)
            ids.append(nxt)
            if eos_token_id is not None and nxt == eos_token_id:
                break
        return out


def load(path: str | os.PathLike, device: str = "cpu") -> CompiledModel:
    """Load a compiled artifact (the ``.so`` path, or its manifest)."""
    path = Path(path)
    if path.name.endswith(".manifest.json"):
        path = path.with_name(path.name[: -len(".manifest.json")] + ".so")
    return CompiledModel(path, device)
