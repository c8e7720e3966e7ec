//! The pure link model: given `(now, packet length)` it decides whether a packet is dropped
//! (partition, drop-tail queue overflow, random or bursty loss) and, if not, the instant it
//! leaves the far end of the link. No clock, no I/O, no unseeded randomness: the same seed and
//! the same arrivals give the same verdicts.
//!
//! Order of decisions for one packet, as on a real access link:
//! 1. partitioned link: dropped;
//! 2. the bottleneck queue (bytes not yet serialised) is full: drop-tail;
//! 3. the packet is serialised at the link rate (or at the next delivery opportunities of a
//!    Mahimahi trace), so it occupies capacity even if it is then lost;
//! 4. loss on the wire (Bernoulli, or Gilbert-Elliott bursts);
//! 5. propagation delay plus jitter. Jitter never reorders packets of one link: a packet is
//!    never delivered before the one ahead of it (like Mahimahi; netem's reordering jitter
//!    confuses TCP in ways real paths rarely do).

use std::collections::VecDeque;
use std::sync::Arc;

/// Nanoseconds since an arbitrary origin chosen by the shell.
pub type Nanos = u64;

/// Size of one delivery opportunity in a Mahimahi trace.
pub const TRACE_OPPORTUNITY_BYTES: u64 = 1500;

/// Random packet loss.
#[derive(Clone, Debug, PartialEq)]
pub enum Loss {
    /// No loss.
    None,
    /// Each packet is lost independently with this probability.
    Random(f64),
    /// Gilbert-Elliott two-state bursty loss.
    GilbertElliott {
        /// Probability of moving from the good to the bad state, per packet.
        p_good_to_bad: f64,
        /// Probability of moving from the bad to the good state, per packet.
        p_bad_to_good: f64,
        /// Loss probability in the good state.
        loss_good: f64,
        /// Loss probability in the bad state.
        loss_bad: f64,
    },
}

impl Loss {
    /// The long-run average loss rate.
    pub fn mean(&self) -> f64 {
        match *self {
            Loss::None => 0.0,
            Loss::Random(p) => p,
            Loss::GilbertElliott {
                p_good_to_bad,
                p_bad_to_good,
                loss_good,
                loss_bad,
            } => {
                let denom = p_good_to_bad + p_bad_to_good;
                if denom <= 0.0 {
                    return loss_good;
                }
                let pi_bad = p_good_to_bad / denom;
                pi_bad * loss_bad + (1.0 - pi_bad) * loss_good
            }
        }
    }
}

/// A Mahimahi link trace: delivery opportunities (ms offsets), each for 1500 bytes, repeated
/// with the period of the last entry.
#[derive(Clone, Debug, PartialEq)]
pub struct Trace {
    opportunities_ms: Vec<u64>,
    period_ms: u64,
}

/// Why a trace was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TraceError {
    /// A line is not a non-negative integer.
    #[error("trace line {line}: {text:?} is not a millisecond count")]
    BadLine {
        /// 1-based line number.
        line: usize,
        /// The offending text.
        text: String,
    },
    /// Timestamps go backwards.
    #[error("trace line {line}: timestamps must not decrease")]
    Decreasing {
        /// 1-based line number.
        line: usize,
    },
    /// No opportunities, or the last timestamp is 0 (no period).
    #[error("trace is empty or its last timestamp is 0")]
    Empty,
    /// More lines than the limit.
    #[error("trace has more than {0} lines")]
    TooLong(usize),
}

impl Trace {
    /// Most lines accepted from a trace file (Mahimahi's cellular traces have ~100k-1M).
    pub const MAX_LINES: usize = 10_000_000;

    /// Parses Mahimahi's format: one integer millisecond timestamp per line.
    pub fn parse(text: &str) -> Result<Self, TraceError> {
        let mut ops = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let t = raw.trim();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            if ops.len() >= Self::MAX_LINES {
                return Err(TraceError::TooLong(Self::MAX_LINES));
            }
            let v: u64 = t.parse().map_err(|_| TraceError::BadLine {
                line: i + 1,
                text: t.chars().take(40).collect(),
            })?;
            if ops.last().is_some_and(|&last| v < last) {
                return Err(TraceError::Decreasing { line: i + 1 });
            }
            ops.push(v);
        }
        Self::from_opportunities(ops)
    }

    /// Builds a trace from millisecond delivery opportunities.
    pub fn from_opportunities(opportunities_ms: Vec<u64>) -> Result<Self, TraceError> {
        let period_ms = *opportunities_ms.last().ok_or(TraceError::Empty)?;
        if period_ms == 0 {
            return Err(TraceError::Empty);
        }
        Ok(Self {
            opportunities_ms,
            period_ms,
        })
    }

    /// Mean capacity of the trace in bits per second.
    pub fn mean_rate_bps(&self) -> f64 {
        self.opportunities_ms.len() as f64 * TRACE_OPPORTUNITY_BYTES as f64 * 8.0
            / (self.period_ms as f64 / 1000.0)
    }

    /// Time of absolute opportunity `k` (the trace repeats), in ns.
    fn at(&self, k: u64) -> Nanos {
        let n = self.opportunities_ms.len() as u64;
        let idx = usize::try_from(k % n).unwrap_or(0);
        ((k / n) * self.period_ms + self.opportunities_ms[idx]) * 1_000_000
    }

    /// First absolute opportunity index at or after `t`.
    fn first_at_or_after(&self, t: Nanos) -> u64 {
        let n = self.opportunities_ms.len() as u64;
        let period_ns = self.period_ms * 1_000_000;
        let cycle = t / period_ns;
        let within = t - cycle * period_ns;
        // Opportunities are in ms; the first one whose ns time >= within.
        let idx = self
            .opportunities_ms
            .partition_point(|&ms| ms * 1_000_000 < within) as u64;
        cycle * n + idx
    }
}

/// How fast the link drains its queue.
#[derive(Clone, Debug, PartialEq)]
pub enum Rate {
    /// No rate limit: no queueing.
    Unlimited,
    /// A constant rate in bits per second.
    BitsPerSec(u64),
    /// Mahimahi trace replay.
    Trace(Arc<Trace>),
}

/// One direction of a link.
#[derive(Clone, Debug, PartialEq)]
pub struct LinkConfig {
    /// One-way propagation delay.
    pub delay_ns: Nanos,
    /// Extra delay drawn uniformly from `[0, jitter_ns]` per packet (no reordering).
    pub jitter_ns: Nanos,
    /// Loss on the wire.
    pub loss: Loss,
    /// Bottleneck rate.
    pub rate: Rate,
    /// Drop-tail limit of the bottleneck queue in bytes (packets waiting to be serialised).
    pub queue_bytes: u64,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            delay_ns: 0,
            jitter_ns: 0,
            loss: Loss::None,
            rate: Rate::Unlimited,
            queue_bytes: 1 << 20,
        }
    }
}

/// What happens to a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Deliver at the far end at this instant.
    Deliver(Nanos),
    /// Dropped.
    Drop(DropReason),
}

/// Why a packet was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The link is partitioned.
    Partition,
    /// The bottleneck queue was full.
    QueueFull,
    /// Lost on the wire (random or burst loss).
    Loss,
}

/// Counters of one link direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct LinkStats {
    /// Packets offered to the link.
    pub offered: u64,
    /// Packets delivered.
    pub delivered: u64,
    /// Bytes delivered.
    pub delivered_bytes: u64,
    /// Dropped while partitioned.
    pub dropped_partition: u64,
    /// Dropped by the full queue.
    pub dropped_queue: u64,
    /// Lost on the wire.
    pub dropped_loss: u64,
}

/// SplitMix64: a tiny, seeded, good-enough generator for loss and jitter draws.
#[derive(Clone, Debug)]
pub struct SeededRng(u64);

impl SeededRng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One direction of an emulated link: the pure decision engine.
#[derive(Debug)]
pub struct Link {
    cfg: LinkConfig,
    rng: SeededRng,
    partitioned: bool,
    ge_bad: bool,
    /// Packets serialised or waiting, as (departure time, bytes); only those not yet departed
    /// count against the queue limit.
    backlog: VecDeque<(Nanos, u64)>,
    backlog_bytes: u64,
    /// When the serialiser is next free (constant rate).
    next_free: Nanos,
    /// Trace cursor: absolute opportunity index and bytes left in it.
    trace_k: u64,
    trace_left: u64,
    last_delivery: Nanos,
    stats: LinkStats,
}

impl Link {
    /// A link with its own seeded generator.
    pub fn new(cfg: LinkConfig, seed: u64) -> Self {
        Self {
            cfg,
            rng: SeededRng::new(seed),
            partitioned: false,
            ge_bad: false,
            backlog: VecDeque::new(),
            backlog_bytes: 0,
            next_free: 0,
            trace_k: 0,
            trace_left: TRACE_OPPORTUNITY_BYTES,
            last_delivery: 0,
            stats: LinkStats::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &LinkConfig {
        &self.cfg
    }

    /// Replaces the configuration (the queue and cursor state are kept).
    pub fn set_config(&mut self, cfg: LinkConfig) {
        self.cfg = cfg;
    }

    /// Cuts or restores the link.
    pub fn set_partitioned(&mut self, partitioned: bool) {
        self.partitioned = partitioned;
    }

    /// Whether the link is cut.
    pub fn is_partitioned(&self) -> bool {
        self.partitioned
    }

    /// Counters so far.
    pub fn stats(&self) -> LinkStats {
        self.stats
    }

    /// Bytes queued at `now` (accepted, not yet serialised).
    pub fn queued_bytes(&mut self, now: Nanos) -> u64 {
        self.expire(now);
        self.backlog_bytes
    }

    fn expire(&mut self, now: Nanos) {
        while let Some(&(dep, len)) = self.backlog.front() {
            if dep > now {
                break;
            }
            self.backlog.pop_front();
            self.backlog_bytes -= len;
        }
    }

    /// Decides the fate of a packet of `len` bytes arriving at `now`. `now` must not go
    /// backwards between calls (the shell uses a monotonic clock).
    pub fn on_packet(&mut self, now: Nanos, len: usize) -> Verdict {
        let len = len as u64;
        self.stats.offered += 1;
        if self.partitioned {
            self.stats.dropped_partition += 1;
            return Verdict::Drop(DropReason::Partition);
        }
        self.expire(now);
        let departure = match &self.cfg.rate {
            Rate::Unlimited => now,
            Rate::BitsPerSec(bps) => {
                if self.backlog_bytes + len > self.cfg.queue_bytes {
                    self.stats.dropped_queue += 1;
                    return Verdict::Drop(DropReason::QueueFull);
                }
                let start = self.next_free.max(now);
                let tx = (len * 8 * 1_000_000_000).div_ceil((*bps).max(1));
                self.next_free = start + tx;
                self.next_free
            }
            Rate::Trace(trace) => {
                if self.backlog_bytes + len > self.cfg.queue_bytes {
                    self.stats.dropped_queue += 1;
                    return Verdict::Drop(DropReason::QueueFull);
                }
                let trace = Arc::clone(trace);
                if self.trace_left == 0 {
                    self.trace_k += 1;
                    self.trace_left = TRACE_OPPORTUNITY_BYTES;
                }
                // Opportunities that passed while the queue was empty are wasted.
                if trace.at(self.trace_k) < now {
                    self.trace_k = trace.first_at_or_after(now);
                    self.trace_left = TRACE_OPPORTUNITY_BYTES;
                }
                let mut need = len;
                loop {
                    let take = need.min(self.trace_left);
                    need -= take;
                    self.trace_left -= take;
                    if need == 0 {
                        break;
                    }
                    self.trace_k += 1;
                    self.trace_left = TRACE_OPPORTUNITY_BYTES;
                }
                trace.at(self.trace_k)
            }
        };
        if departure > now {
            self.backlog.push_back((departure, len));
            self.backlog_bytes += len;
        }
        if self.lost() {
            self.stats.dropped_loss += 1;
            return Verdict::Drop(DropReason::Loss);
        }
        let jitter = if self.cfg.jitter_ns > 0 {
            self.rng.next_u64() % (self.cfg.jitter_ns + 1)
        } else {
            0
        };
        let at = (departure + self.cfg.delay_ns + jitter).max(self.last_delivery);
        self.last_delivery = at;
        self.stats.delivered += 1;
        self.stats.delivered_bytes += len;
        Verdict::Deliver(at)
    }

    fn lost(&mut self) -> bool {
        match self.cfg.loss {
            Loss::None => false,
            Loss::Random(p) => p > 0.0 && self.rng.next_f64() < p,
            Loss::GilbertElliott {
                p_good_to_bad,
                p_bad_to_good,
                loss_good,
                loss_bad,
            } => {
                let flip = self.rng.next_f64();
                if self.ge_bad {
                    if flip < p_bad_to_good {
                        self.ge_bad = false;
                    }
                } else if flip < p_good_to_bad {
                    self.ge_bad = true;
                }
                let p = if self.ge_bad { loss_bad } else { loss_good };
                p > 0.0 && self.rng.next_f64() < p
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Nanos = 1_000_000;

    fn rate_link(bps: u64, queue: u64) -> Link {
        Link::new(
            LinkConfig {
                delay_ns: 10 * MS,
                rate: Rate::BitsPerSec(bps),
                queue_bytes: queue,
                ..LinkConfig::default()
            },
            1,
        )
    }

    #[test]
    fn delay_only_adds_the_one_way_delay() {
        let mut l = Link::new(
            LinkConfig {
                delay_ns: 50 * MS,
                ..LinkConfig::default()
            },
            7,
        );
        assert_eq!(l.on_packet(0, 1500), Verdict::Deliver(50 * MS));
        assert_eq!(l.on_packet(3 * MS, 100), Verdict::Deliver(53 * MS));
    }

    #[test]
    fn rate_serialises_back_to_back_packets() {
        // 12 Mbit/s: a 1500-byte packet takes exactly 1 ms.
        let mut l = rate_link(12_000_000, 1 << 20);
        assert_eq!(l.on_packet(0, 1500), Verdict::Deliver(11 * MS));
        assert_eq!(l.on_packet(0, 1500), Verdict::Deliver(12 * MS));
        assert_eq!(l.on_packet(0, 1500), Verdict::Deliver(13 * MS));
        // After the queue drained, a new packet waits only its own serialisation.
        assert_eq!(l.on_packet(100 * MS, 1500), Verdict::Deliver(111 * MS));
    }

    #[test]
    fn drop_tail_when_queue_is_full() {
        let mut l = rate_link(12_000_000, 3000);
        assert!(matches!(l.on_packet(0, 1500), Verdict::Deliver(_)));
        assert!(matches!(l.on_packet(0, 1500), Verdict::Deliver(_)));
        assert_eq!(l.on_packet(0, 1500), Verdict::Drop(DropReason::QueueFull));
        // One packet has left after 1 ms: room for one more.
        assert!(matches!(l.on_packet(MS, 1500), Verdict::Deliver(_)));
        assert_eq!(l.stats().dropped_queue, 1);
        assert_eq!(l.stats().delivered, 3);
    }

    #[test]
    fn long_run_rate_matches_configuration() {
        // Offer 2x the link rate for 1 s; delivered bytes over the delivery span ~ rate.
        let bps = 100_000_000;
        let mut l = rate_link(bps, 200_000);
        let mut last = 0;
        let mut bytes = 0u64;
        let gap = 1500 * 8 * 1_000_000_000 / (2 * bps);
        for i in 0..20_000u64 {
            if let Verdict::Deliver(at) = l.on_packet(i * gap, 1500) {
                last = at;
                bytes += 1500;
            }
        }
        let rate = bytes as f64 * 8.0 / ((last - 10 * MS) as f64 / 1e9);
        assert!((rate / bps as f64 - 1.0).abs() < 0.01, "rate {rate}");
        assert!(l.stats().dropped_queue > 9000);
    }

    #[test]
    fn random_loss_rate_and_seed_determinism() {
        let cfg = LinkConfig {
            loss: Loss::Random(0.01),
            ..LinkConfig::default()
        };
        let run = |seed| {
            let mut l = Link::new(cfg.clone(), seed);
            (0..200_000u64)
                .map(|i| l.on_packet(i, 1000))
                .collect::<Vec<_>>()
        };
        let a = run(3);
        assert_eq!(a, run(3));
        assert_ne!(a, run(4));
        let lost = a
            .iter()
            .filter(|v| **v == Verdict::Drop(DropReason::Loss))
            .count();
        // 2000 expected, sd ~ 44.
        assert!((1850..2150).contains(&lost), "lost {lost}");
    }

    #[test]
    fn gilbert_elliott_is_bursty_with_the_right_mean() {
        let loss = Loss::GilbertElliott {
            p_good_to_bad: 0.001,
            p_bad_to_good: 0.1,
            loss_good: 0.0,
            loss_bad: 0.5,
        };
        let mean = loss.mean();
        let mut l = Link::new(
            LinkConfig {
                loss,
                ..LinkConfig::default()
            },
            11,
        );
        let n = 400_000u64;
        let mut lost = 0u64;
        let mut consecutive_pairs = 0u64;
        let mut prev = false;
        for i in 0..n {
            let d = l.on_packet(i, 100) == Verdict::Drop(DropReason::Loss);
            lost += u64::from(d);
            consecutive_pairs += u64::from(d && prev);
            prev = d;
        }
        let rate = lost as f64 / n as f64;
        assert!((rate / mean - 1.0).abs() < 0.15, "rate {rate} mean {mean}");
        // Independent losses at this rate would give ~rate^2 * n pairs; bursts give far more.
        let independent_pairs = rate * rate * n as f64;
        assert!(consecutive_pairs as f64 > 10.0 * independent_pairs);
    }

    #[test]
    fn partition_drops_everything_until_restored() {
        let mut l = Link::new(LinkConfig::default(), 1);
        l.set_partitioned(true);
        assert_eq!(l.on_packet(0, 10), Verdict::Drop(DropReason::Partition));
        l.set_partitioned(false);
        assert_eq!(l.on_packet(1, 10), Verdict::Deliver(1));
    }

    #[test]
    fn jitter_is_bounded_and_never_reorders() {
        let mut l = Link::new(
            LinkConfig {
                delay_ns: 20 * MS,
                jitter_ns: 5 * MS,
                ..LinkConfig::default()
            },
            5,
        );
        let mut prev = 0;
        let mut spread = (u64::MAX, 0);
        for i in 0..10_000u64 {
            let now = i * 10 * MS;
            let Verdict::Deliver(at) = l.on_packet(now, 100) else {
                panic!("no loss configured");
            };
            assert!(at >= prev);
            assert!(at >= now + 20 * MS && at <= now + 25 * MS);
            spread = (spread.0.min(at - now), spread.1.max(at - now));
            prev = at;
        }
        assert!(spread.1 - spread.0 > 3 * MS);
    }

    #[test]
    fn trace_parse_errors_are_clear() {
        assert_eq!(Trace::parse(""), Err(TraceError::Empty));
        assert_eq!(
            Trace::parse("1\nx\n"),
            Err(TraceError::BadLine {
                line: 2,
                text: "x".into()
            })
        );
        assert_eq!(
            Trace::parse("5\n3\n"),
            Err(TraceError::Decreasing { line: 2 })
        );
    }

    #[test]
    fn trace_replay_delivers_at_opportunities_and_repeats() {
        // Opportunities at 1, 1, 4 ms, period 4 ms: 3 x 1500 bytes per 4 ms = 9 Mbit/s.
        let trace = Arc::new(Trace::parse("1\n1\n4\n").unwrap());
        assert!((trace.mean_rate_bps() - 9e6).abs() < 1.0);
        let mut l = Link::new(
            LinkConfig {
                rate: Rate::Trace(trace),
                ..LinkConfig::default()
            },
            1,
        );
        let at: Vec<_> = (0..6)
            .map(|_| match l.on_packet(0, 1500) {
                Verdict::Deliver(t) => t / MS,
                Verdict::Drop(r) => panic!("dropped {r:?}"),
            })
            .collect();
        assert_eq!(at, vec![1, 1, 4, 5, 5, 8]);
        // Two 750-byte packets share one opportunity.
        let mut l2 = Link::new(
            LinkConfig {
                rate: Rate::Trace(Arc::new(Trace::parse("2\n4\n").unwrap())),
                ..LinkConfig::default()
            },
            1,
        );
        assert_eq!(l2.on_packet(0, 750), Verdict::Deliver(2 * MS));
        assert_eq!(l2.on_packet(0, 750), Verdict::Deliver(2 * MS));
        assert_eq!(l2.on_packet(0, 750), Verdict::Deliver(4 * MS));
        // Idle time wastes opportunities: arriving at 9 ms waits for 10 ms.
        assert_eq!(l2.on_packet(9 * MS, 1500), Verdict::Deliver(10 * MS));
    }
}
