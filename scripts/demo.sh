#!/usr/bin/env bash
# Set up (if needed) and run the demo: SmolLM2-135M -> 6:8 -> ONNX -> x86 library -> perplexity x4.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/pbs2pc demo "$@"
