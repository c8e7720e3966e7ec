//! Scheduler hints: pure functions from a migration's size and a link forecast to a plan
//! (start now or defer, stream count, compression target, expected duration with a bound).
//!
//! Model of a pre-copy migration over a link of rate `r` (Mbit/s) when the guest dirties
//! memory at `d` (Mbit/s, after compression): each round resends what was dirtied during
//! the previous one, so the bytes sent form a geometric series and the transfer takes
//! `S / (r - d)` for `S` compressed bits, and never converges when `r <= d`. Rates come
//! from the forecast: the mean per horizon gives a piecewise rate for the expected
//! duration; the p10 of the horizon that covers the duration gives the 90 % bound.

use crate::Horizon;
use crate::engine::LinkForecast;

/// A migration to schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MigrationJob {
    /// Guest memory to copy, bytes.
    pub bytes: u64,
    /// Expected compression ratio (raw / compressed, >= 1; 2.4 for an idle guest's stream
    /// with zstd -3 on this project's test VM).
    pub compression_ratio: f64,
    /// Rate at which the guest dirties memory, Mbit/s of raw pages.
    pub dirty_mbps: f64,
    /// Latest acceptable start, seconds from now (`None`: no deadline).
    pub start_deadline_s: Option<f64>,
    /// Most parallel streams the transport may open.
    pub max_streams: u32,
    /// Compression worker threads available.
    pub compression_threads: u32,
}

/// Why a hint could not be computed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum HintError {
    /// A job field is out of range.
    #[error("invalid migration job: {0}")]
    InvalidJob(&'static str),
}

/// Start now, or wait.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StartDecision {
    /// Start immediately.
    Now,
    /// Wait, then ask again.
    Defer {
        /// Seconds from now to re-plan.
        until_s: f64,
        /// Why.
        reason: DeferReason,
    },
}

/// Why a migration is deferred.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeferReason {
    /// Even the mean forecast is below the dirty rate: pre-copy would not converge now,
    /// but the forecast says it will later.
    WouldNotConverge,
    /// The bandwidth is forecast to rise so much that a later start spends at most half
    /// the time in flight and finishes at most 10 % later.
    BandwidthRising,
    /// Nothing in the next 300 s lets the migration converge; re-plan then.
    NoWindowInHorizon,
}

/// The plan for one migration.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Start now or when.
    pub start: StartDecision,
    /// Parallel streams to open.
    pub streams: u32,
    /// Rate the compressor must consume raw memory at to keep the link full, MB/s.
    pub compress_input_mb_s: f64,
    /// Suggested zstd level for that rate.
    pub zstd_level: i32,
    /// Expected transfer time once started, seconds (`None`: does not converge).
    pub expected_duration_s: Option<f64>,
    /// 90 % upper bound on that time, from the p10 bandwidth (`None`: not bounded).
    pub duration_p90_s: Option<f64>,
}

/// Single-thread zstd throughput on raw memory, MB/s, measured on this project's VM
/// stream (`shared/machine-notes.md` section 3: 94.9 MB at -1 in 0.36 s, -3 in 0.61 s,
/// -19 in 63 s). Highest level first.
pub const ZSTD_LEVELS: [(i32, f64); 3] = [(19, 1.5), (3, 155.0), (1, 260.0)];

/// Per-stream rate limit (Mbit/s) of one TCP-like stream: the Mathis et al. bound
/// `MSS / RTT * 1.22 / sqrt(loss)` with a 1460-byte MSS, capped by a 4 MiB window per RTT.
pub fn per_stream_mbps(rtt_ms: f64, loss: f64) -> f64 {
    let rtt_s = (rtt_ms.max(0.1)) / 1000.0;
    let window_cap = 4.0 * 1024.0 * 1024.0 * 8.0 / rtt_s / 1e6;
    if loss > 0.0 {
        let mathis = 1460.0 * 8.0 / rtt_s * 1.22 / loss.sqrt() / 1e6;
        mathis.min(window_cap)
    } else {
        window_cap
    }
}

/// Streams needed to fill `link_mbps` given per-stream limits, within `[1, max_streams]`.
pub fn stream_count(
    link_mbps: f64,
    rtt_ms: Option<f64>,
    loss: Option<f64>,
    max_streams: u32,
) -> u32 {
    let max = max_streams.max(1);
    let Some(rtt) = rtt_ms else {
        // No RTT measured: assume a 50 ms WAN path.
        return stream_count(link_mbps, Some(50.0), loss, max);
    };
    let per = per_stream_mbps(rtt, loss.unwrap_or(0.0));
    let need = (link_mbps / per).ceil();
    if need.is_finite() && need >= 1.0 {
        (need.min(f64::from(max))) as u32
    } else {
        1
    }
}

/// The highest zstd level whose throughput with `threads` keeps up with `input_mb_s`
/// (level 1 when even that is too slow).
pub fn zstd_level_for(input_mb_s: f64, threads: u32) -> i32 {
    let t = f64::from(threads.max(1));
    ZSTD_LEVELS
        .iter()
        .find(|(_, mb_s)| mb_s * t >= input_mb_s)
        .map_or(1, |(l, _)| *l)
}

/// Piecewise mean rate: `(start_s, end_s, mbps)` segments from the cumulative horizon means.
fn segments(f: &LinkForecast) -> [(f64, f64, f64); 4] {
    let mut out = [(0.0, 0.0, 0.0); 4];
    let mut prev_t = 0.0;
    let mut prev_bits = 0.0;
    for h in Horizon::ALL {
        let t = h.seconds() as f64;
        let bits = f.get(h).mean_mbps * t;
        // negative increments can happen between horizons; floor at zero rate
        let r = ((bits - prev_bits) / (t - prev_t)).max(0.0);
        out[h.index()] = (prev_t, t, r);
        prev_t = t;
        prev_bits = bits;
    }
    out
}

fn rate_at(segs: &[(f64, f64, f64); 4], t: f64) -> f64 {
    segs.iter()
        .find(|(a, b, _)| t >= *a && t < *b)
        .map_or(segs[3].2, |s| s.2)
}

/// Expected pre-copy duration when starting at `start_s`, integrating the piecewise rate
/// (the last segment's rate holds after 300 s). `None` when the net rate never turns
/// positive within 24 h.
fn duration_from(segs: &[(f64, f64, f64); 4], start_s: f64, bits: f64, dirty: f64) -> Option<f64> {
    let mut left = bits;
    let mut t = start_s;
    let step = 1.0;
    while t - start_s < 86_400.0 {
        let net = rate_at(segs, t) - dirty;
        if net > 0.0 {
            let sent = net * 1e6 * step;
            if sent >= left {
                return Some(t - start_s + left / (net * 1e6));
            }
            left -= sent;
        }
        t += step;
        if t > 300.0 && rate_at(segs, t) - dirty <= 0.0 {
            return None;
        }
    }
    None
}

/// Plans one migration against a link forecast.
pub fn plan(job: &MigrationJob, f: &LinkForecast) -> Result<Plan, HintError> {
    if job.bytes == 0 {
        return Err(HintError::InvalidJob("bytes must be positive"));
    }
    if !(job.compression_ratio.is_finite() && job.compression_ratio >= 1.0) {
        return Err(HintError::InvalidJob("compression_ratio must be >= 1"));
    }
    if !(job.dirty_mbps.is_finite() && job.dirty_mbps >= 0.0) {
        return Err(HintError::InvalidJob("dirty_mbps must be >= 0"));
    }
    if job
        .start_deadline_s
        .is_some_and(|d| !(d.is_finite() && d >= 0.0))
    {
        return Err(HintError::InvalidJob("start_deadline_s must be >= 0"));
    }
    let bits = job.bytes as f64 * 8.0 / job.compression_ratio;
    let dirty = job.dirty_mbps / job.compression_ratio;
    let segs = segments(f);

    let allowed = |s: f64| job.start_deadline_s.is_none_or(|d| s <= d);
    let start = if rate_at(&segs, 0.0) <= dirty {
        // Pre-copy cannot converge at the current rate: wait for the first segment where
        // it can, unless the deadline says start anyway.
        match segs.iter().find(|(a, _, r)| *r > dirty && allowed(*a)) {
            Some((a, _, _)) => StartDecision::Defer {
                until_s: *a,
                reason: DeferReason::WouldNotConverge,
            },
            None if job.start_deadline_s.is_some_and(|d| d < 300.0) => StartDecision::Now,
            None => StartDecision::Defer {
                until_s: 300.0,
                reason: DeferReason::NoWindowInHorizon,
            },
        }
    } else {
        // Converges now. Progress never goes backwards, so starting now never finishes
        // later; but a migration in flight slows the guest (dirty tracking) and loads the
        // link. Wait when a later start spends at most half the time in flight and
        // finishes at most 10 % later.
        let now = duration_from(&segs, 0.0, bits, dirty);
        let mut best_later: Option<(f64, f64)> = None; // (start, duration)
        for s in [30.0, 60.0, 120.0] {
            if !allowed(s) {
                continue;
            }
            if let (Some(d), Some(d_now)) = (duration_from(&segs, s, bits, dirty), now)
                && d <= 0.5 * d_now
                && s + d <= 1.1 * d_now
                && best_later.is_none_or(|(_, bd)| d < bd)
            {
                best_later = Some((s, d));
            }
        }
        match best_later {
            Some((s, _)) => StartDecision::Defer {
                until_s: s,
                reason: DeferReason::BandwidthRising,
            },
            None => StartDecision::Now,
        }
    };
    let start_s = match start {
        StartDecision::Now => 0.0,
        StartDecision::Defer { until_s, .. } => until_s,
    };
    let expected = duration_from(&segs, start_s, bits, dirty);
    // 90 % bound: the p10 of the horizon covering the expected duration, flat.
    let p90 = expected.and_then(|d| {
        let h = Horizon::covering(d);
        let net = f.get(h).p10_mbps - dirty;
        (net > 0.0).then(|| bits / (net * 1e6)).map(|b| b.max(d))
    });
    let link = f
        .get(Horizon::covering(expected.unwrap_or(300.0)))
        .mean_mbps;
    let compress_input_mb_s = link * job.compression_ratio / 8.0;
    Ok(Plan {
        start,
        streams: stream_count(link, f.rtt_ms, f.loss, job.max_streams),
        compress_input_mb_s,
        zstd_level: zstd_level_for(compress_input_mb_s, job.compression_threads),
        expected_duration_s: expected,
        duration_p90_s: p90,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::HorizonForecast;

    fn fc(means: [f64; 4], p10: [f64; 4]) -> LinkForecast {
        let mut horizons = [HorizonForecast {
            horizon: Horizon::S30,
            mean_mbps: 0.0,
            p10_mbps: 0.0,
            source: "test",
        }; 4];
        for h in Horizon::ALL {
            horizons[h.index()] = HorizonForecast {
                horizon: h,
                mean_mbps: means[h.index()],
                p10_mbps: p10[h.index()],
                source: "test",
            };
        }
        LinkForecast {
            at_ms: 0,
            horizons,
            rtt_ms: Some(50.0),
            loss: Some(0.0),
            data_age_ms: 0,
        }
    }

    fn job(bytes: u64, dirty: f64) -> MigrationJob {
        MigrationJob {
            bytes,
            compression_ratio: 2.0,
            dirty_mbps: dirty,
            start_deadline_s: None,
            max_streams: 16,
            compression_threads: 2,
        }
    }

    #[test]
    fn steady_link_starts_now_with_expected_duration() {
        // 1 GB raw, ratio 2 -> 4e9 bits over 100 Mbit/s minus 10/2 dirty = 95 Mbit/s
        let f = fc([100.0; 4], [80.0; 4]);
        let p = plan(&job(1_000_000_000, 10.0), &f).unwrap();
        assert_eq!(p.start, StartDecision::Now);
        let want = 4e9 / 95e6;
        assert!(
            (p.expected_duration_s.unwrap() - want).abs() < 0.01,
            "{p:?}"
        );
        let bound = 4e9 / 75e6;
        assert!((p.duration_p90_s.unwrap() - bound).abs() < 0.01);
        assert!((p.compress_input_mb_s - 25.0).abs() < 1e-9);
        assert_eq!(p.zstd_level, 3);
    }

    #[test]
    fn defers_while_pre_copy_cannot_converge() {
        // 30 s at 5, then rising: mean over 60 s = 30 -> second segment 55
        let f = fc([5.0, 30.0, 42.5, 47.0], [3.0, 20.0, 30.0, 35.0]);
        let p = plan(&job(100_000_000, 20.0), &f).unwrap();
        assert_eq!(
            p.start,
            StartDecision::Defer {
                until_s: 30.0,
                reason: DeferReason::WouldNotConverge
            }
        );
        assert!(p.expected_duration_s.is_some());
    }

    #[test]
    fn deadline_forces_start() {
        let f = fc([1.0; 4], [0.5; 4]);
        let mut j = job(100_000_000, 20.0);
        j.start_deadline_s = Some(10.0);
        let p = plan(&j, &f).unwrap();
        assert_eq!(p.start, StartDecision::Now);
        assert_eq!(p.expected_duration_s, None);
        j.start_deadline_s = None;
        let p = plan(&j, &f).unwrap();
        assert_eq!(
            p.start,
            StartDecision::Defer {
                until_s: 300.0,
                reason: DeferReason::NoWindowInHorizon
            }
        );
    }

    #[test]
    fn slow_start_defers() {
        // first 30 s at 1 Mbit/s, then 1000: a big job finishes sooner if it waits
        let f = fc([1.0, 500.5, 750.25, 900.1], [0.5, 300.0, 500.0, 600.0]);
        let p = plan(&job(2_000_000_000, 0.0), &f).unwrap();
        // first 30 s at 1 Mbit/s send almost nothing: waiting halves the time in flight
        // and finishes no later
        assert!(matches!(
            p.start,
            StartDecision::Defer { until_s: 30.0, .. }
        ));
        // a job whose dirty rate (4 raw = 2 compressed) exceeds the first segment waits
        let p = plan(&job(2_000_000_000, 4.0), &f).unwrap();
        assert_eq!(
            p.start,
            StartDecision::Defer {
                until_s: 30.0,
                reason: DeferReason::WouldNotConverge
            }
        );
    }

    #[test]
    fn defers_when_the_link_is_about_to_be_much_faster() {
        // 30 Mbit/s for 30 s, then 10,000 (cumulative means over 60/120/300 s below).
        // 1 GB at ratio 2 = 4e9 bits. Now: 30 s at 30 (9e8 bits), then 3.1e9 / 1e10 =
        // 0.31 s -> 30.31 s in flight. At 30 s: 0.4 s in flight, done at 30.4 s, less
        // than 10 % later: defer.
        let f = fc(
            [30.0, 5015.0, 7507.5, 9003.0],
            [20.0, 3000.0, 5000.0, 6000.0],
        );
        let p = plan(&job(1_000_000_000, 0.0), &f).unwrap();
        assert_eq!(
            p.start,
            StartDecision::Defer {
                until_s: 30.0,
                reason: DeferReason::BandwidthRising
            }
        );
        assert!((p.expected_duration_s.unwrap() - 0.4).abs() < 1e-6);
        // a tiny job is done within the first segment: start now
        let p = plan(&job(1_000_000, 0.0), &f).unwrap();
        assert_eq!(p.start, StartDecision::Now);
        assert!(p.expected_duration_s.unwrap() < 1.0);
        // with a deadline before 30 s it must start now
        let mut j = job(1_000_000_000, 0.0);
        j.start_deadline_s = Some(20.0);
        assert_eq!(plan(&j, &f).unwrap().start, StartDecision::Now);
    }

    #[test]
    fn streams_follow_bdp_and_loss() {
        // 4 MiB window / 50 ms = 671 Mbit/s per stream, no loss
        assert_eq!(stream_count(100.0, Some(50.0), Some(0.0), 16), 1);
        assert_eq!(stream_count(2000.0, Some(50.0), Some(0.0), 16), 3);
        // 1 % loss at 50 ms: Mathis gives 2.85 Mbit/s per stream
        let per = per_stream_mbps(50.0, 0.01);
        assert!((per - 1460.0 * 8.0 / 0.05 * 1.22 / 0.1 / 1e6).abs() < 1e-9);
        assert_eq!(stream_count(100.0, Some(50.0), Some(0.01), 16), 16);
        assert_eq!(stream_count(10.0, Some(50.0), Some(0.01), 16), 4);
        assert_eq!(stream_count(0.0, None, None, 16), 1);
    }

    #[test]
    fn zstd_level_by_rate() {
        assert_eq!(zstd_level_for(2.0, 2), 19);
        assert_eq!(zstd_level_for(100.0, 1), 3);
        assert_eq!(zstd_level_for(400.0, 2), 1);
        assert_eq!(zstd_level_for(10_000.0, 2), 1);
    }

    #[test]
    fn invalid_jobs_are_errors() {
        let f = fc([10.0; 4], [5.0; 4]);
        assert!(plan(&job(0, 0.0), &f).is_err());
        let mut j = job(1, 0.0);
        j.compression_ratio = 0.5;
        assert!(plan(&j, &f).is_err());
        let mut j = job(1, f64::NAN);
        j.compression_ratio = 1.0;
        assert!(plan(&j, &f).is_err());
    }
}
