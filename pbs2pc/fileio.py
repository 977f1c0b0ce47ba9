"""Atomic output: write to a temporary name beside the target, rename when complete.

A failed or interrupted command must never leave a half-written artifact under the name the user asked
for, so every writer in pbs2pc goes through :func:`atomic_outputs`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Sequence


@contextlib.contextmanager
def atomic_outputs(paths: Sequence[str | os.PathLike]) -> Iterator[list[Path]]:
    """Yield temporary paths for ``paths``; rename them into place only if the block succeeds.

    The temporaries live in the same folder as their targets (so the rename is atomic on one file
    system). On any exception every temporary is removed and the targets are left untouched.
    """
    finals = [Path(p) for p in paths]
    temps: list[Path] = []
    try:
        for final in finals:
            final.parent.mkdir(parents=True, exist_ok=True)
            # Keep the suffix: some writers (TVM's export_library) choose the format from it.
            fd, tmp = tempfile.mkstemp(prefix=f".{final.stem}.tmp-", suffix=final.suffix, dir=final.parent)
            os.close(fd)
            os.unlink(tmp)  # writers create the file (or folder) themselves
            temps.append(Path(tmp))
        yield temps
        for tmp, final in zip(temps, finals):
            if not tmp.exists():
                raise RuntimeError(f"internal error: {final.name} was not written")
        for tmp, final in zip(temps, finals):
            if final.is_dir() and not final.is_symlink():
                shutil.rmtree(final)
            os.replace(tmp, final)
    finally:
        for tmp in temps:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            elif tmp.exists():
                tmp.unlink()
