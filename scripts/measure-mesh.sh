#!/usr/bin/env bash
# Measures how long a local testnet of N nodes takes to form (every node lists all N as
# ready) and each process's resident memory once formed. Usage: scripts/measure-mesh.sh N...
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${BIN:-$PWD/target/debug}"
for n in "${@:-10}"; do
  dir=$(mktemp -d)
  start=$(date +%s.%N)
  "$BIN/dwcp-testnet" up --nodes "$n" --dir "$dir" --timeout 300s >/dev/null
  end=$(date +%s.%N)
  sleep 5
  rss=$(python3 - "$dir/testnet.json" <<'PY'
import json, sys
t = json.load(open(sys.argv[1]))
def rss(pid):
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS:"):
            return int(l.split()[1]) / 1024
vals = sorted(rss(n["pid"]) for n in t["nodes"])
print(f"node RSS MiB: min {vals[0]:.1f}  median {vals[len(vals)//2]:.1f}  max {vals[-1]:.1f}; bootstrap {rss(t['bootstrap']['pid']):.1f}")
PY
)
  printf '%s nodes: mesh formed in %.1f s; %s (load average %s)\n' "$n" "$(echo "$end - $start" | bc)" "$rss" "$(cut -d' ' -f1 /proc/loadavg)"
  "$BIN/dwcp-testnet" down --dir "$dir" >/dev/null
  rm -rf "$dir"
done
