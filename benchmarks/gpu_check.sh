#!/usr/bin/env bash
# The GPU check of --target cuda in two halves (docs/gpu.md):
#
#   bash benchmarks/gpu_check.sh prepare   # here (nvcc, TVM, onnxruntime; no GPU): build, print the calls
#   bash benchmarks/gpu_check.sh device    # on the GPU machine, from the project root: load and check
#
# "prepare" builds out/gpu_check/ and out/gpu_parts/ (benchmarks/gpu_check.py build), SmolLM2's CUDA tuning
# candidates (out/gpu_check/tune_db/device/, pbs2pc tune --target cuda) and .device/ (TVM's runtime
# without its compiler, ../shared/tools/device-bundle), then prints what to send: each SmolLM2
# weight part in a call of its own (56 MB each: a call carries at most 64 MiB), then the run itself.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  prepare)
    PY=${PY:-.venv/bin/python}
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$PY" benchmarks/gpu_check.py build "${@:2}"
    if [ -f out/demo/model.onnx ]; then
      # the CUDA tuning candidates of SmolLM2's GEMVs, timed by measure.py in the same device call
      "$PY" -m pbs2pc tune out/demo/model.onnx --target cuda --arch "${ARCH:-sm_90}" -o out/gpu_check/tune_db
    fi
    if [ -x ../shared/tools/device-bundle ]; then ../shared/tools/device-bundle "$PY"; fi
    echo
    echo "Send, back to back (the GPU machine keeps ignored files between calls while it stays warm):"
    for part in out/gpu_parts/model.weights.bin.part*; do
      [ -e "$part" ] && echo "  run(command='ls -la out/gpu_parts', carry=['$part'])"
    done
    echo "  run(command='bash benchmarks/gpu_check.sh device', carry=['.device', 'out/gpu_check'], timeout_s=540)"
    du -sh out/gpu_check .device 2>/dev/null || true
    ;;
  device)
    # shellcheck disable=SC1091
    source .device/env.sh
    timeout 400 python3 benchmarks/gpu_check.py run "${@:2}" || true
    if [ -f out/gpu_check/tune_db/device/plan.json ]; then
      timeout 150 python3 out/gpu_check/tune_db/device/measure.py --repeats 10 || true
      # back here: copy results.jsonl into out/gpu_check/tune_db/device/ and run the prepare's tune again
      cp out/gpu_check/tune_db/device/results.jsonl "${OUT:-out}/tune_results.jsonl" 2>/dev/null || true
    fi
    ;;
  *)
    echo "usage: bash benchmarks/gpu_check.sh prepare|device" >&2
    exit 2
    ;;
esac
