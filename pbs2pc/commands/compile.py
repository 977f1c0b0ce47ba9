"""``pbs2pc compile model.onnx --target x86 -o model.so``: ONNX -> library + weights + manifest."""

from __future__ import annotations

import time


def add_parser(sub):
    from pbs2pc.compiler.targets import LM_HEAD_TYPES, PRESETS, TARGET_NAMES  # no TVM import: --help stays fast

    p = sub.add_parser("compile", help="compile an ONNX model with pbs2p ops for a target", description=__doc__)
    p.add_argument("model", help="the .onnx file (from pbs2pc export, or any file following the pbs2p op contract)")
    p.add_argument("-o", "--output", required=True, help="the .so to write; NAME.weights.bin and NAME.manifest.json go beside it")
    p.add_argument("--target", default="x86", choices=list(TARGET_NAMES),
                   help="target preset (default: x86, this machine's best x86 target: x86-avx512 where the CPU "
                        "has AVX-512 with VNNI and VBMI, else x86-avx2); "
                        + "; ".join(f"{p.name}: {p.description}" for p in PRESETS.values()))
    p.add_argument("--dump-ir", metavar="DIR", help="write the IR after every compiler phase into DIR")
    p.add_argument("--activations", choices=["fp32", "int8"], default="fp32",
                   help="fp32 (default), or int8: the sparse-binary linear layers quantise their inputs to int8 per "
                        "scale group (x86-avx512: decode and prompt; x86-avx2: decode; faster; accuracy cost in "
                        "docs/performance.md)")
    p.add_argument("--lm-head", choices=list(LM_HEAD_TYPES), default="fp32",
                   help="fp32 (default: as exported); fp16: store the LM head's table (the tied embedding) "
                        "rounded to fp16, half the bytes of the largest read of a decode step; or int8: as int8 "
                        "with one fp16 scale per 32 columns (GGUF's Q8_0), about a quarter of the bytes (faster "
                        "decode; accuracy cost of both in docs/performance.md)")
    return p


def compile_with_progress(model, output, target: str, dump_ir=None, activations: str = "fp32",
                          lm_head: str = "fp32") -> dict:
    """:func:`pbs2pc.compiler.build.compile_model` with a progress bar over the compiler's phases."""
    from tqdm.auto import tqdm

    from pbs2pc.compiler.build import compile_model
    from pbs2pc.compiler.pipeline import phases
    from pbs2pc.compiler.targets import CompileOptions, explain_host_choice, get_preset

    preset = get_preset(target).require()
    options = CompileOptions(activations, lm_head).check(preset)
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
        return compile_model(model, output, preset, dump_ir=dump_ir, progress=progress, options=options)
    finally:
        if bar is not None:
            bar.close()


def run(args) -> int:
    start = time.perf_counter()
    manifest = compile_with_progress(args.model, args.output, args.target, args.dump_ir, args.activations,
                                     args.lm_head)
    s = manifest["summary"]
    print(f"wrote {args.output} ({manifest['sizes']['library'] / 1e6:.1f} MB) and weights "
          f"({manifest['sizes']['weights'] / 1e6:.1f} MB) in {time.perf_counter() - start:.1f} s; "
          f"{s.get('layers', 0)} sparse-binary layers, {s.get('bits_interchange', 0)} bits/weight as stored")
    return 0
