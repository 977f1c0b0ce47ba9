"""The compile driver behind ``pbs2pc compile``: ONNX file -> library + weights + manifest.

Steps: check the target preset and its toolchain; load, check and import the ONNX file
(:mod:`pbs2pc.compiler.frontend`); run the phase pipeline (:mod:`pbs2pc.compiler.pipeline`) and generate
code with TVM; write the three artifact files (:mod:`pbs2pc.runtime.artifact`) atomically, so a failure
leaves nothing behind under the requested names.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import pbs2pc
from pbs2pc.errors import Pbs2pcError, ToolchainError, UnsupportedError
from pbs2pc.fileio import atomic_outputs
from pbs2pc.models import report
from pbs2pc.runtime.artifact import MANIFEST_VERSION, artifact_paths, write_weights


def _host_compiler_present() -> bool:
    return any(shutil.which(cc) for cc in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++"))


def compile_model(onnx_path: str | os.PathLike, output: str | os.PathLike, target: str = "x86",
                  dump_ir: str | os.PathLike | None = None, activations: str | None = None,
                  progress: Callable[[str], None] | None = None, lm_head: str = "fp32",
                  options=None, tuning_db: str | os.PathLike | None = None) -> dict:
    """Compile ``onnx_path`` for the preset ``target`` into ``output`` (a ``.so`` path); return the manifest.

    ``target`` is a preset name (``x86``: this machine's best x86 preset, see
    :func:`pbs2pc.compiler.targets.get_preset`) or a :class:`~pbs2pc.compiler.targets.TargetPreset`.
    ``options`` (a :class:`~pbs2pc.compiler.targets.CompileOptions`) replaces ``activations`` and
    ``lm_head`` when given.

    ``progress`` receives a short description of each step: ``"phase NAME"`` for every compiler phase,
    then ``"phase codegen"`` and ``"phase link and write"`` (``len(phases) + 2`` steps in all).
    ``activations`` (default: the preset's ``default_activations``, int8 on ARM, else fp32): ``"int8"``
    quantises the inputs of the sparse-binary linear layers to int8 (see
    :mod:`pbs2pc.passes.kernels.x86_avx512.sparse_binary_gemv_int8` and ``sparse_binary_gemm_int8``); the default keeps
    fp32 everywhere. ``lm_head="fp16"`` stores the LM head's table rounded to fp16 (see
    :mod:`pbs2pc.passes.store_lm_head_fp16`), ``lm_head="int8"`` as int8 with one fp16 scale per 32 columns
    (:mod:`pbs2pc.passes.store_lm_head_int8`). ``tuning_db``: a folder ``pbs2pc tune`` wrote for this
    target; its kernels are built with their tuned knobs, the rest with the defaults, and the manifest's
    ``tuned_kernels`` lists those that came from it (a database made for another target is refused).
    """
    from pbs2pc.compiler import frontend
    from pbs2pc.compiler.pipeline import make_pipeline
    from pbs2pc.compiler.targets import CompileOptions, TargetPreset, get_preset
    from pbs2pc.compiler.tvm_compat import TVM_VERSION, tvm
    from pbs2pc.passes import kv_cache
    from pbs2pc.passes.kernels import registry

    say = progress or (lambda _msg: None)
    output = Path(output)
    if output.suffix != ".so":
        raise Pbs2pcError(f"the output must be a .so path, got {output.name!r}; e.g. -o model.so")
    preset = (target if isinstance(target, TargetPreset) else get_preset(target)).require()
    options = (options or CompileOptions(activations or preset.default_activations, lm_head)).check(preset)
    if preset.cross_compiler is None and not _host_compiler_present():
        raise ToolchainError("no C++ compiler found to link the library; install one (apt-get install g++).")
    knobs, tuned = None, set()
    if tuning_db is not None:
        from pbs2pc.compiler.tune import knobs_from

        knobs, tuned = knobs_from(tuning_db, preset)
    timings = {}
    start = time.perf_counter()
    say(f"loading {onnx_path}")
    model = frontend.load_onnx(onnx_path)
    layers = report.onnx_layers(model)
    weight_inputs = report.weight_inputs(model)
    say("importing into Relax")
    imported = frontend.import_onnx(model)
    del model
    timings["import_s"] = round(time.perf_counter() - start, 2)

    start = time.perf_counter()
    layout = registry.target_layout(preset, options)
    mod, params = to_target_layout(imported.mod, imported.params, preset, options, vocab=_vocab_size(imported))
    used_kernels: set = set()
    pipeline = make_pipeline(preset, options, dump_ir=dump_ir, on_phase=lambda name: say(f"phase {name}"),
                             used_kernels=used_kernels, knobs=knobs)
    executable = tvm.compile(mod, target=preset.tvm_target(), relax_pipeline=pipeline)
    timings["compile_s"] = round(time.perf_counter() - start, 2)

    lib_path, weights_path, manifest_path = artifact_paths(output)
    vocab = _vocab_size(imported)
    cache = kv_cache.cache_layout(imported.mod)
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "pbs2pc_version": pbs2pc.__version__,
        "format_version": pbs2pc.FORMAT_VERSION,
        "tvm_version": TVM_VERSION,
        "target": preset.name,
        "target_dict": preset.target,
        "isa": preset.isa,
        # What the library's code executes: the runtime refuses a CPU without them (pbs2pc.runtime.model).
        "machine": preset.machine,
        "cpu_features": list(preset.features),
        "options": options.record(),
        "activations": options.activations,
        "lm_head": options.lm_head,
        "layout": dataclasses.asdict(layout),
        # the kernel registry entries that run at least one layer (the TE kernel runs the rest)
        "kernels": sorted(used_kernels),
        # the tuning keys (pbs2pc.compiler.tune) built with knobs from --tuning-db; the rest use the defaults
        "tuned_kernels": sorted(tuned),
        "host": platform.machine(),
        "library": lib_path.name,
        "weights": weights_path.name,
        # With a KV cache, main and decode take the inputs below, then the caches (layer by layer, key
        # then value, in kv_cache's layouts), then the weights; they return the logits.
        "inputs": [n for n in imported.inputs if not (cache and n.startswith("past_key_values."))],
        # dtype and shape of each input (symbolic dimensions by name): the runtime checks feeds against them
        "input_types": {n: t for n, t in _input_types(imported).items()
                        if not (cache and n.startswith("past_key_values."))},
        "outputs": [n for n in imported.outputs if not (cache and n.startswith("present."))],
        "functions": ["main", kv_cache.DECODE, kv_cache.PREFILL] if cache else ["main"],
        "kv_cache": dataclasses.asdict(cache) if cache else None,
        "vocab_size": vocab,
        "max_sequence": _max_sequence(imported),
        "source": imported.metadata,
        "summary": {**report.summarize(layers), **_target_bits(layers, weight_inputs, params)},
        "layers": [vars(layer) for layer in layers],
        "timings": timings,
    }
    start = time.perf_counter()
    say("phase link and write")
    with atomic_outputs([lib_path, weights_path, manifest_path]) as (tmp_lib, tmp_weights, tmp_manifest):
        try:
            EXPORT_STEPS.get(preset.family, _export_cpu)(executable, tmp_lib, preset, manifest)
        except Pbs2pcError:
            raise
        except Exception as exc:
            raise ToolchainError(f"linking {lib_path.name} failed: {str(exc).strip().splitlines()[-1]}") from None
        manifest["params"] = write_weights(tmp_weights, params)
        timings["write_s"] = round(time.perf_counter() - start, 2)
        manifest["sizes"] = {"library": tmp_lib.stat().st_size, "weights": tmp_weights.stat().st_size}
        tmp_manifest.write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _export_cpu(executable, path: Path, preset, manifest: dict) -> None:
    """TVM's export: the host's C++ compiler, or the preset's cross compiler."""
    export_kwargs = {}
    if preset.cross_compiler:
        from pbs2pc.compiler.tvm_compat import cc

        export_kwargs["fcompile"] = cc.cross_compiler(preset.cross_compiler, options=list(preset.cross_flags))
    executable.export_library(str(path), **export_kwargs)


def _export_cuda(executable, path: Path, preset, manifest: dict) -> None:
    """The device code compiled by nvcc into a fatbin for the preset's arch, embedded in place of TVM's CUDA
    source (:mod:`pbs2pc.compiler.cuda_export`); the manifest's ``gpu`` entry says what the library needs."""
    from pbs2pc.compiler import cuda_export

    version = cuda_export.nvcc_version()
    records = cuda_export.export_library(executable, path, preset.gpu_arch)
    manifest["gpu"] = {
        "arch": preset.gpu_arch,
        "code": [f"sm_{preset.gpu_arch[3:]}", f"compute_{preset.gpu_arch[3:]}"],  # SASS, and PTX for newer GPUs
        "cuda_version": version,  # the nvcc release that compiled it
        "min_driver": cuda_export.min_driver(version),
        "device_modules": records,
    }


#: Each target family's export step: ``step(executable, path, preset, manifest)`` writes the library.
EXPORT_STEPS = {"cpu": _export_cpu, "cuda": _export_cuda}


def to_target_layout(mod, params: dict, preset, options=None, vocab: int | None = None) -> tuple:
    """The params transform: re-encode weights into the target layout, signature and arrays alike.

    The layout is the kernel registry's choice for ``preset`` and ``options``
    (:func:`pbs2pc.passes.kernels.registry.target_layout`).

    The weights are parameters of ``main`` that the runtime loads from the weights file, so a layout
    change must rewrite both the Relax signature and the arrays the same way. The Relax passes do the
    first (EncodeMaskCodes stores n:m masks as pattern codes and their sign planes as ``sign & mask``,
    PackPlanesAsWords re-types the planes as words, InterleaveRows stores planes and scales as
    ``[N/T, C, T]``) and record what they changed in ``main``'s ``pbs2pc.params_transform`` attribute
    (``{param name: {"and_mask": mask name, "mask_codes": 1, "n": n, "m": m, "dtype": new dtype,
    "interleave": T}}``, the keys that apply; with ``options.lm_head == "fp16"``, StoreLMHeadFP16 records
    ``{"cast": "float16"}`` for the head's table, whose width ``vocab`` is; with ``"int8"``, StoreLMHeadInt8
    records ``{"quantize": "int8"}``); this function applies that record to the numpy arrays and drops the
    attribute: first ``cast`` (a rounding ``astype``) or ``quantize``
    (:func:`pbs2pc.passes.kernels.lm_head_int8.quantize`: ``[V, H]`` float -> ``[V, H + H/16]`` int8, each row's codes
    and then its fp16 scales, one per 32 columns),
    ``and_mask`` (the sign plane ANDed with the interchange mask) and ``mask_codes``
    (:func:`pbs2pc.passes.kernels.x86_avx512.mask_codes.encode`), then the dtype (a zero-copy ``view``: uint8 planes
    reinterpreted as little-endian words hold the same bytes), then the interleave (a permutation of rows,
    :func:`pbs2pc.passes.interleave_rows.interleave_array`; the same bytes in another order). Returns
    ``(mod, params)`` with ``params`` in ``main``'s order.
    """
    import numpy as np

    from pbs2pc.compiler.targets import CompileOptions
    from pbs2pc.passes import EncodeMaskCodes, InterleaveRows, PackPlanesAsWords, StoreLMHeadFP16, StoreLMHeadInt8
    from pbs2pc.passes.interleave_rows import interleave_array
    from pbs2pc.passes.kernels import lm_head_int8, registry
    from pbs2pc.passes.kernels.x86_avx512 import mask_codes
    from pbs2pc.passes.pack_planes_as_words import TRANSFORM_ATTR, read_record
    from pbs2pc.passes.store_lm_head_fp16 import the_head

    options = options or CompileOptions()
    layout = registry.target_layout(preset, options)
    if layout.mask_codes and layout.word_bits == 8 and layout.interleave == mask_codes.ROWS:
        mod = EncodeMaskCodes()(mod)
    mod = PackPlanesAsWords(layout.word_bits)(mod)
    mod = InterleaveRows(layout.interleave)(mod)
    if options.lm_head in ("fp16", "int8"):  # no head table: one clear error
        store = StoreLMHeadFP16 if options.lm_head == "fp16" else StoreLMHeadInt8
        head = the_head(mod["main"], vocab, options.lm_head)
        rows, hidden = (int(d) for d in head.ty.shape.values)
        if options.lm_head == "int8" and not lm_head_int8.supported(rows, hidden):
            raise UnsupportedError(f"--lm-head int8 needs a head table whose width is a multiple of "
                                   f"{lm_head_int8.GROUP} and whose rows are a multiple of 4, not {rows} x {hidden}; "
                                   "use --lm-head fp16.")
        mod = store(head.name)(mod)
    main = mod["main"]
    record = read_record(main)
    if not record:
        return mod, params
    mod["main"] = main.without_attr(TRANSFORM_ATTR)
    out = {}
    for name, array in params.items():
        entry = record.get(name)
        if entry is not None:
            if "cast" in entry:
                array = array.astype(np.dtype(entry["cast"]))
            if entry.get("quantize") == "int8":
                array = lm_head_int8.quantize(array)
            if "and_mask" in entry:
                array = np.bitwise_and(array, params[entry["and_mask"]])
            if entry.get("mask_codes"):
                array = mask_codes.encode(array, entry["n"], entry["m"])
            if "dtype" in entry and np.dtype(entry["dtype"]) != array.dtype:
                if sys.byteorder != "little":  # a word view holds the same bits only on little-endian hosts
                    raise Pbs2pcError("compiling with word-packed bit planes needs a little-endian host; "
                                      "use plane_word_bits=8.")
                array = np.ascontiguousarray(array).view(np.dtype(entry["dtype"]))
            if entry.get("interleave", 0) > 1:
                array = interleave_array(array, entry["interleave"])
        out[name] = array
    return mod, out


def _target_bits(layers, weight_inputs: set, params: dict) -> dict:
    """Bits per weight of the compressed layers as the weights file stores them (the target layout: on x86
    masks as pattern codes where the scheme has them), counted like ``bits_interchange``: signs, masks and
    scales, everything the layers' weights take."""
    weights = sum(layer.weights for layer in layers)
    if not weights:
        return {}
    stored = sum(params[name].nbytes for name in weight_inputs if name in params)
    return {"bits_target": round(8 * stored / weights, 4)}


def _input_types(imported) -> dict:
    """``{input name: {"dtype": ..., "shape": [int or symbol name]}}`` for ``main``'s graph inputs."""
    out = {}
    for name, param in zip(imported.inputs, imported.mod["main"].params):
        ty = param.ty
        shape = getattr(ty, "shape", None)
        values = getattr(shape, "values", None)
        if values is None:
            continue
        dims = []
        for d in values:
            try:
                dims.append(int(d))
            except TypeError:
                dims.append(str(d))
        out[name] = {"dtype": str(ty.dtype), "shape": dims}
    return out


def _vocab_size(imported) -> int | None:
    from pbs2pc.compiler.tvm_compat import tvm

    out = imported.mod["main"].ret_ty
    if isinstance(out, tvm.relax.TupleType):
        out = out.fields[0]
    shape = getattr(out, "shape", None)
    try:
        return int(shape[-1]) if shape is not None else None
    except (TypeError, ValueError):
        return None


def _max_sequence(imported) -> int | None:
    """Longest sequence the graph supports: the rows of its rotary table, when it has one."""
    table = imported.params.get("rope.cos")
    return int(table.shape[0]) if table is not None else None
