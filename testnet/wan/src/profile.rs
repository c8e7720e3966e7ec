//! WAN profiles: named presets and custom values, parsed from strings such as `internet`,
//! `lossy`, `dc`, `trace:cell.up`, `rate=100mbit,rtt=100ms,loss=1%` or
//! `internet,loss=1%,jitter=2ms`.
//!
//! A profile describes one link; the emulator applies it to both directions. Loss is applied
//! to each direction independently (a 1 % profile loses 1 % of data packets and 1 % of ACKs).

use std::sync::Arc;

use crate::link::{LinkConfig, Loss, Rate, Trace, TraceError};

/// A parsed profile (both directions use the same values).
#[derive(Clone, Debug, PartialEq)]
pub struct Profile {
    /// Human-readable form, as given.
    pub name: String,
    /// Round-trip propagation delay (each direction gets half).
    pub rtt_ns: u64,
    /// Per-packet jitter bound, each direction.
    pub jitter_ns: u64,
    /// Loss model, each direction.
    pub loss: Loss,
    /// Bottleneck rate.
    pub rate: Rate,
    /// Drop-tail queue limit in bytes; `None` means one bandwidth-delay product (at least 64
    /// full packets).
    pub queue_bytes: Option<u64>,
}

/// Why a profile string was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// Unknown preset or key.
    #[error(
        "unknown profile item {0:?} (presets: dc, internet, lossy, none, trace:<file>; keys: rate, rtt, delay, jitter, loss, ge, queue)"
    )]
    Unknown(String),
    /// A value did not parse.
    #[error("bad value for {key}: {value:?} ({why})")]
    BadValue {
        /// The key.
        key: &'static str,
        /// The text.
        value: String,
        /// What was expected.
        why: &'static str,
    },
    /// The trace file could not be read.
    #[error("cannot read trace file {path}")]
    TraceRead {
        /// Path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The trace file is malformed.
    #[error("bad trace file {path}")]
    TraceParse {
        /// Path.
        path: String,
        /// Cause.
        #[source]
        source: TraceError,
    },
}

const MS: u64 = 1_000_000;

impl Profile {
    /// No shaping at all.
    pub fn none() -> Self {
        Self {
            name: "none".into(),
            rtt_ns: 0,
            jitter_ns: 0,
            loss: Loss::None,
            rate: Rate::Unlimited,
            queue_bytes: None,
        }
    }

    /// `dc`: 1 ms RTT, 10 Gbit/s, no loss.
    pub fn dc() -> Self {
        Self {
            name: "dc".into(),
            rtt_ns: MS,
            rate: Rate::BitsPerSec(10_000_000_000),
            ..Self::none()
        }
    }

    /// `internet`: 100 ms RTT, 100 Mbit/s, 0.5 % loss.
    pub fn internet() -> Self {
        Self {
            name: "internet".into(),
            rtt_ns: 100 * MS,
            rate: Rate::BitsPerSec(100_000_000),
            loss: Loss::Random(0.005),
            ..Self::none()
        }
    }

    /// `lossy`: 100 ms RTT, 100 Mbit/s, 1 % loss.
    pub fn lossy() -> Self {
        Self {
            name: "lossy".into(),
            loss: Loss::Random(0.01),
            ..Self::internet()
        }
    }

    /// Parses a profile string (see the module docs). A `trace:` item reads the file.
    pub fn parse(text: &str) -> Result<Self, ProfileError> {
        let mut p = Self::none();
        for (i, item) in text.split(',').map(str::trim).enumerate() {
            if item.is_empty() {
                continue;
            }
            if let Some((key, value)) = item.split_once('=') {
                p.apply(key.trim(), value.trim())?;
                continue;
            }
            if let Some(path) = item.strip_prefix("trace:") {
                let text =
                    std::fs::read_to_string(path).map_err(|source| ProfileError::TraceRead {
                        path: path.into(),
                        source,
                    })?;
                let trace = Trace::parse(&text).map_err(|source| ProfileError::TraceParse {
                    path: path.into(),
                    source,
                })?;
                p.rate = Rate::Trace(Arc::new(trace));
                if p.rtt_ns == 0 {
                    p.rtt_ns = 40 * MS;
                }
                continue;
            }
            let preset = match item {
                "none" => Self::none(),
                "dc" => Self::dc(),
                "internet" => Self::internet(),
                "lossy" => Self::lossy(),
                other => return Err(ProfileError::Unknown(other.into())),
            };
            if i != 0 {
                return Err(ProfileError::Unknown(format!(
                    "{item} (a preset must come first)"
                )));
            }
            p = preset;
        }
        p.name = text.trim().into();
        Ok(p)
    }

    fn apply(&mut self, key: &str, value: &str) -> Result<(), ProfileError> {
        match key {
            "rate" => {
                self.rate = Rate::BitsPerSec(parse_rate(value).ok_or(bad(
                    "rate",
                    value,
                    "like 100mbit, 1gbit, 500kbit",
                ))?)
            }
            "rtt" => self.rtt_ns = parse_time(value).ok_or(bad("rtt", value, "like 100ms"))?,
            "delay" => {
                self.rtt_ns =
                    2 * parse_time(value).ok_or(bad("delay", value, "one-way, like 50ms"))?
            }
            "jitter" => {
                self.jitter_ns = parse_time(value).ok_or(bad("jitter", value, "like 2ms"))?
            }
            "loss" => {
                let p = parse_fraction(value).ok_or(bad("loss", value, "like 1% or 0.01"))?;
                self.loss = if p > 0.0 { Loss::Random(p) } else { Loss::None };
            }
            "ge" => {
                let parts: Vec<f64> = value
                    .split('/')
                    .map(parse_fraction)
                    .collect::<Option<_>>()
                    .ok_or(bad("ge", value, "p_gb/p_bg/loss_good/loss_bad"))?;
                let [p_good_to_bad, p_bad_to_good, loss_good, loss_bad] = parts[..] else {
                    return Err(bad("ge", value, "four values p_gb/p_bg/loss_good/loss_bad"));
                };
                self.loss = Loss::GilbertElliott {
                    p_good_to_bad,
                    p_bad_to_good,
                    loss_good,
                    loss_bad,
                };
            }
            "queue" => {
                self.queue_bytes = Some(parse_size(value).ok_or(bad(
                    "queue",
                    value,
                    "bytes, like 1mb or 300kb",
                ))?)
            }
            other => return Err(ProfileError::Unknown(other.into())),
        }
        Ok(())
    }

    /// The nominal link rate in bits per second (a trace's mean), `None` if unlimited.
    pub fn rate_bps(&self) -> Option<f64> {
        match &self.rate {
            Rate::Unlimited => None,
            Rate::BitsPerSec(b) => Some(*b as f64),
            Rate::Trace(t) => Some(t.mean_rate_bps()),
        }
    }

    /// The link configuration for one direction.
    pub fn link_config(&self) -> LinkConfig {
        let bdp = self
            .rate_bps()
            .map_or(0, |r| (r / 8.0 * self.rtt_ns as f64 / 1e9) as u64);
        LinkConfig {
            delay_ns: self.rtt_ns / 2,
            jitter_ns: self.jitter_ns,
            loss: self.loss.clone(),
            rate: self.rate.clone(),
            queue_bytes: self.queue_bytes.unwrap_or(bdp.max(64 * 1500)),
        }
    }
}

fn bad(key: &'static str, value: &str, why: &'static str) -> ProfileError {
    ProfileError::BadValue {
        key,
        value: value.into(),
        why,
    }
}

fn split_num(s: &str) -> Option<(f64, String)> {
    let s = s.trim().to_ascii_lowercase();
    let idx = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let n: f64 = s[..idx].parse().ok()?;
    (n.is_finite() && n >= 0.0).then(|| (n, s[idx..].trim().to_string()))
}

/// Parses `100mbit`, `1gbit`, `10kbit`, `5000bit` (bits per second).
pub fn parse_rate(s: &str) -> Option<u64> {
    let (n, unit) = split_num(s)?;
    let mult = match unit.trim_end_matches("/s").trim_end_matches("ps") {
        "" | "bit" => 1.0,
        "k" | "kbit" => 1e3,
        "m" | "mbit" => 1e6,
        "g" | "gbit" => 1e9,
        _ => return None,
    };
    let v = (n * mult).round();
    (1.0..=1e12).contains(&v).then_some(v as u64)
}

/// Parses `100ms`, `1s`, `250us` (bare numbers are milliseconds) into nanoseconds.
pub fn parse_time(s: &str) -> Option<u64> {
    let (n, unit) = split_num(s)?;
    let mult = match unit.as_str() {
        "" | "ms" => 1e6,
        "s" => 1e9,
        "us" => 1e3,
        "ns" => 1.0,
        _ => return None,
    };
    let v = n * mult;
    (v <= 3600e9).then_some(v as u64)
}

/// Parses `1%` or `0.01` into a probability.
pub fn parse_fraction(s: &str) -> Option<f64> {
    let s = s.trim();
    let v = match s.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().ok()? / 100.0,
        None => s.parse::<f64>().ok()?,
    };
    (0.0..=1.0).contains(&v).then_some(v)
}

/// Parses `1mb`, `300kb`, `1500b` or a bare byte count.
pub fn parse_size(s: &str) -> Option<u64> {
    let (n, unit) = split_num(s)?;
    let mult = match unit.as_str() {
        "" | "b" => 1.0,
        "kb" | "k" => 1e3,
        "mb" | "m" => 1e6,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        _ => return None,
    };
    let v = n * mult;
    (1500.0..=1e10).contains(&v).then_some(v as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets() {
        let p = Profile::parse("internet").unwrap();
        assert_eq!(p.rtt_ns, 100 * MS);
        assert_eq!(p.rate, Rate::BitsPerSec(100_000_000));
        assert_eq!(p.loss, Loss::Random(0.005));
        let l = p.link_config();
        assert_eq!(l.delay_ns, 50 * MS);
        assert_eq!(l.queue_bytes, 1_250_000);
        assert_eq!(Profile::parse("lossy").unwrap().loss, Loss::Random(0.01));
        assert_eq!(
            Profile::parse("dc").unwrap().rate,
            Rate::BitsPerSec(10_000_000_000)
        );
    }

    #[test]
    fn custom_values_and_overrides() {
        let p = Profile::parse("rate=1gbit, rtt=20ms, loss=0.1%, jitter=1ms, queue=2mb").unwrap();
        assert_eq!(p.rate, Rate::BitsPerSec(1_000_000_000));
        assert_eq!(p.rtt_ns, 20 * MS);
        assert_eq!(p.jitter_ns, MS);
        assert_eq!(p.queue_bytes, Some(2_000_000));
        assert!(matches!(p.loss, Loss::Random(x) if (x - 0.001).abs() < 1e-12));
        let q = Profile::parse("internet,loss=1%,delay=10ms").unwrap();
        assert_eq!(q.rtt_ns, 20 * MS);
        assert_eq!(q.loss, Loss::Random(0.01));
        let g = Profile::parse("rate=10mbit,ge=0.01/0.2/0/50%").unwrap();
        assert!(matches!(g.loss, Loss::GilbertElliott { loss_bad, .. } if loss_bad == 0.5));
    }

    #[test]
    fn bad_input_is_a_clear_error() {
        for bad in [
            "moon",
            "rate=fast",
            "loss=150%",
            "rtt=-3ms",
            "ge=1/2",
            "queue=10",
            "rate=100mbit,internet",
            "trace:/nonexistent/file",
        ] {
            let e = Profile::parse(bad).expect_err(bad);
            assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn trace_profile_reads_a_file() {
        let dir = std::env::temp_dir().join(format!("dwcp-wan-trace-{}", std::process::id()));
        std::fs::write(&dir, "1\n2\n").unwrap();
        let p = Profile::parse(&format!("trace:{}", dir.display())).unwrap();
        std::fs::remove_file(&dir).unwrap();
        // 2 x 1500 bytes per 2 ms = 12 Mbit/s.
        assert!((p.rate_bps().unwrap() - 12e6).abs() < 1.0);
        assert_eq!(p.rtt_ns, 40 * MS);
    }
}
