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

Tunes through ``--rpc-tracker`` or ``--offline`` have no kernel here to time and skip this.
"""

from __future__ import annotations

import json
import os
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
    rule); a setting not re-timed (from a board or the device script) is applied as the search found it."""
    verdict = verdicts.get(key)
    if verdict is None or verdict.get("knobs") != knobs:
        return True
    return verdict["tuned_us"] < verdict["default_us"] and 2 * verdict["rounds_faster"] > verdict["rounds"]


def confirm(kernels, db, preset, say=None, rounds: int = ROUNDS, repeats: int = REPEATS) -> dict:
    """Re-time each kernel of ``kernels`` whose best setting in ``db`` is not its default against the
    default, in turns (see the module docstring); return the verdicts, also written to ``confirm.json``."""
    from pbs2pc.compiler.tune.kernels import knob_id
    from pbs2pc.compiler.tune.search import use_timing_threads

    say = say or (lambda _msg: None)
    best = db.best()
    verdicts = read(db.folder)
    todo = [k for k in kernels if k.key in best and knob_id(best[k.key]["knobs"]) != knob_id(k.space()[0])
            and verdicts.get(k.key, {}).get("knobs") != best[k.key]["knobs"]]
    if not todo:
        return verdicts
    use_timing_threads(preset)  # in this process, with the threads the search timed with
    say(f"re-timing {len(todo)} tuned kernel{'s' * (len(todo) > 1)} against their defaults, in turns "
        f"({rounds} rounds)")
    for kernel in todo:
        knobs = best[kernel.key]["knobs"]
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
    times = {name: [] for name in libs}
    faster = 0
    for _ in range(rounds):
        round_median = {}
        for name, lib in libs.items():
            samples = _run_rotating(lib, tvm.cpu(), evaluator, copies)
            times[name].extend(samples)
            round_median[name] = statistics.median(samples)
        faster += round_median["tuned"] < round_median["default"]
    return {"default_us": statistics.median(times["default"]) * 1e6,
            "tuned_us": statistics.median(times["tuned"]) * 1e6, "rounds_faster": faster, "bytes": int(size),
            "copies": len(copies)}


def _write(folder: Path, verdicts: dict) -> None:
    path = Path(folder) / CONFIRM_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(verdicts, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
