"""The native runner: a small C++ program (``runner.cc``) that runs TVM-compiled code with TVM's C++ runtime
alone, no Python, so an ARM board needs just it, ``libtvm_runtime.so`` and ``libtvm_ffi.so``.

It has three modes: ``func`` calls one PrimFunc on ``.npy`` files (kernel tests of foreign targets use it
through :func:`run_function`, under qemu on x86), ``generate`` runs a bundle's language model
(:mod:`pbs2pc.runtime.bundle`), and ``rpc`` is a TVM RPC server that registers with TVM's tracker
(``rpc_server.cc``), so ``pbs2pc tune --rpc-tracker`` reaches a board that has no Python.
:func:`build_runner` compiles it for a machine (cached per source, compiler and flags).

>>> from pbs2pc.runtime.native import run_function
>>> out, = run_function("vadd_aarch64.so", "vadd", [a, b], [np.full(16, np.nan, np.float32)])   # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from pbs2pc.errors import Pbs2pcError, ToolchainError
from pbs2pc.runtime.native.toolchain import (
    TVM_REQUIREMENTS,
    compiler_for,
    host_machine,
    native_runtime,
    runner_prefix,
)

SOURCE = Path(__file__).with_name("runner.cc")
#: Every file the runner is built from (the sources compiled, the header they share): its cache key.
SOURCES = (SOURCE, SOURCE.with_name("rpc_server.cc"))
FILES = (*SOURCES, SOURCE.with_name("rpc_server.h"))
#: Flags every runner build gets. -fno-tree-vectorize: GCC 12's aarch64 vectorizer crashes (internal
#: compiler error in vect_transform_reduction) on reduction loops like the sampler's; the runner's own
#: loops are not where time goes (the kernels are).
BASE_FLAGS = ("-std=c++17", "-O2", "-fno-tree-vectorize")
ELF_MACHINES = {183: "aarch64", 62: "x86_64"}


def build_runner(machine: str, flags: Sequence[str] = (), output: str | os.PathLike | None = None,
                 compiler: str | None = None) -> Path:
    """Compile the runner for ``machine`` (``"aarch64"``, or this machine's); returns its path.

    ``flags`` go to the compiler (a preset's ``cross_flags``, e.g. ``-mcpu=cortex-a76``). Without
    ``output`` the runner is cached under ``$PBS2PC_CACHE/MACHINE/`` beside copies of the runtime
    libraries it loads (its run path is ``$ORIGIN``); with ``output``, copy those libraries beside it.
    """
    runtime = native_runtime(machine)
    compiler = compiler or compiler_for(machine)
    command_tail = [*BASE_FLAGS, *flags, "-I", str(runtime.include_dir), "-L", str(runtime.lib_dir),
                    "-ltvm_runtime", "-ltvm_ffi", "-Wl,-rpath,$ORIGIN"]
    if output is None:
        key = hashlib.sha256("\0".join([*(f.read_text() for f in FILES), compiler, *command_tail,
                                         *TVM_REQUIREMENTS]).encode())
        folder = runtime.lib_dir.parent / f"runner-{key.hexdigest()[:16]}"
        output = folder / "runner"
        if output.exists():
            return output
        for library in runtime.libraries:
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy2(library, folder / library.name)
    output = Path(output)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    command = [*shlex.split(compiler), *map(str, SOURCES), *command_tail, "-o", str(tmp)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        errors = [line for line in result.stderr.splitlines() if "error" in line] or result.stderr.splitlines()
        raise ToolchainError(f"building the runner failed ({(errors or ['no output'])[0].strip()}); "
                             f"reproduce with: {shlex.join(command)}")
    os.replace(tmp, output)
    return output


def library_machine(path: str | os.PathLike) -> str:
    """The architecture a shared library was built for, from its ELF header."""
    header = Path(path).read_bytes()[:20]
    if header[:4] != b"\x7fELF":
        raise Pbs2pcError(f"{path} is not a shared library (ELF file).")
    code = int.from_bytes(header[18:20], "little")
    if code not in ELF_MACHINES:
        raise Pbs2pcError(f"{path} is built for an architecture pbs2pc cannot run (ELF machine {code}).")
    return ELF_MACHINES[code]


def run_function(library_path: str | os.PathLike, name: str, inputs: Sequence[np.ndarray],
                 outputs: Sequence[np.ndarray], threads: int | None = None, timeout: float = 600) -> list[np.ndarray]:
    """Call the function ``name`` of a compiled library with the native runner; returns the outputs.

    The library is any ``export_library`` result holding PrimFuncs, for aarch64 (run under qemu on other
    machines, or with ``PBS2PC_RUNNER_PREFIX``) or this machine. ``outputs`` give the shapes and dtypes of
    the output buffers and their initial contents: fill them with a poison value (NaN) so that elements
    the function never writes show. ``threads`` sizes TVM's thread pool (``T.parallel`` loops); default:
    ``TVM_NUM_THREADS`` or TVM's own choice.

    Example
    -------
    >>> c, = run_function("vadd.so", "vadd", [a, b], [np.full_like(a, np.nan)])    # doctest: +SKIP
    """
    library = Path(library_path)
    if not library.exists():
        raise Pbs2pcError(f"{library} does not exist.")
    machine = library_machine(library)
    prefix = runner_prefix(machine)
    runner = build_runner(machine)
    with tempfile.TemporaryDirectory(prefix="pbs2pc-run-") as tmp:
        paths = []
        for kind, arrays in (("in", inputs), ("out", outputs)):
            for i, array in enumerate(arrays):
                paths.append(Path(tmp) / f"{kind}{i}.npy")
                np.save(paths[-1], np.ascontiguousarray(array))
        command = [*prefix, str(runner), "func", str(library.resolve()), name,
                   *map(str, paths[: len(inputs)]), "--", *map(str, paths[len(inputs):])]
        if threads is not None:
            command += ["--threads", str(threads)]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ToolchainError(f"the runner took more than {timeout:.0f} s: {shlex.join(command)}") from None
        if result.returncode != 0:
            why = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
            raise ToolchainError(f"running {name} of {library.name} failed ({why}); reproduce with: "
                                 f"{shlex.join(command)} (the .npy files are deleted: save your own)")
        return [np.load(path) for path in paths[len(inputs):]]


__all__ = ["build_runner", "host_machine", "library_machine", "native_runtime", "run_function", "runner_prefix"]
