"""pbs2pc tune on this machine: a small tune of the tiny model end to end (killed and resumed), its
settings re-timed in turns, its database used by compile with the untuned build's numerics, the LM head
and step check, the knob spaces, refusals. Runners elsewhere (RPC, the device script, CUDA, boards):
test_tune_remote.py."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pbs2pc.cli import main
from testutil import TUNE_ENV as ENV, X86, free_port, measured_settings as _measured, registry_call as _call
from testutil import tune_records as _records

TRIALS = 2


@pytest.fixture(scope="module")
def tuned(tiny_onnx, tmp_path_factory):
    """A database of the tiny model: a ``pbs2pc tune`` killed (SIGKILL) after its first records, then run
    again to the end. ``(folder, lines at the kill)``."""
    folder = tmp_path_factory.mktemp("tune") / "db"
    argv = ["tune", str(tiny_onnx), "--target", X86, "--trials", str(TRIALS), "-o", str(folder)]
    proc = subprocess.Popen([sys.executable, "-m", "pbs2pc", *argv], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    records = folder / "records.jsonl"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if records.exists() and records.read_bytes().count(b"\n") >= 1:
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the tune and the builder and runner processes it started
        proc.wait()
    at_kill = records.read_bytes()
    assert at_kill.count(b"\n") >= 1, "the first tune wrote no record"
    assert main(argv) == 0
    return folder, at_kill


def test_a_killed_tune_resumes_without_losing_or_repeating_records(tuned, capsys):
    folder, at_kill = tuned
    final = (folder / "records.jsonl").read_bytes()
    kept = at_kill[:at_kill.rfind(b"\n") + 1]
    assert final.startswith(kept)  # every finished record of the killed run is still there, first
    records = _records(folder)
    measured = _measured(records)
    assert len(measured) == len(set(measured)), "a setting was measured twice"
    keys = {r["key"] for r in records}
    # the tiny model's four GEMV shapes and its fp32 LM head (the matmul rule's GEMV schedule)
    assert len(keys) == 5 and sum(k.startswith("x86_avx") for k in keys) == 4 and "lm_head_fp32:256x64" in keys
    assert len(measured) == TRIALS * len(keys)
    assert all(sum(1 for r in records if r["key"] == k and r["default"] and r["us"]) == 1 for k in keys)
    target = json.loads((folder / "target.json").read_text())
    assert target["preset"] in ("x86-avx512", "x86-avx2") and target["tvm_version"]


def test_compile_with_the_database_keeps_the_numerics(tuned, tiny_onnx, tiny_library, tmp_path, capsys):
    from pbs2pc.runtime import load

    folder, _ = tuned
    applied = _applied(folder)  # the five kernels less those whose setting was not faster in turns
    lib = tmp_path / "tuned.so"
    assert main(["compile", str(tiny_onnx), "--target", X86, "--tuning-db", str(folder), "-o", str(lib)]) == 0
    assert f"{len(applied)} kernels built with settings from" in capsys.readouterr().out
    manifest = json.loads(lib.with_name("tuned.manifest.json").read_text())
    assert set(manifest["tuned_kernels"]) == applied
    ids = np.array([[1, 5, 9, 2, 7]])
    np.testing.assert_allclose(load(lib).logits(ids), load(tiny_library).logits(ids), rtol=1e-6, atol=1e-6)

    # a database without one kernel: that one falls back to its defaults
    partial = tmp_path / "partial"
    shutil.copytree(folder, partial)
    records = _records(partial)
    dropped = records[0]["key"]
    (partial / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records if r["key"] != dropped))
    from pbs2pc.compiler.build import compile_model

    manifest = compile_model(tiny_onnx, tmp_path / "partial.so", X86, tuning_db=partial)
    assert set(manifest["tuned_kernels"]) == applied - {dropped}


def _best(folder: Path) -> dict:
    """Per key the record with the lowest time."""
    best = {}
    for r in _records(folder):
        if r.get("us") is not None and (r["key"] not in best or r["us"] < best[r["key"]]["us"]):
            best[r["key"]] = r
    return best


def _applied(folder: Path) -> set:
    """The keys whose best setting compile applies: all but those the re-timing in turns found no faster."""
    from pbs2pc.compiler.tune import confirm

    verdicts = confirm.read(folder)
    return {k for k, r in _best(folder).items() if confirm.kept(verdicts, k, r["knobs"])}


def test_tuned_settings_are_re_timed_in_turns_and_kept_only_where_faster(tuned, tiny_onnx, tmp_path):
    """Each kernel whose best setting is not its default is re-timed against it in turns (confirm.json);
    compile applies the setting only where that found it faster."""
    from pbs2pc.compiler.build import compile_model
    from pbs2pc.compiler.tune import confirm, table

    folder, _ = tuned
    best = _best(folder)
    changed = {k for k, r in best.items() if not r["default"]}
    verdicts = confirm.read(folder)
    assert set(verdicts) == changed
    for key in changed:
        v = verdicts[key]
        assert v["knobs"] == best[key]["knobs"] and v["default_us"] > 0 and v["tuned_us"] > 0
        assert v["rounds"] == confirm.ROUNDS and 0 <= v["rounds_faster"] <= confirm.ROUNDS
    if not changed:
        pytest.skip("every kernel's default was its best setting: nothing re-timed")

    # the policy, both ways, on one re-timed kernel
    key = sorted(changed)[0]
    db = tmp_path / "db"
    shutil.copytree(folder, db)
    for faster, expect_applied in ((False, False), (True, True)):
        times = {"default_us": 10.0, "tuned_us": 9.0 if faster else 10.0, "rounds_faster": 5 if faster else 3}
        (db / "confirm.json").write_text(json.dumps({**verdicts, key: {**verdicts[key], **times}}))
        manifest = compile_model(tiny_onnx, tmp_path / f"m{faster}.so", X86, tuning_db=db)
        assert (key in manifest["tuned_kernels"]) == expect_applied

    # the closing table says which times were re-timed, and shows a setting not applied as the default
    row = {"key": key, "calls": 1, "default_us": 10.0, "tuned_us": 10.0, "knobs": {"tiles": 1}, "in_turns": True,
           "not_applied": {"tiles": 2}, "not_applied_us": 10.5}
    text = table({"kernels": [row], "wall_s": 1.0})
    assert "re-timed in turns" in text and "the search's tiles=2 took 10.5 us in turns" in text


def test_the_fp32_head_is_built_with_its_tuned_setting(tuned, tiny_onnx, tiny_library, tmp_path):
    """The fp32 LM head (the matmul rule's GEMV schedule) with a non-default setting from the database: the
    one-token entries call it, and logits and decode step are the untuned library's to float32 rounding
    (another K split sums in another order)."""
    from pbs2pc.compiler.build import compile_model
    from pbs2pc.runtime import load

    folder, _ = tuned
    db = tmp_path / "db"
    shutil.copytree(folder, db)
    (db / "confirm.json").unlink(missing_ok=True)  # the setting below is made the best; no re-timing verdict
    records = _records(db)
    other = next(r for r in records if r["key"] == "lm_head_fp32:256x64" and not r["default"] and r["us"])
    (db / "records.jsonl").write_text("".join(json.dumps({**r, "us": 0.0 if r is other else r["us"]}) + "\n"
                                              for r in records))
    manifest = compile_model(tiny_onnx, tmp_path / "m.so", X86, tuning_db=db)
    assert "lm_head_fp32:256x64" in manifest["tuned_kernels"]
    ids = np.array([[3, 1, 4, 1, 5]])
    a, b = load(tmp_path / "m.so"), load(tiny_library)
    np.testing.assert_allclose(a.logits(ids), b.logits(ids), rtol=1e-5, atol=1e-5)
    a.prefill([3, 1, 4], capacity=8)
    b.prefill([3, 1, 4], capacity=8)
    np.testing.assert_allclose(a.step(1), b.step(1), rtol=1e-5, atol=1e-5)


def _other_x86(folder: Path) -> str:
    made_for = json.loads((folder / "target.json").read_text())["preset"]
    return "x86-avx2" if made_for == "x86-avx512" else "x86-avx512"


def _user_error(argv, capsys, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert match in err, err


def test_a_database_for_another_target_is_refused(tuned, tiny_onnx, tmp_path, capsys):
    folder, _ = tuned
    other = _other_x86(folder)
    before = (folder / "records.jsonl").read_bytes()
    _user_error(["compile", str(tiny_onnx), "--target", other, "--tuning-db", str(folder), "-o",
                 str(tmp_path / "m.so")], capsys, "was made for")
    _user_error(["tune", str(tiny_onnx), "--target", other, "-o", str(folder)], capsys, "was made for")
    assert (folder / "records.jsonl").read_bytes() == before
    from pbs2pc.compiler.targets import get_preset
    from pbs2pc.compiler.tune import open_database
    from pbs2pc.errors import Pbs2pcError

    with pytest.raises(Pbs2pcError, match="was made for"):
        open_database(folder, get_preset(other))
    assert not list(tmp_path.glob("m.*"))


def test_bad_tune_inputs_give_one_line_and_exit_2(tiny_onnx, tiny_library, tmp_path, capsys):
    db = str(tmp_path / "db")
    _user_error(["tune", str(tiny_onnx), "--target", "x86", "--arch", "sm_90", "-o", db], capsys, "--arch is for")
    _user_error(["tune", str(tiny_onnx), "-o", db, "--offline", "--rpc-tracker", "127.0.0.1:9", "--rpc-key", "k"],
                capsys, "choose one")
    _user_error(["tune", str(tiny_onnx), "-o", db, "--check-step"], capsys, "--check-step needs --library")
    _user_error(["tune", str(tiny_onnx), "--target", X86, "-o", db, "--lm-head", "fp16", "--check-step", "--library",
                 str(tiny_library)], capsys, "compile it with the same")
    _user_error(["tune", str(tiny_onnx), "-o", db, "--offline", "--check-step", "--library", str(tiny_onnx)], capsys,
                "on this machine")
    _user_error(["tune", str(tiny_onnx), "--trials", "0", "-o", db], capsys, "--trials must be at least 1")
    _user_error(["tune", str(tiny_onnx), "-o", db, "--rpc-tracker", "localhost"], capsys, "HOST:PORT")
    _user_error(["tune", str(tiny_onnx), "-o", db, "--rpc-tracker", "127.0.0.1:9"], capsys, "--rpc-key")
    _user_error(["tune", str(tiny_onnx), "-o", db, "--rpc-tracker", f"127.0.0.1:{free_port()}", "--rpc-key", "k"],
                capsys, "cannot reach an RPC tracker")
    _user_error(["tune", str(tmp_path / "missing.onnx"), "-o", db], capsys, "does not exist")
    _user_error(["compile", str(tiny_onnx), "--tuning-db", db, "-o", str(tmp_path / "m.so")], capsys,
                "pbs2pc tune")
    assert not (tmp_path / "db").exists()


def test_the_lm_head_kernel_is_tuned_with_its_own_knobs(tiny_onnx, tmp_path, capsys):
    """--lm-head fp16: the head kernel is one of the distinct kernels (its space: rows per step, prefetch
    distance and level, K unroll, rows per task); compile with the database and the same --lm-head builds
    it with the tuned setting, the logits those of the untuned fp16-head build."""
    from pbs2pc.compiler.build import compile_model
    from pbs2pc.compiler.targets import CompileOptions, get_preset
    from pbs2pc.compiler.tune import extract, knobs_from
    from pbs2pc.runtime import load

    kernels = {k.key: k for k in extract(tiny_onnx, get_preset(X86), CompileOptions(lm_head="fp16"))}
    head = kernels["lm_head_fp16:256x64"]
    assert head.calls == 1 and len(head.space()) > 100
    assert set(head.space()[0]) == {"step", "prefetch_rows", "locality", "k_unroll", "rows_per_task"}
    db = tmp_path / "db"
    assert main(["tune", str(tiny_onnx), "--target", X86, "--lm-head", "fp16", "--trials", "3", "-o", str(db)]) == 0
    out = capsys.readouterr().out
    assert "lm_head_fp16:256x64" in out and "--lm-head fp16 --tuning-db" in out  # the compile line says it too
    records = [r for r in _records(db) if r["key"] == "lm_head_fp16:256x64"]
    assert len(records) == 3 and records[0]["default"] and all(r["us"] for r in records)
    # the slowest measured setting forced in: compile must build what the database says (the re-timing's
    # verdict on the search's pick goes, so that a pick not faster in turns cannot keep the default)
    slowest = max((r for r in records if not r["default"]), key=lambda r: r["us"])
    forced = [{**r, "us": 0.0} if (r["key"], r["knobs"]) == (slowest["key"], slowest["knobs"]) else r
              for r in _records(db)]
    assert sum(r["us"] == 0.0 for r in forced) == 1
    (db / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in forced))
    (db / "confirm.json").unlink(missing_ok=True)
    tuned = compile_model(tiny_onnx, tmp_path / "tuned.so", X86, lm_head="fp16", tuning_db=db)
    assert "lm_head_fp16:256x64" in tuned["tuned_kernels"]
    knobs, _applied = knobs_from(db, get_preset(X86))
    assert knobs(None, head.entry, head.call) == slowest["knobs"]  # the forced setting is what compile built
    compile_model(tiny_onnx, tmp_path / "plain.so", X86, lm_head="fp16")
    ids = np.array([[2, 7, 1, 8, 2, 8]])
    a, b = load(tmp_path / "tuned.so"), load(tmp_path / "plain.so")
    np.testing.assert_array_equal(a.logits(ids), b.logits(ids))
    a.prefill([2, 7, 1], capacity=8)
    b.prefill([2, 7, 1], capacity=8)
    np.testing.assert_array_equal(a.step(8), b.step(8))  # the decode step runs the tuned head kernel


def test_check_step_times_the_tuned_decode_step_against_the_library(tiny_onnx, tiny_library, tmp_path, capsys):
    """--check-step: the model compiled with the tuned settings, its decode step timed against --library's in
    turns, the result said in one line and kept in the database folder; the tuned library computes the same."""
    from pbs2pc.runtime import load

    db = tmp_path / "db"
    assert main(["tune", str(tiny_onnx), "--target", X86, "--trials", "1", "-o", str(db), "--library",
                 str(tiny_library), "--check-step"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("decode step with every tuned"))
    check = json.loads((db / "step_check.json").read_text())
    first = check["variants"][0]
    assert first["excluded"] == [] and first["default_us"] > 0 and first["tuned_us"] > 0
    assert 0 <= first["tuned_faster_rounds"] <= first["rounds"] and f"of {first['rounds']} paired rounds" in line
    # two entries in the tiny model (its GEMVs', its fp32 head's): their settings stay, or one is left at its defaults
    entries = {r["key"].split(":")[0] for r in _records(db)}
    assert len(entries) == 2 and "lm_head_fp32" in entries and set(check["excluded"]) <= entries
    assert len(check["excluded"]) != 1 or len(check["variants"]) == 3  # one left out: after trying each
    ids = np.array([[4, 2, 4, 2]])
    np.testing.assert_allclose(load(first["library"]).logits(ids), load(tiny_library).logits(ids),
                               rtol=1e-6, atol=1e-6)


def test_compile_leaves_the_entries_the_step_check_excluded_at_their_defaults(tuned, tiny_onnx, tmp_path):
    from pbs2pc.compiler.build import compile_model

    folder, _ = tuned
    db = tmp_path / "db"
    shutil.copytree(folder, db)
    entries = sorted({r["key"].split(":")[0] for r in _records(db)})
    (db / "step_check.json").write_text(json.dumps({"variants": [], "excluded": entries}))
    assert compile_model(tiny_onnx, tmp_path / "m.so", X86, tuning_db=db)["tuned_kernels"] == []


def test_candidates_are_timed_with_the_models_threads(monkeypatch, tiny_onnx, tmp_path, capsys):
    """TVM's own default is half the hardware threads on x86 (one on a 2-vCPU machine): timed that way,
    every parallel kernel runs on one core and serial settings win that lose in the model's step. The
    local runner's workers and the device script get the target's cores, or TVM_NUM_THREADS where set."""
    from pbs2pc.compiler.targets import get_preset
    from pbs2pc.compiler.tune.search import timing_threads

    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    assert timing_threads(get_preset(X86, num_cores=3)) == 3
    monkeypatch.setenv("TVM_NUM_THREADS", "1")
    assert timing_threads(get_preset(X86, num_cores=3)) == 1
    monkeypatch.delenv("TVM_NUM_THREADS")
    db = tmp_path / "db"
    assert main(["tune", str(tiny_onnx), "--target", X86, "--offline", "--trials", "1", "-o", str(db)]) == 0
    assert json.loads((db / "device" / "plan.json").read_text())["threads"] == get_preset(X86).target["num-cores"]


def test_every_registry_knob_setting_builds():
    """Each entry's declared space: the default first, and every setting a kernel its builder accepts."""
    from pbs2pc.compiler.tune import Kernel
    from pbs2pc.passes.kernels import registry

    calls = [_call(), _call(coded=(6, 8)), _call(has_groups=True, has_residual=True, residual_bytes=2),
             _call(has_groups=True, has_residual=True, residual_bytes=2, coded=(6, 8))]
    calls += [dataclasses.replace(c, out_features=256, in_features=1024, interleave=4, plane_dtype="uint32")
              for c in calls[:3:2]]  # the CUDA layout, K with several splits
    tuned = set()
    for entry in registry.all_kernels():
        if entry.knobs is None:
            continue
        call = next((c for c in calls if entry.accepts(c if entry.reads_codes else dataclasses.replace(c, coded=None))),
                    None)
        if call is None:
            continue
        kernel = Kernel("k", entry, call, 1)
        space = kernel.space()
        assert space[0] == {k: v[0] for k, v in entry.knobs(call).items()}
        assert len({json.dumps(s, sort_keys=True) for s in space}) == len(space) >= 2
        for knobs in space:
            assert kernel.build(knobs)["main"] is not None
        tuned.add(entry.name)
    assert {"x86_avx512.gemv_v2_fp32", "x86_avx2.gemv_int8", "arm_neon.gemv_int8", "cuda.gemv_fp32"} <= tuned, tuned


