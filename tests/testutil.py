"""Helpers shared by the tests (imported as ``testutil``; pytest puts tests/ on the path)."""

from __future__ import annotations

import functools

import numpy as np

X86 = "x86"


def make_ids(batch: int, seq: int, vocab: int = 256, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, seq)).astype(np.int64)


@functools.lru_cache(maxsize=4)
def _decoder(path: str):
    from pbs2pc.runtime.reference import OrtDecoder

    return OrtDecoder(path)


def ort_logits(onnx_path, ids: np.ndarray) -> np.ndarray:
    """Logits from onnxruntime running an exported file on a fresh sequence (sessions cached per path)."""
    return _decoder(str(onnx_path)).logits(ids)


def rel_err(got, ref) -> float:
    return float(np.abs(np.asarray(got, np.float64) - ref).max() / np.abs(ref).max())


def legalize_and_fuse(mod):
    """The pipeline's phases before scheduling: NT-matmul fusion, legalization, op fusion."""
    from pbs2pc.compiler.tvm_compat import relax, tvm

    seq = [relax.transform.FuseTransposeMatmul(), relax.transform.LegalizeOps(),
           relax.transform.AnnotateTIROpPattern(), relax.transform.FuseOps(),
           relax.transform.FuseTIR(), relax.transform.DeadCodeElimination()]
    return tvm.ir.transform.Sequential(seq)(mod)
