//! The node's VMs: the hypervisor backend (QEMU over QMP, `dwcp-hypervisor`) behind the local
//! API. The backend admits a VM only if it fits the volunteer's donated share, confines it,
//! and keeps a record per VM under `<data_dir>/hypervisor`, so a restarted node re-attaches to
//! its running guests through their QMP sockets (or reports them lost) and never leaves
//! orphans.

use std::{path::Path, sync::Arc, time::Duration};

use dwcp_hypervisor::{
    Backend, BackendInfo, BootSource, DiskSpec, Error as HvError, ImageId, VmSpec, VmState,
    qemu::{AccelChoice, QemuBackend, QemuConfig},
};
use dwcp_protocol::{
    NodeId,
    api::{VmConsole, VmCreateRequest, VmStatsView, VmView},
};
use tracing::{info, warn};

use crate::config::{AccelSetting, HypervisorSection};

/// Why a VM request failed; each maps to an HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// This node lends no VM capacity (disabled, or QEMU is missing).
    #[error("this node runs no VMs: {0}")]
    Unavailable(String),
    /// The request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// The VM does not fit what the volunteer donated.
    #[error("{0}")]
    DoesNotFit(String),
    /// No such VM.
    #[error("no vm {0}")]
    NotFound(String),
    /// The VM is in the wrong state for the action.
    #[error("{0}")]
    Conflict(String),
    /// The hypervisor failed.
    #[error("{0}")]
    Internal(String),
}

impl From<HvError> for VmError {
    fn from(e: HvError) -> Self {
        let msg = e.to_string();
        match e {
            HvError::Share(_) => VmError::DoesNotFit(msg),
            HvError::InvalidSpec(_) => VmError::BadRequest(msg),
            HvError::NotFound(id) => VmError::NotFound(id.to_string()),
            HvError::AlreadyExists(_) | HvError::WrongState { .. } => VmError::Conflict(msg),
            _ => VmError::Internal(msg),
        }
    }
}

/// What a VM action does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmAction {
    /// Pause the vCPUs.
    Pause,
    /// Resume them.
    Resume,
    /// Power off (ACPI, then kill after a grace period); keeps the definition and disk.
    Stop,
    /// Start a stopped VM again.
    Start,
    /// Stop and remove everything.
    Delete,
}

/// The node's VMs.
pub struct Vms {
    qemu: Option<Arc<QemuBackend>>,
    unavailable: String,
    info: Option<BackendInfo>,
    names: sled::Tree,
    node: NodeId,
}

impl std::fmt::Debug for Vms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vms")
            .field("info", &self.info)
            .field("unavailable", &self.unavailable)
            .finish()
    }
}

impl Vms {
    /// Opens the QEMU backend (probing the accelerator and re-attaching to running guests).
    /// Failure is not fatal: the node then runs without lending VM capacity and says why.
    pub async fn open(
        cfg: &HypervisorSection,
        data_dir: &Path,
        share: dwcp_hypervisor::DonatedShare,
        names: sled::Tree,
        node: NodeId,
    ) -> Self {
        if !cfg.enabled {
            return Self::unavailable("hypervisor.enabled is false".into(), names, node);
        }
        let mut qc = QemuConfig::new(data_dir.join("hypervisor"), share);
        qc.qemu_binary = cfg.qemu_path.clone();
        qc.qemu_img = cfg.qemu_img_path.clone();
        qc.cpu_model = cfg.cpu_model.clone();
        qc.accel = match cfg.accel {
            AccelSetting::Auto => AccelChoice::Auto,
            AccelSetting::Kvm => AccelChoice::Kvm,
            AccelSetting::Tcg => AccelChoice::Tcg,
        };
        let opened = match qc.validate() {
            Ok(qc) => QemuBackend::open(qc).await,
            Err(e) => Err(e),
        };
        match opened {
            Ok((backend, report)) => {
                let info = backend.info();
                info!(
                    accel = info.accel.map(|a| a.as_str()).unwrap_or("none"),
                    reason = %info.accel_reason,
                    cpu_model = %info.cpu_model,
                    cgroup = ?info.cgroup,
                    attached = report.attached.len(),
                    lost = report.lost.len(),
                    stopped = report.stopped.len(),
                    "hypervisor ready"
                );
                for id in &report.lost {
                    warn!(vm = %id, "vm was running before the restart and is gone");
                }
                for (path, why) in &report.unreadable {
                    warn!(path = %path.display(), %why, "unreadable vm record left in place");
                }
                Self {
                    qemu: Some(Arc::new(backend)),
                    unavailable: String::new(),
                    info: Some(info),
                    names,
                    node,
                }
            }
            Err(e) => {
                warn!(error = %e, "hypervisor unavailable; this node will not run VMs");
                Self::unavailable(e.to_string(), names, node)
            }
        }
    }

    fn unavailable(why: String, names: sled::Tree, node: NodeId) -> Self {
        Self {
            qemu: None,
            unavailable: why,
            info: None,
            names,
            node,
        }
    }

    /// Backend facts (accelerator, CPU model, cgroups), if the hypervisor runs.
    pub fn info(&self) -> Option<&BackendInfo> {
        self.info.as_ref()
    }

    /// Why the hypervisor does not run, if it does not.
    pub fn unavailable_reason(&self) -> Option<&str> {
        self.qemu.is_none().then_some(self.unavailable.as_str())
    }

    fn backend(&self) -> Result<&Arc<QemuBackend>, VmError> {
        self.qemu
            .as_ref()
            .ok_or_else(|| VmError::Unavailable(self.unavailable.clone()))
    }

    fn accel(&self) -> String {
        self.info
            .as_ref()
            .and_then(|i| i.accel)
            .map(|a| a.as_str().to_owned())
            .unwrap_or_default()
    }

    fn name_of(&self, id: &str) -> String {
        self.names
            .get(id.as_bytes())
            .ok()
            .flatten()
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_default()
    }

    fn view(&self, i: &dwcp_hypervisor::VmInfo) -> VmView {
        VmView {
            id: i.id.to_string(),
            name: self.name_of(i.id.as_str()),
            state: i.state.to_string(),
            node: self.node,
            vcpus: i.vcpus,
            memory_mib: i.memory_mib,
            memory_size: i.memory_mib * 1024 * 1024,
            pid: i.pid,
            accel: self.accel(),
            stats: None,
        }
    }

    /// Defines and starts a VM. Refused with [`VmError::DoesNotFit`] when it exceeds the
    /// donated share.
    ///
    /// `id`: the VM id a committed placement decision gave it (a fresh random id when none).
    pub async fn create(
        &self,
        req: VmCreateRequest,
        id: Option<dwcp_protocol::VmId>,
    ) -> Result<VmView, VmError> {
        let b = self.backend()?;
        if req.name.is_empty() || req.name.len() > 64 || req.name.chars().any(char::is_control) {
            return Err(VmError::BadRequest(
                "name must be 1 to 64 printable characters".into(),
            ));
        }
        let given_id = id.is_some();
        let id_bytes: [u8; 16] = id.map_or_else(rand::random, |i| *i.as_bytes());
        let id = dwcp_hypervisor::VmId::new(hex::encode(id_bytes))?;
        if self.get(id.as_str()).await.is_ok() {
            return Err(VmError::Conflict(format!("vm {id} exists already")));
        }
        // A placement decision is used once: its VM id is remembered (under a key no VM id
        // takes), so a replayed certificate cannot bring back a VM deleted here.
        let used_key = [b"decision/".as_slice(), id.as_str().as_bytes()].concat();
        if given_id {
            match self.names.insert(&used_key, b"".as_slice()) {
                Ok(None) => {}
                Ok(Some(_)) => {
                    return Err(VmError::Conflict(format!(
                        "the placement decision for vm {id} was used already"
                    )));
                }
                Err(e) => return Err(VmError::Internal(format!("sled: {e}"))),
            }
        }
        let disk = match &req.image {
            None => None,
            Some(img) => {
                let base = if img.len() == 64 && img.bytes().all(|c| c.is_ascii_hexdigit()) {
                    ImageId::parse(img)?
                } else {
                    let path = std::path::PathBuf::from(img);
                    if !path.is_absolute() {
                        return Err(VmError::BadRequest(format!(
                            "image `{img}` is neither a SHA-256 nor an absolute path"
                        )));
                    }
                    let b2 = b.clone();
                    tokio::task::spawn_blocking(move || b2.images().import(&path))
                        .await
                        .map_err(|e| VmError::Internal(e.to_string()))??
                };
                Some(DiskSpec {
                    base,
                    size_mib: req.disk_mib,
                })
            }
        };
        let boot = match &req.kernel {
            Some(k) => BootSource::Kernel {
                kernel: k.into(),
                kernel_sha256: None,
                initrd: req.initrd.as_ref().map(Into::into),
                initrd_sha256: None,
                cmdline: req
                    .cmdline
                    .clone()
                    .unwrap_or_else(|| "console=ttyS0".into()),
            },
            None if disk.is_some() => BootSource::Disk,
            None => {
                return Err(VmError::BadRequest(
                    "give an image to boot from, or a kernel for direct kernel boot".into(),
                ));
            }
        };
        let spec = VmSpec {
            id: id.clone(),
            vcpus: req.vcpus,
            memory_mib: req.memory_mib,
            boot,
            disk,
        };
        let _ = self
            .names
            .insert(id.as_str().as_bytes(), req.name.as_bytes());
        let defined = match b.define(spec).await {
            Ok(i) => i,
            Err(e) => {
                let _ = self.names.remove(id.as_str().as_bytes());
                return Err(e.into());
            }
        };
        if let Err(e) = b.start(&id).await {
            let _ = b.destroy(&id).await;
            let _ = self.names.remove(id.as_str().as_bytes());
            return Err(e.into());
        }
        info!(vm = %id, name = %req.name, vcpus = defined.vcpus, memory_mib = defined.memory_mib, "vm started");
        self.get(id.as_str()).await
    }

    fn parse_id(id: &str) -> Result<dwcp_hypervisor::VmId, VmError> {
        dwcp_hypervisor::VmId::new(id).map_err(|_| VmError::NotFound(id.to_owned()))
    }

    /// Every VM on this node.
    pub async fn list(&self) -> Result<Vec<VmView>, VmError> {
        let b = self.backend()?;
        Ok(b.list().await?.iter().map(|i| self.view(i)).collect())
    }

    /// One VM, with its resource use when running.
    pub async fn get(&self, id: &str) -> Result<VmView, VmError> {
        let b = self.backend()?;
        let id = Self::parse_id(id)?;
        let info = b.inspect(&id).await?;
        let mut v = self.view(&info);
        if matches!(info.state, VmState::Running | VmState::Paused)
            && let Ok(s) = b.stats(&id).await
        {
            v.stats = Some(VmStatsView {
                vcpu_seconds: s.vcpu_time_ns as f64 / 1e9,
                host_rss_bytes: s.host_rss_bytes,
                cgroup_memory_peak_bytes: s.cgroup_memory_peak_bytes,
                dirty_rate_mib_per_s: s.dirty_rate_mib_per_s,
            });
        }
        Ok(v)
    }

    /// Pause, resume, stop, start or delete.
    pub async fn act(&self, id: &str, action: VmAction) -> Result<Option<VmView>, VmError> {
        let b = self.backend()?;
        let vid = Self::parse_id(id)?;
        match action {
            VmAction::Pause => b.pause(&vid).await?,
            VmAction::Resume => b.resume(&vid).await?,
            VmAction::Stop => b.stop(&vid, Duration::from_secs(10)).await?,
            VmAction::Start => b.start(&vid).await?,
            VmAction::Delete => {
                b.destroy(&vid).await?;
                let _ = self.names.remove(id.as_bytes());
                info!(vm = %id, "vm deleted");
                return Ok(None);
            }
        }
        info!(vm = %id, ?action, "vm action done");
        self.get(id).await.map(Some)
    }

    /// The tail of the serial console.
    pub async fn console(&self, id: &str, max_bytes: usize) -> Result<VmConsole, VmError> {
        let b = self.backend()?;
        let vid = Self::parse_id(id)?;
        Ok(VmConsole {
            text: b.serial_log(&vid, max_bytes.min(1 << 20)).await?,
        })
    }

    /// What the defined VMs (running or not) hold of the donated share: heartbeats carry it
    /// and placement reads it. `None` when this node runs no hypervisor.
    pub async fn allocation(&self) -> Option<dwcp_protocol::Allocation> {
        let b = self.qemu.as_ref()?;
        let vms = b.list().await.map(|l| l.len()).unwrap_or(0);
        let u = b.usage();
        Some(dwcp_protocol::Allocation {
            vcpus: u.vcpus,
            memory_mib: u.memory_mib,
            disk_mib: u.disk_mib,
            vms: u32::try_from(vms).unwrap_or(u32::MAX),
        })
    }

    /// VMs per state, for `dwcp_vm_count_total` and heartbeats.
    pub async fn counts(&self) -> Vec<(String, usize)> {
        let Some(b) = &self.qemu else {
            return Vec::new();
        };
        let Ok(list) = b.list().await else {
            return Vec::new();
        };
        let mut m = std::collections::BTreeMap::new();
        for i in list {
            *m.entry(i.state.to_string()).or_insert(0) += 1;
        }
        m.into_iter().collect()
    }
}
