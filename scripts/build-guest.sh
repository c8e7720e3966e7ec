#!/usr/bin/env bash
# Build the small bootable test guest used by dwcp-hypervisor's VM tests.
#
#   scripts/build-guest.sh [--out DIR] [--rootfs busybox|debian] [--force]
#
# Output (default DIR: ${XDG_CACHE_HOME:-$HOME/.cache}/dwcp/guest), outside git:
#   DIR/vmlinuz          Debian's linux-image-cloud-amd64 kernel (8250 serial built in)
#   DIR/initrd.img       gzip'd cpio: static busybox + /init below
#   DIR/guest.env        KERNEL=, INITRD=, CMDLINE=, KERNEL_VERSION=, SHA256s (shell-sourceable)
#   DIR/stamp            what the cache was built from; a matching stamp means "reuse"
#   with --rootfs debian also: DIR/debian-rootfs.qcow2, DIR/initrd-debian.img (see below)
#
# The guest's /init, on the serial console (ttyS0):
#   DWCP-GUEST-READY uptime=<s> mem_kib=<MemTotal>   once, when userspace starts
#   tick N                                            every second, N = 1, 2, 3, ...
# A resumed or migrated guest continues its count; a restarted one starts again at 1.
# Kernel command-line options read by /init:
#   dwcp.poweroff        power off right after the marker (boot-time measurement)
#   dwcp.fill=SIZE       after the marker, try to fill SIZE (e.g. 64M, 1G) of guest RAM in a
#                        tmpfs, 1 MiB at a time; prints "fill-progress MiB=N" every 16 MiB and
#                        "fill-done MiB=N" or "fill-stopped MiB=N" (out of space/memory)
#   dwcp.ticks=N         stop ticking after N ticks and power off
#
# Idempotent: reruns reuse the cache unless the inputs (this script, kernel version, busybox
# version) changed or --force is given. Installs its own apt packages when they are missing
# (needs root or sudo): qemu-system-x86 qemu-utils busybox-static cpio (+ debootstrap and
# e2fsprogs for --rootfs debian, which needs root and takes about 4 minutes).
set -euo pipefail

OUT="${XDG_CACHE_HOME:-$HOME/.cache}/dwcp/guest"
ROOTFS=busybox
FORCE=0
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        --out=*) OUT="${1#--out=}"; shift ;;
        --rootfs) ROOTFS="$2"; shift 2 ;;
        --rootfs=*) ROOTFS="${1#--rootfs=}"; shift ;;
        --force) FORCE=1; shift ;;
        -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
        *) echo "build-guest.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
done
case "$ROOTFS" in busybox|debian) ;; *) echo "build-guest.sh: --rootfs must be busybox or debian" >&2; exit 2 ;; esac

log() { echo "build-guest: $*" >&2; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
fi

# --- apt packages -------------------------------------------------------------------------
need_pkgs=(qemu-system-x86 qemu-utils busybox-static cpio)
missing=()
for p in "${need_pkgs[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done
APT_UPDATED=0
apt_update() {
    if [ "$APT_UPDATED" -eq 0 ]; then
        log "apt-get update"
        $SUDO apt-get update -qq
        APT_UPDATED=1
    fi
}
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    apt_update
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] || BUSYBOX=/usr/bin/busybox
if ! file -L "$BUSYBOX" 2>/dev/null | grep -q "statically linked" && ! ldd "$BUSYBOX" 2>&1 | grep -q "not a dynamic"; then
    log "warning: $BUSYBOX does not look statically linked"
fi

# --- kernel version -----------------------------------------------------------------------
# The metapackage depends on exactly one versioned image, e.g. linux-image-6.1.0-56-cloud-amd64.
kernel_pkg() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null \
        | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-cloud-amd64\)$/\1/p' | head -n1
}
KPKG="$(kernel_pkg || true)"
if [ -z "$KPKG" ]; then
    apt_update
    KPKG="$(kernel_pkg || true)"
fi
[ -n "$KPKG" ] || { log "cannot resolve linux-image-cloud-amd64's kernel package (apt sources?)"; exit 1; }
KVER_PKG="$(apt-cache policy "$KPKG" | sed -n 's/^ *Candidate: //p')"

# Bump GUEST_VERSION when the guest's contents change; the cache is keyed on it, the kernel
# package version and busybox's version (not on this file, so unrelated edits keep the cache).
GUEST_VERSION=4
BB_VER="$(dpkg-query -W -f='${Version}' busybox-static)"
STAMP="guest=$GUEST_VERSION kernel=$KPKG:$KVER_PKG busybox=$BB_VER"

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

if [ "$FORCE" -eq 0 ] && [ -f "$OUT/stamp" ] && [ "$(cat "$OUT/stamp")" = "$STAMP" ] \
    && [ -s "$OUT/vmlinuz" ] && [ -s "$OUT/initrd.img" ] && [ -s "$OUT/guest.env" ]; then
    log "cache is up to date: $OUT"
    BUSYBOX_CACHED=1
else
    BUSYBOX_CACHED=0
fi

# Reproducible cpio: fixed mtimes, sorted names, no gzip timestamp.
pack_initramfs() {
    find "$1" -exec touch -h -d @0 {} +
    ( cd "$1" && find . | LC_ALL=C sort | cpio -o -H newc --quiet --reproducible | gzip -9 -n ) >"$2"
}

WORK="$(mktemp -d "${TMPDIR:-/tmp}/dwcp-guest.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
chmod 755 "$WORK"  # so apt-get download can write as _apt

if [ "$BUSYBOX_CACHED" -eq 0 ]; then
    # --- kernel ---------------------------------------------------------------------------
    log "downloading $KPKG ($KVER_PKG)"
    ( cd "$WORK" && apt-get download -qq -o APT::Sandbox::User=root "$KPKG" ) || { apt_update; ( cd "$WORK" && apt-get download -qq -o APT::Sandbox::User=root "$KPKG" ); }
    dpkg-deb -x "$WORK"/"$KPKG"_*.deb "$WORK/kpkg"
    VMLINUZ="$(ls "$WORK"/kpkg/boot/vmlinuz-* | head -n1)"
    [ -s "$VMLINUZ" ] || { log "no vmlinuz in $KPKG"; exit 1; }
    KERNEL_VERSION="${VMLINUZ##*/vmlinuz-}"

    # --- initramfs ------------------------------------------------------------------------
    R="$WORK/initramfs"
    mkdir -p "$R"/{bin,sbin,etc,proc,sys,dev,tmp,fill,usr/bin,usr/sbin}
    cp "$BUSYBOX" "$R/bin/busybox"
    cat >"$R/init" <<'INIT'
#!/bin/busybox sh
# dwcp test guest /init (written by scripts/build-guest.sh)
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
echo "DWCP-GUEST-READY uptime=$(cut -d' ' -f1 /proc/uptime) mem_kib=$(sed -n 's/^MemTotal: *\([0-9]*\).*/\1/p' /proc/meminfo)"
opt() { for w in $(cat /proc/cmdline); do case "$w" in "$1"=*) echo "${w#*=}"; return 0 ;; "$1") echo "1"; return 0 ;; esac; done; return 1; }
if opt dwcp.poweroff >/dev/null; then poweroff -f; fi
FILL="$(opt dwcp.fill || true)"
if [ -n "$FILL" ]; then
    n="${FILL%[kKmMgG]}"
    case "$FILL" in *[gG]) mib=$((n * 1024)) ;; *[mM]) mib=$n ;; *[kK]) mib=$(( (n + 1023) / 1024 )) ;; *) mib=$(( (n + 1048575) / 1048576 )) ;; esac
    mount -t tmpfs -o size=$((mib + 1))m fill /fill
    # The writer, not the loop that reports, is what the guest's OOM killer takes: the loop
    # is exempt (-1000), each dd its first choice (1000). Before, the killer once took the
    # loop and the result was never printed.
    ( echo -1000 > /proc/self/oom_score_adj
      i=0
      while [ "$i" -lt "$mib" ]; do
        if ! sh -c 'echo 1000 > /proc/self/oom_score_adj; exec dd if=/dev/zero of="$1" bs=1048576 count=1 2>/dev/null' dd "/fill/m$i"; then
            echo "fill-stopped MiB=$i"; exit 0
        fi
        i=$((i + 1))
        [ $((i % 16)) -eq 0 ] && echo "fill-progress MiB=$i"
      done
      echo "fill-done MiB=$i" ) &
fi
TICKS="$(opt dwcp.ticks || true)"
( i=0
  while true; do
    i=$((i + 1)); echo "tick $i"
    if [ -n "$TICKS" ] && [ "$i" -ge "$TICKS" ]; then poweroff -f; fi
    sleep 1
  done ) &
exec setsid cttyhack sh
INIT
    chmod 755 "$R/init"
    pack_initramfs "$R" "$WORK/initrd.img"

    # --- install atomically into the cache -------------------------------------------------
    cp "$VMLINUZ" "$OUT/vmlinuz.tmp" && mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
    cp "$WORK/initrd.img" "$OUT/initrd.img.tmp" && mv "$OUT/initrd.img.tmp" "$OUT/initrd.img"
    cat >"$OUT/guest.env.tmp" <<ENV
# written by scripts/build-guest.sh; source it or parse KEY=VALUE lines
KERNEL=$OUT/vmlinuz
INITRD=$OUT/initrd.img
CMDLINE="console=ttyS0 quiet panic=-1"
KERNEL_VERSION=$KERNEL_VERSION
KERNEL_SHA256=$(sha256sum "$OUT/vmlinuz" | cut -d' ' -f1)
INITRD_SHA256=$(sha256sum "$OUT/initrd.img" | cut -d' ' -f1)
MARKER=DWCP-GUEST-READY
ENV
    mv "$OUT/guest.env.tmp" "$OUT/guest.env"
    echo "$STAMP" >"$OUT/stamp"
    log "built kernel $KERNEL_VERSION and busybox initramfs in $OUT"
fi

# --- optional Debian userland (debootstrap) ------------------------------------------------
# DIR/debian-rootfs.qcow2: ext4 root (Debian bookworm minbase + busybox), /sbin/dwcp-init prints
#   the same marker (with rootfs=debian) and ticks; DIR/initrd-debian.img: busybox initramfs that
#   loads virtio_blk from the kernel package, mounts /dev/vda and switch_roots into it.
# Boot: -kernel vmlinuz -initrd initrd-debian.img -append "$CMDLINE" + the qcow2 as virtio-blk.
debian_env() {
    grep -v '^DEBIAN_' "$OUT/guest.env" >"$OUT/guest.env.tmp" || true
    cat >>"$OUT/guest.env.tmp" <<ENV
DEBIAN_ROOTFS=$OUT/debian-rootfs.qcow2
DEBIAN_INITRD=$OUT/initrd-debian.img
DEBIAN_INITRD_SHA256=$(sha256sum "$OUT/initrd-debian.img" | cut -d' ' -f1)
ENV
    mv "$OUT/guest.env.tmp" "$OUT/guest.env"
}
if [ "$ROOTFS" = debian ]; then
    IMG="$OUT/debian-rootfs.qcow2"
    if [ "$FORCE" -eq 0 ] && [ -s "$IMG" ] && [ -s "$OUT/initrd-debian.img" ] && [ -f "$OUT/debian.stamp" ] \
        && [ "$(cat "$OUT/debian.stamp")" = "$STAMP" ]; then
        log "debian rootfs is up to date: $IMG"
        grep -q '^DEBIAN_ROOTFS=' "$OUT/guest.env" || debian_env
    else
        [ "$(id -u)" -eq 0 ] || { log "--rootfs debian needs root (debootstrap)"; exit 1; }
        for p in debootstrap e2fsprogs; do
            dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
                || { apt_update; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$p"; }
        done
        log "debootstrap --variant=minbase bookworm (a few minutes)"
        RFS="$WORK/rootfs"
        debootstrap --variant=minbase --include=busybox bookworm "$RFS" http://deb.debian.org/debian \
            >"$WORK/debootstrap.log" 2>&1 || { tail -n 20 "$WORK/debootstrap.log" >&2; exit 1; }
        cat >"$RFS/sbin/dwcp-init" <<'DINIT'
#!/bin/sh
# dwcp test guest init on the Debian rootfs (written by scripts/build-guest.sh)
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev 2>/dev/null
. /etc/os-release
echo "DWCP-GUEST-READY uptime=$(cut -d' ' -f1 /proc/uptime) mem_kib=$(sed -n 's/^MemTotal: *\([0-9]*\).*/\1/p' /proc/meminfo) rootfs=debian-$VERSION_ID"
if grep -qw dwcp.poweroff /proc/cmdline; then sync; busybox poweroff -f; fi
i=0
while true; do i=$((i + 1)); echo "tick $i"; sleep 1; done
DINIT
        chmod 755 "$RFS/sbin/dwcp-init"
        rm -rf "$RFS"/var/cache/apt/archives/*.deb "$RFS"/var/lib/apt/lists/*
        SIZE_MB=$(( $(du -sm "$RFS" | cut -f1) + 128 ))
        mke2fs -q -t ext4 -L dwcp-root -d "$RFS" "$WORK/rootfs.ext4" "${SIZE_MB}M"
        qemu-img convert -q -c -f raw -O qcow2 "$WORK/rootfs.ext4" "$IMG.tmp"

        # The initramfs that finds the disk.
        ( cd "$WORK" && apt-get download -qq -o APT::Sandbox::User=root "$KPKG" ) || true
        rm -rf "$WORK/kpkg2"; dpkg-deb -x "$WORK"/"$KPKG"_*.deb "$WORK/kpkg2"
        KV="$(ls "$WORK/kpkg2/lib/modules")"
        D="$WORK/initramfs-debian"
        mkdir -p "$D"/{bin,proc,sys,dev,newroot,lib/modules}
        cp "$BUSYBOX" "$D/bin/busybox"
        for m in drivers/virtio/virtio.ko drivers/virtio/virtio_ring.ko \
                 drivers/virtio/virtio_pci_legacy_dev.ko drivers/virtio/virtio_pci_modern_dev.ko \
                 drivers/virtio/virtio_pci.ko drivers/block/virtio_blk.ko; do
            cp "$WORK/kpkg2/lib/modules/$KV/kernel/$m" "$D/lib/modules/"
        done
        cat >"$D/init" <<'DRD'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk; do
    insmod /lib/modules/$m.ko || echo "DWCP-GUEST-ERROR insmod $m failed"
done
i=0; while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
if ! mount -t ext4 /dev/vda /newroot; then echo "DWCP-GUEST-ERROR no root disk /dev/vda"; poweroff -f; fi
umount /proc /sys /dev
exec switch_root /newroot /sbin/dwcp-init
DRD
        chmod 755 "$D/init"
        pack_initramfs "$D" "$OUT/initrd-debian.img.tmp"
        mv "$OUT/initrd-debian.img.tmp" "$OUT/initrd-debian.img"
        mv "$IMG.tmp" "$IMG"
        debian_env
        echo "$STAMP" >"$OUT/debian.stamp"
        log "built $IMG and $OUT/initrd-debian.img"
    fi
fi

echo "$OUT"
