#!/usr/bin/env bash
# Issue 5's real-mesh target: a 10-node testnet with one equivocating committee member. Probes
# (no-op requests through consensus) run from node 0; the script reports how long until every
# honest node shows the equivocator quarantined, and that probes keep committing after.
#
#   scripts/measure-quarantine.sh [--nodes 10] [--release]
set -euo pipefail
cd "$(dirname "$0")/.."
NODES=10; PROFILE=debug; CARGO_FLAGS=()
while (($#)); do
  case "$1" in
    --nodes) NODES="$2"; shift 2 ;;
    --release) PROFILE=release; CARGO_FLAGS=(--release); shift ;;
    *) echo "usage: $0 [--nodes N] [--release]" >&2; exit 2 ;;
  esac
done
scripts/deps.sh build
cargo build "${CARGO_FLAGS[@]}" --locked -q -p dwcp-node --features byzantine --bins
cargo build "${CARGO_FLAGS[@]}" --locked -q -p dwcp-bootstrap -p dwcp-testnet --no-default-features --bins
BIN="$PWD/target/$PROFILE"
DIR="${TMPDIR:-/tmp}/dwcp-quarantine"
"$BIN/dwcp-testnet" down --dir "$DIR" >/dev/null 2>&1 || true
rm -rf "$DIR"
trap '"$BIN/dwcp-testnet" down --dir "$DIR" >/dev/null 2>&1 || true' EXIT
"$BIN/dwcp-testnet" up --nodes "$NODES" --dir "$DIR" --byzantine 1:equivocate >/dev/null
mapfile -t APIS < <(python3 -c "import json,sys;[print(n['api']) for n in json.load(open(sys.argv[1]))['nodes']]" "$DIR/testnet.json")
BYZ=$(grep -l "byzantine: equivocate" "$DIR"/node-*/node.yaml | head -1)
BYZ_ID=$(python3 -c "
import json,sys
t=json.load(open(sys.argv[1]))
print([n['id'] for n in t['nodes'] if n['config']==sys.argv[2]][0])" "$DIR/testnet.json" "$BYZ")
echo "testnet of $NODES nodes up; equivocating member ${BYZ_ID:0:8}"
"$BIN/dwcp-cli" --api "${APIS[0]}" consensus quorum-status | head -2
# The equivocator's own node may or may not agree; every honest node must.
HONEST=()
for api in "${APIS[@]}"; do
  id=$(curl -s "$api/v1/cluster/status" | python3 -c "import json,sys;print(json.load(sys.stdin)['node_id'])")
  [ "$id" = "$BYZ_ID" ] || HONEST+=("$api")
done
CHECKS=$(mktemp -d)
start=$(date +%s.%N)
( while :; do "$BIN/dwcp-cli" --api "${APIS[0]}" consensus probe --count 1 >/dev/null 2>&1 || true; sleep 0.5; done ) &
PROBER=$!
trap 'kill $PROBER 2>/dev/null; rm -rf "$CHECKS"; "$BIN/dwcp-testnet" down --dir "$DIR" >/dev/null 2>&1 || true' EXIT
# One pass asks every honest node's API at once (debug CLIs on a loaded machine take seconds
# each; asked one after the other they would measure the polling, not the quarantine).
check_one() {
  local out
  if ! out=$("$BIN/dwcp-cli" --api "$1" --format json reputation list 2>&1); then
    echo "dwcp-cli failed: ${out:0:200}"; return 1
  fi
  python3 -c "
import json,sys
rows=json.loads(sys.argv[1]); me=sys.argv[2]
sys.exit(0 if any(r['node']==me and r['quarantined'] for r in rows) else 1)" "$out" "$BYZ_ID" \
    || { echo "not quarantined there yet"; return 1; }
}
PASSES=0; LAST_MISS=""
quarantined_all() {
  PASSES=$((PASSES + 1)); pass_start=$(date +%s.%N)
  local i pids=() ok=0
  for i in "${!HONEST[@]}"; do
    check_one "${HONEST[$i]}" > "$CHECKS/$i" 2>&1 & pids+=($!)
  done
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || { ok=1; LAST_MISS="${HONEST[$i]}: $(cat "$CHECKS/$i")"; }
  done
  return $ok
}
since() { python3 -c "import sys;print(f'{float(sys.argv[2])-float(sys.argv[1]):.1f}')" "$start" "$1"; }
for _ in $(seq 240); do
  if quarantined_all; then break; fi
  sleep 0.5
done
end=$(date +%s.%N); seen_start=$pass_start; passes=$PASSES
if ! quarantined_all; then
  echo "NOT quarantined on every honest node after 120 s (last miss: $LAST_MISS)"; exit 1
fi
echo "API check: every honest node lists it quarantined in the pass $(since "$seen_start")-$(since "$end") s after probes started" \
  "(pass $passes${LAST_MISS:+; an earlier miss: $LAST_MISS})"
# When each honest node applied the quarantine, from its own log (the API check above only
# confirms: a pass takes as long as the slowest debug CLI call).
python3 - "$DIR" "$start" "$BYZ" <<'PY'
import datetime, glob, re, sys
d, start, byz_cfg = sys.argv[1], float(sys.argv[2]), sys.argv[3]
esc = re.compile(r"\x1b\[[0-9;]*m")
first_seen, times = None, []
for log in sorted(glob.glob(f"{d}/node-*.log")):
    if log.replace(".log", "/node.yaml") == byz_cfg:
        continue
    for line in open(log, errors="replace"):
        line = esc.sub("", line)
        ts = line.split(" ", 1)[0].rstrip("Z")
        if "misbehaviour seen" in line:
            t = datetime.datetime.fromisoformat(ts).replace(tzinfo=datetime.timezone.utc).timestamp()
            first_seen = t if first_seen is None else min(first_seen, t)
        if "node quarantined" in line:
            times.append(datetime.datetime.fromisoformat(ts).replace(tzinfo=datetime.timezone.utc).timestamp())
            break
last = max(times)
print(f"quarantined on {len(times)} honest nodes: the last {last - start:.1f} s after probes started, "
      f"{last - first_seen:.1f} s after the first equivocation was seen")
PY
echo "decisions keep committing after the quarantine:"
"$BIN/dwcp-cli" --api "${APIS[0]}" consensus probe --count 5 | tail -1
"$BIN/dwcp-cli" --api "${APIS[0]}" reputation list
