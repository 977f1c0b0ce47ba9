"""The prompt's sparse-binary GEMM for CUDA: fp16 tensor cores, fp32 accumulation.

A TE compute, not a hand schedule: ``x`` cast to fp16, the weight decoded from the packed planes (the TE
kernel's ``decode``, :func:`pbs2pc.passes.kernels.sparse_binary_linear.sparse_binary_linear`) and cast to fp16,
then ``Y = Σ x16 · w16`` accumulated in fp32 (plus the bias). The function is left unscheduled: dlight's GPU
``Matmul`` rule (:func:`pbs2pc.passes.schedules.gpu_rules`) sees fp16 inputs with an fp32 output and
static ``N``, ``K`` above 64, and tensorizes it (``MatmulTensorization``: WMMA fragments, ``ldmatrix``
into ``mma.sync`` - ``HMMA.16816.F32`` in the sm_90 SASS), with the decode computed into shared memory
once per block tile. The rows stay symbolic (any prompt length).

Accuracy: the inputs are rounded to fp16 (relative 2⁻¹¹ per element) and so is each decoded weight
``μ ± α`` (computed in fp32 from the fp16 scales, then rounded once); the products are exact in fp32 and
summed in fp32. The compute reads v2 magnitude groups too (checked on the CPU), but the registry gives it
v1 layers only: with the byte group plane, the tensorized schedule's vectorized decode needs uint8 vector
broadcasts that TVM 0.27's CUDA code generator lacks; and a salient residual's decode reads a per-call rank
table that the registry's inputs do not carry. v2 prompts run the fp32 TE kernel.
"""

from __future__ import annotations

from pbs2pc.compiler.tvm_compat import te, tirx

from .sparse_binary_gemv import LAYOUT, ROWS

#: dlight tensorizes only when every static extent of the matmul exceeds 64.
MIN_EXTENT = 65


def supported(out_features: int, in_features: int, group_size: int, interleave: int, plane_dtype: str) -> bool:
    return (interleave == ROWS and plane_dtype == f"uint{LAYOUT.word_bits}" and out_features % ROWS == 0
            and out_features >= MIN_EXTENT and in_features >= MIN_EXTENT and in_features % 32 == 0
            and in_features % group_size == 0)


def gemm(out_features: int, in_features: int, group_size: int, has_mask: bool, has_mu: bool, has_bias: bool,
         has_groups: bool = False, n: int = 6, m: int = 8):
    """The unscheduled PrimFunc ``(x [M, K] f32, sign, [mask], alpha, [mu], [bias], [group, group_alpha,
    group_mu], y [M, N] f32)`` for one layer shape (layout: :data:`LAYOUT`); ``n``, ``m``: the scheme (only
    a dense ``n == m`` layer may lack the mask)."""
    from pbs2pc.passes.kernels.sparse_binary_linear import sparse_binary_linear

    i64 = lambda v: tirx.const(v, "int64")  # noqa: E731 - Relax's shapes are int64
    N, K, G = out_features, in_features, group_size
    rows = tirx.Var("m", "int64")
    plane = (i64(N // ROWS), i64(K // 32), i64(ROWS))
    scale = (i64(N // ROWS), i64(K // G), i64(ROWS))
    x = te.placeholder((rows, i64(K)), "float32", name="x")
    sign = te.placeholder(plane, "uint32", name="sign")
    mask = te.placeholder(plane, "uint32", name="mask") if has_mask else None
    alpha = te.placeholder(scale, "float16", name="alpha")
    mu = te.placeholder(scale, "float16", name="mu") if has_mu else None
    bias = te.placeholder((i64(N),), "float32", name="bias") if has_bias else None
    groups = [te.placeholder((i64(N // ROWS), i64(K // 8), i64(ROWS)), "uint8", name="group"),
              te.placeholder(scale, "float16", name="group_alpha"),
              te.placeholder(scale, "float16", name="group_mu")] if has_groups else [None] * 3
    reference = sparse_binary_linear(x, sign, mask, alpha, mu, None, *groups, n=n if has_mask else m, m=m,
                                     group_size=G)
    weight = reference.op.input_tensors[1]  # the fp32 decode stage
    x16 = te.compute((rows, i64(K)), lambda i, k: x[i, k].astype("float16"), name="x_fp16")
    w16 = te.compute((i64(N), i64(K)), lambda o, j: weight[o, j].astype("float16"), name="decode_fp16")
    r = te.reduce_axis((i64(0), i64(K)), name="k")
    y = te.compute((rows, i64(N)), lambda i, o: te.sum(
        x16[i, r].astype("float32") * w16[o, r].astype("float32"), axis=r), name="matmul")
    if has_bias:
        y = te.compute((rows, i64(N)), lambda i, o: y[i, o] + bias[o], name="bias_add")
    params = [t for t in (x, sign, mask, alpha, mu, bias, *groups) if t is not None] + [y]
    func = te.create_prim_func(params)
    from pbs2pc.compiler.tvm_compat import s_tir

    sch = s_tir.Schedule(func)
    sch.compute_inline(sch.get_sblock("decode"))  # one decode-and-round stage: what dlight's Matmul reads
    return sch.mod["main"].without_attr("global_symbol").with_attr("tirx.noalias", True)
