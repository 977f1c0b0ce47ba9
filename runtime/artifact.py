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
MANIFEST_VERSION = 3


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


def check_host(manifest: dict, library: str | os.PathLike) -> None:
    """Refuse, with one sentence, a library whose code this machine cannot execute: another architecture,
    or CPU features (``manifest["cpu_features"]``) this CPU lacks. Runs before any kernel does, so a
    mismatch is an error message instead of an illegal-instruction crash."""
    from pbs2pc import cpu

    name = Path(library).name
    target = manifest.get("target", "?")
    machine = manifest.get("machine")
    here = cpu.architecture()
    if machine and machine != here:
        raise Pbs2pcError(f"{name} was built for {machine} (target {target}) and this machine is {here}; "
                          "run it there, or compile the ONNX file again here with --target x86.")
    lacking = cpu.missing(manifest.get("cpu_features", []))
    if lacking:
        raise Pbs2pcError(f"{name} was built for target {target}, which needs the CPU features "
                          f"{', '.join(lacking)} that this CPU ({cpu.model_name()}) lacks; compile the ONNX file "
                          f"again with {_fallback_target_hint()}.")


def _fallback_target_hint() -> str:
    """The ``--target`` that suits this machine, as a phrase."""
    from pbs2pc import cpu

    best = cpu.best_x86_target()
    if best:
        return f"--target {best} (or --target x86 on this machine)"
    return "a target this CPU supports (pbs2pc compile --help lists them)"
