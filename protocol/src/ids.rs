//! Identifiers: [`NodeId`] (an ed25519 public key, convertible to and from a libp2p
//! `PeerId`), [`NodeKey`] (the secret half), [`VmId`] and [`Timestamp`].

use std::fmt;

use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

/// Why an identifier could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// The bytes are not a valid ed25519 public key.
    #[error("not a valid ed25519 public key")]
    InvalidKey,
    /// The peer id does not embed an ed25519 public key (other key types are not DWCP nodes).
    #[error("peer id does not embed an ed25519 public key")]
    NotEd25519PeerId,
    /// The text is not valid hexadecimal of the right length.
    #[error("expected {expected} hex characters")]
    BadHex {
        /// Number of hex characters expected.
        expected: usize,
    },
    /// The text is neither a hex node id nor a libp2p peer id.
    #[error("not a node id (64 hex characters) or a libp2p peer id")]
    Unparseable,
}

/// A node's identity: its ed25519 public key. The same key is the node's libp2p identity, so a
/// `NodeId` converts losslessly to and from a libp2p [`PeerId`](libp2p_identity::PeerId).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(#[serde(with = "hex_bytes32")] [u8; 32]);

impl NodeId {
    /// Builds a node id from a public key's 32 bytes, checking that they are a valid point.
    pub fn from_bytes(bytes: [u8; 32]) -> Result<Self, IdError> {
        VerifyingKey::from_bytes(&bytes).map_err(|_| IdError::InvalidKey)?;
        Ok(Self(bytes))
    }

    /// The public key's 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The ed25519 verifying key.
    pub fn verifying_key(&self) -> Result<VerifyingKey, IdError> {
        VerifyingKey::from_bytes(&self.0).map_err(|_| IdError::InvalidKey)
    }

    /// The libp2p peer id of this node.
    pub fn to_peer_id(&self) -> Result<libp2p_identity::PeerId, IdError> {
        let pk = libp2p_identity::ed25519::PublicKey::try_from_bytes(&self.0)
            .map_err(|_| IdError::InvalidKey)?;
        Ok(libp2p_identity::PublicKey::from(pk).to_peer_id())
    }

    /// The node id embedded in a libp2p peer id (ed25519 peer ids embed the whole key).
    pub fn from_peer_id(peer: &libp2p_identity::PeerId) -> Result<Self, IdError> {
        let mh = peer.as_ref();
        // Code 0x00 is the identity multihash: the digest is the protobuf-encoded public key.
        if mh.code() != 0x00 {
            return Err(IdError::NotEd25519PeerId);
        }
        let pk = libp2p_identity::PublicKey::try_decode_protobuf(mh.digest())
            .map_err(|_| IdError::NotEd25519PeerId)?;
        let ed = pk
            .try_into_ed25519()
            .map_err(|_| IdError::NotEd25519PeerId)?;
        Self::from_bytes(ed.to_bytes())
    }

    /// A short form for logs and tables: the first 8 hex characters.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.short())
    }
}

impl std::str::FromStr for NodeId {
    type Err = IdError;

    /// Parses 64 hex characters, or a libp2p peer id in its base58 form.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() == 64 {
            let mut b = [0u8; 32];
            hex::decode_to_slice(s, &mut b).map_err(|_| IdError::BadHex { expected: 64 })?;
            return Self::from_bytes(b);
        }
        let peer: libp2p_identity::PeerId = s.parse().map_err(|_| IdError::Unparseable)?;
        Self::from_peer_id(&peer)
    }
}

/// A node's secret signing key. Its public half is the node's [`NodeId`].
#[derive(Clone)]
pub struct NodeKey(SigningKey);

impl NodeKey {
    /// Generates a new key from a cryptographically secure RNG.
    pub fn generate<R: rand_core::CryptoRng + ?Sized>(rng: &mut R) -> Self {
        Self(SigningKey::generate(rng))
    }

    /// Rebuilds a key from its 32 secret bytes.
    pub fn from_secret_bytes(bytes: [u8; 32]) -> Self {
        Self(SigningKey::from_bytes(&bytes))
    }

    /// The 32 secret bytes (store them with 0600 permissions).
    pub fn secret_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// This key's node id.
    pub fn node_id(&self) -> NodeId {
        NodeId(self.0.verifying_key().to_bytes())
    }

    /// The same key as a libp2p keypair, so the node's libp2p identity is its DWCP identity.
    pub fn to_libp2p(&self) -> libp2p_identity::Keypair {
        let mut secret = self.0.to_bytes();
        // `try_from_bytes` zeroes its input; the copy is ours. A 32-byte ed25519 secret is
        // always valid, so the error branch cannot be taken.
        match libp2p_identity::ed25519::SecretKey::try_from_bytes(&mut secret) {
            Ok(sk) => libp2p_identity::Keypair::from(libp2p_identity::ed25519::Keypair::from(sk)),
            Err(_) => unreachable!("any 32 bytes are a valid ed25519 secret key"),
        }
    }

    pub(crate) fn signing_key(&self) -> &SigningKey {
        &self.0
    }
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeKey(public={})", self.node_id().short())
    }
}

/// A VM's identifier: 16 random bytes chosen when the VM is requested.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct VmId(#[serde(with = "hex_bytes16")] [u8; 16]);

impl VmId {
    /// Builds an id from its bytes.
    pub const fn from_bytes(b: [u8; 16]) -> Self {
        Self(b)
    }

    /// The id's bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for VmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for VmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VmId({self})")
    }
}

impl std::str::FromStr for VmId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut b = [0u8; 16];
        hex::decode_to_slice(s, &mut b).map_err(|_| IdError::BadHex { expected: 32 })?;
        Ok(Self(b))
    }
}

/// Milliseconds since the Unix epoch. Cores take it as an input; only drivers read clocks.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// Builds a timestamp from milliseconds.
    pub const fn from_millis(ms: u64) -> Self {
        Self(ms)
    }

    /// Milliseconds since the epoch.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// Milliseconds from `earlier` to `self`, zero if `earlier` is later.
    pub const fn saturating_since(self, earlier: Timestamp) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

macro_rules! hex_bytes_mod {
    ($name:ident, $n:expr) => {
        /// Serialises fixed-size byte arrays as hex strings in human-readable formats (JSON)
        /// and as CBOR byte strings otherwise.
        mod $name {
            use serde::{Deserialize, Deserializer, Serializer, de::Error};

            pub(crate) fn serialize<S: Serializer>(b: &[u8; $n], s: S) -> Result<S::Ok, S::Error> {
                if s.is_human_readable() {
                    s.serialize_str(&hex::encode(b))
                } else {
                    s.serialize_bytes(b)
                }
            }

            pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
                d: D,
            ) -> Result<[u8; $n], D::Error> {
                let mut out = [0u8; $n];
                if d.is_human_readable() {
                    let s = String::deserialize(d)?;
                    hex::decode_to_slice(&s, &mut out).map_err(D::Error::custom)?;
                } else {
                    let v = crate::ids::serde_bytes_compat::deserialize(d)?;
                    if v.len() != $n {
                        return Err(D::Error::invalid_length(v.len(), &stringify!($n)));
                    }
                    out.copy_from_slice(&v);
                }
                Ok(out)
            }
        }
    };
}

hex_bytes_mod!(hex_bytes32, 32);
hex_bytes_mod!(hex_bytes16, 16);

/// Deserialises a CBOR byte string (or, leniently, an array of u8) into a `Vec<u8>`.
pub(crate) mod serde_bytes_compat {
    use serde::{Deserializer, de};
    use std::fmt;

    struct V;

    impl<'de> de::Visitor<'de> for V {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a byte string")
        }

        fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Self::Value, E> {
            Ok(v)
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        // `deserialize_byte_buf`: ciborium refuses byte strings longer than its 4 KiB scratch
        // buffer through `deserialize_bytes`.
        d.deserialize_byte_buf(V)
    }

    /// Serialises a byte vector as a CBOR byte string (not an array of integers).
    pub(crate) fn serialize<S: serde::Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_peer_id_round_trip() {
        let key = NodeKey::from_secret_bytes([7u8; 32]);
        let id = key.node_id();
        let peer = id.to_peer_id().unwrap();
        assert_eq!(peer, key.to_libp2p().public().to_peer_id());
        assert_eq!(NodeId::from_peer_id(&peer).unwrap(), id);
        assert_eq!(id.to_string().parse::<NodeId>().unwrap(), id);
        assert_eq!(peer.to_string().parse::<NodeId>().unwrap(), id);
    }

    #[test]
    fn non_ed25519_peer_id_is_rejected() {
        let peer = libp2p_identity::PeerId::random();
        assert_eq!(NodeId::from_peer_id(&peer), Err(IdError::NotEd25519PeerId));
    }

    #[test]
    fn vm_id_parses_and_rejects_bad_hex() {
        let v = VmId::from_bytes([0xab; 16]);
        assert_eq!(v.to_string().parse::<VmId>().unwrap(), v);
        assert_eq!("xyz".parse::<VmId>(), Err(IdError::BadHex { expected: 32 }));
    }

    #[test]
    fn node_id_json_is_hex() {
        let id = NodeKey::from_secret_bytes([1u8; 32]).node_id();
        let j = serde_json::to_string(&id).unwrap();
        assert_eq!(j, format!("\"{id}\""));
        assert_eq!(serde_json::from_str::<NodeId>(&j).unwrap(), id);
    }
}
