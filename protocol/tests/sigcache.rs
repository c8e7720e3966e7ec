//! The signature memo (`sigcache`): a second check of the same bytes is answered from it, and
//! no changed byte, reused signature or re-labelled signer gets through because the original
//! verified first. One test in its own binary, so the process-wide counters are this test's.
// Tests may unwrap: a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod common;

use common::heartbeat;
use dwcp_protocol::{DecodeError, Heartbeat, NodeKey, SignedEnvelope, signature_cache_stats};

#[test]
fn a_memoised_signature_never_vouches_for_other_bytes() {
    let k = NodeKey::from_secret_bytes([7; 32]);
    let env = SignedEnvelope::sign(&k, &heartbeat(1));
    let bytes = env.encode();

    assert_eq!(signature_cache_stats(), (0, 0));
    SignedEnvelope::decode_verified::<Heartbeat>(&bytes).unwrap();
    assert_eq!(signature_cache_stats(), (0, 1), "first check runs in full");
    let again = SignedEnvelope::decode_verified::<Heartbeat>(&bytes).unwrap();
    assert_eq!(again.message(), &heartbeat(1));
    assert_eq!(signature_cache_stats(), (1, 1), "second check is a hit");

    // Every single-bit change of the memoised envelope is still refused.
    for i in 0..bytes.len() {
        for bit in 0..8 {
            let mut b = bytes.clone();
            b[i] ^= 1 << bit;
            assert!(
                SignedEnvelope::decode_verified::<Heartbeat>(&b).is_err(),
                "flipping bit {bit} of byte {i} was accepted after the original verified"
            );
        }
    }

    // The memoised signature on another message, and under another signer, is refused.
    let sig = env.signature_bytes().unwrap();
    let reused = SignedEnvelope::from_signature(k.node_id(), &heartbeat(2), sig);
    assert_eq!(
        reused.verify::<Heartbeat>().err(),
        Some(DecodeError::BadSignature)
    );
    let other = NodeKey::from_secret_bytes([8; 32]).node_id();
    let relabelled = SignedEnvelope::from_signature(other, &heartbeat(1), sig);
    assert_eq!(
        relabelled.verify::<Heartbeat>().err(),
        Some(DecodeError::BadSignature)
    );

    // Failures are not memoised: the same forgery runs the full check again.
    let (hits, misses) = signature_cache_stats();
    let reused = SignedEnvelope::from_signature(k.node_id(), &heartbeat(2), sig);
    assert!(reused.verify::<Heartbeat>().is_err());
    assert_eq!(signature_cache_stats(), (hits, misses + 1));
}
