"""Tuning the kernel registry's hand-written kernels for a model and a target (``pbs2pc tune``).

The registry's kernels (:mod:`pbs2pc.passes.kernels.registry`) are hand-written TIR, not schedules of a
compute, so MetaSchedule's schedule-space generators have nothing to search in them. What moves their
speed is a handful of choices each builder takes as keyword arguments: 16-row tiles per parallel task,
whether the tasks run in parallel at all for a layer this size, the widening variant of the AVX2 int8
GEMV. Each :class:`~pbs2pc.passes.kernels.registry.KernelEntry` declares them as ``knobs(call)`` (the
hand-picked default first), and the tuner searches those settings with MetaSchedule's own components
(:mod:`.search`): its builder, its local or RPC runner, and its XGBoost cost model over the per-store
features of each candidate's TIR.

A device no runner reaches (a CUDA GPU, a board without a network; ``Runner(offline=True)``) is served by
:mod:`.device`: the candidates are built into the database's ``device/`` folder with a script that times
them there, and the next tune takes the results in.

Steps: list the model's distinct kernels (:func:`.kernels.extract`), open or create the database for
the target (:mod:`.database`: refused if made for another), tune each kernel, re-time each tuned setting
against its default in turns (:mod:`.confirm`: here, or on the board through the tracker; a setting not
faster there is not applied), print a table.
``pbs2pc compile --tuning-db DIR`` then builds every kernel the database has with its fastest setting
(:func:`knobs_from`), the rest with their defaults, and the manifest lists which came from the database.
"""

from __future__ import annotations

import dataclasses
import time

from pbs2pc.compiler.tune import confirm, device, step
from pbs2pc.compiler.tune.database import Database, open_database
from pbs2pc.compiler.tune.kernels import Kernel, extract, kernel_key, knob_id
from pbs2pc.compiler.tune.search import Runner, Search, timing_threads
from pbs2pc.errors import UnsupportedError

__all__ = ["Database", "Kernel", "Runner", "Search", "extract", "knobs_from", "open_database", "table", "tune_model"]


def tune_model(onnx_path, output, target="x86", trials: int = 64, options=None, runner: Runner | None = None,
               progress: bool = False, log=None) -> dict:
    """Tune the registry kernels of the model at ``onnx_path`` for ``target`` into the database folder
    ``output`` (resuming what it holds); return ``{"kernels": [row per kernel], "wall_s": ...}`` (rows as
    :func:`table` prints them). ``log`` receives progress lines; ``progress`` shows a bar with time left."""
    from pbs2pc.compiler.targets import CompileOptions, TargetPreset, get_preset

    start = time.perf_counter()
    say = log or (lambda _msg: None)
    preset = target if isinstance(target, TargetPreset) else get_preset(target)
    preset = preset.require()
    runner = runner or Runner()
    if preset.family == "cuda" and not runner.offline:
        runner = dataclasses.replace(runner, offline=True)  # no runner reaches a GPU: the device script times them
    options = (options or CompileOptions(preset.default_activations)).check(preset)
    if trials < 1:
        raise UnsupportedError(f"--trials must be at least 1, not {trials}.")
    db = open_database(output, preset, create=True)
    say(f"listing the kernels of {onnx_path} for {preset.name}")
    kernels = extract(onnx_path, preset, options)
    if runner.offline:
        return _tune_offline(kernels, db, preset, trials, say, progress, start)
    todo = {k.key: max(0, min(trials, len(k.space())) - sum(1 for s in k.space() if knob_id(s) in db.finished(k.key)))
            for k in kernels}
    where = runner.describe() + ("" if runner.tracker else f", {timing_threads(preset)} threads")
    say(f"{len(kernels)} distinct kernels, {sum(todo.values())} trials to run ({where}); "
        f"records: {db.path}")
    search = Search(preset, runner)
    from tqdm import tqdm

    with tqdm(total=sum(todo.values()), unit="trial", disable=not progress, dynamic_ncols=True) as bar:
        def phase(what):  # a round's builds come before its first record: say so on the bar
            bar.set_postfix_str(what, refresh=True)

        search.tune(kernels, db, trials, on_record=lambda _r: bar.update(1), on_phase=phase)
    stale = db.folder / step.STEP_FILE
    if sum(todo.values()) and stale.exists():  # its verdict was on other records
        stale.unlink()
        say("new records: the earlier step check no longer applies (run with --check-step again)")
    verdicts = confirm.confirm(kernels, db, preset, say, runner=runner)
    best = db.best()
    return {"kernels": [_row(k, db, best, verdicts) for k in kernels], "wall_s": round(time.perf_counter() - start, 1),
            "database": str(db.folder), "target": preset.name}


def _tune_offline(kernels, db, preset, trials, say, progress, start) -> dict:
    """The device-script way (:mod:`.device`): take in the results copied back, export what is missing."""
    taken = device.take_results(db)
    if taken:
        say(f"took {taken} results from {device.folder_of(db) / device.RESULTS} into {db.path}")
    todo = device.pending(kernels, db, trials)
    say(f"{len(kernels)} distinct kernels, {len(todo)} candidates to measure on the device")
    best = db.best()
    result = {"kernels": [_row(k, db, best) for k in kernels], "database": str(db.folder), "target": preset.name}
    if todo:
        plan = device.export(todo, db, preset, say, progress)
        result["pending"] = device.instructions(db, plan)
        result["device_folder"] = str(device.folder_of(db))
    result["wall_s"] = round(time.perf_counter() - start, 1)
    return result


def _row(kernel: Kernel, db: Database, bests: dict, verdicts: dict | None = None) -> dict:
    """A kernel's line of the table: the search's default and best times (``bests``: ``db.best()``), or, where
    the best setting was re-timed in turns (:mod:`.confirm`), those times; a setting not faster there is shown
    as not applied."""
    best = bests.get(kernel.key)
    default = db.default(kernel.key)
    row = {"key": kernel.key, "calls": kernel.calls, "space": len(kernel.space()),
           "measured": sum(1 for r in db.records if r["key"] == kernel.key and r.get("us") is not None),
           "default_us": default["us"] if default else None, "tuned_us": best["us"] if best else None,
           "knobs": best["knobs"] if best else None, "in_turns": False}
    verdict = (verdicts or {}).get(kernel.key)
    if best and verdict and verdict.get("knobs") == best["knobs"]:
        row.update(default_us=verdict["default_us"], tuned_us=verdict["tuned_us"], in_turns=True)
        if not confirm.kept(verdicts, kernel.key, best["knobs"]):  # compile builds the default
            row.update(tuned_us=verdict["default_us"], knobs=kernel.space()[0], not_applied=best["knobs"],
                       not_applied_us=verdict["tuned_us"])
    return row


def table(result: dict, step_us: float | None = None) -> str:
    """The closing table: per kernel the calls per decode step, default and tuned time, speed-up, and the
    share of the decode step it covers: of ``step_us`` (a measured step) when given, else of the step's
    time in these kernels (labelled so)."""
    rows = result["kernels"]
    in_kernels = sum(r["calls"] * (r["default_us"] or 0) for r in rows)
    whole = step_us or in_kernels
    share_label = "share of step" if step_us else "share of kernels"
    lines = [f"{'kernel':<62} {'calls':>5} {'default us':>10} {'tuned us':>9} {'speed-up':>8} {share_label:>16}  knobs"]
    for r in rows:
        d, t = r["default_us"], r["tuned_us"]
        speed = f"{d / t:.2f}x" if d and t else "-"
        share = f"{100 * r['calls'] * d / whole:.1f} %" if d and whole else "-"
        knobs = _knobs(r["knobs"])
        if r.get("not_applied"):
            knobs += (f" (the default: the search's {_knobs(r['not_applied'])} took {_us(r['not_applied_us'])} us "
                      "in turns)")
        lines.append(f"{r['key']:<62} {r['calls']:>5} {_us(d):>10} {_us(t):>9} {speed:>8} {share:>16}  {knobs}")
    tuned = sum(r["calls"] * (r["tuned_us"] or r["default_us"] or 0) for r in rows)
    turns = sum(1 for r in rows if r.get("in_turns"))
    if turns:
        lines.append(f"default and tuned times of the {turns} kernel{'s' * (turns > 1)} whose setting changed: "
                     f"re-timed in turns ({confirm.ROUNDS} rounds); the others' as the search measured them")
    lines.append(f"decode step in these kernels: {in_kernels:.1f} us default, {tuned:.1f} us tuned"
                 + (f"; measured step {step_us:.1f} us" if step_us else "")
                 + f"; tuning took {result['wall_s']:.0f} s")
    return "\n".join(lines)


def _knobs(knobs) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted((knobs or {}).items()))


def _us(value) -> str:
    return f"{value:.1f}" if value is not None else "-"


def knobs_from(folder, preset):
    """The database in ``folder`` (refused if made for another target) as the lowering's ``knobs``
    callback, and the set that receives the keys it applied: ``(knobs, applied)``. Entries the whole-step
    check left out (:mod:`.step`) and settings no faster than the default in turns (:mod:`.confirm`) keep
    their defaults."""
    db = open_database(folder, preset)
    left_out = step.excluded(folder)  # the whole-step check's verdict (pbs2pc tune --check-step)
    verdicts = confirm.read(folder)  # settings not faster than the default in turns keep the default
    best = {key: record for key, record in db.best().items()
            if step.entry_of(key) not in left_out and confirm.kept(verdicts, key, record["knobs"])}
    applied: set = set()

    def knobs(_function, entry, call):
        record = best.get(kernel_key(entry, call))
        if record is None:
            return None  # not in the database: the defaults
        applied.add(record["key"])
        return record["knobs"]

    return knobs, applied
