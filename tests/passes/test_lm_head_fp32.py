"""The fp32 LM head as a tuning kernel (``passes/kernels/lm_head_fp32.py``): the matmul rule's GEMV
schedule for ``x @ Wᵀ`` with its choices as knobs. Every setting computes the float64 product to float32
rounding; the default setting is the rule's own schedule of the same product."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

tvm_compat = pytest.importorskip("pbs2pc.compiler.tvm_compat")

from pbs2pc.compiler.tvm_compat import tvm  # noqa: E402
from pbs2pc.passes.kernels import lm_head_fp32 as head  # noqa: E402
from pbs2pc.passes.schedules import cpu_utils  # noqa: E402
from testutil import AVX2_TARGET, AVX512_TARGET, head_outputs, host_target, rel_err  # noqa: E402

TARGET = host_target()
LANES = cpu_utils.vector_lanes(tvm.target.Target(TARGET))


def _builder(lanes):
    return lambda vocab, hidden, **knobs: head.lm_head_fp32(vocab, hidden, lanes, **knobs)


def test_the_space_starts_with_the_rules_defaults():
    space = head.knobs(49152, 576, 8)
    assert space["rows"][0] == 16 and space["k_lanes"] == (8, 16, 32) and space["unroll_k"] == (False, True)
    assert head.knobs(49152, 576, 16)["unroll_k"][0] is True  # 36 vectors of K: the rule unrolls them
    assert all(49152 % r == 0 for r in space["rows"]) and len(set(space["rows"])) == len(space["rows"])
    assert head.knobs(1000, 48, 8)["rows"][0] == 8  # 16 does not divide 1000: the rule's next choice
    assert not head.supported(1000, 50, 8) and head.supported(1000, 48, 8)


def test_every_setting_computes_the_product():
    """A sample that takes every value of every knob at least once, on a SmolLM2-width table."""
    vocab, hidden = 49152 // 16, 576
    space = head.knobs(vocab, hidden, LANES)
    names = sorted(space)
    settings = [dict(zip(names, values)) for values in itertools.product(*(space[n] for n in names))]
    picked = [next(s for s in reversed(settings) if s[name] == value) for name in names for value in space[name]]
    sample = [{}] + [dict(t) for t in dict.fromkeys(tuple(sorted(s.items())) for s in picked)]
    rng = np.random.default_rng(5)
    table = (rng.standard_normal((vocab, hidden)) * 0.05).astype(np.float32)
    x = rng.standard_normal((1, hidden)).astype(np.float32)
    want = head.reference(x, table)
    for knobs, out in zip(sample, head_outputs(_builder(LANES), table, x, TARGET, sample)):
        assert rel_err(out, want) < 1e-6, knobs


@pytest.mark.parametrize("target", [AVX2_TARGET, AVX512_TARGET], ids=["avx2", "avx512"])
def test_each_x86_isa_builds_the_space(target):
    """Compile-only for the ISA this machine may lack: every rows x k_lanes setting lowers to code."""
    lanes = cpu_utils.vector_lanes(tvm.target.Target(target))
    space = head.knobs(256, 64, lanes)
    for rows, k_lanes in itertools.product(space["rows"], space["k_lanes"]):
        func = head.lm_head_fp32(256, 64, lanes, rows=rows, k_lanes=k_lanes).with_attr("global_symbol", "head")
        tvm.compile(tvm.IRModule({"head": func}), target=target)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="cannot take"):
        head.lm_head_fp32(1000, 48, 8, rows=16)
    with pytest.raises(ValueError, match="cannot take"):
        head.lm_head_fp32(1000, 48, 8, k_lanes=32)
