"""Edge bundles (``pbs2pc compile --bundle``) and the native runner's ``generate`` mode.

The aarch64 runner runs under qemu here and is checked against the x86 build run by the Python runtime (the
same greedy tokens) and against onnxruntime on the host (the logits). Tolerance: everything computes in
fp32, but the aarch64 kernels, the x86 kernels and onnxruntime's MLAS sum in different orders, so logits
agree to rounding only: measured, the tiny model's differ by 5e-7 of the largest logit and SmolLM2's (30
layers) by 3e-6 (the x86 build's by 2e-6). 1e-4 of the largest logit (the bar the x86 end-to-end test sets
for the compiled model against onnxruntime) leaves a margin of 30 over that and still catches any real
error (a wrong weight or cache position moves logits by whole units). Greedy tokens may differ only after a
step whose two best logits tie within rounding.

qemu is slow (SmolLM2 under qemu-aarch64 on 2 x86 cores: about 5 s a decode step, 100 s for a 64-token
prompt), so the SmolLM2 checks make 3 tokens of short prompts (about 3 minutes with the compile).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pbs2pc.cli import main
from pbs2pc.errors import Pbs2pcError
from testutil import host_lacks, make_ids, ort_logits, rel_err, requires_aarch64

#: fp32 activations: the runner's logits against onnxruntime's, relative to the largest (measured: tiny model
#: 5e-7, SmolLM2 3.3e-6; the x86 build 2.1e-6).
LOGITS_TOLERANCE = 1e-4
#: int8 activations (the ARM presets' default): against an x86 build with int8 activations, which computes
#: the same integer dots (only the fp32 order of the per-group sums differs); and against onnxruntime's fp32
#: model, what quantising every linear layer's input to int8 costs: a coarse check that catches a wrong layer
#: (errors of order 1), since a binarised model amplifies the rounding (SmolLM2 6:8 measured 0.091: its
#: logits are nearly flat, docs/performance.md).
INT8_TOLERANCE = 1e-3
INT8_VS_FP32 = 0.2
needs_aarch64 = requires_aarch64()
#: Whether this machine's x86 int8 build is the ARM int8 build's twin: it quantises the prompt's inputs
#: too only on x86-avx512 (the VNNI GEMM); on an AVX2-only machine its prompt runs in fp32 (no AVX2 int8
#: GEMM), so an ARM build whose prompt runs the sdot GEMM is checked against onnxruntime only.
X86_INT8_TWIN = not host_lacks("x86-avx512")


def run_runner(bundle, prompt_ids, new_tokens: int, dump, *extra, machine: str = "aarch64"):
    """``(greedy tokens, the logits they were chosen from)`` from the bundle's runner (qemu for aarch64)."""
    from pbs2pc.runtime.native import runner_prefix

    command = [*runner_prefix(machine), str(bundle / "runner"), "generate", str(bundle), "--prompt-ids",
               ",".join(map(str, prompt_ids)), "--max-new-tokens", str(new_tokens), "--threads", "2",
               "--dump-logits", str(dump), *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr
    return [int(line) for line in result.stdout.split()], np.load(dump)


def check_against_references(bundle, onnx_path, x86_library, prompt, new_tokens, tmp_path, machine="aarch64",
                             tolerance=LOGITS_TOLERANCE, ort_tolerance=LOGITS_TOLERANCE):
    """The runner's greedy tokens against the x86 build's, and its logits against the x86 build's (within
    ``tolerance``) and onnxruntime's (``ort_tolerance``), relative to the largest; ``x86_library`` None:
    onnxruntime's only (see :data:`X86_INT8_TWIN`)."""
    from pbs2pc.runtime import load

    tokens, logits = run_runner(bundle, prompt, new_tokens, tmp_path / "logits.npy", machine=machine)
    assert len(tokens) == new_tokens and logits.shape[0] == new_tokens
    sequence = np.asarray([list(prompt) + tokens[:-1]], np.int64)
    ref = ort_logits(onnx_path, sequence)[0, len(prompt) - 1:]
    assert logits.shape == ref.shape
    assert rel_err(logits, ref) < ort_tolerance
    if x86_library is None:
        return tokens
    x86 = load(x86_library)
    ref = x86.logits(sequence)[0, len(prompt) - 1:]
    assert rel_err(logits, ref) < tolerance
    expected = x86.generate_ids(prompt, new_tokens)
    for step, (a, b) in enumerate(zip(tokens, expected)):
        if a != b:  # allowed only where the reference's two best logits tie within rounding
            top2 = np.sort(ref[step])[-2:]
            assert top2[1] - top2[0] <= LOGITS_TOLERANCE * np.abs(ref[step]).max(), f"tokens differ at step {step}"
            break
    return tokens


def run_sh(bundle, *args, env=None, timeout=1200) -> subprocess.CompletedProcess:
    return subprocess.run([str(bundle / "run.sh"), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


# -- the tiny model: aarch64 under qemu, and an x86 bundle natively ---------------------------------------

@pytest.fixture(scope="module")
def tiny_arm_bundle(tiny_onnx, tmp_path_factory):
    """The tiny model compiled for ``arm`` with fp32 activations and bundled through the Python API (no
    tokenizer: it has none)."""
    from pbs2pc.compiler.build import compile_model
    from pbs2pc.compiler.targets import get_preset
    from pbs2pc.runtime.bundle import write_bundle

    folder = tmp_path_factory.mktemp("tiny_arm")
    compile_model(tiny_onnx, folder / "model.so", "arm", activations="fp32")
    return write_bundle(folder / "model.so", folder / "bundle", get_preset("arm"), tokenizer=None).directory


@needs_aarch64
def test_tiny_arm_runner_matches_the_x86_build_and_onnxruntime(tiny_arm_bundle, tiny_onnx, tiny_library, tmp_path):
    check_against_references(tiny_arm_bundle, tiny_onnx, tiny_library, make_ids(1, 7)[0], 6, tmp_path)


@needs_aarch64
def test_tiny_rpi5_default_int8_matches_the_x86_int8_build(tiny_onnx, tmp_path):
    """The ARM default (int8 activations: the NEON tbl GEMVs, the sdot GEMM) computes the x86 int8 build's numbers."""
    from pbs2pc.compiler.build import compile_model
    from pbs2pc.compiler.targets import get_preset
    from pbs2pc.runtime.bundle import write_bundle

    manifest = compile_model(tiny_onnx, tmp_path / "arm.so", "rpi5")
    assert manifest["activations"] == "int8"
    assert {"arm_neon.gemv_int8", "arm_neon.gemm_int8"} <= set(manifest["kernels"])
    compile_model(tiny_onnx, tmp_path / "x86.so", "x86", activations="int8")
    bundle = write_bundle(tmp_path / "arm.so", tmp_path / "bundle", get_preset("rpi5"), tokenizer=None).directory
    check_against_references(bundle, tiny_onnx, tmp_path / "x86.so" if X86_INT8_TWIN else None, make_ids(1, 7)[0], 6,
                             tmp_path, tolerance=INT8_TOLERANCE, ort_tolerance=INT8_VS_FP32)


@pytest.fixture(scope="module")
def tiny_x86_bundle(tiny_onnx, tmp_path_factory):
    """The tiny model compiled for this machine and bundled through the CLI, without -o."""
    folder = tmp_path_factory.mktemp("tiny_x86") / "bundle"
    assert main(["compile", str(tiny_onnx), "--target", "x86", "--bundle", str(folder)]) == 0
    return folder


def test_x86_bundle_holds_what_the_board_needs(tiny_x86_bundle, tiny_onnx, tiny_library, tmp_path):
    files = {p.name for p in tiny_x86_bundle.iterdir()}
    assert {"model.so", "model.weights.bin", "model.manifest.json", "model.runner.txt", "runner", "libtvm_runtime.so",
            "libtvm_ffi.so", "generate.py", "run.sh", "README.md", "bundle.json", "bench_prompt_ids.txt"} <= files
    assert not [p for p in tiny_x86_bundle.parent.iterdir() if p.name.startswith(".")]  # no scratch left
    readme = (tiny_x86_bundle / "README.md").read_text()
    assert "glibc 2.28" in readme and "avx2" in readme and "./run.sh --bench" in readme
    check_against_references(tiny_x86_bundle, tiny_onnx, tiny_library, make_ids(1, 5, seed=3)[0], 5, tmp_path,
                             machine="x86_64")


def test_bench_and_the_missing_tokenizer(tiny_x86_bundle):
    result = run_sh(tiny_x86_bundle, "--bench", "--max-new-tokens", "4", "--threads", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "prompt: 64 tokens in" in result.stdout and "decode: 3 tokens in" in result.stdout
    assert "tokens/s" in result.stdout
    result = run_sh(tiny_x86_bundle, "--prompt", "hello", env={"PBS2PC_PYTHON": sys.executable})
    assert result.returncode == 2 and "this bundle has no tokenizer" in result.stderr


def test_runner_sampling_is_seeded_and_bad_input_is_one_line(tiny_x86_bundle, tmp_path):
    prompt = make_ids(1, 4)[0]
    sample = ("--temperature", "0.9", "--top-k", "50", "--top-p", "0.95", "--seed")
    runs = [run_runner(tiny_x86_bundle, prompt, 8, tmp_path / "l.npy", *sample, seed, machine="x86_64")[0]
            for seed in ("1", "1", "2")]
    assert runs[0] == runs[1] and len(runs[2]) == 8
    runner = str(tiny_x86_bundle / "runner")
    for args, message in ((["--prompt-ids", "1,999"], "outside the vocabulary [0, 256)"),
                          (["--prompt-ids", "1,x"], "'x' is not a token id"),
                          (["--max-new-tokens", "0", "--prompt-ids", "1"], "at least 1"),
                          (["--prompt-ids", ",".join(["1"] * 256)], "context is 256")):
        result = subprocess.run([runner, "generate", str(tiny_x86_bundle), *args], capture_output=True, text=True)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    result = subprocess.run([runner, "generate", str(tmp_path), "--prompt-ids", "1"], capture_output=True, text=True)
    assert result.returncode == 2 and "model.runner.txt is missing" in result.stderr


def test_bundle_errors_are_one_line_and_leave_nothing(tiny_onnx, tiny_library, tmp_path, capsys):
    def user_error(argv, match):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err and match in err, err

    user_error(["compile", str(tiny_onnx)], "-o model.so) or a bundle folder (--bundle DIR)")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine\n")
    user_error(["compile", str(tiny_onnx), "--bundle", str(busy)], "is not empty and holds no bundle")
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    user_error(["compile", str(tiny_onnx), "-o", str(tmp_path / "b" / "m.so"), "--bundle", str(tmp_path / "b")],
               "inside the bundle folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]
    from pbs2pc.compiler.targets import get_preset
    from pbs2pc.runtime.bundle import write_bundle

    with pytest.raises(Pbs2pcError, match="compiled for target x86-.*, not arm"):
        write_bundle(tiny_library, tmp_path / "c", get_preset("arm"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]


# -- the real SmolLM2-135M for a Raspberry Pi 5, under qemu ------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_rpi5_bundle(smollm2_export, tmp_path_factory):
    """SmolLM2 for a Raspberry Pi 5 as a user builds it (the default: int8 activations)."""
    folder = tmp_path_factory.mktemp("smollm2_rpi5") / "bundle"
    assert main(["compile", str(smollm2_export[2] / "model.onnx"), "--target", "rpi5", "--bundle", str(folder)]) == 0
    return folder


@pytest.fixture(scope="module")
def smollm2_x86_int8(smollm2_export, tmp_path_factory):
    """The same model for this machine's x86 target with int8 activations: the ARM build's reference."""
    from pbs2pc.compiler.build import compile_model

    path = tmp_path_factory.mktemp("smollm2_x86_int8") / "model.so"
    compile_model(smollm2_export[2] / "model.onnx", path, "x86", activations="int8")
    return path


QEMU = {"PBS2PC_RUNNER_PREFIX": "qemu-aarch64 -L /usr/aarch64-linux-gnu", "PBS2PC_PYTHON": sys.executable}


@pytest.mark.slow
@needs_aarch64
def test_smollm2_rpi5_bundle_under_qemu(smollm2_rpi5_bundle, smollm2_export, smollm2_x86_int8, tmp_path):
    """A few tokens of real text: qemu runs the whole model at a few tokens per second at best."""
    _, tokenizer, folder = smollm2_export
    manifest = json.loads((smollm2_rpi5_bundle / "model.manifest.json").read_text())
    assert manifest["activations"] == "int8" and "arm_neon.gemv_int8" in manifest["kernels"]
    prompt = tokenizer("The river flows through the old town and", add_special_tokens=False).input_ids
    check_against_references(smollm2_rpi5_bundle, folder / "model.onnx", smollm2_x86_int8 if X86_INT8_TWIN else None,
                             prompt, 3, tmp_path, tolerance=INT8_TOLERANCE, ort_tolerance=INT8_VS_FP32)


@pytest.mark.slow
@needs_aarch64
def test_smollm2_run_sh_streams_text_and_benchmarks(smollm2_rpi5_bundle, smollm2_export, smollm2_x86_int8):
    from pbs2pc.runtime import load

    bundle, prompt = smollm2_rpi5_bundle, "The capital of France is"
    config = json.loads((bundle / "bundle.json").read_text())
    assert config["machine"] == "aarch64" and config["eos_token_ids"] and (bundle / "py/tokenizers").is_dir()
    result = run_sh(bundle, "--prompt", prompt, "--max-new-tokens", "3", "--no-chat", "--threads", "2", env=QEMU)
    assert result.returncode == 0, result.stderr
    if X86_INT8_TWIN:
        expected = load(smollm2_x86_int8).generate(prompt, 3).text
        assert result.stdout == prompt + expected + "\n" and expected
    else:  # no x86 twin of the sdot prompt here: the tokens' numerics are checked against onnxruntime above
        assert result.stdout.startswith(prompt) and result.stdout.strip() != prompt
    assert "decode: 2 tokens in" in result.stderr
    # generate.py's chat prompt (the template rendered at bundle time, tokenizers alone) has transformers' ids
    from tokenizers import Tokenizer

    ids = smollm2_export[1].apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                tokenize=True, return_dict=False)
    text = config["chat"]["prefix"] + prompt + config["chat"]["suffix"]
    assert Tokenizer.from_file(str(bundle / "tokenizer.json")).encode(text, add_special_tokens=False).ids == list(ids)
    # the fixed 64-token prompt takes minutes under qemu: a shorter one (the tiny bundle's test runs that one)
    result = run_sh(bundle, "--bench", "--prompt-ids", "1,2,3,4,5,6,7,8", "--max-new-tokens", "3", "--threads", "2",
                    env=QEMU)
    assert result.returncode == 0, result.stdout
    assert "prompt: 8 tokens in" in result.stdout and "decode: 2 tokens in" in result.stdout
