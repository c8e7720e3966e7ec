//! tract-onnx inference of the LSTM exported by `models/pba/export_onnx.py`.
//!
//! The graph is `x [1, 60, 8] -> Transpose -> LSTM (ONNX op) -> Squeeze -> Gemm -> y [1, 8]`;
//! the feature tensor comes from [`crate::features::features`] and the output goes
//! through [`crate::features::postprocess`]. The model bytes are passed in (no file I/O).

use tract_onnx::prelude::*;

use crate::features::{self, CHANNELS, N_OUT, WINDOW};
use crate::{BandwidthPredictor, Forecast, PredictError};

/// Largest model accepted (the committed one is about 290 kB; the target is 2 MB).
pub const MAX_MODEL_BYTES: usize = 4 * 1024 * 1024;

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// More than [`MAX_MODEL_BYTES`].
    #[error("model is {0} bytes, the limit is {MAX_MODEL_BYTES}")]
    TooLarge(usize),
    /// tract could not parse, type or optimise the graph.
    #[error("invalid model: {0}")]
    Invalid(String),
    /// The graph loads but its output does not have the spec's shape.
    #[error("model output has {got} values, the spec needs {want}")]
    WrongOutput {
        /// Values produced.
        got: usize,
        /// Values expected ([`N_OUT`]).
        want: usize,
    },
}

type Plan = std::sync::Arc<TypedRunnableModel>;

/// The LSTM forecaster.
pub struct OnnxPredictor {
    plan: Plan,
}

impl std::fmt::Debug for OnnxPredictor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxPredictor").finish_non_exhaustive()
    }
}

impl OnnxPredictor {
    /// Loads and optimises a model from its bytes, then checks its output shape with one
    /// dry run on a zero tensor.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, LoadError> {
        if bytes.len() > MAX_MODEL_BYTES {
            return Err(LoadError::TooLarge(bytes.len()));
        }
        let inv = |e: TractError| LoadError::Invalid(format!("{e:#}"));
        let plan = tract_onnx::onnx()
            .model_for_read(&mut std::io::Cursor::new(bytes))
            .map_err(inv)?
            .with_input_fact(0, f32::fact([1, WINDOW, CHANNELS]).into())
            .map_err(inv)?
            .into_optimized()
            .map_err(inv)?
            .into_runnable()
            .map_err(inv)?;
        let me = Self { plan };
        let y = me
            .run_raw(&[0.0; WINDOW * CHANNELS])
            .map_err(|e| LoadError::Invalid(e.to_string()))?;
        if y.len() != N_OUT {
            return Err(LoadError::WrongOutput {
                got: y.len(),
                want: N_OUT,
            });
        }
        Ok(me)
    }

    /// Raw model output for one feature tensor (`[WINDOW * CHANNELS]`, row-major).
    pub fn run_raw(&self, features: &[f32]) -> Result<Vec<f32>, PredictError> {
        if features.len() != WINDOW * CHANNELS {
            return Err(PredictError::Inference(format!(
                "feature tensor has {} values, expected {}",
                features.len(),
                WINDOW * CHANNELS
            )));
        }
        let err = |e: TractError| PredictError::Inference(format!("{e:#}"));
        let input = Tensor::from_shape(&[1, WINDOW, CHANNELS], features).map_err(err)?;
        let out = self.plan.run(tvec!(input.into())).map_err(err)?;
        let first = out
            .first()
            .ok_or_else(|| PredictError::BadModelOutput("no output".into()))?;
        let view = first.to_plain_array_view::<f32>().map_err(err)?;
        Ok(view.iter().copied().collect())
    }
}

impl BandwidthPredictor for OnnxPredictor {
    fn name(&self) -> &'static str {
        "lstm"
    }

    fn forecast(
        &self,
        history: &[f64],
        t_last_unix_s: Option<f64>,
    ) -> Result<Forecast, PredictError> {
        let ft = features::features(history, t_last_unix_s)?;
        let y = self.run_raw(&ft.data)?;
        let out = features::postprocess(&y, ft.level_mbps)?;
        Ok(Forecast {
            mean_mbps: out.map(|o| o.0),
            p10_mbps: Some(out.map(|o| o.1)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn models_dir() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models")
    }

    /// tract runs the committed graph (LSTM op and all) and agrees with the training
    /// framework's float32 forward pass on the golden vectors.
    #[test]
    fn committed_model_matches_golden_outputs() {
        let bytes = std::fs::read(models_dir().join("pba_lstm.onnx")).unwrap();
        let p = OnnxPredictor::from_bytes(&bytes).unwrap();
        let text = std::fs::read_to_string(models_dir().join("golden/model.json")).unwrap();
        let j: serde_json::Value = serde_json::from_str(&text).unwrap();
        let tol = j["tolerance"].as_f64().unwrap() as f32;
        let cases = j["cases"].as_array().unwrap();
        assert!(!cases.is_empty());
        for c in cases {
            let feats: Vec<f32> = c["features"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|r| {
                    r.as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_f64().unwrap() as f32)
                })
                .collect();
            let y = p.run_raw(&feats).unwrap();
            let want: Vec<f32> = c["output"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            assert_eq!(y.len(), want.len());
            for (a, b) in y.iter().zip(&want) {
                assert!((a - b).abs() <= tol, "{}: {y:?} vs {want:?}", c["name"]);
            }
            let lvl = c["level"].as_f64().unwrap();
            let out = features::postprocess(&y, lvl).unwrap();
            for (k, o) in out.iter().enumerate() {
                let m = c["mean_mbps"][k].as_f64().unwrap();
                let q = c["p10_mbps"][k].as_f64().unwrap();
                assert!((o.0 - m).abs() <= 1e-3 * m, "{}: mean {k}", c["name"]);
                assert!((o.1 - q).abs() <= 1e-3 * q, "{}: p10 {k}", c["name"]);
            }
        }
    }

    #[test]
    fn garbage_and_oversized_models_are_errors() {
        assert!(matches!(
            OnnxPredictor::from_bytes(b"not an onnx file"),
            Err(LoadError::Invalid(_))
        ));
        let big = vec![0u8; MAX_MODEL_BYTES + 1];
        assert!(matches!(
            OnnxPredictor::from_bytes(&big),
            Err(LoadError::TooLarge(_))
        ));
    }

    #[test]
    fn wrong_tensor_size_is_an_error() {
        let bytes = std::fs::read(models_dir().join("pba_lstm.onnx")).unwrap();
        let p = OnnxPredictor::from_bytes(&bytes).unwrap();
        assert!(p.run_raw(&[0.0; 10]).is_err());
    }
}
