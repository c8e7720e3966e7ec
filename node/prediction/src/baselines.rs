//! The simple predictors the model must beat, behind the same [`BandwidthPredictor`]
//! trait. Definitions match `models/pba/baselines.py` (the training script compares
//! against the same numbers).
//!
//! Each baseline gives one bandwidth level used for every horizon and no quantile of its
//! own: the [`crate::engine::Engine`] calibrates a p10 for them from their recent errors.

use crate::features::{FLOOR_MBPS, validate_history};
use crate::{BandwidthPredictor, Forecast, Horizon, PredictError};

fn flat(v: f64) -> Forecast {
    Forecast::flat(v.max(FLOOR_MBPS))
}

/// Last sample.
#[derive(Debug, Clone, Copy, Default)]
pub struct LastValue;

impl BandwidthPredictor for LastValue {
    fn name(&self) -> &'static str {
        "last"
    }
    fn forecast(&self, history: &[f64], _t: Option<f64>) -> Result<Forecast, PredictError> {
        validate_history(history)?;
        let last = history.last().copied().unwrap_or(FLOOR_MBPS);
        Ok(flat(last))
    }
}

/// Harmonic mean of the last `n` samples (the ABR standard, n = 5 in Pensieve and MPC).
#[derive(Debug, Clone, Copy)]
pub struct HarmonicMean {
    /// Samples averaged.
    pub n: usize,
}

impl Default for HarmonicMean {
    fn default() -> Self {
        Self { n: 5 }
    }
}

/// Harmonic mean of the last `n` of `x` (floored at [`FLOOR_MBPS`]).
pub fn harmonic_mean(x: &[f64], n: usize) -> f64 {
    let tail = &x[x.len().saturating_sub(n.max(1))..];
    if tail.is_empty() {
        return FLOOR_MBPS;
    }
    let inv: f64 = tail.iter().map(|v| 1.0 / v.max(FLOOR_MBPS)).sum();
    tail.len() as f64 / inv
}

impl BandwidthPredictor for HarmonicMean {
    fn name(&self) -> &'static str {
        "harmonic5"
    }
    fn forecast(&self, history: &[f64], _t: Option<f64>) -> Result<Forecast, PredictError> {
        validate_history(history)?;
        Ok(flat(harmonic_mean(history, self.n)))
    }
}

/// RobustMPC (Yin et al., SIGCOMM 2015, as in Pensieve's `mpc` code): the harmonic mean of
/// the last `n`, divided by `1 + max` relative error of the last `n` one-step harmonic
/// predictions.
#[derive(Debug, Clone, Copy)]
pub struct RobustMpc {
    /// Samples averaged and errors looked back over.
    pub n: usize,
}

impl Default for RobustMpc {
    fn default() -> Self {
        Self { n: 5 }
    }
}

impl BandwidthPredictor for RobustMpc {
    fn name(&self) -> &'static str {
        "robust_mpc"
    }
    fn forecast(&self, history: &[f64], _t: Option<f64>) -> Result<Forecast, PredictError> {
        validate_history(history)?;
        let n = self.n.max(1);
        let start = history.len().saturating_sub(n).max(1);
        let mut max_err: f64 = 0.0;
        for i in start..history.len() {
            let pred = harmonic_mean(&history[..i], n);
            let actual = history[i].max(FLOOR_MBPS);
            max_err = max_err.max((pred - actual).abs() / actual);
        }
        Ok(flat(harmonic_mean(history, n) / (1.0 + max_err)))
    }
}

/// Exponentially weighted moving average over the window, `alpha` per 5 s sample.
#[derive(Debug, Clone, Copy)]
pub struct Ewma {
    /// Weight of the newest sample.
    pub alpha: f64,
}

impl Default for Ewma {
    fn default() -> Self {
        Self { alpha: 0.3 }
    }
}

/// EWMA of `x` started at its first sample (floored at [`FLOOR_MBPS`]).
pub fn ewma(x: &[f64], alpha: f64) -> f64 {
    let mut it = x.iter().map(|v| v.max(FLOOR_MBPS));
    let Some(mut e) = it.next() else {
        return FLOOR_MBPS;
    };
    for v in it {
        e = alpha * v + (1.0 - alpha) * e;
    }
    e
}

impl BandwidthPredictor for Ewma {
    fn name(&self) -> &'static str {
        "ewma"
    }
    fn forecast(&self, history: &[f64], _t: Option<f64>) -> Result<Forecast, PredictError> {
        validate_history(history)?;
        // The same window as the model sees, so the comparison is fair.
        let x = &history[history.len().saturating_sub(crate::features::WINDOW)..];
        Ok(flat(ewma(x, self.alpha)))
    }
}

/// Every baseline with its default parameters, in a fixed order.
pub fn all() -> Vec<Box<dyn BandwidthPredictor>> {
    vec![
        Box::new(LastValue),
        Box::new(HarmonicMean::default()),
        Box::new(RobustMpc::default()),
        Box::new(Ewma::default()),
    ]
}

/// Index helper for callers that want one horizon out of a flat forecast.
pub fn level_of(f: &Forecast) -> f64 {
    f.mean_mbps(Horizon::S30)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist() -> Vec<f64> {
        let mut h = vec![10.0; 10];
        h.extend([2.0, 4.0, 8.0]);
        h
    }

    #[test]
    fn last_value_takes_last() {
        let f = LastValue.forecast(&hist(), None).unwrap();
        for h in Horizon::ALL {
            assert_eq!(f.mean_mbps(h), 8.0);
            assert_eq!(f.p10_mbps(h), None);
        }
    }

    #[test]
    fn harmonic_mean_of_last_five() {
        let f = HarmonicMean::default().forecast(&hist(), None).unwrap();
        let want = 5.0 / (1.0 / 10.0 + 1.0 / 10.0 + 1.0 / 2.0 + 1.0 / 4.0 + 1.0 / 8.0);
        assert!((level_of(&f) - want).abs() < 1e-12);
    }

    #[test]
    fn robust_mpc_discounts_by_recent_error() {
        let h = hist();
        let hm = harmonic_mean(&h, 5);
        let f = RobustMpc::default().forecast(&h, None).unwrap();
        assert!(level_of(&f) < hm);
        // constant history: no error, no discount
        let c = vec![7.0; 20];
        let f = RobustMpc::default().forecast(&c, None).unwrap();
        assert!((level_of(&f) - 7.0).abs() < 1e-12);
        // hand-computed: the prediction for the 8.0 sample was hm(10,10,10,2,4)
        let p = 5.0 / (0.3 + 0.5 + 0.25);
        let e_last = (p - 8.0f64).abs() / 8.0;
        let p2 = 5.0 / (0.4 + 0.5);
        let e_prev = (p2 - 4.0f64).abs() / 4.0;
        let e_prev2 = (10.0f64 - 2.0).abs() / 2.0; // the 2.0 sample: hm of 10s = 10
        let m = e_last.max(e_prev).max(e_prev2);
        assert!(
            (level_of(&RobustMpc::default().forecast(&h, None).unwrap()) - hm / (1.0 + m)).abs()
                < 1e-12
        );
    }

    #[test]
    fn ewma_matches_recursion() {
        let h = hist();
        let mut e = 10.0;
        for v in &h[1..] {
            e = 0.3 * v + 0.7 * e;
        }
        assert!((level_of(&Ewma::default().forecast(&h, None).unwrap()) - e).abs() < 1e-12);
    }

    #[test]
    fn zeros_are_floored_not_divided_by() {
        let h = vec![0.0; 15];
        for b in all() {
            let f = b.forecast(&h, None).unwrap();
            assert!(level_of(&f) >= FLOOR_MBPS, "{}", b.name());
            assert!(level_of(&f).is_finite());
        }
    }

    #[test]
    fn short_history_rejected() {
        for b in all() {
            assert!(b.forecast(&[1.0; 3], None).is_err());
        }
    }
}
