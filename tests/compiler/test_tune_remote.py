"""pbs2pc tune where candidates do not run in this process's runner: a board behind TVM's RPC tracker (a
tracker and server on loopback, and one that goes away), the device script (--offline), CUDA candidates
for the GPU machine, and board candidates cross-compiled."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pbs2pc.cli import main
from testutil import TUNE_ENV as ENV, X86, free_port, measured_settings as _measured, registry_call as _call
from testutil import requires_aarch64, tune_records as _records

#: Settings per kernel the offline tune exports (the tiny model's five kernels).
TRIALS = 2


def _start(args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _start_tracker() -> tuple[subprocess.Popen, int]:
    port = free_port()
    return _start(["tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port), "--port-end",
                   str(port + 1)]), port


def _wait_registered(port: int, key: str, server: subprocess.Popen, seconds: float = 120) -> None:
    from pbs2pc.compiler.tvm_compat import rpc

    deadline = time.monotonic() + seconds
    while True:
        assert server.poll() is None, f"the RPC server exited with status {server.returncode}"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                pass  # the tracker listens: ask it (connect_tracker itself retries for a minute)
            if key in rpc().connect_tracker("127.0.0.1", port).summary().get("queue_info", {}):
                return
        except OSError:  # not up yet
            pass
        assert time.monotonic() < deadline, "the RPC server did not register with the tracker"
        time.sleep(0.5)


def test_rpc_tracker_on_loopback_and_a_board_that_goes_away(tiny_onnx, tmp_path, capsys):
    key = "pbs2pc-test"
    tracker, port = _start_tracker()
    server = None
    try:
        board_port = free_port()
        server = _start(["tvm.exec.rpc_server", "--tracker", f"127.0.0.1:{port}", "--key", key, "--host",
                         "127.0.0.1", "--port", str(board_port), "--port-end", str(board_port + 1)])
        _wait_registered(port, key, server)
        db = tmp_path / "db"
        argv = ["tune", str(tiny_onnx), "--target", X86, "--trials", "1", "-o", str(db),
                "--rpc-tracker", f"127.0.0.1:{port}", "--rpc-key", key, "--timeout", "20"]
        assert main(argv) == 0
        assert "rpc 127.0.0.1" in capsys.readouterr().out
        records = _records(db)
        assert len(records) == 5 and all(r["us"] is not None and r["default"] for r in records), records

        # the board goes away: its candidates time out, are recorded as failed runs, and the tune finishes
        _stop(server)
        server = None
        from pbs2pc.compiler.targets import CompileOptions, get_preset
        from pbs2pc.compiler.tune import Runner, Search, extract, open_database

        preset = get_preset(X86)
        kernels = extract(tiny_onnx, preset, CompileOptions())[:1]
        start = time.monotonic()
        Search(preset, Runner(("127.0.0.1", port), key, timeout_s=2)).tune(kernels, open_database(db, preset), 3)
        failed = _records(db)[5:]
        assert len(failed) == 2 and all("Timeout" in r["error"] and r["error"].startswith("run:") for r in failed)
        assert time.monotonic() - start < 60

        # re-timing in turns on a board that went away gives up after the timeout, saying so
        from pbs2pc.compiler.tune import confirm

        start = time.monotonic()
        with pytest.raises(confirm.RemoteError, match="did not answer within 2 s"):
            confirm.ab_remote(kernels[0], kernels[0].space()[1], preset, Runner(("127.0.0.1", port), key, timeout_s=2))
        assert time.monotonic() - start < 30
        # and the tune's re-timing stops at the first kernel the board does not answer for: two kernels whose
        # best setting (a record written here) is not their default, one timeout, no verdict
        two = extract(tiny_onnx, preset, CompileOptions())[:2]
        with open(db / "records.jsonl", "a") as f:
            for k in two:
                f.write(json.dumps({"key": k.key, "knobs": k.space()[1], "default": False, "us": 0.001,
                                    "runs_us": [0.001], "error": None}) + "\n")
        said = []
        start = time.monotonic()
        verdicts = confirm.confirm(two, open_database(db, preset), preset, said.append,
                                   runner=Runner(("127.0.0.1", port), key, timeout_s=2))
        assert time.monotonic() - start < 30 and not verdicts and not (db / "confirm.json").exists()
        assert "on the board" in said[0] and "did not answer within 2 s" in said[1], said
        assert "the other 1 not re-timed either" in said[2], said
    finally:
        if server is not None:
            _stop(server)
        _stop(tracker)


@requires_aarch64()
def test_rpc_on_an_aarch64_board_without_python_the_native_runner_under_qemu(tiny_onnx, tmp_path, capsys):
    """The board is the native runner's rpc mode built for aarch64 and run by qemu (a board with a bundle and
    no Python): it registers with TVM's tracker, and the tune's cross-compiled candidates are uploaded to it,
    loaded by its aarch64 TVM runtime and timed there (under emulation the times only prove the plumbing)."""
    from pbs2pc.runtime.native import build_runner, runner_prefix

    runner = build_runner("aarch64")
    key = "pbs2pc-qemu"
    tracker, port = _start_tracker()
    server = None
    try:
        board_port = free_port()
        server = subprocess.Popen([*runner_prefix("aarch64"), str(runner), "rpc", "--tracker", f"127.0.0.1:{port}",
                                   "--key", key, "--host", "127.0.0.1", "--port", str(board_port), "--port-end",
                                   str(board_port + 1), "--threads", "1"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        _wait_registered(port, key, server)
        db = tmp_path / "db"
        argv = ["tune", str(tiny_onnx), "--target", "rpi5", "--trials", "2", "-o", str(db),
                "--rpc-tracker", f"127.0.0.1:{port}", "--rpc-key", key, "--timeout", "120"]
        assert main(argv) == 0
        assert f"rpc 127.0.0.1:{port} key {key}" in capsys.readouterr().out
        records = _records(db)
        kernels = {r["key"] for r in records}
        assert any(k.startswith("arm_neon.") for k in kernels) and "lm_head_fp32:256x64" in kernels, kernels
        assert all(r["us"] is not None and r["us"] > 0 and r["error"] is None for r in records), records
        assert {r["key"] for r in records if r["default"]} == kernels  # each kernel's default was timed there
        # settings that beat their default in the search were re-timed in turns on the board
        best = {k: min((r for r in records if r["key"] == k), key=lambda r: r["us"]) for k in kernels}
        verdicts = json.loads((db / "confirm.json").read_text()) if (db / "confirm.json").exists() else {}
        assert set(verdicts) == {k for k, r in best.items() if not r["default"]}, (verdicts, best)
        assert all(v["default_us"] > 0 and v["tuned_us"] > 0 and v["rounds"] == 7 for v in verdicts.values())

        from pbs2pc.compiler.targets import get_preset
        from pbs2pc.compiler.tune import Runner, confirm, extract
        from pbs2pc.compiler.targets import CompileOptions

        kernel = next(k for k in extract(tiny_onnx, get_preset("rpi5"), CompileOptions()) if len(k.space()) > 1)
        result = confirm.ab_remote(kernel, kernel.space()[1], get_preset("rpi5"), Runner(("127.0.0.1", port), key,
                                                                                          timeout_s=120), rounds=3,
                                   repeats=3)
        assert result["default_us"] > 0 and result["tuned_us"] > 0 and 0 <= result["rounds_faster"] <= 3
        assert server.poll() is None  # the server outlives its sessions (one child process each)
    finally:
        if server is not None:
            _stop(server)
            errors = server.stderr.read()
            assert "session:" not in errors, errors  # no session failed on the board
        _stop(tracker)


def test_native_rpc_server_survives_a_session_that_crashes(tmp_path):
    """A library that crashes on the board (here: a kernel writing gigabytes past its buffer, SIGSEGV) takes
    down its session's child process, not the server: the client gets an error, the next session works."""
    from pbs2pc.compiler.tvm_compat import T, build_tir, rpc, tvm
    from pbs2pc.runtime.native import build_runner, host_machine

    @T.prim_func
    def crash(a: T.Buffer((16,), "float32")):
        for i in range(16):
            a[T.int64(1 << 40) + T.Cast("int64", i)] = T.float32(1)  # 4 TiB past the buffer

    @T.prim_func
    def double(a: T.Buffer((16,), "float32"), b: T.Buffer((16,), "float32")):
        for i in range(16):
            b[i] = a[i] * T.float32(2)

    paths = {}
    for name, func in (("crash", crash), ("double", double)):
        paths[name] = tmp_path / f"{name}.so"
        build_tir(tvm.IRModule({"main": func}), "llvm").export_library(str(paths[name]))
    runner = build_runner(host_machine())
    key = "pbs2pc-crash"
    tracker, port = _start_tracker()
    server = None
    try:
        board_port = free_port()
        server = subprocess.Popen([str(runner), "rpc", "--tracker", f"127.0.0.1:{port}", "--key", key, "--host",
                                   "127.0.0.1", "--port", str(board_port), "--port-end", str(board_port + 1)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                  start_new_session=True)
        _wait_registered(port, key, server)

        def session():
            return rpc().connect_tracker("127.0.0.1", port).request(key, session_timeout=60)

        remote = session()
        remote.upload(str(paths["crash"]))
        data = tvm.runtime.tensor(np.zeros(16, np.float32), remote.cpu())
        with pytest.raises(Exception):
            remote.load_module("crash.so")["main"](data)
        del remote, data
        _wait_registered(port, key, server)  # offered again once the crashed session is reaped
        remote = session()
        remote.upload(str(paths["double"]))
        a = tvm.runtime.tensor(np.arange(16, dtype=np.float32), remote.cpu())
        b = tvm.runtime.tensor(np.zeros(16, np.float32), remote.cpu())
        remote.load_module("double.so")["main"](a, b)
        np.testing.assert_array_equal(b.numpy(), np.arange(16, dtype=np.float32) * 2)
        assert server.poll() is None
    finally:
        if server is not None:
            _stop(server)
        _stop(tracker)
    assert "a session died of signal 11" in server.stderr.read()  # the crash happened, on the board


def test_native_rpc_server_refuses_bad_options():
    from pbs2pc.runtime.native import build_runner, host_machine

    runner = build_runner(host_machine())
    for args, says in ((["rpc", "--key", "k"], "needs --tracker HOST:PORT"),
                       (["rpc", "--tracker", "127.0.0.1", "--key", "k"], "--tracker must be HOST:PORT"),
                       (["rpc", "--tracker", "127.0.0.1:9190"], "needs --key"),
                       (["rpc", "--tracker", "127.0.0.1:9190", "--key", "a b"], "--key may hold"),
                       (["rpc", "--tracker", "127.0.0.1:9190", "--key", "k", "--port", "0"], "--port must be")):
        result = subprocess.run([str(runner), *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and says in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_offline_tune_a_device_script_times_the_candidates(tiny_onnx, tiny_library, tmp_path, capsys):
    """--offline: candidates built into db/device/, timed there by measure.py (here: this machine's CPU, in a
    subprocess with TVM's runtime), taken in by the next tune; a candidate that fails on the device is a
    failed run, exported again; compile with the database keeps the numerics."""
    from pbs2pc.runtime import load

    db = tmp_path / "db"
    argv = ["tune", str(tiny_onnx), "--target", X86, "--offline", "--trials", str(TRIALS), "-o", str(db)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "python3 device/measure.py" in out and not (db / "records.jsonl").exists()
    plan = json.loads((db / "device" / "plan.json").read_text())
    keys = {c["key"] for c in plan["candidates"]}
    assert len(keys) == 5 and len(plan["candidates"]) == TRIALS * 5
    assert all(sum(c["default"] for c in plan["candidates"] if c["key"] == k) == 1 for k in keys)
    # one candidate's library swapped for another kernel's: it fails on the device, the rest are timed
    broken = next(c for c in plan["candidates"] if not c["default"])
    other = next(c for c in plan["candidates"] if c["key"] != broken["key"])
    shutil.copyfile(db / "device" / other["library"], db / "device" / broken["library"])
    run = subprocess.run([sys.executable, str(db / "device" / "measure.py"), "--repeats", "3"], env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    results = [json.loads(line) for line in (db / "device" / "results.jsonl").read_text().splitlines()]
    assert len(results) == len(plan["candidates"])
    failed = [r for r in results if r["error"]]
    assert [(r["key"], r["knobs"]) for r in failed] == [(broken["key"], broken["knobs"])], failed
    assert failed[0]["error"].startswith("run:")
    assert all(r["us"] > 0 and len(r["runs_us"]) == 3 and r["timer"] == "wall" for r in results if not r["error"])

    assert main(argv) == 0  # takes the results in; the failed one is exported again
    out = capsys.readouterr().out
    assert f"took {len(results)} results" in out and "2 candidates to measure" in out  # it and its default
    again = json.loads((db / "device" / "plan.json").read_text())["candidates"]
    assert {(c["key"], json.dumps(c["knobs"], sort_keys=True)) for c in again if not c["default"]} == {
        (broken["key"], json.dumps(broken["knobs"], sort_keys=True))}
    assert len(_measured(_records(db))) == len(results) - 1

    lib = tmp_path / "tuned.so"
    assert main(["compile", str(tiny_onnx), "--target", X86, "--tuning-db", str(db), "-o", str(lib)]) == 0
    ids = np.array([[3, 1, 4, 1, 5]])
    np.testing.assert_allclose(load(lib).logits(ids), load(tiny_library).logits(ids), rtol=1e-6, atol=1e-6)


def test_cuda_tune_builds_fatbin_candidates_for_the_gpu_machine(tiny_onnx, tmp_path, capsys):
    """--target cuda: each candidate a library with its device code compiled (a fatbin for the arch), the
    CUDA GEMV's knobs (warps per block, K splits) in the plan; measure.py refuses a machine without a GPU."""
    from pbs2pc.compiler import cuda_export

    if cuda_export.nvcc_path() is None:
        pytest.skip("no nvcc: CUDA builds need the CUDA toolkit")
    db = tmp_path / "db"
    argv = ["tune", str(tiny_onnx), "--target", "cuda", "--arch", "sm_80", "-o", str(db)]
    assert main(argv) == 0
    assert "the GPU machine" in capsys.readouterr().out
    plan = json.loads((db / "device" / "plan.json").read_text())
    assert plan["device"] == "cuda" and json.loads((db / "target.json").read_text())["preset"] == "cuda"
    assert {c["key"].split(":")[0] for c in plan["candidates"]} == {"cuda.gemv_fp32"}
    assert {c["knobs"]["warps"] for c in plan["candidates"]} == {2, 4, 8}
    for cand in plan["candidates"]:
        path = db / "device" / cand["library"]
        assert [m for m, _ in cuda_export.device_modules(path)] == ["fatbin"], cand
        assert [cuda_export.fatbin_archs(f) for f in cuda_export.fatbins(path)] == [["compute_80", "sm_80"]]
    run = subprocess.run([sys.executable, str(db / "device" / "measure.py")], env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 2 and "no cuda device" in run.stdout, run.stdout + run.stderr
    before = {p.name: p.stat().st_mtime_ns for p in (db / "device" / "lib").iterdir()}
    assert main(argv) == 0  # nothing measured yet: the same candidates, not built again
    assert "built already" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (db / "device" / "lib").iterdir()} == before


def test_board_candidates_are_cross_compiled_shared_libraries():
    from pbs2pc.compiler.targets import get_preset
    from pbs2pc.compiler.tune import Kernel, Runner, Search
    from pbs2pc.passes.kernels import registry

    preset = get_preset("rpi5")
    if shutil.which(preset.cross_compiler) is None:
        pytest.skip(f"{preset.cross_compiler} is not installed")
    entry = next(e for e in registry.all_kernels() if e.name == "arm_neon.gemv_int8")
    kernel = Kernel("k", entry, _call(), 1)
    search = Search(preset, Runner(("127.0.0.1", 9), "rpi5"))
    built = search.builder.build([search.ms.builder.BuilderInput(kernel.build(k), search.target)
                                  for k in kernel.space()[:2]])
    for result in built:
        assert result.error_msg is None, result.error_msg
        head = Path(result.artifact_path).read_bytes()[:20]
        assert result.artifact_path.endswith(".so") and head[:4] == b"\x7fELF" and head[18] == 0xB7  # EM_AARCH64
