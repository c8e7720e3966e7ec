#!/usr/bin/env bash
# The whole check, as CI runs it (.ci/run calls this): style, lints, the dependency rule of the
# sans-IO cores, then every test. Needs root for apt-get (or sudo) and for the network-namespace
# tests.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
step() { printf '\n=== %s (%ss)\n' "$*" "$SECONDS"; }

step "system packages"
scripts/deps.sh test

step "cargo fmt --check"
cargo fmt --all -- --check

step "clippy -D warnings (every feature: the libvirt backend, the ONNX predictor, test helpers)"
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings

step "dependency rule: sans-IO cores pull in no runtime, network or hypervisor crate"
check_pure() { # crate [cargo tree flags]
  local c="$1"; shift
  local tree
  tree=$(cargo tree -p "$c" -e normal --prefix none --locked "$@")   # fails the script if cargo does
  if grep -qE '^(tokio|libp2p|virt|mio) ' <<<"$tree"; then
    echo "error: $c ($*) depends on an I/O crate:" >&2
    cargo tree -p "$c" -e normal --locked "$@" >&2 || true
    exit 1
  fi
}
for c in dwcp-protocol dwcp-encoding dwcp-placement dwcp-prediction dwcp-consensus dwcp-reputation dwcp-statesync dwcp-sim; do
  check_pure "$c" --all-features
done
# AMST keeps its tokio driver in the same crate behind the `io` feature; the core alone is pure.
check_pure dwcp-transport --no-default-features

step "Prometheus alerting rules: promtool check and unit tests (docs/monitoring)"
PROMTOOL="${XDG_CACHE_HOME:-$HOME/.cache}/dwcp/promtool"
"$PROMTOOL" check rules docs/monitoring/alerts.yaml
(cd docs/monitoring && "$PROMTOOL" test rules alerts_test.yaml)

step "guest image for the VM tests"
if [ -x scripts/build-guest.sh ]; then scripts/build-guest.sh; fi

step "build binaries (the process-level tests run them)"
cargo build --workspace --bins --all-features --locked   # same features as the tests: one build

step "tests"
cargo nextest run --workspace --all-features --locked --no-fail-fast
