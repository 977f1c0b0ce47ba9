"""Running any compiled graph: ``CompiledModel.run(feeds)`` and ``pbs2pc run --input NAME=FILE.npy``.

The graph here is not a language model: two inputs (``x [batch, 3, 128]`` and ``gate [32]``), two pbs2p
``SparseBinaryLinear`` layers (6:8 with bias, then dense binary 8:8 with mu) around a Relu, and two outputs
(``hidden``, the Relu's output, and ``z = layer2(hidden) * gate``). Every result is checked against
onnxruntime running the same ONNX file (the reference functions that pbs2p's nodes carry).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pbs2pc.cli import main
from pbs2pc.errors import Pbs2pcError
from pbs2pc.runtime import load
from pbs2pc.runtime.artifact import artifact_paths
from testutil import X86, make_ids, ort_logits, rel_err

torch = pytest.importorskip("torch")

K, HIDDEN, OUT = 128, 64, 32
PBS2PC = Path(sys.executable).with_name("pbs2pc")  # the console script of this environment


def two_layer_graph() -> onnx.ModelProto:
    """``x -> SparseBinaryLinear 6:8 (+bias) -> Relu = hidden -> SparseBinaryLinear 8:8 (+mu) -> * gate = z``."""
    from pbs2pc.models import onnx_op
    from pbs2pc.models.format import NMScheme
    from pbs2pc.models.simple import compress_weight

    gen = torch.Generator().manual_seed(0)
    l1 = compress_weight(torch.randn(HIDDEN, K, generator=gen), NMScheme(6, 8, 64),
                         bias=torch.randn(HIDDEN, generator=gen))
    l1.mu = None
    l2 = compress_weight(torch.randn(OUT, HIDDEN, generator=gen), NMScheme(8, 8, 32))
    arrays = {"l1.sign": l1.sign, "l1.mask": l1.mask, "l1.alpha": l1.alpha, "l1.bias": l1.bias,
              "l2.sign": l2.sign, "l2.alpha": l2.alpha, "l2.mu": l2.mu}
    nodes = [
        onnx_op.make_node("x", "l1.sign", "l1.mask", "l1.alpha", None, "l1.bias", "h", n=6, m=8, group_size=64,
                          name="layer1"),
        helper.make_node("Relu", ["h"], ["hidden"]),
        onnx_op.make_node("hidden", "l2.sign", None, "l2.alpha", "l2.mu", None, "y2", n=8, m=8, group_size=32,
                          name="layer2"),
        helper.make_node("Mul", ["y2", "gate"], ["z"]),
    ]
    graph = helper.make_graph(
        nodes, "two_layers",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, K]),
         helper.make_tensor_value_info("gate", TensorProto.FLOAT, [OUT])],
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", 3, HIDDEN]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 3, OUT])],
        [numpy_helper.from_array(v, name) for name, v in arrays.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", onnx_op.ONNX_OPSET),
                                                    helper.make_opsetid(onnx_op.DOMAIN, onnx_op.OPSET_VERSION)])
    onnx_op.attach_functions(model)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture(scope="module")
def graph_onnx(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("graph") / "graph.onnx"
    onnx.save(two_layer_graph(), str(path))
    return path


@pytest.fixture(scope="module")
def graph_library(graph_onnx, tmp_path_factory) -> Path:
    from pbs2pc.compiler.build import compile_model

    path = tmp_path_factory.mktemp("graph_lib") / "graph.so"
    compile_model(graph_onnx, path, X86)
    return path


def make_feeds(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((batch, 3, K)).astype(np.float32),
            "gate": rng.uniform(0.5, 2.0, OUT).astype(np.float32)}


def ort_outputs(onnx_path, feeds) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


# -- the Python API -------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 4])
def test_run_matches_onnxruntime(graph_library, graph_onnx, batch):
    model = load(graph_library)
    assert model.manifest["inputs"] == ["x", "gate"] and model.outputs == ["hidden", "z"]
    assert not model.is_language_model and not model.has_kv_cache
    feeds = make_feeds(batch, seed=batch)
    got = model.run(feeds)
    ref = ort_outputs(graph_onnx, feeds)
    assert list(got) == ["hidden", "z"]
    for name in ("hidden", "z"):
        assert got[name].shape == ref[name].shape and got[name].dtype == np.float32, name
        assert rel_err(got[name], ref[name]) < 1e-4, name
    # A subset, in the order asked for; views and non-contiguous arrays are copied, not misread.
    only = model.run({"x": np.asfortranarray(feeds["x"]), "gate": feeds["gate"][::-1].copy()[::-1]}, ["z", "hidden"])
    assert list(only) == ["z", "hidden"]
    np.testing.assert_allclose(only["z"], got["z"], rtol=0, atol=0)


def test_run_rejects_bad_feeds_with_one_sentence(graph_library):
    model = load(graph_library)
    feeds = make_feeds(2)
    cases = [
        ({"x": feeds["x"]}, r"missing input 'gate'; the graph takes x, gate\."),
        ({}, r"missing inputs 'x', 'gate'; the graph takes x, gate\."),
        ({**feeds, "y": feeds["x"]}, r"unknown input 'y'; the graph takes x, gate\."),
        ({**feeds, "x": feeds["x"].astype(np.float64)}, r"'x' must be float32 \[batch, 3, 128\] but has dtype float64"),
        ({**feeds, "x": feeds["x"][0]}, r"'x' must be float32 \[batch, 3, 128\] \(rank 3\) but has rank 2"),
        ({**feeds, "x": feeds["x"][:, :, :64]}, r"'x' must be float32 \[batch, 3, 128\] but its dimension 2 is 64"),
        ({**feeds, "gate": feeds["gate"][None]}, r"'gate' must be float32 \[32\] \(rank 1\) but has rank 2"),
        ({**feeds, "gate": np.array(["a"] * OUT)}, r"'gate' must be a numeric array"),
    ]
    for bad, match in cases:
        with pytest.raises(Pbs2pcError, match=match) as info:
            model.run(bad)
        assert "\n" not in str(info.value)
    with pytest.raises(Pbs2pcError, match=r"unknown output 'y'; the graph's outputs are hidden, z\."):
        model.run(feeds, ["y"])
    with pytest.raises(Pbs2pcError, match="not a language model"):
        model.logits([[1, 2]])
    assert model.run(feeds)["z"].shape == (2, 3, OUT)  # still usable after the errors


def test_manifest_input_types_are_checked_before_tvm(graph_library, tmp_path):
    """With ``input_types`` in the manifest, feeds are checked against it (symbolic sizes across inputs too)."""
    for path in artifact_paths(graph_library):
        shutil.copy(path, tmp_path / path.name)
    lib, _, manifest_path = artifact_paths(tmp_path / graph_library.name)
    manifest = json.loads(manifest_path.read_text())
    manifest["input_types"] = {"x": {"dtype": "float32", "shape": ["batch", 3, K]},
                               "gate": {"dtype": "float32", "shape": [OUT]}}
    manifest_path.write_text(json.dumps(manifest))
    model = load(lib)
    feeds = make_feeds(2)
    with pytest.raises(Pbs2pcError, match=r"'x' must be float32 \[batch, 3, 128\] but has dtype int64"):
        model.run({**feeds, "x": feeds["x"].astype(np.int64)})
    with pytest.raises(Pbs2pcError, match=r"'gate' must be float32 \[32\] but its dimension 0 is 31"):
        model.run({**feeds, "gate": feeds["gate"][:31]})
    manifest["input_types"]["gate"]["shape"] = ["batch"]  # a made-up symbolic link between the inputs
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(Pbs2pcError, match=r"input 'gate' has batch = 32 .* but input 'x' has batch = 2"):
        load(lib).run(feeds)


def test_run_on_the_tiny_language_model(tiny_library, tiny_onnx):
    model = load(tiny_library)
    assert model.is_language_model and model.has_kv_cache and model.outputs == ["logits"]
    ids = make_ids(2, 7, seed=3)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             "position_ids": np.broadcast_to(np.arange(7, dtype=np.int64), ids.shape)}
    feeds = {name: feeds[name] for name in model.manifest["inputs"]}
    got = model.run(feeds)
    assert list(got) == ["logits"] and got["logits"].shape == (2, 7, 256)
    assert rel_err(got["logits"], ort_logits(tiny_onnx, ids)) < 1e-4
    np.testing.assert_allclose(got["logits"], model.logits(ids), rtol=1e-6, atol=1e-6)
    with pytest.raises(Pbs2pcError, match=r"input_ids must be in \[0, 256\), got .*\.\.999"):
        model.run({**feeds, "input_ids": np.where(ids == ids[0, 0], 999, ids)})
    if "attention_mask" in feeds:
        with pytest.raises(Pbs2pcError, match="attention_mask must have the shape of input_ids"):
            model.run({**feeds, "attention_mask": np.ones((2, 9), np.int64)})
    with pytest.raises(Pbs2pcError, match="'input_ids' must be int64 .* but has dtype int32"):
        model.run({**feeds, "input_ids": ids.astype(np.int32)})


# -- the command line -----------------------------------------------------------------------------------


def _save_feeds(folder: Path, feeds: dict[str, np.ndarray]) -> list[str]:
    args = []
    for name, array in feeds.items():
        np.save(folder / f"{name}.npy", array)
        args += ["--input", f"{name}={folder / f'{name}.npy'}"]
    return args


def test_cli_saves_outputs_matching_onnxruntime(graph_library, graph_onnx, tmp_path):
    feeds = make_feeds(3, seed=7)
    out = tmp_path / "out.npz"
    proc = subprocess.run([str(PBS2PC), "run", str(graph_library), *_save_feeds(tmp_path, feeds), "-o", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].split() == ["hidden", "[3,", "3,", "64]", "float32"], lines
    assert lines[1].split()[0] == "z" and "[3, 3, 32]" in lines[1]
    assert "saved 2 outputs to" in proc.stderr
    ref = ort_outputs(graph_onnx, feeds)
    with np.load(out) as saved:
        assert sorted(saved.files) == ["hidden", "z"]
        for name in ("hidden", "z"):
            assert rel_err(saved[name], ref[name]) < 1e-4, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gate.npy", "out.npz", "x.npy"]  # no temporaries


def test_cli_prints_a_summary_without_output(graph_library, tmp_path, capsys):
    assert main(["run", str(graph_library), *_save_feeds(tmp_path, make_feeds(1))]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in out] == ["hidden", "z"]
    assert all("float32" in line and "min" in line and "max" in line and "mean" in line for line in out)


def _assert_cli_error(argv: list[str], match: str, subprocess_run: bool = False, capsys=None):
    if subprocess_run:
        proc = subprocess.run([str(PBS2PC), *argv], capture_output=True, text=True, timeout=300)
        code, err = proc.returncode, proc.stderr.strip()
    else:
        code = main(argv)
        err = capsys.readouterr().err.strip()
    assert code == 2, (code, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert match in err, err


def test_cli_bad_inputs_give_one_line_and_exit_2(graph_library, tmp_path, capsys):
    feeds = make_feeds(2)
    folder = tmp_path / "in"
    folder.mkdir()
    good = _save_feeds(folder, feeds)
    np.save(folder / "x64.npy", feeds["x"].astype(np.float64))
    np.save(folder / "x2d.npy", feeds["x"][0])
    (folder / "text.npy").write_text("not an array\n")
    lib, out = str(graph_library), str(tmp_path / "out.npz")
    x, gate = f"x={folder / 'x.npy'}", f"gate={folder / 'gate.npy'}"
    cases = [
        (["--input", x, "-o", out], "missing input 'gate'; the graph takes x, gate."),
        ([*good, "--input", f"y={folder / 'x.npy'}", "-o", out], "unknown input 'y'"),
        (["--input", f"x={folder / 'x64.npy'}", "--input", gate, "-o", out], "has dtype float64"),
        (["--input", f"x={folder / 'x2d.npy'}", "--input", gate, "-o", out], "(rank 3) but has rank 2"),
        (["--input", f"x={folder / 'nope.npy'}", "--input", gate, "-o", out], "nope.npy does not exist"),
        (["--input", f"x={folder / 'text.npy'}", "--input", gate, "-o", out], "text.npy is not a .npy file"),
        (["--input", "x", "--input", gate, "-o", out], "--input must be NAME=FILE.npy"),
        (["--input", x, "--input", x, "--input", gate], "--input x= is given twice"),
        (["--input-ids", "1,2", "-o", out], "use it with --input"),
        ([*good, "-o", str(tmp_path)], "is a folder"),
    ]
    for args, match in cases:
        _assert_cli_error(["run", lib, *args], match, capsys=capsys)
    assert not (tmp_path / "out.npz").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["in"]
    # The same through the installed console script, and the token-id paths on a graph without token ids.
    _assert_cli_error(["run", lib, "--input", f"x={folder / 'x64.npy'}", "--input", gate, "-o", out],
                      "must be float32 [batch, 3, 128] but has dtype float64", subprocess_run=True)
    _assert_cli_error(["run", lib, "--input-ids", "1,2"], "--input NAME=FILE.npy instead", subprocess_run=True)
    _assert_cli_error(["run", lib, "--prompt", "hello"], "--prompt needs a language model", capsys=capsys)
    assert not (tmp_path / "out.npz").exists()


def test_cli_runs_the_language_model_graph_too(tiny_library, tiny_onnx, tmp_path, capsys):
    model = load(tiny_library)
    ids = make_ids(1, 5, seed=11)
    all_feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(5, dtype=np.int64)[None]}
    feeds = {name: all_feeds[name] for name in model.manifest["inputs"]}
    out = tmp_path / "lm.npz"
    assert main(["run", str(tiny_library), *_save_feeds(tmp_path, feeds), "-o", str(out)]) == 0
    assert capsys.readouterr().out.split() == ["logits", "[1,", "5,", "256]", "float32"]
    with np.load(out) as saved:
        assert rel_err(saved["logits"], ort_logits(tiny_onnx, ids)) < 1e-4
    assert main(["run", str(tiny_library), "--input-ids", "1,2,3"]) == 0  # the language-model paths still run
    assert "logits [1, 3, 256]" in capsys.readouterr().out
