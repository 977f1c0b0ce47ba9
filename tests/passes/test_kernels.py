"""The pbs2p TE kernel and the CPU schedule rules: numerics against numpy, structure, and x86 assembly.

Every numeric check builds with the schedule rules applied for the x86 preset target and compares with a
float64 numpy reference (``PackedLinear.matmul`` for the kernel). Builds are small, so the whole file runs
in well under a minute on two cores.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tvm_compat = pytest.importorskip("pbs2pc.compiler.tvm_compat")

from pbs2pc.compiler.tvm_compat import dlight, relax, te, tirx, tvm  # noqa: E402
from pbs2pc.models.format import NMScheme  # noqa: E402
from pbs2pc.models.simple import compress_weight  # noqa: E402
from pbs2pc.passes.interleave_rows import interleave_array  # noqa: E402
from pbs2pc.passes.kernels.sparse_binary_linear import pbs2p_info, sparse_binary_linear  # noqa: E402
from pbs2pc.passes.schedules import cpu_rules  # noqa: E402
from testutil import AVX2_TARGET, AVX512_TARGET, host_target, legalize_and_fuse  # noqa: E402
from pbs2pc.passes.schedules.cpu_fallback import Fallback  # noqa: E402
from pbs2pc.passes.schedules.cpu_matmul import Matmul  # noqa: E402
from pbs2pc.passes.schedules.cpu_pbs2p import SparseBinaryLinear  # noqa: E402

#: Numerics run on this machine's best x86 target; the assembly tests name each ISA (compile-only).
TARGET = host_target()
TOL = 1e-5


# --------------------------------------------------------------------------------------------------------
# helpers


def packed(n_out, k, n, m, g, mu=True, bias=True, seed=0):
    """A valid PackedLinear from a random float weight (never zeros)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, k, generator=gen)
    b = torch.randn(n_out, generator=gen) if bias else None
    layer = compress_weight(w, NMScheme(n, m, g), bias=b)
    return layer if mu else dataclasses.replace(layer, mu=None)


def kernel_func(layer, rows, word="uint8", interleave=0):
    """The PrimFunc the Relax pass creates with ``call_te`` (same attribute), M static or symbolic.

    ``interleave=T``: planes and scales come row-interleaved, ``[N/T, C, T]`` (the x86 target layout).
    """
    n_out, k, g, bits = layer.out_features, layer.in_features, layer.scheme.group_size, int(word[4:])

    def weight(cols, dtype, name):
        shape = (n_out // interleave, cols, interleave) if interleave else (n_out, cols)
        return te.placeholder(shape, dtype, name)

    x = te.placeholder((rows, k), "float32", "x")
    sign = weight(k // bits, word, "sign")
    mask = None if layer.mask is None else weight(k // bits, word, "mask")
    alpha = weight(k // g, "float16", "alpha")
    mu = None if layer.mu is None else weight(k // g, "float16", "mu")
    bias = None if layer.bias is None else te.placeholder((n_out,), "float32", "bias")
    y = sparse_binary_linear(x, sign, mask, alpha, mu, bias, n=layer.scheme.n, m=layer.scheme.m, group_size=g)
    func = te.create_prim_func([t for t in (x, sign, mask, alpha, mu, bias) if t is not None] + [y])
    info = pbs2p_info(layer.scheme.n, layer.scheme.m, g, mask is not None, mu is not None, bias is not None)
    return func.with_attr("pbs2p_info", info)


def schedule(mod, target=None):
    with target or TARGET:
        return dlight.ApplyDefaultSchedule(*cpu_rules())(mod)


def build_kernel(layer, rows, word="uint8", interleave=0, target=None):
    target = target or TARGET
    mod = schedule(tvm.IRModule({"main": kernel_func(layer, rows, word, interleave)}), target)
    assert mod["main"].attrs.get("tirx.is_scheduled"), "no rule scheduled the pbs2p kernel"
    return tvm.compile(mod, target=target)


def run_kernel(ex, layer, rows, word="uint8", seed=1, interleave=0):
    x = np.random.default_rng(seed).standard_normal((rows, layer.in_features)).astype("float32")
    planes = [None if p is None else np.ascontiguousarray(p).view(word) for p in (layer.sign, layer.mask)]
    weights = [*planes, layer.alpha, layer.mu]
    if interleave:
        weights = [None if w is None else interleave_array(w, interleave) for w in weights]
    args = [a for a in (x, *weights, layer.bias) if a is not None]
    out = tvm_compat.tensor(np.zeros((rows, layer.out_features), "float32"))
    ex["main"](*[tvm_compat.tensor(a) for a in args], out)
    return out.numpy(), layer.matmul(x)


def rel_err(got, ref):
    return float(np.abs(got.astype(np.float64) - ref).max() / np.abs(ref).max())


def which_rule(func):
    for rule in cpu_rules():
        if rule.apply(func, TARGET, False) is not None:
            return type(getattr(rule, "rule", rule)).__name__
    return None


# --------------------------------------------------------------------------------------------------------
# the pbs2p kernel

SCHEMES = [
    # (n, m, group_size, mu, bias): every N:M, both group sizes, each optional input on and off.
    (2, 4, 64, True, False),
    (4, 8, 128, False, True),
    (5, 8, 64, True, True),
    (6, 8, 128, True, True),
    (6, 8, 64, False, False),
    (8, 8, 128, True, False),  # n == m: the mask plane is omitted
]


@pytest.mark.parametrize("n,m,g,mu,bias", SCHEMES)
def test_kernel_symbolic_m_one_build(n, m, g, mu, bias):
    """One build with symbolic M (the GEMM schedule, padded) serves every sequence length."""
    layer = packed(192, 256, n, m, g, mu, bias)
    assert (layer.mask is None) == (n == m)
    ex = build_kernel(layer, tirx.Var("m", "int64"))
    for rows in (1, 2, 3, 17, 128):
        got, ref = run_kernel(ex, layer, rows, seed=rows)
        assert rel_err(got, ref) < TOL, (rows, rel_err(got, ref))


@pytest.mark.parametrize("n,m,g,mu,bias", SCHEMES)
def test_kernel_gemv(n, m, g, mu, bias):
    """Static M == 1: the GEMV schedule (decode inlined, lanes over output rows)."""
    layer = packed(320, 512, n, m, g, mu, bias, seed=3)
    got, ref = run_kernel(build_kernel(layer, 1), layer, 1)
    assert rel_err(got, ref) < TOL


@pytest.mark.parametrize("rows", [2, 3, 17, 128])
def test_kernel_static_m(rows):
    """Static M: exact tiles, fewer rows than a tile, and a ragged M that needs padding."""
    layer = packed(256, 384, 5, 8, 128, seed=rows)
    got, ref = run_kernel(build_kernel(layer, rows), layer, rows)
    assert rel_err(got, ref) < TOL


@pytest.mark.parametrize("out_features", [1000, 1001])
@pytest.mark.parametrize("rows", [1, 17])
def test_kernel_odd_out_features(out_features, rows):
    """N = 1000 (8 divides it: narrower tiles) and N = 1001 (no tile: the plain schedule)."""
    layer = packed(out_features, 128, 6, 8, 64, seed=out_features)
    got, ref = run_kernel(build_kernel(layer, rows), layer, rows)
    assert rel_err(got, ref) < TOL


@pytest.mark.parametrize("word", ["uint32", "uint16"])
@pytest.mark.parametrize("n,m,g,mu,bias", SCHEMES)
def test_kernel_word_planes(n, m, g, mu, bias, word):
    """The x86 target layout: planes viewed as little-endian uint16/uint32 words give the same result.

    Every N:M, static M == 1 (GEMV) and one symbolic-M build run at M = 1, 2, 3, 17, 128 (GEMM, padded).
    """
    layer = packed(128, 256, n, m, g, mu, bias, seed=7)
    got, ref = run_kernel(build_kernel(layer, 1, word=word), layer, 1, word=word)
    assert rel_err(got, ref) < TOL
    ex = build_kernel(layer, tirx.Var("m", "int64"), word=word)
    for rows in (1, 2, 3, 17, 128):
        got, ref = run_kernel(ex, layer, rows, word=word, seed=rows)
        assert rel_err(got, ref) < TOL, (rows, rel_err(got, ref))


@pytest.mark.parametrize("word", ["uint8", "uint32"])
@pytest.mark.parametrize("n,m,g,mu,bias", SCHEMES)
def test_kernel_interleaved_rows(n, m, g, mu, bias, word):
    """The x86 target layout: planes (bytes, the x86 default, or uint32 words) and fp16 scales
    row-interleaved as [N/16, C, 16].

    Every N:M, with and without mu and bias: static M == 1 (GEMV, contiguous word and scale loads), a
    static M = 17 (GEMM, padded) and one symbolic-M build at M = 1, 2, 3, 17, 128 (GEMM).
    """
    layer = packed(320, 512, n, m, g, mu, bias, seed=13)
    for rows in (1, 17):
        got, ref = run_kernel(build_kernel(layer, rows, word, 16), layer, rows, word, interleave=16)
        assert rel_err(got, ref) < TOL, (rows, rel_err(got, ref))
    ex = build_kernel(layer, tirx.Var("m", "int64"), word, 16)
    for rows in (1, 2, 3, 17, 128):
        got, ref = run_kernel(ex, layer, rows, word, seed=rows, interleave=16)
        assert rel_err(got, ref) < TOL, (rows, rel_err(got, ref))


def test_interleaved_gemv_reads_in_place():
    """With interleaved inputs the GEMV stages no per-row gathers: words and scales are read where they are."""
    layer = packed(256, 256, 6, 8, 64)
    plain = schedule(tvm.IRModule({"main": kernel_func(layer, 1, "uint32")}))["main"].script()
    inter = schedule(tvm.IRModule({"main": kernel_func(layer, 1, "uint32", 16)}))["main"].script()
    assert "sign_global" in plain and "alpha_global" in plain  # the gathers of the row-major layout
    assert "_global[" not in inter.replace("matmul_global[", ""), inter
    # Any block T that divides N reads correctly, even one narrower than the vector (N = 1000, T = 8, tiles of 8).
    odd = packed(1000, 128, 5, 8, 64, seed=5)
    for rows in (1, 17):
        got, ref = run_kernel(build_kernel(odd, rows, "uint32", 8), odd, rows, "uint32", interleave=8)
        assert rel_err(got, ref) < TOL


@pytest.mark.parametrize("static_rows", [None, 1])
def test_kernel_found_by_structure_after_fusion(static_rows):
    """FuseTIR drops PrimFunc attributes; the rule still finds decode -> matmul -> fused SiLU."""
    layer = packed(128, 256, 6, 8, 64, mu=True, bias=True, seed=11)
    seq = tirx.Var("s", "int64") if static_rows is None else static_rows
    bb = relax.BlockBuilder()
    params = [
        relax.Var("x", relax.TensorType((seq, 256), "float32")),
        relax.Var("sign", relax.TensorType((128, 32), "uint8")),
        relax.Var("mask", relax.TensorType((128, 32), "uint8")),
        relax.Var("alpha", relax.TensorType((128, 4), "float16")),
        relax.Var("mu", relax.TensorType((128, 4), "float16")),
        relax.Var("bias", relax.TensorType((128,), "float32")),
    ]
    with bb.function("main", params):
        with bb.dataflow():
            y = bb.emit(bb.call_te(sparse_binary_linear, *params, n=6, m=8, group_size=64,
                                   primfunc_attrs={"pbs2p_info": pbs2p_info(6, 8, 64, True, True, True)}))
            out = bb.emit_output(bb.emit(relax.op.nn.silu(y)))
        bb.emit_func_output(out)
    mod = legalize_and_fuse(bb.get())
    fused = [f for _, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)]
    assert len(fused) == 1 and "pbs2p_info" not in fused[0].attrs
    assert which_rule(fused[0]) == "SparseBinaryLinear"
    x = np.random.default_rng(0).standard_normal((static_rows or 9, 256)).astype("float32")
    ref = layer.matmul(x)
    got = _run_relax(schedule(mod), [x, layer.sign, layer.mask, layer.alpha, layer.mu, layer.bias])
    assert rel_err(got, ref / (1 + np.exp(-ref))) < TOL


def test_pbs2p_rule_declines_other_functions():
    layer = packed(64, 128, 6, 8, 64)
    func = kernel_func(layer, 4)
    assert SparseBinaryLinear().apply(func, tvm.target.Target("cuda"), False) is None
    dense = legalize_and_fuse(_matmul_module((4, 128), (128, 64)))
    assert all(SparseBinaryLinear().apply(f, TARGET, False) is None
               for _, f in dense.functions_items() if isinstance(f, tirx.PrimFunc))


def test_no_dense_weight_copy_in_global_memory():
    """The decoded weight only ever exists as a per-tile scratch buffer, never as an [N, K] array."""
    import tvm_ffi
    from tvm.s_tir import transform as st

    layer = packed(512, 256, 6, 8, 64)
    lower = tvm.ir.transform.Sequential([st.LowerInitBlock(), st.PlanAndUpdateBufferAllocationLocation(),
                                         st.ConvertBlocksToOpaque(), st.CompactBufferAllocation(),
                                         st.LowerOpaqueBlock()])
    for rows in (1, tirx.Var("m", "int64")):
        mod = lower(tvm.tirx.transform.BindTarget(TARGET)(schedule(tvm.IRModule({"main": kernel_func(layer, rows)}))))
        sizes = {}

        def visit(node, sizes=sizes):
            sizes[node.buffer.name] = int(np.prod([int(d) for d in node.buffer.shape]))

        tvm_ffi.structural_walk(mod["main"].body, (tirx.stmt.AllocBuffer, visit), order="post")
        assert sizes and max(sizes.values()) <= 256 * 64, sizes


@pytest.mark.parametrize("word,interleave", [("uint8", 0), ("uint32", 0), ("uint32", 16), ("uint8", 16)])
def test_x86_assembly_uses_mask_registers_and_zmm(word, interleave):
    """Compile-only: the instructions the kernel design relies on are in the generated x86 code.

    Each weight bit becomes an AVX-512 mask register through ``vptestm{b,d}``/``vptestnm{b,d}`` (a
    vector of plane bytes or words tested against a constant bit), the kept/pruned and +/- choices are blends or masked
    moves on zmm registers, and the products accumulate with 512-bit ``vfmadd``. Both schedules (GEMV at
    M == 1, register-tiled GEMM for symbolic M) are checked. With row-interleaved planes and scales (the
    x86 target layout) the GEMV loads the 16 rows' plane bytes with one 128-bit move (uint32 words: one
    512-bit move), converts each scale vector with one ``vcvtph2ps`` from memory, and never gathers (no
    ``vpgather``, no ``vpinsrw`` lane inserts).
    """
    import re

    gather = r"vpgather|vpinsrw\s+\$\d+, -?\d*\(%"  # a gather, or a lane insert from memory
    layer = packed(256, 256, 6, 8, 64)
    for rows in (1, tirx.Var("m", "int64")):
        asm = build_kernel(layer, rows, word=word, interleave=interleave,
                           target=tvm.target.Target(AVX512_TARGET)).mod.inspect_source("asm")
        assert re.search(r"vptestn?m[bd]\s+.*%k\d", asm), "no bit test into a mask register"
        assert re.search(r"vblendmps\s+.*%zmm|vmovaps\s+%zmm\d+, %zmm\d+ \{%k\d\}", asm), "no masked blend"
        assert re.search(r"vfmadd\d+ps\s+.*%zmm", asm), "no 512-bit FMA"
        if interleave and rows == 1:
            assert not re.search(gather, asm), "the interleaved GEMV still gathers"
            if word == "uint32":  # 16 rows' words: one 512-bit load
                assert re.search(r"vmovdq[au]\d*\s+-?\d*\(%\w+,%\w+\), %zmm", asm), "no 512-bit word load"
            else:  # 16 rows' bytes: one 128-bit load, then each bit is one vptest(n)mb into a mask register
                assert re.search(r"vmovdq[au]\d*\s+-?\d*\(%\w+,%\w+\), %xmm", asm), "no 128-bit byte load"
                assert re.search(r"vptestn?mb\s+%xmm\d+, %xmm\d+, %k\d", asm), "no byte test over 16 rows"
            assert re.search(r"vcvtph2ps\s+-?\d*\(%\w+,%\w+(,\d)?\), %zmm", asm), "no fp16 scale vector load"
        elif word == "uint32" and rows == 1:
            assert re.search(gather, asm), "the row-major GEMV is expected to gather (test is stale)"


@pytest.mark.parametrize("interleave", [0, 8])
def test_x86_avx2_assembly_of_the_te_kernel(interleave):
    """Compile-only, on any host: for the AVX2 target the TE kernel's schedules use ymm registers only
    (no zmm, no mask registers: an AVX2 CPU would stop at them), test bits with ``vpand``/``vpcmpeqd`` or
    ``vptest``, blend, and accumulate with 256-bit FMAs; fp16 scales widen with ``vcvtph2ps``."""
    import re

    layer = packed(256, 256, 6, 8, 64)
    for rows in (1, tirx.Var("m", "int64")):
        asm = build_kernel(layer, rows, interleave=interleave, target=tvm.target.Target(AVX2_TARGET)).mod.inspect_source("asm")
        assert not re.search(r"%zmm|%k[1-7]\b", asm), "AVX-512 registers in an AVX2 build"
        assert re.search(r"vfmadd\d+ps\s+.*%ymm", asm), "no 256-bit FMA"
        assert re.search(r"vblendvps|vandps|vpand", asm), "no bit select"
        assert re.search(r"vcvtph2ps", asm), "fp16 scales are not widened with F16C"


# --------------------------------------------------------------------------------------------------------
# dense matmul, reductions, fallback on legalized Relax


def _run_relax(mod, args):
    for _, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc):
            assert func.attrs.get("tirx.is_scheduled"), func
    vm = relax.VirtualMachine(tvm.compile(mod, target=TARGET), tvm.cpu())
    return vm["main"](*[tvm_compat.tensor(np.ascontiguousarray(a)) for a in args]).numpy()


def _module(shapes, body):
    bb = relax.BlockBuilder()
    params = [relax.Var(f"p{i}", relax.TensorType(s, d)) for i, (s, d) in enumerate(shapes)]
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(body(bb, *params))
        bb.emit_func_output(out)
    return bb.get()


def _matmul_module(a_shape, b_shape, transpose_b=False, epilogue=None):
    def body(bb, a, b, *rest):
        bt = bb.emit(relax.op.permute_dims(b)) if transpose_b else b
        y = bb.emit(relax.op.matmul(a, bt))
        return bb.emit(epilogue(y, *rest)) if epilogue else y

    shapes = [(a_shape, "float32"), (b_shape, "float32")]
    if epilogue is not None:
        shapes.append(((b_shape[0] if transpose_b else b_shape[-1],), "float32"))
    return _module(shapes, body)


SEQ = tirx.Var("s", "int64")


@pytest.mark.parametrize("seq", [1, 5, SEQ])
@pytest.mark.parametrize("transpose_b", [False, True])
def test_dense_matmul(seq, transpose_b):
    """lm_head-like [1, S, K] x [K, N] (or x Wᵀ), static, ragged and symbolic S."""
    k, n = 96, 200
    mod = legalize_and_fuse(_matmul_module((1, seq, k), (n, k) if transpose_b else (k, n), transpose_b))
    names = {gv.name_hint: which_rule(f) for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}
    assert "Matmul" in names.values(), names
    rng = np.random.default_rng(0)
    rows = seq if isinstance(seq, int) else 37
    x = rng.standard_normal((1, rows, k)).astype("float32")
    w = rng.standard_normal((n, k) if transpose_b else (k, n)).astype("float32")
    ref = x.astype(np.float64) @ (w.T if transpose_b else w)
    assert rel_err(_run_relax(schedule(mod), [x, w]), ref) < TOL


def test_dense_matmul_fused_silu_epilogue():
    silu = lambda y, b: relax.op.nn.silu(relax.op.add(y, b))  # noqa: E731
    mod = legalize_and_fuse(_matmul_module((1, SEQ, 64), (64, 256), epilogue=silu))
    funcs = [f for _, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)]
    assert len(funcs) == 1 and which_rule(funcs[0]) == "Matmul"
    rng = np.random.default_rng(1)
    x, w, b = rng.standard_normal((1, 50, 64)), rng.standard_normal((64, 256)), rng.standard_normal(256)
    y = x @ w + b
    got = _run_relax(schedule(mod), [a.astype("float32") for a in (x, w, b)])
    assert rel_err(got, y / (1 + np.exp(-y))) < TOL


def _softmax(a):
    e = np.exp(a - a.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("seq", [1, 19])
def test_attention_batch_matmul_softmax_causal(seq):
    """Symbolic-length attention: q @ kᵀ * scale + causal mask, softmax, @ v."""
    heads, dim = 3, 64

    def body(bb, q, k, v):
        s = bb.emit(relax.op.matmul(q, bb.emit(relax.op.permute_dims(k, [0, 1, 3, 2]))))
        s = bb.emit(relax.op.multiply(s, relax.const(0.125, "float32")))
        mask = bb.emit(relax.op.triu(relax.op.full_like(s, relax.const(-1e9, "float32")), 1))
        p = bb.emit(relax.op.nn.softmax(relax.op.add(s, mask), axis=-1))
        return bb.emit(relax.op.matmul(p, v))

    mod = legalize_and_fuse(_module([((1, heads, SEQ, dim), "float32")] * 3, body))
    rules = {which_rule(f) for _, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}
    assert "Matmul" in rules and None not in rules, rules
    q, k, v = (np.random.default_rng(i).standard_normal((1, heads, seq, dim)).astype("float32") for i in range(3))
    scores = q.astype(np.float64) @ k.transpose(0, 1, 3, 2) * 0.125 + np.triu(np.full((seq, seq), -1e9), 1)
    assert rel_err(_run_relax(schedule(mod), [q, k, v]), _softmax(scores) @ v) < TOL


@pytest.mark.parametrize("seq", [1, 7, SEQ])
def test_rmsnorm_rotary_like_and_embedding(seq):
    """Reductions (RMSNorm) and injective ops (gather, rotary-style mul/add) through the rule list."""
    dim, vocab = 96, 300

    def body(bb, ids, table, gamma, cos):
        x = bb.emit(relax.op.take(table, ids, axis=0))
        ms = bb.emit(relax.op.mean(relax.op.multiply(x, x), axis=[-1], keepdims=True))
        h = bb.emit(relax.op.multiply(relax.op.multiply(x, relax.op.rsqrt(relax.op.add(ms, relax.const(1e-5)))), gamma))
        return bb.emit(relax.op.add(relax.op.multiply(h, cos), h))

    shapes = [((1, seq), "int64"), ((vocab, dim), "float32"), ((dim,), "float32"), ((1, seq, dim), "float32")]
    mod = legalize_and_fuse(_module(shapes, body))
    assert all(which_rule(f) for _, f in mod.functions_items() if isinstance(f, tirx.PrimFunc))
    rows = seq if isinstance(seq, int) else 23
    rng = np.random.default_rng(2)
    ids = rng.integers(0, vocab, (1, rows)).astype("int64")
    table, gamma = rng.standard_normal((vocab, dim)).astype("float32"), rng.standard_normal(dim).astype("float32")
    cos = rng.standard_normal((1, rows, dim)).astype("float32")
    x = table[ids].astype(np.float64)
    h = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * gamma
    assert rel_err(_run_relax(schedule(mod), [ids, table, gamma, cos]), h * cos + h) < TOL


def test_fallback_parallelises_and_vectorizes():
    def body(bb, a, b):
        return bb.emit(relax.op.nn.silu(relax.op.add(a, b)))

    mod = legalize_and_fuse(_module([((SEQ, 256), "float32"), ((SEQ, 256), "float32")], body))
    func = next(f for _, f in mod.functions_items() if isinstance(f, tirx.PrimFunc))
    text = Fallback().apply(func, TARGET, False).mod["main"].script()
    assert "T.parallel" in text and "T.vectorized(T.int64(16))" in text
    assert Matmul().apply(func, TARGET, False) is None
