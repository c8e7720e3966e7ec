//! The signed envelope and the [`Verified<T>`] typestate.
//!
//! # Wire format
//!
//! An envelope is a CBOR map (ciborium) with four fields:
//!
//! | field | CBOR | meaning |
//! | --- | --- | --- |
//! | `k` | unsigned | [`MessageKind`] as its `u16` code |
//! | `s` | bytes(32) | signer: the author's [`NodeId`] (ed25519 public key) |
//! | `p` | bytes | payload: canonical CBOR of the message |
//! | `g` | bytes(64) | ed25519 signature over `domain(k) || 0x00 || p` |
//!
//! `domain(k)` is the ASCII tag `dwcp/v3/<kind name>` ([`MessageKind::domain`]), so a
//! signature made for one kind of message can never be replayed as another kind.
//!
//! # Decoding rules
//!
//! [`SignedEnvelope::decode_verified`] rejects, with a [`DecodeError`] and never a panic:
//! input longer than the kind's limit (checked before any parsing, against the largest limit,
//! and again against the kind's own limit), trailing bytes after the envelope or the payload,
//! an envelope whose bytes are not the canonical encoding of its fields, a kind other than the
//! one asked for, a signer that is not an ed25519 point, a signature that
//! fails `verify_strict`, a payload that does not decode as the message, a payload whose
//! re-encoding differs from the signed bytes (non-canonical encodings are malleable), and a
//! message that fails its own [`Message::validate`] bounds.

use std::{fmt, marker::PhantomData};

use ed25519_dalek::{Signature, Signer};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::{NodeId, NodeKey, ids::serde_bytes_compat, messages::ValidationError, sigcache};

/// Bytes an envelope adds around its payload: field names, lengths, key and signature.
pub const ENVELOPE_OVERHEAD: usize = 128;

/// The largest envelope of any kind; anything longer is rejected before it is parsed.
pub const MAX_ENVELOPE_SIZE: usize = 1024 * 1024 + ENVELOPE_OVERHEAD;

/// The kind of a signed message. Its code goes on the wire; its name goes into the signature's
/// domain-separation tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "u16", try_from = "u16")]
#[non_exhaustive]
pub enum MessageKind {
    /// A node announces itself: resources, region, version, addresses.
    NodeAnnouncement,
    /// A node's periodic liveness and health report.
    Heartbeat,
    /// A consensus (PBFT) protocol message.
    Consensus,
    /// A request submitted to consensus (e.g. quarantine a node).
    ConsensusRequest,
    /// A state-sync (Automerge) message or nudge.
    StateSync,
    /// A bulk-transfer control message.
    Transfer,
    /// A committee member's answer to a node that submitted a request: the commit
    /// certificate of that request.
    ConsensusReply,
}

impl MessageKind {
    /// Every kind, for tests and documentation.
    pub const ALL: [MessageKind; 7] = [
        Self::NodeAnnouncement,
        Self::Heartbeat,
        Self::Consensus,
        Self::ConsensusRequest,
        Self::StateSync,
        Self::Transfer,
        Self::ConsensusReply,
    ];

    /// The wire code.
    pub const fn code(self) -> u16 {
        match self {
            Self::NodeAnnouncement => 1,
            Self::Heartbeat => 2,
            Self::Consensus => 3,
            Self::ConsensusRequest => 4,
            Self::StateSync => 5,
            Self::Transfer => 6,
            Self::ConsensusReply => 7,
        }
    }

    /// The domain-separation tag signed in front of the payload.
    pub const fn domain(self) -> &'static str {
        match self {
            Self::NodeAnnouncement => "dwcp/v3/node-announcement",
            Self::Heartbeat => "dwcp/v3/heartbeat",
            Self::Consensus => "dwcp/v3/consensus",
            Self::ConsensusRequest => "dwcp/v3/consensus-request",
            Self::StateSync => "dwcp/v3/state-sync",
            Self::Transfer => "dwcp/v3/transfer",
            Self::ConsensusReply => "dwcp/v3/consensus-reply",
        }
    }

    /// The largest payload accepted for this kind, in bytes.
    pub const fn max_payload(self) -> usize {
        match self {
            Self::NodeAnnouncement => 8 * 1024,
            Self::Heartbeat => 1024,
            Self::Consensus => 256 * 1024,
            Self::ConsensusRequest => 64 * 1024,
            Self::StateSync => 1024 * 1024,
            Self::Transfer => 64 * 1024,
            Self::ConsensusReply => 64 * 1024,
        }
    }

    /// The largest whole envelope accepted for this kind, in bytes.
    pub const fn max_envelope(self) -> usize {
        self.max_payload() + ENVELOPE_OVERHEAD
    }
}

impl From<MessageKind> for u16 {
    fn from(k: MessageKind) -> u16 {
        k.code()
    }
}

impl TryFrom<u16> for MessageKind {
    type Error = DecodeError;

    fn try_from(code: u16) -> Result<Self, DecodeError> {
        Self::ALL
            .into_iter()
            .find(|k| k.code() == code)
            .ok_or(DecodeError::UnknownKind(code))
    }
}

impl fmt::Display for MessageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.domain().trim_start_matches("dwcp/v3/"))
    }
}

/// A message that travels inside a [`SignedEnvelope`].
pub trait Message: Serialize + DeserializeOwned {
    /// The kind this message is signed and sent as.
    const KIND: MessageKind;

    /// Checks bounds that the type system cannot (string lengths, list sizes, ranges).
    fn validate(&self) -> Result<(), ValidationError>;
}

/// Why bytes from the network were not accepted as a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input is longer than the limit for its kind.
    #[error("message of {len} bytes exceeds the {limit}-byte limit")]
    TooLarge {
        /// Input length.
        len: usize,
        /// The limit that applied.
        limit: usize,
    },
    /// The bytes are not a well-formed envelope.
    #[error("malformed envelope: {0}")]
    Malformed(String),
    /// Bytes follow the end of the envelope or of its payload.
    #[error("{0} trailing bytes")]
    TrailingBytes(usize),
    /// The kind code is not one this version knows.
    #[error("unknown message kind {0}")]
    UnknownKind(u16),
    /// The envelope holds another kind of message than the one expected.
    #[error("expected a {expected} message, got {got}")]
    WrongKind {
        /// Kind asked for.
        expected: MessageKind,
        /// Kind found.
        got: MessageKind,
    },
    /// The signer field is not a valid ed25519 public key.
    #[error("signer is not a valid ed25519 public key")]
    BadSigner,
    /// The signature does not verify for this signer, kind and payload.
    #[error("bad signature")]
    BadSignature,
    /// The payload does not decode as the message type.
    #[error("malformed payload: {0}")]
    MalformedPayload(String),
    /// The payload decodes but is not in canonical form (its re-encoding differs).
    #[error("payload is not canonically encoded")]
    NonCanonical,
    /// The message breaks a bound of its type.
    #[error("invalid message")]
    Invalid(#[from] ValidationError),
}

/// A signed message as it travels: kind, signer, payload bytes and signature. Holding one means
/// nothing about its validity; call [`SignedEnvelope::verify`] to get a [`Verified<T>`].
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedEnvelope {
    #[serde(rename = "k")]
    kind: MessageKind,
    #[serde(rename = "s")]
    signer: NodeId,
    #[serde(rename = "p", with = "serde_bytes_compat")]
    payload: Vec<u8>,
    #[serde(rename = "g", with = "serde_bytes_compat")]
    signature: Vec<u8>,
}

impl fmt::Debug for SignedEnvelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignedEnvelope")
            .field("kind", &self.kind)
            .field("signer", &self.signer)
            .field("payload_len", &self.payload.len())
            .finish_non_exhaustive()
    }
}

fn signed_bytes(kind: MessageKind, payload: &[u8]) -> Vec<u8> {
    let d = kind.domain().as_bytes();
    let mut m = Vec::with_capacity(d.len() + 1 + payload.len());
    m.extend_from_slice(d);
    m.push(0);
    m.extend_from_slice(payload);
    m
}

/// Encodes a value as CBOR. Serialising our own types into a `Vec` cannot fail: they contain
/// no maps with non-string keys and the writer is infallible.
pub(crate) fn to_cbor<T: Serialize + ?Sized>(v: &T) -> Vec<u8> {
    let mut out = Vec::new();
    if let Err(e) = ciborium::into_writer(v, &mut out) {
        // Unreachable for the types of this crate; keep the bytes empty so that verification
        // of whatever was produced fails loudly instead of panicking.
        debug_assert!(false, "cbor encoding failed: {e}");
        out.clear();
    }
    out
}

/// Decodes CBOR from a slice, rejecting trailing bytes.
pub(crate) fn from_cbor_exact<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, (String, usize)> {
    let mut rd = bytes;
    let v = ciborium::from_reader::<T, _>(&mut rd).map_err(|e| (e.to_string(), 0))?;
    if !rd.is_empty() {
        return Err((String::new(), rd.len()));
    }
    Ok(v)
}

impl SignedEnvelope {
    /// Signs `msg` with `key`.
    pub fn sign<T: Message>(key: &NodeKey, msg: &T) -> Self {
        let payload = to_cbor(msg);
        let sig: Signature = key.signing_key().sign(&signed_bytes(T::KIND, &payload));
        Self {
            kind: T::KIND,
            signer: key.node_id(),
            payload,
            signature: sig.to_bytes().to_vec(),
        }
    }

    /// Rebuilds the envelope a signer would have sent for `msg`, from its signature alone
    /// (compact certificates keep a vote's signature and its signer's committee index, not
    /// the whole envelope). Not verified: use [`SignedEnvelope::verify`].
    pub fn from_signature<T: Message>(signer: NodeId, msg: &T, signature: [u8; 64]) -> Self {
        Self {
            kind: T::KIND,
            signer,
            payload: to_cbor(msg),
            signature: signature.to_vec(),
        }
    }

    /// The 64-byte signature, if it has that length.
    pub fn signature_bytes(&self) -> Option<[u8; 64]> {
        self.signature.as_slice().try_into().ok()
    }

    /// Whether the payload is exactly the canonical encoding of `msg` (so the envelope can
    /// be rebuilt with [`SignedEnvelope::from_signature`]).
    pub fn carries<T: Message>(&self, msg: &T) -> bool {
        self.kind == T::KIND && self.payload == to_cbor(msg)
    }

    /// The envelope's bytes on the wire.
    pub fn encode(&self) -> Vec<u8> {
        to_cbor(self)
    }

    /// Parses an envelope of any kind, checking only its framing and size limits. The result is
    /// not verified; use [`SignedEnvelope::verify`].
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() > MAX_ENVELOPE_SIZE {
            return Err(DecodeError::TooLarge {
                len: bytes.len(),
                limit: MAX_ENVELOPE_SIZE,
            });
        }
        let env: Self = from_cbor_exact(bytes).map_err(|(e, trailing)| {
            if trailing > 0 {
                DecodeError::TrailingBytes(trailing)
            } else {
                DecodeError::Malformed(e)
            }
        })?;
        if bytes.len() > env.kind.max_envelope() {
            return Err(DecodeError::TooLarge {
                len: bytes.len(),
                limit: env.kind.max_envelope(),
            });
        }
        // One encoding per envelope: anything else (byte-string keys, long-form lengths, ...)
        // is refused, so an envelope's bytes identify it (used for dedup and as evidence).
        if env.encode() != bytes {
            return Err(DecodeError::NonCanonical);
        }
        Ok(env)
    }

    /// Decodes and verifies in one step: the usual path for bytes from the network.
    pub fn decode_verified<T: Message>(bytes: &[u8]) -> Result<Verified<T>, DecodeError> {
        if bytes.len() > T::KIND.max_envelope() {
            return Err(DecodeError::TooLarge {
                len: bytes.len(),
                limit: T::KIND.max_envelope(),
            });
        }
        Self::decode(bytes)?.verify()
    }

    /// The kind of message inside.
    pub fn kind(&self) -> MessageKind {
        self.kind
    }

    /// Who claims to have signed it (not yet checked).
    pub fn claimed_signer(&self) -> NodeId {
        self.signer
    }

    /// Checks the signature and decodes the payload as `T`.
    pub fn verify<T: Message>(self) -> Result<Verified<T>, DecodeError> {
        if self.kind != T::KIND {
            return Err(DecodeError::WrongKind {
                expected: T::KIND,
                got: self.kind,
            });
        }
        if self.payload.len() > T::KIND.max_payload() {
            return Err(DecodeError::TooLarge {
                len: self.payload.len(),
                limit: T::KIND.max_payload(),
            });
        }
        let sig_bytes: [u8; 64] = self
            .signature
            .as_slice()
            .try_into()
            .map_err(|_| DecodeError::BadSignature)?;
        let signed = signed_bytes(self.kind, &self.payload);
        // Only checks that succeeded are memoised, keyed by a hash of every input of the
        // check (see `sigcache`): a hit means these exact bytes verified before.
        let memo = sigcache::key(self.signer.as_bytes(), &sig_bytes, &signed);
        if !sigcache::verified_before(&memo) {
            let vk = self
                .signer
                .verifying_key()
                .map_err(|_| DecodeError::BadSigner)?;
            vk.verify_strict(&signed, &Signature::from_bytes(&sig_bytes))
                .map_err(|_| DecodeError::BadSignature)?;
            sigcache::remember(memo);
        }
        let msg: T = from_cbor_exact(&self.payload).map_err(|(e, trailing)| {
            if trailing > 0 {
                DecodeError::TrailingBytes(trailing)
            } else {
                DecodeError::MalformedPayload(e)
            }
        })?;
        if to_cbor(&msg) != self.payload {
            return Err(DecodeError::NonCanonical);
        }
        msg.validate()?;
        Ok(Verified {
            msg,
            envelope: self,
            _p: PhantomData,
        })
    }
}

/// A message whose signature has been checked and whose contents passed validation. Only
/// [`SignedEnvelope::verify`] (for received messages) and [`Verified::sign`] (for our own)
/// produce one.
#[derive(Clone, PartialEq, Eq)]
pub struct Verified<T> {
    msg: T,
    envelope: SignedEnvelope,
    _p: PhantomData<T>,
}

impl<T: Message> Verified<T> {
    /// Signs our own message; the result is verified by construction.
    pub fn sign(key: &NodeKey, msg: T) -> Result<Self, ValidationError> {
        msg.validate()?;
        let envelope = SignedEnvelope::sign(key, &msg);
        Ok(Self {
            msg,
            envelope,
            _p: PhantomData,
        })
    }
}

impl<T> Verified<T> {
    /// The node that signed it.
    pub fn signer(&self) -> NodeId {
        self.envelope.signer
    }

    /// The message.
    pub fn message(&self) -> &T {
        &self.msg
    }

    /// The envelope it came in, e.g. to relay it or to keep it as evidence.
    pub fn envelope(&self) -> &SignedEnvelope {
        &self.envelope
    }

    /// The message, dropping the envelope.
    pub fn into_message(self) -> T {
        self.msg
    }
}

impl<T: fmt::Debug> fmt::Debug for Verified<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verified")
            .field("signer", &self.signer())
            .field("msg", &self.msg)
            .finish()
    }
}

impl<T> std::ops::Deref for Verified<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.msg
    }
}
