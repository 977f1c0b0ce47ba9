"""Every version-sensitive TVM name, imported in one place.

TVM 0.27 renamed much of its Python API (``tvm.tir`` -> ``tvm.tirx``, schedules and dlight under
``tvm.s_tir``, ``tvm.contrib.cc`` -> ``tvm.support.cc``). The rest of pbs2pc imports these names from here,
so the next rename is a one-file change. Importing this module imports TVM; call :func:`require_tvm`
first where a clear error is wanted.
"""

from __future__ import annotations

from pbs2pc.errors import ToolchainError

#: The TVM version pbs2pc is written against; pyproject.toml pins it.
TVM_VERSION = "0.27.0.post1"


def require_tvm():
    """Import TVM or raise one clear sentence saying how to install it."""
    try:
        import tvm  # noqa: F401
    except ImportError:
        raise ToolchainError(
            f"TVM is not installed; run: pip install apache-tvm=={TVM_VERSION} apache-tvm-ffi==0.1.14.post1"
        ) from None
    return tvm


require_tvm()

import tvm  # noqa: E402
from tvm import relax, te, tirx, topi  # noqa: E402,F401
from tvm import s_tir  # noqa: E402,F401
from tvm.s_tir import dlight  # noqa: E402,F401
from tvm.relax.frontend.onnx import onnx_frontend  # noqa: E402,F401
from tvm.support import cc  # noqa: E402,F401
from tvm.script import tirx as T  # noqa: E402,F401
from tvm.script import relax as R  # noqa: E402,F401

Target = tvm.target.Target
IRModule = tvm.IRModule
PrimFunc = tirx.PrimFunc
Schedule = s_tir.Schedule


def tensor(array, device=None):
    """A TVM runtime tensor from a numpy array (``tvm.nd.array`` in older TVM)."""
    return tvm.runtime.tensor(array, device or tvm.cpu())

# Target introspection the CPU schedule rules need (vector width in bits for an LLVM target).
from tvm.target.codegen import llvm_get_vector_width  # noqa: E402,F401
# dlight's GEMM normalisation helpers (C[S, I, J] += A[S, I, K] * B[S, J, K]); they live in the GPU
# package but are target-neutral, and the CPU matmul rule reuses them.
from tvm.s_tir.dlight.gpu.matmul import get_index_map as matmul_index_maps  # noqa: E402,F401
# get_index_map's per-axis S/I/J/K classification; the CPU rule fuses the axes itself, keeping axes that
# one operand broadcasts out of I and J (see cpu_matmul._gemm_index_maps).
from tvm.s_tir.dlight.gpu.matmul import IterKind as MatmulIterKind  # noqa: E402,F401
from tvm.s_tir.dlight.gpu.matmul import detect_iter_traits as matmul_iter_traits  # noqa: E402,F401
# The SBlockRealize (iteration bindings) of a block in a schedule.
from tvm.s_tir.dlight.analysis.common_analysis import get_sblockrealize as get_sblock_realize  # noqa: E402,F401


def meta_schedule():
    """``tvm.s_tir.meta_schedule`` (``tvm.meta_schedule`` before 0.27), imported on first use: the tuner's
    builder, runners, cost model and feature extractor."""
    from tvm.s_tir import meta_schedule as ms

    return ms


def tune_context(target):
    """A MetaSchedule ``TuneContext`` holding only ``target``: what the cost model and the feature extractor
    are given. Made with its FFI constructor: ``TuneContext.__init__`` first imports
    ``tvm.s_tir.tensor_intrin``, which parses every tensor intrinsic TVM ships (over a minute on a busy
    2-core machine), and the registry's kernels use none of them."""
    ms = meta_schedule()
    from tvm.s_tir.meta_schedule import _ffi_api
    from tvm.s_tir.meta_schedule.logging import get_logger, get_logging_func

    context = ms.TuneContext.__new__(ms.TuneContext)
    context.__init_handle_by_constructor__(_ffi_api.TuneContext, None, target, None, None, "pbs2pc", 1, -1,
                                           get_logging_func(get_logger("pbs2pc.tune")))
    _ffi_api.TuneContextInitialize(context)
    return context


def build_tir(mod, target):
    """Code for a module of scheduled PrimFuncs (MetaSchedule's default builder does this after importing
    every tensor intrinsic; see :func:`tune_context`): a runtime module, as MetaSchedule's export expects."""
    return tirx.build(mod, target=target)


def popen_pool(**kwargs):
    """``tvm.support.popen_pool.PopenPoolExecutor``: worker processes, each task killed past ``timeout``."""
    from tvm.support.popen_pool import PopenPoolExecutor

    return PopenPoolExecutor(**kwargs)


def rpc():
    """``tvm.rpc`` (tracker sessions; ``python -m tvm.exec.rpc_tracker`` / ``rpc_server`` start the services)."""
    from tvm import rpc as tvm_rpc

    return tvm_rpc


# A copy of a Relax function with fresh variables (two functions of a module must not share bindings).
from tvm.relax.utils import copy_with_new_vars  # noqa: E402,F401
