//! The QEMU backend: spawns `qemu-system-x86_64` directly and drives it over QMP.
//!
//! # State dir
//!
//! ```text
//! <state_dir>/images/base/<sha256>.qcow2   shared read-only base images (see crate::image)
//! <state_dir>/vms/<id>/record.json         the VM's spec, disk size and, while it runs, pid,
//!                                          accelerator and cgroup: what a restarted node needs
//! <state_dir>/vms/<id>/qmp.sock            QMP monitor (created by QEMU)
//! <state_dir>/vms/<id>/serial.log          serial console (append mode, truncated at start)
//! <state_dir>/vms/<id>/qemu.log            QEMU's own stderr
//! <state_dir>/vms/<id>/disk.qcow2          overlay over a base image, when the VM has a disk
//! ```
//!
//! QEMU runs in its own process group and is not killed when the node exits, so a restarted
//! node re-attaches: [`QemuBackend::open`] reads every record, checks that the recorded pid is
//! still the QEMU of that VM (its command line names the VM dir), reconnects QMP and reports it
//! attached; a VM whose QEMU is gone, or does not answer QMP (then it is killed), is reported
//! lost and cleaned up. Nothing is left running that no record names.
//!
//! # Confinement
//!
//! - `-sandbox on,obsolete=deny,spawn=deny,resourcecontrol=deny` (seccomp), plus
//!   `elevateprivileges=deny` when the node is not root. When the node is root, QEMU drops to
//!   an unprivileged user with `-runas` (`dwcp-guest` if that user exists, else `nobody`) and
//!   `-chroot`s into the VM's own directory after opening its files; QEMU 7.2 installs its
//!   seccomp filter before it changes uid, so `elevateprivileges` must stay allowed there (the
//!   uid change itself is what removes root).
//! - QEMU sees no host path but its VM dir: kernel, initrd and disk images are opened before
//!   the chroot, migration streams arrive as file descriptors passed over QMP.
//! - The disk's backing chain is given with `-blockdev`, not taken from the overlay header, and
//!   the base image is hashed before every boot.
//! - `-nic none`: guests have no network yet.
//! - cgroups: see [`cgroup`]; memory cap = guest RAM + `memory_overhead_mib`, CPU cap = vCPUs.
//!
//! # CPU model
//!
//! `qemu64` by default: a live migration needs the same CPUID on both ends, and the fleet mixes
//! Intel and AMD hosts of any age, some only able to run TCG. `qemu64` is the one model that
//! TCG and every x86-64 KVM host can provide without missing features. A fleet known to be all
//! KVM on recent CPUs can set `cpu_model` to `Nehalem-v2` or another named model for SSE4 and
//! more; the model is per-node config, and nodes that disagree cannot migrate to each other.
//! `host`/`max` are refused: they differ per host and break migration (and abort on PVM).

pub mod cgroup;
pub mod probe;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::backend::{
    Accel, Backend, BackendInfo, BoxFuture, CgroupMode, MigrationChannel, MigrationParams,
    MigrationProgress, MigrationStatus,
};
use crate::error::{Error, QmpError};
use crate::image::{ImageStore, sha256_file};
use crate::qmp::{self, Qmp};
use crate::share::{DonatedShare, ShareUsage};
use crate::spec::{BootSource, VmId, VmInfo, VmSpec, VmState, VmStats};
use cgroup::VmCgroup;

/// Which accelerator to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AccelChoice {
    /// Probe KVM with a real guest; use TCG when it does not run.
    Auto,
    /// KVM or fail.
    Kvm,
    /// TCG without probing KVM.
    Tcg,
}

/// Which user QEMU runs as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunAs {
    /// As root: `dwcp-guest` if it exists, else `nobody`, with a chroot. Otherwise the node's
    /// own (already unprivileged) user.
    Auto,
    /// This user (needs a root node).
    User(String),
    /// The node's user, no privilege drop and no chroot.
    Current,
}

/// QEMU backend configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuConfig {
    /// `qemu-system-x86_64`.
    pub qemu_binary: PathBuf,
    /// `qemu-img`.
    pub qemu_img: PathBuf,
    /// Where VM dirs, records and images live.
    pub state_dir: PathBuf,
    /// What the volunteer lends.
    pub share: DonatedShare,
    /// Accelerator.
    pub accel: AccelChoice,
    /// Guest CPU model (see the module docs).
    pub cpu_model: String,
    /// QEMU's user.
    pub run_as: RunAs,
    /// QEMU overhead allowed above guest RAM in the VM's memory cgroup, MiB.
    pub memory_overhead_mib: u64,
    /// TCG translation cache size, MiB (bounds TCG's own memory).
    pub tcg_tb_size_mib: u64,
    /// Time the KVM probe guest gets.
    pub probe_timeout: Duration,
    /// Time QEMU gets to open its QMP socket.
    pub start_timeout: Duration,
    /// Use cgroups when the host offers them.
    pub cgroups: bool,
    /// Serial log size at which it is cut to half (checked every 2 s and on each call).
    pub serial_log_cap_bytes: u64,
}

impl QemuConfig {
    /// Defaults for a state dir and share.
    pub fn new(state_dir: impl Into<PathBuf>, share: DonatedShare) -> Self {
        QemuConfig {
            qemu_binary: "qemu-system-x86_64".into(),
            qemu_img: "qemu-img".into(),
            state_dir: state_dir.into(),
            share,
            accel: AccelChoice::Auto,
            cpu_model: "qemu64".into(),
            run_as: RunAs::Auto,
            memory_overhead_mib: 256,
            tcg_tb_size_mib: 32,
            probe_timeout: Duration::from_secs(5),
            start_timeout: Duration::from_secs(15),
            cgroups: true,
            serial_log_cap_bytes: 8 << 20,
        }
    }

    /// Checks the values.
    pub fn validate(self) -> Result<Self, Error> {
        let bad = |m: String| Err(Error::InvalidSpec(format!("qemu config: {m}")));
        if matches!(self.cpu_model.as_str(), "host" | "max") {
            return bad(format!(
                "cpu model '{}' differs per host and breaks migration; use a named model such as qemu64",
                self.cpu_model
            ));
        }
        if self.cpu_model.is_empty()
            || !self
                .cpu_model
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.+".contains(c))
        {
            return bad(format!(
                "cpu model '{}' is not a plain name",
                self.cpu_model
            ));
        }
        if !(8..=2048).contains(&self.tcg_tb_size_mib) {
            return bad("tcg_tb_size_mib must be 8..=2048".into());
        }
        if self.memory_overhead_mib < self.tcg_tb_size_mib + 64 {
            return bad("memory_overhead_mib must be at least tcg_tb_size_mib + 64".into());
        }
        if let Some(s) = self.state_dir.to_str() {
            if s.contains([',', ':']) || !self.state_dir.is_absolute() {
                return bad("state_dir must be an absolute path without ',' or ':'".into());
            }
        } else {
            return bad("state_dir must be UTF-8".into());
        }
        if let RunAs::User(u) = &self.run_as
            && u.is_empty()
        {
            return bad("run_as user is empty".into());
        }
        Ok(self)
    }
}

/// Record version written by this code.
const RECORD_VERSION: u32 = 1;
/// Largest record file accepted.
const MAX_RECORD_BYTES: u64 = 1 << 20;

/// What the state dir keeps per VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct VmRecord {
    version: u32,
    spec: VmSpec,
    disk_mib: u64,
    running: Option<RunRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct RunRecord {
    pid: u32,
    accel: Accel,
    cgroup: Option<VmCgroup>,
}

/// What [`QemuBackend::open`] found in the state dir.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// VMs whose QEMU was still running and answered QMP.
    pub attached: Vec<VmId>,
    /// VMs that were running and are gone (or were killed because they did not answer).
    pub lost: Vec<VmId>,
    /// VMs that were defined and not running.
    pub stopped: Vec<VmId>,
    /// Record files that could not be read, with the reason (left in place for the operator).
    pub unreadable: Vec<(PathBuf, String)>,
}

struct Vm {
    dir: PathBuf,
    rec: VmRecord,
    qmp: Option<Qmp>,
    migrating: bool,
}

struct Entry {
    vcpus: u32,
    memory_mib: u64,
    disk_mib: u64,
    vm: Arc<Mutex<Vm>>,
}

/// The QEMU backend.
pub struct QemuBackend {
    cfg: QemuConfig,
    accel: Accel,
    accel_reason: String,
    cgroup_mode: CgroupMode,
    run_as: Option<String>,
    cgroup_scope: String,
    version: String,
    images: ImageStore,
    vms: StdMutex<BTreeMap<VmId, Entry>>,
    serial_watchdog: tokio::task::JoinHandle<()>,
}

impl Drop for QemuBackend {
    fn drop(&mut self) {
        // VMs keep running (a restarted node re-attaches); only the watchdog stops.
        self.serial_watchdog.abort();
    }
}

/// Every few seconds, cuts serial logs that grew past the cap, so a guest that floods its
/// console cannot fill the host disk between two backend calls.
fn spawn_serial_watchdog(vms_dir: PathBuf, cap: u64) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let dir = vms_dir.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if let Ok(rd) = std::fs::read_dir(&dir) {
                    for e in rd.flatten() {
                        enforce_serial_cap(&e.path(), cap);
                    }
                }
            })
            .await;
        }
    })
}

impl std::fmt::Debug for QemuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuBackend")
            .field("accel", &self.accel)
            .field("cgroup_mode", &self.cgroup_mode)
            .field("run_as", &self.run_as)
            .finish_non_exhaustive()
    }
}

impl QemuBackend {
    /// Opens the backend: probes the accelerator, detects cgroups, and re-attaches to (or
    /// reports lost) every VM recorded in the state dir.
    pub async fn open(cfg: QemuConfig) -> Result<(Self, RecoveryReport), Error> {
        let cfg = cfg.validate()?;
        let vms_dir = cfg.state_dir.join("vms");
        std::fs::create_dir_all(&vms_dir)
            .map_err(|e| Error::io(format!("create {}", vms_dir.display()), e))?;
        let images = ImageStore::open(cfg.state_dir.join("images"), &cfg.qemu_img)?;
        let version = qemu_version(&cfg.qemu_binary).await?;
        let (accel, accel_reason) = choose_accel(&cfg).await?;
        tracing::info!(accel = accel.as_str(), reason = %accel_reason, "qemu accelerator");
        let cgroup_mode = if cfg.cgroups {
            cgroup::detect()
        } else {
            CgroupMode::Unavailable {
                reason: "disabled in config".into(),
            }
        };
        if let CgroupMode::Unavailable { reason } = &cgroup_mode {
            tracing::warn!(%reason, "no cgroup caps for VMs; only -m/-smp bound them");
        }
        let run_as = resolve_run_as(&cfg.run_as)?;
        let cgroup_scope = {
            use sha2::Digest;
            let d: [u8; 32] =
                sha2::Sha256::digest(cfg.state_dir.as_os_str().as_encoded_bytes()).into();
            hex::encode(&d[..4])
        };
        let serial_watchdog = spawn_serial_watchdog(vms_dir.clone(), cfg.serial_log_cap_bytes);
        let backend = QemuBackend {
            serial_watchdog,
            cgroup_scope,
            cfg,
            accel,
            accel_reason,
            cgroup_mode,
            run_as,
            version,
            images,
            vms: StdMutex::new(BTreeMap::new()),
        };
        let report = backend.recover().await;
        Ok((backend, report))
    }

    /// Kills every QEMU recorded in `state_dir` and removes its cgroup, without QMP and
    /// without a backend (blocking). For emergency cleanup and for tests, whose VMs would
    /// otherwise outlive a failed test (QEMU is deliberately detached from the node). Returns
    /// how many processes were killed.
    pub fn kill_recorded(state_dir: &Path) -> usize {
        let mut killed = 0;
        let Ok(rd) = std::fs::read_dir(state_dir.join("vms")) else {
            return 0;
        };
        for e in rd.flatten() {
            let dir = e.path();
            let Ok(rec) = read_record(&dir.join("record.json")) else {
                continue;
            };
            let Some(run) = rec.running else { continue };
            if pid_is_vm(run.pid, &dir)
                && let Ok(p) = i32::try_from(run.pid)
                && nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), nix::sys::signal::SIGKILL)
                    .is_ok()
            {
                killed += 1;
                let t0 = Instant::now();
                while pid_is_vm(run.pid, &dir) && t0.elapsed() < Duration::from_secs(5) {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            cleanup_run(&dir, &run);
        }
        killed
    }

    /// The image store (import base images here, then name them in [`crate::DiskSpec`]).
    pub fn images(&self) -> &ImageStore {
        &self.images
    }

    /// What the defined VMs hold of the share.
    pub fn usage(&self) -> ShareUsage {
        let mut u = ShareUsage::default();
        for e in self.lock_map().values() {
            u.add(e.vcpus, e.memory_mib, e.disk_mib);
        }
        u
    }

    /// The VM's directory.
    pub fn vm_dir(&self, id: &VmId) -> PathBuf {
        self.cfg.state_dir.join("vms").join(id.as_str())
    }

    fn lock_map(&self) -> std::sync::MutexGuard<'_, BTreeMap<VmId, Entry>> {
        // A panic while holding this lock leaves plain data behind; keep going.
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, id: &VmId) -> Result<Arc<Mutex<Vm>>, Error> {
        self.lock_map()
            .get(id)
            .map(|e| e.vm.clone())
            .ok_or_else(|| Error::NotFound(id.clone()))
    }

    async fn recover(&self) -> RecoveryReport {
        let mut report = RecoveryReport::default();
        let vms_dir = self.cfg.state_dir.join("vms");
        let Ok(rd) = std::fs::read_dir(&vms_dir) else {
            return report;
        };
        let mut dirs: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        dirs.sort();
        for dir in dirs {
            let path = dir.join("record.json");
            let rec = match read_record(&path) {
                Ok(r) => r,
                Err(e) => {
                    report.unreadable.push((path, e.to_string()));
                    continue;
                }
            };
            let id = rec.spec.id.clone();
            let mut vm = Vm {
                dir: dir.clone(),
                rec,
                qmp: None,
                migrating: false,
            };
            if let Some(run) = vm.rec.running.clone() {
                let alive = pid_is_vm(run.pid, &dir);
                let qmp = if alive {
                    tokio::time::timeout(
                        Duration::from_secs(3),
                        Qmp::connect(&dir.join("qmp.sock")),
                    )
                    .await
                    .ok()
                    .and_then(Result::ok)
                } else {
                    None
                };
                match qmp {
                    Some(q) => {
                        vm.qmp = Some(q);
                        tracing::info!(vm = %id, pid = run.pid, "re-attached to running qemu");
                        report.attached.push(id.clone());
                    }
                    None => {
                        if alive {
                            tracing::warn!(vm = %id, pid = run.pid, "qemu does not answer qmp; killing it");
                            kill_vm_process(run.pid, &dir).await;
                        }
                        tracing::warn!(vm = %id, "vm lost while the node was away");
                        cleanup_run(&dir, &run);
                        vm.rec.running = None;
                        let _ = write_record(&dir, &vm.rec);
                        report.lost.push(id.clone());
                    }
                }
            } else {
                report.stopped.push(id.clone());
            }
            let entry = Entry {
                vcpus: vm.rec.spec.vcpus,
                memory_mib: vm.rec.spec.memory_mib,
                disk_mib: vm.rec.disk_mib,
                vm: Arc::new(Mutex::new(vm)),
            };
            self.lock_map().insert(id, entry);
        }
        report
    }

    async fn define_impl(&self, spec: VmSpec) -> Result<VmInfo, Error> {
        spec.validate()?;
        let disk_mib = match &spec.disk {
            None => 0,
            Some(d) => {
                let images = self.images.clone();
                let base = d.base.clone();
                let base_mib = blocking(move || images.base_size_mib(&base)).await?;
                d.size_mib.unwrap_or(base_mib).max(base_mib)
            }
        };
        let dir = self.vm_dir(&spec.id);
        let vm = Arc::new(Mutex::new(Vm {
            dir: dir.clone(),
            rec: VmRecord {
                version: RECORD_VERSION,
                spec: spec.clone(),
                disk_mib,
                running: None,
            },
            qmp: None,
            migrating: false,
        }));
        // Admission and reservation under one lock.
        {
            let mut map = self.lock_map();
            if map.contains_key(&spec.id) || dir.exists() {
                return Err(Error::AlreadyExists(spec.id.clone()));
            }
            let mut usage = ShareUsage::default();
            for e in map.values() {
                usage.add(e.vcpus, e.memory_mib, e.disk_mib);
            }
            self.cfg.share.admit(&spec, disk_mib, &usage)?;
            map.insert(
                spec.id.clone(),
                Entry {
                    vcpus: spec.vcpus,
                    memory_mib: spec.memory_mib,
                    disk_mib,
                    vm: vm.clone(),
                },
            );
        }
        let res = self.prepare_dir(&spec, &dir, disk_mib).await;
        if let Err(e) = res {
            self.lock_map().remove(&spec.id);
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        let guard = vm.lock().await;
        Ok(info_of(&guard, VmState::Defined))
    }

    async fn prepare_dir(&self, spec: &VmSpec, dir: &Path, disk_mib: u64) -> Result<(), Error> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        if let Some(d) = &spec.disk {
            let images = self.images.clone();
            let base = d.base.clone();
            let dst = dir.join("disk.qcow2");
            blocking(move || images.create_overlay(&base, &dst, Some(disk_mib))).await?;
        }
        write_record(
            dir,
            &VmRecord {
                version: RECORD_VERSION,
                spec: spec.clone(),
                disk_mib,
                running: None,
            },
        )
    }

    /// Spawns QEMU for `vm` (which must not run) and connects QMP.
    async fn spawn(&self, vm: &mut Vm, incoming: bool) -> Result<(), Error> {
        let id = vm.rec.spec.id.clone();
        // A VM whose QEMU went away (guest power-off, crash) can be started again.
        if let Some(run) = vm.rec.running.clone()
            && !pid_is_vm(run.pid, &vm.dir)
        {
            cleanup_run(&vm.dir, &run);
            vm.rec.running = None;
            vm.qmp = None;
        }
        if vm.rec.running.is_some() {
            return Err(Error::WrongState {
                vm: id,
                state: "running".into(),
                op: "start",
            });
        }
        // Verify everything QEMU will read before it reads it.
        let spec = vm.rec.spec.clone();
        let images = self.images.clone();
        let base_path = blocking(move || verify_boot_inputs(&spec, &images)).await?;

        let dir = vm.dir.clone();
        let qmp_path = dir.join("qmp.sock");
        let _ = std::fs::remove_file(&qmp_path);
        for f in ["serial.log", "qemu.log"] {
            std::fs::write(dir.join(f), b"")
                .map_err(|e| Error::io(format!("truncate {f} of {id}"), e))?;
        }
        let memory_cap = (vm.rec.spec.memory_mib + self.cfg.memory_overhead_mib) << 20;
        let cg = cgroup::create(
            &self.cgroup_mode,
            &id,
            &self.cgroup_scope,
            memory_cap,
            vm.rec.spec.vcpus,
        )?;
        let args = qemu_args(&QemuArgs {
            cfg: &self.cfg,
            spec: &vm.rec.spec,
            dir: &dir,
            accel: self.accel,
            run_as: self.run_as.as_deref(),
            base: base_path.as_deref(),
            incoming,
        });
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.join("qemu.log"))
            .map_err(|e| Error::io("open qemu.log", e))?;
        let log2 = log.try_clone().map_err(|e| Error::io("dup qemu.log", e))?;
        let mut cmd = match &cg {
            Some(cg) => {
                let procs: Vec<String> = cg
                    .procs_files
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect();
                let mut c = tokio::process::Command::new("/bin/sh");
                c.arg("-c")
                    .arg(
                        "IFS=:; for f in $DWCP_CGROUP_PROCS; do echo $$ > \"$f\" || exit 125; done; \
                         unset IFS DWCP_CGROUP_PROCS; exec \"$@\"",
                    )
                    .arg("dwcp-qemu")
                    .arg(&self.cfg.qemu_binary)
                    .args(&args)
                    .env("DWCP_CGROUP_PROCS", procs.join(":"));
                c
            }
            None => {
                let mut c = tokio::process::Command::new(&self.cfg.qemu_binary);
                c.args(&args);
                c
            }
        };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .process_group(0)
            .kill_on_drop(false);
        let mut child = cmd.spawn().map_err(|e| Error::Spawn {
            vm: id.clone(),
            detail: format!("cannot run {}: {e}", self.cfg.qemu_binary.display()),
        })?;
        let Some(pid) = child.id() else {
            return Err(Error::Spawn {
                vm: id,
                detail: "qemu exited at once".into(),
            });
        };
        let run = RunRecord {
            pid,
            accel: self.accel,
            cgroup: cg,
        };
        vm.rec.running = Some(run.clone());
        write_record(&dir, &vm.rec)?;
        // Reap the child whenever it exits; liveness is read from /proc, which also works for
        // re-attached VMs that are not our children.
        let (exit_tx, mut exit_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let st = child.wait().await;
            let _ = exit_tx.send(st);
        });
        let started = Instant::now();
        let qmp = loop {
            if let Ok(st) = exit_rx.try_recv() {
                let detail = format!(
                    "exited ({}) before its monitor came up: {}",
                    st.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
                    tail_file(&dir.join("qemu.log"), 2000)
                );
                cleanup_run(&dir, &run);
                vm.rec.running = None;
                let _ = write_record(&dir, &vm.rec);
                return Err(Error::Spawn { vm: id, detail });
            }
            if qmp_path.exists()
                && let Ok(q) = Qmp::connect(&qmp_path).await
            {
                break q;
            }
            if started.elapsed() > self.cfg.start_timeout {
                kill_vm_process(pid, &dir).await;
                cleanup_run(&dir, &run);
                vm.rec.running = None;
                let _ = write_record(&dir, &vm.rec);
                return Err(Error::Spawn {
                    vm: id,
                    detail: format!(
                        "no qmp socket within {} ms: {}",
                        self.cfg.start_timeout.as_millis(),
                        tail_file(&dir.join("qemu.log"), 2000)
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        vm.qmp = Some(qmp);
        vm.migrating = false;
        tracing::info!(vm = %id, pid, accel = self.accel.as_str(), incoming, "qemu started");
        Ok(())
    }

    async fn start_impl(&self, id: &VmId) -> Result<(), Error> {
        let vm = self.get(id)?;
        let mut vm = vm.lock().await;
        self.spawn(&mut vm, false).await
    }

    async fn pause_resume(&self, id: &VmId, pause: bool) -> Result<(), Error> {
        let vm = self.get(id)?;
        let mut vm = vm.lock().await;
        let q = running_qmp(&mut vm, if pause { "pause" } else { "resume" })?;
        let r = if pause {
            q.execute(&qmp::Stop {}).await
        } else {
            q.execute(&qmp::Cont {}).await
        };
        r.map(|_| ()).map_err(|e| qmp_err(id, e))
    }

    /// Ends the QEMU process of `vm`: ACPI power button, then `quit`, then SIGKILL.
    async fn power_off(&self, vm: &mut Vm, grace: Duration) -> Result<(), Error> {
        let Some(run) = vm.rec.running.clone() else {
            return Ok(());
        };
        let dir = vm.dir.clone();
        if let Some(q) = vm.qmp.as_mut() {
            if !grace.is_zero() && q.execute(&qmp::SystemPowerdown {}).await.is_ok() {
                wait_exit(run.pid, &dir, grace).await;
            }
            if pid_is_vm(run.pid, &dir) {
                let _ = q
                    .execute_with_timeout(&qmp::Quit {}, Duration::from_secs(2))
                    .await;
                wait_exit(run.pid, &dir, Duration::from_secs(3)).await;
            }
        }
        if pid_is_vm(run.pid, &dir) {
            kill_vm_process(run.pid, &dir).await;
        }
        vm.qmp = None;
        vm.migrating = false;
        cleanup_run(&dir, &run);
        vm.rec.running = None;
        write_record(&dir, &vm.rec)
    }

    async fn stop_impl(&self, id: &VmId, grace: Duration) -> Result<(), Error> {
        let vm = self.get(id)?;
        let mut vm = vm.lock().await;
        self.power_off(&mut vm, grace).await
    }

    async fn destroy_impl(&self, id: &VmId) -> Result<(), Error> {
        let vm = self.get(id)?;
        let mut vm = vm.lock().await;
        self.power_off(&mut vm, Duration::ZERO).await?;
        std::fs::remove_dir_all(&vm.dir)
            .map_err(|e| Error::io(format!("remove {}", vm.dir.display()), e))?;
        self.lock_map().remove(id);
        tracing::info!(vm = %id, "vm destroyed");
        Ok(())
    }

    async fn state_of(&self, vm: &mut Vm) -> VmState {
        let Some(run) = vm.rec.running.clone() else {
            return VmState::Defined;
        };
        enforce_serial_cap(&vm.dir, self.cfg.serial_log_cap_bytes);
        if !pid_is_vm(run.pid, &vm.dir) {
            return VmState::Lost;
        }
        let Some(q) = vm.qmp.as_mut() else {
            return VmState::Lost;
        };
        match q.execute(&qmp::QueryStatus {}).await {
            Ok(s) => {
                let st = map_status(&s.status);
                if vm.migrating && st == VmState::Running {
                    VmState::Migrating
                } else {
                    st
                }
            }
            Err(_) => VmState::Lost,
        }
    }

    async fn inspect_impl(&self, id: &VmId) -> Result<VmInfo, Error> {
        let vm = self.get(id)?;
        let mut vm = vm.lock().await;
        let st = self.state_of(&mut vm).await;
        Ok(info_of(&vm, st))
    }

    async fn list_impl(&self) -> Result<Vec<VmInfo>, Error> {
        let vms: Vec<Arc<Mutex<Vm>>> = self.lock_map().values().map(|e| e.vm.clone()).collect();
        let mut out = Vec::with_capacity(vms.len());
        for vm in vms {
            let mut vm = vm.lock().await;
            let st = self.state_of(&mut vm).await;
            out.push(info_of(&vm, st));
        }
        Ok(out)
    }

    async fn stats_impl(&self, id: &VmId) -> Result<VmStats, Error> {
        let vm = self.get(id)?;
        let mut vm = vm.lock().await;
        let run = vm.rec.running.clone().ok_or_else(|| Error::WrongState {
            vm: id.clone(),
            state: "defined".into(),
            op: "stats",
        })?;
        let memory_bytes = vm.rec.spec.memory_mib << 20;
        let q = running_qmp(&mut vm, "stats")?;
        let cpus = q
            .execute(&qmp::QueryCpusFast {})
            .await
            .map_err(|e| qmp_err(id, e))?;
        let mut vcpu_time_ns = 0u64;
        for c in &cpus {
            vcpu_time_ns += thread_cpu_ns(run.pid, c.thread_id).unwrap_or(0);
        }
        let dirty_rate_mib_per_s = match q.execute(&qmp::QueryDirtyRate {}).await {
            Ok(d) => {
                if d.status != "measuring" {
                    // Start the next 1 s measurement; its result shows up on a later call.
                    let _ = q.execute(&qmp::CalcDirtyRate { calc_time: 1 }).await;
                }
                if d.status == "measured" {
                    d.dirty_rate.and_then(|r| u64::try_from(r).ok())
                } else {
                    None
                }
            }
            Err(_) => None,
        };
        Ok(VmStats {
            vcpu_time_ns,
            memory_bytes,
            host_rss_bytes: proc_status_kib(run.pid, "VmRSS:").map(|k| k * 1024),
            cgroup_memory_peak_bytes: run.cgroup.as_ref().and_then(VmCgroup::memory_peak),
            dirty_rate_mib_per_s,
        })
    }

    async fn serial_impl(&self, id: &VmId, max_bytes: usize) -> Result<String, Error> {
        let dir = self.vm_dir(id);
        if !self.lock_map().contains_key(id) {
            return Err(Error::NotFound(id.clone()));
        }
        enforce_serial_cap(&dir, self.cfg.serial_log_cap_bytes);
        Ok(tail_file(&dir.join("serial.log"), max_bytes))
    }

    async fn incoming_impl(&self, id: &VmId, channel: MigrationChannel) -> Result<(), Error> {
        let vm = self.get(id)?;
        let mut vm = vm.lock().await;
        self.spawn(&mut vm, true).await?;
        let q = running_qmp(&mut vm, "start_incoming")?;
        let uri = pass_channel(q, channel, "dwcp-mig-in")
            .await
            .map_err(|e| qmp_err(id, e))?;
        q.execute(&qmp::MigrateIncoming { uri })
            .await
            .map_err(|e| qmp_err(id, e))?;
        Ok(())
    }

    async fn migrate_impl(&self, id: &VmId, channel: MigrationChannel) -> Result<(), Error> {
        let vm = self.get(id)?;
        let mut vm = vm.lock().await;
        let q = running_qmp(&mut vm, "migrate")?;
        let uri = pass_channel(q, channel, "dwcp-mig-out")
            .await
            .map_err(|e| qmp_err(id, e))?;
        q.execute(&qmp::Migrate { uri })
            .await
            .map_err(|e| qmp_err(id, e))?;
        vm.migrating = true;
        Ok(())
    }

    async fn progress_impl(&self, id: &VmId) -> Result<MigrationProgress, Error> {
        let vm = self.get(id)?;
        let mut vm = vm.lock().await;
        let q = running_qmp(&mut vm, "migration_progress")?;
        let m = q
            .execute(&qmp::QueryMigrate {})
            .await
            .map_err(|e| qmp_err(id, e))?;
        let status = m
            .status
            .as_deref()
            .map(MigrationStatus::from_qemu)
            .unwrap_or(MigrationStatus::None);
        if status.is_finished() {
            vm.migrating = false;
        }
        let ram = m.ram.unwrap_or_default();
        Ok(MigrationProgress {
            status,
            transferred_bytes: ram.transferred,
            remaining_bytes: ram.remaining,
            total_bytes: ram.total,
            dirty_pages_per_s: ram.dirty_pages_rate,
            passes: ram.dirty_sync_count,
            elapsed_ms: m.total_time.unwrap_or(0),
            downtime_ms: m.downtime.or(m.expected_downtime),
            error: m.error_desc,
        })
    }

    async fn params_impl(&self, id: &VmId, p: MigrationParams) -> Result<(), Error> {
        let vm = self.get(id)?;
        let mut vm = vm.lock().await;
        let q = running_qmp(&mut vm, "set_migration_params")?;
        q.execute(&qmp::MigrateSetParameters {
            downtime_limit: p.downtime_limit_ms,
            max_bandwidth: p.max_bandwidth_bytes_per_s,
        })
        .await
        .map_err(|e| qmp_err(id, e))?;
        Ok(())
    }

    async fn cancel_impl(&self, id: &VmId) -> Result<(), Error> {
        let vm = self.get(id)?;
        let mut vm = vm.lock().await;
        let q = running_qmp(&mut vm, "cancel_migration")?;
        q.execute(&qmp::MigrateCancel {})
            .await
            .map_err(|e| qmp_err(id, e))?;
        Ok(())
    }
}

impl Backend for QemuBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            kind: "qemu".into(),
            accel: Some(self.accel),
            accel_reason: self.accel_reason.clone(),
            cpu_model: self.cfg.cpu_model.clone(),
            cgroup: self.cgroup_mode.clone(),
            version: self.version.clone(),
        }
    }
    fn define(&self, spec: VmSpec) -> BoxFuture<'_, VmInfo> {
        Box::pin(self.define_impl(spec))
    }
    fn start<'a>(&'a self, id: &'a VmId) -> BoxFuture<'a, ()> {
        Box::pin(self.start_impl(id))
    }
    fn pause<'a>(&'a self, id: &'a VmId) -> BoxFuture<'a, ()> {
        Box::pin(self.pause_resume(id, true))
    }
    fn resume<'a>(&'a self, id: &'a VmId) -> BoxFuture<'a, ()> {
        Box::pin(self.pause_resume(id, false))
    }
    fn stop<'a>(&'a self, id: &'a VmId, grace: Duration) -> BoxFuture<'a, ()> {
        Box::pin(self.stop_impl(id, grace))
    }
    fn destroy<'a>(&'a self, id: &'a VmId) -> BoxFuture<'a, ()> {
        Box::pin(self.destroy_impl(id))
    }
    fn list(&self) -> BoxFuture<'_, Vec<VmInfo>> {
        Box::pin(self.list_impl())
    }
    fn inspect<'a>(&'a self, id: &'a VmId) -> BoxFuture<'a, VmInfo> {
        Box::pin(self.inspect_impl(id))
    }
    fn stats<'a>(&'a self, id: &'a VmId) -> BoxFuture<'a, VmStats> {
        Box::pin(self.stats_impl(id))
    }
    fn serial_log<'a>(&'a self, id: &'a VmId, max_bytes: usize) -> BoxFuture<'a, String> {
        Box::pin(self.serial_impl(id, max_bytes))
    }
    fn start_incoming<'a>(&'a self, id: &'a VmId, channel: MigrationChannel) -> BoxFuture<'a, ()> {
        Box::pin(self.incoming_impl(id, channel))
    }
    fn migrate<'a>(&'a self, id: &'a VmId, channel: MigrationChannel) -> BoxFuture<'a, ()> {
        Box::pin(self.migrate_impl(id, channel))
    }
    fn migration_progress<'a>(&'a self, id: &'a VmId) -> BoxFuture<'a, MigrationProgress> {
        Box::pin(self.progress_impl(id))
    }
    fn set_migration_params<'a>(
        &'a self,
        id: &'a VmId,
        params: MigrationParams,
    ) -> BoxFuture<'a, ()> {
        Box::pin(self.params_impl(id, params))
    }
    fn cancel_migration<'a>(&'a self, id: &'a VmId) -> BoxFuture<'a, ()> {
        Box::pin(self.cancel_impl(id))
    }
}

// ----- helpers ---------------------------------------------------------------------------

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::io("blocking task", std::io::Error::other(e.to_string())))?
}

fn qmp_err(id: &VmId, source: QmpError) -> Error {
    Error::Qmp {
        vm: id.clone(),
        source,
    }
}

fn running_qmp<'v>(vm: &'v mut Vm, op: &'static str) -> Result<&'v mut Qmp, Error> {
    let id = vm.rec.spec.id.clone();
    if vm.rec.running.is_none() {
        return Err(Error::WrongState {
            vm: id,
            state: "defined".into(),
            op,
        });
    }
    vm.qmp.as_mut().ok_or(Error::WrongState {
        vm: id,
        state: "lost".into(),
        op,
    })
}

async fn pass_channel(
    q: &mut Qmp,
    channel: MigrationChannel,
    name: &str,
) -> Result<String, QmpError> {
    match channel {
        MigrationChannel::Fd(fd) => {
            q.execute_with_fd(
                &qmp::GetFd {
                    fdname: name.into(),
                },
                fd.as_fd(),
            )
            .await?;
            // QEMU now holds its own copy; ours closes here.
            drop(fd);
            Ok(format!("fd:{name}"))
        }
        MigrationChannel::Uri(u) => Ok(u),
    }
}

fn map_status(s: &str) -> VmState {
    match s {
        "running" => VmState::Running,
        "inmigrate" => VmState::Incoming,
        "finish-migrate" => VmState::Migrating,
        "paused" | "suspended" | "postmigrate" | "prelaunch" | "restore-vm" | "save-vm"
        | "debug" | "watchdog" | "io-error" | "colo" => VmState::Paused,
        "shutdown" | "guest-panicked" | "internal-error" => VmState::Lost,
        _ => VmState::Paused,
    }
}

fn info_of(vm: &Vm, state: VmState) -> VmInfo {
    VmInfo {
        id: vm.rec.spec.id.clone(),
        state,
        vcpus: vm.rec.spec.vcpus,
        memory_mib: vm.rec.spec.memory_mib,
        pid: vm.rec.running.as_ref().map(|r| r.pid),
    }
}

fn read_record(path: &Path) -> Result<VmRecord, Error> {
    let rec_err = |detail: String| Error::Record {
        path: path.to_owned(),
        detail,
    };
    let f = std::fs::File::open(path).map_err(|e| rec_err(e.to_string()))?;
    let mut buf = Vec::new();
    f.take(MAX_RECORD_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(|e| rec_err(e.to_string()))?;
    if buf.len() as u64 > MAX_RECORD_BYTES {
        return Err(rec_err(format!("larger than {MAX_RECORD_BYTES} bytes")));
    }
    let rec: VmRecord = serde_json::from_slice(&buf).map_err(|e| rec_err(e.to_string()))?;
    if rec.version != RECORD_VERSION {
        return Err(rec_err(format!("unknown record version {}", rec.version)));
    }
    let dir_name = path
        .parent()
        .and_then(Path::file_name)
        .and_then(|n| n.to_str());
    if dir_name != Some(rec.spec.id.as_str()) {
        return Err(rec_err(format!(
            "record of vm '{}' is in the wrong directory",
            rec.spec.id
        )));
    }
    Ok(rec)
}

fn write_record(dir: &Path, rec: &VmRecord) -> Result<(), Error> {
    let path = dir.join("record.json");
    let tmp = dir.join("record.json.tmp");
    let bytes = serde_json::to_vec_pretty(rec).map_err(|e| Error::Record {
        path: path.clone(),
        detail: e.to_string(),
    })?;
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(format!("write {}", tmp.display()), e))?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::io(format!("write {}", path.display()), e))
}

/// Whether `pid` is alive and is the QEMU of the VM in `dir` (guards against pid reuse).
fn pid_is_vm(pid: u32, dir: &Path) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // State is the field after the parenthesised command name.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    if matches!(state, Some("Z") | Some("X") | None) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let needle = dir.join("qmp.sock");
    let needle = needle.to_string_lossy();
    cmdline
        .split(|&b| b == 0)
        .any(|arg| String::from_utf8_lossy(arg).contains(needle.as_ref()))
}

async fn wait_exit(pid: u32, dir: &Path, timeout: Duration) -> bool {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if !pid_is_vm(pid, dir) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    !pid_is_vm(pid, dir)
}

async fn kill_vm_process(pid: u32, dir: &Path) {
    if !pid_is_vm(pid, dir) {
        return;
    }
    if let Ok(p) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), nix::sys::signal::SIGKILL);
    }
    wait_exit(pid, dir, Duration::from_secs(5)).await;
}

fn cleanup_run(dir: &Path, run: &RunRecord) {
    let _ = std::fs::remove_file(dir.join("qmp.sock"));
    if let Some(cg) = &run.cgroup
        && let Err(e) = cg.remove()
    {
        tracing::warn!(error = %e, "cgroup not removed");
    }
}

fn tail_file(path: &Path, max: usize) -> String {
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(max as u64);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut buf = Vec::with_capacity(max.min(1 << 20));
    let _ = f.take(max as u64).read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// Cuts a serial log that grew past `cap` (QEMU writes it in append mode, so it continues at
/// the new end). Keeps the guest from filling the host disk through its console.
fn enforce_serial_cap(dir: &Path, cap: u64) {
    let p = dir.join("serial.log");
    if std::fs::metadata(&p)
        .map(|m| m.len() > cap)
        .unwrap_or(false)
    {
        let keep = tail_file(&p, usize::try_from(cap / 2).unwrap_or(usize::MAX));
        let _ = std::fs::write(&p, keep);
    }
}

fn proc_status_kib(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

fn thread_cpu_ns(pid: u32, tid: u64) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ')' field 0 is state (field 3 overall); utime/stime are fields 14/15 overall.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|v| u64::try_from(v).ok())
        .filter(|&v| v > 0)
        .unwrap_or(100);
    Some((utime + stime) * 1_000_000_000 / hz)
}

fn verify_boot_inputs(spec: &VmSpec, images: &ImageStore) -> Result<Option<PathBuf>, Error> {
    if let BootSource::Kernel {
        kernel,
        kernel_sha256,
        initrd,
        initrd_sha256,
        ..
    } = &spec.boot
    {
        let pairs = [
            (Some(kernel), kernel_sha256.as_ref()),
            (initrd.as_ref(), initrd_sha256.as_ref()),
        ];
        for (file, want) in pairs {
            let Some(file) = file else { continue };
            if !file.is_file() {
                return Err(Error::Image {
                    path: file.clone(),
                    detail: "boot file missing".into(),
                });
            }
            if let Some(want) = want {
                let got = sha256_file(file)?;
                if !got.eq_ignore_ascii_case(want) {
                    return Err(Error::Image {
                        path: file.clone(),
                        detail: format!("content hash is {got}, expected {want}: refusing to boot"),
                    });
                }
            }
        }
    }
    match &spec.disk {
        Some(d) => images.verify(&d.base).map(Some),
        None => Ok(None),
    }
}

async fn qemu_version(qemu: &Path) -> Result<String, Error> {
    let out = tokio::process::Command::new(qemu)
        .arg("--version")
        .output()
        .await
        .map_err(|e| Error::io(format!("run {} --version", qemu.display()), e))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned())
}

async fn choose_accel(cfg: &QemuConfig) -> Result<(Accel, String), Error> {
    let work = cfg.state_dir.clone();
    match cfg.accel {
        AccelChoice::Tcg => Ok((Accel::Tcg, "tcg chosen in config".into())),
        AccelChoice::Kvm | AccelChoice::Auto => {
            let p = probe::probe(
                &cfg.qemu_binary,
                Accel::Kvm,
                &cfg.cpu_model,
                &work,
                cfg.probe_timeout,
            )
            .await;
            if p.ok {
                Ok((Accel::Kvm, p.detail))
            } else if cfg.accel == AccelChoice::Kvm {
                Err(Error::KvmUnusable(p.detail))
            } else {
                tracing::warn!(reason = %p.detail, "kvm unusable, falling back to tcg");
                Ok((
                    Accel::Tcg,
                    format!("kvm unusable ({}); using tcg", p.detail),
                ))
            }
        }
    }
}

fn resolve_run_as(r: &RunAs) -> Result<Option<String>, Error> {
    let root = nix::unistd::geteuid().is_root();
    match r {
        RunAs::Current => Ok(None),
        RunAs::User(u) => {
            if !root {
                return Err(Error::InvalidSpec(format!(
                    "run_as user '{u}' needs the node to run as root"
                )));
            }
            match nix::unistd::User::from_name(u) {
                Ok(Some(_)) => Ok(Some(u.clone())),
                _ => Err(Error::InvalidSpec(format!(
                    "run_as user '{u}' does not exist"
                ))),
            }
        }
        RunAs::Auto => {
            if !root {
                return Ok(None);
            }
            for u in ["dwcp-guest", "nobody"] {
                if let Ok(Some(_)) = nix::unistd::User::from_name(u) {
                    return Ok(Some(u.into()));
                }
            }
            Err(Error::InvalidSpec(
                "node runs as root but neither user dwcp-guest nor nobody exists".into(),
            ))
        }
    }
}

struct QemuArgs<'a> {
    cfg: &'a QemuConfig,
    spec: &'a VmSpec,
    dir: &'a Path,
    accel: Accel,
    run_as: Option<&'a str>,
    base: Option<&'a Path>,
    incoming: bool,
}

/// The QEMU command line for a VM (everything after the binary).
fn qemu_args(a: &QemuArgs<'_>) -> Vec<OsString> {
    let mut v: Vec<OsString> = Vec::new();
    let mut push = |s: &str| v.push(s.into());
    let dir = a.dir.display().to_string();
    push("-name");
    push(&format!("guest={},debug-threads=on", a.spec.id));
    push("-machine");
    push("pc");
    push("-accel");
    match a.accel {
        Accel::Kvm => push("kvm"),
        Accel::Tcg => push(&format!("tcg,tb-size={}", a.cfg.tcg_tb_size_mib)),
    }
    push("-cpu");
    push(&a.cfg.cpu_model);
    push("-m");
    push(&a.spec.memory_mib.to_string());
    push("-smp");
    push(&a.spec.vcpus.to_string());
    for s in [
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-nic",
        "none",
    ] {
        push(s);
    }
    push("-chardev");
    push(&format!("file,id=serial0,path={dir}/serial.log,append=on"));
    push("-serial");
    push("chardev:serial0");
    push("-qmp");
    push(&format!("unix:{dir}/qmp.sock,server=on,wait=off"));
    push("-sandbox");
    if a.run_as.is_some() {
        push("on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny");
    } else {
        push("on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny");
    }
    if let Some(u) = a.run_as {
        push("-runas");
        push(u);
        push("-chroot");
        push(&dir);
    }
    if let BootSource::Kernel {
        kernel,
        initrd,
        cmdline,
        ..
    } = &a.spec.boot
    {
        push("-kernel");
        push(&kernel.display().to_string());
        if let Some(i) = initrd {
            push("-initrd");
            push(&i.display().to_string());
        }
        push("-append");
        push(cmdline);
    }
    if let Some(base) = a.base {
        push("-blockdev");
        push(&format!(
            "driver=file,filename={},node-name=base-file,read-only=on",
            base.display()
        ));
        push("-blockdev");
        push("driver=qcow2,file=base-file,node-name=base,read-only=on");
        push("-blockdev");
        push(&format!(
            "driver=file,filename={dir}/disk.qcow2,node-name=top-file"
        ));
        push("-blockdev");
        push("driver=qcow2,file=top-file,backing=base,node-name=top");
        push("-device");
        push("virtio-blk-pci,drive=top");
    }
    if a.incoming {
        push("-incoming");
        push("defer");
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share() -> DonatedShare {
        DonatedShare {
            vcpus: 2,
            memory_mib: 1024,
            disk_mib: 1024,
        }
    }

    #[test]
    fn config_refuses_host_cpu_and_bad_paths() {
        let c = QemuConfig::new("/tmp/x", share());
        assert!(c.clone().validate().is_ok());
        let mut h = c.clone();
        h.cpu_model = "host".into();
        assert!(
            h.validate()
                .unwrap_err()
                .to_string()
                .contains("breaks migration")
        );
        let mut p = c.clone();
        p.state_dir = "/tmp/a,b".into();
        assert!(p.validate().is_err());
        let mut r = c;
        r.state_dir = "relative".into();
        assert!(r.validate().is_err());
    }

    #[test]
    fn command_line_is_confined() {
        let cfg = QemuConfig::new("/var/lib/dwcp", share());
        let spec = VmSpec::kernel_boot(
            VmId::new("vm-1").unwrap(),
            2,
            256,
            "/k/vmlinuz".into(),
            Some("/k/initrd".into()),
            "console=ttyS0",
        );
        let dir = PathBuf::from("/var/lib/dwcp/vms/vm-1");
        let base = PathBuf::from("/var/lib/dwcp/images/base/ab.qcow2");
        let args = qemu_args(&QemuArgs {
            cfg: &cfg,
            spec: &spec,
            dir: &dir,
            accel: Accel::Tcg,
            run_as: Some("nobody"),
            base: Some(&base),
            incoming: true,
        });
        let s: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let after = |flag: &str| {
            s.iter()
                .position(|a| a == flag)
                .map(|i| s[i + 1].clone())
                .unwrap_or_default()
        };
        assert_eq!(after("-cpu"), "qemu64");
        assert_eq!(after("-accel"), "tcg,tb-size=32");
        assert_eq!(after("-m"), "256");
        assert_eq!(after("-smp"), "2");
        assert_eq!(after("-runas"), "nobody");
        assert_eq!(after("-chroot"), "/var/lib/dwcp/vms/vm-1");
        assert_eq!(after("-nic"), "none");
        assert_eq!(after("-incoming"), "defer");
        assert!(after("-sandbox").contains("spawn=deny"));
        assert!(
            s.iter()
                .any(|a| a == "driver=qcow2,file=top-file,backing=base,node-name=top")
        );
        // Without a user change, privileges cannot be raised either.
        let args = qemu_args(&QemuArgs {
            cfg: &cfg,
            spec: &spec,
            dir: &dir,
            accel: Accel::Kvm,
            run_as: None,
            base: None,
            incoming: false,
        });
        let s: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(s.iter().any(|a| a.contains("elevateprivileges=deny")));
        assert!(
            !s.iter()
                .any(|a| a == "-runas" || a == "-chroot" || a == "-incoming")
        );
        assert!(s.iter().any(|a| a == "kvm"));
    }

    #[test]
    fn serial_log_is_cut_to_its_tail() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("serial.log");
        let mut text = String::new();
        for i in 0..2000 {
            text.push_str(&format!("tick {i}\n"));
        }
        std::fs::write(&p, &text).unwrap();
        enforce_serial_cap(dir.path(), 4096);
        let kept = std::fs::read_to_string(&p).unwrap();
        assert!(kept.len() <= 2048, "{}", kept.len());
        assert!(kept.ends_with("tick 1999\n"));
        // Under the cap nothing changes.
        enforce_serial_cap(dir.path(), 1 << 20);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), kept);
    }

    #[test]
    fn status_mapping() {
        assert_eq!(map_status("running"), VmState::Running);
        assert_eq!(map_status("paused"), VmState::Paused);
        assert_eq!(map_status("postmigrate"), VmState::Paused);
        assert_eq!(map_status("inmigrate"), VmState::Incoming);
        assert_eq!(map_status("shutdown"), VmState::Lost);
    }

    #[test]
    fn records_round_trip_and_reject_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let vm_dir = dir.path().join("vm-1");
        std::fs::create_dir(&vm_dir).unwrap();
        let rec = VmRecord {
            version: RECORD_VERSION,
            spec: VmSpec::kernel_boot(VmId::new("vm-1").unwrap(), 1, 64, "/k".into(), None, ""),
            disk_mib: 0,
            running: Some(RunRecord {
                pid: 42,
                accel: Accel::Tcg,
                cgroup: None,
            }),
        };
        write_record(&vm_dir, &rec).unwrap();
        assert_eq!(read_record(&vm_dir.join("record.json")).unwrap(), rec);
        // A record in another VM's dir is refused.
        let other = dir.path().join("vm-2");
        std::fs::create_dir(&other).unwrap();
        std::fs::copy(vm_dir.join("record.json"), other.join("record.json")).unwrap();
        assert!(read_record(&other.join("record.json")).is_err());
        std::fs::write(vm_dir.join("record.json"), b"{not json").unwrap();
        assert!(read_record(&vm_dir.join("record.json")).is_err());
        // Pid 42 is not this VM's QEMU.
        assert!(!pid_is_vm(42, &vm_dir));
        assert!(!pid_is_vm(std::process::id(), &vm_dir));
    }
}
