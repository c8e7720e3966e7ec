#!/usr/bin/env bash
# The main job: builds DWCP, brings up a local testnet (one bootstrap peer and N real
# dwcp-node processes on loopback), shows the mesh, the replicated cluster document (ASS) and
# PBFT agreement with reputation (ACP) through dwcp-cli and the Prometheus endpoint, an AMST
# speed test between two nodes, places and
# boots a real guest (ITP + QEMU), cuts node 0 off with iptables (the majority decides, node
# 0 reports a lost-quorum stall, then catches up after the heal), a SIGKILLed node, document
# compaction, a late volunteer installing a certified snapshot, runs the deterministic PBFT
# simulator, then keeps the
# testnet up until Ctrl-C (or exits at once with --no-wait) and stops every process it started.
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

# Probes (no-op decisions) until node 0's consensus reaches epoch $1 (at most 60 rounds).
drive_to_epoch() {
  for _ in $(seq 60); do
    E=$("$BIN/dwcp-cli" --api "$API" --format json consensus quorum-status | python3 -c "import json,sys;print(json.load(sys.stdin)['epoch'])")
    [ "$E" -ge "$1" ] && break
    "$BIN/dwcp-cli" --api "$API" --format json consensus probe --count 2 >/dev/null || true
  done
}

echo "== dwcp-testnet up --nodes $NODES --dir $DIR --epoch-length 20 (the committee is recomputed every 20 decisions)"
"$BIN/dwcp-testnet" up --nodes "$NODES" --dir "$DIR" --epoch-length 20
API=$(python3 -c "import json,sys;print(json.load(open(sys.argv[1]))['nodes'][0]['api'])" "$DIR/testnet.json")
METRICS=$(python3 -c "import json,sys;print(json.load(open(sys.argv[1]))['nodes'][0]['metrics'])" "$DIR/testnet.json")
echo; echo "== dwcp-cli --api $API node list"
"$BIN/dwcp-cli" --api "$API" node list
echo; echo "== dwcp-cli cluster status"
"$BIN/dwcp-cli" --api "$API" cluster status
echo; echo "== dwcp-cli cluster health"
"$BIN/dwcp-cli" --api "$API" cluster health || true
echo; echo "== the replicated cluster document (Automerge, synced peer to peer)"
"$BIN/dwcp-cli" --api "$API" state-sync lag-status
"$BIN/dwcp-cli" --api "$API" state-sync verify || true
echo; echo "== PBFT committee (genesis committee written by the testnet)"
"$BIN/dwcp-cli" --api "$API" consensus quorum-status || true
APIS=($(python3 -c "import json,sys;[print(n['api']) for n in json.load(open(sys.argv[1]))['nodes']]" "$DIR/testnet.json"))
# The last member of the genesis committee (the testnet makes the first 3f+1 nodes members).
MEMBER=$(python3 -c "import json,sys;print(json.load(open(sys.argv[1]))['nodes'][3]['id'])" "$DIR/testnet.json")
echo "-- two members vote, through consensus, to quarantine member 3 (f+1 = 2 votes needed):"
"$BIN/dwcp-cli" --api "${APIS[1]}" reputation quarantine --node "$MEMBER" --reason demo || true
"$BIN/dwcp-cli" --api "${APIS[2]}" reputation quarantine --node "$MEMBER" --reason demo || true
sleep 3
"$BIN/dwcp-cli" --api "$API" reputation list || true
echo; echo "== committee epochs: no fixed controllers. Every node committed its join and readiness;"
echo "   at the end of epoch 0 every node computes the next committee from committed state:"
echo "   ready, not quarantined, reputation >= 0.5. Decisions (probes) until epoch 1:"
drive_to_epoch 1
"$BIN/dwcp-cli" --api "$API" consensus quorum-status || true
echo; echo "== Prometheus: $METRICS/metrics (excerpt)"
curl -s "$METRICS/metrics" | grep -E '^dwcp_(cluster_workers|gossip_messages_received|net_peers|state_sync_max_lag|consensus_decisions|reputation_quarantined|pbft_view|pbft_epoch)' || true
echo; echo "== AMST: node 0 sends to node 1 for 3 s, one noise-authenticated TCP connection per stream"
SECOND=$(python3 -c "import json,sys;print(json.load(open(sys.argv[1]))['nodes'][1]['id'])" "$DIR/testnet.json")
"$BIN/dwcp-cli" --api "$API" network speedtest --target "$SECOND" --duration 3s || true
"$BIN/dwcp-cli" --api "$API" amst status || true
echo "-- PBA's view of that link: RTT and loss read from the streams' TCP_INFO (sock_diag)"
sleep 6; "$BIN/dwcp-cli" --api "$API" pba predictions --node "$SECOND" || true
echo; echo "== a VM placed by node 0 (ITP), agreed by the committee (PBFT), booted under QEMU: the test guest (Debian cloud kernel + busybox)"
scripts/build-guest.sh >/dev/null
. "${XDG_CACHE_HOME:-$HOME/.cache}/dwcp/guest/guest.env"
PLACED=$("$BIN/dwcp-cli" --api "$API" --format json vm create --name demo-guest --cpu 1 --memory 128M \
      --kernel "$KERNEL" --initrd "$INITRD" --append "$CMDLINE")
VM=$(python3 -c "import json,sys;print(json.load(sys.stdin)['id'])" <<<"$PLACED")
HOST=$(python3 -c "import json,sys;print(json.load(sys.stdin)['placement']['node'])" <<<"$PLACED")
echo "-- placement: $(python3 -c "import json,sys;print(json.load(sys.stdin)['placement']['summary'])" <<<"$PLACED")"
HOST_API=$(python3 -c "import json,sys;print([n['api'] for n in json.load(open(sys.argv[1]))['nodes'] if n['id']==sys.argv[2]][0])" "$DIR/testnet.json" "$HOST")
"$BIN/dwcp-cli" --api "$HOST_API" vm list
echo "-- the committed placement in the replicated cluster document, seen from node 0:"
sleep 2; "$BIN/dwcp-cli" --api "$API" vm list --cluster || true
for _ in $(seq 60); do
  "$BIN/dwcp-cli" --api "$HOST_API" vm console --vm "$VM" | grep -q 'tick 3' && break; sleep 1
done
echo "-- serial console:"; "$BIN/dwcp-cli" --api "$HOST_API" vm console --vm "$VM" | grep -E 'DWCP-GUEST-READY|tick' | tail -4
echo "-- a VM larger than any node's donated share is refused, with the reasons:"
"$BIN/dwcp-cli" --api "$API" vm create --name too-big --cpu 64 --memory 1G \
  --kernel "$KERNEL" --initrd "$INITRD" || true
"$BIN/dwcp-cli" --api "$HOST_API" vm delete --vm "$VM"
"$BIN/dwcp-cli" --api "$API" placement solver-stats || true

echo; echo "== a partition (iptables): node 0 alone on one side, everyone else on the other. The majority"
echo "   keeps deciding; node 0 cannot (PBFT gives up liveness, never safety, without 2f+1) and its"
echo "   quorum-status says so and why. After the heal it catches up."
stall_is() { # node API, "set" or "clear"; polls quorum-status for at most $3 seconds
  for _ in $(seq "$3"); do
    S=$("$BIN/dwcp-cli" --api "$1" --format json consensus quorum-status 2>/dev/null | python3 -c "import json,sys;print('set' if json.load(sys.stdin).get('stall') else 'clear')" 2>/dev/null || echo unknown)
    [ "$S" = "$2" ] && return 0
    sleep 1
  done
  return 1
}
LAST=$(python3 -c "import json,sys;print(len(json.load(open(sys.argv[1]))['nodes'])-1)" "$DIR/testnet.json")
"$BIN/dwcp-testnet" partition --dir "$DIR" --groups "0/1-$LAST"
"$BIN/dwcp-cli" --api "$API" --format json consensus probe --count 1 >/dev/null 2>&1 &
echo "-- the majority side commits (probes through node 1):"
"$BIN/dwcp-cli" --api "${APIS[1]}" consensus probe --count 2 || true
stall_is "$API" set 90 || echo "(no stall reported on node 0 within 90 s)"
"$BIN/dwcp-cli" --api "$API" consensus quorum-status | grep -E 'STALLED|Cause|Start the|MEMBER|ago|this node|since start|Members heard' || true
"$BIN/dwcp-testnet" heal --dir "$DIR"
for _ in $(seq 3); do "$BIN/dwcp-cli" --api "${APIS[1]}" --format json consensus probe --count 1 >/dev/null 2>&1 || true; done
if stall_is "$API" clear 120; then
  echo "-- healed: node 0 decides again"
  "$BIN/dwcp-cli" --api "$API" consensus quorum-status | sed -n 3p
else
  echo "(node 0 still stalled 120 s after the heal)"
fi
wait
echo; echo "== one node killed with SIGKILL; the others notice"
PID=$(python3 -c "import json,sys;print(json.load(open(sys.argv[1]))['nodes'][-1]['pid'])" "$DIR/testnet.json")
kill -9 "$PID"; sleep 7
"$BIN/dwcp-cli" --api "$API" node list
echo; echo "== the cluster document compacted at a cut the committee commits (f+1 members endorse that they hold its heads)"
"$BIN/dwcp-cli" --api "$API" state-sync lag-status | sed -n 1p
"$BIN/dwcp-cli" --api "$API" state-sync compact || true
sleep 3; "$BIN/dwcp-cli" --api "$API" state-sync lag-status | sed -n 1p
echo; echo "== a volunteer installs later: decisions until epoch 2, then a new node joins. It sees traffic"
echo "   two or more epochs ahead, asks a peer for its certified snapshot (state transfer), checks the"
echo "   chain of committee-signed epoch links from the genesis committee, installs it and fetches"
echo "   only the decisions after it:"
drive_to_epoch 2
"$BIN/dwcp-testnet" join --dir "$DIR"
NEW_API=$(python3 -c "import json,sys;print(json.load(open(sys.argv[1]))['nodes'][-1]['api'])" "$DIR/testnet.json")
for _ in $(seq 60); do
  T=$("$BIN/dwcp-cli" --api "$NEW_API" --format json consensus quorum-status 2>/dev/null | python3 -c "import json,sys;print(json.load(sys.stdin).get('transferred') is not None)" 2>/dev/null || echo False)
  [ "$T" = True ] && break
  "$BIN/dwcp-cli" --api "$API" --format json consensus probe --count 1 >/dev/null || true
  sleep 0.5
done
"$BIN/dwcp-cli" --api "$NEW_API" consensus quorum-status || true
if "$BIN/dwcp-testnet" sim --help >/dev/null 2>&1; then
  echo; echo "== deterministic simulator: PBFT with one Byzantine replica of 4, 5 seeds, committee epochs of 100 decisions"
  "$BIN/dwcp-testnet" sim consensus --nodes 4 --byzantine 1 --strategy equivocate --seeds 5 --epoch-length 100 || true
fi
if ((WAIT)); then
  echo; echo "testnet running in $DIR; try: $BIN/dwcp-cli --api $API node list   (Ctrl-C stops it)"
  while sleep 3600; do :; done
fi
