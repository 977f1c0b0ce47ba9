"""Packaging: every subpackage of the top-level folders lands in the wheel; the layering rules hold."""

import ast
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _package_folders() -> dict[str, Path]:
    """Import name -> folder for every package under the mapped top-level folders."""
    found = {}
    for name, folder in PYPROJECT["tool"]["setuptools"]["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found[".".join([name, *rel.parts])] = init.parent
    return found


def test_packages_list_names_every_folder():
    assert sorted(PYPROJECT["tool"]["setuptools"]["packages"]) == sorted(_package_folders())


def test_pins():
    deps = PYPROJECT["project"]["optional-dependencies"]
    assert "apache-tvm==0.27.0.post1" in deps["tvm"] and "apache-tvm-ffi==0.1.14.post1" in deps["tvm"]
    assert "torch==2.13.0" in deps["torch"]
    assert PYPROJECT["project"]["scripts"]["pbs2pc"] == "pbs2pc.cli:main"


def test_wheel_contains_every_subpackage(tmp_path):
    # Build from a copy: setuptools writes build/ and *.egg-info beside the sources.
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "out", "*.egg-info",
                                                                "__pycache__", ".pytest_cache", ".device"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(source)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("pbs2pc-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for package, folder in _package_folders().items():
        prefix = package.replace(".", "/")
        assert f"{prefix}/__init__.py" in names, package
        for source in folder.glob("*.py"):
            assert f"{prefix}/{source.name}" in names, f"{package}: {source.name}"
    assert any(n.endswith("entry_points.txt") for n in names)
    # package data: a bundle builds the runner from the sources, ships run.sh
    for data in ("runner.cc", "rpc_server.cc", "rpc_server.h", "run.sh"):
        assert f"pbs2pc/runtime/native/{data}" in names


def _imports(folder: str) -> set[str]:
    modules = set()
    for path in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                modules.add(node.module)
    return modules


@pytest.mark.parametrize("folder,forbidden", [
    ("runtime", ("pbs2pc.compiler", "pbs2pc.passes", "tvm.relax.frontend", "tvm.s_tir", "torch")),
    ("models", ("tvm", "pbs2pc.compiler", "pbs2pc.passes")),
])
def test_layering(folder, forbidden):
    bad = sorted(m for m in _imports(folder) if any(m == f or m.startswith(f + ".") for f in forbidden))
    assert not bad, f"{folder}/ imports {bad}"


def test_tvm_renames_are_fenced_in_one_module():
    offenders = []
    for folder in ("compiler", "passes"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "tvm_compat.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                    if any(n == "tvm" or n.startswith("tvm.") for n in names):
                        offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"import TVM through pbs2pc.compiler.tvm_compat: {sorted(set(offenders))}"
