"""What the benchmarks measure about the machine: cache size, CPU model, memory bandwidth.

Shared by ``kernel_bench.py`` (floors: STREAM triad; the rotating read next to it) and ``generation.py``
(decode floors: the 2 GiB read). Everything runs torch ops on 2 threads (the benchmarks' thread count).
``machine_record()`` is what both write into their results about the CPU (model, ISA, SIMD features).
"""

from __future__ import annotations

import platform
import subprocess
import time
from pathlib import Path


def timed(fn) -> float:
    """Seconds of one call of ``fn``."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def llc_bytes() -> int:
    """Size of the last-level cache, from sysfs (what ``lscpu`` reports)."""
    best = 0
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in base.glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        scale = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1], 1)
        best = max(best, int(text.rstrip("KMG")) * scale)
    return best or 32 * 1024**2


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


#: The SIMD features that decide which kernels run (pbs2pc's x86 targets; llama.cpp's -march=native).
SIMD_FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512vbmi")


def machine_record() -> dict:
    """The CPU a result was measured on: model, architecture, the x86 target pbs2pc's ``--target x86``
    picks here, and which of ``SIMD_FEATURES`` the host has (``/proc/cpuinfo`` names)."""
    from pbs2pc import cpu

    arch = cpu.architecture()
    model = cpu.model_name()
    if not model or model == arch:  # archspec could not name it: lscpu's name is better than "x86_64"
        model = cpu_model()
    try:
        from pbs2pc.compiler.targets import host_x86_preset

        isa = host_x86_preset().name if arch == "x86_64" else None
    except Exception:  # noqa: BLE001 - no pbs2pc x86 target runs here: say so, not fail the benchmark
        isa = None
    have = cpu.features()
    return {"cpu": model, "arch": arch, "x86_isa": isa, "simd_features": {f: f in have for f in SIMD_FEATURES}}


def stream(gib: float, repeats: int) -> dict:
    """STREAM-style copy (b = a), triad (a = b + s*c) and read (sum a) bandwidth, GB/s (1e9 bytes).

    torch ops on 2 threads over float32 arrays of ``gib`` GiB each; bytes counted the STREAM way (copy 2,
    triad 3, read 1 array per pass; write-allocate traffic not counted). Best of ``repeats``.
    """
    import torch

    n = int(gib * 2**30) // 4
    a, b, c = torch.full((n,), 1.0), torch.full((n,), 2.0), torch.full((n,), 0.5)
    out = {}
    for name, fn, arrays in (("copy", lambda: b.copy_(a), 2), ("triad", lambda: torch.add(b, c, alpha=3.0, out=a), 3),
                             ("read", lambda: a.sum(), 1)):
        fn()
        best = min(timed(fn) for _ in range(repeats))
        out[name] = round(arrays * 4 * n / best / 1e9, 2)
    del a, b, c
    out["array_gib"] = gib
    out["read_rotating"] = rotating_read(repeats)
    out["method"] = ("torch 2 threads (copy_, add(alpha)=triad, sum=read), float32; read_rotating: sum over "
                     "random 16 MiB arrays in turn, 128 MiB in all")
    return out


def rotating_read(repeats: int, mib: int = 16, count: int = 8) -> float:
    """GB/s of ``sum`` over ``count`` random ``mib``-MiB float32 arrays in turn (2 threads): a streaming read
    of buffers the size of one layer's weights, as the benchmarked kernels see them (each array is evicted
    from the 32 MiB L3 before its next use), next to the 2 GiB STREAM arrays the floors use."""
    import torch

    arrays = [torch.rand(mib * 2**20 // 4) for _ in range(count)]

    def one_pass():
        for a in arrays:
            a.sum()

    one_pass()
    best = min(timed(one_pass) for _ in range(repeats))
    return round(count * mib * 2**20 / best / 1e9, 2)


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """GB/s of ``tensor.sum()`` over a ``gib`` GiB float32 array with 2 threads (best of ``repeats``)."""
    import torch

    a = torch.full((int(gib * 2**30) // 4,), 1.0)
    a.sum()
    best = min(timed(a.sum) for _ in range(repeats))
    return round(a.numel() * 4 / best / 1e9, 1)
