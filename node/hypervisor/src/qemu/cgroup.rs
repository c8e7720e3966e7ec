//! Per-VM cgroups: a memory cap (guest RAM + QEMU overhead) and a CPU cap (vCPUs x 100% of a
//! core) for each QEMU process.
//!
//! Order of preference: cgroup v2 (`memory.max`, `memory.swap.max = 0`, `cpu.max`), then cgroup
//! v1 (`memory.limit_in_bytes` + `memory.memsw.limit_in_bytes`, `cpu.cfs_quota_us`), else none.
//! The VM cgroups are created under the node's own cgroup (`dwcp-vms/<id>`), so a systemd unit
//! with `Delegate=yes` is all a host needs. QEMU enters its cgroup before it allocates guest
//! RAM: it is started through `/bin/sh -c 'echo $$ > cgroup.procs; exec qemu ...'`, so every
//! byte it ever touches is charged (no `unsafe` `pre_exec` needed).
//!
//! Where no controller can be used (a container without delegation), the VM still runs:
//! guest RAM and vCPUs stay bounded by QEMU's `-m` and `-smp`, and the TCG translation cache by
//! `tb-size`; what is lost is the hard cap on QEMU's own overhead and on host CPU time. The
//! backend reports [`CgroupMode::Unavailable`] with the reason.
//!
//! This build machine: hybrid hierarchy, the v2 mount (`/sys/fs/cgroup/unified`) has only the
//! `hugetlb` controller, v1 has `memory` and `cpu`, so the v1 path is the one that runs here.

use std::path::{Path, PathBuf};

use crate::backend::CgroupMode;
use crate::error::Error;
use crate::spec::VmId;

const VMS_DIR: &str = "dwcp-vms";
const CPU_PERIOD_US: u64 = 100_000;

/// A VM's cgroups, created before QEMU starts.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmCgroup {
    /// Directories created for this VM (one per hierarchy).
    pub dirs: Vec<PathBuf>,
    /// `cgroup.procs` files QEMU writes its pid into.
    pub procs_files: Vec<PathBuf>,
    /// File holding the peak memory charged (`memory.peak` or `memory.max_usage_in_bytes`).
    pub peak_file: Option<PathBuf>,
    /// The memory cap in bytes.
    pub memory_limit_bytes: u64,
}

impl VmCgroup {
    /// Peak memory charged so far, bytes.
    pub fn memory_peak(&self) -> Option<u64> {
        let f = self.peak_file.as_ref()?;
        std::fs::read_to_string(f).ok()?.trim().parse().ok()
    }

    /// Removes the VM's cgroup directories (QEMU must have exited).
    pub fn remove(&self) -> Result<(), Error> {
        for d in &self.dirs {
            if d.exists() {
                // A just-exited process may still be accounted for a moment.
                let mut last = None;
                for _ in 0..50 {
                    match std::fs::remove_dir(d) {
                        Ok(()) => {
                            last = None;
                            break;
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                            last = None;
                            break;
                        }
                        Err(e) => last = Some(e),
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                if let Some(e) = last {
                    return Err(Error::io(format!("remove cgroup {}", d.display()), e));
                }
            }
        }
        Ok(())
    }
}

/// Finds the best cgroup setup this process can use.
pub fn detect() -> CgroupMode {
    let self_cg = match std::fs::read_to_string("/proc/self/cgroup") {
        Ok(s) => s,
        Err(e) => {
            return CgroupMode::Unavailable {
                reason: format!("cannot read /proc/self/cgroup: {e}"),
            };
        }
    };
    let mut reasons = Vec::new();
    match detect_v2(&self_cg) {
        Ok(m) => return m,
        Err(r) => reasons.push(format!("v2: {r}")),
    }
    match detect_v1(&self_cg) {
        Ok(m) => return m,
        Err(r) => reasons.push(format!("v1: {r}")),
    }
    CgroupMode::Unavailable {
        reason: reasons.join("; "),
    }
}

fn own_path<'a>(self_cg: &'a str, controller: &str) -> Option<&'a str> {
    self_cg.lines().find_map(|l| {
        let mut it = l.splitn(3, ':');
        let (_, ctrls, path) = (it.next()?, it.next()?, it.next()?);
        if controller.is_empty() {
            ctrls.is_empty().then_some(path)
        } else {
            ctrls.split(',').any(|c| c == controller).then_some(path)
        }
    })
}

fn detect_v2(self_cg: &str) -> Result<CgroupMode, String> {
    let own = own_path(self_cg, "").ok_or("no unified hierarchy entry")?;
    let mount = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .map(Path::new)
        .find(|m| m.join("cgroup.controllers").exists())
        .ok_or("no cgroup2 mount")?;
    let parent = mount.join(own.trim_start_matches('/'));
    let ctrls = std::fs::read_to_string(parent.join("cgroup.controllers"))
        .map_err(|e| format!("{}: {e}", parent.display()))?;
    if !ctrls.split_whitespace().any(|c| c == "memory") {
        return Err(format!(
            "memory controller not available in {} (has: {})",
            parent.display(),
            ctrls.trim()
        ));
    }
    let vms = parent.join(VMS_DIR);
    mkdir(&vms)?;
    // The parent must delegate memory and cpu to dwcp-vms, and dwcp-vms to each VM.
    for (dir, what) in [(&parent, "+memory"), (&vms, "+memory")] {
        std::fs::write(dir.join("cgroup.subtree_control"), what)
            .map_err(|e| format!("enable memory in {}: {e}", dir.display()))?;
    }
    let has_cpu = ctrls.split_whitespace().any(|c| c == "cpu")
        && std::fs::write(parent.join("cgroup.subtree_control"), "+cpu").is_ok()
        && std::fs::write(vms.join("cgroup.subtree_control"), "+cpu").is_ok();
    if !has_cpu {
        tracing::warn!(parent = %parent.display(), "cgroup v2 cpu controller not delegated; no cpu cap");
    }
    Ok(CgroupMode::V2 {
        parent: vms.display().to_string(),
    })
}

fn detect_v1(self_cg: &str) -> Result<CgroupMode, String> {
    let own = own_path(self_cg, "memory").ok_or("no memory controller")?;
    let mem_mount = Path::new("/sys/fs/cgroup/memory");
    if !mem_mount.join("memory.limit_in_bytes").exists() {
        return Err("no v1 memory mount at /sys/fs/cgroup/memory".into());
    }
    let mem_parent = mem_mount.join(own.trim_start_matches('/')).join(VMS_DIR);
    mkdir(&mem_parent)?;
    let cpu_parent = own_path(self_cg, "cpu").and_then(|own_cpu| {
        let mount = ["/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct"]
            .into_iter()
            .map(Path::new)
            .find(|m| m.join("cpu.cfs_quota_us").exists())?;
        let p = mount.join(own_cpu.trim_start_matches('/')).join(VMS_DIR);
        mkdir(&p).ok()?;
        Some(p.display().to_string())
    });
    Ok(CgroupMode::V1 {
        memory_parent: mem_parent.display().to_string(),
        cpu_parent,
    })
}

fn mkdir(p: &Path) -> Result<(), String> {
    match std::fs::create_dir(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(format!("mkdir {}: {e}", p.display())),
    }
}

fn write(p: &Path, v: &str) -> Result<(), Error> {
    std::fs::write(p, v).map_err(|e| Error::io(format!("write {v} to {}", p.display()), e))
}

/// Creates the cgroups of VM `id` with a memory cap of `memory_bytes` and `vcpus` cores of CPU.
/// `scope` tells apart backends with different state dirs in one cgroup (tests, two nodes on
/// one host): the cgroup is `dwcp-vms/<id>.<scope>`. Returns `None` when `mode` is
/// [`CgroupMode::Unavailable`].
pub fn create(
    mode: &CgroupMode,
    id: &VmId,
    scope: &str,
    memory_bytes: u64,
    vcpus: u32,
) -> Result<Option<VmCgroup>, Error> {
    let name = format!("{id}.{scope}");
    let quota = u64::from(vcpus) * CPU_PERIOD_US;
    match mode {
        CgroupMode::Unavailable { .. } => Ok(None),
        CgroupMode::V2 { parent } => {
            let dir = Path::new(parent).join(&name);
            mkdir(&dir).map_err(|e| Error::Io {
                context: e,
                source: std::io::Error::other("cgroup"),
            })?;
            write(&dir.join("memory.max"), &memory_bytes.to_string())?;
            if dir.join("memory.swap.max").exists() {
                write(&dir.join("memory.swap.max"), "0")?;
            }
            if dir.join("cpu.max").exists() {
                write(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
            }
            let peak = dir.join("memory.peak");
            Ok(Some(VmCgroup {
                procs_files: vec![dir.join("cgroup.procs")],
                peak_file: peak.exists().then_some(peak),
                dirs: vec![dir],
                memory_limit_bytes: memory_bytes,
            }))
        }
        CgroupMode::V1 {
            memory_parent,
            cpu_parent,
        } => {
            let mem = Path::new(memory_parent).join(&name);
            mkdir(&mem).map_err(|e| Error::Io {
                context: e,
                source: std::io::Error::other("cgroup"),
            })?;
            let mut cg = VmCgroup {
                procs_files: vec![mem.join("cgroup.procs")],
                peak_file: Some(mem.join("memory.max_usage_in_bytes")),
                dirs: vec![mem.clone()],
                memory_limit_bytes: memory_bytes,
            };
            write(
                &mem.join("memory.limit_in_bytes"),
                &memory_bytes.to_string(),
            )?;
            if mem.join("memory.memsw.limit_in_bytes").exists() {
                // memsw >= limit is required; equal means no swap beyond the cap.
                write(
                    &mem.join("memory.memsw.limit_in_bytes"),
                    &memory_bytes.to_string(),
                )?;
            }
            if let Some(cpu_parent) = cpu_parent {
                let cpu = Path::new(cpu_parent).join(&name);
                if mkdir(&cpu).is_ok() {
                    cg.dirs.push(cpu.clone());
                    write(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                    write(&cpu.join("cpu.cfs_quota_us"), &quota.to_string())?;
                    cg.procs_files.push(cpu.join("cgroup.procs"));
                }
            }
            Ok(Some(cg))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_own_cgroup_lines() {
        let s = "9:name=systemd:/\n4:memory:/process_api/abc\n1:cpu,cpuacct:/x\n0::/user.slice\n";
        assert_eq!(own_path(s, "memory"), Some("/process_api/abc"));
        assert_eq!(own_path(s, "cpu"), Some("/x"));
        assert_eq!(own_path(s, "cpuacct"), Some("/x"));
        assert_eq!(own_path(s, ""), Some("/user.slice"));
        assert_eq!(own_path(s, "pids"), None);
    }

    /// On a host with a usable controller, a VM cgroup is created with the cap and removed.
    #[test]
    fn create_and_remove_when_available() {
        let mode = detect();
        let id = VmId::new(format!("cgtest-{}", std::process::id())).unwrap();
        let cg = create(&mode, &id, "t", 64 << 20, 1).unwrap();
        match (&mode, cg) {
            (CgroupMode::Unavailable { reason }, None) => {
                assert!(!reason.is_empty());
            }
            (_, Some(cg)) => {
                let limit_file = if cg.dirs[0].join("memory.max").exists() {
                    "memory.max"
                } else {
                    "memory.limit_in_bytes"
                };
                let v = std::fs::read_to_string(cg.dirs[0].join(limit_file)).unwrap();
                assert_eq!(v.trim(), (64u64 << 20).to_string());
                cg.remove().unwrap();
                assert!(cg.dirs.iter().all(|d| !d.exists()));
            }
            (m, None) => panic!("mode {m:?} but no cgroup created"),
        }
    }
}
