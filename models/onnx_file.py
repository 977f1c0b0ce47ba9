"""Reading ONNX files with one clear error for every way a file can be wrong."""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from pbs2pc.errors import FormatError, Pbs2pcError


def load_onnx(path: str | os.PathLike, load_external_data: bool = True) -> onnx.ModelProto:
    """Load an ONNX file (and its external data) or raise one clear :class:`Pbs2pcError`."""
    path = Path(path)
    if not path.exists():
        raise Pbs2pcError(f"{path} does not exist; give the path of an .onnx file (pbs2pc export writes one).")
    if path.is_dir():
        raise Pbs2pcError(f"{path} is a folder; give the path of an .onnx file inside it.")
    try:
        model = onnx.load(str(path), load_external_data=load_external_data)
    except Exception as exc:  # protobuf raises DecodeError; missing or short external data OSError/ValueError
        raise FormatError(f"{path} is not a readable ONNX file ({type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0][:120] if str(exc).strip() else 'no detail'}); "
                          "re-export it.") from None
    if not model.graph.node:
        raise FormatError(f"{path} holds no ONNX graph (is it an ONNX file?); re-export it with pbs2pc export.")
    return model
