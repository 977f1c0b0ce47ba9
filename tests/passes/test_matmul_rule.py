"""The ``Matmul`` CPU rule on attention-shaped batch matmuls with symbolic lengths.

Regression tests for two bugs that corrupted the heap of the compiled SmolLM2 library (sequence lengths
such as 7, 13, 15):

* grouped-query attention reads k / v with a broadcast ``rep`` axis (``q [B, KV, rep, S, D] @ k [B, KV, 1,
  D, S]``); dlight's normalisation fused ``rep`` into the row axis (I = rep * S), whose row tiles are not
  boxes of the original axes unless the tile divides S - the A copy and the writeback then covered
  other tiles' rows (wrong numbers, stores past the scratch tile);
* an epilogue inlined into the writeback *after* it moved under the padded tile loops lost the guard
  that drops padded rows/columns (symbolic batch: stores past the output).

Every case is built once with symbolic sizes and run for every length 1..70 (and a few larger ones) in
the same process, compared with a float64 numpy reference. Heap corruption can abort the process or
deadlock inside malloc, so those runs happen in one child process with a timeout; the child prints
one JSON line per case.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

tvm_compat = pytest.importorskip("pbs2pc.compiler.tvm_compat")

from pbs2pc.compiler.tvm_compat import dlight, matmul_index_maps, relax, s_tir, tirx, tvm  # noqa: E402
from pbs2pc.passes.schedules import cpu_rules  # noqa: E402
from testutil import legalize_and_fuse  # noqa: E402
from pbs2pc.passes.schedules.cpu_matmul import Matmul, _gemm_index_maps, _reduction_block  # noqa: E402

from testutil import host_target  # noqa: E402

TARGET = host_target()  # this machine's best x86 target: the tests run what they build
TOL = 1e-5
LENGTHS = list(range(1, 71)) + [97, 128]
S = tirx.Var("s", "int64")
B = tirx.Var("b", "int64")  # symbolic batch; runs use 1 or 2


def _matmul(bb, a, b, *_):
    return bb.emit(relax.op.matmul(a, b))


def _matmul_kt(bb, q, k):
    return bb.emit(relax.op.matmul(q, bb.emit(relax.op.permute_dims(k, [0, 1, 2, 4, 3]))))


def _scores(bb, q, k, mask):
    s = bb.emit(relax.op.matmul(q, k))
    return bb.emit(relax.op.add(relax.op.multiply(s, relax.const(0.125, "float32")), mask))


def _linear_silu(bb, x, w, bias):
    return bb.emit(relax.op.nn.silu(relax.op.add(relax.op.matmul(x, w), bias)))


def _silu(y):
    return y / (1 + np.exp(-y))


# name: (operand shapes with S / B symbolic, Relax body, float64 numpy reference)
CASES = {
    "gqa_qk": ([(1, 3, 3, S, 64), (1, 3, 1, 64, S)], _matmul, lambda q, k: q @ k),
    "gqa_pv": ([(1, 3, 3, S, S), (1, 3, 1, S, 64)], _matmul, lambda p, v: p @ v),
    "gqa_qk_transposed_k": ([(1, 3, 3, S, 64), (1, 3, 1, S, 64)], _matmul_kt, lambda q, k: q @ k.swapaxes(-1, -2)),
    "gqa_scores_batch_epilogue": ([(B, 3, 3, S, 64), (B, 3, 1, 64, S), (B, 1, 1, S, S)], _scores,
                                  lambda q, k, m: (q @ k) * 0.125 + m),
    "gqa_pv_batch": ([(B, 3, 3, S, S), (B, 3, 1, S, 64)], _matmul, lambda p, v: p @ v),
    "broadcast_a": ([(1, 3, 1, S, 64), (1, 3, 3, 64, S)], _matmul, lambda a, b: a @ b),
    "two_broadcast_axes": ([(2, 3, S, 48), (48, S)], _matmul, lambda a, b: a @ b),
    "linear_silu_batch": ([(B, S, 64), (64, 208), (208,)], _linear_silu, lambda x, w, c: _silu(x @ w + c)),
}


def _module(shapes, body):
    bb = relax.BlockBuilder()
    params = [relax.Var(f"p{i}", relax.TensorType(shape, "float32")) for i, shape in enumerate(shapes)]
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(body(bb, *params))
        bb.emit_func_output(out)
    return legalize_and_fuse(bb.get())


def _prim_funcs(mod):
    return [f for _, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)]


def _concrete(shape, length):
    return tuple((1 + length % 2 if d.same_as(B) else length) if isinstance(d, tirx.Var) else int(d) for d in shape)


def _run_case(name) -> dict:
    """Build ``name`` once with every PrimFunc through ``cpu_rules`` and run it for every length."""
    shapes, body, reference = CASES[name]
    mod = _module(shapes, body)
    scheduled_by_matmul = all(Matmul().apply(f, TARGET, False) is not None for f in _prim_funcs(mod))
    with TARGET:
        mod = dlight.ApplyDefaultSchedule(*cpu_rules())(mod)
    vm = relax.VirtualMachine(tvm.compile(mod, target=TARGET), tvm.cpu())
    worst, bad = 0.0, []
    for length in LENGTHS:
        rng = np.random.default_rng(length)
        args = [rng.standard_normal(_concrete(shape, length)).astype("float32") for shape in shapes]
        ref = reference(*[a.astype(np.float64) for a in args])
        got = vm["main"](*[tvm_compat.tensor(a) for a in args]).numpy()
        err = float(np.abs(got - ref).max() / np.abs(ref).max()) if got.shape == ref.shape else float("inf")
        worst = max(worst, err)
        if not err < TOL:
            bad.append(length)
    return {"name": name, "matmul_rule": scheduled_by_matmul, "worst": worst, "bad": bad}


@pytest.fixture(scope="module")
def child_results():
    """All cases, run by one child process (``python this_file.py``): a crash or hang fails, not kills, pytest."""
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__)], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": os.pathsep.join(
                                  [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),  # testutil
                                   os.environ.get("PYTHONPATH", "")])})
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"the child process hung (heap corruption?); output so far: {err.stdout!r:.2000}")
    assert proc.returncode == 0, (f"child exited with {proc.returncode} (negative: signal; heap corruption?)\n"
                                  f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            results[row["name"]] = row
    return results


@pytest.mark.parametrize("name", list(CASES))
def test_symbolic_attention_matmuls_every_length(child_results, name):
    row = child_results[name]
    assert row["matmul_rule"], f"{name}: the Matmul rule declined (the test would not exercise it)"
    assert not row["bad"] and row["worst"] < TOL, f"{name}: rel err {row['worst']:.3g} at lengths {row['bad']}"


def _main_block(func):
    sch = s_tir.Schedule(func)
    return sch.get(_reduction_block(sch))


@pytest.mark.parametrize("shapes,body", [
    ([(1, S, 576), (49152, 576)], lambda bb, x, w: bb.emit(relax.op.matmul(x, bb.emit(relax.op.permute_dims(w))))),
    ([(512, 576), (576, 4096)], _matmul),
    ([(1, 4, S, 32), (1, 4, 32, S)], _matmul),
])
def test_plain_matmuls_keep_dlight_normal_form(shapes, body):
    """Without broadcast batch axes the rule normalises exactly as before (same schedule, same speed)."""
    (func,) = _prim_funcs(_module(shapes, body))
    ours, dlights = _gemm_index_maps(_main_block(func)), matmul_index_maps(_main_block(func))
    assert ours is not None and dlights is not None
    assert ours[4] == ["S"]
    for mine, theirs in zip(ours[:4], dlights):
        tvm.ir.assert_structural_equal(mine, theirs, map_free_vars=True)


def test_broadcast_axis_is_a_batch_axis_not_part_of_the_row_axis():
    """GQA q @ kᵀ: the rows tiled by the micro-kernel are S alone (rep is a batch axis), not rep * S."""
    (func,) = _prim_funcs(_module(*CASES["gqa_qk"][:2]))
    block_map, a_map, b_map, c_map, batch = _gemm_index_maps(_main_block(func))
    assert batch == ["S", "R"]
    assert len(block_map.final_indices) == 5  # S, R (the broadcast rep axis), I, J, K
    assert len(b_map.final_indices) == 3      # B has no rep axis: S, J, K
    i_index = block_map.final_indices[2]
    assert isinstance(i_index, tirx.Var), i_index  # one original axis, not a fused rep * S + s


if __name__ == "__main__":
    for case in CASES:
        print(json.dumps(_run_case(case)), flush=True)
