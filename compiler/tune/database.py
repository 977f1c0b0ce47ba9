"""The tuning database: a folder with ``target.json`` (what it was tuned for) and ``records.jsonl``.

``records.jsonl`` has one JSON object per measurement, appended, flushed and fsynced as soon as the
measurement returns, so a tune that is killed loses at most the candidate it was measuring::

    {"key": "x86_avx512.gemv_v2_fp32:576x576/g64+mask+mu+groups+residual+codes",
     "knobs": {"parallel": true, "tiles": 1}, "default": true, "us": 21.4, "runs_us": [...], "error": null}

A failed build (``"error": "build: ..."``) is final; a failed run (``"run: ..."``: a board that went
away, a timeout) is tried again by the next ``pbs2pc tune`` into the same folder. A line cut short by a
kill is dropped when the folder is opened again. ``target.json`` holds the identity the records are
valid for: the preset name, a hash of its canonical TVM target JSON (which includes the cores the
parallel loops are sized for), the CPU features its code executes, the TVM version and the pbs2pc
version whose kernels were tuned; :func:`open_database` refuses a folder made for another.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from pbs2pc.errors import Pbs2pcError

TARGET_FILE = "target.json"
RECORDS_FILE = "records.jsonl"
#: The identity fields a database must match to be used (see the module docstring).
IDENTITY_FIELDS = ("preset", "target_hash", "cpu_features", "tvm_version", "pbs2pc_version")


def identity(preset) -> dict:
    """What a database for ``preset`` must have been tuned for."""
    import pbs2pc
    from pbs2pc.compiler.tvm_compat import TVM_VERSION

    return {"preset": preset.name, "target_hash": hashlib.sha256(preset.target_json.encode()).hexdigest()[:16],
            "cpu_features": list(preset.features), "tvm_version": TVM_VERSION, "pbs2pc_version": pbs2pc.__version__}


def _describe(ident: dict) -> str:
    return (f"{ident.get('preset')} (target {ident.get('target_hash')}, TVM {ident.get('tvm_version')}, "
            f"pbs2pc {ident.get('pbs2pc_version')})")


class Database:
    """An open tuning database folder (see the module docstring)."""

    def __init__(self, folder: Path, ident: dict):
        self.folder = folder
        self.identity = ident
        self.records = list(read_records(folder / RECORDS_FILE))

    @property
    def path(self) -> Path:
        return self.folder / RECORDS_FILE

    def append(self, record: dict) -> None:
        """Write ``record`` as one line, flushed to disk before returning."""
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records.append(record)

    def finished(self, key: str) -> dict:
        """``{knob id: record}`` of the settings of ``key`` that need no new measurement: measured, or
        failed to build."""
        from pbs2pc.compiler.tune.kernels import knob_id

        return {knob_id(r["knobs"]): r for r in self.records
                if r["key"] == key and (r.get("us") is not None or str(r.get("error", "")).startswith("build"))}

    def best(self) -> dict:
        """``{key: record}``: the fastest measured setting of every key."""
        out = {}
        for r in self.records:
            if r.get("us") is not None and (r["key"] not in out or r["us"] < out[r["key"]]["us"]):
                out[r["key"]] = r
        return out

    def default(self, key: str) -> dict | None:
        return next((r for r in self.records if r["key"] == key and r.get("default") and r.get("us") is not None),
                    None)


def read_records(path: Path):
    """The records of ``path``; a last line cut short by a kill is dropped (and cut from the file, so the
    next append starts a line of its own)."""
    if not path.exists():
        return
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    for number, line in enumerate(data[:end].decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise Pbs2pcError(f"{path}: line {number} is not a tuning record; the database is damaged, "
                              "tune into a new folder.") from None
        if isinstance(record, dict) and "key" in record and "knobs" in record:
            yield record


def open_database(folder, preset, create: bool = False) -> Database:
    """The database in ``folder`` for ``preset``, or one clear error if it was made for another target (or,
    without ``create``, if there is none); ``create`` makes a new one where the folder has none."""
    folder = Path(folder)
    target_file = folder / TARGET_FILE
    ident = identity(preset)
    if not target_file.exists():
        if not create:
            what = "has no tuning database" if folder.is_dir() else "does not exist"
            raise Pbs2pcError(f"{folder} {what}; make one with: pbs2pc tune MODEL.onnx --target {preset.name} "
                              f"-o {folder}")
        if folder.exists() and not folder.is_dir():
            raise Pbs2pcError(f"{folder} is a file; give a folder for the tuning database.")
        folder.mkdir(parents=True, exist_ok=True)
        tmp = target_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(ident, indent=1) + "\n")
        os.replace(tmp, target_file)
        return Database(folder, ident)
    try:
        stored = json.loads(target_file.read_text())
    except (OSError, json.JSONDecodeError):
        raise Pbs2pcError(f"{target_file} is not a tuning database header; tune into a new folder.") from None
    differs = [f for f in IDENTITY_FIELDS if stored.get(f) != ident[f]]
    if differs:
        raise Pbs2pcError(f"the tuning database {folder} was made for {_describe(stored)}, not for "
                          f"{_describe(ident)} ({', '.join(differs)} differ); tune for this target into another folder.")
    return Database(folder, stored)
