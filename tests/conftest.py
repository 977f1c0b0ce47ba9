"""Shared fixtures: a tiny compressed Llama, its ONNX export and its compiled library (built once)."""

from __future__ import annotations

import numpy as np
import pytest

from testutil import X86


@pytest.fixture(scope="session")
def tiny_compressed():
    """A 2-layer random Llama with every decoder linear compressed at 6:8 (simple method)."""
    from pbs2pc.models import compress, hf

    model = hf.tiny_llama()
    info = compress.compress_model(model, "6:8", progress=False)
    return model, info


@pytest.fixture(scope="session")
def tiny_onnx(tiny_compressed, tmp_path_factory):
    from pbs2pc.models import export

    model, info = tiny_compressed
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export.export(model, path, {"source_model": "tiny-llama", **info})
    return path


@pytest.fixture(scope="session")
def tiny_library(tiny_onnx, tmp_path_factory):
    from pbs2pc.compiler.build import compile_model

    path = tmp_path_factory.mktemp("lib") / "model.so"
    compile_model(tiny_onnx, path, X86)
    return path
