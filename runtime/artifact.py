"""The compiled artifact on disk: library, weights file and manifest.

``pbs2pc compile model.onnx -o model.so`` writes three files side by side:

- ``model.so``: the TVM Relax VM executable and its kernels (no weights inside);
- ``model.weights.bin``: every parameter of ``main`` in the target layout, each 64-byte aligned, in the
  order ``main`` takes them (packed bit planes stay packed: a compressed weight never exists as floats);
- ``model.manifest.json``: what is where (name, dtype, shape, offset of each parameter), the inputs and
  outputs, the scheme and honest bits per weight, the target preset, and the versions that built it.

Readers need numpy and this file only (no TVM, no compiler), so ``pbs2pc inspect`` and a board's runner
can read an artifact anywhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from pbs2pc.errors import Pbs2pcError

ALIGN = 64
MANIFEST_VERSION = 2


def artifact_paths(library: str | os.PathLike) -> tuple[Path, Path, Path]:
    """``(library, weights, manifest)`` paths of the artifact whose library is ``library``."""
    lib = Path(library)
    stem = lib.with_suffix("")
    return lib, stem.with_name(stem.name + ".weights.bin"), stem.with_name(stem.name + ".manifest.json")


def write_weights(path: str | os.PathLike, params: dict[str, np.ndarray]) -> list[dict]:
    """Write ``params`` (in order) to one file; return their manifest entries."""
    entries, offset = [], 0
    with open(path, "wb") as f:
        for name, array in params.items():
            array = np.ascontiguousarray(array)
            pad = -offset % ALIGN
            f.write(b"\0" * pad)
            offset += pad
            f.write(array.tobytes())
            entries.append({"name": name, "dtype": str(array.dtype), "shape": list(array.shape),
                            "offset": offset, "nbytes": int(array.nbytes)})
            offset += array.nbytes
    return entries


def read_weights(path: str | os.PathLike, entries: list[dict]) -> list[np.ndarray]:
    """Memory-map the parameters listed in ``entries`` (zero-copy, read-only)."""
    path = Path(path)
    size = path.stat().st_size
    need = max((e["offset"] + e["nbytes"] for e in entries), default=0)
    if size < need:
        raise Pbs2pcError(f"{path} is truncated ({size} of {need} bytes); compile the model again.")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    return [data[e["offset"]: e["offset"] + e["nbytes"]].view(np.dtype(e["dtype"])).reshape(e["shape"]) for e in entries]


def read_manifest(library: str | os.PathLike) -> dict:
    """The manifest of an artifact, given its library path (or the manifest's own path)."""
    path = Path(library)
    manifest_path = path if path.name.endswith(".manifest.json") else artifact_paths(path)[2]
    if not manifest_path.exists():
        if not path.exists():
            raise Pbs2pcError(f"{path} does not exist; compile a model first (pbs2pc compile model.onnx -o {path.name}).")
        raise Pbs2pcError(f"{manifest_path.name} is missing beside {path.name}; an artifact needs its library, "
                          "weights and manifest together (compile again).")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise Pbs2pcError(f"{manifest_path} is not a valid manifest; compile the model again.") from None
    if manifest.get("manifest_version") != MANIFEST_VERSION:
        raise Pbs2pcError(f"{manifest_path} has manifest version {manifest.get('manifest_version')}, this pbs2pc "
                          f"reads {MANIFEST_VERSION}; compile the model again.")
    return manifest
