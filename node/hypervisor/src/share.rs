//! The donated share: how much of the host the volunteer lends, and the admission check.

use serde::{Deserialize, Serialize};

use crate::error::ShareError;
use crate::spec::VmSpec;

/// What the volunteer donated. Every defined VM (running or not) holds its vCPUs, memory and
/// disk against this share, so a stopped VM can always be started again.
///
/// Memory counts guest RAM. QEMU's own overhead is not counted against the share but is capped
/// per VM by its cgroup (guest RAM plus [`crate::qemu::QemuConfig::memory_overhead_mib`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DonatedShare {
    /// vCPUs lent, summed over all VMs.
    pub vcpus: u32,
    /// Guest memory lent in MiB, summed over all VMs.
    pub memory_mib: u64,
    /// Disk lent in MiB: the sum of the VMs' virtual disk sizes (overlays can grow to that).
    pub disk_mib: u64,
}

/// What the defined VMs hold now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareUsage {
    /// vCPUs held.
    pub vcpus: u32,
    /// Guest memory held in MiB.
    pub memory_mib: u64,
    /// Virtual disk held in MiB.
    pub disk_mib: u64,
}

impl ShareUsage {
    /// Adds one VM's holding.
    pub fn add(&mut self, vcpus: u32, memory_mib: u64, disk_mib: u64) {
        self.vcpus = self.vcpus.saturating_add(vcpus);
        self.memory_mib = self.memory_mib.saturating_add(memory_mib);
        self.disk_mib = self.disk_mib.saturating_add(disk_mib);
    }
}

impl DonatedShare {
    /// Refuses `spec` (with `disk_mib` its virtual disk size) when it does not fit next to
    /// `usage`.
    pub fn admit(
        &self,
        spec: &VmSpec,
        disk_mib: u64,
        usage: &ShareUsage,
    ) -> Result<(), ShareError> {
        let checks: [(&'static str, &'static str, u64, u64, u64); 3] = [
            (
                "vcpus",
                "vCPUs",
                u64::from(spec.vcpus),
                u64::from(usage.vcpus),
                u64::from(self.vcpus),
            ),
            (
                "memory",
                "MiB",
                spec.memory_mib,
                usage.memory_mib,
                self.memory_mib,
            ),
            ("disk", "MiB", disk_mib, usage.disk_mib, self.disk_mib),
        ];
        for (resource, unit, requested, in_use, donated) in checks {
            if requested.saturating_add(in_use) > donated {
                return Err(ShareError::Exceeds {
                    vm: spec.id.clone(),
                    resource,
                    unit,
                    requested,
                    in_use,
                    donated,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::VmId;

    fn spec(vcpus: u32, mem: u64) -> VmSpec {
        VmSpec::kernel_boot(VmId::new("a").unwrap(), vcpus, mem, "/k".into(), None, "")
    }

    #[test]
    fn admits_until_the_share_is_full() {
        let share = DonatedShare {
            vcpus: 4,
            memory_mib: 1024,
            disk_mib: 100,
        };
        let mut usage = ShareUsage::default();
        share.admit(&spec(2, 512), 50, &usage).unwrap();
        usage.add(2, 512, 50);
        share.admit(&spec(2, 512), 50, &usage).unwrap();
        usage.add(2, 512, 50);
        let err = share.admit(&spec(1, 16), 0, &usage).unwrap_err();
        assert_eq!(
            err,
            ShareError::Exceeds {
                vm: VmId::new("a").unwrap(),
                resource: "vcpus",
                unit: "vCPUs",
                requested: 1,
                in_use: 4,
                donated: 4
            }
        );
    }

    #[test]
    fn refuses_each_resource_with_a_clear_message() {
        let share = DonatedShare {
            vcpus: 8,
            memory_mib: 1024,
            disk_mib: 100,
        };
        let usage = ShareUsage::default();
        let e = share.admit(&spec(1, 2048), 0, &usage).unwrap_err();
        assert_eq!(
            e.to_string(),
            "vm 'a' does not fit the donated share: memory needs 2048 MiB, donated 1024 MiB, 0 MiB already in use"
        );
        let e = share.admit(&spec(1, 64), 101, &usage).unwrap_err();
        assert!(matches!(
            e,
            ShareError::Exceeds {
                resource: "disk",
                ..
            }
        ));
        let e = share.admit(&spec(9, 64), 0, &usage).unwrap_err();
        assert!(matches!(
            e,
            ShareError::Exceeds {
                resource: "vcpus",
                ..
            }
        ));
    }
}
