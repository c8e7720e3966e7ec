#!/usr/bin/env bash
# The simulator's long safety sweep, resumable (testnet/sim/README.md).
#
#   scripts/sweep.sh NODES FIRST LAST [OUT_DIR]
#
# Runs seeds FIRST..LAST at committee size NODES (f = (NODES-1)/3 Byzantine, strategies
# rotated by seed) in chunks of 25 seeds, one process at a time, niced. Each chunk writes its
# per-seed progress lines (with the trace hash) to OUT_DIR/chunk-SSSSS.err and, when it
# finishes, its JSON report to OUT_DIR/chunk-SSSSS.json; a chunk whose report exists is
# skipped, so the sweep can be stopped and started again. Run two at once on two cores with
# disjoint ranges. `scripts/sweep_tally.py OUT_DIR...` counts what ran.
#
# The binary is built with profile `sweep` (fat LTO, mimalloc) unless SWEEP_BIN names one.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -lt 3 ]; then
    sed -n 2,13p "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
nodes=$1
first=$2
last=$3
out=${4:-target/sweep-n$nodes}
mkdir -p "$out"

bin=${SWEEP_BIN:-}
if [ -z "$bin" ]; then
    target=${CARGO_TARGET_DIR:-target}
    cargo build --locked --profile sweep -p dwcp-testnet --no-default-features --features sim
    bin=$target/sweep/dwcp-testnet
fi
# mimalloc keeps freed memory instead of returning it (about 4 % less system time).
export MIMALLOC_PURGE_DELAY=-1

seed=$first
while [ "$seed" -le "$last" ]; do
    count=$((last - seed + 1))
    [ "$count" -gt 25 ] && count=25
    chunk=$out/chunk-$(printf %05d "$seed")
    if [ ! -s "$chunk.json" ]; then
        echo "seeds $seed..$((seed + count - 1)) -> $chunk.json"
        if nice -n 12 "$bin" sim consensus --nodes "$nodes" --seeds "$count" \
            --first-seed "$seed" --jobs 1 --json > "$chunk.json.tmp" 2> "$chunk.err"; then
            mv "$chunk.json.tmp" "$chunk.json"
        else
            echo "chunk $seed failed (exit $?); see $chunk.err and $chunk.json.tmp" >&2
        fi
    fi
    seed=$((seed + count))
done
