//! Reads the host's resources and load from `/proc` and the filesystem. Used by the daemon to
//! fill `auto` (zero) resource values and the health numbers in heartbeats.

use std::path::Path;

/// Logical CPUs.
pub fn cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

fn meminfo_kib(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Physical memory, MiB.
pub fn memory_mib() -> u64 {
    meminfo_kib("MemTotal:").map(|k| k / 1024).unwrap_or(0)
}

/// Memory in use (total minus available), MiB.
pub fn memory_used_mib() -> u64 {
    match (meminfo_kib("MemTotal:"), meminfo_kib("MemAvailable:")) {
        (Some(t), Some(a)) => t.saturating_sub(a) / 1024,
        _ => 0,
    }
}

/// Free space of the filesystem holding `path`, GiB.
pub fn disk_free_gib(path: &Path) -> u64 {
    nix::sys::statvfs::statvfs(path)
        .map(|s| s.blocks_available() * s.fragment_size() / (1 << 30))
        .unwrap_or(0)
}

/// One-minute load average per CPU, in per-mille.
pub fn cpu_load_permille() -> u32 {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: f64 = text
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    ((load / f64::from(cpus())) * 1000.0)
        .round()
        .clamp(0.0, 100_000.0) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_host() {
        assert!(cpus() >= 1);
        assert!(memory_mib() > 0);
        assert!(memory_used_mib() <= memory_mib());
        assert!(disk_free_gib(Path::new("/")) < 1 << 30);
    }
}
