"""Helpers shared by the tests (imported as ``testutil``; pytest puts tests/ on the path)."""

from __future__ import annotations

import functools

import numpy as np

X86 = "x86"


def make_ids(batch: int, seq: int, vocab: int = 256, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, seq)).astype(np.int64)


def positions(ids: np.ndarray) -> np.ndarray:
    return np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()


@functools.lru_cache(maxsize=4)
def _session(path: str):
    import onnxruntime as ort

    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def ort_logits(onnx_path, ids: np.ndarray) -> np.ndarray:
    """Logits from onnxruntime running an exported file on a fresh sequence (sessions cached per path)."""
    session = _session(str(onnx_path))
    feeds = {}
    for value in session.get_inputs():
        if value.name == "input_ids":
            feeds[value.name] = ids
        elif value.name == "position_ids":
            feeds[value.name] = positions(ids)
        elif value.name == "attention_mask":
            feeds[value.name] = np.ones(ids.shape, np.int64)
        elif value.name.startswith("past_key_values."):  # [batch, kv_heads, 0, head_dim]
            feeds[value.name] = np.zeros((ids.shape[0], value.shape[1], 0, value.shape[3]), np.float32)
    return session.run(["logits"], feeds)[0]


def rel_err(got, ref) -> float:
    return float(np.abs(np.asarray(got, np.float64) - ref).max() / np.abs(ref).max())


def legalize_and_fuse(mod):
    """The pipeline's phases before scheduling: NT-matmul fusion, legalization, op fusion."""
    from pbs2pc.compiler.tvm_compat import relax, tvm

    seq = [relax.transform.FuseTransposeMatmul(), relax.transform.LegalizeOps(),
           relax.transform.AnnotateTIROpPattern(), relax.transform.FuseOps(),
           relax.transform.FuseTIR(), relax.transform.DeadCodeElimination()]
    return tvm.ir.transform.Sequential(seq)(mod)
