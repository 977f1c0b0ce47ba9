"""What a native runner is built from, per machine: the TVM runtime libraries, the tvm-ffi headers and a C++
compiler; and the ``tokenizers`` wheel a bundle carries for its Python front.

For this machine they come from the installed ``apache-tvm`` and ``apache-tvm-ffi`` packages. For aarch64 on
another machine they come from the aarch64 wheels of the same pinned versions on PyPI, downloaded once with
pip into ``$PBS2PC_CACHE/aarch64`` (default ``~/.cache/pbs2pc/aarch64``) and unpacked there (only
``libtvm_runtime.so``, ``libtvm_ffi.so`` and the headers are kept: 5 MB of the 98 MB of wheels).
Nothing here imports TVM.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from pbs2pc.errors import ToolchainError

#: The TVM runtime the compiler is pinned to (pyproject.toml); a library needs the runtime it was built with.
TVM_REQUIREMENTS = ("apache-tvm==0.27.0.post1", "apache-tvm-ffi==0.1.14.post1")
#: Wheels for Python 3.9+ (abi3); the newest release that still supports 3.9.
TOKENIZERS_REQUIREMENT = "tokenizers==0.22.2"
#: manylinux tag of each machine's wheels: TVM's need glibc 2.28 (so does the board), tokenizers' 2.17.
TVM_PLATFORM = {"aarch64": "manylinux_2_28_aarch64", "x86_64": "manylinux_2_28_x86_64"}
TOKENIZERS_PLATFORM = {"aarch64": "manylinux2014_aarch64", "x86_64": "manylinux2014_x86_64"}
#: The C++ cross compiler for a machine that is not this one, and its system root for qemu.
CROSS_COMPILERS = {"aarch64": "aarch64-linux-gnu-g++"}
QEMU = {"aarch64": ("qemu-aarch64", "/usr/aarch64-linux-gnu")}
#: ``PBS2PC_RUNNER_PREFIX``: a command that runs a foreign runner (``qemu-aarch64 -L /usr/aarch64-linux-gnu``).
PREFIX_ENV = "PBS2PC_RUNNER_PREFIX"
RUNTIME_LIBRARIES = ("libtvm_runtime.so", "libtvm_ffi.so")


def host_machine() -> str:
    """This machine's architecture as Linux names it (``x86_64``, ``aarch64``)."""
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def cache_root() -> Path:
    """pbs2pc's download cache (``PBS2PC_CACHE``, default ``~/.cache/pbs2pc``)."""
    return Path(os.environ.get("PBS2PC_CACHE", Path.home() / ".cache" / "pbs2pc"))


@dataclasses.dataclass(frozen=True)
class NativeRuntime:
    """The TVM runtime for one machine: ``libtvm_runtime.so`` and ``libtvm_ffi.so`` in ``lib_dir``, and the
    tvm-ffi (and dlpack) headers in ``include_dir``."""

    machine: str
    lib_dir: Path
    include_dir: Path

    @property
    def libraries(self) -> list[Path]:
        return [self.lib_dir / name for name in RUNTIME_LIBRARIES]


def native_runtime(machine: str) -> NativeRuntime:
    """The TVM runtime files for ``machine`` (``aarch64`` is downloaded once if this machine is another)."""
    if machine == host_machine():
        return _installed_runtime(machine)
    if machine not in TVM_PLATFORM:
        raise ToolchainError(f"pbs2pc cannot build a native runner for {machine}; use aarch64 or this machine.")
    folder = cache_root() / machine / f"tvm-{_version(TVM_REQUIREMENTS[0])}-ffi-{_version(TVM_REQUIREMENTS[1])}"
    if not all((folder / "lib" / name).exists() for name in RUNTIME_LIBRARIES):
        _unpack_tvm_wheels(machine, folder)
    return NativeRuntime(machine, folder / "lib", folder / "include")


def tokenizers_package(machine: str) -> Path:
    """A folder holding the ``tokenizers`` package built for ``machine`` (put it on ``PYTHONPATH``)."""
    folder = cache_root() / machine / f"tokenizers-{_version(TOKENIZERS_REQUIREMENT)}"
    if not (folder / "tokenizers" / "__init__.py").exists():
        with tempfile.TemporaryDirectory(dir=_mkdir(folder.parent)) as tmp:
            wheel = _download([TOKENIZERS_REQUIREMENT], machine, TOKENIZERS_PLATFORM[machine], "3.9", Path(tmp),
                              abi="abi3")[0]
            unpacked = Path(tmp) / "unpacked"
            with zipfile.ZipFile(wheel) as z:
                z.extractall(unpacked, [n for n in z.namelist() if n.startswith("tokenizers/")])
            _replace(unpacked, folder)
    return folder


def compiler_for(machine: str) -> str:
    """The C++ compiler that builds programs for ``machine`` here (``CXX`` or g++ for this machine)."""
    compiler = os.environ.get("CXX", "g++") if machine == host_machine() else CROSS_COMPILERS.get(machine)
    if compiler is None:
        raise ToolchainError(f"pbs2pc has no C++ compiler for {machine}; build on that machine or for aarch64.")
    if shutil.which(shlex.split(compiler)[0]) is None:
        install = ("apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu" if machine == "aarch64"
                   and machine != host_machine() else "apt-get install g++")
        raise ToolchainError(f"the C++ compiler {compiler} for {machine} is not installed; run: {install}")
    return compiler


def runner_prefix(machine: str) -> list[str]:
    """The command that runs a ``machine`` program here: ``PBS2PC_RUNNER_PREFIX`` if set, nothing on
    ``machine`` itself, else qemu user-mode emulation."""
    if os.environ.get(PREFIX_ENV):
        return shlex.split(os.environ[PREFIX_ENV])
    if machine == host_machine():
        return []
    if machine not in QEMU:
        raise ToolchainError(f"programs for {machine} cannot run on this {host_machine()} machine.")
    qemu, sysroot = QEMU[machine]
    if shutil.which(qemu) is None:
        raise ToolchainError(f"{qemu} is needed to run {machine} programs on this {host_machine()} machine; "
                             "run: apt-get install qemu-user")
    return [qemu, "-L", sysroot]


def _installed_runtime(machine: str) -> NativeRuntime:
    tvm, ffi = (importlib.util.find_spec(name) for name in ("tvm", "tvm_ffi"))  # no import: no TVM start-up
    if tvm is None or ffi is None:
        raise ToolchainError(f"the TVM runtime is not installed; run: pip install {' '.join(TVM_REQUIREMENTS)}")
    tvm_lib = Path(tvm.submodule_search_locations[0]) / "lib"
    ffi_root = Path(ffi.submodule_search_locations[0])
    folder = cache_root() / machine / "host-runtime"  # the two libraries side by side, for -L and copying
    for source in (tvm_lib / RUNTIME_LIBRARIES[0], ffi_root / "lib" / RUNTIME_LIBRARIES[1]):
        target = folder / "lib" / source.name
        if not target.exists() or target.stat().st_mtime < source.stat().st_mtime:
            _mkdir(target.parent)
            shutil.copy2(source, target)
    return NativeRuntime(machine, folder / "lib", ffi_root / "include")


def _unpack_tvm_wheels(machine: str, folder: Path) -> None:
    with tempfile.TemporaryDirectory(dir=_mkdir(folder.parent)) as tmp:
        wheels = _download(list(TVM_REQUIREMENTS), machine, TVM_PLATFORM[machine], "3.11", Path(tmp))
        unpacked = Path(tmp) / "unpacked"
        _mkdir(unpacked / "lib")
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as z:
                for name in z.namelist():
                    if name in ("tvm/lib/libtvm_runtime.so", "tvm_ffi/lib/libtvm_ffi.so"):
                        (unpacked / "lib" / Path(name).name).write_bytes(z.read(name))
                    elif name.startswith("tvm_ffi/include/") and not name.endswith("/"):
                        target = unpacked / "include" / name[len("tvm_ffi/include/"):]
                        _mkdir(target.parent)
                        target.write_bytes(z.read(name))
        missing = [n for n in RUNTIME_LIBRARIES if not (unpacked / "lib" / n).exists()]
        if missing:
            raise ToolchainError(f"the {machine} TVM wheels lack {', '.join(missing)}; delete {folder.parent} "
                                 "and retry.")
        _replace(unpacked, folder)


def _download(requirements: list[str], machine: str, platform_tag: str, python: str, into: Path,
              abi: str | None = None) -> list[Path]:
    """Binary wheels of ``requirements`` for another platform: those already in the seed folder
    ``$PBS2PC_CACHE/MACHINE/wheels`` (for machines without network), else ``pip download`` into ``into``;
    one clear error if that fails."""
    seed = cache_root() / machine / "wheels"
    found = [next(iter(sorted(seed.glob(_wheel_prefix(r) + "*.whl"))), None) for r in requirements]
    if all(found):
        return found
    options = ["--no-deps", "--only-binary=:all:", "--platform", platform_tag, "--python-version", python,
               "--implementation", "cp", *(["--abi", abi] if abi else [])]
    command = [sys.executable, "-m", "pip", "download", *options, "-d", str(into), *requirements]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        result = subprocess.CompletedProcess(command, 1, "", str(exc))
    wheels = [next(iter(sorted(into.glob(_wheel_prefix(r) + "*.whl"))), None) for r in requirements]
    if result.returncode != 0 or not all(wheels):
        why = (result.stderr.strip().splitlines() or ["no output"])[-1]
        shown = shlex.join(["pip", "download", *options, "-d", str(seed), *requirements])
        raise ToolchainError(f"downloading {', '.join(requirements)} for {platform_tag} failed ({why}); pbs2pc needs "
                             "them once: check the network, or run this where there is one and copy the wheels to "
                             f"this machine: {shown}")
    return wheels


def _wheel_prefix(requirement: str) -> str:
    """The start of the file name of a wheel of ``name==version`` (``apache_tvm-0.27.0.post1-``)."""
    name, version = requirement.split("==")
    return f"{name.replace('-', '_')}-{version}-"


def _version(requirement: str) -> str:
    return requirement.split("==")[1]


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _replace(source: Path, target: Path) -> None:
    """Move a finished folder into place (another process may have done it meanwhile: keep theirs)."""
    try:
        os.replace(source, target)
    except OSError:
        if not target.exists():
            raise
