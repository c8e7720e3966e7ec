//! Drives the sans-IO sender and receiver over simulated streams on a virtual clock: per-stream
//! rates (a loss-limited TCP connection), a shared bottleneck, one-way delay, streams that die
//! or stall, the whole link going down, and a slow sink.

use std::collections::BTreeMap;

use bytes::Bytes;
use dwcp_transport::{
    Ack, Chunk, Command, Config, Input, Micros, Receiver, Sender, StreamId, TransferError,
};

const MS: Micros = 1_000;
const SEC: Micros = 1_000_000;

#[derive(Clone, Debug)]
struct FakeStreamProfile {
    /// Bytes per second this connection alone can carry.
    rate: f64,
    /// Dies at this time (relative to its opening).
    dies_after: Option<Micros>,
    /// Never delivers anything (a black-holed connection that does not error).
    stalls: bool,
}

#[derive(Debug)]
struct FakeStream {
    profile: FakeStreamProfile,
    alive: bool,
    free_at: Micros,
    carried: u64,
}

enum Ev {
    OpenDone(StreamId, bool),
    ChunkArrives(StreamId, Chunk),
    AckArrives(StreamId, Ack),
    Dies(StreamId),
}

/// The fake network between one sender and one receiver.
struct FakeNet {
    one_way: Micros,
    shared_rate: f64,
    shared_free: Micros,
    profiles: Vec<FakeStreamProfile>,
    down: Option<(Micros, Micros)>,
    sink_rate: Option<f64>,
    streams: BTreeMap<StreamId, FakeStream>,
    events: BTreeMap<(Micros, u64), Ev>,
    counter: u64,
}

struct Outcome {
    result: Result<Vec<u8>, TransferError>,
    end: Micros,
    peak_buffered: u64,
    carried: BTreeMap<StreamId, u64>,
    max_streams_seen: usize,
    final_target: usize,
    resent: u64,
}

impl FakeNet {
    fn new(one_way: Micros, shared_rate: f64, profiles: Vec<FakeStreamProfile>) -> Self {
        Self {
            one_way,
            shared_rate,
            shared_free: 0,
            profiles,
            down: None,
            sink_rate: None,
            streams: BTreeMap::new(),
            events: BTreeMap::new(),
            counter: 0,
        }
    }

    fn at(&mut self, t: Micros, ev: Ev) {
        self.counter += 1;
        self.events.insert((t, self.counter), ev);
    }

    fn is_down(&self, now: Micros) -> bool {
        self.down.is_some_and(|(a, b)| now >= a && now < b)
    }

    fn run(mut self, cfg: Config, data: &[u8], limit: Micros) -> Outcome {
        let mut now: Micros = 0;
        let mut tx = Sender::new(cfg.clone(), now).expect("valid test config");
        let mut rx = Receiver::new(&cfg, now);
        let mut fed = 0usize;
        let mut out = Vec::with_capacity(data.len());
        let mut sink_budget = 0.0f64;
        let mut last_sink = 0;
        let mut result = None;
        let mut max_streams_seen = 0;
        let mut link_cut_done = false;
        let mut last_dbg = u64::MAX;
        while result.is_none() && now < limit {
            // Feed the source.
            while fed < data.len() && tx.wants() > 0 {
                let n = tx.wants().min(data.len() - fed).min(1 << 20);
                let rest = tx.push(now, Bytes::copy_from_slice(&data[fed..fed + n]));
                fed += n - rest.len();
            }
            if fed == data.len() {
                tx.finish(now);
            }
            // Sender commands.
            while let Some(c) = tx.poll_command() {
                match c {
                    Command::OpenStream(id) => {
                        let ok = !self.is_down(now);
                        self.at(now + 2 * self.one_way, Ev::OpenDone(id, ok));
                    }
                    Command::Send(id, chunk) => self.send(now, id, chunk),
                    Command::CloseStream(id) => {
                        if let Some(s) = self.streams.get_mut(&id) {
                            s.alive = false;
                        }
                        rx.on_stream_closed(now, id);
                    }
                    Command::Finished => result = Some(Ok(())),
                    Command::Failed(e) => result = Some(Err(e)),
                }
            }
            // Sink.
            let dt = now.saturating_sub(last_sink);
            last_sink = now;
            match self.sink_rate {
                None => {
                    while let Some(b) = rx.read() {
                        out.extend_from_slice(&b);
                    }
                }
                Some(r) => {
                    sink_budget = (sink_budget + r * dt as f64 / 1e6).min(r);
                    while sink_budget > 0.0 {
                        let Some(b) = rx.read() else { break };
                        sink_budget -= b.len() as f64;
                        out.extend_from_slice(&b);
                    }
                }
            }
            // Receiver acks.
            while let Some((sid, ack)) = rx.poll_ack() {
                let sid = sid.or_else(|| {
                    self.streams
                        .iter()
                        .find(|(_, s)| s.alive)
                        .map(|(id, _)| *id)
                });
                if let Some(sid) = sid
                    && self.streams.get(&sid).is_some_and(|s| s.alive)
                {
                    self.at(now + self.one_way, Ev::AckArrives(sid, ack));
                }
            }
            if let Err(e) = rx.handle_timeout(now) {
                result = Some(Err(e));
            }
            max_streams_seen = max_streams_seen.max(tx.progress().streams_active);
            if std::env::var("SIM_DEBUG").is_ok() && now / (200 * MS) != last_dbg {
                last_dbg = now / (200 * MS);
                eprintln!("{now} {:?}", tx.progress());
            }
            if result.is_some() {
                break;
            }
            // The whole link goes down: every stream dies.
            if let Some((from, _)) = self.down
                && now >= from
                && !link_cut_done
            {
                link_cut_done = true;
                let ids: Vec<StreamId> = self.streams.keys().copied().collect();
                for id in ids {
                    self.at(now, Ev::Dies(id));
                }
            }
            // Advance the clock.
            let mut next = self.events.keys().next().map(|k| k.0);
            for t in [tx.poll_timeout(), rx.poll_timeout()].into_iter().flatten() {
                next = Some(next.map_or(t, |n: Micros| n.min(t)));
            }
            if let Some((from, _)) = self.down
                && !link_cut_done
            {
                next = Some(next.map_or(from, |n: Micros| n.min(from)));
            }
            if self.sink_rate.is_some() && rx.buffered() > 0 {
                next = Some(next.map_or(now + MS, |n: Micros| n.min(now + MS)));
            }
            let Some(next) = next else { break };
            now = next.max(now);
            tx.handle_timeout(now);
            while let Some(entry) = self.events.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                match entry.remove() {
                    Ev::OpenDone(id, ok) => {
                        if ok && !self.is_down(now) {
                            let profile =
                                self.profiles[id.0 as usize % self.profiles.len()].clone();
                            if let Some(d) = profile.dies_after {
                                self.at(now + d, Ev::Dies(id));
                            }
                            self.streams.insert(
                                id,
                                FakeStream {
                                    profile,
                                    alive: true,
                                    free_at: now,
                                    carried: 0,
                                },
                            );
                            rx.on_stream_opened(id);
                            tx.handle(now, Input::StreamOpened(id));
                            tx.handle(now, Input::Ack(id, rx.state_ack()));
                        } else {
                            tx.handle(now, Input::StreamFailed(id));
                        }
                    }
                    Ev::ChunkArrives(id, chunk) => {
                        if self.streams.get(&id).is_some_and(|s| s.alive) {
                            rx.handle_chunk(id, chunk)
                                .expect("sender respects the protocol");
                        }
                    }
                    Ev::AckArrives(id, ack) => {
                        if self.streams.get(&id).is_some_and(|s| s.alive) {
                            tx.handle(now, Input::Ack(id, ack));
                        }
                    }
                    Ev::Dies(id) => {
                        if let Some(s) = self.streams.get_mut(&id)
                            && s.alive
                        {
                            s.alive = false;
                            rx.on_stream_closed(now, id);
                            tx.handle(now, Input::StreamFailed(id));
                        }
                    }
                }
            }
        }
        let progress = tx.progress();
        Outcome {
            result: match result {
                Some(Ok(())) => Ok(out),
                Some(Err(e)) => Err(e),
                None => panic!("simulation did not end within {limit} us"),
            },
            end: now,
            peak_buffered: rx.peak_buffered(),
            carried: self.streams.iter().map(|(k, s)| (*k, s.carried)).collect(),
            max_streams_seen,
            final_target: progress.streams_target,
            resent: progress.resent_chunks,
        }
    }

    fn send(&mut self, now: Micros, id: StreamId, chunk: Chunk) {
        let one_way = self.one_way;
        let shared_rate = self.shared_rate;
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if !s.alive || s.profile.stalls {
            return;
        }
        let len = chunk.data.len() as f64;
        let start = s.free_at.max(now);
        s.free_at = start + (len / s.profile.rate * 1e6) as Micros;
        s.carried += chunk.data.len() as u64;
        // The shared bottleneck serialises bytes in the order they are sent (a fluid
        // approximation: a connection's own limit and the shared one both apply).
        self.shared_free = self.shared_free.max(now) + (len / shared_rate * 1e6) as Micros;
        let arrive = s.free_at.max(self.shared_free) + one_way;
        self.at(arrive, Ev::ChunkArrives(id, chunk));
    }
}

fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn profile(rate: f64) -> FakeStreamProfile {
    FakeStreamProfile {
        rate,
        dies_after: None,
        stalls: false,
    }
}

fn small_cfg() -> Config {
    Config {
        chunk_size: 64 * 1024,
        window_bytes: 4 << 20,
        ..Config::default()
    }
}

const MB: f64 = 1e6;

#[test]
fn clean_transfer_is_bit_exact_and_fills_the_link() {
    let src = data(16 << 20, 1);
    let net = FakeNet::new(20 * MS, 10.0 * MB, vec![profile(5.0 * MB)]);
    let o = net.run(small_cfg(), &src, 60 * SEC);
    assert_eq!(o.result.unwrap(), src);
    let goodput = src.len() as f64 / (o.end as f64 / 1e6);
    assert!(goodput > 0.8 * 10.0 * MB, "goodput {goodput}");
    assert!(o.peak_buffered <= 4 << 20);
}

#[test]
fn empty_and_exact_multiple_lengths_complete() {
    for len in [0usize, 64 * 1024, 3 * 64 * 1024, 1000] {
        let src = data(len, 2);
        let net = FakeNet::new(5 * MS, 10.0 * MB, vec![profile(5.0 * MB)]);
        let o = net.run(small_cfg(), &src, 10 * SEC);
        assert_eq!(o.result.unwrap(), src, "len {len}");
    }
}

#[test]
fn chunks_are_weighted_by_stream_goodput() {
    let src = data(24 << 20, 3);
    // Stream 0 is four times faster than the others; the bottleneck is wide.
    let profiles = vec![
        profile(4.0 * MB),
        profile(1.0 * MB),
        profile(1.0 * MB),
        profile(1.0 * MB),
    ];
    let net = FakeNet::new(20 * MS, 100.0 * MB, profiles);
    let cfg = small_cfg().with_fixed_streams(4);
    let o = net.run(cfg, &src, 120 * SEC);
    assert_eq!(o.result.unwrap(), src);
    let fast = o.carried[&StreamId(0)] as f64;
    let slow = o.carried[&StreamId(1)] as f64;
    assert!(fast > 2.5 * slow, "fast {fast} slow {slow}");
    // The total is near the sum of the streams' rates (7 MB/s).
    let goodput = src.len() as f64 / (o.end as f64 / 1e6);
    assert!(goodput > 0.8 * 7.0 * MB, "goodput {goodput}");
}

#[test]
fn a_dying_stream_is_resent_on_the_others() {
    let src = data(16 << 20, 4);
    let mut dying = profile(2.0 * MB);
    dying.dies_after = Some(500 * MS);
    let net = FakeNet::new(20 * MS, 100.0 * MB, vec![dying, profile(2.0 * MB)]);
    let o = net.run(small_cfg().with_fixed_streams(4), &src, 120 * SEC);
    assert_eq!(o.result.unwrap(), src);
    assert!(o.resent > 0);
}

#[test]
fn a_stalled_stream_is_detected_and_bypassed() {
    let src = data(8 << 20, 5);
    let mut stall = profile(2.0 * MB);
    stall.stalls = true;
    let net = FakeNet::new(20 * MS, 100.0 * MB, vec![stall, profile(2.0 * MB)]);
    let o = net.run(small_cfg().with_fixed_streams(4), &src, 120 * SEC);
    assert_eq!(o.result.unwrap(), src);
    assert!(o.resent > 0);
}

#[test]
fn survives_the_link_dropping_for_ten_seconds() {
    let src = data(16 << 20, 6);
    let mut net = FakeNet::new(20 * MS, 10.0 * MB, vec![profile(5.0 * MB)]);
    net.down = Some((SEC, 11 * SEC));
    let o = net.run(small_cfg(), &src, 120 * SEC);
    assert_eq!(o.result.unwrap(), src);
    assert!(o.end > 11 * SEC);
}

#[test]
fn fails_clearly_when_the_link_stays_down_past_the_resume_timeout() {
    let src = data(16 << 20, 7);
    let mut net = FakeNet::new(20 * MS, 10.0 * MB, vec![profile(5.0 * MB)]);
    net.down = Some((SEC, 100 * SEC));
    let o = net.run(small_cfg(), &src, 120 * SEC);
    let e = o.result.unwrap_err();
    assert!(matches!(e, TransferError::ResumeTimeout { .. }), "{e:?}");
    assert!(e.to_string().contains("peer unreachable"), "{e}");
    // Detected at the deadline, not much later.
    assert!(o.end >= 31 * SEC && o.end < 33 * SEC, "end {}", o.end);
}

#[test]
fn slow_sink_applies_backpressure_within_the_window() {
    let src = data(12 << 20, 8);
    let mut net = FakeNet::new(10 * MS, 50.0 * MB, vec![profile(20.0 * MB)]);
    net.sink_rate = Some(2.0 * MB);
    let cfg = Config {
        window_bytes: 1 << 20,
        ..small_cfg()
    };
    let o = net.run(cfg, &src, 60 * SEC);
    assert_eq!(o.result.unwrap(), src);
    assert!(o.peak_buffered <= 1 << 20, "peak {}", o.peak_buffered);
    // The sink set the pace.
    assert!(o.end > 5 * SEC);
}

#[test]
fn adds_streams_when_each_connection_is_loss_limited() {
    // Each connection carries 0.5 MB/s (loss-limited CUBIC on a long path); the bottleneck
    // is 12 MB/s, so more streams pay off until the maximum.
    let src = data(96 << 20, 9);
    let net = FakeNet::new(50 * MS, 12.0 * MB, vec![profile(0.5 * MB)]);
    let cfg = Config {
        chunk_size: 64 * 1024,
        ..Config::default()
    };
    let o = net.run(cfg, &src, 600 * SEC);
    assert_eq!(o.result.unwrap(), src);
    assert!(
        o.max_streams_seen >= 14,
        "max streams {}",
        o.max_streams_seen
    );
}

#[test]
fn sheds_streams_that_bring_nothing() {
    // Every connection could fill the shared bottleneck alone.
    let src = data(128 << 20, 10);
    let net = FakeNet::new(5 * MS, 10.0 * MB, vec![profile(50.0 * MB)]);
    let cfg = Config {
        chunk_size: 64 * 1024,
        ..Config::default()
    };
    let o = net.run(cfg, &src, 600 * SEC);
    assert_eq!(o.result.unwrap(), src);
    assert!(o.final_target < 8, "final target {}", o.final_target);
}
