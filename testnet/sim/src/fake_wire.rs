//! A stand-in for `SignedEnvelope::decode_verified` for envelopes whose payload is longer
//! than 4 KiB, which the protocol crate cannot decode yet: its byte-string deserializer calls
//! ciborium's `deserialize_bytes`, which refuses byte strings longer than ciborium's 4 KiB
//! scratch buffer (fix: `deserialize_byte_buf` in `protocol/src/ids.rs`
//! `serde_bytes_compat::deserialize`; reported to the lead).
//!
//! For such envelopes the simulator parses the wire layout itself (with a scratch buffer as
//! large as the message), decodes the payload, signs it again with the claimed signer's key
//! (the simulator holds every key; ed25519 signing is deterministic) and accepts the message
//! only if the result is byte-for-byte the received envelope. That accepts exactly what
//! `decode_verified` accepts for messages signed the standard way, and rejects every forged
//! signer, corrupted signature or non-canonical encoding. Smaller envelopes take the real path.

use std::collections::BTreeMap;

use dwcp_protocol::{Message, NodeId, NodeKey, SignedEnvelope, Verified};
use serde::Deserialize;

#[derive(Deserialize)]
struct RawEnvelope {
    k: u16,
    s: NodeId,
    #[serde(with = "byte_buf")]
    p: Vec<u8>,
}

mod byte_buf {
    use serde::{Deserializer, de};
    use std::fmt;

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
        }
        d.deserialize_byte_buf(V)
    }
}

/// Payload length up to which the protocol crate's decoder works.
const REAL_PATH_MAX_PAYLOAD: usize = 4000;

/// Decodes and verifies `bytes` as a `T`.
pub(crate) fn fake_decode_verified<T: Message>(
    bytes: &[u8],
    keys: &BTreeMap<NodeId, NodeKey>,
) -> Option<Verified<T>> {
    if bytes.len() <= REAL_PATH_MAX_PAYLOAD {
        return SignedEnvelope::decode_verified::<T>(bytes).ok();
    }
    if bytes.len() > T::KIND.max_envelope() {
        return None;
    }
    let mut scratch = vec![0u8; bytes.len()];
    let raw: RawEnvelope = ciborium::de::from_reader_with_buffer(bytes, &mut scratch).ok()?;
    if raw.k != T::KIND.code() || raw.p.len() > T::KIND.max_payload() {
        return None;
    }
    let key = keys.get(&raw.s)?;
    let msg: T = ciborium::de::from_reader_with_buffer(raw.p.as_slice(), &mut scratch).ok()?;
    let v = Verified::sign(key, msg).ok()?;
    (v.envelope().encode() == bytes).then_some(v)
}
