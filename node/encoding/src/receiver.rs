//! The receiving side: decodes frames strictly, answers offers from its page store and
//! rebuilds pages or the stream bit-exactly.

use std::collections::BTreeMap;

use zstd::zstd_safe::DParameter;

use crate::error::DecodeError;
use crate::message::{Batch, Dict, End, Limits, Message, Missing, Offer, Shape, Start};
use crate::page::{PAGE_SIZE, PageHash};
use crate::stats::ReceiveStats;
use crate::store::PageStore;
use crate::wire::Reader;

/// What the receiver produced from a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum ReceiverEvent {
    /// Send this frame (a `Missing` set) back to the sender.
    Reply(Vec<u8>),
    /// Decoded pages: `data` holds `page_numbers.len()` pages of 4096 bytes, in order.
    Pages {
        /// Guest page numbers.
        page_numbers: Vec<u64>,
        /// Their content.
        data: Vec<u8>,
    },
    /// The next bytes of the rebuilt stream.
    Stream(Vec<u8>),
    /// The end frame arrived and every total matched.
    Finished,
}

/// Where decoded data goes, written in transfer order. A receiver driver implements it
/// to write guest memory (pages) or feed QEMU's incoming migration (stream) without an
/// intermediate copy. If a frame fails to decode, part of its batch may already have
/// been written; the transfer must then be aborted.
pub trait Sink {
    /// One page of the page shape (zero pages come as 4096 zero bytes).
    fn page(&mut self, page_number: u64, data: &[u8]);
    /// The next bytes of the stream shape.
    fn stream(&mut self, bytes: &[u8]);
}

/// What [`Receiver::handle_frame_into`] tells the driver besides the data.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Handled {
    /// A frame to send back to the sender (a `Missing` set).
    pub reply: Option<Vec<u8>>,
    /// The end frame arrived and every total matched.
    pub finished: bool,
}

/// A [`Sink`] that collects a batch into [`ReceiverEvent`]s.
#[derive(Debug, Default)]
struct Collect {
    page_numbers: Vec<u64>,
    data: Vec<u8>,
    stream: bool,
}

impl Sink for Collect {
    fn page(&mut self, page_number: u64, data: &[u8]) {
        self.page_numbers.push(page_number);
        self.data.extend_from_slice(data);
    }
    fn stream(&mut self, bytes: &[u8]) {
        self.stream = true;
        self.data.extend_from_slice(bytes);
    }
}

static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

// Batch control op kinds (`kind | operand << KIND_SHIFT`, see `crate::message`).
const KIND_SHIFT: u32 = 3;
const KIND_MASK: u64 = 7;
const KIND_ZERO: u64 = 0;
const KIND_NEW: u64 = 1;
const KIND_REF: u64 = 2;
const KIND_HELD: u64 = 3;
const KIND_DELTA: u64 = 4;
const KIND_PATCH: u64 = 5;

#[derive(Debug)]
struct PendingOffer {
    hashes: Vec<PageHash>,
    held: Vec<Option<Vec<u8>>>,
    /// Delta bases named in the reply (pinned content), per offered page, in order:
    /// same-key base, then held proposals.
    bases: Vec<Vec<Vec<u8>>>,
    /// Page keys from the offer (needed for the stream shape's key index).
    keys: Option<Vec<u64>>,
}

/// The receiving state machine for one transfer. Owns the optional page store while the
/// transfer runs; take it back with [`Receiver::into_store`].
pub struct Receiver {
    limits: Limits,
    store: Option<Box<dyn PageStore + Send>>,
    shape: Option<Shape>,
    dicts: BTreeMap<u64, Vec<u8>>,
    plain: zstd::bulk::Decompressor<'static>,
    with_dict: Option<(u64, zstd::bulk::Decompressor<'static>)>,
    /// Decompressed batch bodies and held pages, kept for references.
    chunks: Vec<Vec<u8>>,
    /// Unique page n of the transfer: (chunk, byte offset).
    unique: Vec<(u32, u32)>,
    /// Hash of unique page n (kept only with a store, for the page-key index).
    unique_hashes: Vec<PageHash>,
    vm_id: u64,
    /// Decompresses kind-5 patches (raw-content dictionary = the page's bases).
    patch_dctx: zstd::zstd_safe::DCtx<'static>,
    unique_bytes: u64,
    offers: BTreeMap<u64, PendingOffer>,
    /// Page bytes copied out of the store for pending offers.
    pinned_bytes: u64,
    next_batch: u64,
    ended: bool,
    stats: ReceiveStats,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("shape", &self.shape)
            .field("next_batch", &self.next_batch)
            .field("has_store", &self.store.is_some())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

fn decompressor(
    limits: &Limits,
    dict: Option<&[u8]>,
) -> Result<zstd::bulk::Decompressor<'static>, DecodeError> {
    let err = |e: std::io::Error| DecodeError::Decompress {
        batch: 0,
        detail: e.to_string(),
    };
    let mut d = match dict {
        Some(d) => zstd::bulk::Decompressor::with_dictionary(d),
        None => zstd::bulk::Decompressor::new(),
    }
    .map_err(err)?;
    d.set_parameter(DParameter::WindowLogMax(limits.max_window_log))
        .map_err(err)?;
    Ok(d)
}

fn malformed(what: &'static str, detail: impl Into<String>) -> DecodeError {
    DecodeError::Malformed {
        what,
        detail: detail.into(),
    }
}

impl Receiver {
    /// A receiver without a page store: every offered page is reported missing.
    pub fn new(limits: Limits) -> Result<Self, DecodeError> {
        Ok(Self {
            plain: decompressor(&limits, None)?,
            limits,
            store: None,
            shape: None,
            dicts: BTreeMap::new(),
            with_dict: None,
            chunks: Vec::new(),
            unique: Vec::new(),
            unique_hashes: Vec::new(),
            vm_id: 0,
            patch_dctx: zstd::zstd_safe::DCtx::create(),
            unique_bytes: 0,
            offers: BTreeMap::new(),
            pinned_bytes: 0,
            next_batch: 0,
            ended: false,
            stats: ReceiveStats::default(),
        })
    }

    /// A receiver that answers offers from `store` and adds every new page to it.
    pub fn with_store(
        limits: Limits,
        store: Box<dyn PageStore + Send>,
    ) -> Result<Self, DecodeError> {
        let mut r = Self::new(limits)?;
        r.store = Some(store);
        Ok(r)
    }

    /// Statistics so far.
    pub fn stats(&self) -> &ReceiveStats {
        &self.stats
    }

    /// True after a valid end frame.
    pub fn is_finished(&self) -> bool {
        self.ended
    }

    /// Gives the page store back (for the next transfer).
    pub fn into_store(self) -> Option<Box<dyn PageStore + Send>> {
        self.store
    }

    /// Handles exactly one frame, returning decoded data as events. On error the frame
    /// is dropped and the transfer should be aborted (the sender misbehaved or the data
    /// was corrupted); the receiver does not panic on any input.
    pub fn handle_frame(&mut self, frame: &[u8]) -> Result<Vec<ReceiverEvent>, DecodeError> {
        let mut c = Collect::default();
        let h = self.handle_frame_into(frame, &mut c)?;
        let mut ev = Vec::new();
        if let Some(r) = h.reply {
            ev.push(ReceiverEvent::Reply(r));
        }
        if c.stream {
            ev.push(ReceiverEvent::Stream(c.data));
        } else if !c.page_numbers.is_empty() {
            ev.push(ReceiverEvent::Pages {
                page_numbers: c.page_numbers,
                data: c.data,
            });
        }
        if h.finished {
            ev.push(ReceiverEvent::Finished);
        }
        Ok(ev)
    }

    /// Handles exactly one frame, writing decoded data to `sink` (no intermediate copy).
    pub fn handle_frame_into(
        &mut self,
        frame: &[u8],
        sink: &mut dyn Sink,
    ) -> Result<Handled, DecodeError> {
        if self.ended {
            return Err(DecodeError::Unexpected {
                what: "frame",
                detail: "transfer already ended",
            });
        }
        let msg = Message::decode(frame, &self.limits)?;
        self.stats.frame_bytes += frame.len() as u64;
        if self.shape.is_none() && !matches!(msg, Message::Start(_)) {
            return Err(DecodeError::Unexpected {
                what: "frame",
                detail: "the first frame must be a start frame",
            });
        }
        match msg {
            Message::Start(Start { shape, vm_id, .. }) => {
                if self.shape.is_some() {
                    return Err(DecodeError::Unexpected {
                        what: "start",
                        detail: "transfer already started",
                    });
                }
                self.shape = Some(shape);
                self.vm_id = vm_id;
                Ok(Handled::default())
            }
            Message::Dict(d) => self.on_dict(d).map(|()| Handled::default()),
            Message::Offer(o) => self.on_offer(o).map(|r| Handled {
                reply: Some(r),
                finished: false,
            }),
            Message::Missing(_) => Err(DecodeError::Unexpected {
                what: "missing set",
                detail: "only senders receive missing sets",
            }),
            Message::Batch(b) => {
                self.on_batch(b, sink)?;
                Ok(Handled::default())
            }
            Message::End(e) => self.on_end(e).map(|()| Handled {
                reply: None,
                finished: true,
            }),
        }
    }

    fn on_dict(&mut self, d: Dict) -> Result<(), DecodeError> {
        if PageHash::of(&d.bytes).short_id().max(1) != d.id {
            return Err(malformed("dictionary", "id is not the hash of its content"));
        }
        if !self.dicts.contains_key(&d.id) && self.dicts.len() >= self.limits.max_dicts {
            return Err(DecodeError::TooLarge {
                what: "dictionaries",
                len: self.dicts.len() as u64 + 1,
                limit: self.limits.max_dicts as u64,
            });
        }
        self.dicts.insert(d.id, d.bytes);
        Ok(())
    }

    fn on_offer(&mut self, o: Offer) -> Result<Vec<u8>, DecodeError> {
        if o.batch < self.next_batch || self.offers.contains_key(&o.batch) {
            return Err(DecodeError::Unexpected {
                what: "offer",
                detail: "batch already offered or decoded",
            });
        }
        if self.offers.len() >= self.limits.max_pending_offers {
            return Err(DecodeError::TooLarge {
                what: "pending offers",
                len: self.offers.len() as u64 + 1,
                limit: self.limits.max_pending_offers as u64,
            });
        }
        if let Some(k) = &o.keys
            && k.len() != o.hashes.len()
        {
            return Err(malformed("offer", "key count differs from hash count"));
        }
        let mut held = Vec::with_capacity(o.hashes.len());
        let mut missing = Vec::with_capacity(o.hashes.len());
        let mut bases: Vec<Vec<Vec<u8>>> = Vec::with_capacity(o.hashes.len());
        let mut base_hashes = Vec::with_capacity(o.hashes.len());
        let mut proposals_held = Vec::with_capacity(o.proposals.len());
        let mut props = o.proposals.iter().peekable();
        let budget = self.limits.max_pinned_bytes;
        let mut pinned = self.pinned_bytes;
        let room = |pinned: &mut u64| {
            if *pinned + PAGE_SIZE as u64 > budget {
                return false;
            }
            *pinned += PAGE_SIZE as u64;
            true
        };
        for (i, h) in o.hashes.iter().enumerate() {
            // Pin held pages now, so eviction before the batch arrives cannot break it.
            let page = match &mut self.store {
                Some(s) if room(&mut pinned) => s.get(h)?,
                _ => None,
            };
            // A missing page whose key we know: pin the page held there as a delta base.
            let mut base = None;
            if page.is_none()
                && let (Some(s), Some(keys)) = (&mut self.store, &o.keys)
                && let Some(bh) = s.hash_at(self.vm_id, keys[i])?
                && bh != *h
                && room(&mut pinned)
                && let Some(content) = s.get(&bh)?
            {
                base = Some((bh, content));
            }
            let is_missing = page.is_none();
            missing.push(is_missing);
            held.push(page);
            let mut mine = Vec::new();
            match base {
                Some((bh, content)) => {
                    base_hashes.push(Some(bh));
                    mine.push(content);
                }
                None => base_hashes.push(None),
            }
            // Proposed similar pages of this candidate: pin those held (missing pages
            // only; a proposal equal to the page itself is useless).
            while let Some((pi, ph)) = props.next_if(|(pi, _)| *pi as usize == i) {
                let _ = pi;
                let content = match &mut self.store {
                    Some(s) if is_missing && ph != h && room(&mut pinned) => s.get(ph)?,
                    _ => None,
                };
                proposals_held.push(content.is_some());
                mine.extend(content);
            }
            bases.push(mine);
        }
        if props.next().is_some() {
            return Err(malformed("offer", "proposals out of order"));
        }
        // Count what was actually copied (a failed lookup reserved room for nothing).
        let copied = held.iter().flatten().count() + bases.iter().map(Vec::len).sum::<usize>();
        self.pinned_bytes += (copied * PAGE_SIZE) as u64;
        let reply = Message::Missing(Missing {
            batch: o.batch,
            missing,
            bases: base_hashes,
            proposals_held,
        })
        .encode()?;
        self.offers.insert(
            o.batch,
            PendingOffer {
                hashes: o.hashes,
                held,
                bases,
                keys: o.keys,
            },
        );
        Ok(reply)
    }

    fn on_batch(&mut self, b: Batch, sink: &mut dyn Sink) -> Result<(), DecodeError> {
        if b.seq != self.next_batch {
            return Err(DecodeError::UnexpectedBatch {
                expected: self.next_batch,
                got: b.seq,
            });
        }
        if Some(b.shape) != self.shape {
            return Err(malformed("batch", "shape differs from the start frame"));
        }
        let raw_len = b.raw_len();
        if raw_len > self.limits.max_batch_body() {
            return Err(DecodeError::TooLarge {
                what: "batch body",
                len: raw_len as u64,
                limit: self.limits.max_batch_body() as u64,
            });
        }
        let new_bytes = b.new_pages as u64 * PAGE_SIZE as u64;
        if self.unique_bytes + new_bytes > self.limits.max_transfer_unique_bytes {
            return Err(DecodeError::TooLarge {
                what: "unique bytes in transfer",
                len: self.unique_bytes + new_bytes,
                limit: self.limits.max_transfer_unique_bytes,
            });
        }
        let patch_len = b.patch_len as usize;
        let (seq, shape, items, new_pages, control_len, literal_len) = (
            b.seq,
            b.shape,
            b.items as usize,
            b.new_pages as usize,
            b.control_len as usize,
            b.literal_len as usize,
        );
        let raw = if b.compressed {
            self.decompress(&b, raw_len)?
        } else {
            b.body
        };
        let offer = self.offers.remove(&seq);
        if let Some(o) = &offer {
            let n = o.held.iter().flatten().count() + o.bases.iter().map(Vec::len).sum::<usize>();
            self.pinned_bytes = self.pinned_bytes.saturating_sub((n * PAGE_SIZE) as u64);
        }
        let unique_before = self.unique.len();
        let hashes_before = self.unique_hashes.len();
        let chunks_before = self.chunks.len();
        let r = self.rebuild(
            seq,
            shape,
            items,
            new_pages,
            control_len,
            literal_len,
            patch_len,
            raw,
            offer,
            sink,
        );
        if r.is_err() {
            // Forget the failed batch's pages, so state matches what the sender knows.
            self.unique.truncate(unique_before);
            self.unique_hashes.truncate(hashes_before);
            self.chunks.truncate(chunks_before);
        }
        r?;
        self.next_batch += 1;
        self.stats.batches += 1;
        Ok(())
    }

    fn decompress(&mut self, b: &Batch, raw_len: usize) -> Result<Vec<u8>, DecodeError> {
        let err = |e: std::io::Error| DecodeError::Decompress {
            batch: b.seq,
            detail: e.to_string(),
        };
        let d = if b.dict_id == 0 {
            &mut self.plain
        } else {
            let Some(bytes) = self.dicts.get(&b.dict_id) else {
                return Err(DecodeError::UnknownDictionary {
                    batch: b.seq,
                    id: b.dict_id,
                });
            };
            if self.with_dict.as_ref().map(|(id, _)| *id) != Some(b.dict_id) {
                self.with_dict = Some((b.dict_id, decompressor(&self.limits, Some(bytes))?));
            }
            match &mut self.with_dict {
                Some((_, d)) => d,
                None => &mut self.plain,
            }
        };
        let mut out = Vec::with_capacity(raw_len);
        let n = d.decompress_to_buffer(&b.body, &mut out).map_err(err)?;
        if n != raw_len {
            return Err(DecodeError::Decompress {
                batch: b.seq,
                detail: format!("body is {n} bytes, header says {raw_len}"),
            });
        }
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn rebuild(
        &mut self,
        seq: u64,
        shape: Shape,
        items: usize,
        new_pages: usize,
        control_len: usize,
        literal_len: usize,
        patch_len: usize,
        mut raw: Vec<u8>,
        offer: Option<PendingOffer>,
        sink: &mut dyn Sink,
    ) -> Result<(), DecodeError> {
        let pages_len = new_pages * PAGE_SIZE;
        // Pass 1: read the control section and undo the XOR deltas in place, so every
        // new page's content is final before anything refers to it.
        let mut ops = Vec::with_capacity(items);
        {
            let mut r = Reader::new(&raw[pages_len..pages_len + control_len]);
            for _ in 0..items {
                let pos = r.varint("control position")?;
                let op = r.varint("control op")?;
                ops.push((pos, op));
            }
            r.expect_end("control section")?;
        }
        let (mut new_i, mut cand) = (0usize, 0usize);
        for &(_, op) in &ops {
            match op & KIND_MASK {
                KIND_NEW | KIND_DELTA => {
                    if new_i >= new_pages {
                        return Err(malformed("control", "more new pages than the header says"));
                    }
                    if op & KIND_MASK == KIND_DELTA {
                        let base = offer
                            .as_ref()
                            .and_then(|o| o.bases.get(cand))
                            .and_then(|b| b.first());
                        let Some(base) = base else {
                            return Err(malformed("control", "delta page without a named base"));
                        };
                        let at = new_i * PAGE_SIZE;
                        for (p, b) in raw[at..at + PAGE_SIZE].iter_mut().zip(base) {
                            *p ^= b;
                        }
                    }
                    new_i += 1;
                    cand += 1;
                }
                KIND_HELD | KIND_PATCH => cand += 1,
                _ => {}
            }
        }
        // The body stays alive in `chunks`: later references point into it, no copy.
        let this =
            u32::try_from(self.chunks.len()).map_err(|_| malformed("batch", "too many batches"))?;
        self.chunks.push(raw);
        let vm = self.vm_id;
        let Self {
            chunks,
            unique,
            unique_hashes,
            unique_bytes,
            store,
            stats,
            ..
        } = self;
        let mut held_chunks: Vec<Vec<u8>> = Vec::new();
        let raw = &chunks[this as usize];
        let literal = &raw[pages_len + control_len..pages_len + control_len + literal_len];
        let patches = &raw[pages_len + control_len + literal_len..][..patch_len];
        let mut patch_pos = 0usize;
        let dctx = &mut self.patch_dctx;
        let mut prev: Option<u64> = None;
        let mut lit_pos = 0usize;
        let mut new_i = 0usize;
        let mut cand = 0usize;
        let mut out_bytes = 0u64;
        let mut held_iter = offer.as_ref().map(|o| o.held.iter());
        for &(pos, op) in &ops {
            let mut page_no = 0;
            match shape {
                Shape::Pages => {
                    let expected = prev.map_or(0, |p| p.wrapping_add(1));
                    let delta = ((pos >> 1) as i64) ^ -((pos & 1) as i64);
                    page_no = expected.wrapping_add(delta as u64);
                    prev = Some(page_no);
                }
                Shape::Stream => {
                    let gap = usize::try_from(pos).unwrap_or(usize::MAX);
                    if gap > literal.len() - lit_pos {
                        return Err(malformed("control", "literal gap past the literal section"));
                    }
                    sink.stream(&literal[lit_pos..lit_pos + gap]);
                    out_bytes += gap as u64;
                    lit_pos += gap;
                }
            }
            let operand = op >> KIND_SHIFT;
            // The page key: the page number, or for streams the key the offer gave this
            // candidate (stream pages that are not candidates have no known key).
            let key = match shape {
                Shape::Pages => Some(page_no),
                Shape::Stream => offer
                    .as_ref()
                    .and_then(|o| o.keys.as_ref())
                    .and_then(|k| k.get(cand))
                    .copied()
                    .filter(|_| {
                        matches!(
                            op & KIND_MASK,
                            KIND_NEW | KIND_DELTA | KIND_HELD | KIND_PATCH
                        )
                    }),
            };
            let (page, hash): (&[u8], Option<PageHash>) = match op & KIND_MASK {
                KIND_ZERO => {
                    if operand != 0 {
                        return Err(malformed("control", "zero page with an operand"));
                    }
                    (&ZERO_PAGE, None)
                }
                kind @ (KIND_NEW | KIND_DELTA) => {
                    if operand != 0 {
                        return Err(malformed("control", "new page with an operand"));
                    }
                    let at = new_i * PAGE_SIZE;
                    let page = &raw[at..at + PAGE_SIZE];
                    new_i += 1;
                    let offered = offer.as_ref().map(|o| o.hashes.get(cand));
                    if offer.is_some() && offered.flatten().is_none() {
                        return Err(malformed("control", "more candidates than offered"));
                    }
                    if let Some(held) = &mut held_iter {
                        held.next();
                    }
                    let mut hash = None;
                    if let Some(store) = store {
                        let h = PageHash::of(page);
                        if let Some(Some(want)) = offered
                            && *want != h
                        {
                            return Err(DecodeError::HashMismatch { batch: seq });
                        }
                        store.insert(h, page)?;
                        stats.stored_pages += 1;
                        unique_hashes.push(h);
                        hash = Some(h);
                    }
                    if kind == KIND_DELTA {
                        stats.delta_pages += 1;
                    }
                    cand += 1;
                    unique.push((this, at as u32));
                    *unique_bytes += PAGE_SIZE as u64;
                    (page, hash)
                }
                KIND_REF => {
                    let known = unique.len() as u64;
                    let idx = usize::try_from(operand).ok();
                    let Some(&(c, off)) = idx.and_then(|i| unique.get(i)) else {
                        return Err(DecodeError::UnknownPageRef {
                            batch: seq,
                            index: operand,
                            known,
                        });
                    };
                    let hash = idx.and_then(|i| unique_hashes.get(i)).copied();
                    let off = off as usize;
                    let page = match chunks.get(c as usize) {
                        Some(ch) => &ch[off..off + PAGE_SIZE],
                        None => &held_chunks[c as usize - chunks.len()][off..off + PAGE_SIZE],
                    };
                    (page, hash)
                }
                KIND_HELD => {
                    let held = held_iter
                        .as_mut()
                        .and_then(|h| h.next())
                        .and_then(|p| p.as_ref());
                    let Some(page) = held.filter(|_| operand == cand as u64) else {
                        return Err(DecodeError::NotHeld {
                            batch: seq,
                            index: operand,
                        });
                    };
                    let hash = offer.as_ref().and_then(|o| o.hashes.get(cand)).copied();
                    if store.is_some()
                        && let Some(h) = hash
                    {
                        unique_hashes.push(h);
                    }
                    cand += 1;
                    stats.held_pages += 1;
                    let c = (chunks.len() + held_chunks.len()) as u32;
                    held_chunks.push(page.clone());
                    unique.push((c, 0));
                    *unique_bytes += PAGE_SIZE as u64;
                    (page.as_slice(), hash)
                }
                KIND_PATCH => {
                    let len = usize::try_from(operand).unwrap_or(usize::MAX);
                    if len > patches.len() - patch_pos {
                        return Err(malformed("control", "patch past the patch section"));
                    }
                    let frame = &patches[patch_pos..patch_pos + len];
                    patch_pos += len;
                    let bases = offer.as_ref().and_then(|o| o.bases.get(cand));
                    let Some(bases) = bases.filter(|b| !b.is_empty()) else {
                        return Err(malformed("control", "patched page without a held base"));
                    };
                    let dict: Vec<u8> = bases.concat();
                    let mut out = Vec::with_capacity(PAGE_SIZE);
                    let n = dctx
                        .decompress_using_dict(&mut out, frame, &dict)
                        .map_err(|code| DecodeError::Decompress {
                            batch: seq,
                            detail: format!("patch: {}", zstd::zstd_safe::get_error_name(code)),
                        })?;
                    if n != PAGE_SIZE || out.len() != PAGE_SIZE {
                        return Err(malformed("patch", "does not rebuild exactly one page"));
                    }
                    let want = offer.as_ref().and_then(|o| o.hashes.get(cand));
                    let h = PageHash::of(&out);
                    if want != Some(&h) {
                        return Err(DecodeError::HashMismatch { batch: seq });
                    }
                    if let Some(store) = store {
                        store.insert(h, &out)?;
                        stats.stored_pages += 1;
                        unique_hashes.push(h);
                    }
                    if let Some(held) = &mut held_iter {
                        held.next();
                    }
                    cand += 1;
                    stats.patch_pages += 1;
                    let c = (chunks.len() + held_chunks.len()) as u32;
                    held_chunks.push(out);
                    unique.push((c, 0));
                    *unique_bytes += PAGE_SIZE as u64;
                    (&held_chunks[held_chunks.len() - 1][..], Some(h))
                }
                other => {
                    return Err(malformed("control", format!("unknown op kind {other}")));
                }
            };
            if let (Some(store), Some(key)) = (&mut *store, key) {
                store.set_hash_at(vm, key, hash)?;
            }
            match shape {
                Shape::Pages => sink.page(page_no, page),
                Shape::Stream => sink.stream(page),
            }
            out_bytes += PAGE_SIZE as u64;
        }
        if new_i != new_pages {
            return Err(malformed(
                "batch",
                format!("{new_pages} new pages in the header, {new_i} used"),
            ));
        }
        if patch_pos != patch_len {
            return Err(malformed("batch", "patch section not used up"));
        }
        if let Some(o) = &offer
            && cand != o.hashes.len()
        {
            return Err(malformed(
                "batch",
                format!("{} pages offered, {cand} sent", o.hashes.len()),
            ));
        }
        if shape == Shape::Stream {
            sink.stream(&literal[lit_pos..]);
            out_bytes += (literal.len() - lit_pos) as u64;
        }
        stats.pages += items as u64;
        stats.bytes_out += out_bytes;
        // Only the new pages (at the front of the body) are referenced later: drop the
        // control and literal bytes so memory stays bounded by the unique-page limit.
        let kept = &mut chunks[this as usize];
        kept.truncate(pages_len);
        if kept.capacity() - kept.len() > (1 << 20) {
            kept.shrink_to_fit();
        }
        chunks.extend(held_chunks);
        Ok(())
    }

    fn on_end(&mut self, e: End) -> Result<(), DecodeError> {
        if e.batches != self.next_batch {
            return Err(malformed(
                "end",
                format!(
                    "{} batches announced, {} received",
                    e.batches, self.next_batch
                ),
            ));
        }
        if e.pages != self.stats.pages || e.bytes_in != self.stats.bytes_out {
            return Err(malformed(
                "end",
                format!(
                    "totals differ: {} pages / {} bytes announced, {} / {} rebuilt",
                    e.pages, e.bytes_in, self.stats.pages, self.stats.bytes_out
                ),
            ));
        }
        if !self.offers.is_empty() {
            return Err(malformed("end", "offers without a batch"));
        }
        if let Some(s) = &mut self.store {
            s.flush()?;
        }
        self.ended = true;
        Ok(())
    }
}
