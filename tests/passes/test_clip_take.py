"""ClipTakeIndices (``passes/clip_take.py``): every gather clamps its indices.

* The pass: a fast ``R.take`` becomes a clipped one (axis kept), other modes stay; compiled, in-range
  indices give numpy's ``take`` and out-of-range ones the table's first or last row (numpy's
  ``mode="clip"``), where a fast gather would read outside the table.
* The pipeline: it is the first compile phase, and after it and the KV cache's entries the tiny model's
  graph (token and rotary gathers in each entry) has no fast gather left for TVM to warn about.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pbs2pc.compiler.tvm_compat")

from pbs2pc.compiler.tvm_compat import relax, tvm  # noqa: E402
from pbs2pc.passes.clip_take import ClipTakeIndices  # noqa: E402
from testutil import host_target  # noqa: E402

_TAKE = tvm.ir.Op.get("relax.take")


def _gathers(mode: str, axis: int = 0):
    bb = relax.BlockBuilder()
    table = relax.Var("table", relax.TensorType([10, 4], "float32"))
    ids = relax.Var("ids", relax.TensorType([5], "int64"))
    with bb.function("main", [table, ids]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.take(table, ids, axis=axis, mode=mode))
        bb.emit_func_output(out)
    return bb.get()


def _modes(mod) -> list[str]:
    found = []
    for _gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(
                func.body, lambda e: found.append(str(e.attrs.mode))
                if isinstance(e, relax.Call) and e.op.same_as(_TAKE) else None)
    return found


def test_fast_gathers_become_clipped_and_others_stay():
    assert _modes(ClipTakeIndices()(_gathers("fast"))) == ["clip"]
    assert _modes(ClipTakeIndices()(_gathers("wrap"))) == ["wrap"]
    clipped = ClipTakeIndices()(_gathers("fast", axis=1))
    call = clipped["main"].body.blocks[0].bindings[0].value
    assert int(call.attrs.axis) == 1 and str(call.attrs.mode) == "clip"


def test_clipped_gather_reads_rows_of_the_table():
    mod = relax.get_pipeline("zero")(ClipTakeIndices()(_gathers("fast")))
    vm = relax.VirtualMachine(tvm.compile(mod, target=host_target()), tvm.cpu())
    table = np.arange(40, dtype=np.float32).reshape(10, 4)
    ids = np.array([0, 9, 3, 10, 1 << 40], np.int64)  # the last two past the table
    got = vm["main"](tvm.runtime.tensor(table), tvm.runtime.tensor(ids)).numpy()
    np.testing.assert_array_equal(got, np.take(table, ids, axis=0, mode="clip"))


def test_the_compile_phases_leave_no_fast_gather(tiny_onnx):
    from pbs2pc.compiler import frontend, pipeline
    from pbs2pc.compiler.targets import get_preset

    mod = frontend.import_onnx(str(tiny_onnx)).mod
    assert "fast" in _modes(mod)  # the importer's gathers: the token embedding, the rotary rows
    phases = pipeline.phases(get_preset("x86"))
    assert [name for name, _ in phases[:2]] == ["clip_take", "use_kv_cache"]
    for _name, phase in phases[:2]:  # the entries the KV cache adds copy main's gathers
        mod = phase(mod)
    modes = _modes(mod)
    assert "fast" not in modes and modes.count("clip") >= 6  # two or more per entry ("wrap" ones stay)
