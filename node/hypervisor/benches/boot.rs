//! Boot-to-marker time of the test guest, side by side:
//!
//! - `raw qemu`: the bare command line from machine-notes section 3 (no sandbox, no user
//!   change, no cgroup), timed from spawn to `DWCP-GUEST-READY` in the serial file: the anchor;
//! - `QemuBackend`: `start()` (hash checks, cgroup, sandbox, runas, chroot, QMP handshake)
//!   until the marker shows in `serial_log()`;
//! - KVM: the backend's real probe; on hosts where it fails the row says why.
//!
//! Run: `scripts/build-guest.sh && cargo bench -p dwcp-hypervisor --bench boot`
//! (`BOOT_RUNS=N` changes the number of runs, default 5).

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use dwcp_hypervisor::qemu::{AccelChoice, QemuBackend, QemuConfig, probe};
use dwcp_hypervisor::test_guest::{MARKER, TestGuest};
use dwcp_hypervisor::{Accel, Backend, DonatedShare, VmId};

fn guest_uptime(log: &str) -> Option<f64> {
    let l = log.lines().find(|l| l.contains(MARKER))?;
    l.split("uptime=")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

async fn raw_run(g: &TestGuest, dir: &Path) -> Result<(Duration, f64), String> {
    let serial = dir.join("raw-serial.log");
    let _ = std::fs::remove_file(&serial);
    let t0 = Instant::now();
    let mut child = tokio::process::Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-m",
            "256",
            "-smp",
            "1",
            "-nodefaults",
            "-display",
            "none",
        ])
        .args(["-nic", "none", "-kernel"])
        .arg(&g.kernel)
        .arg("-initrd")
        .arg(&g.initrd)
        .args(["-append", &g.cmdline, "-serial"])
        .arg(format!("file:{}", serial.display()))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| e.to_string())?;
    let res = loop {
        let log = std::fs::read_to_string(&serial).unwrap_or_default();
        if log.contains(MARKER) {
            break Ok((t0.elapsed(), guest_uptime(&log).unwrap_or(f64::NAN)));
        }
        if t0.elapsed() > Duration::from_secs(120) {
            break Err("no marker in 120 s".to_string());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let _ = child.kill().await;
    res
}

async fn backend_run(b: &QemuBackend, g: &TestGuest, n: usize) -> Result<(Duration, f64), String> {
    let id = VmId::new(format!("bench-{n}")).map_err(|e| e.to_string())?;
    b.define(g.spec(id.clone(), 1, 256, ""))
        .await
        .map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    b.start(&id).await.map_err(|e| e.to_string())?;
    let res = loop {
        let log = b
            .serial_log(&id, 1 << 16)
            .await
            .map_err(|e| e.to_string())?;
        if log.contains(MARKER) {
            break Ok((t0.elapsed(), guest_uptime(&log).unwrap_or(f64::NAN)));
        }
        if t0.elapsed() > Duration::from_secs(120) {
            break Err("no marker in 120 s".to_string());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    b.destroy(&id).await.map_err(|e| e.to_string())?;
    res
}

fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let median = s[s.len() / 2];
    (s[0], median, s[s.len() - 1])
}

fn main() {
    let g = match TestGuest::locate() {
        Ok(g) => g,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    let runs: usize = std::env::var("BOOT_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
        .max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async move {
        let tmp = tempfile::tempdir().expect("tempdir");
        let share = DonatedShare {
            vcpus: 2,
            memory_mib: 1024,
            disk_mib: 1024,
        };
        let mut cfg = QemuConfig::new(tmp.path().join("state"), share);
        cfg.accel = AccelChoice::Tcg;
        let mut nocg = cfg.clone();
        nocg.state_dir = tmp.path().join("state-nocg");
        nocg.cgroups = false;
        let (b, _) = QemuBackend::open(cfg).await.expect("backend");
        let (b_nocg, _) = QemuBackend::open(nocg).await.expect("backend");
        let kvm = probe::probe(
            Path::new("qemu-system-x86_64"),
            Accel::Kvm,
            "qemu64",
            tmp.path(),
            Duration::from_secs(5),
        )
        .await;

        let mut raw = (Vec::new(), Vec::new());
        let mut be = (Vec::new(), Vec::new());
        let mut be_nocg = (Vec::new(), Vec::new());
        for n in 0..runs {
            // Interleave so both see the same machine load.
            match raw_run(&g, tmp.path()).await {
                Ok((d, up)) => {
                    raw.0.push(d.as_secs_f64());
                    raw.1.push(up);
                }
                Err(e) => eprintln!("raw run {n}: {e}"),
            }
            match backend_run(&b, &g, n).await {
                Ok((d, up)) => {
                    be.0.push(d.as_secs_f64());
                    be.1.push(up);
                }
                Err(e) => eprintln!("backend run {n}: {e}"),
            }
            match backend_run(&b_nocg, &g, n).await {
                Ok((d, up)) => {
                    be_nocg.0.push(d.as_secs_f64());
                    be_nocg.1.push(up);
                }
                Err(e) => eprintln!("backend (no cgroup) run {n}: {e}"),
            }
        }
        println!("boot to {MARKER}, TCG, 1 vCPU, 256 MiB, {runs} runs (min / median / max)");
        println!("| path | wall s | guest uptime at marker s |");
        println!("|---|---|---|");
        for (name, (w, u)) in [
            ("raw qemu (anchor)", &raw),
            ("QemuBackend (confined)", &be),
            ("QemuBackend without cgroup caps", &be_nocg),
        ] {
            if w.is_empty() {
                println!("| {name} | failed | - |");
                continue;
            }
            let (a, m, z) = stats(w);
            let (ua, um, uz) = stats(u);
            println!("| {name} | {a:.2} / {m:.2} / {z:.2} | {ua:.2} / {um:.2} / {uz:.2} |");
        }
        if kvm.ok {
            let mut kcfg = QemuConfig::new(tmp.path().join("state-kvm"), share);
            kcfg.accel = AccelChoice::Kvm;
            let mut k = (Vec::new(), Vec::new());
            if let Ok((kb, _)) = QemuBackend::open(kcfg).await {
                for n in 0..runs {
                    if let Ok((d, up)) = backend_run(&kb, &g, n).await {
                        k.0.push(d.as_secs_f64());
                        k.1.push(up);
                    }
                }
            }
            if k.0.is_empty() {
                println!("| QemuBackend KVM | probe ok but boots failed | - |");
            } else {
                let (a, m, z) = stats(&k.0);
                let (ua, um, uz) = stats(&k.1);
                println!("| QemuBackend KVM | {a:.2} / {m:.2} / {z:.2} | {ua:.2} / {um:.2} / {uz:.2} |");
            }
        } else {
            println!("| KVM | cannot run here: {} | - |", kvm.detail);
        }
        println!("anchor from machine-notes section 3: 3.3-4.0 s whole process (256 MiB, poweroff at marker)");
    });
}
