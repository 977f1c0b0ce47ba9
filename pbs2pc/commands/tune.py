"""``pbs2pc tune model.onnx --target PRESET --trials N -o tune_db/``: tune the model's kernels for a target.

Lists the model's distinct registry kernels, searches each one's knobs (tiles per task, parallel or not,
...) with MetaSchedule's builder, runner and XGBoost cost model, and writes every measurement to the
database folder as it is made (a killed tune resumes where it stopped); a local tune then re-times each
kernel's best setting against its default in turns and keeps it only where it is faster there.
``pbs2pc compile --tuning-db DIR`` then uses it. Boards: ``--rpc-tracker HOST:PORT --rpc-key KEY`` runs the candidates, cross-compiled, on a
device registered with TVM's RPC tracker; ``--target cuda`` (and ``--offline`` for any target) builds the
candidates into DIR/device/ with a script that times them where they run, and the next run takes the
results in. Details: docs/tuning.md.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path


def add_parser(sub):
    from pbs2pc.compiler.targets import TARGET_NAMES  # no TVM import: --help stays fast

    p = sub.add_parser("tune", help="tune a model's kernels for a target into a database for compile --tuning-db",
                       description=__doc__)
    p.add_argument("model", help="the .onnx file to tune the kernels of")
    p.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="the tuning database folder (created; an existing one for the same target is resumed)")
    p.add_argument("--target", default="x86", choices=list(TARGET_NAMES), help="target preset (default: x86)")
    p.add_argument("--trials", type=int, default=64,
                   help="knob settings measured per kernel, at most (default 64; fewer where a kernel has fewer)")
    p.add_argument("--activations", choices=["fp32", "int8"],
                   help="tune the kernels a compile with these activations runs (default: the target's, as compile)")
    p.add_argument("--lm-head", choices=["fp32", "fp16", "int8"], default="fp32",
                   help="tune the LM head kernel a compile with this --lm-head runs too (fp16, int8: its rows per step, "
                        "prefetch distance and level, K unroll, rows per task); use the same with compile")
    p.add_argument("--check-step", action="store_true",
                   help="with --library: compile the model with the tuned settings and time its decode step against "
                        "the library's, in turns (kernels tuned one at a time need not make the step faster)")
    p.add_argument("--rpc-tracker", metavar="HOST:PORT",
                   help="run candidates on a board registered with this TVM RPC tracker (with --rpc-key)")
    p.add_argument("--rpc-key", metavar="KEY", help="the board's key at the RPC tracker")
    p.add_argument("--offline", action="store_true",
                   help="build the candidates into DIR/device/ with a script that times them where they run (a device "
                        "no runner reaches); copy DIR/device/results.jsonl back and run the command again. A CUDA "
                        "target always tunes this way")
    p.add_argument("--arch", metavar="SM", help="with --target cuda: the GPU architecture, as for compile (default sm_90)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="S",
                   help="seconds a candidate's run may take, upload included, before it counts as failed "
                        "(default 60): a board that goes away costs this much per candidate, then the tune goes on")
    p.add_argument("--library", metavar="MODEL.so",
                   help="a library compiled from the same model without tuning: its decode step is timed so the "
                        "table gives each kernel's share of the step (else: its share of these kernels' time)")
    return p


def _tracker(value: str | None, key: str | None):
    from pbs2pc.errors import Pbs2pcError

    if value is None:
        if key is not None:
            raise Pbs2pcError("--rpc-key needs --rpc-tracker HOST:PORT.")
        return None
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise Pbs2pcError(f"--rpc-tracker takes HOST:PORT (e.g. 127.0.0.1:9190), not {value!r}.")
    if not key:
        raise Pbs2pcError("--rpc-tracker needs --rpc-key KEY, the key the board registered with.")
    return host, int(port)


def check_tracker(tracker, key: str) -> None:
    """One clear error unless the tracker answers and has a board registered with ``key``."""
    from pbs2pc.compiler.tvm_compat import rpc
    from pbs2pc.errors import Pbs2pcError

    host, port = tracker
    try:
        with socket.create_connection((host, port), timeout=10):
            pass  # something listens (TVM's connect_tracker retries for a minute before it gives up)
        summary = rpc().connect_tracker(host, port).summary()
    except Exception:  # noqa: BLE001 - any failure to talk to it says the same thing
        raise Pbs2pcError(f"cannot reach an RPC tracker at {host}:{port}; start one with: python -m "
                          f"tvm.exec.rpc_tracker --host {host} --port {port}") from None
    keys = set(summary.get("queue_info", {}))
    if key not in keys:
        known = f" (it has: {', '.join(sorted(keys))})" if keys else " (it has none)"
        raise Pbs2pcError(f"the RPC tracker at {host}:{port} has no board with key {key!r}{known}; on the board run: "
                          f"python -m tvm.exec.rpc_server --tracker {host}:{port} --key {key}")


def _check_local(preset) -> None:
    """A local runner needs a target this machine executes."""
    from pbs2pc import cpu
    from pbs2pc.errors import Pbs2pcError

    if preset.machine != cpu.architecture() or preset.cross_compiler:
        raise Pbs2pcError(f"target {preset.name!r} runs on a board, not this {cpu.architecture()} machine; give "
                          "--rpc-tracker HOST:PORT --rpc-key KEY for a board registered with TVM's RPC tracker, "
                          "or --offline to build the candidates with a script that times them on the board.")
    lacking = cpu.missing(preset.features)
    if lacking:
        raise Pbs2pcError(f"this CPU lacks {', '.join(lacking)}, which target {preset.name!r} executes; tune it on a "
                          "machine that has them (through --rpc-tracker, or --offline).")


def _local_gpu() -> bool:
    """Whether TVM's runtime sees a CUDA device on this machine."""
    from pbs2pc.compiler.tvm_compat import tvm

    try:
        return bool(tvm.cuda(0).exist)
    except Exception:  # noqa: BLE001 - a runtime without CUDA: no GPU here
        return False


def step_time_us(library: str, steps: int = 32) -> float:
    """The median time of one decode step of ``library`` (a short prompt, then ``steps`` steps)."""
    from pbs2pc.compiler.tune.step import median_step_us
    from pbs2pc.runtime import load

    return median_step_us(load(library), steps)


def _check_library_matches(library: str, preset, options) -> None:
    """One clear error unless ``library`` was compiled for what is tuned (its manifest's target, activations
    and LM head): a step check against another build compares different models."""
    import json

    from pbs2pc.errors import Pbs2pcError

    manifest = Path(library).with_suffix(".manifest.json")
    try:
        built = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError):
        raise Pbs2pcError(f"{manifest} is missing or unreadable; give --library the .so pbs2pc compile wrote "
                          "(its manifest beside it).") from None
    want = {"target": preset.name, "activations": options.activations, "lm_head": options.lm_head}
    differs = {k: built.get(k) for k, v in want.items() if built.get(k) != v}
    if differs:
        raise Pbs2pcError(f"--library {library} was compiled with {differs}, not {want}; compile it with the same "
                          "--target, --activations and --lm-head as this tune.")


def check_step(args, preset, options) -> str:
    """The whole-step check (:mod:`pbs2pc.compiler.tune.step`): one line saying what it found."""
    from pbs2pc.compiler.tune import open_database, step

    result = step.check(open_database(args.output, preset), args.model, args.library, preset, options,
                        log=lambda msg: print(msg, flush=True))
    return step.describe(result)


def run(args) -> int:
    from pbs2pc.compiler.targets import CompileOptions, get_preset
    from pbs2pc.compiler.tune import Runner, table, tune_model
    from pbs2pc.errors import Pbs2pcError

    tracker = _tracker(args.rpc_tracker, args.rpc_key)
    if args.trials < 1:
        raise Pbs2pcError(f"--trials must be at least 1, not {args.trials}.")
    if args.timeout <= 0:
        raise Pbs2pcError(f"--timeout must be positive, not {args.timeout}.")
    if not Path(args.model).is_file():
        raise Pbs2pcError(f"{args.model} does not exist; give the .onnx file pbs2pc export wrote.")
    if args.check_step and not args.library:
        raise Pbs2pcError("--check-step needs --library MODEL.so, the model compiled without tuning, to compare with.")
    if args.library and not Path(args.library).is_file():
        raise Pbs2pcError(f"--library {args.library} does not exist; compile the model first (pbs2pc compile).")
    preset = get_preset(args.target, arch=args.arch).require()
    offline = args.offline or preset.family == "cuda"
    if offline and tracker:
        raise Pbs2pcError("--rpc-tracker times candidates on a board through TVM's RPC; --offline (and a CUDA target) "
                          "times them with a script run there: choose one.")
    if (Path(args.output) / "target.json").exists():  # an existing database: refused now if for another target
        from pbs2pc.compiler.tune import open_database

        open_database(args.output, preset)
    if tracker:
        check_tracker(tracker, args.rpc_key)
    elif not offline:
        _check_local(preset)
    if args.check_step and (offline or tracker):
        raise Pbs2pcError("--check-step times the decode step on this machine; it needs a target tuned here, not "
                          "through --rpc-tracker, --offline or --target cuda.")
    options = CompileOptions(args.activations or preset.default_activations, args.lm_head)
    if args.check_step:
        _check_library_matches(args.library, preset, options)
    runner = Runner(tracker, args.rpc_key, args.timeout, offline=offline)
    result = tune_model(args.model, args.output, preset, trials=args.trials,
                        options=options, runner=runner, progress=True,
                        log=lambda msg: print(msg, flush=True))
    if result.get("pending") and preset.family == "cuda" and _local_gpu():
        # this machine has the GPU: time the candidates here, then take the results in
        subprocess.run([sys.executable, str(Path(result["device_folder"]) / "measure.py")], check=False)
        result = tune_model(args.model, args.output, preset, trials=args.trials,
                            options=options, runner=runner, log=lambda msg: print(msg, flush=True))
    if result.get("pending"):
        print(result["pending"])
        return 0
    step = step_time_us(args.library) if args.library else None
    print(table(result, step))
    if args.check_step:
        sys.stdout.flush()
        print(check_step(args, preset, options))
    same = "".join(f" {flag} {value}" for flag, value in (("--arch", args.arch), ("--activations", args.activations),
                                                           ("--lm-head", None if args.lm_head == "fp32" else args.lm_head))
                   if value)
    print(f"database: {args.output}; use it with: pbs2pc compile {args.model} --target {args.target}{same} "
          f"--tuning-db {args.output} -o model.so")
    sys.stdout.flush()
    return 0
