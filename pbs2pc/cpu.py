"""The host CPU: its architecture, model name and instruction-set features (no TVM import).

Features come from ``archspec`` (the library Spack and pip's own tags use), spelled as Linux's
``/proc/cpuinfo`` spells them (``avx2``, ``fma``, ``f16c``, ``avx512f``, ``avx512_vnni``, ``avx512vbmi``, ...).
The compiler uses them to resolve ``--target x86`` to this machine's best x86 target; the runtime uses
them to refuse, with one sentence, a library built for features this CPU lacks (instead of dying with
SIGILL inside the first kernel).

``PBS2PC_CPU_FEATURES`` (a comma-separated list) replaces the detected features: a way to ask "what would
an AVX2-only machine do" on any host, used by the tests.
"""

from __future__ import annotations

import functools
import os
import platform

#: Environment variable that overrides the detected feature set (comma-separated names).
FEATURES_ENV = "PBS2PC_CPU_FEATURES"

#: x86-64-v3 as /proc/cpuinfo names it (LZCNT is "abm"): what every pbs2pc x86 target's code may execute.
X86_V3_FEATURES = ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe", "abm")
#: The x86 targets' feature sets, best first (``pbs2pc.compiler.targets`` builds its presets from them).
X86_TARGET_FEATURES = {
    "x86-avx512": X86_V3_FEATURES + ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl",
                                     "avx512_vnni", "avx512vbmi", "avx512_vpopcntdq"),
    "x86-avx2": X86_V3_FEATURES,
}


@functools.lru_cache(maxsize=1)
def _detected() -> tuple[str, str, frozenset[str]]:
    """``(architecture, model name, features)`` as archspec sees this machine."""
    import archspec.cpu

    host = archspec.cpu.host()
    features = set(host.features)
    try:  # the raw flags: a superset of the named microarchitecture's features
        from archspec.cpu import detect

        features |= set(detect.detected_info().features)
    except Exception:  # noqa: BLE001 - an archspec without it: the microarchitecture's list is still right
        pass
    try:
        from archspec.cpu import detect

        brand = detect.brand_string() or host.name
    except Exception:  # noqa: BLE001
        brand = host.name
    return str(host.family), f"{brand} ({host.name})", frozenset(features)


def architecture() -> str:
    """``x86_64``, ``aarch64``, ... (the machine's architecture family)."""
    try:
        return _detected()[0]
    except Exception:  # noqa: BLE001 - archspec could not read the CPU: fall back to Python's view
        return platform.machine()


def model_name() -> str:
    """The CPU's name as a person would recognise it, e.g. ``AMD EPYC (zen2)``."""
    try:
        return _detected()[1]
    except Exception:  # noqa: BLE001
        return platform.processor() or platform.machine()


def features() -> frozenset[str]:
    """The host CPU's instruction-set features (``PBS2PC_CPU_FEATURES`` overrides them)."""
    override = os.environ.get(FEATURES_ENV)
    if override is not None:
        return frozenset(f.strip() for f in override.split(",") if f.strip())
    try:
        return _detected()[2]
    except Exception:  # noqa: BLE001
        return frozenset()


def cpu_threads() -> int:
    """CPUs this process may run on (its affinity mask, which a container's cpuset also limits)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def best_x86_target() -> str | None:
    """The best pbs2pc x86 target this CPU runs (``x86-avx512``, ``x86-avx2``), None if none."""
    if architecture() != "x86_64":
        return None
    return next((name for name, need in X86_TARGET_FEATURES.items() if not missing(need)), None)


def missing(required) -> list[str]:
    """The features of ``required`` this CPU lacks, in the order given."""
    have = features()
    return [f for f in required if f not in have]
