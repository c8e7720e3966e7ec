//! The sending half: cuts the source into sequenced chunks, schedules them onto streams,
//! resends a dead stream's chunks, adapts the stream count and survives reconnection.
//!
//! Scheduling: each stream may have `cap_i` bytes in flight (sent, not yet acknowledged),
//! where `cap_i = 2 x rate_i x latency_i + 2 chunks` (rate: windowed maximum of delivery-rate
//! samples; latency: the smallest chunk round trip seen): a stream gets work in proportion to
//! its measured goodput (Little's law), so a slow stream holds few chunks and cannot stall the
//! receiver's window for long. Among streams with room, the emptiest relative to its cap goes
//! first (weighted round-robin). Resends go before new chunks.
//!
//! Stalls: a stream with chunks in flight and no acknowledgement for the stall timeout is
//! closed and treated as dead. When the receiver's window is blocked on the oldest chunk for
//! longer than its stream's usual latency, that chunk is also sent on the fastest other stream
//! (the receiver drops the duplicate).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::{Bytes, BytesMut};

use crate::adapt::{Controller, EpochSample};

/// Shortest window of the per-stream delivery-rate maximum filter.
const RATE_WINDOW_MIN: Micros = 500_000;
/// Most rate samples kept per stream.
const RATE_SAMPLES_MAX: usize = 64;
use crate::{Ack, Chunk, Config, Micros, StreamId, TransferError};

/// What the driver tells the sender.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    /// A stream asked for with [`Command::OpenStream`] is established (hello answered).
    StreamOpened(StreamId),
    /// A stream could not be opened, or its connection died.
    StreamFailed(StreamId),
    /// An ack arrived on a stream.
    Ack(StreamId, Ack),
    /// Path statistics of a stream's connection (from `TCP_INFO` where available).
    PathStats {
        /// The stream.
        stream: StreamId,
        /// Smoothed RTT of the connection in microseconds.
        rtt_us: u64,
        /// Retransmitted segments over segments sent, since the last report.
        loss: f64,
    },
}

/// What the sender asks the driver to do.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    /// Open a new stream (a new connection) with this id.
    OpenStream(StreamId),
    /// Write this chunk on this stream.
    Send(StreamId, Chunk),
    /// Close this stream (drained, surplus or stalled).
    CloseStream(StreamId),
    /// Everything was delivered and acknowledged.
    Finished,
    /// The transfer failed; nothing more will happen.
    Failed(TransferError),
}

#[derive(Debug)]
struct ChunkState {
    offset: u64,
    data: Bytes,
    fin: bool,
    on: Vec<StreamId>,
    sent_at: Micros,
    sacked: bool,
    sends: u32,
    /// The stream's delivered bytes when this chunk was sent (delivery-rate sampling).
    delivered_at_send: u64,
    /// The stream had at least half its cap in flight when this chunk was sent.
    busy_at_send: bool,
}

#[derive(Debug)]
struct StreamState {
    opened: bool,
    closing: bool,
    inflight: u64,
    delivered: u64,
    rate: Option<f64>,
    samples: VecDeque<(Micros, f64)>,
    min_latency: Option<Micros>,
    last_progress: Micros,
    chunks: BTreeSet<u64>,
    path_loss: f64,
    path_rtt_us: Option<u64>,
}

impl StreamState {
    fn new(now: Micros) -> Self {
        Self {
            opened: false,
            closing: false,
            inflight: 0,
            delivered: 0,
            rate: None,
            samples: VecDeque::new(),
            min_latency: None,
            last_progress: now,
            chunks: BTreeSet::new(),
            path_loss: 0.0,
            path_rtt_us: None,
        }
    }
}

/// Per-stream figures for progress reports.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamProgress {
    /// The stream.
    pub id: StreamId,
    /// Measured goodput, bytes per second.
    pub rate: f64,
    /// Bytes in flight.
    pub inflight: u64,
    /// Smoothed RTT of the stream's connection, microseconds, once path statistics came
    /// ([`Input::PathStats`]).
    pub path_rtt_us: Option<u64>,
    /// Retransmitted over sent segments of the connection in the last path-statistics
    /// interval, once path statistics came.
    pub path_loss: Option<f64>,
}

/// Progress of a transfer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Progress {
    /// Bytes the receiver has handed to its sink (resume point).
    pub acked: u64,
    /// Bytes the receiver holds (in order or not).
    pub received: u64,
    /// Bytes taken from the source so far.
    pub taken: u64,
    /// Total length, once the source ended.
    pub total: Option<u64>,
    /// Goodput of the last epoch, bytes per second.
    pub rate: f64,
    /// Streams established now.
    pub streams_active: usize,
    /// Streams the controller wants.
    pub streams_target: usize,
    /// Per-stream figures.
    pub streams: Vec<StreamProgress>,
    /// Chunks sent more than once.
    pub resent_chunks: u64,
}

#[derive(Debug, PartialEq)]
enum State {
    Running,
    Finished,
    Failed,
}

/// The sending state machine of one transfer.
#[derive(Debug)]
pub struct Sender {
    cfg: Config,
    state: State,
    pending: BytesMut,
    input_done: bool,
    fin_cut: bool,
    next_seq: u64,
    next_offset: u64,
    chunks: BTreeMap<u64, ChunkState>,
    held: u64,
    next_unsent: u64,
    resend: BTreeSet<u64>,
    streams: BTreeMap<StreamId, StreamState>,
    next_stream: u32,
    cumulative: u64,
    window_end: u64,
    sacked_bytes: u64,
    controller: Controller,
    epoch_sacked: u64,
    epoch_sent: u64,
    epoch_resent: u64,
    /// Chunks lost with a dead stream this epoch (hedges are not losses).
    epoch_lost: u64,
    window_blocked_since: Option<Micros>,
    window_blocked_total: Micros,
    app_idle_since: Option<Micros>,
    app_idle_total: Micros,
    last_rate: f64,
    min_rtt: Option<Micros>,
    disconnected_since: Option<Micros>,
    next_open_at: Micros,
    backoff: Micros,
    resent_chunks: u64,
    last_now: Micros,
    commands: VecDeque<Command>,
}

impl Sender {
    /// A sender that starts at `now` and immediately wants `initial_streams` streams.
    pub fn new(cfg: Config, now: Micros) -> Result<Self, crate::ConfigError> {
        let cfg = cfg.validate()?;
        let controller = Controller::new(&cfg, now);
        let mut s = Self {
            window_end: cfg.window_bytes,
            backoff: cfg.reopen_backoff_min,
            cfg,
            state: State::Running,
            pending: BytesMut::new(),
            input_done: false,
            fin_cut: false,
            next_seq: 0,
            next_offset: 0,
            chunks: BTreeMap::new(),
            held: 0,
            next_unsent: 0,
            resend: BTreeSet::new(),
            streams: BTreeMap::new(),
            next_stream: 0,
            cumulative: 0,
            sacked_bytes: 0,
            controller,
            epoch_sacked: 0,
            epoch_sent: 0,
            epoch_resent: 0,
            epoch_lost: 0,
            window_blocked_since: None,
            window_blocked_total: 0,
            app_idle_since: None,
            app_idle_total: 0,
            last_rate: 0.0,
            min_rtt: None,
            disconnected_since: Some(now),
            next_open_at: now,
            resent_chunks: 0,
            last_now: now,
            commands: VecDeque::new(),
        };
        s.ensure_streams(now);
        Ok(s)
    }

    /// How many more source bytes the sender will take now (its buffer is bounded by the
    /// window plus one chunk). Zero means: wait for acks.
    pub fn wants(&self) -> usize {
        if self.input_done || self.state != State::Running {
            return 0;
        }
        let limit = self.cfg.window_bytes + self.cfg.chunk_size as u64;
        let held = self.held + self.pending.len() as u64;
        usize::try_from(limit.saturating_sub(held)).unwrap_or(usize::MAX)
    }

    /// Appends source bytes (at most [`Sender::wants`] are kept; the rest is returned so the
    /// caller can offer it again later).
    pub fn push(&mut self, now: Micros, mut data: Bytes) -> Bytes {
        let take = data.len().min(self.wants());
        let rest = data.split_off(take);
        self.pending.extend_from_slice(&data);
        self.cut_chunks();
        self.pump(now);
        rest
    }

    /// The source has ended: the last (possibly short or empty) chunk carries the end mark.
    pub fn finish(&mut self, now: Micros) {
        if self.input_done {
            return;
        }
        self.input_done = true;
        self.cut_chunks();
        self.pump(now);
    }

    /// Gives up: closes every stream and reports [`TransferError::Cancelled`].
    pub fn cancel(&mut self) {
        if self.state == State::Running {
            self.fail(TransferError::Cancelled);
        }
    }

    /// Pins the stream count (operator override); adaptation continues from there.
    pub fn set_streams(&mut self, now: Micros, n: usize) {
        self.controller.set_target(n);
        self.ensure_streams(now);
        self.pump(now);
    }

    fn cut_chunks(&mut self) {
        let size = self.cfg.chunk_size;
        while self.pending.len() >= size
            || (self.input_done && !self.fin_cut && self.pending.len() <= size)
        {
            let take = self.pending.len().min(size);
            let data = self.pending.split_to(take).freeze();
            let fin = self.input_done && self.pending.is_empty();
            let len = data.len() as u64;
            self.chunks.insert(
                self.next_seq,
                ChunkState {
                    offset: self.next_offset,
                    data,
                    fin,
                    on: Vec::new(),
                    sent_at: 0,
                    sacked: false,
                    sends: 0,
                    delivered_at_send: 0,
                    busy_at_send: false,
                },
            );
            self.held += len;
            self.next_seq += 1;
            self.next_offset += len;
            if fin {
                self.fin_cut = true;
                break;
            }
        }
    }

    /// Feeds one event.
    pub fn handle(&mut self, now: Micros, input: Input) {
        if self.state != State::Running {
            return;
        }
        match input {
            Input::StreamOpened(id) => {
                if let Some(s) = self.streams.get_mut(&id) {
                    s.opened = true;
                    s.last_progress = now;
                    self.disconnected_since = None;
                    self.backoff = self.cfg.reopen_backoff_min;
                } else {
                    // Not ours (or already given up): close it.
                    self.commands.push_back(Command::CloseStream(id));
                }
            }
            Input::StreamFailed(id) => self.drop_stream(now, id),
            Input::Ack(id, ack) => self.on_ack(now, id, ack),
            Input::PathStats {
                stream,
                rtt_us,
                loss,
            } => {
                if let Some(s) = self.streams.get_mut(&stream) {
                    s.path_rtt_us = Some(rtt_us);
                    s.path_loss = loss.clamp(0.0, 1.0);
                }
            }
        }
        self.check_done();
        self.ensure_streams(now);
        self.pump(now);
    }

    fn on_ack(&mut self, now: Micros, id: StreamId, ack: Ack) {
        self.window_end = self.window_end.max(ack.window_end);
        for seq in ack.received {
            let Some(c) = self.chunks.get_mut(&seq) else {
                continue;
            };
            if c.sacked {
                continue;
            }
            c.sacked = true;
            let len = c.data.len() as u64;
            self.sacked_bytes += len;
            self.epoch_sacked += len;
            self.resend.remove(&seq);
            let latency = now.saturating_sub(c.sent_at);
            let delivered_at_send = c.delivered_at_send;
            let busy = c.busy_at_send;
            // Karn: a chunk sent more than once cannot tell which send the ack answers.
            let clean_sample = c.sends == 1;
            for sid in std::mem::take(&mut c.on) {
                if let Some(s) = self.streams.get_mut(&sid) {
                    s.inflight = s.inflight.saturating_sub(len);
                    s.chunks.remove(&seq);
                    if sid == id {
                        s.delivered += len;
                        s.last_progress = now;
                        if !clean_sample {
                            continue;
                        }
                        s.min_latency = Some(s.min_latency.map_or(latency, |m| m.min(latency)));
                        // A chunk sent while the stream was not kept busy measures the
                        // sender, not the path: it may raise the estimate, never lower it.
                        if latency > 0 {
                            let sample = s.delivered.saturating_sub(delivered_at_send) as f64
                                / (latency as f64 / 1e6);
                            if busy || s.rate.is_none_or(|r| sample > r) {
                                s.samples.push_back((now, sample));
                            }
                            // Windowed maximum (as BBR's bandwidth filter): queueing noise
                            // and app-limited gaps do not drag the estimate down.
                            let win = (8 * s.min_latency.unwrap_or(0)).max(RATE_WINDOW_MIN);
                            while s.samples.len() > RATE_SAMPLES_MAX
                                || s.samples.front().is_some_and(|(t, _)| now - t > win)
                            {
                                s.samples.pop_front();
                            }
                            s.rate = s
                                .samples
                                .iter()
                                .map(|x| x.1)
                                .max_by(f64::total_cmp)
                                .or(s.rate);
                        }
                    }
                }
            }
            if clean_sample {
                self.min_rtt = Some(self.min_rtt.map_or(latency, |m| m.min(latency)));
            }
        }
        self.cumulative = self.cumulative.max(ack.cumulative);
        {
            while let Some(entry) = self.chunks.first_entry() {
                let c = entry.get();
                // An empty end-of-transfer chunk is below any cumulative offset: keep it until
                // the receiver confirms it.
                if c.offset + c.data.len() as u64 > self.cumulative || (c.fin && !c.sacked) {
                    break;
                }
                let (seq, c) = entry.remove_entry();
                let len = c.data.len() as u64;
                self.held -= len;
                self.resend.remove(&seq);
                for sid in c.on {
                    if let Some(s) = self.streams.get_mut(&sid) {
                        s.inflight = s.inflight.saturating_sub(len);
                        s.chunks.remove(&seq);
                    }
                }
                if c.fin {
                    break;
                }
            }
        }
        self.close_drained();
    }

    fn check_done(&mut self) {
        if self.state == State::Running
            && self.fin_cut
            && self.cumulative == self.next_offset
            && self.chunks.is_empty()
        {
            self.state = State::Finished;
            for (id, _) in std::mem::take(&mut self.streams) {
                self.commands.push_back(Command::CloseStream(id));
            }
            self.commands.push_back(Command::Finished);
        }
    }

    fn fail(&mut self, e: TransferError) {
        self.state = State::Failed;
        for (id, _) in std::mem::take(&mut self.streams) {
            self.commands.push_back(Command::CloseStream(id));
        }
        self.commands.push_back(Command::Failed(e));
    }

    fn drop_stream(&mut self, now: Micros, id: StreamId) {
        let Some(s) = self.streams.remove(&id) else {
            return;
        };
        for seq in s.chunks {
            if let Some(c) = self.chunks.get_mut(&seq) {
                c.on.retain(|x| *x != id);
                if !c.sacked && c.on.is_empty() {
                    self.resend.insert(seq);
                    self.epoch_lost += 1;
                }
            }
        }
        if !self.streams.values().any(|s| s.opened) && self.disconnected_since.is_none() {
            self.disconnected_since = Some(now);
            self.next_open_at = now;
        }
    }

    fn opened(&self) -> usize {
        self.streams
            .values()
            .filter(|s| s.opened && !s.closing)
            .count()
    }

    fn ensure_streams(&mut self, now: Micros) {
        if self.state != State::Running {
            return;
        }
        let target = self.controller.target();
        let live = self.streams.values().filter(|s| !s.closing).count();
        if live < target {
            let pending_opens = self.streams.values().any(|s| !s.opened);
            // While no stream works, retry with backoff instead of hammering the peer.
            if self.disconnected_since.is_some() {
                if now < self.next_open_at || pending_opens {
                    return;
                }
                self.next_open_at = now + self.backoff;
                self.backoff = (self.backoff * 2).min(self.cfg.reopen_backoff_max);
            }
            for _ in live..target {
                let id = StreamId(self.next_stream);
                self.next_stream += 1;
                self.streams.insert(id, StreamState::new(now));
                self.commands.push_back(Command::OpenStream(id));
            }
        } else if self.opened() > target {
            // Retire the slowest surplus streams once they drain.
            let mut by_rate: Vec<(f64, StreamId)> = self
                .streams
                .iter()
                .filter(|(_, s)| s.opened && !s.closing)
                .map(|(id, s)| (s.rate.unwrap_or(0.0), *id))
                .collect();
            by_rate.sort_by(|a, b| a.0.total_cmp(&b.0));
            let surplus = self.opened() - target;
            for (_, id) in by_rate.into_iter().take(surplus) {
                if let Some(s) = self.streams.get_mut(&id) {
                    s.closing = true;
                }
            }
            self.close_drained();
        }
    }

    fn close_drained(&mut self) {
        let drained: Vec<StreamId> = self
            .streams
            .iter()
            .filter(|(_, s)| s.closing && s.inflight == 0)
            .map(|(id, _)| *id)
            .collect();
        for id in drained {
            self.streams.remove(&id);
            self.commands.push_back(Command::CloseStream(id));
        }
    }

    fn measured_cap(&self, s: &StreamState) -> Option<u64> {
        let (rate, lat) = (s.rate?, s.min_latency?);
        let lat = lat.max(10_000) as f64 / 1e6;
        let chunk = self.cfg.chunk_size as u64;
        Some((2.0 * rate * lat) as u64 + 2 * chunk)
    }

    /// Bytes stream `s` may have in flight: twice its measured rate times its latency; a
    /// new stream gets the mean of the measured ones (or a share of the window at start).
    fn cap(&self, s: &StreamState) -> u64 {
        if let Some(c) = self.measured_cap(s) {
            return c;
        }
        let measured: Vec<u64> = self
            .streams
            .values()
            .filter_map(|x| self.measured_cap(x))
            .collect();
        let chunk = self.cfg.chunk_size as u64;
        if measured.is_empty() {
            // Small at first: a deep queue on a stream of unknown speed would hold back the
            // receiver's window (head-of-line blocking) for as long as it takes to drain.
            let share = self.cfg.window_bytes / (2 * self.controller.target().max(1) as u64);
            share.clamp(2 * chunk, 16 * chunk)
        } else {
            (measured.iter().sum::<u64>() / measured.len() as u64).max(2 * chunk)
        }
    }

    /// Expected time (us from now) until a chunk of `len` bytes sent on `s` now is acked.
    fn eta(s: &StreamState, len: u64) -> Option<f64> {
        let (rate, lat) = (s.rate?, s.min_latency?);
        Some((s.inflight + len) as f64 / rate.max(1.0) * 1e6 + lat as f64)
    }

    /// Picks the stream for the next chunk: among streams with room under their cap, the one
    /// expected to deliver it first; a stream whose expected delivery is later than the best
    /// stream's (even a full one) by more than the reorder slack is skipped, so a slow stream
    /// cannot hold back the receiver's window. Slack: the time the network needs to deliver
    /// half the window at the measured total rate.
    fn pick_stream(&self, len: u64, exclude: &[StreamId]) -> Option<StreamId> {
        let usable = || {
            self.streams
                .iter()
                .filter(|(id, s)| s.opened && !s.closing && !exclude.contains(id))
        };
        let best = usable()
            .filter_map(|(_, s)| Self::eta(s, len))
            .min_by(f64::total_cmp);
        let total_rate: f64 = usable().filter_map(|(_, s)| s.rate).sum();
        let slack = if total_rate > 0.0 {
            (self.cfg.window_bytes as f64 / 2.0 / total_rate * 1e6)
                .max(2.0 * self.min_rtt.unwrap_or(0) as f64)
        } else {
            f64::INFINITY
        };
        usable()
            .filter_map(|(id, s)| {
                let cap = self.cap(s);
                if s.inflight > 0 && s.inflight + len > cap {
                    return None;
                }
                match (Self::eta(s, len), best) {
                    (Some(e), Some(b)) if e > b + slack => None,
                    (Some(e), _) => Some((e, *id)),
                    // Not measured yet: as good as the best, so it gets chunks (up to its
                    // small initial cap) and a measurement.
                    (None, b) => Some((b.unwrap_or(0.0), *id)),
                }
            })
            .min_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, id)| id)
    }

    fn next_chunk(&self) -> Option<u64> {
        if let Some(&seq) = self.resend.first() {
            return Some(seq);
        }
        let c = self.chunks.get(&self.next_unsent)?;
        let end = c.offset + c.data.len() as u64;
        (end <= self.window_end || c.offset == self.cumulative).then_some(self.next_unsent)
    }

    fn pump(&mut self, now: Micros) {
        self.last_now = self.last_now.max(now);
        if self.state != State::Running {
            return;
        }
        while let Some(seq) = self.next_chunk() {
            let len = self.chunks.get(&seq).map_or(0, |c| c.data.len() as u64);
            let Some(sid) = self.pick_stream(len, &[]) else {
                break;
            };
            self.send_on(now, seq, sid);
        }
        self.hedge(now);
        // Bookkeeping for the controller: was the window or the source the limit?
        // Data waiting while a stream has room under its cap means the receiver window or
        // the reorder slack held it back: more streams would not help.
        let chunk = self.cfg.chunk_size as u64;
        let cap_room = self.streams.values().any(|s| {
            s.opened && !s.closing && (s.inflight == 0 || s.inflight + chunk <= self.cap(s))
        });
        let pending = self.chunks.contains_key(&self.next_unsent) || !self.resend.is_empty();
        let window_blocked = cap_room && pending;
        let app_idle = cap_room && !pending && !self.fin_cut;
        track(
            &mut self.window_blocked_since,
            &mut self.window_blocked_total,
            window_blocked,
            now,
        );
        track(
            &mut self.app_idle_since,
            &mut self.app_idle_total,
            app_idle,
            now,
        );
    }

    fn send_on(&mut self, now: Micros, seq: u64, sid: StreamId) {
        let Some(cap) = self.streams.get(&sid).map(|s| self.cap(s)) else {
            return;
        };
        let Some(c) = self.chunks.get_mut(&seq) else {
            return;
        };
        let Some(s) = self.streams.get_mut(&sid) else {
            return;
        };
        let len = c.data.len() as u64;
        if c.sends > 0 {
            self.resent_chunks += 1;
            self.epoch_resent += 1;
        }
        self.epoch_sent += 1;
        c.sends += 1;
        c.sent_at = now;
        c.delivered_at_send = s.delivered;
        c.on.push(sid);
        if s.inflight == 0 {
            s.last_progress = now;
        }
        s.inflight += len;
        c.busy_at_send = 2 * s.inflight >= cap;
        s.chunks.insert(seq);
        self.resend.remove(&seq);
        if seq == self.next_unsent {
            self.next_unsent += 1;
        }
        self.commands.push_back(Command::Send(
            sid,
            Chunk {
                seq,
                offset: c.offset,
                fin: c.fin,
                data: c.data.clone(),
            },
        ));
    }

    /// The oldest unacknowledged chunk, if sending it on a second stream could help: nothing
    /// else can be sent, it is on exactly one stream, and another stream has room. Returns
    /// its sequence number, the stream to use and when it counts as late.
    fn hedge_candidate(&self) -> Option<(u64, StreamId, Micros)> {
        let (&seq, c) = self.chunks.iter().find(|(_, c)| !c.sacked)?;
        if c.on.len() != 1 || self.next_chunk().is_some() {
            return None;
        }
        let s = self.streams.get(&c.on[0])?;
        let usual = s.min_latency.or(self.min_rtt).unwrap_or(self.cfg.min_epoch);
        let other = self.pick_stream(c.data.len() as u64, &c.on)?;
        Some((seq, other, c.sent_at + 4 * usual + 50_000))
    }

    fn hedge_deadline(&self) -> Option<Micros> {
        self.hedge_candidate().map(|(_, _, at)| at)
    }

    /// Sends the chunk holding back the window on a second stream when it is late.
    fn hedge(&mut self, now: Micros) {
        if let Some((seq, other, late_at)) = self.hedge_candidate()
            && now >= late_at
        {
            self.send_on(now, seq, other);
        }
    }

    /// Runs timers: epoch end (stream count), stall detection, reconnection and the resume
    /// deadline.
    pub fn handle_timeout(&mut self, now: Micros) {
        self.last_now = self.last_now.max(now);
        if self.state != State::Running {
            return;
        }
        if let Some(since) = self.disconnected_since
            && now.saturating_sub(since) >= self.cfg.resume_timeout
        {
            self.fail(TransferError::ResumeTimeout {
                waited_ms: now.saturating_sub(since) / 1000,
                acked_offset: self.cumulative,
            });
            return;
        }
        let stall = self.stall_timeout();
        let stalled: Vec<StreamId> = self
            .streams
            .iter()
            .filter(|(_, s)| s.opened && s.inflight > 0)
            .filter(|(_, s)| now.saturating_sub(s.last_progress) >= stall)
            .map(|(id, _)| *id)
            .collect();
        for id in stalled {
            self.commands.push_back(Command::CloseStream(id));
            self.drop_stream(now, id);
        }
        let min_rtt_ms = self.min_rtt.map(|r| r as f64 / 1000.0);
        let epoch_len = Controller::epoch_len(&self.cfg, min_rtt_ms);
        let start = self.controller.epoch_start();
        if now >= start + epoch_len {
            track(
                &mut self.window_blocked_since,
                &mut self.window_blocked_total,
                false,
                now,
            );
            track(
                &mut self.app_idle_since,
                &mut self.app_idle_total,
                false,
                now,
            );
            let elapsed = now.saturating_sub(start).max(1);
            let goodput = self.epoch_sacked as f64 / (elapsed as f64 / 1e6);
            let opened: Vec<&StreamState> = self.streams.values().filter(|s| s.opened).collect();
            let path_loss = if opened.is_empty() {
                0.0
            } else {
                opened.iter().map(|s| s.path_loss).sum::<f64>() / opened.len() as f64
            };
            let resend_loss = self.epoch_lost as f64 / self.epoch_sent.max(1) as f64;
            let sample = EpochSample {
                goodput,
                min_rtt_ms: opened
                    .iter()
                    .filter_map(|s| s.path_rtt_us)
                    .min()
                    .map(|r| r as f64 / 1000.0)
                    .or(min_rtt_ms),
                loss: path_loss.max(resend_loss),
                window_limited: self.window_blocked_total * 2 > elapsed,
                app_limited: self.app_idle_total * 5 > elapsed || self.fin_cut,
            };
            if self.cfg.adaptive && self.disconnected_since.is_none() {
                self.controller.on_epoch(now, sample);
            } else {
                self.controller.set_epoch_start(now);
            }
            self.last_rate = goodput;
            self.epoch_sacked = 0;
            self.epoch_sent = 0;
            self.epoch_resent = 0;
            self.epoch_lost = 0;
            self.window_blocked_total = 0;
            self.app_idle_total = 0;
            if self.window_blocked_since.is_some() {
                self.window_blocked_since = Some(now);
            }
            if self.app_idle_since.is_some() {
                self.app_idle_since = Some(now);
            }
        }
        self.ensure_streams(now);
        self.pump(now);
    }

    fn stall_timeout(&self) -> Micros {
        self.cfg.stall_timeout.max(8 * self.min_rtt.unwrap_or(0))
    }

    /// When [`Sender::handle_timeout`] should run next.
    pub fn poll_timeout(&self) -> Option<Micros> {
        if self.state != State::Running {
            return None;
        }
        let min_rtt_ms = self.min_rtt.map(|r| r as f64 / 1000.0);
        let mut t = self.controller.epoch_start() + Controller::epoch_len(&self.cfg, min_rtt_ms);
        if let Some(since) = self.disconnected_since {
            t = t.min(since + self.cfg.resume_timeout);
            let live = self.streams.values().filter(|s| !s.closing).count();
            let pending_opens = self.streams.values().any(|s| !s.opened);
            if !pending_opens && live < self.controller.target() {
                t = t.min(self.next_open_at);
            }
        }
        let stall = self.stall_timeout();
        for s in self.streams.values().filter(|s| s.opened && s.inflight > 0) {
            t = t.min(s.last_progress + stall);
        }
        if let Some(h) = self.hedge_deadline() {
            t = t.min(h);
        }
        // Never a deadline in the past: a caller would spin.
        Some(t.max(self.last_now + 1_000))
    }

    /// The next command for the driver.
    pub fn poll_command(&mut self) -> Option<Command> {
        self.commands.pop_front()
    }

    /// Progress figures.
    pub fn progress(&self) -> Progress {
        Progress {
            acked: self.cumulative,
            received: self.sacked_bytes,
            taken: self.next_offset + self.pending.len() as u64,
            total: self.fin_cut.then_some(self.next_offset),
            rate: self.last_rate,
            streams_active: self.opened(),
            streams_target: self.controller.target(),
            streams: self
                .streams
                .iter()
                .filter(|(_, s)| s.opened)
                .map(|(id, s)| StreamProgress {
                    id: *id,
                    rate: s.rate.unwrap_or(0.0),
                    inflight: s.inflight,
                    path_rtt_us: s.path_rtt_us,
                    path_loss: s.path_rtt_us.map(|_| s.path_loss),
                })
                .collect(),
            resent_chunks: self.resent_chunks,
        }
    }

    /// Finished or failed: the driver can stop.
    pub fn is_done(&self) -> bool {
        self.state != State::Running
    }
}

fn track(since: &mut Option<Micros>, total: &mut Micros, active: bool, now: Micros) {
    match (active, *since) {
        (true, None) => *since = Some(now),
        (false, Some(s)) => {
            *total += now.saturating_sub(s);
            *since = None;
        }
        _ => {}
    }
}
