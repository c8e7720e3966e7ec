//! Real QEMU guests (TCG is enough). These tests need the guest built by
//! `scripts/build-guest.sh`; without it they fail and say so.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use dwcp_hypervisor::qemu::{AccelChoice, QemuBackend, QemuConfig, RunAs};
use dwcp_hypervisor::test_guest::{self, MARKER, TestGuest};
use dwcp_hypervisor::{
    Accel, Backend, CgroupMode, DiskSpec, DonatedShare, Error, MigrationChannel, MigrationParams,
    MigrationStatus, ShareError, VmId, VmState,
};

/// TCG guests are CPU-bound and the CI machine has 2 cores: the VM tests take turns, so that
/// their timeouts measure the guest, not the neighbours.
static VM_TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Kills the VMs of a state dir when a test ends, also when it fails (QEMU is detached from
/// the node on purpose, so a panicking test would otherwise leave it running).
struct Reaper(std::path::PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        let n = QemuBackend::kill_recorded(&self.0.join("state"));
        if n > 0 && !std::thread::panicking() {
            panic!("{n} qemu process(es) were still running at the end of the test");
        }
    }
}

fn guest() -> TestGuest {
    match TestGuest::locate() {
        Ok(g) => g,
        Err(e) => panic!("{e}"),
    }
}

fn share() -> DonatedShare {
    DonatedShare {
        vcpus: 2,
        memory_mib: 1024,
        disk_mib: 256,
    }
}

fn config(dir: &Path, accel: AccelChoice) -> QemuConfig {
    let mut c = QemuConfig::new(dir.join("state"), share());
    c.accel = accel;
    c.probe_timeout = Duration::from_secs(3);
    // CI machines can be very loaded (load average 160 was seen here).
    c.start_timeout = Duration::from_secs(60);
    c
}

fn unique(name: &str) -> VmId {
    VmId::new(format!("{name}-{}", std::process::id())).unwrap()
}

/// Polls the serial log until `pred` holds, or panics with the log after `timeout`.
async fn wait_serial(
    b: &dyn Backend,
    id: &VmId,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&str) -> bool,
) -> String {
    let started = Instant::now();
    loop {
        let log = b.serial_log(id, 1 << 20).await.unwrap();
        if pred(&log) {
            return log;
        }
        if started.elapsed() > timeout {
            panic!("timed out waiting for {what}; serial log:\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.contains(") Z"))
            .unwrap_or(true)
}

fn cgroup_dirs_of(mode: &CgroupMode, id: &VmId) -> Vec<std::path::PathBuf> {
    let parents: Vec<String> = match mode {
        CgroupMode::V2 { parent } => vec![parent.clone()],
        CgroupMode::V1 {
            memory_parent,
            cpu_parent,
        } => std::iter::once(memory_parent.clone())
            .chain(cpu_parent.clone())
            .collect(),
        CgroupMode::Unavailable { .. } => vec![],
    };
    let mut out = Vec::new();
    for p in parents {
        if let Ok(rd) = std::fs::read_dir(&p) {
            for e in rd.flatten() {
                if e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{id}."))
                {
                    out.push(e.path());
                }
            }
        }
    }
    out
}

/// Boot, marker, pause/resume (the counter continues, no restart), re-attach from a new
/// backend on the same state dir, stop, destroy; nothing left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_of_a_real_guest() {
    let _turn = VM_TURN.lock().await;
    let g = guest();
    let tmp = tempfile::tempdir().unwrap();
    let _reap_tmp = Reaper(tmp.path().to_owned());
    // Auto: runs the real KVM probe (here it falls back to TCG and says why).
    let (b, report) = QemuBackend::open(config(tmp.path(), AccelChoice::Auto))
        .await
        .unwrap();
    assert!(report.attached.is_empty() && report.lost.is_empty());
    let info = b.info();
    eprintln!(
        "backend: accel={:?} ({}) cgroup={:?} {}",
        info.accel, info.accel_reason, info.cgroup, info.version
    );
    assert_eq!(info.cpu_model, "qemu64");
    if info.accel == Some(Accel::Tcg) {
        assert!(info.accel_reason.contains("kvm") || info.accel_reason.contains("tcg"));
    }

    // A disk from a content-addressed base exercises the -blockdev chain.
    let base = b.images().create_blank_base(16).unwrap();
    let id = unique("life");
    let mut spec = g.spec(id.clone(), 1, 128, "");
    spec.disk = Some(DiskSpec {
        base: base.clone(),
        size_mib: Some(32),
    });
    let vm = b.define(spec).await.unwrap();
    assert_eq!(vm.state, VmState::Defined);
    assert_eq!(b.usage().disk_mib, 32);

    let t0 = Instant::now();
    b.start(&id).await.unwrap();
    wait_serial(&b, &id, Duration::from_secs(120), "marker", |l| {
        l.contains(MARKER)
    })
    .await;
    eprintln!("boot to marker: {} ms", t0.elapsed().as_millis());
    wait_serial(&b, &id, Duration::from_secs(60), "tick 2", |l| {
        test_guest::last_tick(l) >= Some(2)
    })
    .await;
    let info = b.inspect(&id).await.unwrap();
    assert_eq!(info.state, VmState::Running);
    let pid = info.pid.unwrap();
    assert!(pid_alive(pid));
    // QEMU runs as an unprivileged user when we are root.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    if nix::unistd::geteuid().is_root() {
        assert!(
            !uid_line.split_whitespace().skip(1).any(|u| u == "0"),
            "{uid_line}"
        );
    }
    assert!(
        status.contains("Seccomp:\t2"),
        "no seccomp filter: {status}"
    );

    // Caps: memory = guest RAM + overhead, CPU = 1 core per vCPU, and QEMU is inside them.
    let cg_dirs = cgroup_dirs_of(&b.info().cgroup, &id);
    if !matches!(b.info().cgroup, CgroupMode::Unavailable { .. }) {
        assert!(!cg_dirs.is_empty(), "no cgroup for the running vm");
    }
    let read = |p: std::path::PathBuf| std::fs::read_to_string(p).map(|s| s.trim().to_owned());
    let cap = ((128 + QemuConfig::new("/x", share()).memory_overhead_mib) << 20).to_string();
    for d in &cg_dirs {
        let procs = read(d.join("cgroup.procs")).unwrap();
        assert!(
            procs.lines().any(|l| l == pid.to_string()),
            "qemu not in {d:?}"
        );
        if let Ok(v) = read(d.join("memory.limit_in_bytes")).or_else(|_| read(d.join("memory.max")))
        {
            assert_eq!(v, cap, "{d:?}");
        }
        if let Ok(v) = read(d.join("cpu.cfs_quota_us")) {
            assert_eq!(v, "100000");
        }
        if let Ok(v) = read(d.join("cpu.max")) {
            assert_eq!(v, "100000 100000");
        }
    }

    // The first stats call also starts a 1 s dirty-rate measurement, read after the pause.
    let stats = b.stats(&id).await.unwrap();
    assert!(stats.vcpu_time_ns > 0, "{stats:?}");
    assert_eq!(stats.memory_bytes, 128 << 20);
    assert!(stats.host_rss_bytes.unwrap() > 0);

    // Pause: the counter stops.
    b.pause(&id).await.unwrap();
    assert_eq!(b.inspect(&id).await.unwrap().state, VmState::Paused);
    let at_pause = test_guest::last_tick(&b.serial_log(&id, 1 << 20).await.unwrap()).unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let still = test_guest::last_tick(&b.serial_log(&id, 1 << 20).await.unwrap()).unwrap();
    assert!(
        still <= at_pause + 1,
        "ticked while paused: {at_pause} -> {still}"
    );
    let stats = b.stats(&id).await.unwrap();
    eprintln!("stats after pause: {stats:?}");
    assert!(
        stats.dirty_rate_mib_per_s.is_some(),
        "no dirty rate: {stats:?}"
    );
    // Resume: the counter continues from where it was, no restart.
    b.resume(&id).await.unwrap();
    let log = wait_serial(
        &b,
        &id,
        Duration::from_secs(60),
        "ticks after resume",
        |l| test_guest::last_tick(l) >= Some(still + 2),
    )
    .await;
    let ticks = test_guest::ticks(&log);
    assert_eq!(
        ticks.iter().filter(|&&t| t == 1).count(),
        1,
        "guest restarted: {ticks:?}"
    );
    assert!(
        ticks.windows(2).all(|w| w[1] == w[0] + 1),
        "gap or restart: {ticks:?}"
    );
    assert_eq!(log.matches(MARKER).count(), 1);

    // A restarted node re-attaches through the QMP socket.
    drop(b);
    let (b, report) = QemuBackend::open(config(tmp.path(), AccelChoice::Tcg))
        .await
        .unwrap();
    assert_eq!(report.attached, vec![id.clone()]);
    assert!(report.lost.is_empty());
    let info = b.inspect(&id).await.unwrap();
    assert_eq!((info.state, info.pid), (VmState::Running, Some(pid)));
    let before = test_guest::last_tick(&b.serial_log(&id, 1 << 20).await.unwrap()).unwrap();
    wait_serial(
        &b,
        &id,
        Duration::from_secs(60),
        "ticks after re-attach",
        |l| test_guest::last_tick(l) > Some(before),
    )
    .await;

    // Stop: process gone, definition and disk kept.
    b.stop(&id, Duration::from_millis(500)).await.unwrap();
    assert!(!pid_alive(pid), "qemu {pid} still running after stop");
    let vm_dir = b.vm_dir(&id);
    assert!(vm_dir.join("disk.qcow2").exists());
    assert!(!vm_dir.join("qmp.sock").exists());
    let listed = b.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].state, VmState::Defined);
    assert!(cgroup_dirs_of(&b.info().cgroup, &id).is_empty());

    // Destroy: nothing left.
    b.destroy(&id).await.unwrap();
    assert!(!vm_dir.exists());
    assert!(b.list().await.unwrap().is_empty());
    assert!(matches!(b.inspect(&id).await, Err(Error::NotFound(_))));
    assert_eq!(b.usage().memory_mib, 0);
    // Only the shared base image remains in the state dir.
    assert!(b.images().base_path(&base).exists());
    assert_eq!(
        std::fs::read_dir(tmp.path().join("state/vms"))
            .unwrap()
            .count(),
        0
    );
}

/// VMs beyond the donated share are refused with a clear error and leave nothing behind.
#[tokio::test]
async fn oversize_vm_is_refused() {
    let g = guest();
    let tmp = tempfile::tempdir().unwrap();
    let _reap_tmp = Reaper(tmp.path().to_owned());
    let mut cfg = config(tmp.path(), AccelChoice::Tcg);
    cfg.share.vcpus = 4;
    let (b, _) = QemuBackend::open(cfg).await.unwrap();
    let big = unique("big");
    let err = b
        .define(g.spec(big.clone(), 1, 2048, ""))
        .await
        .unwrap_err();
    match &err {
        Error::Share(ShareError::Exceeds {
            resource,
            requested,
            donated,
            ..
        }) => {
            assert_eq!((*resource, *requested, *donated), ("memory", 2048, 1024));
        }
        other => panic!("expected a share error, got {other:?}"),
    }
    assert!(
        err.to_string()
            .contains("memory needs 2048 MiB, donated 1024 MiB"),
        "{err}"
    );
    assert!(!b.vm_dir(&big).exists());
    let cpus = b
        .define(g.spec(unique("cpus"), 5, 64, ""))
        .await
        .unwrap_err();
    assert!(
        cpus.to_string()
            .contains("vcpus needs 5 vCPUs, donated 4 vCPUs"),
        "{cpus}"
    );

    // Two that fit, a third that does not.
    b.define(g.spec(unique("a"), 1, 512, "")).await.unwrap();
    b.define(g.spec(unique("b"), 1, 512, "")).await.unwrap();
    let third = b.define(g.spec(unique("c"), 1, 64, "")).await.unwrap_err();
    assert!(
        third.to_string().contains("1024 MiB already in use"),
        "{third}"
    );
    // A disk larger than the disk share.
    let base = b.images().create_blank_base(8).unwrap();
    let mut s = g.spec(unique("d"), 1, 16, "");
    s.disk = Some(DiskSpec {
        base,
        size_mib: Some(1024),
    });
    b.destroy(&unique("a")).await.unwrap();
    let disk = b.define(s).await.unwrap_err();
    assert!(disk.to_string().contains("disk needs 1024 MiB"), "{disk}");
}

/// A guest that tries to use 512 MiB with 128 MiB of RAM cannot: it runs out inside the guest,
/// the host process stays within guest RAM + overhead, the cgroup cap holds, the guest lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_cannot_exceed_its_memory_cap() {
    let _turn = VM_TURN.lock().await;
    let g = guest();
    let tmp = tempfile::tempdir().unwrap();
    let _reap_tmp = Reaper(tmp.path().to_owned());
    let mut cfg = config(tmp.path(), AccelChoice::Tcg);
    // Also covers the path of a node that is not root: no user change, no chroot, and the
    // sandbox then forbids raising privileges too.
    cfg.run_as = RunAs::Current;
    let overhead = cfg.memory_overhead_mib;
    let (b, _) = QemuBackend::open(cfg).await.unwrap();
    let id = unique("fill");
    b.define(g.spec(id.clone(), 1, 128, "dwcp.fill=512M"))
        .await
        .unwrap();
    b.start(&id).await.unwrap();
    let log = wait_serial(&b, &id, Duration::from_secs(180), "fill result", |l| {
        l.contains("fill-stopped") || l.contains("fill-done")
    })
    .await;
    assert!(
        !log.contains("fill-done"),
        "guest filled 512 MiB with 128 MiB of RAM:\n{log}"
    );
    let filled: u64 = log
        .split("fill-stopped MiB=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(filled < 128, "filled {filled} MiB");
    // Still alive after its allocation failed.
    let t = test_guest::last_tick(&b.serial_log(&id, 1 << 20).await.unwrap()).unwrap_or(0);
    wait_serial(&b, &id, Duration::from_secs(60), "ticks after fill", |l| {
        test_guest::last_tick(l) > Some(t)
    })
    .await;
    let stats = b.stats(&id).await.unwrap();
    let pid = b.inspect(&id).await.unwrap().pid.unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(
        status.contains("Seccomp:\t2"),
        "no seccomp filter: {status}"
    );
    let hwm_kib: u64 = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    let cap = (128 + overhead) << 20;
    eprintln!(
        "fill: guest got {filled} MiB; host peak RSS {} MiB; cgroup peak {:?} MiB; cap {} MiB",
        hwm_kib / 1024,
        stats.cgroup_memory_peak_bytes.map(|b| b >> 20),
        cap >> 20
    );
    assert!(
        hwm_kib * 1024 <= cap,
        "qemu peak RSS {hwm_kib} KiB above cap"
    );
    if let Some(peak) = stats.cgroup_memory_peak_bytes {
        assert!(peak <= cap, "cgroup peak {peak} above cap {cap}");
        assert!(
            peak >= 64 << 20,
            "cgroup did not see the guest's memory: {peak}"
        );
    }
    b.destroy(&id).await.unwrap();
    assert!(!pid_alive(pid));
}

/// The migration hooks: a guest moves to a second backend over a socketpair passed as file
/// descriptors, with downtime limit and bandwidth set, and keeps counting on the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrates_over_a_passed_fd_and_keeps_counting() {
    let _turn = VM_TURN.lock().await;
    let g = guest();
    let tmp_a = tempfile::tempdir().unwrap();
    let _reap_tmp_a = Reaper(tmp_a.path().to_owned());
    let tmp_b = tempfile::tempdir().unwrap();
    let _reap_tmp_b = Reaper(tmp_b.path().to_owned());
    let (src, _) = QemuBackend::open(config(tmp_a.path(), AccelChoice::Tcg))
        .await
        .unwrap();
    let (dst, _) = QemuBackend::open(config(tmp_b.path(), AccelChoice::Tcg))
        .await
        .unwrap();
    let id = unique("mig");
    src.define(g.spec(id.clone(), 1, 128, "")).await.unwrap();
    dst.define(g.spec(id.clone(), 1, 128, "")).await.unwrap();
    src.start(&id).await.unwrap();
    wait_serial(
        &src,
        &id,
        Duration::from_secs(60),
        "tick 2 on source",
        |l| test_guest::last_tick(l) >= Some(2),
    )
    .await;

    let (a, b_end) = std::os::unix::net::UnixStream::pair().unwrap();
    dst.start_incoming(&id, MigrationChannel::Fd(b_end.into()))
        .await
        .unwrap();
    assert_eq!(dst.inspect(&id).await.unwrap().state, VmState::Incoming);
    src.set_migration_params(
        &id,
        MigrationParams {
            downtime_limit_ms: Some(300),
            max_bandwidth_bytes_per_s: Some(1 << 30),
        },
    )
    .await
    .unwrap();
    src.migrate(&id, MigrationChannel::Fd(a.into()))
        .await
        .unwrap();
    let started = Instant::now();
    let done = loop {
        let p = src.migration_progress(&id).await.unwrap();
        if p.status.is_finished() {
            break p;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "migration stuck: {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(done.status, MigrationStatus::Completed, "{done:?}");
    assert!(done.transferred_bytes > 0);
    eprintln!(
        "migration: {} ms, downtime {:?} ms, {} MB",
        done.elapsed_ms,
        done.downtime_ms,
        done.transferred_bytes / 1_000_000
    );
    let src_last = test_guest::last_tick(&src.serial_log(&id, 1 << 20).await.unwrap()).unwrap();
    assert_eq!(src.inspect(&id).await.unwrap().state, VmState::Paused);
    let log = wait_serial(&dst, &id, Duration::from_secs(60), "ticks on target", |l| {
        test_guest::last_tick(l) >= Some(src_last + 2)
    })
    .await;
    assert_eq!(dst.inspect(&id).await.unwrap().state, VmState::Running);
    let t = test_guest::ticks(&log);
    assert!(
        !log.contains(MARKER),
        "target booted instead of resuming:\n{log}"
    );
    assert!(
        t.first().copied().unwrap_or(0) > 1,
        "target restarted counting: {t:?}"
    );
    src.destroy(&id).await.unwrap();
    dst.destroy(&id).await.unwrap();
}

/// The Debian userland variant boots from a content-addressed base image through an overlay.
/// Needs `scripts/build-guest.sh --rootfs debian` (debootstrap, a few minutes), so it only runs
/// with `cargo test -p dwcp-hypervisor --test qemu_vm -- --ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs scripts/build-guest.sh --rootfs debian"]
async fn debian_userland_boots_from_a_content_addressed_disk() {
    let _turn = VM_TURN.lock().await;
    let g = guest();
    let Some(deb) = g.debian.clone() else {
        panic!(
            "no Debian rootfs in {}: run scripts/build-guest.sh --rootfs debian",
            g.dir.display()
        );
    };
    let tmp = tempfile::tempdir().unwrap();
    let _reap_tmp = Reaper(tmp.path().to_owned());
    let (b, _) = QemuBackend::open(config(tmp.path(), AccelChoice::Tcg))
        .await
        .unwrap();
    let base = b.images().import(&deb.rootfs).unwrap();
    let id = unique("deb");
    let mut spec = g.spec(id.clone(), 1, 256, "");
    if let dwcp_hypervisor::BootSource::Kernel {
        initrd,
        initrd_sha256,
        ..
    } = &mut spec.boot
    {
        *initrd = Some(deb.initrd.clone());
        *initrd_sha256 = Some(deb.initrd_sha256.clone());
    }
    spec.disk = Some(DiskSpec {
        base,
        size_mib: None,
    });
    b.define(spec).await.unwrap();
    b.start(&id).await.unwrap();
    let log = wait_serial(&b, &id, Duration::from_secs(120), "debian marker", |l| {
        l.contains("rootfs=debian-12") && test_guest::last_tick(l) >= Some(2)
    })
    .await;
    assert_eq!(log.matches(MARKER).count(), 1);
    b.destroy(&id).await.unwrap();
}

/// `accel: Kvm` either really runs guests under KVM or refuses to open, never silently TCG.
#[tokio::test]
async fn required_kvm_is_used_or_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let _reap_tmp = Reaper(tmp.path().to_owned());
    match QemuBackend::open(config(tmp.path(), AccelChoice::Kvm)).await {
        Ok((b, _)) => assert_eq!(b.info().accel, Some(Accel::Kvm)),
        Err(Error::KvmUnusable(detail)) => {
            eprintln!("kvm refused: {detail}");
            assert!(detail.contains("kvm"), "{detail}");
        }
        Err(e) => panic!("unexpected error: {e}"),
    }
}
