#!/usr/bin/env bash
# Produce a corpus of real guest memory for the HDE encoder benchmark
# (`dwcp-testnet bench encoding <files...>`).
#
#   scripts/guest-memory-corpus.sh [--out DIR] [--gap SECONDS] [--only busybox|debian] [--force]
#
# Boots real guests under QEMU (TCG; /dev/kvm on the dev machine cannot run guests) with
# Debian's linux-image-cloud-amd64 kernel and captures each guest's RAM twice, GAP seconds
# apart (default 120), while it keeps running:
#   busybox-idle-{1,2}.raw / .mig   256 MiB guest, busybox initramfs (scripts/build-guest.sh), idle
#   debian-sqlite-{1,2}.raw / .mig  768 MiB guest, Debian bookworm minbase userland (debootstrap,
#                                   packed as an initramfs) that loads a 300k-row SQLite
#                                   database into tmpfs; between the captures it updates
#                                   10 % of the rows.
# .raw = QMP `pmemsave` of all guest RAM (page-aligned, page number = offset / 4096)
# .mig = the QEMU migration stream of the same instant (`migrate exec:cat > file`), the
#        unaligned stream shape.
# The guest is paused for each capture (stop, pmemsave, migrate, cont), so .raw and .mig
# show the same memory.
#
# Output goes to DIR (default ${XDG_CACHE_HOME:-$HOME/.cache}/dwcp/corpus), never into git.
# Needs: qemu-system-x86, python3, and for the Debian guest debootstrap (installed when
# missing) and network access to the Debian archive. Existing captures are kept unless
# --force.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
OUT="${XDG_CACHE_HOME:-$HOME/.cache}/dwcp/corpus"
GAP=120
ONLY=""
FORCE=0
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        --gap) GAP="$2"; shift 2 ;;
        --only) ONLY="$2"; shift 2 ;;
        --force) FORCE=1; shift ;;
        -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
        *) echo "guest-memory-corpus.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
done
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
log() { echo "corpus: $*" >&2; }

# The kernel and busybox initramfs come from the shared guest builder.
# Its last stdout line is the directory (apt-get, when it installs packages, also prints there).
GUEST_DIR="$("$HERE/build-guest.sh" | tail -n 1)"
[ -f "$GUEST_DIR/guest.env" ] || { log "build-guest.sh did not report a guest directory"; exit 1; }
# shellcheck disable=SC1091
. "$GUEST_DIR/guest.env"
command -v python3 >/dev/null || { log "python3 is needed for QMP"; exit 1; }

WORK="$(mktemp -d "${TMPDIR:-/tmp}/dwcp-corpus.XXXXXX")"
QEMU_PID=""
cleanup() {
    if [ -n "$QEMU_PID" ] && kill -0 "$QEMU_PID" 2>/dev/null; then kill "$QEMU_PID" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

# qmp SOCKET CMD [ARGS-JSON]: one QMP command; prints the "return" value as JSON.
qmp() {
    python3 - "$@" <<'PY'
import json, socket, sys
sock, cmd = sys.argv[1], sys.argv[2]
args = json.loads(sys.argv[3]) if len(sys.argv) > 3 else None
s = socket.socket(socket.AF_UNIX)
s.connect(sock)
f = s.makefile("rw")
json.loads(f.readline())  # greeting
def call(c, a=None):
    m = {"execute": c}
    if a is not None:
        m["arguments"] = a
    f.write(json.dumps(m) + "\n"); f.flush()
    while True:
        r = json.loads(f.readline())
        if "event" in r:
            continue
        if "error" in r:
            sys.exit("qmp %s: %s" % (c, r["error"]))
        return r["return"]
call("qmp_capabilities")
print(json.dumps(call(cmd, args)))
PY
}

wait_serial() { # FILE PATTERN TIMEOUT
    local i=0
    while ! grep -q "$2" "$1" 2>/dev/null; do
        sleep 1; i=$((i + 1))
        if [ "$i" -ge "$3" ]; then log "timeout waiting for '$2' in $1"; tail -n 20 "$1" >&2 || true; return 1; fi
    done
}

capture() { # SOCKET MEM_BYTES PREFIX
    local sock="$1" mem="$2" prefix="$3"
    qmp "$sock" stop >/dev/null
    qmp "$sock" pmemsave "{\"val\": 0, \"size\": $mem, \"filename\": \"$prefix.raw.tmp\"}" >/dev/null
    qmp "$sock" migrate "{\"uri\": \"exec:cat > $prefix.mig.tmp\"}" >/dev/null
    local st=""
    for _ in $(seq 1 600); do
        st="$(qmp "$sock" query-migrate | python3 -c 'import json,sys; print(json.load(sys.stdin).get("status",""))')"
        case "$st" in completed|failed|cancelled) break ;; esac
        sleep 0.5
    done
    [ "$st" = completed ] || { log "migration to file ended '$st'"; return 1; }
    qmp "$sock" cont >/dev/null
    mv "$prefix.raw.tmp" "$prefix.raw"; mv "$prefix.mig.tmp" "$prefix.mig"
    log "captured $prefix.raw ($(stat -c %s "$prefix.raw") B) and $prefix.mig ($(stat -c %s "$prefix.mig") B)"
}

# run_guest NAME MEM_MIB INITRD APPEND READY_PATTERN [BETWEEN_PATTERN]
run_guest() {
    local name="$1" mib="$2" initrd="$3" append="$4" ready="$5" between="${6:-}"
    if [ "$FORCE" -eq 0 ] && [ -s "$OUT/$name-2.raw" ] && [ -s "$OUT/$name-2.mig" ]; then
        log "$name: cached"; return 0
    fi
    local sock="$WORK/$name.qmp" serial="$OUT/$name.serial.log"
    : >"$serial"
    qemu-system-x86_64 -accel tcg -m "$mib" -smp 1 -kernel "$KERNEL" -initrd "$initrd" \
        -append "console=ttyS0 quiet panic=-1 no_timer_check $append" -display none -nic none \
        -serial "file:$serial" -qmp "unix:$sock,server=on,wait=off" -no-reboot &
    QEMU_PID=$!
    wait_serial "$serial" "$ready" 600
    sleep 5
    capture "$sock" $((mib * 1048576)) "$OUT/$name-1"
    log "$name: waiting ${GAP}s for the second capture"
    sleep "$GAP"
    if [ -n "$between" ]; then wait_serial "$serial" "$between" 600; fi
    capture "$sock" $((mib * 1048576)) "$OUT/$name-2"
    qmp "$sock" quit >/dev/null || true
    wait "$QEMU_PID" 2>/dev/null || true
    QEMU_PID=""
}

# --- guest 1: busybox initramfs, idle ---------------------------------------------------------
if [ -z "$ONLY" ] || [ "$ONLY" = busybox ]; then
    run_guest busybox-idle 256 "$INITRD" "" "DWCP-GUEST-READY"
fi

# --- guest 2: Debian userland with a database load ---------------------------------------------
build_debian() {
    local root="$OUT/debian-rootfs" img="$OUT/debian-initrd.img"
    if [ -s "$img" ] && [ "$FORCE" -eq 0 ]; then echo "$img"; return 0; fi
    if ! command -v debootstrap >/dev/null; then
        log "installing debootstrap"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >&2
    fi
    rm -rf "$root"
    log "debootstrap bookworm minbase + sqlite3 into $root"
    debootstrap --variant=minbase --include=sqlite3 bookworm "$root" http://deb.debian.org/debian >&2
    # Trim what a RAM-resident root does not need.
    rm -rf "$root"/usr/share/{doc,man,info,locale} "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/*
    cat >"$root/init" <<'INIT'
#!/bin/sh
# dwcp corpus guest /init (scripts/guest-memory-corpus.sh): a Debian userland running a
# database load, then idle with a tick counter.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev 2>/dev/null
mkdir -p /dev/shm; mount -t tmpfs shm /dev/shm
echo "DEBIAN-UP uptime=$(cut -d' ' -f1 /proc/uptime)"
sqlite3 /dev/shm/load.db "PRAGMA journal_mode=OFF;
CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT, email TEXT, payload BLOB, n INTEGER);
WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x < 300000)
INSERT INTO t SELECT x, 'user' || x, 'user' || x || '@example.org', randomblob(48) || zeroblob(16), x * 7 FROM c;
CREATE INDEX t_name ON t(name);
SELECT count(*), sum(n) FROM t;"
echo "WORKLOAD-LOADED"
( sleep 60
  sqlite3 /dev/shm/load.db "UPDATE t SET payload = randomblob(64), n = n + 1 WHERE id % 10 = 0; SELECT changes();"
  echo "WORKLOAD-UPDATED" ) &
i=0; while true; do i=$((i + 1)); echo "tick $i"; sleep 1; done
INIT
    chmod 755 "$root/init"
    log "packing $img"
    ( cd "$root" && find . | cpio -o -H newc --quiet | gzip -1 ) >"$img.tmp"
    mv "$img.tmp" "$img"
    echo "$img"
}
if [ -z "$ONLY" ] || [ "$ONLY" = debian ]; then
    DEB_INITRD="$(build_debian)"
    run_guest debian-sqlite 768 "$DEB_INITRD" "rdinit=/init" "WORKLOAD-LOADED" "WORKLOAD-UPDATED"
fi

ls -l "$OUT"/*.raw "$OUT"/*.mig >&2
echo "$OUT"
