"""``pbs2pc compile model.onnx --target x86 -o model.so``: ONNX -> library + weights + manifest.

``--bundle DIR`` also writes an edge bundle of a language model: the artifact, the native runner built for
the target, TVM's runtime libraries, the tokenizer and ``run.sh`` (:mod:`pbs2pc.runtime.bundle`).
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path


def add_parser(sub):
    from pbs2pc.compiler.targets import LM_HEAD_TYPES, PRESETS, TARGET_NAMES  # no TVM import: --help stays fast

    p = sub.add_parser("compile", help="compile an ONNX model with pbs2p ops for a target", description=__doc__)
    p.add_argument("model", help="the .onnx file (from pbs2pc export, or any file following the pbs2p op contract)")
    p.add_argument("-o", "--output", help="the .so to write; NAME.weights.bin and NAME.manifest.json go beside it "
                                          "(optional with --bundle)")
    p.add_argument("--target", default="x86", choices=list(TARGET_NAMES),
                   help="target preset (default: x86, this machine's best x86 target: x86-avx512 where the CPU "
                        "has AVX-512 with VNNI and VBMI, else x86-avx2); "
                        + "; ".join(f"{p.name}: {p.description}" for p in PRESETS.values()))
    p.add_argument("--arch", metavar="SM", help="with --target cuda: the GPU architecture, sm_90 (default: H100, "
                                                "H200), sm_89, sm_87 (Jetson Orin), sm_86 or sm_80; the library "
                                                "embeds compiled code (SASS) for it and its PTX")
    p.add_argument("--dump-ir", metavar="DIR", help="write the IR after every compiler phase into DIR")
    p.add_argument("--activations", choices=["fp32", "int8"], default=None,
                   help="fp32 or int8: the sparse-binary linear layers quantise their inputs to int8 per scale "
                        "group (faster; accuracy cost in docs/performance.md). Default: int8 on the ARM targets "
                        "(their NEON kernels are int8), fp32 elsewhere")
    p.add_argument("--lm-head", choices=list(LM_HEAD_TYPES), default="fp32",
                   help="fp32 (default: as exported); fp16: store the LM head's table (the tied embedding) "
                        "rounded to fp16, half the bytes of the largest read of a decode step; or int8: as int8 "
                        "with one fp16 scale per 32 columns (GGUF's Q8_0), about a quarter of the bytes (faster "
                        "decode; accuracy cost of both in docs/performance.md)")
    p.add_argument("--tuning-db", metavar="DIR",
                   help="a tuning database from pbs2pc tune for this target: its kernels are built with their "
                        "tuned settings, the others with the defaults (the manifest lists which came from it)")
    p.add_argument("--bundle", metavar="DIR",
                   help="also write an edge bundle of the language model into DIR: the compiled model, a native "
                        "runner built for the target, TVM's runtime libraries, the tokenizer and run.sh (copy DIR "
                        "to the board, then ./run.sh --prompt \"...\" or ./run.sh --bench; DIR/README.md says what "
                        "the board needs)")
    return p


def compile_with_progress(model, output, target: str, dump_ir=None, activations: str | None = None,
                          lm_head: str = "fp32", arch: str | None = None, tuning_db=None) -> dict:
    """:func:`pbs2pc.compiler.build.compile_model` with a progress bar over the compiler's phases."""
    from tqdm.auto import tqdm

    from pbs2pc.compiler.build import compile_model
    from pbs2pc.compiler.pipeline import phases
    from pbs2pc.compiler.targets import CompileOptions, explain_host_choice, get_preset

    preset = get_preset(target, arch=arch).require()
    options = CompileOptions(activations or preset.default_activations, lm_head).check(preset)
    if target == "x86":
        print(explain_host_choice(preset), flush=True)
    bar = None  # opened at the first compiler phase, so input errors print alone

    def progress(message: str) -> None:
        nonlocal bar
        if message.startswith("phase "):
            if bar is None:
                bar = tqdm(total=len(phases(preset, options)) + 2, desc=f"compile ({preset.name})", unit="phase")
            bar.update(1)
            bar.set_postfix_str(message[len("phase "):], refresh=True)

    try:
        return compile_model(model, output, preset, dump_ir=dump_ir, progress=progress, options=options,
                             tuning_db=tuning_db)
    finally:
        if bar is not None:
            bar.close()


def run(args) -> int:
    from pbs2pc.errors import Pbs2pcError

    if not args.output and not args.bundle:
        raise Pbs2pcError("give the library to write (-o model.so) or a bundle folder (--bundle DIR).")
    if args.output and args.bundle and Path(args.bundle).resolve() in Path(args.output).resolve().parents:
        raise Pbs2pcError(f"-o {args.output} is inside the bundle folder {args.bundle}; write it elsewhere or "
                          "leave -o out (the bundle holds the compiled model).")
    start = time.perf_counter()
    if args.bundle:
        _prepare_bundle(args)
    # Without -o, the artifact is compiled into a scratch folder beside the bundle (one file system: its
    # files are hard-linked into the bundle rather than copied), removed afterwards.
    scratch = (contextlib.nullcontext(None) if args.output else
               tempfile.TemporaryDirectory(prefix=".pbs2pc-compile-", dir=_bundle_parent(args.bundle)))
    with scratch as folder:
        output = args.output or str(Path(folder) / "model.so")
        manifest = compile_with_progress(args.model, output, args.target, args.dump_ir, args.activations,
                                         args.lm_head, args.arch, args.tuning_db)
        s = manifest["summary"]
        print(f"wrote {args.output or 'the model'} ({manifest['sizes']['library'] / 1e6:.1f} MB) and weights "
              f"({manifest['sizes']['weights'] / 1e6:.1f} MB) in {time.perf_counter() - start:.1f} s; "
              f"{s.get('layers', 0)} sparse-binary layers, {s.get('bits_interchange', 0)} bits/weight as stored")
        if args.tuning_db:
            print(f"{len(manifest['tuned_kernels'])} kernels built with settings from {args.tuning_db}, the others "
                  "with the defaults")
        if args.bundle:
            _write_bundle(output, args.bundle, manifest["target"])
    return 0


def _bundle_parent(bundle: str) -> str:
    parent = Path(bundle).resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    return str(parent)


def _prepare_bundle(args) -> None:
    """Before minutes of compiling: refuse a bad bundle folder, find the target's compiler and fetch its
    runtime libraries (downloaded once), so those errors come first."""
    from pbs2pc.compiler.targets import get_preset
    from pbs2pc.errors import Pbs2pcError
    from pbs2pc.runtime import bundle
    from pbs2pc.runtime.native.toolchain import compiler_for, host_machine, native_runtime

    preset = get_preset(args.target).require()
    if preset.family != "cpu":
        raise Pbs2pcError(f"--bundle packs CPU targets (arm, rpi5, jetson-orin, x86), not {preset.name}; "
                          "use -o for this one.")
    bundle.check_directory(Path(args.bundle))
    if preset.machine == host_machine() or not preset.cross_compiler:
        compiler_for(preset.machine)
    native_runtime(preset.machine)


def _write_bundle(library: str, directory: str, target: str) -> None:
    from pbs2pc.compiler.targets import get_preset
    from pbs2pc.runtime.bundle import write_bundle

    start = time.perf_counter()
    result = write_bundle(library, directory, get_preset(target))
    print(f"wrote the bundle {directory} ({result.size / 1e6:.1f} MB, {len(result.files)} files) in "
          f"{time.perf_counter() - start:.1f} s: copy it to the board, then ./run.sh --prompt \"...\" or "
          f"./run.sh --bench ({Path(directory) / 'README.md'} says what the board needs)")
    if not result.tokenizer:
        print(f"note: the bundle has no tokenizer ({result.note.rstrip('.')}), so run.sh --prompt is unavailable; "
              "run.sh --bench and the runner on token ids work")
