"""onnxruntime running an exported file with its KV cache: the numeric reference for generation.

The file's inputs and outputs follow optimum's decoder naming (``input_ids``, ``attention_mask``,
``position_ids``, ``past_key_values.{i}.key/value`` in, ``logits`` and ``present.{i}.key/value`` out; see
:mod:`pbs2pc.models.export`). :class:`OrtDecoder` implements the decoder interface of
:mod:`pbs2pc.runtime.generate`, so the same loop, sampler and stopping rules drive onnxruntime and the
compiled library. The ``present`` tensors of one call are fed back as the ``past`` of the next (onnxruntime
copies them each step; this is the reference, not the fast path).
"""

from __future__ import annotations

import os

import numpy as np

from pbs2pc.errors import Pbs2pcError


class OrtDecoder:
    """Generation through onnxruntime (CPU) for an exported ``model.onnx``.

    Parameters
    ----------
    onnx_path : path
        The exported file (external data beside it).
    threads : int, optional
        onnxruntime's intra-op threads (default: its own choice).
    """

    def __init__(self, onnx_path: str | os.PathLike, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [name for name in inputs if name.startswith("past_key_values.")]
        if not self.past_names:
            raise Pbs2pcError(f"{onnx_path} has no past_key_values inputs; export it again with this pbs2pc.")
        self._past_shape = {name: inputs[name].shape for name in self.past_names}
        self.output_names = ["logits"] + [n.replace("past_key_values.", "present.") for n in self.past_names]
        self.max_sequence = None
        self._past: dict[str, np.ndarray] = {}
        self._length = 0

    def logits(self, input_ids) -> np.ndarray:
        """Logits ``[batch, sequence, vocab]`` of fresh sequences (empty past), like ``CompiledModel.logits``."""
        ids = np.asarray(input_ids, dtype=np.int64)
        ids = ids[None, :] if ids.ndim == 1 else ids
        batch, seq = ids.shape
        feeds = {"input_ids": ids, "attention_mask": np.ones((batch, seq), np.int64),
                 "position_ids": np.broadcast_to(np.arange(seq, dtype=np.int64), ids.shape).copy()}
        feeds.update({name: np.zeros((batch, shape[1], 0, shape[3]), np.float32)
                      for name, shape in self._past_shape.items()})
        return self.session.run(["logits"], feeds)[0]

    def _run(self, ids: np.ndarray) -> np.ndarray:
        total = self._length + ids.shape[1]
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, total), np.int64),
                 "position_ids": np.arange(self._length, total, dtype=np.int64)[None, :], **self._past}
        outputs = self.session.run(self.output_names, feeds)
        self._past = dict(zip(self.past_names, outputs[1:]))
        self._length = total
        return outputs[0][0, -1]

    def prefill(self, prompt_ids, capacity: int) -> np.ndarray:
        ids = np.asarray(prompt_ids, dtype=np.int64).reshape(1, -1)
        self._length = 0
        self._past = {name: np.zeros((1, shape[1], 0, shape[3]), np.float32) for name, shape in self._past_shape.items()}
        return self._run(ids)

    def step(self, token_id: int) -> np.ndarray:
        return self._run(np.array([[token_id]], np.int64))
