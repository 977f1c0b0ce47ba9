#!/bin/sh
# Run this bundle's model (written by pbs2pc compile --bundle; README.md says more).
#
#   ./run.sh --prompt "The river" [--max-new-tokens 64] [--temperature 0.8 --top-k 40 --seed 0] [--threads 4]
#       streams the continuation (Python 3.9+: generate.py tokenizes with the bundled tokenizers package)
#   ./run.sh --bench [--threads 4] [--max-new-tokens 32]
#       the runner alone (no Python) on a fixed prompt (bench_prompt_ids.txt): prompt and decode tokens/s
#
# PBS2PC_RUNNER_PREFIX runs the runner through an emulator (qemu-aarch64 -L /usr/aarch64-linux-gnu on x86);
# PBS2PC_PYTHON chooses the Python that runs generate.py (default python3).
set -e
HERE=$(cd "$(dirname "$0")" && pwd)
if [ "$1" = "--bench" ]; then
    shift
    # The token ids go to /dev/null; the rates (on the runner's stderr) to stdout.
    # shellcheck disable=SC2086 # the prefix is a command with arguments
    exec ${PBS2PC_RUNNER_PREFIX:-} "$HERE/runner" generate "$HERE" --prompt-ids-file "$HERE/bench_prompt_ids.txt" \
        --max-new-tokens 32 --bench "$@" 2>&1 >/dev/null
fi
exec "${PBS2PC_PYTHON:-python3}" "$HERE/generate.py" "$@"
