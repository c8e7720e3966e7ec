#!/usr/bin/env bash
# The main job: builds DWCP, brings up a local testnet (one bootstrap peer and N real
# dwcp-node processes on 127.0.0.1), shows the mesh through dwcp-cli and the Prometheus
# endpoint, runs the deterministic PBFT simulator, then keeps the testnet up until Ctrl-C
# (or exits at once with --no-wait) and stops every process it started.
#
#   scripts/demo.sh [--nodes N] [--dir DIR] [--no-wait]
set -euo pipefail
cd "$(dirname "$0")/.."
NODES=5; DIR="${TMPDIR:-/tmp}/dwcp-demo"; WAIT=1
while (($#)); do
  case "$1" in
    --nodes) NODES="$2"; shift 2 ;;
    --dir) DIR="$2"; shift 2 ;;
    --no-wait) WAIT=0; shift ;;
    *) echo "usage: $0 [--nodes N] [--dir DIR] [--no-wait]" >&2; exit 2 ;;
  esac
done
scripts/deps.sh demo
echo "== building (debug; the first build takes about 5 minutes on 2 cores)"
cargo build --workspace --bins --locked -q
BIN="$PWD/target/debug"
if [ -f "$DIR/testnet.json" ]; then "$BIN/dwcp-testnet" down --dir "$DIR" || true; fi
rm -rf "$DIR"
cleanup() { "$BIN/dwcp-testnet" down --dir "$DIR" >/dev/null 2>&1 || true; }
trap cleanup EXIT

echo "== dwcp-testnet up --nodes $NODES --dir $DIR"
"$BIN/dwcp-testnet" up --nodes "$NODES" --dir "$DIR"
API=$(python3 -c "import json,sys;print(json.load(open(sys.argv[1]))['nodes'][0]['api'])" "$DIR/testnet.json")
METRICS=$(python3 -c "import json,sys;print(json.load(open(sys.argv[1]))['nodes'][0]['metrics'])" "$DIR/testnet.json")
echo; echo "== dwcp-cli --api $API node list"
"$BIN/dwcp-cli" --api "$API" node list
echo; echo "== dwcp-cli cluster status"
"$BIN/dwcp-cli" --api "$API" cluster status
echo; echo "== dwcp-cli cluster health"
"$BIN/dwcp-cli" --api "$API" cluster health || true
echo; echo "== Prometheus: $METRICS/metrics (excerpt)"
curl -s "$METRICS/metrics" | grep -E '^dwcp_(cluster|gossip_messages|net_peers)' || true
echo; echo "== a VM on node 0: the test guest (Debian cloud kernel + busybox) under QEMU"
scripts/build-guest.sh >/dev/null
. "${XDG_CACHE_HOME:-$HOME/.cache}/dwcp/guest/guest.env"
VM=$("$BIN/dwcp-cli" --api "$API" --output json vm create --name demo-guest --cpu 1 --memory 128M \
      --kernel "$KERNEL" --initrd "$INITRD" --append "$CMDLINE" \
      | python3 -c "import json,sys;print(json.load(sys.stdin)['id'])")
"$BIN/dwcp-cli" --api "$API" vm list
for _ in $(seq 60); do
  "$BIN/dwcp-cli" --api "$API" vm console --vm "$VM" | grep -q 'tick 3' && break; sleep 1
done
echo "-- serial console:"; "$BIN/dwcp-cli" --api "$API" vm console --vm "$VM" | grep -E 'DWCP-GUEST-READY|tick' | tail -4
echo "-- a VM larger than the donated share is refused:"
"$BIN/dwcp-cli" --api "$API" vm create --name too-big --cpu 64 --memory 1G \
  --kernel "$KERNEL" --initrd "$INITRD" || true
"$BIN/dwcp-cli" --api "$API" vm delete --vm "$VM"

echo; echo "== one node killed with SIGKILL; the others notice"
PID=$(python3 -c "import json,sys;print(json.load(open(sys.argv[1]))['nodes'][-1]['pid'])" "$DIR/testnet.json")
kill -9 "$PID"; sleep 7
"$BIN/dwcp-cli" --api "$API" node list
if "$BIN/dwcp-testnet" sim --help >/dev/null 2>&1; then
  echo; echo "== deterministic simulator: PBFT with one Byzantine replica of 4, 5 seeds"
  "$BIN/dwcp-testnet" sim consensus --nodes 4 --byzantine 1 --strategy equivocate --seeds 5 || true
fi
if ((WAIT)); then
  echo; echo "testnet running in $DIR; try: $BIN/dwcp-cli --api $API node list   (Ctrl-C stops it)"
  while sleep 3600; do :; done
fi
