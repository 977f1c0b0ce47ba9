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


@pytest.fixture(scope="session")
def smollm2_export(tmp_path_factory):
    """The real SmolLM2-135M (bundled GGUF) compressed at 6:8 (simple method, group size 64) and exported:
    ``(model, tokenizer, folder)`` with ``folder / "model.onnx"``. Built once a session: the x86 end-to-end
    test and the board bundle test share it (about a minute on 2 cores)."""
    from pbs2pc.models import compress, export, hf

    model, tokenizer, _ = hf.load("smollm2-135m")
    info = compress.compress_model(model, "6:8", method="simple", progress=False)
    folder = tmp_path_factory.mktemp("smollm2")
    export.export(model, folder / "model.onnx", {"source_model": "smollm2-135m", **info})
    return model, tokenizer, folder


@pytest.fixture(scope="session")
def smollm2_x86(smollm2_export):
    """:func:`smollm2_export` compiled for this machine's x86 target into ``folder / "model.so"``; its manifest."""
    from pbs2pc.compiler.build import compile_model

    folder = smollm2_export[2]
    return compile_model(folder / "model.onnx", folder / "model.so", X86)
