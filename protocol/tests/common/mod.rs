//! Fixtures shared by the protocol's test binaries.

use dwcp_protocol::{Health, HealthStatus, Heartbeat, Timestamp};

/// A valid heartbeat with sequence number `seq`.
pub(crate) fn heartbeat(seq: u64) -> Heartbeat {
    Heartbeat {
        cluster_id: "test".into(),
        seq,
        issued_at: Timestamp::from_millis(5),
        uptime_s: 10,
        health: Health {
            status: HealthStatus::Healthy,
            cpu_load_permille: 120,
            memory_used_mib: 512,
            vms_running: 0,
            peers_connected: 3,
            allocated: None,
        },
    }
}
