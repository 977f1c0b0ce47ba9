"""The CUDA family's export step: a library whose device code is compiled machine code (a fatbin).

TVM 0.27 builds a CUDA module that holds CUDA C *source* and, by default, exports it as such: the runtime
compiles it when the library is loaded, through a Python callback (``tvm_callback_cuda_compile``, NVRTC or
nvcc), so the target would need Python and a CUDA compiler. ``tvm.backend.cuda.export_cuda_host`` (host
``cuda_host``) avoids that for lone kernels, but not for a Relax VM executable, whose host code calls TVM's
runtime. This step keeps TVM's ordinary export and changes one thing, the serialized device module:

1. ``runtime.ModulePackImportsToTensor`` gives the blob TVM would embed in the library
   (``__tvm_ffi__library_bin``: the import tree, then each module's kind and bytes; layout in tvm-ffi's
   ``library_module.cc``);
2. each ``cuda`` module's bytes are ``<fmt: str> <function table> <data: str>``; its source (fmt ``cuda``) is
   compiled with nvcc into a fatbin (SASS for the requested arch and its PTX, which a newer GPU's driver
   can translate) and written back as fmt ``fatbin``: TVM's CUDA runtime passes any format other than
   ``cuda`` to ``cuModuleLoadData``, with no compiler involved;
3. the blob is linked into the library as ``__tvm_ffi__library_bin`` (an ``.incbin`` in an assembly file:
   seconds for megabytes, where a C array would take the C compiler minutes).

:func:`library_blob` and :func:`fatbins` read a built library back (``pbs2pc inspect``, the tests), and
:func:`fatbin_archs` lists the archs a fatbin holds without any CUDA tool.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

from pbs2pc.errors import ToolchainError

#: What to install when nvcc is missing.
NVCC_INSTALL = ("install the CUDA toolkit (nvcc 12.0 or newer: https://developer.nvidia.com/cuda-downloads, or "
                "apt-get install nvidia-cuda-toolkit) and put nvcc on PATH")
#: The symbol tvm-ffi reads a library's serialized modules from.
LIBRARY_BIN = "__tvm_ffi__library_bin"


def nvcc_path() -> str | None:
    """nvcc on PATH (or ``$CUDA_HOME/bin``), or None."""
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.is_file() else None


def cuda_tool(name: str) -> str | None:
    """A CUDA binary tool (``cuobjdump``, ``nvdisasm``): on PATH, beside nvcc, or from the pip packages
    ``nvidia-cuda-cuobjdump`` / ``nvidia-cuda-nvdisasm`` (the ``cuda`` extra); None if absent."""
    import glob
    import sys

    found = shutil.which(name)
    if found:
        return found
    nvcc = nvcc_path()
    if nvcc and (Path(nvcc).parent / name).is_file():
        return str(Path(nvcc).parent / name)
    for site in sys.path:
        hits = glob.glob(os.path.join(site, "nvidia", "*", "bin", name))
        if hits:
            return hits[0]
    return None


def nvcc_version(nvcc: str | None = None) -> str:
    """``"13.0"``: nvcc's release, or one clear error without nvcc."""
    nvcc = nvcc or nvcc_path()
    if nvcc is None:
        raise ToolchainError(f"--target cuda needs nvcc to compile the GPU code; {NVCC_INSTALL}.")
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"release (\d+\.\d+)", out)
    return found.group(1) if found else "unknown"


def min_driver(cuda_version: str) -> str:
    """The oldest Linux driver that loads code from the CUDA release ``cuda_version`` (minor version
    compatibility: any driver of the same major release from its first one; NVIDIA's table)."""
    major = cuda_version.split(".")[0]
    return {"11": "450.80.02", "12": "525.60.13", "13": "580.65.06"}.get(major, "unknown")


def gencode_flags(arch: str) -> list[str]:
    """nvcc flags for SASS of ``arch`` (``sm_90``) and its PTX (``compute_90``)."""
    num = arch.removeprefix("sm_")
    return ["-gencode", f"arch=compute_{num},code=sm_{num}", "-gencode", f"arch=compute_{num},code=compute_{num}"]


def compile_fatbin(source: str, arch: str, workdir: str | os.PathLike) -> bytes:
    """nvcc ``source`` (one CUDA translation unit) into a fatbin for ``arch``; one clear error with the
    command that reproduces it on failure."""
    nvcc = nvcc_path()
    if nvcc is None:
        raise ToolchainError(f"--target cuda needs nvcc to compile the GPU code; {NVCC_INSTALL}.")
    work = Path(workdir)
    src, out = work / "device.cu", work / "device.fatbin"
    src.write_text(source)
    cmd = [nvcc, "--fatbin", "-O3", *gencode_flags(arch), "-std=c++17", "--expt-relaxed-constexpr",
           "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__", "-o", str(out), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        keep = Path(tempfile.mkdtemp(prefix="pbs2pc-nvcc-")) / "device.cu"
        keep.write_text(source)
        last = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise ToolchainError(f"nvcc failed on the generated CUDA code ({' / '.join(last)}); reproduce with: "
                             + " ".join(cmd[:-3] + ["-o", "device.fatbin", str(keep)]))
    return out.read_bytes()


# --- the library blob -------------------------------------------------------------------------------------

def _read_u64(data: bytes, pos: int) -> tuple[int, int]:
    return struct.unpack_from("<Q", data, pos)[0], pos + 8


def _read_str(data: bytes, pos: int) -> tuple[bytes, int]:
    size, pos = _read_u64(data, pos)
    return data[pos:pos + size], pos + size


def _str(value: bytes) -> bytes:
    return struct.pack("<Q", len(value)) + value


def parse_blob(blob: bytes) -> tuple[bytes, list[tuple[str, bytes | None]]]:
    """``(import tree bytes, [(kind, module bytes or None for "_lib")])`` of a library blob (with its
    leading u64 size)."""
    size, pos = _read_u64(blob, 0)
    end = 8 + size
    start = pos
    indptr_len, pos = _read_u64(blob, pos)
    pos += 8 * indptr_len
    child_len, pos = _read_u64(blob, pos)
    pos += 8 * child_len
    tree = blob[start:pos]
    modules = []
    for _ in range(indptr_len - 1):
        kind, pos = _read_str(blob, pos)
        if kind == b"_lib":
            modules.append(("_lib", None))
        else:
            data, pos = _read_str(blob, pos)
            modules.append((kind.decode(), data))
    if pos != end:
        raise ValueError(f"library blob: read {pos} of {end} bytes")
    return tree, modules


def build_blob(tree: bytes, modules: list[tuple[str, bytes | None]]) -> bytes:
    body = tree + b"".join(_str(kind.encode()) + (b"" if data is None else _str(data)) for kind, data in modules)
    return struct.pack("<Q", len(body)) + body


def split_cuda_module(data: bytes) -> tuple[str, bytes, bytes]:
    """``(fmt, function table bytes, payload)`` of a serialized ``cuda`` module: ``<fmt> <table> <data>``,
    the payload last (the CUDA source for fmt ``cuda``, else the binary)."""
    fmt, pos = _read_str(data, 0)
    # The payload is the last string: find the u64 length that ends exactly at the end of the bytes.
    for start in range(pos, len(data) - 7):
        size = struct.unpack_from("<Q", data, start)[0]
        if start + 8 + size == len(data):
            return fmt.decode(), data[pos:start], data[start + 8:]
    raise ValueError("cuda module bytes: no payload found")


def with_fatbins(blob: bytes, arch: str, workdir) -> tuple[bytes, list[dict]]:
    """The blob with every CUDA-source module compiled to a fatbin; returns it and one record per module
    (``{"kernels": n, "fatbin_bytes": ...}``)."""
    tree, modules = parse_blob(blob)
    out, records = [], []
    for kind, data in modules:
        if kind == "cuda":
            fmt, table, payload = split_cuda_module(data)
            if fmt == "cuda":
                fatbin = compile_fatbin(payload.decode(), arch, workdir)
                data = _str(b"fatbin") + table + _str(fatbin)
                records.append({"kernels": payload.count(b'extern "C" __global__'), "fatbin_bytes": len(fatbin)})
        out.append((kind, data))
    return build_blob(tree, out), records


def _incbin_asm(blob_path: Path) -> str:
    return (f'\t.section .rodata.{LIBRARY_BIN},"a"\n\t.globl {LIBRARY_BIN}\n\t.type {LIBRARY_BIN}, @object\n'
            f"\t.balign 16\n{LIBRARY_BIN}:\n\t.incbin \"{blob_path}\"\n"
            f"\t.size {LIBRARY_BIN}, {blob_path.stat().st_size}\n"
            '\t.section .note.GNU-stack,"",@progbits\n')


def export_library(executable, path: str | os.PathLike, arch: str) -> list[dict]:
    """Write ``executable`` (a ``tvm.compile`` result for a CUDA target: a Relax executable, or the runtime
    module of a TIR build) to ``path`` with its device code as a fatbin for ``arch``; returns
    :func:`with_fatbins`'s records."""
    import tvm_ffi

    records: list[dict] = []

    def pack_imports(module, is_system_lib, prefix, workspace):
        if is_system_lib or prefix:
            raise ToolchainError("CUDA libraries are shared libraries; a system library is not supported.")
        raw = tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")(module)
        blob, found = with_fatbins(bytes(raw.numpy().tobytes()), arch, workspace)
        records.extend(found)
        blob_path = Path(workspace) / "library_bin.bin"
        blob_path.write_bytes(blob)
        asm = Path(workspace) / "library_bin.S"
        asm.write_text(_incbin_asm(blob_path))
        return str(asm)

    getattr(executable, "mod", executable).export_library(str(path), fpack_imports=pack_imports)
    return records


# --- reading a built library back -------------------------------------------------------------------------

def _elf_symbol(data: bytes, name: str) -> tuple[int, int] | None:
    """``(file offset, size)`` of the defined symbol ``name`` in an ELF64 little-endian file."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    for _name, sh_type, _flags, _addr, offset, size, link, _info, _align, entsize in sections:
        if sh_type not in (2, 11):  # SHT_SYMTAB, SHT_DYNSYM
            continue
        strtab = sections[link]
        for pos in range(offset, offset + size, entsize or 24):
            st_name, _st_info, _other, shndx, value, st_size = struct.unpack_from("<IBBHQQ", data, pos)
            start = strtab[4] + st_name
            if data[start:data.index(b"\0", start)] == name.encode() and 0 < shndx < shnum:
                sec = sections[shndx]
                return value - sec[3] + sec[4], st_size
    return None


def library_blob(path: str | os.PathLike) -> bytes | None:
    """The serialized modules embedded in a library (``__tvm_ffi__library_bin``), or None."""
    data = Path(path).read_bytes()
    found = _elf_symbol(data, LIBRARY_BIN)
    if found is None:
        return None
    offset, _size = found
    size, _ = _read_u64(data, offset)
    return data[offset:offset + 8 + size]


def device_modules(path: str | os.PathLike) -> list[tuple[str, bytes]]:
    """``[(fmt, payload)]`` of every CUDA module in a library (fmt ``fatbin``, or ``cuda`` for source)."""
    blob = library_blob(path)
    if blob is None:
        return []
    _tree, modules = parse_blob(blob)
    out = []
    for kind, data in modules:
        if kind == "cuda":
            fmt, _table, payload = split_cuda_module(data)
            out.append((fmt, payload))
    return out


def fatbins(path: str | os.PathLike) -> list[bytes]:
    """The fatbins embedded in a library."""
    return [payload for fmt, payload in device_modules(path) if fmt == "fatbin"]


FATBIN_MAGIC = 0xBA55ED50


def fatbin_archs(fatbin: bytes) -> list[str]:
    """The entries of a fatbin as ``"sm_90"`` (SASS) and ``"compute_90"`` (PTX), in order: the fatbin
    container is a 16-byte header then entries ``<kind u16> <version u16> <header size u32> <padded payload
    size u64> ... <sm version u32 at 28>`` (kind 1: PTX, 2: ELF cubin)."""
    magic, _version, header_size, total = struct.unpack_from("<IHHQ", fatbin, 0)
    if magic != FATBIN_MAGIC:
        raise ValueError("not a fatbin")
    out, pos, end = [], header_size, header_size + total
    while pos < end:
        kind, _ver, entry_header, payload = struct.unpack_from("<HHIQ", fatbin, pos)
        sm = struct.unpack_from("<I", fatbin, pos + 28)[0]
        out.append(f"{'compute' if kind == 1 else 'sm'}_{sm}")
        pos += entry_header + payload
    return out
