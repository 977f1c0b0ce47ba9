#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, including the real SmolLM2 end-to-end test.
# Extra arguments go to pytest (e.g. -m "not slow" for the fast tier only).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
