//! Fuzzes the signed-envelope decoder: arbitrary bytes must never panic, and whatever decodes
//! and verifies must re-encode to the same bytes.
#![no_main]

use dwcp_protocol::{Heartbeat, NodeAnnouncement, SignedEnvelope};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = SignedEnvelope::decode(data) {
        assert_eq!(env.encode(), data, "decode accepted a non-canonical envelope");
    }
    if let Ok(v) = SignedEnvelope::decode_verified::<Heartbeat>(data) {
        assert_eq!(v.envelope().encode(), data);
    }
    let _ = SignedEnvelope::decode_verified::<NodeAnnouncement>(data);
});
