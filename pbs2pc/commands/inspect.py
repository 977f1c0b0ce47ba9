"""``pbs2pc inspect model.onnx|model.so``: layers, N:M, group size, honest bits per weight, sizes, versions."""

from __future__ import annotations

import json
from pathlib import Path


def add_parser(sub):
    p = sub.add_parser("inspect", help="describe an ONNX model or a compiled artifact", description=__doc__)
    p.add_argument("path", help="an .onnx file or a compiled .so (with its manifest beside it)")
    p.add_argument("--layers", action="store_true", help="list every compressed layer (default: the first 8)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p


def _structure_line(summary: dict) -> list[str]:
    """The op contract version 2 structure of the compressed layers (nothing for a version-1 model)."""
    groups, residual = summary.get("layers_with_groups", 0), summary.get("layers_with_residual", 0)
    if not (groups or residual):
        return []
    return [f"op contract v2 structure: magnitude groups in {groups} of {summary['layers']} layers, a salient "
            f"residual in {residual} ({summary['salient_columns']:,} salient columns, "
            f"{100 * summary['salient_fraction']:.2f}% of the compressed weights)"]


def _bits_lines(summary: dict) -> list[str]:
    if not summary.get("weights"):
        return ["compressed layers: none"]
    v2 = bool(summary.get("layers_with_groups") or summary.get("layers_with_residual"))
    return [
        f"compressed layers: {summary['layers']} ({summary['weights']:,} weights), schemes: {', '.join(summary['schemes'])}",
        *_structure_line(summary),
        f"bits per weight, honest: {summary['bits_interchange']:.3f} as stored (1 sign + 1 mask + scales"
        f"{'; v2 layers add a group bit, residual signs and the salient bitmap' if v2 else ''}), "
        f"{summary['bits_compact']:.3f} with an exact N:M code (pattern index + kept signs + scales); "
        f"scales alone {summary['bits_scales']:.3f}",
        f"bits per weight, paper-style: {summary['bits_paper']:.3f} (signs of kept weights only"
        f"{', residual signs included' if v2 else ''}; no mask, index or scales)",
    ] + ([f"bits per weight, compiled: {summary['bits_target']:.3f} as the weights file stores them "
          "(the target layout, e.g. masks as 5-bit pattern codes)"] if "bits_target" in summary else [])


def _layout(layout: dict | None) -> str:
    if not layout:
        return "?"
    parts = [f"u{layout['word_bits']} planes",
             f"{layout['interleave']}-row interleave" if layout["interleave"] else "rows in order"]
    return ", ".join(parts + (["5-bit mask pattern codes"] if layout.get("mask_codes") else []))


def _device_code(library: Path) -> list[str]:
    """What the library's CUDA modules hold, read from the library itself: ``"sm_90"`` / ``"compute_90"``
    per fatbin entry, or ``"CUDA source"`` for a module compiled at load time."""
    from pbs2pc.compiler import cuda_export

    if not library.exists():
        return []
    out = []
    for fmt, payload in cuda_export.device_modules(library):
        out.extend(cuda_export.fatbin_archs(payload) if fmt == "fatbin" else ["CUDA source" if fmt == "cuda" else fmt])
    return out


def _gpu_line(gpu: dict) -> str:
    code = ", ".join(gpu["embedded"]) or "unknown (library missing)"
    return (f"runs on NVIDIA GPUs {gpu['arch']} (host code x86_64); device code embedded: {code}; built with CUDA "
            f"{gpu['cuda_version']}, needs driver {gpu['min_driver']} or newer")


def _short(value, limit: int = 240) -> str:
    """A metadata value for the text view: long ones (per-layer statistics) cut, with where to read them."""
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters; --json prints all)"


def run(args) -> int:
    from pbs2pc.errors import Pbs2pcError
    from pbs2pc.models import report

    path = Path(args.path)
    if path.suffix == ".onnx":
        from pbs2pc.models.onnx_file import load_onnx

        model = load_onnx(path, load_external_data=False)
        layers = report.onnx_layers(model, base_dir=path.parent)
        summary = report.summarize(layers)
        data = path.with_name(path.name + ".data")
        info = {
            "file": str(path),
            "kind": "onnx",
            "size_bytes": path.stat().st_size + (data.stat().st_size if data.exists() else 0),
            "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
            "producer": f"{model.producer_name} {model.producer_version}".strip(),
            "metadata": {p.key: p.value for p in model.metadata_props},
            "summary": summary,
        }
        header = [f"{path} (ONNX, {info['size_bytes'] / 1e6:.1f} MB with external data, producer {info['producer'] or '?'})",
                  f"opsets: {info['opsets']}"]
    elif path.suffix == ".so" or path.name.endswith(".manifest.json"):
        from pbs2pc.runtime.artifact import read_manifest

        manifest = read_manifest(path)
        layers = [report.LayerInfo(**layer) for layer in manifest["layers"]]
        summary = manifest["summary"]
        sizes = manifest.get("sizes", {})
        info = {"file": str(path), "kind": "artifact", **{k: manifest[k] for k in (
            "target", "target_dict", "tvm_version", "pbs2pc_version", "format_version", "inputs", "outputs")},
            "sizes": sizes, "metadata": manifest.get("source", {}), "summary": summary,
            "functions": manifest.get("functions", ["main"]), "kv_cache": manifest.get("kv_cache"),
            "activations": manifest.get("activations", "fp32"), "lm_head": manifest.get("lm_head", "fp32"),
            "isa": manifest.get("isa"), "machine": manifest.get("machine"),
            "cpu_features": manifest.get("cpu_features", []), "layout": manifest.get("layout"),
            "kernels": manifest.get("kernels", [])}
        if manifest.get("gpu"):
            info["gpu"] = {**manifest["gpu"], "embedded": _device_code(path.with_name(manifest["library"]))}
        cache = manifest.get("kv_cache")
        header = [
            f"{path} (compiled for {manifest['target']}: {json.dumps(manifest['target_dict'])})",
            f"library {sizes.get('library', 0) / 1e6:.1f} MB + weights {sizes.get('weights', 0) / 1e6:.1f} MB; "
            f"built by pbs2pc {manifest['pbs2pc_version']} with TVM {manifest['tvm_version']}, format v{manifest['format_version']}",
            f"inputs {manifest['inputs']} -> outputs {manifest['outputs']}; entry functions {info['functions']}",
            _gpu_line(info["gpu"]) if "gpu" in info else
            f"runs on {info['machine']} CPUs with {' '.join(info['cpu_features']) or 'no particular features'}",
            f"weight layout {_layout(info['layout'])}; hand-written kernels "
            f"{', '.join(info['kernels']) or 'none (the TE kernel everywhere)'}",
            f"activations of the sparse-binary layers {info['activations']}; LM head table {info['lm_head']}",
            f"KV cache: {cache['layers']} layers x {cache['kv_heads']} kv heads x head_dim {cache['head_dim']}, keys "
            f"{cache['key_layout']}, values {cache['value_layout']}, updated in place" if cache
            else "no KV cache (each call recomputes the whole sequence)",
        ]
    else:
        raise Pbs2pcError(f"cannot inspect {path.name!r}: give an .onnx file or a compiled .so.")
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    for line in header + [f"{k}: {_short(v)}" for k, v in info["metadata"].items()] + _bits_lines(summary):
        print(line)
    if layers:
        print()
        for row in report.format_layers(layers, None if args.layers else 8):
            print(row)
    return 0
