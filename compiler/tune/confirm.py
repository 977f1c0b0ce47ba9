"""Each tuned kernel re-timed against its default in turns, at the end of a local tune.

The search keeps each setting's time as measured when its batch ran, minutes apart from the default's,
on a machine whose speed moves with its load; and the best of many noisy times is biased low. On SmolLM2
(docs/tuning.md) the search put 576x576 on x86-avx2 at 1.22x its default and an A/B in turns at 1.03x.
So a local tune ends here: every kernel whose best setting is not its default is built both ways
(in this process, with the tune's kernel threads) and the two are timed in turns, :data:`ROUNDS` rounds
of :data:`REPEATS` passes over rotating argument copies (the search's own timing,
:func:`~pbs2pc.compiler.tune.search._run_rotating`), median of each. The result goes to
``DIR/confirm.json`` (per key the setting, both medians, the rounds and the rounds the setting won),
written after each kernel (a killed tune keeps what it finished; a rerun re-times only kernels whose
best setting changed). A tuned setting that is not faster in turns (a lower median, and faster in most
rounds) is not applied: :func:`kept` tells :func:`pbs2pc.compiler.tune.knobs_from` (``compile
--tuning-db``) to build that kernel with its default, and the closing table shows the times in turns.
The records stay as they are.

Through ``--rpc-tracker`` the same happens on the board (:func:`ab_remote`): both settings of a kernel
are built as the search builds them (cross-compiled shared libraries), uploaded to one session, and timed
there in turns with the search's RPC timing (one call after a cache flush per repeat); a board that does
not answer within the tune's ``--timeout`` per kernel and round leaves that kernel as the search found it,
and the tune says so. ``--offline`` tunes (the device script) have nowhere to time and skip this.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
from pathlib import Path

CONFIRM_FILE = "confirm.json"
#: Rounds of default then tuned; passes over the argument copies per round and setting.
ROUNDS = 7
REPEATS = 10


def read(folder) -> dict:
    """The verdicts in ``folder`` (empty where there are none or the file is unreadable)."""
    try:
        data = json.loads((Path(folder) / CONFIRM_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def kept(verdicts: dict, key: str, knobs: dict) -> bool:
    """Whether ``knobs``, the database's best setting of ``key``, is applied: where it was re-timed in turns,
    only if its median there is below the default's and it was faster in most rounds (the step check's
    rule); a setting not re-timed (from the device script, or a board that did not answer) is applied as the
    search found it."""
    verdict = verdicts.get(key)
    if verdict is None or verdict.get("knobs") != knobs:
        return True
    return verdict["tuned_us"] < verdict["default_us"] and 2 * verdict["rounds_faster"] > verdict["rounds"]


def confirm(kernels, db, preset, say=None, rounds: int = ROUNDS, repeats: int = REPEATS, runner=None) -> dict:
    """Re-time each kernel of ``kernels`` whose best setting in ``db`` is not its default against the
    default, in turns (see the module docstring), here or, for a ``runner`` with a tracker, on its board;
    return the verdicts, also written to ``confirm.json``."""
    from pbs2pc.compiler.tune.kernels import knob_id
    from pbs2pc.compiler.tune.search import use_timing_threads

    say = say or (lambda _msg: None)
    best = db.best()
    verdicts = read(db.folder)
    todo = [k for k in kernels if k.key in best and knob_id(best[k.key]["knobs"]) != knob_id(k.space()[0])
            and verdicts.get(k.key, {}).get("knobs") != best[k.key]["knobs"]]
    if not todo:
        return verdicts
    remote = runner is not None and runner.tracker is not None
    if not remote:
        use_timing_threads(preset)  # in this process, with the threads the search timed with
    say(f"re-timing {len(todo)} tuned kernel{'s' * (len(todo) > 1)} against their defaults, in turns "
        f"({rounds} rounds{', on the board' if remote else ''})")
    for done, kernel in enumerate(todo):
        knobs = best[kernel.key]["knobs"]
        if remote:
            try:
                result = ab_remote(kernel, knobs, preset, runner, rounds, repeats)
            except RemoteError as e:
                say(f"  {kernel.key}: not re-timed ({e}); the search's times stand")
                if e.no_answer:  # the board is gone: do not wait the timeout once more per kernel
                    left = len(todo) - done - 1
                    if left:
                        say(f"  the other {left} not re-timed either; run the tune again when the board is back")
                    break
                continue
        else:
            result = ab(kernel, knobs, preset, rounds, repeats)
        verdicts[kernel.key] = {"knobs": knobs, "default_us": round(result["default_us"], 2),
                                "tuned_us": round(result["tuned_us"], 2), "rounds_faster": result["rounds_faster"],
                                "rounds": rounds}
        _write(db.folder, verdicts)
    return verdicts


def ab(kernel, knobs: dict, preset, rounds: int = ROUNDS, repeats: int = REPEATS) -> dict:
    """``kernel`` built with its default and with ``knobs`` for ``preset`` (a target this machine runs) and
    timed in turns: ``rounds`` rounds of ``repeats`` passes each over rotating argument copies, default
    first. ``{"default_us", "tuned_us"}`` (medians of all passes), ``rounds_faster`` (rounds whose median
    pass was faster tuned), ``bytes`` (one call's arguments) and ``copies``."""
    from pbs2pc.compiler.tune.kernels import inputs
    from pbs2pc.compiler.tune.search import ROTATE_BYTES, _run_rotating
    from pbs2pc.compiler.tvm_compat import build_tir, tensor, tvm

    arrays = inputs(kernel)
    size = sum(a.nbytes for a in arrays)
    copies = [[tensor(a) for a in arrays] for _ in range(max(2, -(-ROTATE_BYTES // size)))]
    target = preset.tvm_target()
    libs = {name: build_tir(kernel.build(setting), target)
            for name, setting in (("default", kernel.space()[0]), ("tuned", knobs))}
    evaluator = type("Repeats", (), {"repeat": repeats})()  # what _run_rotating reads of an EvaluatorConfig
    result = _in_turns(rounds, lambda name: _run_rotating(libs[name], tvm.cpu(), evaluator, copies))
    return {**result, "bytes": int(size), "copies": len(copies)}


def _in_turns(rounds: int, samples) -> dict:
    """``rounds`` rounds of ``samples("default")`` then ``samples("tuned")`` (each a list of seconds):
    ``{"default_us", "tuned_us"}`` (medians of all samples) and ``rounds_faster`` (rounds whose median was
    lower tuned)."""
    times = {"default": [], "tuned": []}
    faster = 0
    for _ in range(rounds):
        round_median = {}
        for name in times:
            got = samples(name)
            times[name].extend(got)
            round_median[name] = statistics.median(got)
        faster += round_median["tuned"] < round_median["default"]
    return {"default_us": statistics.median(times["default"]) * 1e6,
            "tuned_us": statistics.median(times["tuned"]) * 1e6, "rounds_faster": faster}


class RemoteError(Exception):
    """The board could not re-time a kernel: ``no_answer`` when it did not answer in time (gone, or hung),
    else a call failed there."""

    def __init__(self, message: str, no_answer: bool = False):
        super().__init__(message)
        self.no_answer = no_answer


def ab_remote(kernel, knobs: dict, preset, runner, rounds: int = ROUNDS, repeats: int = REPEATS) -> dict:
    """:func:`ab` on the board behind ``runner``'s tracker: both settings built as the search builds them,
    uploaded to one session and timed there in turns, ``repeats`` calls per round and setting, each after a
    cache flush (the search's RPC timing). Each round has ``runner.timeout_s`` seconds (the session and the
    upload included in the first): past that, or on an error there, :class:`RemoteError`."""
    import threading

    from pbs2pc.compiler.tune.kernels import inputs
    from pbs2pc.compiler.tune.search import export_candidate
    from pbs2pc.compiler.tvm_compat import build_tir, rpc, tensor

    arrays = inputs(kernel)
    target = preset.tvm_target()
    paths = {name: export_candidate(preset, build_tir(kernel.build(setting), target))
             for name, setting in (("default", kernel.space()[0]), ("tuned", knobs))}
    state: dict = {}

    def connect():
        host, port = runner.tracker
        session = rpc().connect_tracker(host, port).request(runner.key, session_timeout=0)
        device = session.cpu()
        timers = {}
        for name, path in paths.items():
            session.upload(path, f"{name}.so")
            module = session.load_module(f"{name}.so")
            timers[name] = module.time_evaluator(module.entry_name, device, number=1, repeat=repeats,
                                                 f_preproc="cache_flush_cpu_non_first_arg")
        state.update(session=session, timers=timers, args=[tensor(a, device) for a in arrays])

    def timed(name):
        state["result"] = list(state["timers"][name](*state["args"]).results)

    def samples(name):
        within_timeout(timed, name)
        return state["result"]

    def within_timeout(work, *args):
        state.pop("error", None)

        def run():
            try:
                work(*args)
            except Exception as e:  # noqa: BLE001 - a failure on the board, reported as one line
                state["error"] = e

        worker = threading.Thread(target=run, daemon=True)  # a board that hangs leaves it behind, not the tune
        worker.start()
        worker.join(runner.timeout_s)
        if worker.is_alive():
            raise RemoteError(f"the board did not answer within {runner.timeout_s:.0f} s", no_answer=True)
        if "error" in state:
            error = state["error"]
            raise RemoteError((str(error).strip().splitlines() or [type(error).__name__])[-1][:200])

    try:
        within_timeout(connect)
        result = _in_turns(rounds, samples)
    finally:
        state.clear()  # closes the session
        for path in paths.values():
            shutil.rmtree(Path(path).parent, ignore_errors=True)
    return {**result, "bytes": int(sum(a.nbytes for a in arrays)), "copies": 1}


def _write(folder: Path, verdicts: dict) -> None:
    path = Path(folder) / CONFIRM_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(verdicts, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
