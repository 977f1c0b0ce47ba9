"""Single-layer kernel benchmark: pbs2pc's compiled sparse-binary linear against what a user would run.

    python benchmarks/kernel_bench.py                 # every shape, M = 1, 16, 128 (~15 min on 2 cores)
    python benchmarks/kernel_bench.py --quick         # smoke run: two shapes, M = 1, short buffers
    python benchmarks/kernel_bench.py --report-only   # markdown table + docs/kernels_roofline.png from the JSON

In one process and one run, for every weight shape N x K and rows M:

* **pbs2pc**: a one-op ONNX model per shape (``SparseBinaryLinear`` nodes written with
  ``models.onnx_op.make_node``), compiled through the project's real path: ``frontend.import_onnx`` ->
  the build's params transform ``build.to_target_layout`` -> ``tvm.compile`` with
  ``pipeline.make_pipeline`` (LowerSparseBinaryLinear + the CPU schedule rules), run on the Relax VM.
  Measured for each plane layout (``--layouts``; the x86 preset's default is byte sign planes, masks as
  5-bit pattern codes, planes and scales row-interleaved in blocks of 16 rows; ``pbs2pc_u8_planes`` keeps
  mask planes; ``--interleave 0`` measures the row-major layout). Bytes run the fp32 lookup-table kernels:
  the GEMV at M = 1 (``passes/kernels/sparse_binary_gemv.py``), the GEMM at M > 1 (``sparse_binary_gemm.py``).
* **pbs2pc_te** (byte planes): the TE kernel + CPU schedule rule instead of those (the x86 default before
  them), for the comparison.
* **pbs2pc_int8** / **pbs2pc_int8_planes**: compiled with ``--activations int8``, with mask codes / planes
  (M = 1: the lookup-table int8 GEMV, M > 1: the VNNI GEMM; the accuracy cost is measured by
  ``benchmarks/int8_accuracy.py``).
* **pbs2pc_v2**: the same layers with the op contract v2 structure (``contenders.random_structure``: 2
  magnitude groups, a residual on 4 of every 64 columns) in the x86 preset's layout; M = 1 runs the v2
  lookup-table GEMV (``x86_avx512/sparse_binary_gemv_v2.py`` on the mask codes, ``x86_avx2/...`` on x86-avx2),
  M > 1 the TE kernel. Its bytes
  are honest: every stored input (group plane and scales, residual plane and scales, salient bitmap) counts.
* **torch fp32**: ``x @ W.T`` with ``torch.set_num_threads(2)``.
* **onnxruntime fp32**: a ``MatMul`` against an fp32 initializer, 2 intra-op threads.
* **onnxruntime MatMulNBits** (``com.microsoft``) at 4 bits (and 2 bits when this ORT runs it on CPU),
  block size = G, fp32 scales, no zero points; ``accuracy_level`` 0 (fp32 compute) and 4 (int8
  activations, the VNNI path). 4 bits also at block size 32 (``ort_nbits4_b32``: 5.0 bits per weight),
  the configuration ORT's own quantiser writes by default (``python -m
  onnxruntime.quantization.matmul_nbits_quantizer``: ``--block_size 32``, symmetric).

Every row uses random, non-zero data. Weights rotate over enough copies that the bytes touched between two
uses of a copy exceed twice the last-level cache (``lscpu``); where that would need more than
``--max-copies`` copies the row is labelled ``cache-resident``. For pbs2pc and onnxruntime the copies are
nodes of one graph (one call runs them all), for torch a Python loop; times are per layer, the median of
about ``--repeats`` repeats taken in three rounds over the contenders of a row (see ``measure_in_rounds``),
so that the minute-to-minute swings of this shared machine's memory bandwidth reach every contender. The
memory floor is (bytes of the weights in that format + activations read and written) / the STREAM triad
bandwidth measured at the start (torch ops, 2 threads; see ``stream``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

# numpy's OpenBLAS threads keep spinning after a BLAS call and take cores from the kernels being timed.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from contenders import (NM, SALIENT, SALIENT_OF, THREADS, group_size, ort_runner, ort_supports,  # noqa: E402
                        pbs2pc_runner, pbs2pc_variant, torch_runner)
from machine import cpu_model, llc_bytes, machine_record, stream, timed  # noqa: E402

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "kernels.json"
DOCS = ROOT.parent / "docs"
#: The block size onnxruntime's MatMulNBits quantiser writes unless told otherwise (its ``--block_size``
#: default); measured at 4 bits next to block = G.
NBITS_DEFAULT_BLOCK = 32
#: Rounds over the contenders of a row, and seconds of untimed calls at the start of each block: longer than
#: the previous contender's worker threads keep spinning after their last parallel region. onnxruntime's spin
#: for more than 50 ms: MatMulNBits-4 acc 4 at 4096x4096 took 944 us after a 50 ms settle behind another
#: session, 247 us after 300 ms (217-265 us alone).
ROUNDS = 3
SETTLE_S = 0.3

#: (N, K, label): N outputs x K inputs; LLaMA-7B/-2 shapes, Mistral-7B's 14336 and SmolLM2-135M's layers.
SHAPES = [
    (4096, 4096, "7B q/k/v/o"),
    (11008, 4096, "7B gate/up"),
    (4096, 11008, "7B down"),
    (14336, 4096, "Mistral gate/up"),
    (1536, 576, "SmolLM2 gate/up"),
    (576, 1536, "SmolLM2 down"),
    (576, 576, "SmolLM2 q/o"),
    (192, 576, "SmolLM2 k/v"),
]
ROWS = [1, 16, 128]


def copies_for(bytes_per_copy: float, llc: int, cap: int) -> tuple[int, bool]:
    """Copies to rotate so 2 x LLC bytes pass between uses of one copy; ``(copies, cache_resident)``."""
    need = max(2, math.ceil(2 * llc / bytes_per_copy))
    return min(need, cap), need > cap


# --------------------------------------------------------------------------------------------------------
# formats: bytes per weight and copies (the contenders' runners are in contenders.py)


def layout_has_codes(isa: str | None) -> bool:
    """Whether the x86 target ``isa`` (a run's ``x86_isa``; None: this machine's) stores masks as codes."""
    from pbs2pc.compiler.targets import CompileOptions, get_preset
    from pbs2pc.passes.kernels import registry

    return registry.target_layout(get_preset(isa or "x86"), CompileOptions()).mask_codes


def weight_bytes(fmt: str, n_out: int, k: int, codes: bool = True) -> float:
    """Bytes of one layer's weights in a format (scales included); ``codes``: the target's layout stores 6:8
    masks as pattern codes (x86-avx512; x86-avx2 keeps mask planes)."""
    g = group_size(k)
    if fmt == "pbs2pc_v2":  # v1's bytes + group plane and scales, residual plane and scales, salient bitmap
        salient = k // SALIENT_OF * SALIENT
        return (weight_bytes("pbs2pc_u8", n_out, k, codes) + n_out * k * (1 + 64 / g) / 8
                + n_out * -(-salient // 8) + k / 8)
    if fmt.startswith("pbs2pc"):
        from pbs2pc.passes.kernels.x86_avx512 import mask_codes

        if codes and pbs2pc_variant(fmt)[1] and mask_codes.supported(n_out, k, *NM) and g % 32 == 0:
            # sign bits, 5-bit mask codes (with each tile's tail bytes), fp16 alpha + mu per group
            return n_out * k * (1 + 32 / g) / 8 + n_out // mask_codes.ROWS * mask_codes.code_width(k)
        return n_out * k * (2 + 32 / g) / 8  # sign + mask bits, fp16 alpha + mu per group
    if fmt == "torch_fp32" or fmt == "ort_fp32":
        return n_out * k * 4.0
    bits, block = nbits_format(fmt)
    return n_out * k * (bits + 32 / (block or g)) / 8  # packed ints + one fp32 scale per block


def nbits_format(fmt: str) -> tuple[int, int | None]:
    """``(bits, block size or None for G)`` of an ``ort_nbits*`` format: ort_nbits4_b32_acc4 -> (4, 32)."""
    parts = fmt.split("_")
    block = next((int(p[1:]) for p in parts if p.startswith("b") and p[1:].isdigit()), None)
    return int(parts[1][5:]), block


def bits_per_weight(fmt: str, n_out: int, k: int, codes: bool = True) -> float:
    return 8 * weight_bytes(fmt, n_out, k, codes) / (n_out * k)


def measure_in_rounds(runs: dict, copies: dict, repeats: int, budget_s: float) -> dict:
    """Median seconds per layer of every contender of one row, measured in ``ROUNDS`` rounds: in each round
    every contender runs a block of its repeats, so each is sampled at several moments spread over the row
    and a minute of slower memory on this shared machine moves all of them, not only the one that ran then.

    Each block starts with untimed calls for at least ``SETTLE_S``: the previous runtime's worker threads
    stop spinning meanwhile, and a cache-resident contender's weights come back into the cache. Blocks, not
    single calls, alternate: alternating single calls between onnxruntime sessions made their spinning
    workers take the cores from each other (MatMulNBits-4 at 4096x4096 ran 4x slower that way)."""
    def settle(run):
        start = time.perf_counter()
        while time.perf_counter() - start < SETTLE_S:
            run()

    first = {}
    for name, run in runs.items():
        settle(run)  # warm-up: first-call allocations, page faults, thread pools
        first[name] = timed(run)
    times = {name: [t] for name, t in first.items()}
    for _ in range(ROUNDS):
        for name, run in runs.items():
            per_block = max(1, min(repeats, int(budget_s / max(first[name], 1e-6))) // ROUNDS)
            settle(run)
            times[name] += [timed(run) for _ in range(per_block)]
    return {name: float(np.median(t)) / copies[name] for name, t in times.items()}


def int8_here() -> bool:
    """Whether this machine's x86 target has int8-activation kernels."""
    from pbs2pc.compiler.targets import get_preset
    from pbs2pc.passes.kernels import registry

    return "int8" in registry.activations_offered(get_preset("x86"))


def run_benchmark(args) -> dict:
    import onnxruntime
    import torch

    from pbs2pc.compiler.tvm_compat import TVM_VERSION

    os.environ.setdefault("TVM_NUM_THREADS", str(THREADS))
    rng = np.random.default_rng(0)
    llc = llc_bytes()
    print(f"CPU: {cpu_model()}, LLC {llc / 2**20:.0f} MiB", flush=True)
    bw = stream(args.stream_gib, 3 if args.quick else 5)
    print(f"bandwidth GB/s: copy {bw['copy']}, triad {bw['triad']}, read {bw['read']}, "
          f"read of rotating 16 MiB arrays {bw['read_rotating']}", flush=True)
    nbits = [b for b in (4, 2) if ort_supports(b)]
    codes = layout_has_codes(None)  # this machine's x86 target: its layout decides pbs2pc's bytes
    formats = [f"pbs2pc_u{bits}" for bits in args.layouts]
    formats += ["pbs2pc_u8_planes", "pbs2pc_te"] if 8 in args.layouts else []
    formats += ["pbs2pc_v2"] if args.v2 else []
    formats += ["pbs2pc_int8", "pbs2pc_int8_planes"] if args.int8 and int8_here() else []
    formats += ["torch_fp32", "ort_fp32"] + [f"ort_nbits{b}_acc{lvl}" for b in nbits for lvl in (0, 4)]
    formats += [f"ort_nbits4_b{NBITS_DEFAULT_BLOCK}_acc{lvl}" for lvl in (0, 4)] if 4 in nbits else []
    shapes = SHAPES[:1] + SHAPES[6:7] if args.quick else SHAPES
    if args.shapes:
        shapes = [s for s in SHAPES if f"{s[0]}x{s[1]}" in args.shapes.split(",")]
    rows_list = [1] if args.quick else args.rows
    results = []
    for n_out, k, label in shapes:
        for rows in rows_list:
            runs, info = {}, {}
            for fmt in formats:
                if fmt.startswith("pbs2pc_u") and pbs2pc_variant(fmt)[0] != 32 and rows not in args.alt_layout_rows:
                    continue
                if fmt.endswith("_planes") and rows > 1:
                    continue  # planes instead of codes: a one-row comparison (the GEMMs read planes anyway)
                if fmt in ("ort_nbits2_acc0", f"ort_nbits4_b{NBITS_DEFAULT_BLOCK}_acc0") and rows > 1:
                    continue  # ORT's fp32-compute paths: 2-bit ~100x slower than int8; block 32 at M = 1 only
                wbytes = weight_bytes(fmt, n_out, k, codes)
                copies, resident = copies_for(wbytes, llc, args.max_copies)
                t_build = time.perf_counter()
                extra = {}
                if fmt.startswith("pbs2pc"):
                    # (not ``codes``: that is the target layout's, which weight_bytes of later formats reads)
                    bits, fmt_codes, activations, lut = pbs2pc_variant(fmt)
                    run, extra = pbs2pc_runner(n_out, k, rows, copies, bits, rng, args.interleave, activations=activations,
                                               lut=lut, mask_codes=fmt_codes, v2=fmt == "pbs2pc_v2")
                elif fmt == "torch_fp32":
                    run, extra = torch_runner(n_out, k, rows, copies, rng)
                elif fmt == "ort_fp32":
                    run, extra = ort_runner(n_out, k, rows, copies, rng)
                else:
                    (b, block), lvl = nbits_format(fmt), int(fmt.split("acc")[1])
                    run, extra = ort_runner(n_out, k, rows, copies, rng, bits=b, accuracy_level=lvl, block=block)
                runs[fmt] = run
                info[fmt] = (wbytes, copies, resident, time.perf_counter() - t_build, extra)
            seconds = measure_in_rounds(runs, {f: info[f][1] for f in runs}, args.repeats, args.budget)
            del runs
            act = 4.0 * rows * (k + n_out)
            for fmt, (wbytes, copies, resident, build_s, extra) in info.items():
                floor = (wbytes + act) / (bw["triad"] * 1e9)
                row = {
                    "N": n_out, "K": k, "label": label, "M": rows, "format": fmt,
                    "G": (nbits_format(fmt)[1] if fmt.startswith("ort_nbits") else None) or group_size(k),
                    "bits_per_weight": round(bits_per_weight(fmt, n_out, k, codes), 4), "us": round(seconds[fmt] * 1e6, 2),
                    "floor_us": round(floor * 1e6, 2), "of_floor": round(floor / seconds[fmt], 3),
                    "GBps": round((wbytes + act) / seconds[fmt] / 1e9, 2),
                    "GFLOPs": round(2 * rows * n_out * k / seconds[fmt] / 1e9, 2),
                    "copies": copies, "working_set_MB": round(copies * wbytes / 1e6, 1),
                    "cache_resident": resident, "setup_s": round(build_s, 1), **extra,
                }
                results.append(row)
                print(f"{n_out:>6}x{k:<6} M={rows:<4} {fmt:<19} {row['us']:>10.1f} us  floor {row['floor_us']:>9.1f} us "
                      f"({100 * row['of_floor']:5.1f}%)  copies {copies}{' cache-resident' if resident else ''}",
                      flush=True)
    return {
        **machine_record(), "cpu": cpu_model(), "cores": os.cpu_count(), "llc_bytes": llc, "threads": THREADS,
        "bandwidth": bw, "floor_bandwidth": "triad", "ort_nbits_cpu_bits": nbits,
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "tvm": TVM_VERSION,
                     "python": platform.python_version()},
        "command": "python benchmarks/kernel_bench.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M"), "repeats": args.repeats, "results": results,
    }


# --------------------------------------------------------------------------------------------------------
# report


def recompute_floors(data: dict) -> None:
    """Bits per weight, floors and fractions of the floor from ``data["bandwidth"]["triad"]`` (after a
    re-measurement, or a change of how a format's bytes are counted)."""
    bw = data["bandwidth"]["triad"] * 1e9
    codes = layout_has_codes(data.get("x86_isa", "x86-avx512"))  # runs before the ISA was recorded: AVX-512
    for row in data["results"]:
        row["bits_per_weight"] = round(bits_per_weight(row["format"], row["N"], row["K"], codes), 4)
        moved = weight_bytes(row["format"], row["N"], row["K"], codes) + 4.0 * row["M"] * (row["K"] + row["N"])
        row["floor_us"] = round(moved / bw * 1e6, 2)
        row["of_floor"] = round(row["floor_us"] / row["us"], 3)


def table(data: dict) -> str:
    """Markdown: one row per (shape, M), microseconds per format, speedups of pbs2pc (the x86 preset's
    plane layout) over each."""
    from pbs2pc.compiler.targets import CompileOptions, get_preset
    from pbs2pc.passes.kernels import registry

    default = f"pbs2pc_u{registry.target_layout(get_preset('x86'), CompileOptions()).word_bits}"
    res = data["results"]
    fmts = [f for f in dict.fromkeys(r["format"] for r in res)]
    b32 = f"_b{NBITS_DEFAULT_BLOCK}_"
    head = ["N x K", "M"] + [f"{f} µs" for f in fmts] + ["pbs2pc % floor", "× TE kernel", "× torch", "× ORT fp32",
                                                        "× best NBits-4", "× best NBits-4 b32"]
    int8 = "pbs2pc_int8" in fmts
    if int8:
        head += ["int8 % floor", "int8 × torch", "int8 × best NBits-4", "int8 × best NBits-4 b32"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = list(dict.fromkeys((r["N"], r["K"], r["M"]) for r in res))
    for n_out, k, rows in keys:
        cell = {r["format"]: r for r in res if (r["N"], r["K"], r["M"]) == (n_out, k, rows)}
        ours = cell.get(default)

        def fmt_us(f):
            if f not in cell:
                return "—"
            return f"{cell[f]['us']:.1f}" + (" (c)" if cell[f]["cache_resident"] else "")

        def ratio(f):
            return f"{cell[f]['us'] / ours['us']:.2f}×" if ours and f in cell else "—"

        def fastest(names):
            return min(names, key=lambda f: cell[f]["us"]) if names else None

        best4 = fastest([f for f in cell if f.startswith("ort_nbits4") and b32 not in f])  # block = G
        best4_b32 = fastest([f for f in cell if f.startswith("ort_nbits4") and b32 in f])
        cols = [f"{n_out}×{k}", str(rows)] + [fmt_us(f) for f in fmts] + [
            f"{100 * ours['of_floor']:.0f}%" if ours else "—", ratio("pbs2pc_te"), ratio("torch_fp32"),
            ratio("ort_fp32")] + [
            ratio(f) if f else "—" for f in (best4, best4_b32)]
        if int8:
            q = cell.get("pbs2pc_int8")
            cols += [f"{100 * q['of_floor']:.0f}%" if q else "—"] + [
                f"{cell[f]['us'] / q['us']:.2f}×" if q and f else "—" for f in ("torch_fp32", best4, best4_b32)]
        lines.append("| " + " | ".join(cols) + " |")
    return "\n".join(lines)


def plot(data: dict, path: Path) -> bool:
    """Roofline: achieved GFLOP/s against arithmetic intensity (FLOP per byte moved), M = 1, 16, 128."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return False
    res = data["results"]
    bw = data["bandwidth"]["triad"]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ai = np.logspace(-1.5, 2.5, 100)
    ax.plot(ai, bw * ai, "k-", lw=1, label=f"memory roof: triad {bw:.0f} GB/s")
    peak = 2 * 32 * 2.6  # 2 cores x one 512-bit FMA (32 flop) per cycle x 2.6 GHz base clock (boost is higher)
    ax.axhline(peak, color="gray", ls="--", lw=1, label=f"fp32 FMA at 2.6 GHz base ≈ {peak:.0f} GFLOP/s")
    styles = {"pbs2pc_u32": ("C3", "o"), "pbs2pc_u8": ("C1", "o"), "pbs2pc_u8_planes": ("C1", "x"),
              "pbs2pc_te": ("C8", "o"), "pbs2pc_int8": ("C9", "D"), "pbs2pc_int8_planes": ("C9", "x"), "torch_fp32": ("C0", "s"), "ort_fp32": ("C2", "s"),
              "ort_nbits4_acc0": ("C4", "^"), "ort_nbits4_acc4": ("C5", "v"), "ort_nbits2_acc0": ("C6", "^"),
              "ort_nbits2_acc4": ("C7", "v"), f"ort_nbits4_b{NBITS_DEFAULT_BLOCK}_acc0": ("C4", "<"),
              f"ort_nbits4_b{NBITS_DEFAULT_BLOCK}_acc4": ("C5", ">")}
    for fmt in dict.fromkeys(r["format"] for r in res):
        pts = [r for r in res if r["format"] == fmt]
        x = [2 * r["M"] * r["N"] * r["K"] / ((r["GBps"] * 1e9) * r["us"] * 1e-6) for r in pts]
        y = [r["GFLOPs"] for r in pts]
        color, marker = styles.get(fmt, ("k", "x"))
        ax.scatter(x, y, c=color, marker=marker, s=[18 + 10 * np.log2(r["M"]) for r in pts], label=fmt, alpha=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP per byte of weights + activations)")
    ax.set_ylabel("achieved GFLOP/s")
    ax.set_title(f"Single linear layers, {data['cpu']}, {data['threads']} threads (marker size ~ M)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 shapes, M = 1, small STREAM arrays")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the table and plot from the JSON")
    parser.add_argument("--shapes", default="", help="comma-separated NxK subset, e.g. 11008x4096,4096x11008")
    parser.add_argument("--rows", type=int, nargs="+", default=ROWS, help="values of M")
    parser.add_argument("--layouts", type=int, nargs="+", default=[32, 8], help="plane word widths to compare")
    parser.add_argument("--interleave", type=int, default=None,
                        help="rows per interleaved block of planes and scales (0: row-major); "
                             "default: the x86 preset's")
    parser.add_argument("--alt-layout-rows", type=int, nargs="+", default=[1, 16, 128],
                        help="M values at which layouts other than uint32 are measured")
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats per row (median)")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timing per contender and row at most")
    parser.add_argument("--max-copies", type=int, default=64, help="weight copies rotated at most")
    parser.add_argument("--stream-gib", type=float, default=2.0, help="GiB per STREAM array")
    parser.add_argument("--remeasure-bandwidth", action="store_true",
                        help="with --report-only: measure STREAM again, keep the higher figures, recompute floors "
                             "(on a shared machine the first measurement can be depressed by other load)")
    parser.add_argument("--no-int8", dest="int8", action="store_false",
                        help="skip the int8-activation kernels (pbs2pc_int8)")
    parser.add_argument("--no-v2", dest="v2", action="store_false",
                        help="skip the op contract v2 layers (pbs2pc_v2: 2 groups, 4 of 64 salient columns)")
    parser.add_argument("-o", "--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.stream_gib = min(args.stream_gib, 0.25)
        args.repeats = min(args.repeats, 5)
        if args.output == RESULTS:
            args.output = RESULTS.with_name("kernels_quick.json")
    if args.report_only:
        data = json.loads(args.output.read_text())
        if args.remeasure_bandwidth:
            again = stream(args.stream_gib, 5)
            print(f"bandwidth again GB/s: copy {again['copy']}, triad {again['triad']}, read {again['read']}")
            data["bandwidth_runs"] = data.get("bandwidth_runs", [dict(data["bandwidth"])]) + [again]
            for key in ("copy", "triad", "read"):
                data["bandwidth"][key] = max(run[key] for run in data["bandwidth_runs"])
        recompute_floors(data)
        args.output.write_text(json.dumps(data, indent=1) + "\n")
    else:
        data = run_benchmark(args)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(data, indent=1) + "\n")
    bw = data["bandwidth"]
    md = (f"Bandwidth (GB/s, 2 threads): triad {bw['triad']} (2 GiB arrays; the floors use it), read "
          f"{bw['read']}, read of rotating 16 MiB arrays {bw.get('read_rotating', '—')}.\n\n" + table(data))
    print(md)
    if not args.quick:
        (args.output.with_suffix(".md")).write_text(md + "\n")
        if args.output == RESULTS:  # a subset written elsewhere leaves the full run's plot alone
            plot(data, DOCS / "kernels_roofline.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
