//! The libvirt backend against a real libvirtd (`qemu:///system`), booting the test guest.
//! Needs a running daemon (machine-notes section 4: install `libvirt-daemon-system
//! libvirt-daemon-system-sysv`, then `mkdir -p /var/log/libvirt; virtlogd -d; libvirtd -d`),
//! so it runs only with `cargo test -p dwcp-hypervisor --features libvirt --test libvirt_qemu
//! -- --ignored`.
#![cfg(feature = "libvirt")]
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use dwcp_hypervisor::libvirt::{LibvirtBackend, LibvirtConfig};
use dwcp_hypervisor::test_guest::{self, MARKER, TestGuest};
use dwcp_hypervisor::{Backend, DonatedShare, VmId, VmState};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a running libvirtd with the qemu driver"]
async fn lifecycle_through_a_real_libvirtd() {
    let g = TestGuest::locate().unwrap_or_else(|e| panic!("{e}"));
    // libvirt's qemu user must read the boot files: copy them out of $HOME.
    let images = tempfile::Builder::new()
        .prefix("dwcp-lv-")
        .tempdir_in("/var/lib/libvirt/images")
        .unwrap();
    let kernel = images.path().join("vmlinuz");
    let initrd = images.path().join("initrd.img");
    std::fs::copy(&g.kernel, &kernel).unwrap();
    std::fs::copy(&g.initrd, &initrd).unwrap();
    let logs = tempfile::tempdir().unwrap();

    let mut cfg = LibvirtConfig::new(
        "qemu:///system",
        DonatedShare {
            vcpus: 2,
            memory_mib: 512,
            disk_mib: 0,
        },
    );
    cfg.domain_type = "qemu".into();
    cfg.serial_log_dir = Some(logs.path().to_owned());
    let b = LibvirtBackend::open(cfg).await.unwrap();
    let id = VmId::new(format!("lv-{}", std::process::id())).unwrap();
    let mut spec = g.spec(id.clone(), 1, 128, "");
    if let dwcp_hypervisor::BootSource::Kernel {
        kernel: k,
        initrd: i,
        ..
    } = &mut spec.boot
    {
        *k = kernel.clone();
        *i = Some(initrd.clone());
    }
    b.define(spec).await.unwrap();
    b.start(&id).await.unwrap();
    let started = Instant::now();
    let wait = |min_tick: u64| {
        let b = &b;
        let id = &id;
        async move {
            loop {
                let log = b.serial_log(id, 1 << 20).await.unwrap();
                if log.contains(MARKER) && test_guest::last_tick(&log) >= Some(min_tick) {
                    return log;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(180),
                    "no tick {min_tick}:\n{log}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    wait(2).await;
    assert_eq!(b.inspect(&id).await.unwrap().state, VmState::Running);
    assert!(b.stats(&id).await.unwrap().vcpu_time_ns > 0);
    b.pause(&id).await.unwrap();
    assert_eq!(b.inspect(&id).await.unwrap().state, VmState::Paused);
    let at = test_guest::last_tick(&b.serial_log(&id, 1 << 20).await.unwrap()).unwrap();
    b.resume(&id).await.unwrap();
    let log = wait(at + 2).await;
    assert_eq!(
        test_guest::ticks(&log).iter().filter(|&&t| t == 1).count(),
        1
    );
    b.stop(&id, Duration::from_millis(500)).await.unwrap();
    assert_eq!(b.inspect(&id).await.unwrap().state, VmState::Defined);
    b.destroy(&id).await.unwrap();
    assert!(b.list().await.unwrap().iter().all(|v| v.id != id));
}
