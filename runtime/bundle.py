"""An edge bundle: one folder holding everything a board needs to run a compiled language model.

``pbs2pc compile model.onnx --target rpi5 --bundle out/`` (or :func:`write_bundle`) writes:

============================================  =============================================================
``model.so``, ``model.weights.bin``,          the artifact (:mod:`pbs2pc.runtime.artifact`)
``model.manifest.json``
``model.runner.txt``                          what the runner needs from the manifest, one fact a line
                                              (inputs, KV cache layout, each weight's dtype, offset, shape),
                                              so the C++ side needs no JSON parser
``runner``, ``libtvm_runtime.so``,            the native runner (``runtime/native/runner.cc``) built with
``libtvm_ffi.so``                             the target's compiler and flags; run path ``$ORIGIN``
``tokenizer.json``, ``bundle.json``,          the text front: ``generate.py`` encodes the prompt with the
``generate.py``, ``py/tokenizers/``           bundled ``tokenizers`` wheel (Python 3.9+), runs the runner
                                              and decodes the ids as they arrive
``bench_prompt_ids.txt``, ``run.sh``,         ``./run.sh --prompt "..."`` streams text; ``./run.sh --bench``
``README.md``                                 prints prompt and decode tokens/s without Python
============================================  =============================================================

Why a C++ runner: the board needs no Python TVM (a 95 MB wheel, 10 s to import), starts in a fraction of
a second and has a small footprint; the runtime it links is the pinned TVM's own. The bundle is written
atomically: a failure leaves no folder behind (an earlier bundle at the same path is replaced only when
the new one is complete).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Callable, Protocol, Sequence

from pbs2pc.errors import Pbs2pcError
from pbs2pc.fileio import atomic_outputs
from pbs2pc.runtime.artifact import artifact_paths, read_manifest
from pbs2pc.runtime.native import build_runner, native_runtime
from pbs2pc.runtime.native.toolchain import compiler_for, host_machine, tokenizers_package

NATIVE = Path(__file__).with_name("native")
SPEC_NAME = "model.runner.txt"
#: ``run.sh --bench``'s fixed prompt: this text's first BENCH_PROMPT_TOKENS tokens (or fixed ids, without a
#: tokenizer), and the new tokens it makes (README.md states both).
BENCH_PROMPT_TOKENS = 64
BENCH_TEXT = ("The river flows through the old town and past the mill, where the miller's daughter watches the "
              "boats go by. In the spring the water rises and the meadows turn green; in the autumn the fishermen "
              "mend their nets and tell stories of the great flood that came a hundred years ago.")
LM_INPUTS = ("input_ids", "attention_mask", "position_ids")
_CHAT_MARK = "\x00PBS2PC-PROMPT\x00"


class BuildTarget(Protocol):
    """What :func:`write_bundle` needs of a target preset (:class:`pbs2pc.compiler.targets.TargetPreset`)."""

    name: str
    machine: str
    cross_compiler: str | None
    cross_flags: Sequence[str]


@dataclasses.dataclass
class Bundle:
    """What :func:`write_bundle` wrote."""

    directory: Path
    files: list[str]
    size: int  # bytes, all files
    tokenizer: bool  # False: no tokenizer was found; run.sh --prompt is unavailable
    note: str = ""  # why there is no tokenizer


def write_bundle(library: str | os.PathLike, directory: str | os.PathLike, preset: BuildTarget | None = None,
                 tokenizer: str | None = "auto", progress: Callable[[str], None] | None = None) -> Bundle:
    """Write the bundle of the compiled language model ``library`` (a ``.so`` from ``pbs2pc compile``).

    Parameters
    ----------
    library : path
        The artifact's library; its weights and manifest are beside it.
    directory : path
        The bundle folder: created, or replaced if it holds an earlier bundle (any other non-empty folder
        is refused).
    preset : TargetPreset, optional
        The target the library was compiled for: the runner is built with its cross compiler and
        ``cross_flags``. Default: a portable build for the manifest's machine.
    tokenizer : str or None
        ``"auto"``: the source model's (recorded in the manifest), left out with a note if it cannot be
        found; a model spec or folder; ``None``: none (the bundle then runs token ids only).
    """
    say = progress or (lambda _msg: None)
    lib, weights, manifest_path = artifact_paths(library)
    manifest = read_manifest(lib)
    for path in (lib, weights):
        if not path.exists():
            raise Pbs2pcError(f"{path} is missing; compile the model again.")
    _check_language_model(manifest, lib)
    machine = manifest.get("machine") or host_machine()
    if preset is not None and (preset.name != manifest.get("target") or preset.machine != machine):
        raise Pbs2pcError(f"{lib.name} was compiled for target {manifest.get('target')}, not {preset.name}; "
                          "bundle it with its own target.")
    directory = Path(directory)
    check_directory(directory)
    say("tokenizer")
    tok, note = _tokenizer(manifest, tokenizer)
    with atomic_outputs([directory]) as (tmp,):
        tmp.mkdir()
        say("artifact")
        _link_or_copy(weights, tmp / "model.weights.bin")
        _link_or_copy(lib, tmp / "model.so")
        bundled = dict(manifest, library="model.so", weights="model.weights.bin")
        (tmp / "model.manifest.json").write_text(json.dumps(bundled, indent=1) + "\n")
        (tmp / SPEC_NAME).write_text(runner_spec(bundled))
        say("runner")
        cross = preset is not None and preset.cross_compiler and machine != host_machine()
        compiler = preset.cross_compiler if cross else compiler_for(machine)
        flags = tuple(preset.cross_flags) if preset is not None else ()
        build_runner(machine, flags, tmp / "runner", compiler)
        for path in native_runtime(machine).libraries:
            shutil.copy2(path, tmp / path.name)
        say("text front")
        vocab = int(manifest["vocab_size"])
        ids = tok.bench_ids if tok else [(7919 * i + 13) % vocab for i in range(BENCH_PROMPT_TOKENS)]
        (tmp / "bench_prompt_ids.txt").write_text(",".join(map(str, ids)) + "\n")
        if tok:
            (tmp / "tokenizer.json").write_text(tok.json)
            shutil.copytree(tokenizers_package(machine), tmp / "py")
        config = {"machine": machine, "model": manifest.get("source", {}).get("source_model"),
                  "target": manifest.get("target"), "tokenizer": "tokenizer.json" if tok else None,
                  "eos_token_ids": tok.eos if tok else [], "chat": tok.chat if tok else None}
        (tmp / "bundle.json").write_text(json.dumps(config, indent=1) + "\n")
        _install(NATIVE / "front.py", tmp / "generate.py")
        _install(NATIVE / "run.sh", tmp / "run.sh")
        size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        (tmp / "README.md").write_text(_readme(bundled, machine, tok, size, " ".join([compiler, *flags])))
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        size = sum((tmp / f).stat().st_size for f in files)
    return Bundle(directory, files, size, tok is not None, note)


def runner_spec(manifest: dict) -> str:
    """``model.runner.txt``: the manifest facts the runner needs, one a line (``param`` lines: dtype, offset,
    bytes, rank, dimensions, then the name, which may hold spaces)."""
    cache = manifest["kv_cache"]
    lines = ["pbs2pc-runner 1", f"library {manifest['library']}", f"weights {manifest['weights']}",
             "inputs " + " ".join(manifest["inputs"]), "functions " + " ".join(manifest["functions"]),
             f"kv_cache {cache['layers']} {cache['kv_heads']} {cache['head_dim']} {cache['capacity_multiple']}",
             f"vocab_size {manifest['vocab_size']}", f"max_sequence {manifest.get('max_sequence') or 0}",
             "cpu_features " + " ".join(manifest.get("cpu_features", []))]
    for p in manifest["params"]:
        lines.append(f"param {p['dtype']} {p['offset']} {p['nbytes']} {len(p['shape'])} "
                     f"{' '.join(map(str, p['shape']))} {p['name']}".replace("  ", " "))
    return "\n".join(lines) + "\n"


def _check_language_model(manifest: dict, lib: Path) -> None:
    kind = manifest.get("target_dict", {}).get("kind", "llvm")
    if kind != "llvm":
        raise Pbs2pcError(f"{lib.name} was compiled for {manifest.get('target')} ({kind}); a bundle runs CPU targets "
                          "(arm, rpi5, jetson-orin, x86).")
    inputs = manifest.get("inputs", [])
    if not manifest.get("kv_cache") or "input_ids" not in inputs or not set(inputs) <= set(LM_INPUTS):
        raise Pbs2pcError(f"{lib.name} is not a language model with a KV cache (it takes {', '.join(inputs)}); "
                          "a bundle runs exported causal LMs (pbs2pc export).")
    if not manifest.get("vocab_size"):
        raise Pbs2pcError(f"the manifest of {lib.name} records no vocabulary size; compile the model again.")


def check_directory(directory: Path) -> None:
    """Refuse, with one sentence, a bundle folder that is a file or holds something other than a bundle."""
    if directory.exists() and not directory.is_dir():
        raise Pbs2pcError(f"{directory} is a file; give a folder for the bundle.")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / SPEC_NAME).exists():
        raise Pbs2pcError(f"{directory} is not empty and holds no bundle; give a new or empty folder "
                          "(an earlier bundle there would be replaced).")


@dataclasses.dataclass
class _TokenizerFiles:
    json: str
    eos: list[int]
    chat: dict | None  # {"prefix", "suffix"}: the chat template rendered around one user message
    bench_ids: list[int]


def _tokenizer(manifest: dict, spec: str | None) -> tuple[_TokenizerFiles | None, str]:
    """The tokenizer's files for the front, from the source model (through transformers, at bundle time
    only), or ``None`` and why not."""
    if spec is None:
        return None, "no tokenizer was asked for"
    from pbs2pc.runtime.model import load_tokenizer

    try:
        tok = load_tokenizer(manifest, None if spec == "auto" else spec)
    except Pbs2pcError as exc:
        if spec != "auto":
            raise
        return None, str(exc)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        if spec != "auto":
            raise Pbs2pcError(f"the tokenizer of {spec} is not a fast (tokenizers) tokenizer; the bundle needs one.")
        return None, "the source model's tokenizer is not a fast (tokenizers) tokenizer"
    chat = None
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": _CHAT_MARK}], add_generation_prompt=True,
                                       tokenize=False)
        if text.count(_CHAT_MARK) == 1:
            prefix, suffix = text.split(_CHAT_MARK)
            chat = {"prefix": prefix, "suffix": suffix}
    eos = [] if tok.eos_token_id is None else [int(tok.eos_token_id)]
    bench = list(tok(BENCH_TEXT, add_special_tokens=False).input_ids)
    bench = (bench * (BENCH_PROMPT_TOKENS // max(len(bench), 1) + 1))[:BENCH_PROMPT_TOKENS]
    return _TokenizerFiles(backend.to_str(), eos, chat, bench), ""


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link where the file system allows (a new compile replaces files, never rewrites them), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _install(source: Path, target: Path) -> None:
    shutil.copyfile(source, target)
    target.chmod(target.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


#: What each machine's runtime needs of the board's system (TVM's wheels are manylinux_2_28).
SYSTEMS = {"aarch64": "64-bit ARM Linux (aarch64) with glibc 2.28 or newer: Raspberry Pi OS bookworm (64-bit), "
                      "Debian 10+, Ubuntu 20.04+, Jetson Linux 35+ (JetPack 5/6)",
           "x86_64": "x86-64 Linux with glibc 2.28 or newer (Debian 10+, Ubuntu 20.04+, RHEL 8+)"}


def _readme(manifest: dict, machine: str, tok: _TokenizerFiles | None, size: int, build: str) -> str:
    """The bundle's README.md: what the board needs, how to copy and run it."""
    model = manifest.get("source", {}).get("source_model") or "model"
    target = manifest.get("target", "?")
    features = manifest.get("cpu_features", [])
    check = (f"`grep -o -w -E '{'|'.join(features)}' /proc/cpuinfo | sort -u` lists them all" if features else "")
    prompt = ("```sh\n./run.sh --prompt \"The capital of France is\" --max-new-tokens 32\n```\n\nstreams the "
              "continuation: `generate.py` encodes the prompt with `tokenizer.json` and the `tokenizers` package in "
              "`py/` (no transformers, nothing downloaded), runs the runner and decodes the token ids as they "
              "arrive. Greedy by default; `--temperature 0.8 --top-k 40 --top-p 0.9 --seed 0` samples" +
              (", and the prompt is wrapped in the model's chat template as one user message unless `--no-chat` "
               "is given" if tok and tok.chat else "") + "; `--threads N` sets the CPU threads (default: every "
              "CPU). Generation stops at the end-of-sequence token or after `--max-new-tokens`."
              if tok else "This bundle has no tokenizer (none was found for the source model), so `run.sh "
              "--prompt` is unavailable; the runner takes token ids (below).")
    return f"""# {model} for {target}: a pbs2pc bundle

The model `{model}`, compiled by pbs2pc {manifest.get('pbs2pc_version', '')} for the target `{target}`
({machine}), with everything needed to run it: about {size / 1e6:.0f} MB. It runs with TVM's C++ runtime
(no Python TVM on the board).

## What the board needs

- {SYSTEMS.get(machine, machine + ' Linux with glibc 2.28 or newer')};
- a CPU with {', '.join(features) or 'no particular features'} ({check or 'any CPU of this architecture'});
  the runner checks them at start and says which one is missing;
- Python 3.9 or newer for `run.sh --prompt` only (the text front); `run.sh --bench` and the runner need no
  Python;
- about {manifest.get('sizes', {}).get('weights', 0) / 1e6:.0f} MB of memory for the weights (memory-mapped)
  plus the KV cache and activations.

## Copy it and run it

```sh
rsync -a BUNDLE/ pi@raspberrypi.local:{model}/     # BUNDLE: this folder; or scp -r
ssh pi@raspberrypi.local
cd {model}
```

{prompt}

```sh
./run.sh --bench [--threads 4]
```

runs the runner alone on a fixed prompt of {BENCH_PROMPT_TOKENS} token ids (`bench_prompt_ids.txt`),
after a short warm-up, and prints the prompt rate and the decode rate (32 new tokens; `--max-new-tokens N`
changes that).

```sh
./runner generate . --prompt-ids 1,2,3 --max-new-tokens 16 [--eos ID] [--threads N] [--stats]
```

prints each new token id on its own line as soon as it is made (`--dump-logits FILE.npy` saves the logits
every token was chosen from).

## Tune its kernels from another machine

```sh
./runner rpc --tracker HOST:9190 --key {machine}-board [--threads 4]
```

serves TVM's RPC protocol and registers with the RPC tracker on HOST (`python -m tvm.exec.rpc_tracker
--host 0.0.0.0 --port 9190` there), no Python needed here; on HOST, `pbs2pc tune model.onnx --target {target}
--rpc-tracker HOST:9190 --rpc-key {machine}-board -o tune_db/` times its candidates on this board, and
`pbs2pc compile --tuning-db tune_db/ --bundle` makes a tuned bundle.

## Files

| file | what it is |
|---|---|
| `model.so` | the compiled model (TVM Relax VM executable and its kernels) |
| `model.weights.bin`, `model.manifest.json` | the weights (packed sparse-binary planes stay packed) and what is where |
| `model.runner.txt` | the manifest's facts the runner reads (inputs, KV cache layout, weights), one a line |
| `runner`, `libtvm_runtime.so`, `libtvm_ffi.so` | the native runner, built with `{build}`, and TVM's runtime \
(run path `$ORIGIN`: keep them together) |
| `generate.py`, `tokenizer.json`, `bundle.json`, `py/` | the text front: tokenization with the `tokenizers` wheel for {machine} |
| `run.sh`, `bench_prompt_ids.txt` | the entry point and the benchmark's prompt |

To run an {machine} bundle on another machine (tests do this), set `PBS2PC_RUNNER_PREFIX` to an emulator
(`qemu-aarch64 -L /usr/aarch64-linux-gnu`) and, for `--prompt`, `PBS2PC_PYTHON` to a Python of that
machine with `tokenizers` installed.
"""
