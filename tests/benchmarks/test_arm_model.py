"""benchmarks/arm.py: the loop extraction on known listings, llvm-mca where it is new enough, the NEON kernels' and
llama.cpp's hot loops where their tools are here."""

from __future__ import annotations

import shutil

import pytest

from benchmarks import arm, loop_model

# An LLVM-style listing: a table loop in the main function, a nest in the parallel lambda (32 groups of 8 steps).
LLVM = """
\t.type\tkernel,@function
kernel:
\tmov\tx8, xzr
.LBB0_1:
\ttbl\tv0.16b, { v1.16b }, v2.16b
\tadd\tx8, x8, #1
\tcmp\tx8, #512
\tb.ne\t.LBB0_1
\tret
\t.type\t.L__tvm_parallel_lambda,@function
.L__tvm_parallel_lambda:
\tmov\tx17, xzr
.LBB4_3:
\tmovi\tv24.2d, #0000000000000000
\tmov\tw6, #8
\t.p2align\t5, , 16
.LBB4_4:
\tldp\tq31, q28, [x4]
\ttbl\tv9.16b, { v30.16b }, v29.16b
\ttbl\tv12.16b, { v30.16b }, v11.16b
\tadd\tv6.16b, v15.16b, v6.16b
\tsubs\tx6, x6, #1
\tadd\tx4, x4, #32
\tb.ne\t.LBB4_4
\tfcvtl\tv2.4s, v1.4h
\tadd\tx17, x17, #1
\tcmp\tx17, #32
\tb.ne\t.LBB4_3
\tret
"""

# A GCC-style listing: the bound is the caller's n (a register), then a scalar tail loop.
GCC = """
\t.type\tdot, %function
dot:
\tcmp\tw0, 63
\tble\t.L43
\tmov\tw7, 0
.L40:
\tldr\tq1, [x4, 2]
\tsdot\tv1.4s, v19.16b, v24.16b
\tsdot\tv0.4s, v18.16b, v23.16b
\tadd\tw7, w7, 2
\tcmp\tw8, w6
\tbgt\t.L40
\tfaddp\tv20.4s, v20.4s, v20.4s
.L42:
\tldrb\tw4, [x2, 3]
\tmadd\tw9, w9, w7, w6
\tldrb\tw3, [x2, 2]
\tmadd\tw5, w5, w11, w4
\tadd\tx2, x2, 1
\tcmp\tx2, x8
\tbne\t.L42
.L43:
\tret
"""


def test_loops_and_nesting():
    loops = loop_model.find_loops(LLVM)
    assert sorted(loop.label for loop in loops) == [".LBB0_1", ".LBB4_3", ".LBB4_4"]
    inner = next(loop for loop in loops if loop.label == ".LBB4_4")
    assert inner.parent.label == ".LBB4_3" and inner.function == ".L__tvm_parallel_lambda"
    assert [loop.label for loop in loop_model.innermost(loops)] == [".LBB0_1", ".LBB4_4"]
    # the table loop has fewer tbl; restricted to the parallel region it is not a candidate at all
    assert loop_model.hot_loop(loops, "tbl").label == ".LBB4_4"
    assert loop_model.hot_loop(loops, "tbl", "parallel").label == ".LBB4_4"
    own = [i.mnemonic for i in loop_model.own_instructions(inner.parent)]
    assert own == ["movi", "mov", "fcvtl", "add", "cmp", "b.ne"]
    with pytest.raises(ValueError):
        loop_model.hot_loop(loops, "sdot")


def test_trip_counts():
    loops = {loop.label: loop for loop in loop_model.find_loops(LLVM)}
    assert loop_model.trip_count(LLVM, loops[".LBB4_4"]) == 8  # mov w6, #8; subs x6, x6, #1
    assert loop_model.trip_count(LLVM, loops[".LBB4_3"]) == 32  # mov x17, xzr; add #1; cmp #32
    assert loop_model.trip_count(LLVM, loops[".LBB0_1"]) == 512
    gcc = loop_model.find_loops(GCC)
    hot = loop_model.hot_loop(gcc, "sdot")
    assert hot.label == ".L40" and loop_model.count(hot.body, "sdot") == 2
    assert loop_model.trip_count(GCC, hot) is None  # the bound is a register
    assert [loop.label for loop in loop_model.innermost(gcc)] == [".L40", ".L42"]  # "bne" is a branch too


def test_missing_llvm_mca_is_one_sentence(capsys):
    with pytest.raises(loop_model.ToolMissing):
        loop_model.find_llvm_mca("/nonexistent/llvm-mca")
    assert arm.main(["--llvm-mca", "/nonexistent/llvm-mca"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "llvm-mca" in err[0]


def _llvm_mca():
    try:
        return loop_model.find_llvm_mca()[0]
    except loop_model.ToolMissing:
        pytest.skip("no llvm-mca 17 or newer here (apt-get install llvm-19)")


def test_mca_models_a_load_bound_fp32_loop():
    exe = _llvm_mca()
    # TVM's fp32 GEMV loop: 4 accumulators, 8 ldp of two q registers, 8 fmla
    body = "\n".join([line for a, b in ((4, 3), (2, 1)) * 2 for line in (
        "ldp\tq5, q6, [x14]", "ldp\tq7, q16, [x13]", f"fmla\tv{a}.4s, v7.4s, v5.4s", f"fmla\tv{b}.4s, v16.4s, v6.4s")]
        + ["subs\tx15, x15, #2", "add\tx14, x14, #128", "add\tx13, x13, #128", "b.ne\t.LBB4_3"])
    insns = [loop_model.Insn(k, line.split()[0], "", line) for k, line in enumerate(body.splitlines())]
    report = loop_model.mca(exe, insns)
    # 16 q loads on the N1's two load pipes: 8 cycles (LLVM 14's Cortex-A57 tables say 16)
    assert 7.5 <= report["cycles_per_iteration"] <= 9.0
    assert "N1UnitL" in report["busiest"]


def test_neon_kernel_hot_loop_matches_its_documented_step():
    from pbs2pc.passes.kernels.arm_neon import sparse_binary_gemv_int8 as v1

    N, K, G = 512, 1024, 128  # N K = 2^19: the parallel path
    for mask, per_tbl in ((True, 16), (False, 32)):
        step = v1.TILES_PER_TASK[mask] * v1.INTERLEAVE * v1.COLUMNS_PER_STEP  # tiles per task: by mask plane
        asm = arm.tvm_asm(v1.gemv_int8(N, K, G, mask, True, False))
        loop = loop_model.hot_loop(loop_model.find_loops(asm), "tbl", "parallel")
        weights = loop_model.count(loop.body, "tbl") * per_tbl
        assert weights % step == 0
        trips = loop_model.trip_count(asm, loop)
        assert trips is not None and trips * weights == v1.TILES_PER_TASK[mask] * v1.INTERLEAVE * G  # a group per entry


def test_fp32_gemv_loop_is_vector_fmla():
    asm = arm.tvm_asm(arm.fp32_gemv(64, 4096))  # a short K would be unrolled whole
    loop = loop_model.hot_loop(loop_model.find_loops(asm), "fmla", "parallel")
    fmla = loop_model.count(loop.body, "fmla", r"v\d+\.4s, v\d+\.4s, v\d+\.4s$")
    assert fmla and fmla * 4 % 16 == 0
    assert loop_model.trip_count(asm, loop) * fmla * 4 == 4096


@pytest.mark.skipif(shutil.which(arm.GCC) is None, reason=f"{arm.GCC} is not installed")
def test_llama_cpp_q4_0_loop_uses_sdot():
    try:
        asm, _ = arm.llama_asm("src/ggml-cpu/arch/arm/quants.c")
    except loop_model.ToolMissing as exc:
        pytest.skip(str(exc))
    dot = arm._function_asm(asm, "ggml_vec_dot_q4_0_q8_0")
    loop = loop_model.hot_loop(loop_model.find_loops(dot), "sdot")
    assert loop_model.count(loop.body, "sdot") * 16 == 64  # two blocks of 32 per iteration
