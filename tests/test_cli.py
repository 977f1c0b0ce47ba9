"""The CLI in-process: the pipeline's commands, and bad input giving one line, exit code 2, no leftovers."""

import json
import re

import pytest

from pbs2pc.cli import main
from pbs2pc.models import modules


@pytest.fixture(scope="module")
def checkpoint(tiny_compressed, tmp_path_factory):
    model, info = tiny_compressed
    return modules.save_compressed(model, None, tmp_path_factory.mktemp("ckpt") / "tiny", {"source_model": "tiny", **info})


def test_export_compile_inspect_run(checkpoint, tmp_path, capsys):
    onnx_path, lib = tmp_path / "m.onnx", tmp_path / "m.so"
    assert main(["export", str(checkpoint), "-o", str(onnx_path)]) == 0
    assert main(["inspect", str(onnx_path)]) == 0
    out = capsys.readouterr().out
    assert "compressed layers: 14" in out and "2.500 as stored" in out and "0.750 (signs of kept weights only" in out
    assert main(["compile", str(onnx_path), "--target", "x86", "-o", str(lib)]) == 0
    assert lib.exists()
    capsys.readouterr()
    assert main(["inspect", str(lib), "--layers"]) == 0
    out = capsys.readouterr().out
    assert "compiled for x86-avx" in out and "model.layers.1.mlp.down_proj" in out
    assert re.search(r"bits per weight, compiled: 2\.[0-5]\d\d as the weights file stores them", out)
    assert re.search(r"runs on x86_64 CPUs with .*avx2 .*fma", out)
    assert "KV cache: 2 layers x 2 kv heads x head_dim 16" in out and "'decode'" in out
    assert main(["run", str(lib), "--input-ids", "1,2,3"]) == 0
    out = capsys.readouterr().out
    assert "logits [1, 3, 256]" in out and "next token candidates" in out


def test_inspect_json(tiny_library, capsys):
    assert main(["inspect", str(tiny_library), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["target"] in ("x86-avx512", "x86-avx2") and info["summary"]["layers"] == 14
    assert "avx2" in info["cpu_features"]


def _assert_user_error(argv, capsys, match, tmp_path=None):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert match in err, err
    if tmp_path is not None:
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") or p.suffix in (".so", ".bin", ".json")]


@pytest.mark.parametrize("target", ["arm", "rpi5", "jetson-orin"])
def test_arm_without_the_cross_toolchain_says_how_to_install_it(tiny_onnx, tmp_path, capsys, monkeypatch, target):
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))  # no aarch64-linux-gnu-g++ on the PATH
    _assert_user_error(["compile", str(tiny_onnx), "--target", target, "-o", str(tmp_path / "m.so")], capsys,
                       "apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu", tmp_path)


def test_cuda_without_nvcc_says_how_to_install_it(tiny_onnx, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "no-cuda"))
    _assert_user_error(["compile", str(tiny_onnx), "--target", "cuda", "-o", str(tmp_path / "m.so")], capsys,
                       "needs nvcc", tmp_path)
    _assert_user_error(["compile", str(tiny_onnx), "--target", "x86-avx2", "--arch", "sm_90", "-o",
                        str(tmp_path / "m.so")], capsys, "--arch is for --target cuda", tmp_path)
    _assert_user_error(["compile", str(tiny_onnx), "--target", "cuda", "--arch", "sm_70", "-o",
                        str(tmp_path / "m.so")], capsys, "unknown GPU architecture", tmp_path)


def test_bad_inputs_give_one_line_and_exit_2(tiny_onnx, tmp_path, capsys):
    out = str(tmp_path / "m.so")
    _assert_user_error(["compile", str(tmp_path / "missing.onnx"), "-o", out], capsys, "does not exist", tmp_path)
    (tmp_path / "text.onnx").write_text("not a model\n")
    _assert_user_error(["compile", str(tmp_path / "text.onnx"), "-o", out], capsys, "not a readable ONNX file", tmp_path)
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(tiny_onnx.read_bytes()[:5000])
    _assert_user_error(["compile", str(cut), "-o", out], capsys, "cut.onnx", tmp_path)
    _assert_user_error(["run", str(tmp_path / "nothing.so"), "--input-ids", "1"], capsys, "does not exist")
    _assert_user_error(["inspect", str(tmp_path / "text.onnx")], capsys, "not a readable ONNX file")
    _assert_user_error(["export", str(tmp_path), "-o", str(tmp_path / "x.onnx")], capsys, "not a compressed model folder")


def test_truncated_external_data(tiny_onnx, tmp_path, capsys):
    import shutil

    shutil.copy(tiny_onnx, tmp_path / "model.onnx")
    data = tiny_onnx.with_name("model.onnx.data").read_bytes()
    (tmp_path / "model.onnx.data").write_bytes(data[: len(data) // 3])
    _assert_user_error(["compile", str(tmp_path / "model.onnx"), "-o", str(tmp_path / "m.so")], capsys, "model.onnx")
    assert not (tmp_path / "m.so").exists()


def test_bad_run_arguments(tiny_library, capsys):
    _assert_user_error(["run", str(tiny_library), "--input-ids", "1,x"], capsys, "comma-separated integers")
    _assert_user_error(["run", str(tiny_library), "--input-ids", "1,100000"], capsys, "token ids must be in")
    _assert_user_error(["run", str(tiny_library), "--prompt", "  "], capsys, "--prompt is empty")
    _assert_user_error(["run", str(tiny_library), "--prompt", "hi", "--temperature", "-1"], capsys, "temperature")
    _assert_user_error(["run", str(tiny_library), "--prompt", "hi", "--top-p", "2"], capsys, "top_p")
    _assert_user_error(["run", str(tiny_library), "--prompt", "hi", "--max-new-tokens", "0"], capsys, "at least 1")


def test_unknown_sampling_option_is_an_argparse_error(tiny_library, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", str(tiny_library), "--prompt", "hi", "--top-z", "3"])
    assert exc.value.code == 2 and "unrecognized arguments: --top-z" in capsys.readouterr().err


def test_unknown_target_is_an_argparse_error(tiny_onnx, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compile", str(tiny_onnx), "--target", "riscv", "-o", str(tmp_path / "m.so")])
    assert exc.value.code == 2
    assert "invalid choice: 'riscv'" in capsys.readouterr().err


def test_invalid_nm_is_rejected(tmp_path, capsys):
    _assert_user_error(["compress", "smollm2-135m", "--method", "simple", "--nm", "9:8", "-o", str(tmp_path / "c")],
                       capsys, "9:8")
    assert not (tmp_path / "c").exists()


def test_evaluation_only_checkpoints_are_not_exported(checkpoint, tmp_path, capsys):
    import shutil

    folder = tmp_path / "billm"
    shutil.copytree(checkpoint, folder)
    manifest = json.loads((folder / "pbs2pc.json").read_text())
    (folder / "pbs2pc.json").write_text(json.dumps({**manifest, "method": "billm", "exportable": False}))
    _assert_user_error(["export", str(folder), "-o", str(tmp_path / "m.onnx")], capsys, "evaluation-only", tmp_path)
    assert not (tmp_path / "m.onnx").exists()


def test_demo_summary_reports_the_compiled_bits(tiny_library):
    from pbs2pc.demo import DemoResult, format_result
    from pbs2pc.runtime.artifact import artifact_paths

    summary = json.loads(artifact_paths(tiny_library)[2].read_text())["summary"]
    text = format_result(DemoResult({"original (PyTorch)": 31.4}, {"compile": 1.0}, summary, 10, "", 1e-6))
    assert f"{summary['bits_interchange']:.3f} as stored in the ONNX file" in text
    assert f"{summary['bits_target']:.3f} in the compiled weights (target layout)" in text


def test_compile_names_the_chosen_target_and_a_foreign_cpu_is_refused(tiny_onnx, tmp_path, capsys, monkeypatch):
    """``--target x86`` prints what it resolved to; an x86-avx512 library on a CPU without AVX-512 (forced with
    PBS2PC_CPU_FEATURES, so this runs on any host) exits 2 with one line naming the target to use."""
    from pbs2pc.compiler.targets import PRESETS, get_preset
    from pbs2pc.cpu import FEATURES_ENV

    lib = tmp_path / "m.so"
    assert main(["compile", str(tiny_onnx), "--target", "x86", "-o", str(lib)]) == 0
    assert f"target x86 -> {get_preset('x86').name}" in capsys.readouterr().out
    assert main(["compile", str(tiny_onnx), "--target", "x86-avx512", "-o", str(lib)]) == 0
    capsys.readouterr()
    monkeypatch.setenv(FEATURES_ENV, ",".join(PRESETS["x86-avx2"].features))
    _assert_user_error(["run", str(lib), "--input-ids", "1,2"], capsys, "--target x86-avx2")
    assert main(["inspect", str(lib)]) == 0  # inspecting needs no kernel
    assert "avx512vbmi" in capsys.readouterr().out
