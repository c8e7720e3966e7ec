//! The sending side: a sans-IO state machine that turns pages or a stream into frames.
//!
//! ```text
//! push_pages / push_stream ──► zero check, SHA-256, transfer index ──► batch sealed
//!        │                                                                   │
//!        │       offers on:  Offer frame ──► (receiver) ──► handle_reply ────┤
//!        │       offers off: every candidate is missing ─────────────────────┤
//!        ▼                                                                   ▼
//!  dictionary samples ──► zstd::dict::from_samples ──► Dict frame   CompressJob (poll_output)
//!                                                                            │ run anywhere
//!                                                handle_compressed ◄─────────┘
//!                                                       │ in batch order
//!                                                       ▼
//!                                              Batch frames, then End
//! ```
//!
//! Compression runs as [`CompressJob`]s the caller executes: inline, or on as many
//! threads as the node allows. The sender reorders the finished batches, so the frame
//! stream is identical whatever the thread count. We do not use zstd's own worker threads
//! (`NbWorkers`): they would put threads inside the core, split a batch into jobs with no
//! shared window, and make output depend on scheduling.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use zstd::zstd_safe::CParameter;

use crate::error::{ConfigError, EncodeError};
use crate::message::{
    Batch, Dict, End, Limits, MAX_PROPOSALS_PER_PAGE, Message, Missing, Offer, Shape, Start,
};
use crate::page::{PAGE_SIZE, PageHash, is_zero};
use crate::qemu::{Piece, StreamLifter};
use crate::stats::TransferStats;
use crate::store::PageStore;
use crate::wire::put_varint;

/// A delta is sent only when the XOR against the base has fewer non-zero bytes than
/// this (half a page): past it, the plain page compresses as well or better.
pub const DELTA_MAX_NONZERO: usize = PAGE_SIZE / 2;

/// A patch (kind 5) is sent only when it is smaller than this; otherwise the page goes
/// whole into the batch, where zstd's shared context may do as well.
pub const PATCH_MAX_BYTES: usize = PAGE_SIZE / 4;

/// Content features indexed per page the sender remembers (the smallest anchors).
const FEATURES_PER_PAGE: usize = 6;
/// Bound of the feature index, in entries per page of the reference store's capacity.
const FEATURE_ENTRIES_PER_PAGE: u64 = FEATURES_PER_PAGE as u64;

/// Gear table for content-defined anchors (xorshift64, fixed seed).
const GEAR: [u64; 256] = {
    let mut t = [0u64; 256];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut i = 0;
    while i < 256 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        t[i] = x;
        i += 1;
    }
    t
};

/// Content-defined anchors of a page: the gear hash (which depends on the last 64
/// bytes) wherever its top 8 bits are zero, about 16 per page of varied data. The same
/// bytes give the same anchors wherever they sit, so a page that holds a shifted copy of
/// parts of other pages shares anchors with them.
fn anchors(page: &[u8], out: &mut Vec<u64>) {
    out.clear();
    let mut h: u64 = 0;
    for (i, &c) in page.iter().enumerate() {
        h = (h << 1).wrapping_add(GEAR[c as usize]);
        if i >= 64 && h >> 56 == 0 {
            out.push(h);
        }
    }
    out.sort_unstable();
    out.dedup();
}

/// zstd window for a batch: 16 MiB, so a whole default batch is one window.
pub const DEFAULT_WINDOW_LOG: u32 = 24;

/// How the sender gets a dictionary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DictionaryConfig {
    /// No dictionary.
    Off,
    /// Train one from the first `sample_input_bytes` of input (the manual's 64 MiB),
    /// taking at most `max_sample_bytes` of unique pages as samples, into a dictionary of
    /// at most `dict_bytes`. Batches sealed before training wait for it.
    Train {
        /// Input covered by the samples.
        sample_input_bytes: u64,
        /// Cap on sample bytes handed to the trainer.
        max_sample_bytes: usize,
        /// Dictionary size limit.
        dict_bytes: usize,
    },
    /// Use this dictionary (for example one kept from an earlier transfer).
    Given(Vec<u8>),
}

impl Default for DictionaryConfig {
    /// Off: on guest memory in 16 MiB batches a trained dictionary saved nothing and cost
    /// training time (crate docs, "Dictionaries"). [`DictionaryConfig::manual`] is the
    /// manual's `dictionary: auto`.
    fn default() -> Self {
        Self::Off
    }
}

impl DictionaryConfig {
    /// The manual's `dictionary: auto`: train from the first 64 MiB of input.
    pub fn manual() -> Self {
        Self::Train {
            sample_input_bytes: 64 << 20,
            max_sample_bytes: 4 << 20,
            dict_bytes: 112 << 10,
        }
    }
}

/// Sender settings. Build with `Default` and the `with_*` setters, then [`Sender::new`]
/// validates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SenderConfig {
    /// Carried in the start frame.
    pub transfer_id: u64,
    /// zstd level, 1..=19 (changeable later with [`Sender::set_level`]).
    pub level: i32,
    /// Pages per batch (the unit of offers, compression and parallelism).
    pub batch_pages: usize,
    /// Stream literal bytes that seal a batch early.
    pub batch_literal_bytes: usize,
    /// Offer hashes to the receiver before sending bytes (cross-transfer dedup).
    pub offer_hashes: bool,
    /// Dictionary source.
    pub dictionary: DictionaryConfig,
    /// zstd window log.
    pub window_log: u32,
    /// zstd long-distance matching.
    pub long_distance: bool,
    /// Most sealed batches not yet sent (awaiting reply, dictionary or compression).
    pub max_in_flight: usize,
    /// The VM this memory belongs to (carried in the start frame; the receiver keys its
    /// page-number index by it, for deltas).
    pub vm_id: u64,
}

impl Default for SenderConfig {
    fn default() -> Self {
        Self {
            transfer_id: 0,
            level: DEFAULT_LEVEL,
            batch_pages: 4096,
            batch_literal_bytes: 16 << 20,
            offer_hashes: false,
            dictionary: DictionaryConfig::default(),
            window_log: DEFAULT_WINDOW_LOG,
            long_distance: false,
            max_in_flight: 64,
            vm_id: 0,
        }
    }
}

/// The default zstd level (see the crate docs for the measurement behind it).
pub const DEFAULT_LEVEL: i32 = 1;

impl SenderConfig {
    /// Sets the level.
    pub fn with_level(mut self, level: i32) -> Self {
        self.level = level;
        self
    }
    /// Turns hash offers (cross-transfer dedup) on or off.
    pub fn with_offers(mut self, on: bool) -> Self {
        self.offer_hashes = on;
        self
    }
    /// Sets the dictionary source.
    pub fn with_dictionary(mut self, d: DictionaryConfig) -> Self {
        self.dictionary = d;
        self
    }
    /// Sets the pages per batch.
    pub fn with_batch_pages(mut self, n: usize) -> Self {
        self.batch_pages = n;
        self
    }
    /// Sets the transfer id.
    pub fn with_transfer_id(mut self, id: u64) -> Self {
        self.transfer_id = id;
        self
    }
    /// Sets the VM id (the receiver's page-number index is per VM).
    pub fn with_vm_id(mut self, vm_id: u64) -> Self {
        self.vm_id = vm_id;
        self
    }
    /// Turns zstd long-distance matching on or off.
    pub fn with_long_distance(mut self, on: bool) -> Self {
        self.long_distance = on;
        self
    }

    /// Checks every setting against the ranges the default [`Limits`] of a receiver accept.
    pub fn validate(self) -> Result<Self, ConfigError> {
        let limits = Limits::default();
        let check = |field, value: i64, lo: i64, hi: i64, range| {
            if value < lo || value > hi {
                Err(ConfigError::OutOfRange {
                    field,
                    value,
                    range,
                })
            } else {
                Ok(())
            }
        };
        check("level", i64::from(self.level), 1, 19, "1..=19")?;
        check(
            "batch_pages",
            self.batch_pages as i64,
            1,
            limits.max_batch_pages as i64,
            "1..=16384",
        )?;
        check(
            "batch_literal_bytes",
            self.batch_literal_bytes as i64,
            1,
            limits.max_literal_bytes as i64 - (1 << 20),
            "1..=31 MiB",
        )?;
        check(
            "window_log",
            i64::from(self.window_log),
            10,
            i64::from(limits.max_window_log),
            "10..=27",
        )?;
        check(
            "max_in_flight",
            self.max_in_flight as i64,
            1,
            1024,
            "1..=1024",
        )?;
        if let DictionaryConfig::Given(d) = &self.dictionary {
            check(
                "dictionary bytes",
                d.len() as i64,
                1,
                limits.max_dict_bytes as i64,
                "1..=1 MiB",
            )?;
        }
        if let DictionaryConfig::Train { dict_bytes, .. } = &self.dictionary {
            check(
                "dict_bytes",
                *dict_bytes as i64,
                256,
                limits.max_dict_bytes as i64,
                "256..=1 MiB",
            )?;
        }
        Ok(self)
    }
}

/// What the sender asks its driver to do.
#[derive(Debug)]
pub enum SenderOutput {
    /// Send this frame to the receiver, in order.
    Send(Vec<u8>),
    /// Run this job (on any thread) and hand the result to [`Sender::handle_compressed`].
    Compress(CompressJob),
}

/// A trained or given dictionary, shared by the jobs that use it.
#[derive(Debug)]
struct TrainedDict {
    id: u64,
    bytes: Vec<u8>,
}

/// One batch to compress: pure CPU work, `Send`, independent of the sender.
#[derive(Debug)]
pub struct CompressJob {
    seq: u64,
    shape: Shape,
    level: i32,
    dict: Option<Arc<TrainedDict>>,
    raw: Vec<u8>,
    items: u32,
    new_pages: u32,
    control_len: u32,
    literal_len: u32,
    patch_len: u32,
    window_log: u32,
    long_distance: bool,
    measure_without_dict: bool,
}

/// A finished [`CompressJob`].
#[derive(Debug)]
pub struct CompressedBatch {
    seq: u64,
    frame: Vec<u8>,
    level: i32,
    without_dict: Option<usize>,
    with_dict: usize,
}

impl CompressedBatch {
    /// The batch sequence number.
    pub fn seq(&self) -> u64 {
        self.seq
    }
}

pub(crate) fn compressor(
    level: i32,
    dict: Option<&[u8]>,
    window_log: u32,
    long_distance: bool,
) -> Result<zstd::bulk::Compressor<'static>, EncodeError> {
    let err = |e: std::io::Error| EncodeError::Compress(e.to_string());
    let mut c = match dict {
        Some(d) => zstd::bulk::Compressor::with_dictionary(level, d),
        None => zstd::bulk::Compressor::new(level),
    }
    .map_err(err)?;
    c.set_parameter(CParameter::WindowLog(window_log))
        .map_err(err)?;
    c.set_parameter(CParameter::EnableLongDistanceMatching(long_distance))
        .map_err(err)?;
    c.set_parameter(CParameter::ContentSizeFlag(true))
        .map_err(err)?;
    c.set_parameter(CParameter::ChecksumFlag(false))
        .map_err(err)?;
    Ok(c)
}

impl CompressJob {
    /// The batch sequence number.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Uncompressed body size.
    pub fn raw_len(&self) -> usize {
        self.raw.len()
    }

    /// Compresses the batch and frames it.
    pub fn run(self) -> Result<CompressedBatch, EncodeError> {
        let dict = self.dict.as_deref().map(|d| d.bytes.as_slice());
        let mut body = Vec::new();
        let mut compressed = false;
        let mut without_dict = None;
        if !self.raw.is_empty() {
            let mut c = compressor(self.level, dict, self.window_log, self.long_distance)?;
            let z = c
                .compress(&self.raw)
                .map_err(|e| EncodeError::Compress(e.to_string()))?;
            if self.measure_without_dict {
                let mut plain = compressor(self.level, None, self.window_log, self.long_distance)?;
                let p = plain
                    .compress(&self.raw)
                    .map_err(|e| EncodeError::Compress(e.to_string()))?;
                without_dict = Some(p.len());
            }
            if z.len() < self.raw.len() {
                body = z;
                compressed = true;
            }
        }
        let with_dict = if compressed {
            body.len()
        } else {
            self.raw.len()
        };
        let dict_id = match (&self.dict, compressed) {
            (Some(d), true) => d.id,
            _ => 0,
        };
        let msg = Message::Batch(Batch {
            seq: self.seq,
            shape: self.shape,
            compressed,
            level: self.level as i8,
            dict_id,
            items: self.items,
            new_pages: self.new_pages,
            control_len: self.control_len,
            literal_len: self.literal_len,
            patch_len: self.patch_len,
            body: if compressed { body } else { self.raw },
        });
        let frame = msg.encode().map_err(EncodeError::BadReply)?;
        Ok(CompressedBatch {
            seq: self.seq,
            frame,
            level: self.level,
            without_dict,
            with_dict,
        })
    }
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Zero,
    /// First sight in this transfer: offered (if offers are on) and sent unless held.
    Candidate,
    /// Repeat of unique page n of this transfer.
    Ref(u32),
}

const KIND_SHIFT: u32 = 3;

#[derive(Debug, Default)]
struct Builder {
    positions: Vec<u64>,
    ops: Vec<Op>,
    hashes: Vec<PageHash>,
    /// Page key of each candidate (page number for the page shape).
    cand_keys: Vec<u64>,
    cand_data: Vec<u8>,
    literal: Vec<u8>,
    gap: u64,
    prev_page: Option<u64>,
}

impl Builder {
    fn is_empty(&self) -> bool {
        self.ops.is_empty() && self.literal.is_empty()
    }
}

#[derive(Debug)]
struct Sealed {
    b: Builder,
    missing: Option<Vec<bool>>,
    bases: Vec<Option<PageHash>>,
    proposals: Vec<(u32, PageHash)>,
    proposals_held: Vec<bool>,
}

/// The sender's own page store: what it sent before, by hash, so it can build deltas
/// against the pages the receiver names as bases, and an index of content features of
/// those pages, to propose similar pages as bases.
struct Reference {
    store: Box<dyn PageStore + Send>,
    features: BTreeMap<u64, PageHash>,
    cctx: zstd::zstd_safe::CCtx<'static>,
    scratch: Vec<u64>,
}

impl std::fmt::Debug for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reference")
            .field("pages", &self.store.len())
            .field("features", &self.features.len())
            .finish()
    }
}

impl Reference {
    /// True if this page was sent (and remembered) before.
    fn sent_before(&mut self, hash: &PageHash) -> bool {
        matches!(self.store.contains(hash), Ok(true))
    }

    /// True if what was sent at this key last time is a good XOR base for `page`.
    fn xor_at_key(&mut self, vm: u64, key: u64, page: &[u8]) -> bool {
        let Ok(Some(old)) = self.store.hash_at(vm, key) else {
            return false;
        };
        match self.store.get(&old) {
            Ok(Some(base)) => xor_nonzero(page, &base) < DELTA_MAX_NONZERO,
            _ => false,
        }
    }

    /// Remembers a page the sender sends: content by hash, what went at its key, and
    /// its features. A store failure only costs a later delta.
    fn remember(&mut self, vm: u64, key: u64, hash: PageHash, page: &[u8]) {
        if self.store.insert(hash, page).is_err() {
            return;
        }
        let _ = self.store.set_hash_at(vm, key, Some(hash));
        anchors(page, &mut self.scratch);
        for &f in self.scratch.iter().take(FEATURES_PER_PAGE) {
            self.features.insert(f, hash);
        }
        let cap = (self.store.capacity_bytes() / PAGE_SIZE as u64) * FEATURE_ENTRIES_PER_PAGE;
        while self.features.len() as u64 > cap {
            self.features.pop_first();
        }
    }

    /// Up to two remembered pages that share at least two anchors with `page` (most
    /// shared first), not `page` itself.
    fn similar(&mut self, own: &PageHash, page: &[u8], out: &mut Vec<PageHash>) {
        out.clear();
        if self.features.is_empty() {
            return;
        }
        anchors(page, &mut self.scratch);
        let mut votes: BTreeMap<PageHash, u32> = BTreeMap::new();
        for f in &self.scratch {
            if let Some(h) = self.features.get(f)
                && h != own
            {
                *votes.entry(*h).or_default() += 1;
            }
        }
        let mut v: Vec<(u32, PageHash)> = votes
            .into_iter()
            .filter(|(_, n)| *n >= 2)
            .map(|(h, n)| (n, h))
            .collect();
        v.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        out.extend(v.iter().take(MAX_PROPOSALS_PER_PAGE).map(|(_, h)| *h));
    }

    /// A zstd frame of `page` with `dict` (the bases, concatenated) as raw-content
    /// dictionary, if it is smaller than [`PATCH_MAX_BYTES`].
    fn patch(&mut self, page: &[u8], dict: &[u8], level: i32) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(page.len()));
        self.cctx
            .compress_using_dict(&mut out, page, dict, level)
            .ok()?;
        (out.len() < PATCH_MAX_BYTES).then_some(out)
    }
}

#[derive(Debug)]
enum DictState {
    Off,
    Collecting {
        samples: Vec<u8>,
        every: u64,
        seen: u64,
        until: u64,
        max: usize,
        dict_bytes: usize,
    },
    Ready(Arc<TrainedDict>),
}

/// The sending state machine. See the module docs for the flow.
#[derive(Debug)]
pub struct Sender {
    cfg: SenderConfig,
    limits: Limits,
    shape: Option<Shape>,
    finished: bool,
    end_sent: bool,
    index: BTreeMap<PageHash, u32>,
    unique: u64,
    next_seq: u64,
    cur: Builder,
    sealed: BTreeMap<u64, Sealed>,
    compressing: u64,
    done: BTreeMap<u64, Vec<u8>>,
    next_send: u64,
    out: VecDeque<SenderOutput>,
    stats: TransferStats,
    dict: DictState,
    measure_dict_gain: bool,
    lifter: StreamLifter,
    tail: Vec<u8>,
    pieces: Vec<Piece>,
    reference: Option<Reference>,
}

/// XORs `base` into `page` if the result has fewer than [`DELTA_MAX_NONZERO`] non-zero
/// bytes (then returns true); leaves `page` unchanged otherwise.
fn try_delta(page: &mut [u8], base: &[u8]) -> bool {
    if base.len() != page.len() || xor_nonzero(page, base) >= DELTA_MAX_NONZERO {
        return false;
    }
    for (p, b) in page.iter_mut().zip(base) {
        *p ^= b;
    }
    true
}

/// Number of bytes in which `page` and `base` differ (8 bytes at a time).
fn xor_nonzero(page: &[u8], base: &[u8]) -> usize {
    page.chunks_exact(8)
        .zip(base.chunks_exact(8))
        .map(|(a, b)| {
            let x = u64::from_ne_bytes(a.try_into().unwrap_or([0; 8]))
                ^ u64::from_ne_bytes(b.try_into().unwrap_or([0; 8]));
            // Non-zero bytes of x: set the high bit of each non-zero byte, count them.
            let t = (x & 0x7f7f_7f7f_7f7f_7f7f).wrapping_add(0x7f7f_7f7f_7f7f_7f7f) | x;
            (t & 0x8080_8080_8080_8080).count_ones() as usize
        })
        .sum()
}

/// A sender's page store with its content-feature index, carried from one transfer to
/// the next ([`Sender::take_reference`], [`Sender::with_reference`]).
#[derive(Debug)]
pub struct SenderReference(Reference);

fn dict_id(bytes: &[u8]) -> u64 {
    PageHash::of(bytes).short_id().max(1)
}

impl Sender {
    /// A sender for one transfer.
    pub fn new(cfg: SenderConfig) -> Result<Self, ConfigError> {
        let cfg = cfg.validate()?;
        let mut stats = TransferStats {
            level: cfg.level,
            ..TransferStats::default()
        };
        let (dict, measure_dict_gain) = match &cfg.dictionary {
            DictionaryConfig::Off => (DictState::Off, false),
            DictionaryConfig::Given(d) => {
                let t = Arc::new(TrainedDict {
                    id: dict_id(d),
                    bytes: d.clone(),
                });
                stats.dict_id = t.id;
                stats.dict_bytes = d.len() as u64;
                (DictState::Ready(t), true)
            }
            DictionaryConfig::Train {
                sample_input_bytes,
                max_sample_bytes,
                dict_bytes,
            } => {
                // Take every n-th candidate page so the samples spread over the window.
                let every = (*sample_input_bytes / (*max_sample_bytes as u64).max(1) / 3).max(1);
                (
                    DictState::Collecting {
                        samples: Vec::new(),
                        every,
                        seen: 0,
                        until: *sample_input_bytes,
                        max: *max_sample_bytes,
                        dict_bytes: *dict_bytes,
                    },
                    true,
                )
            }
        };
        Ok(Self {
            cfg,
            limits: Limits::default(),
            shape: None,
            finished: false,
            end_sent: false,
            index: BTreeMap::new(),
            unique: 0,
            next_seq: 0,
            cur: Builder::default(),
            sealed: BTreeMap::new(),
            compressing: 0,
            done: BTreeMap::new(),
            next_send: 0,
            out: VecDeque::new(),
            stats,
            dict,
            measure_dict_gain,
            lifter: StreamLifter::new(),
            tail: Vec::new(),
            pieces: Vec::new(),
            reference: None,
        })
    }

    /// Gives the sender a page store of its own (QEMU's XBZRLE cache, content-addressed):
    /// every page it sends is added to it, with content features. When the receiver
    /// names a page it holds at a changed page's key as a delta base, the sender looks
    /// the base up here and, if found, sends the page as an XOR delta; pages that share
    /// features with remembered ones are offered with those as proposed bases and may go
    /// as zstd patches against them. Needs offers on. Keep the sender alive, or pass the
    /// same store again, across transfers of the same VM
    /// ([`Sender::take_reference_store`]); the feature index is rebuilt only from pages
    /// sent while it is attached.
    pub fn with_reference_store(mut self, store: Box<dyn PageStore + Send>) -> Self {
        self.reference = Some(Reference {
            store,
            features: BTreeMap::new(),
            cctx: zstd::zstd_safe::CCtx::create(),
            scratch: Vec::new(),
        });
        self
    }

    /// Like [`Sender::with_reference_store`], but keeps the feature index of an earlier
    /// sender ([`Sender::take_reference`]).
    pub fn with_reference(mut self, reference: SenderReference) -> Self {
        self.reference = Some(reference.0);
        self
    }

    /// Takes the sender's own page store back (for the next transfer).
    pub fn take_reference_store(&mut self) -> Option<Box<dyn PageStore + Send>> {
        self.reference.take().map(|r| r.store)
    }

    /// Takes the sender's page store and feature index back, for the next transfer of
    /// the same VM ([`Sender::with_reference`]).
    pub fn take_reference(&mut self) -> Option<SenderReference> {
        self.reference.take().map(SenderReference)
    }

    /// Statistics so far (final after [`Sender::is_done`]).
    pub fn stats(&self) -> &TransferStats {
        &self.stats
    }

    /// Changes the zstd level for batches compressed from now on (clamped to 1..=19),
    /// e.g. from [`crate::level::choose_level`] when the link rate changes.
    pub fn set_level(&mut self, level: i32) {
        self.cfg.level = level.clamp(*crate::level::LEVELS.start(), *crate::level::LEVELS.end());
    }

    /// The trained or given dictionary, to keep for a later transfer.
    pub fn dictionary(&self) -> Option<&[u8]> {
        match &self.dict {
            DictState::Ready(d) => Some(&d.bytes),
            _ => None,
        }
    }

    /// Batches sealed but not yet sent.
    pub fn in_flight(&self) -> usize {
        self.sealed.len() + self.compressing as usize + self.done.len()
    }

    /// True once the end frame has been handed out and nothing is left to poll.
    pub fn is_done(&self) -> bool {
        self.end_sent && self.out.is_empty()
    }

    /// Next thing for the driver to do.
    pub fn poll_output(&mut self) -> Option<SenderOutput> {
        self.out.pop_front()
    }

    fn begin(&mut self, shape: Shape) -> Result<(), EncodeError> {
        if self.finished {
            return Err(EncodeError::Finished);
        }
        match self.shape {
            Some(s) if s != shape => return Err(EncodeError::ShapeMismatch),
            Some(_) => {}
            None => {
                self.shape = Some(shape);
                self.emit(&Message::Start(Start {
                    transfer_id: self.cfg.transfer_id,
                    shape,
                    vm_id: self.cfg.vm_id,
                }))?;
                // A given dictionary is sent in-band once, right after the start frame.
                if let DictState::Ready(d) = &self.dict {
                    let msg = Message::Dict(Dict {
                        id: d.id,
                        bytes: d.bytes.clone(),
                    });
                    self.emit(&msg)?;
                }
            }
        }
        if self.in_flight() >= self.cfg.max_in_flight {
            return Err(EncodeError::Busy(self.in_flight()));
        }
        Ok(())
    }

    fn emit(&mut self, m: &Message) -> Result<usize, EncodeError> {
        let f = m.encode().map_err(EncodeError::BadReply)?;
        let n = f.len();
        self.stats.bytes_out += n as u64;
        self.out.push_back(SenderOutput::Send(f));
        Ok(n)
    }

    /// Adds whole pages starting at page number `first_page` (`bytes.len()` must be a
    /// multiple of 4096). May seal batches. Fails with [`EncodeError::Busy`] when
    /// `max_in_flight` batches are waiting: poll outputs and feed replies first.
    pub fn push_pages(&mut self, first_page: u64, bytes: &[u8]) -> Result<(), EncodeError> {
        if !bytes.len().is_multiple_of(PAGE_SIZE) {
            return Err(EncodeError::NotPageAligned(bytes.len()));
        }
        self.begin(Shape::Pages)?;
        for (i, page) in bytes.chunks_exact(PAGE_SIZE).enumerate() {
            self.stats.bytes_in += PAGE_SIZE as u64;
            self.add_page(first_page.wrapping_add(i as u64), page)?;
        }
        self.after_input()
    }

    /// Adds bytes of a QEMU migration stream (or any byte stream). Pages the lifter
    /// recognises are deduplicated; every other byte is kept as literal.
    pub fn push_stream(&mut self, bytes: &[u8]) -> Result<(), EncodeError> {
        self.begin(Shape::Stream)?;
        self.stats.bytes_in += bytes.len() as u64;
        self.tail.extend_from_slice(bytes);
        self.lift(false)?;
        self.after_input()
    }

    fn lift(&mut self, is_final: bool) -> Result<(), EncodeError> {
        let tail = std::mem::take(&mut self.tail);
        let mut pieces = std::mem::take(&mut self.pieces);
        pieces.clear();
        let used = self.lifter.lift(&tail, is_final, &mut pieces);
        let mut pos = 0;
        for p in &pieces {
            match *p {
                Piece::Literal(n) => {
                    self.add_literal(&tail[pos..pos + n])?;
                    pos += n;
                }
                Piece::Page { key } => {
                    self.add_page(key, &tail[pos..pos + PAGE_SIZE])?;
                    pos += PAGE_SIZE;
                }
            }
        }
        self.pieces = pieces;
        self.tail = tail;
        self.tail.drain(..used);
        Ok(())
    }

    fn add_literal(&mut self, mut bytes: &[u8]) -> Result<(), EncodeError> {
        while !bytes.is_empty() {
            let room = self.cfg.batch_literal_bytes - self.cur.literal.len();
            let n = room.min(bytes.len());
            self.cur.literal.extend_from_slice(&bytes[..n]);
            self.cur.gap += n as u64;
            self.stats.literal_bytes += n as u64;
            bytes = &bytes[n..];
            if self.cur.literal.len() >= self.cfg.batch_literal_bytes {
                self.seal()?;
            }
        }
        Ok(())
    }

    fn add_page(&mut self, page_no: u64, page: &[u8]) -> Result<(), EncodeError> {
        self.stats.pages += 1;
        let b = &mut self.cur;
        match self.shape {
            Some(Shape::Stream) => {
                b.positions.push(b.gap);
                b.gap = 0;
            }
            _ => {
                let expected = b.prev_page.map_or(0, |p| p.wrapping_add(1));
                let delta = page_no.wrapping_sub(expected) as i64;
                b.positions.push(((delta << 1) ^ (delta >> 63)) as u64);
                b.prev_page = Some(page_no);
            }
        }
        if is_zero(page) {
            self.stats.zero_pages += 1;
            b.ops.push(Op::Zero);
        } else {
            let h = PageHash::of(page);
            if let Some(&u) = self.index.get(&h) {
                self.stats.dedup_hits_local += 1;
                b.ops.push(Op::Ref(u));
            } else {
                self.index.insert(h, self.unique as u32);
                self.unique += 1;
                b.ops.push(Op::Candidate);
                b.hashes.push(h);
                b.cand_keys.push(page_no);
                if b.cand_data.capacity() == 0 {
                    // Room for a whole batch plus its control section: filling it never
                    // reallocates (untouched capacity costs no memory).
                    b.cand_data
                        .reserve(self.cfg.batch_pages * (PAGE_SIZE + 20) + 64);
                }
                b.cand_data.extend_from_slice(page);
                if let DictState::Collecting {
                    samples,
                    every,
                    seen,
                    max,
                    ..
                } = &mut self.dict
                {
                    if *seen % *every == 0 && samples.len() + PAGE_SIZE <= *max {
                        samples.extend_from_slice(page);
                    }
                    *seen += 1;
                }
            }
        }
        if self.cur.ops.len() >= self.cfg.batch_pages {
            self.seal()?;
        }
        Ok(())
    }

    fn seal(&mut self) -> Result<(), EncodeError> {
        if self.cur.is_empty() {
            return Ok(());
        }
        let b = std::mem::take(&mut self.cur);
        let seq = self.next_seq;
        self.next_seq += 1;
        let mut proposals = Vec::new();
        let missing = if self.cfg.offer_hashes && !b.hashes.is_empty() {
            // Page numbers for the page shape, lifted RAM addresses for streams.
            let keys = Some(b.cand_keys.clone());
            if let Some(r) = &mut self.reference {
                let mut similar = Vec::new();
                for (i, h) in b.hashes.iter().enumerate() {
                    let page = &b.cand_data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
                    // No proposals for a page sent before (the receiver likely holds it)
                    // or one that will go as an XOR delta against what was sent at its
                    // key: proposals cost 33 bytes each.
                    if r.sent_before(h) || r.xor_at_key(self.cfg.vm_id, b.cand_keys[i], page) {
                        continue;
                    }
                    r.similar(h, page, &mut similar);
                    proposals.extend(similar.iter().map(|s| (i as u32, *s)));
                }
            }
            let n = self.emit(&Message::Offer(Offer {
                batch: seq,
                hashes: b.hashes.clone(),
                keys,
                proposals: proposals.clone(),
            }))?;
            self.stats.offer_bytes += n as u64;
            None
        } else {
            Some(vec![true; b.hashes.len()])
        };
        self.sealed.insert(
            seq,
            Sealed {
                b,
                missing,
                bases: Vec::new(),
                proposals,
                proposals_held: Vec::new(),
            },
        );
        Ok(())
    }

    fn after_input(&mut self) -> Result<(), EncodeError> {
        if let DictState::Collecting { until, .. } = &self.dict
            && self.stats.bytes_in >= *until
        {
            self.train();
        }
        self.dispatch()
    }

    fn train(&mut self) {
        let DictState::Collecting {
            samples,
            dict_bytes,
            ..
        } = std::mem::replace(&mut self.dict, DictState::Off)
        else {
            return;
        };
        let chunks: Vec<&[u8]> = samples.chunks(PAGE_SIZE).collect();
        // zdict needs a handful of samples; with fewer, or on failure, go on without.
        if chunks.len() < 8 {
            return;
        }
        let Ok(bytes) = zstd::dict::from_samples(&chunks, dict_bytes) else {
            return;
        };
        let d = TrainedDict {
            id: dict_id(&bytes),
            bytes,
        };
        self.stats.dict_id = d.id;
        self.stats.dict_bytes = d.bytes.len() as u64;
        let msg = Message::Dict(Dict {
            id: d.id,
            bytes: d.bytes.clone(),
        });
        if self.emit(&msg).is_ok() {
            self.dict = DictState::Ready(Arc::new(d));
        }
    }

    fn dispatch(&mut self) -> Result<(), EncodeError> {
        if matches!(self.dict, DictState::Collecting { .. }) {
            return Ok(());
        }
        let ready: Vec<u64> = self
            .sealed
            .iter()
            .filter(|(_, s)| s.missing.is_some())
            .map(|(k, _)| *k)
            .collect();
        for seq in ready {
            let Some(s) = self.sealed.remove(&seq) else {
                continue;
            };
            let job = self.build_job(seq, s);
            self.compressing += 1;
            self.out.push_back(SenderOutput::Compress(job));
        }
        Ok(())
    }

    fn build_job(&mut self, seq: u64, s: Sealed) -> CompressJob {
        let Sealed {
            b,
            missing,
            bases,
            proposals,
            proposals_held,
        } = s;
        let mut patch = Vec::new();
        let mut held_props = proposals
            .iter()
            .zip(proposals_held.iter().chain(std::iter::repeat(&false)))
            .filter(|(_, h)| **h)
            .map(|(p, _)| *p)
            .peekable();
        let mut base_hashes: Vec<PageHash> = Vec::new();
        let missing = missing.unwrap_or_default();
        let items = b.ops.len();
        let mut control = Vec::with_capacity(items * 2);
        let mut c = 0usize;
        let mut new_idx = Vec::new();
        let mut raw = b.cand_data;
        for (pos, op) in b.positions.iter().zip(&b.ops) {
            put_varint(&mut control, *pos);
            let code = match op {
                Op::Zero => 0,
                Op::Ref(u) => 2 | (u64::from(*u) << KIND_SHIFT),
                Op::Candidate => {
                    let m = missing.get(c).copied().unwrap_or(true);
                    // This candidate's bases, in the receiver's order: same-key base,
                    // then held proposals.
                    base_hashes.clear();
                    base_hashes.extend(bases.get(c).copied().flatten());
                    while let Some((i, h)) = held_props.peek() {
                        if *i as usize > c {
                            break;
                        }
                        if *i as usize == c {
                            base_hashes.push(*h);
                        }
                        held_props.next();
                    }
                    let code = if m {
                        let page = &mut raw[c * PAGE_SIZE..(c + 1) * PAGE_SIZE];
                        let mut code = 1;
                        if let Some(r) = &mut self.reference {
                            // Remember what was sent, for deltas in later transfers.
                            r.remember(self.cfg.vm_id, b.cand_keys[c], b.hashes[c], page);
                            let mut dict = Vec::new();
                            let mut complete = true;
                            for bh in &base_hashes {
                                match r.store.get(bh) {
                                    Ok(Some(p)) => dict.extend_from_slice(&p),
                                    _ => complete = false,
                                }
                            }
                            if complete && !dict.is_empty() {
                                if try_delta(page, &dict[..PAGE_SIZE]) {
                                    self.stats.delta_pages += 1;
                                    code = 4;
                                } else if let Some(p) = r.patch(page, &dict, 1) {
                                    self.stats.patch_pages += 1;
                                    code = 5 | ((p.len() as u64) << KIND_SHIFT);
                                    patch.extend_from_slice(&p);
                                }
                            }
                        }
                        if code & 7 != 5 {
                            new_idx.push(c);
                        }
                        code
                    } else {
                        self.stats.dedup_hits_remote += 1;
                        3 | ((c as u64) << KIND_SHIFT)
                    };
                    c += 1;
                    code
                }
            };
            put_varint(&mut control, code);
        }
        // Body: new pages, control, literal. The pages are already in `cand_data`; drop
        // the held ones in place and append the rest, so no page is copied again.
        if new_idx.len() != b.hashes.len() {
            for (w, &i) in new_idx.iter().enumerate() {
                if w != i {
                    raw.copy_within(i * PAGE_SIZE..(i + 1) * PAGE_SIZE, w * PAGE_SIZE);
                }
            }
        }
        raw.truncate(new_idx.len() * PAGE_SIZE);
        raw.extend_from_slice(&control);
        raw.extend_from_slice(&b.literal);
        raw.extend_from_slice(&patch);
        self.stats.new_pages += new_idx.len() as u64;
        let dict = match &self.dict {
            DictState::Ready(d) => Some(d.clone()),
            _ => None,
        };
        let measure_without_dict = dict.is_some() && self.measure_dict_gain && !new_idx.is_empty();
        if measure_without_dict {
            self.measure_dict_gain = false;
        }
        CompressJob {
            seq,
            shape: self.shape.unwrap_or(Shape::Pages),
            level: self.cfg.level,
            dict,
            raw,
            items: items as u32,
            new_pages: new_idx.len() as u32,
            control_len: control.len() as u32,
            literal_len: b.literal.len() as u32,
            patch_len: patch.len() as u32,
            window_log: self.cfg.window_log,
            long_distance: self.cfg.long_distance,
            measure_without_dict,
        }
    }

    /// Feeds the receiver's reply frame (a `Missing` set).
    pub fn handle_reply(&mut self, frame: &[u8]) -> Result<(), EncodeError> {
        self.stats.reply_bytes += frame.len() as u64;
        let Message::Missing(Missing {
            batch,
            missing,
            bases,
            proposals_held,
        }) = Message::decode(frame, &self.limits)?
        else {
            return Err(EncodeError::BadReply(
                crate::error::DecodeError::Unexpected {
                    what: "reply",
                    detail: "only missing sets go from receiver to sender",
                },
            ));
        };
        let Some(s) = self.sealed.get_mut(&batch) else {
            return Err(EncodeError::BadReply(
                crate::error::DecodeError::Unexpected {
                    what: "missing set",
                    detail: "no offer outstanding for that batch",
                },
            ));
        };
        if s.missing.is_some()
            || missing.len() != s.b.hashes.len()
            || proposals_held.len() != s.proposals.len()
        {
            return Err(EncodeError::BadReply(
                crate::error::DecodeError::Malformed {
                    what: "missing set",
                    detail: format!(
                        "{} flags for an offer of {}",
                        missing.len(),
                        s.b.hashes.len()
                    ),
                },
            ));
        }
        s.missing = Some(missing);
        s.bases = bases;
        s.proposals_held = proposals_held;
        self.dispatch()
    }

    /// Takes a finished job back; frames go out in batch order.
    pub fn handle_compressed(&mut self, done: CompressedBatch) -> Result<(), EncodeError> {
        self.compressing = self.compressing.saturating_sub(1);
        if let Some(without) = done.without_dict {
            self.stats.dict_gain = Some(1.0 - done.with_dict as f64 / without.max(1) as f64);
        }
        self.stats.level = done.level;
        self.done.insert(done.seq, done.frame);
        while let Some(f) = self.done.remove(&self.next_send) {
            self.stats.bytes_out += f.len() as u64;
            self.stats.batches += 1;
            self.out.push_back(SenderOutput::Send(f));
            self.next_send += 1;
        }
        self.maybe_end()
    }

    /// No more input: seals the last batch, trains the dictionary if it still waits for
    /// samples, and queues the end frame once every batch is out.
    pub fn finish(&mut self) -> Result<(), EncodeError> {
        if self.finished {
            return Ok(());
        }
        if self.shape.is_none() {
            self.begin(Shape::Pages)?;
        }
        if self.shape == Some(Shape::Stream) {
            self.lift(true)?;
        }
        self.seal()?;
        self.finished = true;
        if matches!(self.dict, DictState::Collecting { .. }) {
            self.train();
            if matches!(self.dict, DictState::Collecting { .. }) {
                self.dict = DictState::Off;
            }
        }
        self.dispatch()?;
        self.maybe_end()
    }

    fn maybe_end(&mut self) -> Result<(), EncodeError> {
        if self.finished
            && !self.end_sent
            && self.next_send == self.next_seq
            && self.in_flight() == 0
        {
            self.end_sent = true;
            self.emit(&Message::End(End {
                batches: self.next_seq,
                pages: self.stats.pages,
                bytes_in: self.stats.bytes_in,
            }))?;
        }
        Ok(())
    }
}
