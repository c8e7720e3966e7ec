//! PBA, the predictive bandwidth allocator (manual section 2.2.3): bandwidth forecasts
//! with a lower quantile, simple baselines, online accuracy tracking with fallback, and
//! migration scheduling hints. Sans-IO: no clock, no threads, no file I/O in the core; the
//! model bytes are handed in by the node.
//!
//! # Shape
//!
//! ```text
//!  link samples (5 s: Mbit/s, RTT, loss)          model bytes (models/pba_lstm.onnx)
//!        |                                                   |
//!        v                                                   v
//!  engine::Engine::handle_sample(now, s) ---> OnnxPredictor (feature `onnx`, tract)
//!        |   keeps 1 h of history,               baselines::{LastValue, HarmonicMean,
//!        |   resolves past forecasts              RobustMpc, Ewma}
//!        |   into accuracy::Tracker                      |
//!        v                                               v
//!  engine::Engine::forecast(now) -> LinkForecast  (active predictor = the model unless
//!        |                                         missing, stale or worse than the best
//!        v                                         baseline on recent data)
//!  hints::plan(migration, forecast) -> start now / defer, streams, compression, duration
//! ```
//!
//! - [`features`] is the feature spec shared with the Python training code
//!   (`models/FEATURES.md`), checked against golden vectors on both sides.
//! - [`BandwidthPredictor`] is the one trait the model and the baselines implement: a
//!   window of 5 s samples in, a mean and (for the model) a p10 per horizon out.
//! - [`accuracy`] defines `dwcp_pba_prediction_accuracy`: the share of the active
//!   predictor's most recent resolved 30 s forecasts whose absolute percentage error is at
//!   most 20 % (see [`engine::Engine::accuracy`]).
//! - [`hints`] are pure functions from a migration's size and a forecast to a plan.
//! - [`trace`] parses the public trace formats and resamples them to 5 s bins (used by the
//!   benchmark and by tests).
//! - [`store`] is the retrain hook's bounded on-disk sample series. It is the one module
//!   that does file I/O (plain `std::fs`); the node's driver calls it, the engine never does.
//!
//! The node's driver is `node/src/pba.rs` (`dwcp-cli pba ...`): it resamples pings and
//! transfer throughput to 5 s bins per peer, records and forecasts them, and runs retraining
//! (see `models/README.md`, "In the node").
//!
//! # What was measured and decided
//!
//! `dwcp-testnet bench prediction` on the validation split (107 whole traces never seen in
//! training, 10,021 forecast positions; table and command in `models/README.md`), median
//! APE of the LSTM against the best baseline:
//!
//! | source | 30 s | 60 s | 120 s | 300 s |
//! | --- | --- | --- | --- | --- |
//! | fcc (home broadband) | 0.044 vs 0.050 (-11 %) | 0.040 vs 0.045 (-12 %) | 0.040 vs 0.046 (-12 %) | 0.050 vs 0.056 (-11 %) |
//! | lumos5g_4g (4G) | 0.267 vs 0.316 (-16 %) | 0.279 vs 0.389 (-28 %) | 0.284 vs 0.457 (-38 %) | 0.320 vs 0.418 (-24 %) |
//! | norway_hsdpa (3G) | 0.193 vs 0.197 (-2 %) | 0.199 vs 0.240 (-17 %) | 0.208 vs 0.285 (-27 %) | 0.189 vs 0.320 (-41 %) |
//!
//! The 20 % target is met on 5 of 12 cells. The model (two LSTMs of 64 averaged, its p10
//! recalibrated on held-out training traces; `models/MODEL_CARD.md`) covers 8.0-10.9 % with
//! its p10 on six cellular cells, 14.6 % on 4G at 300 s, and 4.1-5.5 % (too low, the safe
//! side) on FCC and 3G at 300 s. A median forecast over-estimates a cellular link by more
//! than 10 % about 40 % of the time, like the baselines. With the engine's online p10
//! recalibration 8 of 12 cells are within 10 +- 3 %. Inference: 365-381 us per forecast in a
//! release build on a loaded machine (target 1 ms); the model is 287.6 kB (one block-diagonal
//! LSTM of 128 holding both members, 38,416 trained parameters).
//!
//! Decisions that follow: the engine never trusts the model blindly. Per horizon it
//! answers with the model only while the model's median APE on the link's own recent
//! resolved forecasts is not worse than the best baseline's, and it recalibrates every p10
//! on those forecasts (conformal), so a link unlike the training data degrades to the best
//! simple predictor with an honest lower bound instead of to a wrong model.
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod accuracy;
pub mod baselines;
pub mod engine;
pub mod features;
pub mod hints;
#[cfg(feature = "onnx")]
pub mod onnx;
pub mod store;
pub mod trace;

/// A forecast horizon (the manual's 30 s to 5 min).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Horizon {
    /// 30 s ahead.
    S30,
    /// 60 s ahead.
    S60,
    /// 120 s ahead.
    S120,
    /// 300 s ahead.
    S300,
}

impl Horizon {
    /// All horizons, shortest first (the model's output order).
    pub const ALL: [Horizon; 4] = [Horizon::S30, Horizon::S60, Horizon::S120, Horizon::S300];

    /// Length in seconds.
    pub const fn seconds(self) -> u64 {
        match self {
            Horizon::S30 => 30,
            Horizon::S60 => 60,
            Horizon::S120 => 120,
            Horizon::S300 => 300,
        }
    }

    /// Length in 5 s samples.
    pub const fn steps(self) -> usize {
        (self.seconds() / features::STEP_S) as usize
    }

    /// Position in [`Horizon::ALL`].
    pub const fn index(self) -> usize {
        match self {
            Horizon::S30 => 0,
            Horizon::S60 => 1,
            Horizon::S120 => 2,
            Horizon::S300 => 3,
        }
    }

    /// The shortest horizon at least `secs` long (300 s for anything longer).
    pub fn covering(secs: f64) -> Horizon {
        Horizon::ALL
            .into_iter()
            .find(|h| h.seconds() as f64 >= secs)
            .unwrap_or(Horizon::S300)
    }
}

/// Mean bandwidth over each horizon, and a p10 where the predictor has one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Forecast {
    /// Expected mean Mbit/s over each horizon ([`Horizon::ALL`] order).
    pub mean_mbps: [f64; 4],
    /// 10th percentile of the mean over each horizon, if known.
    pub p10_mbps: Option<[f64; 4]>,
}

impl Forecast {
    /// The same mean for every horizon, no quantile (what the baselines give).
    pub fn flat(mbps: f64) -> Self {
        Self {
            mean_mbps: [mbps; 4],
            p10_mbps: None,
        }
    }

    /// Mean for one horizon.
    pub fn mean_mbps(&self, h: Horizon) -> f64 {
        self.mean_mbps[h.index()]
    }

    /// p10 for one horizon, if known.
    pub fn p10_mbps(&self, h: Horizon) -> Option<f64> {
        self.p10_mbps.map(|p| p[h.index()])
    }
}

/// Why a forecast could not be made.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PredictError {
    /// Fewer samples than the spec's minimum.
    #[error("not enough history: {have} samples, need {need}")]
    NotEnoughHistory {
        /// Samples given.
        have: usize,
        /// Samples needed.
        need: usize,
    },
    /// A sample is negative, NaN or infinite.
    #[error("sample {index} is not a finite non-negative number")]
    BadSample {
        /// Position in the history slice.
        index: usize,
    },
    /// The model's output does not have the spec's shape or is not finite.
    #[error("bad model output: {0}")]
    BadModelOutput(String),
    /// The inference runtime failed.
    #[error("inference failed: {0}")]
    Inference(String),
}

/// Anything that turns a window of 5 s bandwidth samples into a [`Forecast`].
///
/// `history` is Mbit/s per 5 s sample, oldest first; at least
/// [`features::MIN_HISTORY`] samples (implementations use the last [`features::WINDOW`]).
/// `t_last_unix_s` is the wall-clock start of the newest sample when the caller knows it.
pub trait BandwidthPredictor: Send + Sync {
    /// Short stable name (used in metrics labels and the benchmark table).
    fn name(&self) -> &'static str;
    /// One forecast.
    fn forecast(
        &self,
        history: &[f64],
        t_last_unix_s: Option<f64>,
    ) -> Result<Forecast, PredictError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn horizons_in_steps() {
        let steps: Vec<usize> = Horizon::ALL.iter().map(|h| h.steps()).collect();
        assert_eq!(steps, vec![6, 12, 24, 60]);
        for (i, h) in Horizon::ALL.iter().enumerate() {
            assert_eq!(h.index(), i);
        }
        assert_eq!(Horizon::covering(1.0), Horizon::S30);
        assert_eq!(Horizon::covering(61.0), Horizon::S120);
        assert_eq!(Horizon::covering(10_000.0), Horizon::S300);
    }
}
