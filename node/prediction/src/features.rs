//! Feature spec v1 (`models/FEATURES.md`, constants in `models/features.json`).
//!
//! The same maths lives in `models/pba/spec.py`; the golden vectors in `models/golden/`
//! pin both sides (tests in this module and in `models/tests/`).

use crate::{Horizon, PredictError};

/// Version of the feature spec this code implements (`spec_version` in `features.json`).
pub const SPEC_VERSION: u32 = 1;
/// Sample period in seconds.
pub const STEP_S: u64 = 5;
/// Samples in one window (the manual's 60 x 5 s).
pub const WINDOW: usize = 60;
/// Fewest samples a forecast needs (1 minute).
pub const MIN_HISTORY: usize = 12;
/// Samples whose geometric mean is the reference level `L`.
pub const LEVEL_SAMPLES: usize = 4;
/// Bandwidth floor in Mbit/s: samples below it (outages) count as this value.
pub const FLOOR_MBPS: f64 = 0.01;
/// Clip for `ln(x / L)`.
pub const LOG_RATIO_CLIP: f64 = 4.0;
/// Scale of the `ln(L)` channel.
pub const LOG_LEVEL_SCALE: f64 = 0.25;
/// Whether the time-of-day/day-of-week channels are filled (false in spec v1: the public
/// traces carry wall-clock time for one source only, so a model would learn the source).
pub const USE_TIME_FEATURES: bool = false;
/// Channels per time step.
pub const CHANNELS: usize = 8;
/// Raw model outputs: `(mean_log_ratio, p10_gap_raw)` per horizon.
pub const N_OUT: usize = 2 * Horizon::ALL.len();
/// Clip of the mean log-ratio output.
pub const OUTPUT_CLIP: f64 = 4.0;

/// The `[WINDOW, CHANNELS]` input tensor of the model, row-major, plus its level.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureTensor {
    /// Row-major `[WINDOW][CHANNELS]` values.
    pub data: Vec<f32>,
    /// Reference level `L` in Mbit/s (geometric mean of the last [`LEVEL_SAMPLES`]).
    pub level_mbps: f64,
}

fn clean(v: f64) -> f64 {
    // NaN and negative values are rejected before this; +inf is not finite either.
    v.max(FLOOR_MBPS)
}

/// Checks a history slice: enough samples, all finite and non-negative.
pub fn validate_history(history: &[f64]) -> Result<(), PredictError> {
    if history.len() < MIN_HISTORY {
        return Err(PredictError::NotEnoughHistory {
            have: history.len(),
            need: MIN_HISTORY,
        });
    }
    if let Some(i) = history.iter().position(|v| !v.is_finite() || *v < 0.0) {
        return Err(PredictError::BadSample { index: i });
    }
    Ok(())
}

/// Reference level: geometric mean of the last [`LEVEL_SAMPLES`] samples (floored).
pub fn level(history: &[f64]) -> f64 {
    let tail = &history[history.len().saturating_sub(LEVEL_SAMPLES)..];
    if tail.is_empty() {
        return FLOOR_MBPS;
    }
    let s: f64 = tail.iter().map(|v| clean(*v).ln()).sum();
    (s / tail.len() as f64).exp()
}

/// `(tod_sin, tod_cos, dow_sin, dow_cos)` for a UTC unix time in seconds.
pub fn time_features(t_unix_s: f64) -> [f64; 4] {
    let day = (t_unix_s / 86_400.0).floor();
    let tod = (t_unix_s - day * 86_400.0) / 86_400.0;
    let dow = (day + 3.0).rem_euclid(7.0) / 7.0;
    let tau = std::f64::consts::TAU;
    [
        (tau * tod).sin(),
        (tau * tod).cos(),
        (tau * dow).sin(),
        (tau * dow).cos(),
    ]
}

/// Builds the feature tensor for one forecast.
///
/// `history`: bandwidth in Mbit/s at [`STEP_S`], oldest first (only the last [`WINDOW`]
/// are used); `t_last_unix_s`: start of the newest sample when known (used only when
/// [`USE_TIME_FEATURES`] is on).
pub fn features(
    history: &[f64],
    t_last_unix_s: Option<f64>,
) -> Result<FeatureTensor, PredictError> {
    validate_history(history)?;
    let x = &history[history.len().saturating_sub(WINDOW)..];
    let w = x.len();
    let lvl = level(x);
    let log_level = (lvl.ln() * LOG_LEVEL_SCALE) as f32;
    let mut data = vec![0.0f32; WINDOW * CHANNELS];
    for (j, v) in x.iter().enumerate() {
        let row = WINDOW - w + j;
        let r = &mut data[row * CHANNELS..(row + 1) * CHANNELS];
        r[0] = (clean(*v) / lvl)
            .ln()
            .clamp(-LOG_RATIO_CLIP, LOG_RATIO_CLIP) as f32;
        r[1] = 1.0;
        r[2] = log_level;
        if USE_TIME_FEATURES && let Some(t) = t_last_unix_s {
            let t = t - (w - 1 - j) as f64 * STEP_S as f64;
            let tf = time_features(t);
            for (k, v) in tf.iter().enumerate() {
                r[3 + k] = *v as f32;
            }
            r[7] = 1.0;
        }
    }
    Ok(FeatureTensor {
        data,
        level_mbps: lvl,
    })
}

/// Numerically stable softplus.
pub fn softplus(z: f64) -> f64 {
    z.max(0.0) + (-z.abs()).exp().ln_1p()
}

/// Raw model output `y[N_OUT]` and level to `(mean, p10)` in Mbit/s per horizon.
pub fn postprocess(y: &[f32], level_mbps: f64) -> Result<[(f64, f64); 4], PredictError> {
    if y.len() != N_OUT {
        return Err(PredictError::BadModelOutput(format!(
            "expected {N_OUT} outputs, got {}",
            y.len()
        )));
    }
    if y.iter().any(|v| !v.is_finite()) {
        return Err(PredictError::BadModelOutput("non-finite output".into()));
    }
    let mut out = [(0.0, 0.0); 4];
    for (k, o) in out.iter_mut().enumerate() {
        let m = f64::from(y[2 * k]).clamp(-OUTPUT_CLIP, OUTPUT_CLIP);
        let g = softplus(f64::from(y[2 * k + 1]));
        *o = (level_mbps * m.exp(), level_mbps * (m - g).exp());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn models_dir() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models")
    }

    /// The constants above equal `models/features.json`.
    #[test]
    fn constants_match_features_json() {
        let text = std::fs::read_to_string(models_dir().join("features.json")).unwrap();
        let j: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(j["spec_version"], SPEC_VERSION);
        assert_eq!(j["step_s"], STEP_S);
        assert_eq!(j["window"], WINDOW);
        assert_eq!(j["min_history"], MIN_HISTORY);
        assert_eq!(j["level_samples"], LEVEL_SAMPLES);
        assert_eq!(j["floor_mbps"], FLOOR_MBPS);
        assert_eq!(j["log_ratio_clip"], LOG_RATIO_CLIP);
        assert_eq!(j["log_level_scale"], LOG_LEVEL_SCALE);
        assert_eq!(j["use_time_features"], USE_TIME_FEATURES);
        assert_eq!(j["channels"].as_array().unwrap().len(), CHANNELS);
        assert_eq!(j["output_clip"], OUTPUT_CLIP);
        let hs: Vec<u64> = j["horizons_s"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        let ours: Vec<u64> = Horizon::ALL.iter().map(|h| h.seconds()).collect();
        assert_eq!(hs, ours);
    }

    /// Golden vectors written by the training script: history -> tensor and level.
    #[test]
    fn golden_features() {
        let text = std::fs::read_to_string(models_dir().join("golden/features.json")).unwrap();
        let j: serde_json::Value = serde_json::from_str(&text).unwrap();
        let cases = j["cases"].as_array().unwrap();
        assert!(cases.len() >= 4);
        for c in cases {
            let hist: Vec<f64> = c["history"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            let ft = features(&hist, None).unwrap();
            let want_level = c["level"].as_f64().unwrap();
            assert!(
                (ft.level_mbps - want_level).abs() <= 1e-9 * want_level.max(1.0),
                "{}: level {} vs {}",
                c["name"],
                ft.level_mbps,
                want_level
            );
            let rows = c["features"].as_array().unwrap();
            assert_eq!(rows.len(), WINDOW);
            for (r, row) in rows.iter().enumerate() {
                for (k, v) in row.as_array().unwrap().iter().enumerate() {
                    let want = v.as_f64().unwrap() as f32;
                    let got = ft.data[r * CHANNELS + k];
                    assert!(
                        (got - want).abs() <= 1e-6,
                        "{} row {r} ch {k}: {got} vs {want}",
                        c["name"]
                    );
                }
            }
        }
    }

    #[test]
    fn short_history_is_an_error() {
        assert_eq!(
            features(&[1.0; 5], None),
            Err(PredictError::NotEnoughHistory { have: 5, need: 12 })
        );
    }

    #[test]
    fn bad_samples_are_errors() {
        let mut h = vec![1.0; 20];
        h[7] = f64::NAN;
        assert_eq!(
            features(&h, None),
            Err(PredictError::BadSample { index: 7 })
        );
        h[7] = -1.0;
        assert_eq!(
            features(&h, None),
            Err(PredictError::BadSample { index: 7 })
        );
    }

    #[test]
    fn padding_rows_are_zero_and_valid_rows_marked() {
        let h: Vec<f64> = (0..20).map(|i| 1.0 + i as f64).collect();
        let ft = features(&h, None).unwrap();
        for r in 0..WINDOW - 20 {
            assert!(
                ft.data[r * CHANNELS..(r + 1) * CHANNELS]
                    .iter()
                    .all(|v| *v == 0.0)
            );
        }
        for r in WINDOW - 20..WINDOW {
            assert_eq!(ft.data[r * CHANNELS + 1], 1.0);
        }
        // level: geometric mean of 17, 18, 19, 20
        let want = (17.0f64 * 18.0 * 19.0 * 20.0).powf(0.25);
        assert!((ft.level_mbps - want).abs() < 1e-9);
    }

    #[test]
    fn postprocess_orders_p10_below_mean() {
        let y = [0.1f32, -3.0, 0.0, 0.0, -0.2, 2.0, 9.0, 1.0];
        let out = postprocess(&y, 10.0).unwrap();
        for (m, p) in out {
            assert!(p < m, "{p} < {m}");
        }
        assert!((out[1].0 - 10.0).abs() < 1e-12);
        // mean log-ratio output clipped at 4
        assert!((out[3].0 - 10.0 * 4.0f64.exp()).abs() < 1e-9);
        assert!(postprocess(&y[..3], 1.0).is_err());
        assert!(postprocess(&[f32::NAN; 8], 1.0).is_err());
    }

    #[test]
    fn time_features_known_point() {
        // 1970-01-05 00:00 UTC was a Monday: dow 0, tod 0.
        let t = time_features(4.0 * 86_400.0);
        assert!(t[0].abs() < 1e-12 && (t[1] - 1.0).abs() < 1e-12);
        assert!(t[2].abs() < 1e-12 && (t[3] - 1.0).abs() < 1e-12);
    }
}
