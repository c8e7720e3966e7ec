//! What a VM is: its id, its requested resources, how it boots, and what the backends report.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::image::ImageId;

/// Longest accepted VM id.
pub const MAX_VM_ID_LEN: usize = 64;
/// Most vCPUs one VM may ask for (before the donated-share check).
pub const MAX_VCPUS: u32 = 256;
/// Largest kernel command line accepted.
pub const MAX_CMDLINE_LEN: usize = 2048;

/// A VM's id: 1 to 64 characters of `[a-z0-9_-]`, starting with a letter or digit.
///
/// The id names the VM's directory, cgroup and QEMU `-name`, so it is restricted to characters
/// that are safe in paths and command lines.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VmId(String);

impl VmId {
    /// Checks and wraps an id.
    pub fn new(id: impl Into<String>) -> Result<Self, Error> {
        let id = id.into();
        let ok_char =
            |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_';
        let first_ok = id
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if id.is_empty() || id.len() > MAX_VM_ID_LEN || !first_ok || !id.chars().all(ok_char) {
            return Err(Error::InvalidSpec(format!(
                "vm id '{}' must be 1..={MAX_VM_ID_LEN} chars of [a-z0-9_-] starting with [a-z0-9]",
                id.escape_debug()
            )));
        }
        Ok(VmId(id))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for VmId {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        VmId::new(s)
    }
}

impl From<VmId> for String {
    fn from(id: VmId) -> String {
        id.0
    }
}

impl fmt::Display for VmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How a VM boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum BootSource {
    /// Direct kernel boot (`-kernel/-initrd/-append`). The files are read by QEMU before it
    /// drops privileges and chroots; when a hash is given it is checked before boot.
    Kernel {
        /// The kernel image.
        kernel: PathBuf,
        /// Expected SHA-256 of the kernel (hex), checked before boot when present.
        kernel_sha256: Option<String>,
        /// An initramfs.
        initrd: Option<PathBuf>,
        /// Expected SHA-256 of the initramfs (hex), checked before boot when present.
        initrd_sha256: Option<String>,
        /// Kernel command line.
        cmdline: String,
    },
    /// Firmware (SeaBIOS) boots from the VM's disk.
    Disk,
}

/// A VM's disk: a copy-on-write overlay over a content-addressed base image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// The shared base image.
    pub base: ImageId,
    /// Virtual size of the overlay in MiB; `None` keeps the base image's size.
    pub size_mib: Option<u64>,
}

/// What a VM asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// The VM's id, chosen by the caller (the node).
    pub id: VmId,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// How it boots.
    pub boot: BootSource,
    /// Optional disk.
    pub disk: Option<DiskSpec>,
}

impl VmSpec {
    /// A spec for direct kernel boot without a disk.
    pub fn kernel_boot(
        id: VmId,
        vcpus: u32,
        memory_mib: u64,
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: impl Into<String>,
    ) -> Self {
        VmSpec {
            id,
            vcpus,
            memory_mib,
            boot: BootSource::Kernel {
                kernel,
                kernel_sha256: None,
                initrd,
                initrd_sha256: None,
                cmdline: cmdline.into(),
            },
            disk: None,
        }
    }

    /// Checks the spec's own limits (not the donated share).
    pub fn validate(&self) -> Result<(), Error> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(Error::InvalidSpec(format!(
                "vm '{}': vcpus must be 1..={MAX_VCPUS}, got {}",
                self.id, self.vcpus
            )));
        }
        if self.memory_mib < 16 || self.memory_mib > 16 * 1024 * 1024 {
            return Err(Error::InvalidSpec(format!(
                "vm '{}': memory must be 16 MiB..16 TiB, got {} MiB",
                self.id, self.memory_mib
            )));
        }
        match &self.boot {
            BootSource::Kernel {
                kernel,
                initrd,
                cmdline,
                kernel_sha256,
                initrd_sha256,
            } => {
                if cmdline.len() > MAX_CMDLINE_LEN || cmdline.chars().any(|c| c.is_control()) {
                    return Err(Error::InvalidSpec(format!(
                        "vm '{}': kernel command line must be at most {MAX_CMDLINE_LEN} printable characters",
                        self.id
                    )));
                }
                for p in std::iter::once(kernel).chain(initrd.iter()) {
                    if !p.is_absolute() || p.to_str().is_none_or(|s| s.contains(',')) {
                        return Err(Error::InvalidSpec(format!(
                            "vm '{}': boot file {} must be an absolute UTF-8 path without ','",
                            self.id,
                            p.display()
                        )));
                    }
                }
                for h in kernel_sha256.iter().chain(initrd_sha256.iter()) {
                    if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return Err(Error::InvalidSpec(format!(
                            "vm '{}': boot file hash '{}' is not 64 hex digits",
                            self.id,
                            h.escape_debug()
                        )));
                    }
                }
            }
            BootSource::Disk => {
                if self.disk.is_none() {
                    return Err(Error::InvalidSpec(format!(
                        "vm '{}': disk boot needs a disk",
                        self.id
                    )));
                }
            }
        }
        if let Some(DiskSpec {
            size_mib: Some(s), ..
        }) = &self.disk
            && (*s == 0 || *s > 64 * 1024 * 1024)
        {
            return Err(Error::InvalidSpec(format!(
                "vm '{}': disk size must be 1 MiB..64 TiB, got {s} MiB",
                self.id
            )));
        }
        Ok(())
    }
}

/// Lifecycle state of a VM as the backend sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum VmState {
    /// Defined, not running (never started or stopped).
    Defined,
    /// Running.
    Running,
    /// Paused (vCPUs stopped, process alive).
    Paused,
    /// Waiting for an incoming migration stream.
    Incoming,
    /// Sending itself to another host.
    Migrating,
    /// The QEMU process went away without the node stopping it (guest power-off, crash, OOM
    /// kill, host reboot). `stop` or `destroy` cleans up after it.
    Lost,
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            VmState::Defined => "defined",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Incoming => "incoming",
            VmState::Migrating => "migrating",
            VmState::Lost => "lost",
        };
        f.write_str(s)
    }
}

/// What `list` and `inspect` report about a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// The VM's id.
    pub id: VmId,
    /// Its state.
    pub state: VmState,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Host process id when running (QEMU backend).
    pub pid: Option<u32>,
}

/// Resource use of a running VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmStats {
    /// CPU time used by all vCPU threads, nanoseconds.
    pub vcpu_time_ns: u64,
    /// Guest memory size in bytes.
    pub memory_bytes: u64,
    /// Host resident memory of the VM process in bytes (guest RAM touched plus overhead).
    pub host_rss_bytes: Option<u64>,
    /// Peak host memory charged to the VM's cgroup, when it has one.
    pub cgroup_memory_peak_bytes: Option<u64>,
    /// Last measured guest dirty rate in MiB/s, when the backend can measure it.
    pub dirty_rate_mib_per_s: Option<u64>,
}
