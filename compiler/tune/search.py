"""The search: MetaSchedule's builder, runner and XGBoost cost model over a kernel's knob settings.

Per kernel, rounds of: rank the settings not measured yet with the cost model (XGBoost over
MetaSchedule's per-store features of each candidate's TIR; random until it has data), build the best
``batch`` of them with MetaSchedule's ``LocalBuilder`` (cross-compiled and linked by the preset's
compiler for a board), time them with its ``LocalRunner`` or, for a board behind TVM's RPC tracker,
its ``RPCRunner``, write each record as it returns, and update the model; until ``trials`` settings
(or the whole space, where it is smaller) are done. The default setting is always measured first, so
every kernel has its baseline from the same runner.

Timing, local runner: as a decode step runs a kernel. A step streams each layer's weights from memory
(the model's weights are larger than the last-level cache), and the kernel threads are awake from the
kernel before. So the runner allocates enough copies of the kernel's arguments to exceed
:data:`ROTATE_BYTES` and calls the kernel on each copy in turn, back to back (:func:`_run_rotating`): per
repeat the time of one pass over the copies divided by their number, median of the repeats. Timing one
call after a cache flush instead (MetaSchedule's default) times every parallel launch from sleeping
threads, which a decode step does not see (docs/tuning.md). RPC runner: one call per repeat after a cache
flush on the board (a loop of calls over RPC would time the network).

Threads: a candidate runs with as many kernel threads as the compiled model will (:func:`timing_threads`:
the target's ``num-cores``, or ``TVM_NUM_THREADS`` where the user set it). TVM's own default is half the
hardware threads on x86 (one on a 2-vCPU machine), which times every parallel kernel on one core and
makes serial settings win that are slower in the model's step. The local runner's worker processes
inherit the variable; a board's RPC server sizes its own pool (start it with ``TVM_NUM_THREADS`` set).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import statistics

from pbs2pc.compiler.tune.kernels import Kernel, inputs, knob_id
from pbs2pc.compiler.tvm_compat import popen_pool, tune_context
from pbs2pc.runtime.model import THREADS_ENV

#: Timed repeats per candidate; the median is its time.
REPEATS = 25
#: Bytes of argument copies a local candidate rotates over: twice a 32 MiB last-level cache, so every call
#: reads its weights from memory, as in a decode step.
ROTATE_BYTES = 64 << 20
#: Candidates built and timed per round (the builder starts a process per round: a few seconds).
BATCH = 8
#: Builder processes at most (each imports TVM: a few hundred MB).
MAX_BUILD_WORKERS = 8


def use_timing_threads(preset) -> int:
    """Give this process's TVM thread pool, and the runner workers it starts, :func:`timing_threads`
    (effective where the pool has not started yet); return the count."""
    import os

    threads = timing_threads(preset)
    os.environ[THREADS_ENV] = str(threads)
    return threads


def timing_threads(preset) -> int:
    """The kernel threads candidates are timed with: ``TVM_NUM_THREADS`` where set (as the runtime honours
    it), else the preset's ``num-cores``, what its parallel loops are sized for and what
    :func:`pbs2pc.runtime.model.configure_threads` gives the model on the machine it was made for."""
    import os

    if os.environ.get(THREADS_ENV, "").strip().isdigit() and int(os.environ[THREADS_ENV]) > 0:
        return int(os.environ[THREADS_ENV])
    return max(1, int(preset.target.get("num-cores", 1) or 1))


@dataclasses.dataclass(frozen=True)
class Runner:
    """Where candidates run: this machine, or a board behind an RPC tracker (``host:port``, ``key``)."""

    tracker: tuple[str, int] | None = None
    key: str | None = None
    timeout_s: float = 60.0
    #: Neither: candidates are built into the database's ``device/`` folder with a script that times them
    #: where they run (:mod:`pbs2pc.compiler.tune.device`; a CUDA target always goes this way).
    offline: bool = False

    def describe(self) -> str:
        if self.offline:
            return "built here, timed by device/measure.py where they run"
        return f"rpc {self.tracker[0]}:{self.tracker[1]} key {self.key}" if self.tracker else "local"


def _load_inputs(table, args_info) -> list:
    """The inputs of the kernel whose parameters are ``args_info``: ``table`` maps :func:`_signature` to an
    ``.npz`` file of them (a path, not the arrays: the runner's worker receives its function's arguments
    pickled with every candidate, and SmolLM2's LM head input alone is 113 MB)."""
    import numpy as np

    with np.load(table[json.dumps(args_info)]) as saved:
        return [saved[f"arr_{i}"] for i in range(len(saved.files))]


def _alloc_local(table, device, args_info, _alloc_repeat):
    """MetaSchedule's ``f_alloc_argument`` for the local runner: copies of the realistic inputs of the kernel
    whose parameters are ``args_info`` (:func:`_load_inputs`), :data:`ROTATE_BYTES` in all."""
    from pbs2pc.compiler.tvm_compat import tensor

    arrays = _load_inputs(table, args_info)
    copies = max(2, min(1024, -(-ROTATE_BYTES // sum(a.nbytes for a in arrays))))
    return [[tensor(a, device) for a in arrays] for _ in range(copies)]


def _run_rotating(rt_mod, device, evaluator_config, repeated_args) -> list[float]:
    """MetaSchedule's ``f_run_evaluator`` for the local runner: per repeat, one call on each argument copy in
    turn; seconds per call (see the module docstring). One untimed pass first."""
    import time

    func = rt_mod[rt_mod.entry_name]
    for args in repeated_args:
        func(*args)
    costs = []
    for _ in range(evaluator_config.repeat):
        device.sync()
        start = time.perf_counter()
        for args in repeated_args:
            func(*args)
        device.sync()
        costs.append((time.perf_counter() - start) / len(repeated_args))
    return costs


def _alloc_rpc(table, _session, device, args_info, alloc_repeat):
    """The RPC runner's ``f_alloc_argument``: the kernel's inputs copied to the board, once."""
    from pbs2pc.compiler.tvm_compat import tensor

    arrays = _load_inputs(table, args_info)
    return [[tensor(a, device) for a in arrays] for _ in range(alloc_repeat)]


def _build(mod, target, _params):
    """MetaSchedule's ``f_build``: the candidate's code, without the default builder's import of every
    tensor intrinsic TVM ships (a minute per builder process on a busy machine; see
    :func:`pbs2pc.compiler.tvm_compat.tune_context`)."""
    from pbs2pc.compiler.tvm_compat import build_tir

    return build_tir(mod, target)


def _export_shared(compiler, flags, rt_mod) -> str:
    """MetaSchedule's ``f_export`` for a board: a shared library the board loads as is, linked here by the
    preset's cross compiler (None: this machine's, for a board of this machine's kind). Its default export,
    a ``.tar`` of objects, needs a compiler on the board to link, which a board serving with the native
    runner (``runner rpc``) does not have."""
    import os
    import tempfile

    from pbs2pc.compiler.tvm_compat import cc

    path = os.path.join(tempfile.mkdtemp(prefix="pbs2pc_tune_"), "candidate.so")
    rt_mod.export_library(path, fcompile=cc.cross_compiler(compiler, options=list(flags)) if compiler else None)
    return path


def export_candidate(preset, rt_mod) -> str:
    """A built candidate as the file a board loads (:func:`_export_shared` with the preset's compiler), in a
    folder of its own (the caller removes it)."""
    return _export_shared(preset.cross_compiler, preset.cross_flags, rt_mod)


class Search:
    """Tunes kernels for one preset with one builder and runner kind (see the module docstring)."""

    def __init__(self, preset, runner: Runner, workers: int | None = None):
        """``workers``: builder processes (default: this machine's cores; a round's builds end before its
        timings start, so they never share the cores with a measurement)."""
        import os

        from pbs2pc.compiler.tvm_compat import meta_schedule

        workers = workers or max(1, min(MAX_BUILD_WORKERS, os.cpu_count() or 1))
        self.ms = meta_schedule()
        self.preset = preset
        self.target = preset.tvm_target()
        self.runner_spec = runner
        export = functools.partial(_export_shared, preset.cross_compiler, preset.cross_flags) \
            if preset.cross_compiler or runner.tracker else None
        self.builder = self.ms.builder.LocalBuilder(max_workers=workers, timeout_sec=300, f_build=_build,
                                                    f_export=export)
        self.evaluator = self.ms.runner.EvaluatorConfig(number=1, repeat=REPEATS, min_repeat_ms=0,
                                                        enable_cpu_cache_flush=bool(runner.tracker))

    def _runner(self, table: dict):
        ms = self.ms
        if self.runner_spec.tracker:
            host, port = self.runner_spec.tracker
            config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=self.runner_spec.key,
                                         session_timeout_sec=int(self.runner_spec.timeout_s))
            runner = ms.runner.RPCRunner(config, self.evaluator, f_alloc_argument=functools.partial(_alloc_rpc, table),
                                         max_workers=1)
            # MetaSchedule's RPC runner waits for the tracker's session without limit: a board that went away
            # would hang the tune. Its worker pool with a timeout kills the wait (the runner's future reports
            # "Timeout"), so each candidate costs at most timeout_s and the tune goes on.
            runner.pool.shutdown()
            runner.pool = popen_pool(max_workers=1, timeout=self.runner_spec.timeout_s)
            return runner
        use_timing_threads(self.preset)  # the workers' pools (see the module docstring)
        return ms.runner.LocalRunner(timeout_sec=self.runner_spec.timeout_s, evaluator_config=self.evaluator,
                                     f_alloc_argument=functools.partial(_alloc_local, table),
                                     f_run_evaluator=_run_rotating)

    def tune(self, kernels: list[Kernel], db, trials: int, on_record=None, batch: int = BATCH, seed: int = 0,
             on_phase=None) -> None:
        """Measure up to ``trials`` settings of each kernel (fewer where its space is smaller), skipping those
        ``db`` has finished; every record goes to ``db`` as it returns and to ``on_record``. Each round
        builds the next batch of every kernel together and times them with one runner (each builder round
        and the runner start a process: a few seconds each on a busy machine). ``on_phase`` hears what a
        round is doing (``"building 72 candidates"``, ``"timing"``): a round's builds come before any of
        its records (a minute or more for SmolLM2's first round)."""
        import shutil
        import tempfile

        import numpy as np

        states = [s for s in (_State(self.ms, k, db, trials, self.target, seed) for k in kernels) if s.left() > 0]
        if not states:
            return
        folder = tempfile.mkdtemp(prefix="pbs2pc_tune_inputs_")
        runner = None
        try:
            table = {}
            for number, state in enumerate(states):
                table[_signature(state.args_info)] = path = f"{folder}/{number}.npz"
                np.savez(path, *inputs(state.kernel, seed))
            runner = self._runner(table)
            while states:
                chosen = [(s, knobs) for s in states for knobs in s.next_batch(batch)]
                if not chosen:
                    break
                for (state, knobs), record in self._measure(chosen, runner, on_phase):
                    state.done_with(knobs, record)
                    db.append(record)
                    if on_record:
                        on_record(record)
                for state in states:
                    state.learn()
                states = [s for s in states if s.left() > 0]
        finally:
            pool = getattr(runner, "pool", None)
            if pool is not None:
                pool.shutdown()
            shutil.rmtree(folder, ignore_errors=True)

    def _measure(self, chosen: list, runner, on_phase=None):
        """Build and time the ``(state, knobs)`` pairs of ``chosen``: yields ``(pair, record)`` as each record
        is complete (a failed build at once, a timing as its run returns), so each is written as measured."""
        ms = self.ms
        say = on_phase or (lambda _phase: None)
        records = [{"key": s.kernel.key, "knobs": k, "default": knob_id(k) == s.default, "us": None, "runs_us": None,
                    "error": None} for s, k in chosen]
        say(f"building {len(chosen)} candidate{'s' * (len(chosen) > 1)}")
        built = self.builder.build([ms.builder.BuilderInput(s.kernel.build(k), self.target) for s, k in chosen])
        runs = []
        for record, pair, result in zip(records, chosen, built):
            if result.error_msg:
                record["error"] = "build: " + _last_line(result.error_msg)
                yield pair, record
            else:
                runs.append((pair, record, ms.runner.RunnerInput(result.artifact_path, _device_type(self.target),
                                                                 pair[0].args_info)))
        say("timing")
        for pair, record, run_input in runs:
            # one at a time: MetaSchedule's LocalRunner.run waits for every input it is given before it returns
            result = runner.run([run_input])[0].result()
            if result.error_msg:
                record["error"] = "run: " + _last_line(result.error_msg)
            else:
                times = [float(t) * 1e6 for t in result.run_secs]
                record["runs_us"] = [round(t, 3) for t in times]
                record["us"] = round(statistics.median(times), 3)
            yield pair, record


class _State:
    """One kernel's search: its space, what is finished, its cost model."""

    def __init__(self, ms, kernel: Kernel, db, trials: int, target, seed: int):
        self.ms, self.kernel = ms, kernel
        self.space = kernel.space()
        self.default = knob_id(self.space[0])
        finished = db.finished(kernel.key)
        self.attempted = set(finished)
        self.budget = min(trials, len(self.space))
        self.done = sum(1 for k in self.space if knob_id(k) in finished)
        self.rng = random.Random(seed)
        self.context = tune_context(target)
        self.args_info = ms.arg_info.ArgInfo.from_prim_func(kernel.build(self.space[0])["main"])
        self.model = ms.cost_model.XGBModel(extractor=ms.feature_extractor.PerStoreFeature(), num_warmup_samples=0,
                                            adaptive_training=False, num_tuning_cores=1)
        self.trained = 0
        # a resumed tune: the model learns what the records say first
        self.fresh = [(k, finished[knob_id(k)]["runs_us"]) for k in self.space
                      if knob_id(k) in finished and finished[knob_id(k)].get("runs_us")]
        if self.left() > 0:
            self.learn()

    def left(self) -> int:
        return self.budget - self.done

    def candidate(self, knobs):
        """What the feature extractor reads: the candidate's TIR as a schedule."""
        return self.ms.MeasureCandidate(_schedule(self.kernel.build(knobs)), self.args_info)

    def next_batch(self, batch: int) -> list[dict]:
        """The next settings to measure: the default first, then the cost model's best guesses (random
        until it has data; a sample of 64 ranked where the space is larger)."""
        pending = [k for k in self.space if knob_id(k) not in self.attempted]
        if not pending or self.left() <= 0:
            return []
        if self.default not in self.attempted:
            order = [self.space[0]] + [k for k in pending if knob_id(k) != self.default]
        elif self.trained:
            pool = self.rng.sample(pending, min(len(pending), 64))
            scores = self.model.predict(self.context, [self.candidate(k) for k in pool])
            order = [k for _, k in sorted(zip(scores, range(len(pool))), key=lambda p: -p[0])]
            order = [pool[i] for i in order]
        else:
            order = self.rng.sample(pending, len(pending))
        return order[:min(batch, self.left())]

    def done_with(self, knobs: dict, record: dict) -> None:
        self.attempted.add(knob_id(knobs))
        self.done += 1
        if record.get("runs_us"):
            self.fresh.append((knobs, record["runs_us"]))

    def learn(self) -> None:
        """Update the cost model with the measurements it has not seen."""
        if not self.fresh:
            return
        ms = self.ms
        self.model.update(self.context, [self.candidate(k) for k, _ in self.fresh],
                          [ms.runner.RunnerResult([t * 1e-6 for t in runs], None) for _, runs in self.fresh])
        self.trained += len(self.fresh)
        self.fresh = []


def _signature(args_info) -> str:
    """The kernel's parameter types as a string: how the runner's argument allocator finds its inputs."""
    return json.dumps([a.as_json() for a in args_info])


def _device_type(target) -> str:
    return "cuda" if target.kind.name == "cuda" else "cpu"


def _schedule(mod):
    from pbs2pc.compiler.tvm_compat import Schedule

    return Schedule(mod)


def _last_line(message: str) -> str:
    lines = [line.strip() for line in str(message).strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "failed"
