//! The messages inside [frames](crate::frame), their payload layouts and the decoder
//! limits. All integers are LEB128 varints unless noted.
//!
//! | kind | direction | payload |
//! | --- | --- | --- |
//! | `Start` | S → R | `transfer_id: u64 LE`, `shape: u8` (0 pages, 1 stream), `vm_id: u64 LE` |
//! | `Dict` | S → R | `id: u64 LE`, dictionary bytes (rest) |
//! | `Offer` | S → R | `batch`, `count`, `count` × 32-byte SHA-256, `has_keys: u8`, if 1: `count` page keys, `proposals`, then per proposal: candidate index (delta from the previous proposal's) and a 32-byte SHA-256 |
//! | `Missing` | R → S | `batch`, `count`, `missing` bitmap, `base` bitmap (both `ceil(count/8)` bytes), one 32-byte SHA-256 per set `base` bit, `proposals`, `held` bitmap of `ceil(proposals/8)` bytes |
//! | `Batch` | S → R | `batch`, `flags: u8`, `level: i8`, `dict_id: u64 LE`, `items`, `new_pages`, `control_len`, `literal_len`, `patch_len`, body (rest) |
//! | `End` | S → R | `batches`, `pages`, `bytes_in` |
//!
//! A `Batch` body is, after zstd decompression when `flags` bit 1 is set (stored
//! as-is otherwise): `new_pages` × 4096 bytes of page content, then `control`
//! (`control_len` bytes), then `literal` (`literal_len` bytes, the non-page bytes of a
//! stream), then `patch` (`patch_len` bytes, see kind 5). Pages come first so the sender
//! can compress the buffer it collected them in without another copy. The control section has one entry per item:
//!
//! * position: for the page shape the page number as a zigzag delta from
//!   `previous + 1` (so consecutive pages cost one `0` byte); for the stream shape the
//!   number of literal bytes that precede this page in the stream;
//! * op: `kind | operand << 3`, where kind 0 = zero page, 1 = new page (next 4096 bytes
//!   of the body), 2 = repeat of unique page `operand` of this transfer, 3 = the receiver
//!   holds offered page `operand` of this batch (it said so in its `Missing` reply),
//!   4 = delta page: the next 4096 bytes of the body are the page XOR the *base* the
//!   receiver named for this candidate in its `Missing` reply (the page it holds at the
//!   same page key of the same VM, else the first held proposal, see below);
//!   5 = patched page: the next `operand` bytes of the patch section are a zstd frame
//!   that decompresses to exactly 4096 bytes with the candidate's bases (in the order
//!   below, concatenated) as its raw-content dictionary. Kinds 6-7 are invalid.
//!
//! Every new, delta or held page becomes the next unique page of the transfer, on both
//! sides in the same order, which is what kind-2 references count.
//!
//! **Page keys** (version 2). An offer may carry one key per offered hash: the page
//! number for the page shape, the page's RAM address / 4096 (tagged with its RAM block)
//! for the stream shape. Keys are LEB128 zigzag deltas from `previous key + 1`, so
//! consecutive pages cost one byte. A receiver with a page store remembers, per VM
//! (`Start::vm_id`) and key, the hash of the page it last received there. For a missing
//! page whose key it knows, it pins that old page and names it in the reply (`base`
//! bit and hash); the sender, if it still has that content, may send the page as a
//! kind-4 XOR delta against it. The receiver checks the rebuilt page against the
//! offered hash, so a wrong base can never produce a wrong page silently.
//!
//! **Proposed bases** (version 2). For a page that may have moved or been copied (a
//! database page in a freed process heap, shifted by the allocator's header), the
//! sender looks up content features of the page in what it sent before and proposes
//! up to two similar pages by hash. The receiver pins the proposals it holds (for
//! missing candidates) and flags them in its reply. A candidate's *bases* are, in this
//! order: its same-key base (if named), then its held proposals.

use crate::error::DecodeError;
use crate::frame::{FrameKind, begin_frame, decode_frame, finish_frame};
use crate::page::{HASH_LEN, PAGE_SIZE, PageHash};
use crate::wire::{Reader, put_varint};

/// Size limits every decoder applies before allocating.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame payload accepted.
    pub max_frame_payload: usize,
    /// Most items (pages) in one batch, and hashes in one offer.
    pub max_batch_pages: usize,
    /// Most literal (non-page stream) bytes in one batch.
    pub max_literal_bytes: usize,
    /// Largest dictionary accepted.
    pub max_dict_bytes: usize,
    /// Most dictionaries one receiver keeps for a transfer.
    pub max_dicts: usize,
    /// Most offers a receiver holds that have no data batch yet.
    pub max_pending_offers: usize,
    /// Most unique page bytes one transfer may make the receiver hold.
    pub max_transfer_unique_bytes: u64,
    /// Largest zstd window (log2) a receiver decompresses with.
    pub max_window_log: u32,
    /// Most page bytes a receiver copies out of its store for pending offers (held
    /// pages and delta bases). Past it, offered pages are answered "missing, no base":
    /// the transfer costs more bytes but the receiver's memory stays bounded.
    pub max_pinned_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_payload: 96 << 20,
            max_batch_pages: 16_384,
            max_literal_bytes: 32 << 20,
            max_dict_bytes: 1 << 20,
            max_dicts: 4,
            max_pending_offers: 256,
            max_transfer_unique_bytes: 64 << 30,
            max_window_log: 27,
            max_pinned_bytes: 1 << 30,
        }
    }
}

impl Limits {
    /// Largest decompressed batch body these limits allow.
    pub fn max_batch_body(&self) -> usize {
        self.max_batch_pages * (PAGE_SIZE + MAX_CONTROL_PER_ITEM) + self.max_literal_bytes
    }
}

/// Upper bound of control bytes per item: two varints of at most 10 bytes.
pub(crate) const MAX_CONTROL_PER_ITEM: usize = 20;

/// `k` as a zigzag delta from `prev + 1` (0 for the first key 0, or the next key).
pub(crate) fn zigzag_delta(prev: Option<u64>, k: u64) -> u64 {
    let expected = prev.map_or(0, |p| p.wrapping_add(1));
    let delta = k.wrapping_sub(expected) as i64;
    ((delta << 1) ^ (delta >> 63)) as u64
}

/// Inverse of [`zigzag_delta`]; wraps instead of failing (any u64 is a key).
pub(crate) fn from_zigzag_delta(prev: Option<u64>, z: u64) -> u64 {
    let expected = prev.map_or(0, |p| p.wrapping_add(1));
    let delta = ((z >> 1) as i64) ^ -((z & 1) as i64);
    expected.wrapping_add(delta as u64)
}

/// What a transfer carries.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Shape {
    /// 4 KiB guest pages with page numbers (a raw memory image, dirty pages).
    Pages,
    /// An opaque byte stream (a QEMU migration stream) with pages lifted out of it.
    Stream,
}

/// First frame of a transfer.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Start {
    /// Chosen by the sender; echoed nowhere, used in logs.
    pub transfer_id: u64,
    /// Pages or stream.
    pub shape: Shape,
    /// The VM whose memory this is: the receiver keys its page-number index by it.
    pub vm_id: u64,
}

/// A trained zstd dictionary.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Dict {
    /// The id batches use to name it (first 8 bytes of its SHA-256, never 0).
    pub id: u64,
    /// The dictionary as `zstd::dict::from_samples` produced it.
    pub bytes: Vec<u8>,
}

/// Hashes of the candidate pages of a batch: pages first seen in this transfer.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Offer {
    /// Batch sequence number.
    pub batch: u64,
    /// One hash per candidate, in item order.
    pub hashes: Vec<PageHash>,
    /// One page key per candidate (page number, or tagged RAM address for streams), if
    /// the sender knows them: lets the receiver name a delta base.
    pub keys: Option<Vec<u64>>,
    /// Proposed similar pages: (candidate index, hash), sorted by index, at most
    /// [`MAX_PROPOSALS_PER_PAGE`] per candidate.
    pub proposals: Vec<(u32, PageHash)>,
}

/// Most proposed bases per offered page.
pub const MAX_PROPOSALS_PER_PAGE: usize = 2;

/// The receiver's answer to an [`Offer`].
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Missing {
    /// Batch sequence number of the offer.
    pub batch: u64,
    /// One flag per offered hash: `true` = not held, send the bytes.
    pub missing: Vec<bool>,
    /// One entry per offered hash: for a missing page, the page the receiver holds at the
    /// same key (and has pinned) as a delta base. Always `None` where not missing.
    pub bases: Vec<Option<PageHash>>,
    /// One flag per proposal of the offer: held (and pinned) by the receiver.
    pub proposals_held: Vec<bool>,
}

/// One compressed batch. The body layout is in the module docs.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Batch {
    /// Batch sequence number, from 0 without gaps.
    pub seq: u64,
    /// Pages or stream.
    pub shape: Shape,
    /// Whether `body` is a zstd frame (else stored).
    pub compressed: bool,
    /// zstd level used (for stats only).
    pub level: i8,
    /// Dictionary id used, 0 for none.
    pub dict_id: u64,
    /// Number of items (pages).
    pub items: u32,
    /// Number of new pages whose content is in the body.
    pub new_pages: u32,
    /// Length of the control section.
    pub control_len: u32,
    /// Length of the literal section.
    pub literal_len: u32,
    /// Length of the patch section (kind-5 pages).
    pub patch_len: u32,
    /// The (compressed) body.
    pub body: Vec<u8>,
}

impl Batch {
    /// Decompressed body length.
    pub fn raw_len(&self) -> usize {
        self.control_len as usize
            + self.literal_len as usize
            + self.patch_len as usize
            + self.new_pages as usize * PAGE_SIZE
    }
}

/// Last frame of a transfer, with totals the receiver checks.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct End {
    /// Number of batches sent.
    pub batches: u64,
    /// Number of pages (items) sent.
    pub pages: u64,
    /// Input bytes: pages × 4096, or the stream length.
    pub bytes_in: u64,
}

/// Any message.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Message {
    /// See [`Start`].
    Start(Start),
    /// See [`Dict`].
    Dict(Dict),
    /// See [`Offer`].
    Offer(Offer),
    /// See [`Missing`].
    Missing(Missing),
    /// See [`Batch`].
    Batch(Batch),
    /// See [`End`].
    End(End),
}

impl Message {
    /// Encodes the message as one frame appended to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), DecodeError> {
        let start = begin_frame(out);
        let p = out;
        let kind = match self {
            Message::Start(s) => {
                p.extend_from_slice(&s.transfer_id.to_le_bytes());
                p.push(match s.shape {
                    Shape::Pages => 0,
                    Shape::Stream => 1,
                });
                p.extend_from_slice(&s.vm_id.to_le_bytes());
                FrameKind::Start
            }
            Message::Dict(d) => {
                p.extend_from_slice(&d.id.to_le_bytes());
                p.extend_from_slice(&d.bytes);
                FrameKind::Dict
            }
            Message::Offer(o) => {
                p.reserve(20 + o.hashes.len() * HASH_LEN);
                put_varint(p, o.batch);
                put_varint(p, o.hashes.len() as u64);
                for h in &o.hashes {
                    p.extend_from_slice(&h.0);
                }
                match &o.keys {
                    None => p.push(0),
                    Some(keys) => {
                        p.push(1);
                        let mut prev: Option<u64> = None;
                        for &k in keys {
                            put_varint(p, zigzag_delta(prev, k));
                            prev = Some(k);
                        }
                    }
                }
                put_varint(p, o.proposals.len() as u64);
                let mut prev = 0u32;
                for (i, h) in &o.proposals {
                    put_varint(p, u64::from(i.wrapping_sub(prev)));
                    p.extend_from_slice(&h.0);
                    prev = *i;
                }
                FrameKind::Offer
            }
            Message::Missing(m) => {
                put_varint(p, m.batch);
                put_varint(p, m.missing.len() as u64);
                let n = m.missing.len();
                let mut bits = vec![0u8; n.div_ceil(8)];
                let mut base_bits = vec![0u8; n.div_ceil(8)];
                for (i, &b) in m.missing.iter().enumerate() {
                    if b {
                        bits[i / 8] |= 1 << (i % 8);
                    }
                    if matches!(m.bases.get(i), Some(Some(_))) {
                        base_bits[i / 8] |= 1 << (i % 8);
                    }
                }
                p.extend_from_slice(&bits);
                p.extend_from_slice(&base_bits);
                for h in m.bases.iter().take(n).flatten() {
                    p.extend_from_slice(&h.0);
                }
                let np = m.proposals_held.len();
                put_varint(p, np as u64);
                let mut held = vec![0u8; np.div_ceil(8)];
                for (i, &b) in m.proposals_held.iter().enumerate() {
                    if b {
                        held[i / 8] |= 1 << (i % 8);
                    }
                }
                p.extend_from_slice(&held);
                FrameKind::Missing
            }
            Message::Batch(b) => {
                p.reserve(40 + b.body.len());
                put_varint(p, b.seq);
                let mut flags = 0u8;
                if b.shape == Shape::Stream {
                    flags |= 1;
                }
                if b.compressed {
                    flags |= 2;
                }
                p.push(flags);
                p.push(b.level as u8);
                p.extend_from_slice(&b.dict_id.to_le_bytes());
                put_varint(p, u64::from(b.items));
                put_varint(p, u64::from(b.new_pages));
                put_varint(p, u64::from(b.control_len));
                put_varint(p, u64::from(b.literal_len));
                put_varint(p, u64::from(b.patch_len));
                p.extend_from_slice(&b.body);
                FrameKind::Batch
            }
            Message::End(e) => {
                put_varint(p, e.batches);
                put_varint(p, e.pages);
                put_varint(p, e.bytes_in);
                FrameKind::End
            }
        };
        finish_frame(p, start, kind)
    }

    /// Encodes the message as one frame.
    pub fn encode(&self) -> Result<Vec<u8>, DecodeError> {
        let mut out = Vec::new();
        self.encode_into(&mut out)?;
        Ok(out)
    }

    /// Decodes exactly one frame (no trailing bytes) into a message, under `limits`.
    pub fn decode(frame: &[u8], limits: &Limits) -> Result<Self, DecodeError> {
        let (f, used) = decode_frame(frame, limits.max_frame_payload)?;
        if used != frame.len() {
            return Err(DecodeError::TrailingBytes {
                what: "frame",
                extra: frame.len() - used,
            });
        }
        let mut r = Reader::new(f.payload);
        let max_pages = limits.max_batch_pages as u64;
        let msg = match f.kind {
            FrameKind::Start => {
                let transfer_id = r.u64_le("start transfer id")?;
                let shape = match r.u8("start shape")? {
                    0 => Shape::Pages,
                    1 => Shape::Stream,
                    other => {
                        return Err(DecodeError::Malformed {
                            what: "start shape",
                            detail: format!("unknown shape {other}"),
                        });
                    }
                };
                let vm_id = r.u64_le("start vm id")?;
                Message::Start(Start {
                    transfer_id,
                    shape,
                    vm_id,
                })
            }
            FrameKind::Dict => {
                let id = r.u64_le("dict id")?;
                if id == 0 {
                    return Err(DecodeError::Malformed {
                        what: "dict id",
                        detail: "id 0 means no dictionary".into(),
                    });
                }
                let bytes = r.rest();
                if bytes.len() > limits.max_dict_bytes {
                    return Err(DecodeError::TooLarge {
                        what: "dictionary",
                        len: bytes.len() as u64,
                        limit: limits.max_dict_bytes as u64,
                    });
                }
                if bytes.is_empty() {
                    return Err(DecodeError::Malformed {
                        what: "dictionary",
                        detail: "empty".into(),
                    });
                }
                Message::Dict(Dict {
                    id,
                    bytes: bytes.to_vec(),
                })
            }
            FrameKind::Offer => {
                let batch = r.varint("offer batch")?;
                let n = r.varint_max("offer count", max_pages)?;
                if r.remaining() < n * HASH_LEN + 1 {
                    return Err(DecodeError::Malformed {
                        what: "offer",
                        detail: format!(
                            "{n} hashes need {} bytes, have {}",
                            n * HASH_LEN + 1,
                            r.remaining()
                        ),
                    });
                }
                let mut hashes = Vec::with_capacity(n);
                for _ in 0..n {
                    hashes.push(r.hash("offer hash")?);
                }
                let keys = match r.u8("offer keys flag")? {
                    0 => None,
                    1 => {
                        let mut keys = Vec::with_capacity(n);
                        let mut prev: Option<u64> = None;
                        for _ in 0..n {
                            let k = from_zigzag_delta(prev, r.varint("offer key")?);
                            keys.push(k);
                            prev = Some(k);
                        }
                        Some(keys)
                    }
                    other => {
                        return Err(DecodeError::Malformed {
                            what: "offer keys flag",
                            detail: format!("unknown value {other}"),
                        });
                    }
                };
                let np = r.varint_max("offer proposals", (n * MAX_PROPOSALS_PER_PAGE) as u64)?;
                let mut proposals = Vec::with_capacity(np);
                let mut prev = 0u64;
                let mut run = 0usize;
                for k in 0..np {
                    let d = r.varint_max("proposal index", n as u64)?;
                    let i = prev + d as u64;
                    if i >= n as u64 {
                        return Err(DecodeError::Malformed {
                            what: "offer proposals",
                            detail: format!("index {i} past {n} hashes"),
                        });
                    }
                    run = if k > 0 && d == 0 { run + 1 } else { 1 };
                    if run > MAX_PROPOSALS_PER_PAGE {
                        return Err(DecodeError::Malformed {
                            what: "offer proposals",
                            detail: "too many proposals for one page".into(),
                        });
                    }
                    proposals.push((i as u32, r.hash("proposal hash")?));
                    prev = i;
                }
                Message::Offer(Offer {
                    batch,
                    hashes,
                    keys,
                    proposals,
                })
            }
            FrameKind::Missing => {
                let batch = r.varint("missing batch")?;
                let n = r.varint_max("missing count", max_pages)?;
                let bits = r.bytes(n.div_ceil(8), "missing bitmap")?;
                let base_bits = r.bytes(n.div_ceil(8), "base bitmap")?;
                let missing: Vec<bool> =
                    (0..n).map(|i| bits[i / 8] & (1 << (i % 8)) != 0).collect();
                if n % 8 != 0 && (bits[n / 8] | base_bits[n / 8]) >> (n % 8) != 0 {
                    return Err(DecodeError::Malformed {
                        what: "missing bitmap",
                        detail: "bits set past the count".into(),
                    });
                }
                let mut bases = Vec::with_capacity(n);
                for (i, &m) in missing.iter().enumerate() {
                    if base_bits[i / 8] & (1 << (i % 8)) == 0 {
                        bases.push(None);
                    } else if !m {
                        return Err(DecodeError::Malformed {
                            what: "missing bitmap",
                            detail: "a delta base for a page that is not missing".into(),
                        });
                    } else {
                        bases.push(Some(r.hash("base hash")?));
                    }
                }
                let np = r.varint_max("missing proposals", (n * MAX_PROPOSALS_PER_PAGE) as u64)?;
                let held = r.bytes(np.div_ceil(8), "proposal bitmap")?;
                if np % 8 != 0 && held[np / 8] >> (np % 8) != 0 {
                    return Err(DecodeError::Malformed {
                        what: "proposal bitmap",
                        detail: "bits set past the count".into(),
                    });
                }
                let proposals_held = (0..np).map(|i| held[i / 8] & (1 << (i % 8)) != 0).collect();
                r.expect_end("missing")?;
                Message::Missing(Missing {
                    batch,
                    missing,
                    bases,
                    proposals_held,
                })
            }
            FrameKind::Batch => {
                let seq = r.varint("batch seq")?;
                let flags = r.u8("batch flags")?;
                if flags & !3 != 0 {
                    return Err(DecodeError::Malformed {
                        what: "batch flags",
                        detail: format!("unknown bits {flags:#04x}"),
                    });
                }
                let level = r.u8("batch level")? as i8;
                let dict_id = r.u64_le("batch dict id")?;
                let items = r.varint_max("batch items", max_pages)?;
                let new_pages = r.varint_max("batch new pages", items as u64)?;
                let control_len = r.varint_max(
                    "batch control length",
                    (items * MAX_CONTROL_PER_ITEM) as u64,
                )?;
                let literal_len =
                    r.varint_max("batch literal length", limits.max_literal_bytes as u64)?;
                let patch_len = r.varint_max("batch patch length", (items * PAGE_SIZE) as u64)?;
                let shape = if flags & 1 != 0 {
                    Shape::Stream
                } else {
                    Shape::Pages
                };
                if shape == Shape::Pages && literal_len != 0 {
                    return Err(DecodeError::Malformed {
                        what: "batch",
                        detail: "page batch with literal bytes".into(),
                    });
                }
                let compressed = flags & 2 != 0;
                let body = r.rest().to_vec();
                let b = Batch {
                    seq,
                    shape,
                    compressed,
                    level,
                    dict_id,
                    items: items as u32,
                    new_pages: new_pages as u32,
                    control_len: control_len as u32,
                    literal_len: literal_len as u32,
                    patch_len: patch_len as u32,
                    body,
                };
                if !compressed && b.body.len() != b.raw_len() {
                    return Err(DecodeError::Malformed {
                        what: "stored batch",
                        detail: format!(
                            "body is {} bytes, header says {}",
                            b.body.len(),
                            b.raw_len()
                        ),
                    });
                }
                Message::Batch(b)
            }
            FrameKind::End => {
                let batches = r.varint("end batches")?;
                let pages = r.varint("end pages")?;
                let bytes_in = r.varint("end bytes")?;
                r.expect_end("end")?;
                Message::End(End {
                    batches,
                    pages,
                    bytes_in,
                })
            }
        };
        if let Message::Start(_) | Message::Offer(_) = &msg {
            r.expect_end("message")?;
        }
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_hash() -> impl Strategy<Value = PageHash> {
        any::<[u8; 32]>().prop_map(PageHash)
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (any::<u64>(), any::<bool>(), any::<u64>()).prop_map(|(transfer_id, s, vm_id)| {
                Message::Start(Start {
                    transfer_id,
                    shape: if s { Shape::Stream } else { Shape::Pages },
                    vm_id,
                })
            }),
            (1u64.., proptest::collection::vec(any::<u8>(), 1..300))
                .prop_map(|(id, bytes)| Message::Dict(Dict { id, bytes })),
            (
                any::<u64>(),
                proptest::collection::vec((arb_hash(), any::<u64>()), 0..20),
                any::<bool>()
            )
                .prop_map(|(batch, hk, with_keys)| Message::Offer(Offer {
                    batch,
                    hashes: hk.iter().map(|(h, _)| *h).collect(),
                    keys: with_keys.then(|| hk.iter().map(|(_, k)| *k).collect()),
                    proposals: hk
                        .iter()
                        .enumerate()
                        .filter(|(_, (_, k))| k % 3 == 0)
                        .flat_map(|(i, (h, k))| {
                            std::iter::repeat_n((i as u32, *h), 1 + (*k % 2) as usize)
                        })
                        .collect(),
                })),
            (
                any::<u64>(),
                proptest::collection::vec((any::<bool>(), proptest::option::of(arb_hash())), 0..70)
            )
                .prop_map(|(batch, mb)| Message::Missing(Missing {
                    batch,
                    missing: mb.iter().map(|(m, _)| *m).collect(),
                    bases: mb.iter().map(|(m, b)| if *m { *b } else { None }).collect(),
                    proposals_held: mb.iter().map(|(m, b)| *m ^ b.is_some()).collect(),
                })),
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(batches, pages, bytes_in)| {
                Message::End(End {
                    batches,
                    pages,
                    bytes_in,
                })
            }),
            (
                any::<u64>(),
                0u32..4,
                proptest::collection::vec(any::<u8>(), 0..100)
            )
                .prop_map(|(seq, items, control)| {
                    Message::Batch(Batch {
                        seq,
                        shape: Shape::Stream,
                        compressed: false,
                        level: 3,
                        dict_id: 0,
                        items,
                        new_pages: 0,
                        control_len: control.len().min(items as usize * 20) as u32,
                        literal_len: (control.len() - control.len().min(items as usize * 20))
                            as u32,
                        patch_len: 0,
                        body: control,
                    })
                }),
        ]
    }

    proptest! {
        #[test]
        fn messages_round_trip(m in arb_message()) {
            let f = m.encode().unwrap();
            prop_assert_eq!(Message::decode(&f, &Limits::default()).unwrap(), m);
        }

        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Message::decode(&bytes, &Limits::default());
        }

        #[test]
        fn any_single_bit_flip_is_rejected(m in arb_message(), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut f = m.encode().unwrap();
            let i = pos.index(f.len());
            f[i] ^= 1 << bit;
            prop_assert!(Message::decode(&f, &Limits::default()).is_err());
        }
    }

    #[test]
    fn limits_are_enforced() {
        let limits = Limits {
            max_batch_pages: 2,
            ..Limits::default()
        };
        let m = Message::Offer(Offer {
            batch: 0,
            hashes: vec![PageHash([1; 32]); 3],
            keys: None,
            proposals: Vec::new(),
        });
        let f = m.encode().unwrap();
        assert!(matches!(
            Message::decode(&f, &limits),
            Err(DecodeError::TooLarge {
                what: "offer count",
                ..
            })
        ));
        let m = Message::Dict(Dict {
            id: 5,
            bytes: vec![0; 100],
        });
        let limits = Limits {
            max_dict_bytes: 99,
            ..Limits::default()
        };
        assert!(matches!(
            Message::decode(&m.encode().unwrap(), &limits),
            Err(DecodeError::TooLarge {
                what: "dictionary",
                ..
            })
        ));
    }
}
