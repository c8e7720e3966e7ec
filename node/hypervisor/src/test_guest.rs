//! Finds the test guest built by `scripts/build-guest.sh` (kernel + busybox initramfs).
//!
//! The guest prints [`MARKER`] once userspace runs and `tick N` every second on its serial
//! console; kernel options `dwcp.poweroff`, `dwcp.fill=SIZE` and `dwcp.ticks=N` are described in
//! the script. Tests, benchmarks and the node's own VM tests use [`TestGuest::locate`].

use std::path::{Path, PathBuf};

use crate::spec::{BootSource, VmId, VmSpec};

/// Line the guest prints when its userspace starts.
pub const MARKER: &str = "DWCP-GUEST-READY";

/// Largest `guest.env` accepted.
const MAX_ENV_BYTES: u64 = 64 * 1024;

/// The cached test guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestGuest {
    /// Directory holding it.
    pub dir: PathBuf,
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: PathBuf,
    /// SHA-256 of the kernel, as recorded by the script.
    pub kernel_sha256: String,
    /// SHA-256 of the initramfs.
    pub initrd_sha256: String,
    /// Base kernel command line (`console=ttyS0 ...`).
    pub cmdline: String,
    /// The Debian userland variant, when built with `--rootfs debian`.
    pub debian: Option<DebianRootfs>,
}

/// The Debian userland built by `scripts/build-guest.sh --rootfs debian`: an ext4 root disk
/// (qcow2, to import as a base image) and the initramfs that mounts it from `/dev/vda`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebianRootfs {
    /// The root disk image.
    pub rootfs: PathBuf,
    /// The initramfs that switches into it.
    pub initrd: PathBuf,
    /// SHA-256 of that initramfs.
    pub initrd_sha256: String,
}

impl TestGuest {
    /// The cache dir: `$DWCP_GUEST_DIR`, else `${XDG_CACHE_HOME:-$HOME/.cache}/dwcp/guest`.
    pub fn default_dir() -> Option<PathBuf> {
        if let Some(d) = std::env::var_os("DWCP_GUEST_DIR") {
            return Some(PathBuf::from(d));
        }
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
        Some(cache.join("dwcp").join("guest"))
    }

    /// Finds the guest in [`TestGuest::default_dir`]; the error says how to build it.
    pub fn locate() -> Result<TestGuest, String> {
        let dir = Self::default_dir().ok_or("neither DWCP_GUEST_DIR nor HOME is set")?;
        Self::load(&dir)
    }

    /// Reads `dir/guest.env`.
    pub fn load(dir: &Path) -> Result<TestGuest, String> {
        let hint = || {
            format!(
                "test guest not found in {}: run scripts/build-guest.sh (or set DWCP_GUEST_DIR)",
                dir.display()
            )
        };
        let env_path = dir.join("guest.env");
        let meta = std::fs::metadata(&env_path).map_err(|_| hint())?;
        if meta.len() > MAX_ENV_BYTES {
            return Err(format!("{} is too large", env_path.display()));
        }
        let text = std::fs::read_to_string(&env_path).map_err(|_| hint())?;
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
                .map(|v| v.trim().trim_matches('"').to_owned())
                .ok_or_else(|| {
                    format!(
                        "{} has no {k}: rerun scripts/build-guest.sh",
                        env_path.display()
                    )
                })
        };
        let g = TestGuest {
            dir: dir.to_owned(),
            kernel: PathBuf::from(get("KERNEL")?),
            initrd: PathBuf::from(get("INITRD")?),
            kernel_sha256: get("KERNEL_SHA256")?,
            initrd_sha256: get("INITRD_SHA256")?,
            cmdline: get("CMDLINE")?,
            debian: match (
                get("DEBIAN_ROOTFS"),
                get("DEBIAN_INITRD"),
                get("DEBIAN_INITRD_SHA256"),
            ) {
                (Ok(rootfs), Ok(initrd), Ok(initrd_sha256)) => Some(DebianRootfs {
                    rootfs: PathBuf::from(rootfs),
                    initrd: PathBuf::from(initrd),
                    initrd_sha256,
                }),
                _ => None,
            },
        };
        if !g.kernel.is_file() || !g.initrd.is_file() {
            return Err(hint());
        }
        Ok(g)
    }

    /// A spec booting this guest with extra kernel options (e.g. `dwcp.fill=64M`); the boot
    /// files' hashes are checked before boot.
    pub fn spec(&self, id: VmId, vcpus: u32, memory_mib: u64, extra_cmdline: &str) -> VmSpec {
        let cmdline = if extra_cmdline.is_empty() {
            self.cmdline.clone()
        } else {
            format!("{} {extra_cmdline}", self.cmdline)
        };
        VmSpec {
            id,
            vcpus,
            memory_mib,
            boot: BootSource::Kernel {
                kernel: self.kernel.clone(),
                kernel_sha256: Some(self.kernel_sha256.clone()),
                initrd: Some(self.initrd.clone()),
                initrd_sha256: Some(self.initrd_sha256.clone()),
                cmdline,
            },
            disk: None,
        }
    }
}

/// The highest `tick N` in a serial log.
pub fn last_tick(serial: &str) -> Option<u64> {
    ticks(serial).into_iter().max()
}

/// All `tick N` values in order.
pub fn ticks(serial: &str) -> Vec<u64> {
    serial
        .lines()
        .filter_map(|l| {
            // The shell prompt may share a line with a tick.
            let i = l.find("tick ")?;
            l[i + 5..].trim().parse().ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ticks() {
        let log = "DWCP-GUEST-READY uptime=2.1\ntick 1\n/ # \x1b[6ntick 2\ntick 3\r\n";
        assert_eq!(ticks(log), vec![1, 2, 3]);
        assert_eq!(last_tick(log), Some(3));
        assert_eq!(last_tick("nothing"), None);
    }

    #[test]
    fn missing_guest_says_how_to_build_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = TestGuest::load(dir.path()).unwrap_err();
        assert!(err.contains("scripts/build-guest.sh"), "{err}");
    }
}
