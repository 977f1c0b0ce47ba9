"""FastSigmoid: float32 sigmoid and SiLU with a vectorisable exp, against float64 numpy."""

from __future__ import annotations

import numpy as np
import pytest

tvm_compat = pytest.importorskip("pbs2pc.compiler.tvm_compat")

from pbs2pc.compiler.tvm_compat import R, relax, tvm  # noqa: E402
from pbs2pc.passes import FastSigmoid  # noqa: E402


def _module(dtype: str = "float32"):
    @tvm.script.ir_module
    class Module:
        @R.function
        def main(x: R.Tensor((2, 515), dtype), u: R.Tensor((2, 515), dtype)) -> R.Tensor((2, 515), dtype):
            with R.dataflow():
                s = R.sigmoid(x)
                g = R.multiply(R.multiply(x, s), u)
                y = R.add(g, R.nn.silu(u))
                R.output(y)
            return y

    return Module


def _ops(mod) -> set[str]:
    names = set()

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
            names.add(expr.op.name)

    relax.analysis.post_order_visit(mod["main"], visit)
    return names


def test_sigmoid_and_silu_become_call_tir():
    before = _module()
    assert {"relax.sigmoid", "relax.nn.silu"} <= _ops(before)
    after = FastSigmoid()(before)
    ops = _ops(after)
    assert "relax.sigmoid" not in ops and "relax.nn.silu" not in ops and "relax.call_tir" in ops
    assert {gv.name_hint for gv in after.get_global_vars()} >= {"fast_sigmoid", "fast_silu"}


def test_other_dtypes_keep_tvms_sigmoid():
    assert {"relax.sigmoid", "relax.nn.silu"} <= _ops(FastSigmoid()(_module("float16")))


def _silu64(v):
    return v / (1.0 + np.exp(-v))


def test_compiled_matches_float64_across_the_range():
    """Through the compile pipeline's CPU phases (fused with the multiplies, scheduled by the CPU rules):
    relative error at most 1e-6 where the sigmoid is not vanishing; saturated ends exact to float32; NaN
    stays NaN."""
    from pbs2pc.compiler.pipeline import make_pipeline, phases
    from pbs2pc.compiler.targets import get_preset

    preset = get_preset("x86-avx2")  # runs on every x86-64 machine CI has
    assert "fast_sigmoid" in [name for name, _ in phases(preset)]
    assert "fast_sigmoid" not in [name for name, _ in phases(get_preset("cuda"))]
    ex = tvm.compile(_module(), target=preset.tvm_target(), relax_pipeline=make_pipeline(preset))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    rng = np.random.default_rng(0)
    x = np.concatenate([np.linspace(-30, 30, 515), rng.standard_normal(515) * 4]).reshape(2, 515).astype(np.float32)
    x[1, :6] = [-200, -88.5, -50, 50, 88.5, 200]
    u = rng.standard_normal((2, 515)).astype(np.float32)
    x[1, 7] = np.nan
    y = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(u)).numpy()
    xd, ud = x.astype(np.float64), u.astype(np.float64)
    with np.errstate(over="ignore"):
        want = _silu64(xd) * ud + _silu64(ud)
    assert np.isnan(y[1, 7])
    ok = ~np.isnan(want)
    scale = np.abs(_silu64(xd) * ud) + np.abs(_silu64(ud))  # the terms' size: a sum may cancel
    err = np.abs(y[ok] - want[ok]) / np.maximum(scale[ok], 1e-30)
    assert err.max() < 1e-6, err.max()
