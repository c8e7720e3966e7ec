//! Frames exchanged between state-sync engines.
//!
//! ```text
//! frame  = "DS" | version (u8 = 1) | type (u8) | epoch (u64 BE) | body
//! sync   (type 1) = nsigs (u32) | nsigs x (change hash [32] | ed25519 signature [64])
//!                 | len (u32) | Automerge sync message [len]
//! nudge  (type 2) = nheads (u16) | nheads x change hash [32]
//!                 | nchanges (u16) | nchanges x (len (u32) | change bytes | signature [64])
//! probe  (type 3) = SHA-256 of the sender's sorted heads [32]
//! ```
//!
//! A probe is the anti-entropy heartbeat between peers that believe they are in sync: 44
//! bytes instead of a sync message listing every head (which, with hundreds of concurrent
//! writers, is kilobytes). A peer whose heads differ answers with a full sync message.
//!
//! A sync frame travels point to point (request-response on the mesh) between two
//! authenticated peers; it carries the signatures of every change inside the Automerge
//! message, because those changes may have been authored by third nodes. A nudge is published
//! on gossipsub when local state changes: it carries the author's heads and, when they are
//! small, the new changes themselves, so news spreads at gossip speed instead of waiting for
//! the next anti-entropy round. Every length is checked against the bytes present and the
//! caller's limit before anything is allocated.

use automerge::ChangeHash;

use crate::doc::ChangeSignature;

const MAGIC: &[u8; 2] = b"DS";
const VERSION: u8 = 1;
const T_SYNC: u8 = 1;
const T_NUDGE: u8 = 2;
const T_PROBE: u8 = 3;
/// Most heads a nudge may carry.
pub const MAX_NUDGE_HEADS: usize = 64;
/// Most changes a nudge may carry.
pub const MAX_NUDGE_CHANGES: usize = 64;

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// One Automerge sync message and the signatures of the changes in it.
    Sync {
        /// Sender's epoch.
        epoch: u64,
        /// Signatures of the changes carried.
        sigs: Vec<(ChangeHash, ChangeSignature)>,
        /// The encoded `automerge::sync::Message`.
        msg: Vec<u8>,
    },
    /// A gossip nudge: the author's heads and possibly its new changes.
    Nudge {
        /// Author's epoch.
        epoch: u64,
        /// The author's heads after the change.
        heads: Vec<ChangeHash>,
        /// New changes (raw bytes) with their signatures.
        changes: Vec<(Vec<u8>, ChangeSignature)>,
    },
    /// Anti-entropy probe: a digest of the sender's heads.
    Probe {
        /// Sender's epoch.
        epoch: u64,
        /// SHA-256 over the sender's sorted heads.
        digest: [u8; 32],
    },
}

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// Longer than the limit.
    #[error("frame of {len} bytes exceeds the {limit}-byte limit")]
    TooLarge {
        /// Frame length.
        len: usize,
        /// Limit.
        limit: usize,
    },
    /// Not a state-sync frame of a known version and type.
    #[error("not a state-sync frame")]
    BadHeader,
    /// Truncated or inconsistent.
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
}

impl Frame {
    /// The sender's epoch.
    pub fn epoch(&self) -> u64 {
        match self {
            Frame::Sync { epoch, .. } | Frame::Nudge { epoch, .. } | Frame::Probe { epoch, .. } => {
                *epoch
            }
        }
    }

    /// Encodes the frame.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        match self {
            Frame::Sync { epoch, sigs, msg } => {
                out.push(T_SYNC);
                out.extend_from_slice(&epoch.to_be_bytes());
                out.extend_from_slice(&(sigs.len() as u32).to_be_bytes());
                for (h, s) in sigs {
                    out.extend_from_slice(&h.0);
                    out.extend_from_slice(s);
                }
                out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
                out.extend_from_slice(msg);
            }
            Frame::Probe { epoch, digest } => {
                out.push(T_PROBE);
                out.extend_from_slice(&epoch.to_be_bytes());
                out.extend_from_slice(digest);
            }
            Frame::Nudge {
                epoch,
                heads,
                changes,
            } => {
                out.push(T_NUDGE);
                out.extend_from_slice(&epoch.to_be_bytes());
                out.extend_from_slice(&(heads.len().min(MAX_NUDGE_HEADS) as u16).to_be_bytes());
                for h in heads.iter().take(MAX_NUDGE_HEADS) {
                    out.extend_from_slice(&h.0);
                }
                let n = changes.len().min(MAX_NUDGE_CHANGES);
                out.extend_from_slice(&(n as u16).to_be_bytes());
                for (c, s) in changes.iter().take(n) {
                    out.extend_from_slice(&(c.len() as u32).to_be_bytes());
                    out.extend_from_slice(c);
                    out.extend_from_slice(s);
                }
            }
        }
        out
    }

    /// Decodes a frame of at most `limit` bytes.
    pub fn decode(bytes: &[u8], limit: usize) -> Result<Self, FrameError> {
        if bytes.len() > limit {
            return Err(FrameError::TooLarge {
                len: bytes.len(),
                limit,
            });
        }
        let mut r = Rd(bytes);
        if r.take(2)? != MAGIC || r.u8()? != VERSION {
            return Err(FrameError::BadHeader);
        }
        let t = r.u8()?;
        let epoch = r.u64()?;
        let f = match t {
            T_SYNC => {
                let n = r.u32()? as usize;
                if n.saturating_mul(96) > r.0.len() {
                    return Err(FrameError::Malformed("signature count"));
                }
                let mut sigs = Vec::with_capacity(n);
                for _ in 0..n {
                    let h = r.arr32()?;
                    let s = r.arr64()?;
                    sigs.push((ChangeHash(h), s));
                }
                let len = r.u32()? as usize;
                let msg = r.take(len)?.to_vec();
                Frame::Sync { epoch, sigs, msg }
            }
            T_NUDGE => {
                let nh = r.u16()? as usize;
                if nh > MAX_NUDGE_HEADS {
                    return Err(FrameError::Malformed("too many heads"));
                }
                let mut heads = Vec::with_capacity(nh);
                for _ in 0..nh {
                    heads.push(ChangeHash(r.arr32()?));
                }
                let nc = r.u16()? as usize;
                if nc > MAX_NUDGE_CHANGES {
                    return Err(FrameError::Malformed("too many changes"));
                }
                let mut changes = Vec::with_capacity(nc);
                for _ in 0..nc {
                    let len = r.u32()? as usize;
                    let c = r.take(len)?.to_vec();
                    changes.push((c, r.arr64()?));
                }
                Frame::Nudge {
                    epoch,
                    heads,
                    changes,
                }
            }
            T_PROBE => Frame::Probe {
                epoch,
                digest: r.arr32()?,
            },
            _ => return Err(FrameError::BadHeader),
        };
        if !r.0.is_empty() {
            return Err(FrameError::Malformed("trailing bytes"));
        }
        Ok(f)
    }
}

struct Rd<'a>(&'a [u8]);

impl<'a> Rd<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.0.len() < n {
            return Err(FrameError::Malformed("truncated"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        let mut b = [0u8; 2];
        b.copy_from_slice(self.take(2)?);
        Ok(u16::from_be_bytes(b))
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_be_bytes(b))
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(b))
    }
    fn arr32(&mut self) -> Result<[u8; 32], FrameError> {
        let mut b = [0u8; 32];
        b.copy_from_slice(self.take(32)?);
        Ok(b)
    }
    fn arr64(&mut self) -> Result<[u8; 64], FrameError> {
        let mut b = [0u8; 64];
        b.copy_from_slice(self.take(64)?);
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_reject_garbage() {
        let f = Frame::Sync {
            epoch: 3,
            sigs: vec![(ChangeHash([1; 32]), [2; 64])],
            msg: vec![9; 10],
        };
        let b = f.encode();
        assert_eq!(Frame::decode(&b, 1024).unwrap(), f);
        assert!(matches!(
            Frame::decode(&b, 10),
            Err(FrameError::TooLarge { .. })
        ));
        assert_eq!(
            Frame::decode(&b[..b.len() - 1], 1024),
            Err(FrameError::Malformed("truncated"))
        );
        let mut t = b.clone();
        t.push(0);
        assert_eq!(
            Frame::decode(&t, 1024),
            Err(FrameError::Malformed("trailing bytes"))
        );
        assert_eq!(
            Frame::decode(b"XX\x01\x01", 1024),
            Err(FrameError::BadHeader)
        );
        // A huge signature count with no bytes behind it is refused before allocating.
        let mut h = b[..12].to_vec();
        h.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            Frame::decode(&h, 1024),
            Err(FrameError::Malformed("signature count"))
        );
        let n = Frame::Nudge {
            epoch: 0,
            heads: vec![ChangeHash([5; 32])],
            changes: vec![(vec![1, 2, 3], [7; 64])],
        };
        assert_eq!(Frame::decode(&n.encode(), 1024).unwrap(), n);
        let p = Frame::Probe {
            epoch: 2,
            digest: [3; 32],
        };
        assert_eq!(p.encode().len(), 44);
        assert_eq!(Frame::decode(&p.encode(), 1024).unwrap(), p);
    }
}
