"""The whole-step check of a tuning database (``pbs2pc tune --library model.so --check-step``).

Kernels are tuned one at a time, each timed alone; in a decode step they run between other kernels, and
a setting that wins alone can lose there (docs/tuning.md: SmolLM2's GEMVs run faster serially alone and
make the step slower). :func:`check` compiles the model with the database's settings, times its decode
step against the untuned library in paired rounds (:func:`step_ab`) and, where the tuned step is not
faster, tries the database without each registry entry's settings in turn (one compile each: all the
GEMVs of one kernel share their trade-off), and keeps the fastest. The entries left out are written to
``step_check.json`` as ``"excluded"``; :func:`pbs2pc.compiler.tune.knobs_from` (``compile --tuning-db``)
then builds those kernels with their defaults. The records stay as they are.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path

from pbs2pc.compiler.tune.database import RECORDS_FILE, TARGET_FILE

STEP_FILE = "step_check.json"


def excluded(folder) -> set:
    """The registry entries whose settings the step check left out of the database in ``folder``."""
    path = Path(folder) / STEP_FILE
    if not path.exists():
        return set()
    try:
        return set(json.loads(path.read_text()).get("excluded", []))
    except (OSError, json.JSONDecodeError, AttributeError):
        return set()


def entry_of(key: str) -> str:
    """The registry entry (or LM head kernel) a tuning key belongs to: ``x86_avx512.gemv_v2_fp32:...`` ->
    ``x86_avx512.gemv_v2_fp32``."""
    return key.split(":", 1)[0]


def median_step_us(model, steps: int = 32) -> float:
    """The median time of one decode step of a loaded model (a short prompt, then ``steps`` steps; the
    first two left out), in microseconds."""
    model.prefill([1, 2, 3, 4], capacity=8 + steps)
    times = []
    for i in range(steps):
        start = time.perf_counter()
        model.step(5 + i % 7)
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:]) * 1e6


def step_ab(default: str, tuned: str, rounds: int = 7, steps: int = 32) -> dict:
    """The two libraries' decode steps timed in turns: ``rounds`` rounds of ``steps`` steps each after a
    short prompt; per library the median step in microseconds, and in how many rounds the tuned one was
    faster."""
    from pbs2pc.runtime import load

    models = {"default": load(default), "tuned": load(tuned)}
    medians: dict = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            medians[name].append(median_step_us(model, steps))
    wins = sum(t < d for d, t in zip(medians["default"], medians["tuned"]))
    return {"default_us": statistics.median(medians["default"]), "tuned_us": statistics.median(medians["tuned"]),
            "tuned_faster_rounds": wins, "rounds": rounds,
            "rounds_us": {k: [round(v, 1) for v in vals] for k, vals in medians.items()}}


def _faster(result: dict) -> bool:
    """The tuned step is faster: a lower median and faster in most paired rounds."""
    return result["tuned_us"] < result["default_us"] and 2 * result["tuned_faster_rounds"] > result["rounds"]


def check(db, onnx_path, library, preset, options, log=None, rounds: int = 7) -> dict:
    """Run the step check of ``db`` (see the module docstring); the result written to ``step_check.json``:
    ``{"variants": [{"excluded", "default_us", "tuned_us", ...}], "excluded": [...], "library": ...}``."""
    from pbs2pc.compiler.build import compile_model

    say = log or (lambda _msg: None)
    folder = Path(db.folder)
    work = folder / "step_check"
    entries = sorted({entry_of(key) for key in db.best()})

    def variant(leave_out: list, index: int) -> dict:
        sub = work / f"db{index}"
        if sub.exists():
            shutil.rmtree(sub)
        sub.mkdir(parents=True)
        shutil.copyfile(folder / TARGET_FILE, sub / TARGET_FILE)
        (sub / RECORDS_FILE).write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in db.records
                                                if entry_of(r["key"]) not in leave_out))
        lib = work / f"model{index}.so"
        what = "every tuned setting" if not leave_out else f"all but {', '.join(leave_out)}"
        say(f"step check: compiling the model with {what}")
        compile_model(onnx_path, lib, preset, options=options, tuning_db=sub)
        result = step_ab(str(library), str(lib), rounds=rounds)
        say(f"step check: {what}: {result['tuned_us'] / 1e3:.2f} ms against {result['default_us'] / 1e3:.2f} ms "
            f"untuned, faster in {result['tuned_faster_rounds']} of {result['rounds']} rounds")
        return {"excluded": leave_out, "library": str(lib), **result}

    variants = [variant([], 0)]
    if not _faster(variants[0]) and len(entries) > 1:
        variants += [variant([entry], i + 1) for i, entry in enumerate(entries)]
    winners = [v for v in variants if _faster(v)]
    best = max(winners, key=lambda v: v["default_us"] / v["tuned_us"]) if winners else None
    result = {"variants": variants, "excluded": best["excluded"] if best else entries,
              "library": best["library"] if best else str(library), "untuned_library": str(library)}
    tmp = folder / (STEP_FILE + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(folder / STEP_FILE)
    return result


def describe(result: dict) -> str:
    """One line: what the check measured and what the database now applies."""
    first = result["variants"][0]
    d, t = first["default_us"], first["tuned_us"]
    line = (f"decode step with every tuned setting: {t / 1e3:.2f} ms against {d / 1e3:.2f} ms untuned ({d / t:.2f}x; "
            f"faster in {first['tuned_faster_rounds']} of {first['rounds']} paired rounds)")
    if not result["excluded"]:
        return line + "; compile --tuning-db applies them all."
    kept = next((v for v in result["variants"] if v["excluded"] == result["excluded"]), None)
    if kept is None:
        return line + ("; no subset made the step faster, so compile --tuning-db builds every kernel with its defaults "
                       f"(excluded: {', '.join(result['excluded'])}).")
    return line + (f"; without {', '.join(kept['excluded'])}: {kept['tuned_us'] / 1e3:.2f} ms against "
                   f"{kept['default_us'] / 1e3:.2f} ms ({kept['default_us'] / kept['tuned_us']:.2f}x), so compile "
                   f"--tuning-db leaves {', '.join(kept['excluded'])} at its defaults.")
