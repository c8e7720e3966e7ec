//! Online accuracy tracking: every forecast is resolved once the samples of its horizon
//! have arrived, and the last `window` resolved forecasts are kept per predictor and
//! horizon.
//!
//! # `dwcp_pba_prediction_accuracy`
//!
//! The manual's metric (threshold 0.70) is defined here as: **the share of the active
//! predictor's most recent resolved 30 s forecasts (up to `window`, default 120, i.e. the
//! last 10 minutes) whose absolute percentage error `|predicted mean - actual mean| /
//! actual mean` is at most 20 %** ([`ACCURACY_TOLERANCE`]). The actual mean is the mean
//! bandwidth of the six 5 s samples after the forecast, floored at
//! [`crate::features::FLOOR_MBPS`]. It is a number in `[0, 1]`; it is absent until
//! `min_resolved` forecasts have been resolved.

use std::collections::{BTreeMap, VecDeque};

use crate::Horizon;
use crate::features::FLOOR_MBPS;

/// Error tolerance behind `dwcp_pba_prediction_accuracy`.
pub const ACCURACY_TOLERANCE: f64 = 0.20;

/// One resolved forecast.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Resolved {
    /// Absolute percentage error of the mean.
    pub ape: f64,
    /// `ln(actual / predicted mean)`.
    pub log_ratio: f64,
    /// Whether the actual mean fell below the predicted p10 (if the predictor had one).
    pub below_p10: Option<bool>,
    /// `ln(actual / lower)` where `lower` is the p10 if the predictor gave one, else the
    /// mean: the conformity score used to calibrate p10 online.
    pub lower_log_ratio: f64,
}

impl Resolved {
    /// Compares one forecast with the actual mean (both in Mbit/s).
    pub fn new(predicted: f64, p10: Option<f64>, actual: f64) -> Self {
        let a = actual.max(FLOOR_MBPS);
        let p = predicted.max(FLOOR_MBPS);
        let lower = p10.map_or(p, |q| q.max(FLOOR_MBPS));
        Self {
            ape: (p - a).abs() / a,
            log_ratio: (a / p).ln(),
            below_p10: p10.map(|q| a < q),
            lower_log_ratio: (a / lower).ln(),
        }
    }
}

/// Summary of one predictor at one horizon.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    /// Resolved forecasts in the window.
    pub count: usize,
    /// Median absolute percentage error.
    pub median_ape: f64,
    /// Share with APE at most [`ACCURACY_TOLERANCE`].
    pub accuracy: f64,
    /// Share where the actual mean was over-estimated by more than 10 %.
    pub over_rate: f64,
}

/// Rolling record of resolved forecasts per `(predictor, horizon)`.
#[derive(Debug, Clone)]
pub struct Tracker {
    window: usize,
    records: BTreeMap<(&'static str, Horizon), VecDeque<Resolved>>,
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    // linear interpolation between closest ranks (numpy's default)
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

fn sorted(v: impl Iterator<Item = f64>) -> Vec<f64> {
    let mut v: Vec<f64> = v.filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    v
}

impl Tracker {
    /// Keeps the last `window` resolved forecasts per predictor and horizon (at least 1).
    pub fn new(window: usize) -> Self {
        Self {
            window: window.max(1),
            records: BTreeMap::new(),
        }
    }

    /// Records one resolved forecast.
    pub fn record(&mut self, predictor: &'static str, h: Horizon, r: Resolved) {
        let q = self.records.entry((predictor, h)).or_default();
        if q.len() == self.window {
            q.pop_front();
        }
        q.push_back(r);
    }

    /// Resolved forecasts held for `(predictor, h)`.
    pub fn count(&self, predictor: &str, h: Horizon) -> usize {
        self.get(predictor, h).map_or(0, VecDeque::len)
    }

    fn get(&self, predictor: &str, h: Horizon) -> Option<&VecDeque<Resolved>> {
        self.records
            .iter()
            .find(|((p, hh), _)| *p == predictor && *hh == h)
            .map(|(_, v)| v)
    }

    /// Summary for `(predictor, h)`, if anything was resolved.
    pub fn stats(&self, predictor: &str, h: Horizon) -> Option<Stats> {
        let q = self.get(predictor, h)?;
        if q.is_empty() {
            return None;
        }
        let apes = sorted(q.iter().map(|r| r.ape));
        let n = q.len() as f64;
        Some(Stats {
            count: q.len(),
            median_ape: quantile(&apes, 0.5),
            accuracy: q.iter().filter(|r| r.ape <= ACCURACY_TOLERANCE).count() as f64 / n,
            over_rate: q.iter().filter(|r| r.log_ratio < -(1.1f64).ln()).count() as f64 / n,
        })
    }

    /// The `q` quantile of `ln(actual / lower)` for `(predictor, h)` (`lower` = the p10
    /// the predictor gave, or its mean): multiplying that lower value by `exp` of it gives
    /// an empirically calibrated `q` quantile (split conformal; conformalised quantile
    /// regression when the predictor has a p10).
    pub fn lower_quantile(&self, predictor: &str, h: Horizon, q: f64) -> Option<f64> {
        let v = sorted(self.get(predictor, h)?.iter().map(|r| r.lower_log_ratio));
        if v.is_empty() {
            None
        } else {
            Some(quantile(&v, q))
        }
    }

    /// Forgets every record of `predictor` (e.g. after a model swap).
    pub fn clear(&mut self, predictor: &str) {
        self.records.retain(|(p, _), _| *p != predictor);
    }

    /// Every predictor that has records, in name order.
    pub fn predictors(&self) -> Vec<&'static str> {
        let mut v: Vec<&'static str> = self.records.keys().map(|(p, _)| *p).collect();
        v.dedup();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolved_errors() {
        let r = Resolved::new(12.0, Some(8.0), 10.0);
        assert!((r.ape - 0.2).abs() < 1e-12);
        assert!((r.log_ratio - (10.0f64 / 12.0).ln()).abs() < 1e-12);
        assert_eq!(r.below_p10, Some(false));
        let r = Resolved::new(5.0, Some(8.0), 0.0);
        assert_eq!(r.below_p10, Some(true));
        assert!(r.ape.is_finite());
    }

    #[test]
    fn stats_over_window() {
        let mut t = Tracker::new(4);
        for (p, a) in [
            (100.0, 1.0),
            (10.0, 10.0),
            (11.0, 10.0),
            (13.0, 10.0),
            (5.0, 10.0),
        ] {
            t.record("x", Horizon::S30, Resolved::new(p, None, a));
        }
        // the first (APE 99) fell out of the window of 4
        let s = t.stats("x", Horizon::S30).unwrap();
        assert_eq!(s.count, 4);
        // APEs 0, 0.1, 0.3, 0.5 -> median 0.2, two of four within 20 %
        assert!((s.median_ape - 0.2).abs() < 1e-12);
        assert!((s.accuracy - 0.5).abs() < 1e-12);
        // over-estimates by >10 %: 13 vs 10 only (11 vs 10 is exactly 10 %)
        assert!((s.over_rate - 0.25).abs() < 1e-12);
        assert_eq!(t.count("x", Horizon::S60), 0);
        assert!(t.stats("y", Horizon::S30).is_none());
        assert_eq!(t.predictors(), vec!["x"]);
    }

    #[test]
    fn log_ratio_quantile_interpolates() {
        let mut t = Tracker::new(100);
        for i in 1..=11 {
            // actual/pred = i/10
            t.record("x", Horizon::S60, Resolved::new(10.0, None, i as f64));
        }
        let q = t.lower_quantile("x", Horizon::S60, 0.1).unwrap();
        assert!((q - (0.2f64).ln()).abs() < 1e-12);
        assert!(t.lower_quantile("x", Horizon::S30, 0.1).is_none());
        // with a p10 the score is relative to the p10
        t.record("y", Horizon::S60, Resolved::new(10.0, Some(5.0), 10.0));
        let q = t.lower_quantile("y", Horizon::S60, 0.1).unwrap();
        assert!((q - 2.0f64.ln()).abs() < 1e-12);
    }
}
