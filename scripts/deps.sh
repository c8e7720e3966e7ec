#!/usr/bin/env bash
# Installs the Debian 12 packages DWCP needs to build and test. Idempotent; quiet when
# everything is present. Usage: scripts/deps.sh [build|test|demo]
set -euo pipefail
want=(pkg-config libvirt-dev)                     # build: the libvirt backend links libvirt
case "${1:-test}" in
  test) want+=(qemu-system-x86 qemu-utils busybox-static cpio iperf3 zstd lz4 iproute2 iputils-ping) ;;
  demo) want+=(qemu-system-x86 qemu-utils busybox-static cpio iptables) ;;
  build) ;;
esac
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# promtool checks and unit-tests docs/monitoring/alerts.yaml. It is taken out of Debian's
# prometheus package without installing the package (that would set up a Prometheus server).
if [ "${1:-test}" = test ]; then
  tool="${XDG_CACHE_HOME:-$HOME/.cache}/dwcp/promtool"
  if [ ! -x "$tool" ]; then
    echo "fetching promtool (Debian package prometheus, extracted to $tool)" >&2
    tmp=$(mktemp -d)
    if ! (cd "$tmp" && apt-get download -qq prometheus 2>/dev/null); then
      SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
      $SUDO apt-get update -qq
      (cd "$tmp" && apt-get download -qq prometheus 2>/dev/null)
    fi
    dpkg -x "$tmp"/prometheus_*.deb "$tmp/x"
    install -D -m 0755 "$tmp/x/usr/bin/promtool" "$tool"
    rm -rf "$tmp"
  fi
fi
