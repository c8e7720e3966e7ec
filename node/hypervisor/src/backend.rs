//! The backend trait: what the node needs from a hypervisor.

use std::future::Future;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::spec::{VmId, VmInfo, VmSpec, VmStats};

/// A boxed future returned by [`Backend`] methods (keeps the trait object-safe, so the node can
/// hold a `Box<dyn Backend>` chosen from its config).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, Error>> + Send + 'a>>;

/// Which accelerator runs guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Accel {
    /// Hardware virtualization through /dev/kvm (the probe guest ran).
    Kvm,
    /// QEMU's software emulator.
    Tcg,
}

impl Accel {
    /// `kvm` or `tcg`.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// How VM resource caps are enforced on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CgroupMode {
    /// cgroup v2 `memory.max` and `cpu.max` per VM under this directory.
    V2 {
        /// Parent cgroup directory of the per-VM cgroups.
        parent: String,
    },
    /// cgroup v1 memory (`memory.limit_in_bytes`) and, when mounted, cpu (`cpu.cfs_quota_us`).
    V1 {
        /// Parent directory in the memory hierarchy.
        memory_parent: String,
        /// Parent directory in the cpu hierarchy, if that controller is usable.
        cpu_parent: Option<String>,
    },
    /// No usable cgroup controller: only QEMU's own `-m`/`-smp` limits apply.
    Unavailable {
        /// Why.
        reason: String,
    },
}

/// What a backend is and how it runs guests; the node reports this in its metrics and logs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendInfo {
    /// `qemu`, `libvirt` or `fake`.
    pub kind: String,
    /// Accelerator in use (QEMU backend), or `None` when the backend decides (libvirt).
    pub accel: Option<Accel>,
    /// Why this accelerator (e.g. the KVM probe's failure).
    pub accel_reason: String,
    /// CPU model given to guests.
    pub cpu_model: String,
    /// Resource caps.
    pub cgroup: CgroupMode,
    /// Hypervisor version string.
    pub version: String,
}

/// Where a migration stream goes to or comes from.
#[derive(Debug)]
#[non_exhaustive]
pub enum MigrationChannel {
    /// A connected socket (or pipe end) the node owns, e.g. one end of an AMST stream bridge.
    /// Passed to QEMU over QMP with `SCM_RIGHTS`, so QEMU needs no network or path access.
    Fd(OwnedFd),
    /// A QEMU migration URI (`tcp:HOST:PORT`, `unix:PATH`); paths are inside the VM's chroot.
    Uri(String),
}

/// Tuning of an outgoing migration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationParams {
    /// Largest pause allowed for the final copy, ms.
    pub downtime_limit_ms: Option<u64>,
    /// Bandwidth cap, bytes per second.
    pub max_bandwidth_bytes_per_s: Option<u64>,
}

/// Status of a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum MigrationStatus {
    /// No migration has run.
    None,
    /// Setting up.
    Setup,
    /// Copying memory.
    Active,
    /// Source paused for the final copy.
    Finishing,
    /// Done: the target owns the guest.
    Completed,
    /// Failed; the source keeps running.
    Failed,
    /// Cancelled; the source keeps running.
    Cancelled,
}

impl MigrationStatus {
    /// Maps QEMU's `query-migrate` status.
    pub fn from_qemu(s: &str) -> Self {
        match s {
            "setup" | "wait-unplug" => MigrationStatus::Setup,
            "active" | "postcopy-active" | "pre-switchover" => MigrationStatus::Active,
            "device" | "postcopy-paused" | "postcopy-recover" => MigrationStatus::Finishing,
            "completed" => MigrationStatus::Completed,
            "failed" => MigrationStatus::Failed,
            "cancelling" | "cancelled" => MigrationStatus::Cancelled,
            _ => MigrationStatus::None,
        }
    }

    /// Whether the migration has ended.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled
        )
    }
}

/// Progress of a migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationProgress {
    /// Status.
    pub status: MigrationStatus,
    /// Bytes of RAM sent.
    pub transferred_bytes: u64,
    /// Bytes of RAM left.
    pub remaining_bytes: u64,
    /// Guest RAM.
    pub total_bytes: u64,
    /// Pages the guest dirties per second.
    pub dirty_pages_per_s: u64,
    /// Pre-copy passes so far.
    pub passes: u64,
    /// Time so far (or total), ms.
    pub elapsed_ms: u64,
    /// Actual downtime when completed, else the expected one, ms.
    pub downtime_ms: Option<u64>,
    /// Error text when failed.
    pub error: Option<String>,
}

/// What a hypervisor backend does for the node.
///
/// Lifecycle: `define` (admission against the donated share, files prepared) -> `start` ->
/// `pause`/`resume` -> `stop` (guest off, definition and disk kept) -> `start` again, or
/// `destroy` (off and every trace removed: process, files, cgroup, record).
///
/// Migration: the target calls [`Backend::start_incoming`] on a defined VM, the source
/// [`Backend::migrate`]; both poll [`Backend::migration_progress`]. On `Completed` the source
/// VM is paused in `postmigrate` and the caller destroys it; on failure it keeps running.
pub trait Backend: Send + Sync {
    /// What this backend is and how it runs guests.
    fn info(&self) -> BackendInfo;

    /// Defines a VM after checking it against the donated share. Does not start it.
    fn define(&self, spec: VmSpec) -> BoxFuture<'_, VmInfo>;

    /// Boots a defined, stopped VM.
    fn start<'a>(&'a self, id: &'a VmId) -> BoxFuture<'a, ()>;

    /// Pauses a running VM's vCPUs.
    fn pause<'a>(&'a self, id: &'a VmId) -> BoxFuture<'a, ()>;

    /// Resumes a paused VM.
    fn resume<'a>(&'a self, id: &'a VmId) -> BoxFuture<'a, ()>;

    /// Powers the VM off: ACPI shutdown, and after `grace` a forced stop. Keeps its definition.
    fn stop<'a>(&'a self, id: &'a VmId, grace: Duration) -> BoxFuture<'a, ()>;

    /// Forces the VM off and removes everything it had on this host.
    fn destroy<'a>(&'a self, id: &'a VmId) -> BoxFuture<'a, ()>;

    /// All VMs this backend knows.
    fn list(&self) -> BoxFuture<'_, Vec<VmInfo>>;

    /// One VM.
    fn inspect<'a>(&'a self, id: &'a VmId) -> BoxFuture<'a, VmInfo>;

    /// Resource use of a running VM.
    fn stats<'a>(&'a self, id: &'a VmId) -> BoxFuture<'a, VmStats>;

    /// The last `max_bytes` of the VM's serial console.
    fn serial_log<'a>(&'a self, id: &'a VmId, max_bytes: usize) -> BoxFuture<'a, String>;

    /// Starts a defined VM waiting for an incoming migration stream on `channel`.
    fn start_incoming<'a>(&'a self, id: &'a VmId, channel: MigrationChannel) -> BoxFuture<'a, ()>;

    /// Sends a running VM's migration stream to `channel`.
    fn migrate<'a>(&'a self, id: &'a VmId, channel: MigrationChannel) -> BoxFuture<'a, ()>;

    /// Progress of the VM's current or last migration.
    fn migration_progress<'a>(&'a self, id: &'a VmId) -> BoxFuture<'a, MigrationProgress>;

    /// Sets downtime limit and bandwidth cap (before or during a migration).
    fn set_migration_params<'a>(
        &'a self,
        id: &'a VmId,
        params: MigrationParams,
    ) -> BoxFuture<'a, ()>;

    /// Cancels an outgoing migration; the source keeps running.
    fn cancel_migration<'a>(&'a self, id: &'a VmId) -> BoxFuture<'a, ()>;
}
