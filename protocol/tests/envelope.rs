//! Envelope round trips, tampering, wrong keys, limits and a property test over arbitrary
//! messages.
// Tests may unwrap: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use dwcp_protocol::{
    DecodeError, DonatedShare, Gpu, Health, HealthStatus, Heartbeat, MessageKind, NodeAnnouncement,
    NodeKey, Resources, SignedEnvelope, Timestamp, ValidationError, Verified,
};
use proptest::prelude::*;

mod common;

use common::heartbeat;

fn key(b: u8) -> NodeKey {
    NodeKey::from_secret_bytes([b; 32])
}

fn announcement() -> NodeAnnouncement {
    NodeAnnouncement {
        cluster_id: "test".into(),
        seq: 3,
        issued_at: Timestamp::from_millis(1_700_000_000_000),
        region: "eu-west-1".into(),
        version: "3.0.0".into(),
        resources: Resources {
            vcpus: 16,
            memory_mib: 65536,
            disk_gib: 1000,
            gpus: vec![Gpu {
                model: "nvidia-a100".into(),
                count: 1,
            }],
        },
        donated: DonatedShare {
            vcpus: 8,
            memory_mib: 32768,
            disk_gib: 200,
            uplink_mbps: 100,
        },
        listen_addrs: vec!["/ip4/127.0.0.1/tcp/4001".into()],
    }
}

#[test]
fn round_trip() {
    let k = key(1);
    let bytes = SignedEnvelope::sign(&k, &announcement()).encode();
    let v = SignedEnvelope::decode_verified::<NodeAnnouncement>(&bytes).unwrap();
    assert_eq!(v.signer(), k.node_id());
    assert_eq!(v.message(), &announcement());
    assert_eq!(v.envelope().encode(), bytes);
}

#[test]
fn every_flipped_bit_is_rejected() {
    let bytes = SignedEnvelope::sign(&key(1), &heartbeat(1)).encode();
    for i in 0..bytes.len() {
        for bit in 0..8 {
            let mut b = bytes.clone();
            b[i] ^= 1 << bit;
            assert!(
                SignedEnvelope::decode_verified::<Heartbeat>(&b).is_err(),
                "flipping bit {bit} of byte {i} was accepted"
            );
        }
    }
}

#[test]
fn wrong_key_is_rejected() {
    // Re-label an envelope signed by key 1 as signed by key 2.
    let env = SignedEnvelope::sign(&key(1), &heartbeat(1));
    let mut v: ciborium::Value = ciborium::from_reader(env.encode().as_slice()).unwrap();
    let ciborium::Value::Map(entries) = &mut v else {
        panic!("envelope is a map")
    };
    for (k, val) in entries.iter_mut() {
        if k.as_text() == Some("s") {
            *val = ciborium::Value::Bytes(key(2).node_id().as_bytes().to_vec());
        }
    }
    let mut forged = Vec::new();
    ciborium::into_writer(&v, &mut forged).unwrap();
    assert_eq!(
        SignedEnvelope::decode_verified::<Heartbeat>(&forged),
        Err(DecodeError::BadSignature)
    );
}

#[test]
fn wrong_kind_is_rejected() {
    let bytes = SignedEnvelope::sign(&key(1), &heartbeat(1)).encode();
    assert_eq!(
        SignedEnvelope::decode_verified::<NodeAnnouncement>(&bytes),
        Err(DecodeError::WrongKind {
            expected: MessageKind::NodeAnnouncement,
            got: MessageKind::Heartbeat
        })
    );
}

#[test]
fn trailing_bytes_are_rejected() {
    let mut bytes = SignedEnvelope::sign(&key(1), &heartbeat(1)).encode();
    bytes.push(0);
    assert_eq!(
        SignedEnvelope::decode_verified::<Heartbeat>(&bytes),
        Err(DecodeError::TrailingBytes(1))
    );
}

#[test]
fn oversized_input_is_rejected_before_parsing() {
    let big = vec![0u8; MessageKind::Heartbeat.max_envelope() + 1];
    assert!(matches!(
        SignedEnvelope::decode_verified::<Heartbeat>(&big),
        Err(DecodeError::TooLarge { .. })
    ));
    let huge = vec![0u8; 4 * 1024 * 1024];
    assert!(matches!(
        SignedEnvelope::decode(&huge),
        Err(DecodeError::TooLarge { .. })
    ));
}

#[test]
fn oversized_but_signed_message_is_rejected() {
    let mut a = announcement();
    a.listen_addrs = vec!["x".repeat(200); 16];
    a.region = "r".repeat(64);
    // Validation bounds keep a signed announcement below its envelope limit ...
    let bytes = SignedEnvelope::sign(&key(1), &a).encode();
    assert!(bytes.len() <= MessageKind::NodeAnnouncement.max_envelope());
    // ... and a message that breaks them is refused even with a good signature.
    a.listen_addrs.push("one too many".into());
    let bytes = SignedEnvelope::sign(&key(1), &a).encode();
    assert_eq!(
        SignedEnvelope::decode_verified::<NodeAnnouncement>(&bytes),
        Err(DecodeError::Invalid(ValidationError::TooMany {
            field: "listen_addrs",
            len: 17,
            max: 16
        }))
    );
}

#[test]
fn garbage_is_rejected_without_panic() {
    for g in [&b""[..], b"\xff", b"\xa0", b"hello world", &[0x9f; 64]] {
        assert!(SignedEnvelope::decode_verified::<Heartbeat>(g).is_err());
    }
}

#[test]
fn donated_share_above_resources_is_invalid() {
    let mut a = announcement();
    a.donated.vcpus = 17;
    assert!(Verified::sign(&key(1), a).is_err());
}

prop_compose! {
    fn arb_heartbeat()(seq in any::<u64>(), at in any::<u64>(), up in any::<u64>(),
                       load in 0u32..=100_000, mem in any::<u64>(), vms in any::<u32>(),
                       peers in any::<u32>(), st in 0u8..4, cluster in "[a-z0-9-]{0,64}")
                       -> Heartbeat {
        let status = [HealthStatus::Healthy, HealthStatus::Degraded, HealthStatus::Paused,
                      HealthStatus::Draining][st as usize];
        Heartbeat { cluster_id: cluster, seq, issued_at: Timestamp(at), uptime_s: up,
            health: Health { status, cpu_load_permille: load, memory_used_mib: mem,
                             vms_running: vms, peers_connected: peers, allocated: None } }
    }
}

prop_compose! {
    fn arb_announcement()(seq in any::<u64>(), region in "\\PC{0,16}", version in "[0-9.]{1,12}",
                          vcpus in 1u32..1024, mem in 1u64..1<<40, disk in 1u64..1<<20,
                          gpus in prop::collection::vec(("[a-z0-9-]{1,20}", 0u32..8), 0..4),
                          addrs in prop::collection::vec("/ip4/[0-9.]{7,15}/tcp/[0-9]{1,5}", 0..8),
                          share in 0u32..=100)
                          -> NodeAnnouncement {
        NodeAnnouncement {
            cluster_id: "c".into(), seq, issued_at: Timestamp(seq), region, version,
            resources: Resources { vcpus, memory_mib: mem, disk_gib: disk,
                gpus: gpus.into_iter().map(|(model, count)| Gpu { model, count }).collect() },
            donated: DonatedShare { vcpus: vcpus * share / 100, memory_mib: mem * u64::from(share) / 100,
                disk_gib: disk * u64::from(share) / 100, uplink_mbps: share },
            listen_addrs: addrs,
        }
    }
}

proptest! {
    #[test]
    fn heartbeat_round_trips(hb in arb_heartbeat(), k in any::<[u8; 32]>()) {
        let key = NodeKey::from_secret_bytes(k);
        let bytes = SignedEnvelope::sign(&key, &hb).encode();
        let v = SignedEnvelope::decode_verified::<Heartbeat>(&bytes).unwrap();
        prop_assert_eq!(v.message(), &hb);
        prop_assert_eq!(v.signer(), key.node_id());
    }

    #[test]
    fn announcement_round_trips(a in arb_announcement(), k in any::<[u8; 32]>()) {
        let key = NodeKey::from_secret_bytes(k);
        let bytes = SignedEnvelope::sign(&key, &a).encode();
        let v = SignedEnvelope::decode_verified::<NodeAnnouncement>(&bytes).unwrap();
        prop_assert_eq!(v.message(), &a);
    }

    #[test]
    fn arbitrary_bytes_never_panic(b in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = SignedEnvelope::decode_verified::<Heartbeat>(&b);
        let _ = SignedEnvelope::decode_verified::<NodeAnnouncement>(&b);
    }

    #[test]
    fn truncations_are_rejected(hb in arb_heartbeat(), cut in 1usize..64) {
        let bytes = SignedEnvelope::sign(&NodeKey::from_secret_bytes([9; 32]), &hb).encode();
        let cut = cut.min(bytes.len());
        prop_assert!(SignedEnvelope::decode_verified::<Heartbeat>(&bytes[..bytes.len() - cut]).is_err());
    }
}

#[test]
fn payloads_larger_than_4_kib_round_trip() {
    // ciborium's borrowed-bytes path stops at 4 KiB; envelopes must not.
    let mut a = announcement();
    a.listen_addrs = (0..16)
        .map(|i| format!("/dns4/{}.example/tcp/{i}", "h".repeat(230)))
        .collect();
    let bytes = SignedEnvelope::sign(&key(1), &a).encode();
    assert!(
        bytes.len() > 4096 + 128,
        "payload must exceed 4 KiB, got {}",
        bytes.len()
    );
    let v = SignedEnvelope::decode_verified::<NodeAnnouncement>(&bytes).unwrap();
    assert_eq!(v.message(), &a);
}
