#!/bin/bash
# The runs behind docs/accuracy.md, in priority order (one at a time; nice'd on the shared CPU).
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
S="--nsamples 16 --seqlen 512"
run() { nice -n 10 $PY benchmarks/accuracy.py run "$@" $S 2>&1 | tr '\r' '\n' | grep -v "it/s\]$" | tail -3; }
run --method nm-then-binarize --nm 6:8
run --method pbs2p --nm 6:8
run --method pbs2p-nospbo --nm 6:8
run --method arb
run --method fp
run --method sign
run --method pbs2p-nocfs --nm 6:8
run --method pbs2p --nm 4:8
run --method pbs2p --nm 5:8
run --method billm
run --method pbs2p --nm 2:4
run --model gemma3-270m --method fp
run --model gemma3-270m --method pbs2p --nm 6:8
run --model gemma3-270m --method nm-then-binarize --nm 6:8
run --model gemma3-270m --method arb
run --method arb-nm --nm 6:8                                   # experiment: N:M mask + ARB structure
nice -n 10 $PY benchmarks/accuracy.py run --method pbs2p --nm 6:8 --nsamples 128 --seqlen 512   # default setting
# not finished for lack of time: run --method pbs2p --nm 8:8
$PY benchmarks/accuracy.py report
