"""Hand-written kernels for NVIDIA GPUs (CUDA targets, sm_80 and newer).

They read one layout (:data:`LAYOUT`): sign and mask planes as 32-bit words, 4-row interleaved, so a lane's
word of a tile's four rows is one 128-bit load and a warp's loads are contiguous. ``KERNELS`` is this
folder's part of the kernel registry (:mod:`pbs2pc.passes.kernels.registry`): the one-token GEMV
(:mod:`.sparse_binary_gemv`) for v1 and v2 layers (magnitude groups, salient residual); the prompt's
calls the fp16 tensor-core GEMM (:mod:`.sparse_binary_gemm`, scheduled by dlight) for v1 layers, the fp32
TE kernel for v2 layers, both under dlight's GPU rules
(:func:`pbs2pc.passes.schedules.gpu_rules`). The KV-cache attention kernel (:mod:`.attention`) is chosen by
:func:`pbs2pc.passes.kernels.attention.builder`.
"""

from __future__ import annotations

from pbs2pc.passes.kernels.registry import Call, KernelEntry

from . import sparse_binary_gemm as gemm
from . import sparse_binary_gemv as gemv

ISA = "cuda"
LAYOUT = gemv.LAYOUT


def _shape(call: Call) -> tuple:
    return call.out_features, call.in_features, call.group_size, call.interleave, call.plane_dtype


KERNELS = [
    KernelEntry("cuda.gemv_fp32", "sparse_binary_gemv_cuda", "cuda", ISA, (), LAYOUT,
                activations="fp32", rows="one", covers=lambda c: gemv.supported(*_shape(c)),
                build=lambda c, **k: gemv.gemv(*_shape(c)[:3], c.has_mask, c.has_mu, c.has_bias, c.has_groups,
                                               c.has_residual, max(c.residual_bytes, 1), **k),
                structure=("groups", "residual"), knobs=lambda c: gemv.knobs(c.out_features, c.in_features)),
    # the prompt: fp16 tensor cores through dlight, v1 layers (v2 layers keep the fp32 TE kernel: the
    # tensorized schedule vectorizes the byte group plane's decode, and TVM 0.27's CUDA code generator
    # cannot broadcast uint8 vectors)
    KernelEntry("cuda.gemm_fp16_tc", "sparse_binary_gemm_cuda", "cuda", ISA, (), LAYOUT,
                activations="fp32", rows="any", covers=lambda c: gemm.supported(*_shape(c)),
                build=lambda c, **k: gemm.gemm(*_shape(c)[:3], c.has_mask, c.has_mu, c.has_bias)),
]
