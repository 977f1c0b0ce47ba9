"""Candidates measured where no runner reaches: built here, timed there by a script, taken back in.

MetaSchedule's runners time a candidate in a process on this machine (``LocalRunner``) or on a board
that a TVM RPC tracker fronts (``RPCRunner``). A GPU reached only by copying files to it (a batch job, a
machine lent for a few minutes with no route back), or a board with no network, has neither. For
those the tune goes in three steps through the database folder's ``device/`` subfolder:

1. :func:`export` builds the settings still to measure into shared libraries (a CUDA target's with its
   device code compiled to a fatbin by nvcc, :mod:`pbs2pc.compiler.cuda_export`, so only TVM's runtime
   is needed to load them; a board's cross-compiled), writes each kernel's inputs
   (``inputs/<n>.npz``: :func:`pbs2pc.compiler.tune.kernels.inputs`), ``plan.json`` (the candidates)
   and ``measure.py`` (a copy of :mod:`pbs2pc.measure_candidates`: numpy and TVM's runtime only);
2. ``python3 measure.py`` on the device checks each setting's output against the default's, times it and
   appends ``results.jsonl`` as it goes;
3. :func:`take_results`, run by the next ``pbs2pc tune`` into the same folder, appends the results the
   database has not got to its records; what is still missing is exported again.

Without a cost model trained on the device, the settings are exported in a fixed order: the default
first, then the rest (a seeded sample of ``trials`` where a kernel's space is larger). The default is
always among them, so each kernel's baseline comes from the same run as its candidates.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

from pbs2pc.compiler.tune.database import read_records
from pbs2pc.compiler.tune.kernels import Kernel, inputs, knob_id
from pbs2pc.compiler.tune.search import timing_threads

FOLDER = "device"
PLAN, RESULTS = "plan.json", "results.jsonl"
#: Bytes of argument copies the script rotates over: above a CPU's last-level cache and an H100's or
#: H200's 50 MB L2 (twice that), so every call reads its weights from memory.
ROTATE_BYTES = {"cpu": 64 << 20, "cuda": 128 << 20}


def folder_of(db) -> Path:
    return Path(db.folder) / FOLDER


def take_results(db) -> int:
    """Append the device results the database lacks (a setting it has measured or failed to build is
    kept as it is); the number taken."""
    taken = 0
    for record in read_records(folder_of(db) / RESULTS):  # a last line cut short by a kill is dropped
        if knob_id(record["knobs"]) in db.finished(record["key"]):
            continue
        db.append({k: record.get(k) for k in ("key", "knobs", "default", "us", "runs_us", "error", "timer")})
        taken += 1
    return taken


def pending(kernels: list[Kernel], db, trials: int, seed: int = 0) -> list[tuple[Kernel, dict]]:
    """``(kernel, knobs)`` still to measure: per kernel up to ``trials`` settings in all, the default first
    (always listed where any other is, so the run times its baseline beside them)."""
    out = []
    for kernel in kernels:
        space = kernel.space()
        finished = db.finished(kernel.key)
        budget = min(trials, len(space)) - sum(1 for k in space if knob_id(k) in finished)
        rest = [k for k in space[1:] if knob_id(k) not in finished]
        random.Random(seed).shuffle(rest)
        chosen = rest[:max(0, budget - (knob_id(space[0]) not in finished))]
        if chosen or knob_id(space[0]) not in finished:
            out.extend((kernel, k) for k in [space[0], *chosen])
    return out


def export(todo: list[tuple[Kernel, dict]], db, preset, log=None, progress: bool = False) -> dict:
    """Build ``todo`` into the database's ``device/`` folder (see the module docstring); the plan. A folder
    that already holds exactly these candidates is kept as it is (with any results measured so far)."""
    from tqdm import tqdm

    say = log or (lambda _msg: None)
    folder = folder_of(db)
    device = "cuda" if preset.family == "cuda" else "cpu"
    kernels = list({kernel.key: kernel for kernel, _ in todo}.values())
    names = {k.key: f"k{i:02d}" for i, k in enumerate(kernels)}
    candidates = []
    for kernel, knobs in todo:
        tag = hashlib.sha256(knob_id(knobs).encode()).hexdigest()[:10]
        candidates.append({"key": kernel.key, "knobs": knobs, "default": knob_id(knobs) == knob_id(kernel.space()[0]),
                           "library": f"lib/{names[kernel.key]}_{tag}.so", "inputs": f"inputs/{names[kernel.key]}.npz"})
    plan = {"preset": preset.name, "device": device, "identity": db.identity, "rotate_bytes": ROTATE_BYTES[device],
            "threads": timing_threads(preset) if device == "cpu" else None, "candidates": candidates}
    old = folder / PLAN
    if old.exists() and json.loads(old.read_text()).get("candidates") == candidates and all(
            (folder / c["library"]).exists() for c in candidates):
        say(f"the {len(candidates)} candidates in {folder} are built already")
        return plan
    if folder.exists():
        shutil.rmtree(folder)
    tmp = folder.with_name(FOLDER + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "lib").mkdir(parents=True)
    (tmp / "inputs").mkdir()
    import numpy as np

    try:
        for kernel in kernels:
            arrays = inputs(kernel)
            np.savez(tmp / "inputs" / f"{names[kernel.key]}.npz", **{f"a{i:02d}": a for i, a in enumerate(arrays)})
        with tqdm(total=len(todo), unit="candidate", disable=not progress, dynamic_ncols=True) as bar:
            for (kernel, knobs), cand in zip(todo, candidates):
                build_library(kernel, knobs, preset, tmp / cand["library"])
                bar.update(1)
        from pbs2pc import measure_candidates

        shutil.copyfile(measure_candidates.__file__, tmp / "measure.py")
        (tmp / PLAN).write_text(json.dumps(plan, indent=1) + "\n")
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return plan


def build_library(kernel: Kernel, knobs: dict, preset, path: Path) -> None:
    """The candidate as a shared library the device's TVM runtime loads (function ``main``)."""
    from pbs2pc.compiler.tvm_compat import build_tir, cc

    mod = build_tir(kernel.build(knobs), preset.tvm_target())
    if preset.family == "cuda":
        from pbs2pc.compiler import cuda_export

        cuda_export.export_library(mod, path, preset.gpu_arch)
    elif preset.cross_compiler:
        mod.export_library(str(path), fcompile=cc.cross_compiler(preset.cross_compiler, options=list(preset.cross_flags)))
    else:
        mod.export_library(str(path))


def instructions(db, plan: dict) -> str:
    """What the user does next, in a few lines."""
    folder = folder_of(db)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    kernels = len({c["key"] for c in plan["candidates"]})
    where = "the GPU machine" if plan["device"] == "cuda" else f"a machine of target {plan['preset']}"
    return (f"{len(plan['candidates'])} candidates of {kernels} kernels are built in {folder} ({size / 2**20:.1f} MiB). "
            f"Copy that folder to {where} and run there: python3 {FOLDER}/measure.py (it needs numpy and TVM's "
            f"runtime only); then copy {FOLDER}/{RESULTS} back into {folder} and run this command again to take "
            "the results in.")
