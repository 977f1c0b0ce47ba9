"""Loading artifacts and guarding the runtime's inputs."""

import shutil

import numpy as np
import pytest

from pbs2pc.errors import Pbs2pcError
from pbs2pc.runtime import load
from pbs2pc.runtime.artifact import artifact_paths, read_weights, write_weights


def test_weights_file_round_trip_is_aligned(tmp_path):
    params = {"a": np.arange(5, dtype=np.uint8), "b": np.random.default_rng(0).standard_normal((3, 7)).astype(np.float16)}
    entries = write_weights(tmp_path / "w.bin", params)
    assert all(e["offset"] % 64 == 0 for e in entries)
    for array, entry in zip(read_weights(tmp_path / "w.bin", entries), entries):
        np.testing.assert_array_equal(array, params[entry["name"]])


def test_bad_token_ids(tiny_library):
    model = load(tiny_library)
    with pytest.raises(Pbs2pcError, match="token ids must be in"):
        model.logits([[1, 2, 999]])
    with pytest.raises(Pbs2pcError, match="non-empty"):
        model.logits(np.zeros((1, 0), np.int64))
    with pytest.raises(Pbs2pcError, match="position ids must be in"):
        model.logits([[1, 2]], position_ids=[[0, 100000]])
    with pytest.raises(Pbs2pcError, match="shape of input_ids"):
        model.logits([[1, 2]], position_ids=[[0]])


def test_generate_is_greedy_over_logits(tiny_library):
    model = load(tiny_library)
    prompt = [5, 9, 100]
    out = model.generate_ids(prompt, 3)
    assert out[0] == int(np.argmax(model.logits([prompt])[0, -1]))
    assert out[1] == int(np.argmax(model.logits([prompt + out[:1]])[0, -1]))


def test_incomplete_artifacts_are_reported(tiny_library, tmp_path):
    lib, weights, manifest = artifact_paths(tiny_library)
    copy = tmp_path / "copy.so"
    shutil.copy(lib, copy)
    with pytest.raises(Pbs2pcError, match="copy.manifest.json is missing"):
        load(copy)
    shutil.copy(manifest, artifact_paths(copy)[2])
    with pytest.raises(Pbs2pcError, match="copy.weights.bin is missing"):
        load(copy)
    artifact_paths(copy)[1].write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(Pbs2pcError, match="truncated"):
        load(copy)
    with pytest.raises(Pbs2pcError, match="does not exist"):
        load(tmp_path / "nothing.so")


_THREADS_PROBE = """
import sys, tvm
from pbs2pc.runtime import load
model = load(sys.argv[1], threads=None if sys.argv[2] == "default" else int(sys.argv[2]))
print(model.threads, tvm.get_global_func("runtime.NumThreads")())
"""


@pytest.mark.parametrize("env, arg, expected", [
    (None, "default", "cpus"),  # TVM alone would take half the hardware threads
    ("1", "default", "1"),  # the user's TVM_NUM_THREADS wins over the default
    (None, "1", "1"),
])
def test_thread_pool_uses_every_cpu_unless_told(tiny_library, env, arg, expected):
    import os
    import subprocess
    import sys

    from pbs2pc.runtime.model import cpu_threads

    environ = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    if env is not None:
        environ["TVM_NUM_THREADS"] = env
    out = subprocess.run([sys.executable, "-c", _THREADS_PROBE, str(tiny_library), arg], env=environ,
                         capture_output=True, text=True, check=True).stdout.split()
    want = str(cpu_threads()) if expected == "cpus" else expected
    assert out == [want, want]


def test_bad_thread_count(tiny_library):
    with pytest.raises(Pbs2pcError, match="--threads must be at least 1"):
        load(tiny_library, threads=0)
