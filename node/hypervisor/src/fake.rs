//! `FakeBackend` (feature `test-utils`): an in-memory [`Backend`] for tests of the node's
//! wiring (API, CLI, metrics) without QEMU. It keeps the real admission rules (the
//! [`DonatedShare`] check) and the lifecycle state machine, and runs no guest: its serial log
//! is a line per lifecycle event, its stats are zero, and a migration completes at once.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use crate::backend::{
    Backend, BackendInfo, BoxFuture, CgroupMode, MigrationChannel, MigrationParams,
    MigrationProgress, MigrationStatus,
};
use crate::error::Error;
use crate::share::{DonatedShare, ShareUsage};
use crate::spec::{VmId, VmInfo, VmSpec, VmState, VmStats};

#[derive(Debug)]
struct FakeVm {
    spec: VmSpec,
    state: VmState,
    log: String,
    migration: MigrationStatus,
}

/// An in-memory backend for tests. Not a hypervisor.
#[derive(Debug)]
pub struct FakeBackend {
    share: DonatedShare,
    vms: Mutex<BTreeMap<VmId, FakeVm>>,
}

impl FakeBackend {
    /// A fake with this donated share.
    pub fn new(share: DonatedShare) -> Self {
        FakeBackend {
            share,
            vms: Mutex::new(BTreeMap::new()),
        }
    }

    fn with<T>(
        &self,
        id: &VmId,
        f: impl FnOnce(&mut FakeVm) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let mut vms = self.vms.lock().unwrap_or_else(|p| p.into_inner());
        let vm = vms.get_mut(id).ok_or_else(|| Error::NotFound(id.clone()))?;
        f(vm)
    }

    fn transition(
        &self,
        id: &VmId,
        op: &'static str,
        from: &[VmState],
        to: VmState,
    ) -> Result<(), Error> {
        self.with(id, |vm| {
            if !from.contains(&vm.state) {
                return Err(Error::WrongState {
                    vm: id.clone(),
                    state: vm.state.to_string(),
                    op,
                });
            }
            vm.state = to;
            vm.log.push_str(&format!("fake: {op} -> {to}\n"));
            Ok(())
        })
    }
}

fn info(vm: &FakeVm) -> VmInfo {
    VmInfo {
        id: vm.spec.id.clone(),
        state: vm.state,
        vcpus: vm.spec.vcpus,
        memory_mib: vm.spec.memory_mib,
        pid: None,
    }
}

impl Backend for FakeBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            kind: "fake".into(),
            accel: None,
            accel_reason: "fake backend runs no guests".into(),
            cpu_model: "qemu64".into(),
            cgroup: CgroupMode::Unavailable {
                reason: "fake backend".into(),
            },
            version: "fake".into(),
        }
    }

    fn define(&self, spec: VmSpec) -> BoxFuture<'_, VmInfo> {
        let res = (|| {
            spec.validate()?;
            let mut vms = self.vms.lock().unwrap_or_else(|p| p.into_inner());
            if vms.contains_key(&spec.id) {
                return Err(Error::AlreadyExists(spec.id.clone()));
            }
            let disk = spec.disk.as_ref().and_then(|d| d.size_mib).unwrap_or(0);
            let mut usage = ShareUsage::default();
            for v in vms.values() {
                let d = v.spec.disk.as_ref().and_then(|d| d.size_mib).unwrap_or(0);
                usage.add(v.spec.vcpus, v.spec.memory_mib, d);
            }
            self.share.admit(&spec, disk, &usage)?;
            let vm = FakeVm {
                spec: spec.clone(),
                state: VmState::Defined,
                log: String::new(),
                migration: MigrationStatus::None,
            };
            let i = info(&vm);
            vms.insert(spec.id.clone(), vm);
            Ok(i)
        })();
        Box::pin(async move { res })
    }

    fn start<'a>(&'a self, id: &'a VmId) -> BoxFuture<'a, ()> {
        let r = self.transition(id, "start", &[VmState::Defined], VmState::Running);
        Box::pin(async move { r })
    }

    fn pause<'a>(&'a self, id: &'a VmId) -> BoxFuture<'a, ()> {
        let r = self.transition(id, "pause", &[VmState::Running], VmState::Paused);
        Box::pin(async move { r })
    }

    fn resume<'a>(&'a self, id: &'a VmId) -> BoxFuture<'a, ()> {
        let r = self.transition(id, "resume", &[VmState::Paused], VmState::Running);
        Box::pin(async move { r })
    }

    fn stop<'a>(&'a self, id: &'a VmId, _grace: Duration) -> BoxFuture<'a, ()> {
        let r = self.with(id, |vm| {
            vm.state = VmState::Defined;
            vm.log.push_str("fake: stop -> defined\n");
            Ok(())
        });
        Box::pin(async move { r })
    }

    fn destroy<'a>(&'a self, id: &'a VmId) -> BoxFuture<'a, ()> {
        let mut vms = self.vms.lock().unwrap_or_else(|p| p.into_inner());
        let r = vms
            .remove(id)
            .map(|_| ())
            .ok_or_else(|| Error::NotFound(id.clone()));
        Box::pin(async move { r })
    }

    fn list(&self) -> BoxFuture<'_, Vec<VmInfo>> {
        let vms = self.vms.lock().unwrap_or_else(|p| p.into_inner());
        let l = vms.values().map(info).collect();
        Box::pin(async move { Ok(l) })
    }

    fn inspect<'a>(&'a self, id: &'a VmId) -> BoxFuture<'a, VmInfo> {
        let r = self.with(id, |vm| Ok(info(vm)));
        Box::pin(async move { r })
    }

    fn stats<'a>(&'a self, id: &'a VmId) -> BoxFuture<'a, VmStats> {
        let r = self.with(id, |vm| {
            Ok(VmStats {
                vcpu_time_ns: 0,
                memory_bytes: vm.spec.memory_mib << 20,
                host_rss_bytes: None,
                cgroup_memory_peak_bytes: None,
                dirty_rate_mib_per_s: None,
            })
        });
        Box::pin(async move { r })
    }

    fn serial_log<'a>(&'a self, id: &'a VmId, max_bytes: usize) -> BoxFuture<'a, String> {
        let r = self.with(id, |vm| {
            let start = vm.log.len().saturating_sub(max_bytes);
            let start = (start..vm.log.len())
                .find(|&i| vm.log.is_char_boundary(i))
                .unwrap_or(vm.log.len());
            Ok(vm.log[start..].to_owned())
        });
        Box::pin(async move { r })
    }

    fn start_incoming<'a>(&'a self, id: &'a VmId, _channel: MigrationChannel) -> BoxFuture<'a, ()> {
        let r = self.transition(id, "start_incoming", &[VmState::Defined], VmState::Incoming);
        Box::pin(async move { r })
    }

    fn migrate<'a>(&'a self, id: &'a VmId, _channel: MigrationChannel) -> BoxFuture<'a, ()> {
        let r = self.with(id, |vm| {
            if !matches!(vm.state, VmState::Running | VmState::Paused) {
                return Err(Error::WrongState {
                    vm: id.clone(),
                    state: vm.state.to_string(),
                    op: "migrate",
                });
            }
            vm.migration = MigrationStatus::Completed;
            vm.state = VmState::Paused;
            vm.log.push_str("fake: migrated away\n");
            Ok(())
        });
        Box::pin(async move { r })
    }

    fn migration_progress<'a>(&'a self, id: &'a VmId) -> BoxFuture<'a, MigrationProgress> {
        let r = self.with(id, |vm| {
            Ok(MigrationProgress {
                status: vm.migration,
                transferred_bytes: 0,
                remaining_bytes: 0,
                total_bytes: vm.spec.memory_mib << 20,
                dirty_pages_per_s: 0,
                passes: 0,
                elapsed_ms: 0,
                downtime_ms: None,
                error: None,
            })
        });
        Box::pin(async move { r })
    }

    fn set_migration_params<'a>(
        &'a self,
        id: &'a VmId,
        _params: MigrationParams,
    ) -> BoxFuture<'a, ()> {
        let r = self.with(id, |_| Ok(()));
        Box::pin(async move { r })
    }

    fn cancel_migration<'a>(&'a self, id: &'a VmId) -> BoxFuture<'a, ()> {
        let r = self.with(id, |vm| {
            if vm.migration == MigrationStatus::Active {
                vm.migration = MigrationStatus::Cancelled;
            }
            Ok(())
        });
        Box::pin(async move { r })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fake_keeps_share_and_state_rules() {
        let b = FakeBackend::new(DonatedShare {
            vcpus: 2,
            memory_mib: 256,
            disk_mib: 0,
        });
        let id = VmId::new("f1").unwrap();
        let spec = VmSpec::kernel_boot(id.clone(), 1, 128, "/k".into(), None, "");
        b.define(spec).await.unwrap();
        assert!(matches!(
            b.pause(&id).await,
            Err(Error::WrongState { op: "pause", .. })
        ));
        b.start(&id).await.unwrap();
        b.pause(&id).await.unwrap();
        assert_eq!(b.inspect(&id).await.unwrap().state, VmState::Paused);
        let big = VmSpec::kernel_boot(VmId::new("f2").unwrap(), 1, 256, "/k".into(), None, "");
        assert!(matches!(b.define(big).await, Err(Error::Share(_))));
        b.destroy(&id).await.unwrap();
        assert!(b.list().await.unwrap().is_empty());
    }
}
