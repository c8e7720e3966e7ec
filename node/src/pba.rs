//! PBA in the node (manual section 2.2.3): the tokio-side driver of `dwcp-prediction`. Per
//! peer it turns raw link measurements into the feature spec's 5 s series, records the series
//! on disk for retraining, runs the forecasting engine (the LSTM when the node is built with
//! the `onnx` feature and the model loads, else the best baseline), tracks its online
//! accuracy, and answers `/v1/pba/...`.
//!
//! ```text
//!  dwcp-net Event::PingRtt ──> Pba::record_rtt ─┐  try_send (bounded; full: dropped, counted)
//!  AMST / speedtest ─────> Pba::record_throughput ┤
//!                                                 v
//!   driver task: per peer Binner (5 s unix grid) ──> closed bin
//!      ├─ RTT (pings, transfers): EWMA, `rtt` sample count       (kept in memory)
//!      └─ bandwidth (transfers): LinkSample ──> SampleStore  <data_dir>/pba/links/<peer>/
//!                                         └──> Engine::handle_sample ──> forecast, accuracy
//!   /v1/pba/{metrics,predictions,retrain} ──> Input (oneshot reply)
//!   retrain: snapshot of the newest N samples ──> python -m pba.train (models/) ──> reload
//! ```
//!
//! What is measured where: RTT comes from libp2p pings (every 15 s per connected peer) and
//! from transfers that report one; bandwidth only from transfers (`record_throughput`). Pings
//! alone give RTT but no bandwidth forecast: the engine needs 12 consecutive 5 s bandwidth
//! bins (a gap longer than 15 s restarts its history), so a link gets a bandwidth forecast
//! while transfers to it run for a minute or more. Callers should report throughput at
//! least every 5 s during a transfer; reports within one bin are averaged. AMST transfers
//! also report their path statistics, read from each stream's `TCP_INFO`
//! (`dwcp_transport::tcpinfo`, every second): the lowest smoothed RTT across streams and the
//! mean loss (segments retransmitted over segments sent). Loss therefore comes only from
//! transfers (pings carry no loss figure). Bins with RTT only are not written to disk: the
//! sample files (the training script's input, `t_unix_ms,mbps,rtt_ms,loss`) need a bandwidth
//! per row.
//!
//! `dwcp_pba_prediction_accuracy` is pooled over links: of the most recent resolved 30 s
//! forecasts (up to 120 per link) of the predictor that answers each link's 30 s horizon,
//! the share whose absolute percentage error is at most 20 % (links count once they have 30
//! resolved forecasts; NaN while none has). See `docs/metrics.md`.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    Json, Router,
    extract::{Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use dwcp_prediction::{
    BandwidthPredictor, Forecast, Horizon, PredictError,
    engine::{self, Engine, LinkForecast, LinkSample},
    features::{MIN_HISTORY, STEP_S},
    store::{self, SampleStore},
};
use dwcp_protocol::NodeId;
use prometheus::{Gauge, IntCounterVec, IntGauge, IntGaugeVec, Registry};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use crate::{api::err, config::PbaSection, daemon::Shared};

/// Inputs queued for the driver; more are dropped (and counted).
pub const QUEUE: usize = 1024;
/// Length of one bin (the feature spec's step), ms.
pub const STEP_MS: u64 = STEP_S * 1000;
/// A bin is closed this long after its end, so a report made just before the boundary and
/// queued briefly still lands in it.
pub const CLOSE_GRACE_MS: u64 = 500;
/// Throughput above this (1 Tbit/s) is a bug in the caller, not a measurement.
pub const MAX_MBPS: f64 = 1e6;
/// RTTs above this are not kept.
pub const MAX_RTT: Duration = Duration::from_secs(60);
/// Weight of a new RTT bin in the RTT estimate (the engine's `rtt_loss_alpha`).
pub const RTT_ALPHA: f64 = 0.3;
/// Resolved 30 s forecasts a link needs before its accuracy counts (the engine's default
/// `min_resolved`).
pub const MIN_RESOLVED: usize = 30;
/// File name of the model under `<data_dir>/pba/model/` after a retrain on this node, and of
/// the shipped model.
pub const MODEL_FILE: &str = "pba_lstm.onnx";
/// Where a package installs the shipped model.
pub const INSTALLED_MODEL: &str = "/usr/share/dwcp/models/pba_lstm.onnx";
/// Where a package installs the training code (`pba/train.py` below it).
pub const INSTALLED_MODELS_DIR: &str = "/usr/share/dwcp/models";

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The `models/` directory of the source tree this binary was built from.
fn source_models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models")
}

// ---------------------------------------------------------------------------------------
// Resampling
// ---------------------------------------------------------------------------------------

/// One closed 5 s bin of a link.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bin {
    /// Start of the bin, unix ms (a multiple of [`STEP_MS`]).
    pub at_ms: u64,
    /// Mean of the throughput reports in the bin, Mbit/s.
    pub mbps: Option<f64>,
    /// Mean of the RTTs measured in the bin, ms.
    pub rtt_ms: Option<f64>,
    /// Mean of the loss ratios measured in the bin (TCP retransmissions of transfers).
    pub loss: Option<f64>,
}

/// A measurement older than the bin being filled (the clock stepped back, or it sat in the
/// queue for longer than a bin).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Late;

/// Resamples one link's raw measurements onto the 5 s unix-time grid of the feature spec:
/// every measurement falls in the bin `[k * 5 s, (k + 1) * 5 s)` holding its timestamp, and
/// a bin's value is the mean of its measurements. Bins without measurements produce nothing
/// (the engine treats a hole longer than 15 s as a break in the series).
#[derive(Debug, Default, Clone)]
pub struct Binner {
    start_ms: Option<u64>,
    mbps_sum: f64,
    mbps_n: u32,
    rtt_sum: f64,
    rtt_n: u32,
    loss_sum: f64,
    loss_n: u32,
}

impl Binner {
    fn take(&mut self) -> Option<Bin> {
        let at_ms = self.start_ms?;
        let b = Bin {
            at_ms,
            mbps: (self.mbps_n > 0).then(|| self.mbps_sum / f64::from(self.mbps_n)),
            rtt_ms: (self.rtt_n > 0).then(|| self.rtt_sum / f64::from(self.rtt_n)),
            loss: (self.loss_n > 0).then(|| self.loss_sum / f64::from(self.loss_n)),
        };
        *self = Self::default();
        (b.mbps.is_some() || b.rtt_ms.is_some() || b.loss.is_some()).then_some(b)
    }

    /// Adds one measurement taken at `at_ms`. Returns the previous bin when this one starts
    /// a later bin; refuses a measurement for a bin already closed.
    pub fn add(
        &mut self,
        at_ms: u64,
        mbps: Option<f64>,
        rtt_ms: Option<f64>,
        loss: Option<f64>,
        closed_until_ms: u64,
    ) -> Result<Option<Bin>, Late> {
        let start = at_ms - at_ms % STEP_MS;
        if start < closed_until_ms {
            return Err(Late);
        }
        let mut closed = None;
        match self.start_ms {
            Some(s) if s == start => {}
            Some(s) if s > start => return Err(Late),
            Some(_) => closed = self.take(),
            None => {}
        }
        self.start_ms = Some(start);
        if let Some(v) = mbps {
            self.mbps_sum += v;
            self.mbps_n += 1;
        }
        if let Some(v) = rtt_ms {
            self.rtt_sum += v;
            self.rtt_n += 1;
        }
        if let Some(v) = loss {
            self.loss_sum += v;
            self.loss_n += 1;
        }
        Ok(closed)
    }

    /// Closes the open bin once `now_ms` is past its end (plus [`CLOSE_GRACE_MS`]).
    pub fn flush(&mut self, now_ms: u64) -> Option<Bin> {
        match self.start_ms {
            Some(s) if now_ms >= s + STEP_MS + CLOSE_GRACE_MS => self.take(),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------
// API shapes
// ---------------------------------------------------------------------------------------

/// State of the forecasting model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelState {
    /// Being read and optimised (at start, after a retrain).
    Loading,
    /// Loaded: the engine runs it and answers with it where it is not worse than the
    /// baselines.
    Loaded,
    /// No model file: baselines only.
    Missing,
    /// The file does not load as a model: baselines only.
    Invalid,
    /// This binary was built without the `onnx` feature: baselines only.
    NotBuilt,
}

/// The model in use, or why there is none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelStatus {
    /// State.
    pub state: ModelState,
    /// The file (or the first place looked at).
    pub path: Option<String>,
    /// File size.
    pub bytes: Option<u64>,
    /// When it was trained, for a model retrained on this node (unix ms). The shipped model
    /// has none and is never considered stale; a retrained one is stale after 7 days.
    pub trained_at_ms: Option<u64>,
    /// One line for operators.
    pub detail: String,
}

/// Where a retrain stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetrainState {
    /// None since start.
    Idle,
    /// The training script runs.
    Running,
    /// The last one produced a model, now in use.
    Succeeded,
    /// The last one failed.
    Failed,
}

/// The retrain job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetrainStatus {
    /// State.
    pub state: RetrainState,
    /// Start (unix ms).
    pub started_at_ms: Option<u64>,
    /// End (unix ms).
    pub finished_at_ms: Option<u64>,
    /// Samples trained on (besides the public traces).
    pub samples: Option<u64>,
    /// The job's directory (sample snapshot, log, outputs).
    pub job_dir: Option<String>,
    /// One line for operators.
    pub detail: String,
}

/// `POST /v1/pba/retrain` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrainRequest {
    /// Train on the newest this many recorded bandwidth samples (default
    /// `pba.training.min_samples`).
    pub samples: Option<u64>,
}

/// `GET /v1/pba/metrics`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PbaStatus {
    /// `dwcp_pba_prediction_accuracy` (see the module docs); `None` until a link has
    /// [`MIN_RESOLVED`] resolved 30 s forecasts.
    pub accuracy: Option<f64>,
    /// Resolved 30 s forecasts behind `accuracy`.
    pub accuracy_resolved: usize,
    /// `pba.accuracy_threshold`.
    pub accuracy_threshold: f64,
    /// The model.
    pub model: ModelStatus,
    /// Links (peers) with samples.
    pub links: usize,
    /// Links with a bandwidth forecast now.
    pub links_forecasting: usize,
    /// Links per predictor answering their 30 s horizon (`model` or a baseline name).
    pub answered_by: BTreeMap<String, usize>,
    /// Forecasts made (one per bandwidth bin of a link with enough history).
    pub predictions: u64,
    /// 5 s bins with bandwidth (recorded on disk).
    pub samples_bandwidth: u64,
    /// 5 s bins with RTT.
    pub samples_rtt: u64,
    /// Inputs dropped, by reason.
    pub dropped: BTreeMap<String, u64>,
    /// Sample directory.
    pub store_dir: String,
    /// Bytes of sample files on disk.
    pub store_bytes: u64,
    /// The retrain job.
    pub retrain: RetrainStatus,
    /// `pba.model.prediction_horizon` in seconds (what placement reads).
    pub prediction_horizon_s: u64,
}

/// One horizon of a link's forecast.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HorizonView {
    /// Horizon in seconds.
    pub horizon_s: u64,
    /// Expected mean bandwidth over the horizon, Mbit/s.
    pub mean_mbps: f64,
    /// 10th percentile of that mean, Mbit/s.
    pub p10_mbps: f64,
    /// Predictor that answered (`model` or a baseline).
    pub predictor: String,
    /// That predictor's accuracy at this horizon on this link (share of resolved forecasts
    /// within 20 %), once resolved forecasts exist.
    pub accuracy: Option<f64>,
    /// Its median absolute percentage error.
    pub median_ape: Option<f64>,
    /// Resolved forecasts behind the two figures.
    pub resolved: usize,
}

/// `GET /v1/pba/predictions`: one link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkPredictions {
    /// The peer.
    pub node: NodeId,
    /// When this answer was made (unix ms).
    pub at_ms: u64,
    /// Bandwidth bins in the current unbroken run (a forecast needs 12).
    pub bandwidth_history: usize,
    /// Bandwidth bins recorded since start.
    pub bandwidth_samples: u64,
    /// RTT bins since start.
    pub rtt_samples: u64,
    /// Expected RTT (EWMA of the RTT bins), ms.
    pub rtt_ms: Option<f64>,
    /// Newest RTT bin, ms.
    pub rtt_last_ms: Option<f64>,
    /// Expected loss ratio (EWMA of the loss bins: TCP segments retransmitted over segments
    /// sent by transfers to this node); absent until a transfer measured it.
    pub loss: Option<f64>,
    /// Age of the newest bandwidth bin, ms.
    pub bandwidth_age_ms: Option<u64>,
    /// Per horizon (30, 60, 120, 300 s); empty without a forecast.
    pub horizons: Vec<HorizonView>,
    /// Why there is no bandwidth forecast.
    pub no_forecast: Option<String>,
    /// This link's `dwcp_pba_prediction_accuracy`.
    pub accuracy: Option<f64>,
    /// Model state (the same for every link).
    pub model: ModelState,
}

/// What placement reads of a link.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkEstimate {
    /// Expected RTT, ms.
    pub rtt_ms: Option<f64>,
    /// `p10 / mean` of the bandwidth forecast at `pba.model.prediction_horizon`, in
    /// `[0, 1]`: 1 for a steady link, low for one whose bandwidth may drop far below its
    /// expected value. `None` without a bandwidth forecast.
    pub quality: Option<f64>,
}

// ---------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct PbaMetrics {
    accuracy: Gauge,
    predictions: IntCounterVec,
    answered_by: IntGaugeVec,
    model_loaded: IntGauge,
    samples: IntCounterVec,
    dropped: IntCounterVec,
    links: IntGauge,
    store_bytes: IntGauge,
    retrains: IntCounterVec,
}

impl PbaMetrics {
    fn new(r: &Registry) -> Result<Self, prometheus::Error> {
        let reg = crate::metrics::Reg(r);
        let accuracy = Gauge::new(
            "dwcp_pba_prediction_accuracy",
            "Share of recent resolved 30 s bandwidth forecasts within 20 % of the actual mean \
             (answering predictor, pooled over links); NaN until a link has 30",
        )?;
        r.register(Box::new(accuracy.clone()))?;
        accuracy.set(f64::NAN);
        let m = Self {
            accuracy,
            predictions: reg.cv(
                "dwcp_pba_predictions_total",
                "Link bandwidth forecasts made, by the predictor answering the 30 s horizon",
                &["predictor"],
            )?,
            answered_by: reg.gv(
                "dwcp_pba_links_answered",
                "Links whose 30 s forecast comes from each predictor now (model or a baseline)",
                &["predictor"],
            )?,
            model_loaded: reg.g(
                "dwcp_pba_model_loaded",
                "1 when the LSTM model is loaded, 0 when PBA runs on baselines only",
            )?,
            samples: reg.cv(
                "dwcp_pba_samples_total",
                "5 s link samples recorded: bandwidth (transfers, written to disk), rtt",
                &["kind"],
            )?,
            dropped: reg.cv(
                "dwcp_pba_inputs_dropped_total",
                "Link measurements dropped: queue_full, invalid, late, store_error",
                &["reason"],
            )?,
            links: reg.g("dwcp_pba_links", "Links (peers) PBA keeps samples of")?,
            store_bytes: reg.g(
                "dwcp_pba_store_bytes",
                "Bytes of recorded sample files under <data_dir>/pba/links",
            )?,
            retrains: reg.cv(
                "dwcp_pba_retrains_total",
                "Retrain requests: refused, started, succeeded, failed",
                &["result"],
            )?,
        };
        Ok(m)
    }
}

// ---------------------------------------------------------------------------------------
// Model loading
// ---------------------------------------------------------------------------------------

/// The engine wants an owned predictor per link; links share one loaded model.
struct SharedModel(Arc<dyn BandwidthPredictor>);

impl BandwidthPredictor for SharedModel {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn forecast(&self, h: &[f64], t: Option<f64>) -> Result<Forecast, PredictError> {
        self.0.forecast(h, t)
    }
}

type Model = Option<Arc<dyn BandwidthPredictor>>;

/// The model file to use: `pba.model.path` when set; else a model retrained on this node;
/// else the installed one; else the one in the source tree the binary was built from.
pub fn model_candidates(cfg: &PbaSection, pba_dir: &Path) -> Vec<PathBuf> {
    if !cfg.model.path.as_os_str().is_empty() {
        return vec![cfg.model.path.clone()];
    }
    vec![
        pba_dir.join("model").join(MODEL_FILE),
        PathBuf::from(INSTALLED_MODEL),
        source_models_dir().join(MODEL_FILE),
    ]
}

/// Loads the first model file that exists. Never an error: a missing or broken model means
/// baselines, with a status that says why.
fn load_model(candidates: &[PathBuf], retrained: &Path) -> (Model, ModelStatus) {
    let Some(path) = candidates.iter().find(|p| p.is_file()) else {
        let list: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
        return (
            None,
            ModelStatus {
                state: ModelState::Missing,
                path: candidates.first().map(|p| p.display().to_string()),
                bytes: None,
                trained_at_ms: None,
                detail: format!(
                    "no model file (looked at {}): forecasts come from the best baseline",
                    list.join(", ")
                ),
            },
        );
    };
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => {
            return (
                None,
                ModelStatus {
                    state: ModelState::Invalid,
                    path: Some(path.display().to_string()),
                    bytes: None,
                    trained_at_ms: None,
                    detail: format!("reading the model failed: {e}; baselines only"),
                },
            );
        }
    };
    let trained_at_ms = (path == retrained)
        .then(|| std::fs::metadata(path).and_then(|m| m.modified()).ok())
        .flatten()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64);
    let status = |state, detail: String| ModelStatus {
        state,
        path: Some(path.display().to_string()),
        bytes: Some(bytes.len() as u64),
        trained_at_ms,
        detail,
    };
    #[cfg(feature = "onnx")]
    {
        match dwcp_prediction::onnx::OnnxPredictor::from_bytes(&bytes) {
            Ok(p) => {
                let m: Arc<dyn BandwidthPredictor> = Arc::new(p);
                (
                    Some(m),
                    status(
                        ModelState::Loaded,
                        format!(
                            "LSTM loaded ({} bytes); each horizon falls back to the best baseline while the model does worse on the link's recent data",
                            bytes.len()
                        ),
                    ),
                )
            }
            Err(e) => (
                None,
                status(
                    ModelState::Invalid,
                    format!("the model does not load: {e}; baselines only"),
                ),
            ),
        }
    }
    #[cfg(not(feature = "onnx"))]
    {
        (
            None,
            status(
                ModelState::NotBuilt,
                "this dwcp-node was built without the `onnx` feature: baselines only".into(),
            ),
        )
    }
}

// ---------------------------------------------------------------------------------------
// The driver
// ---------------------------------------------------------------------------------------

enum Input {
    Measure {
        peer: NodeId,
        at_ms: u64,
        mbps: Option<f64>,
        rtt_ms: Option<f64>,
        loss: Option<f64>,
    },
    Status(oneshot::Sender<PbaStatus>),
    Predictions {
        node: Option<String>,
        reply: oneshot::Sender<Result<Vec<LinkPredictions>, String>>,
    },
    /// Newest recorded bandwidth samples of every link, at most `max` (retrain snapshot).
    Snapshot {
        max: usize,
        reply: oneshot::Sender<Vec<(NodeId, Vec<LinkSample>)>>,
    },
    ModelLoaded(Model, ModelStatus),
}

struct Link {
    binner: Binner,
    closed_until_ms: u64,
    engine: Engine,
    store: Option<SampleStore>,
    rtt: Option<f64>,
    rtt_last: Option<f64>,
    rtt_bins: u64,
    loss: Option<f64>,
    bw_bins: u64,
    last_bw_ms: Option<u64>,
    last_seen_ms: u64,
    forecast: Option<LinkForecast>,
    no_forecast: Option<String>,
}

struct Driver {
    cfg: PbaSection,
    dir: PathBuf,
    links: BTreeMap<NodeId, Link>,
    model: Model,
    model_status: ModelStatus,
    metrics: PbaMetrics,
    predictions: u64,
    samples_bw: u64,
    samples_rtt: u64,
    retrain: Arc<Mutex<RetrainStatus>>,
    estimates: watch::Sender<Arc<BTreeMap<NodeId, LinkEstimate>>>,
    horizon: Horizon,
    store_bytes: u64,
    engine_cfg: engine::Config,
}

fn boxed(model: &Model) -> Option<Box<dyn BandwidthPredictor>> {
    model
        .clone()
        .map(|m| Box::new(SharedModel(m)) as Box<dyn BandwidthPredictor>)
}

fn dir_bytes(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

impl Driver {
    fn links_dir(&self) -> PathBuf {
        self.dir.join("links")
    }

    /// Starts tracking `peer` if it is new; false when its engine cannot be made.
    fn ensure_link(&mut self, peer: NodeId, now_ms: u64) -> bool {
        if let Some(l) = self.links.get_mut(&peer) {
            l.last_seen_ms = now_ms;
            return true;
        }
        {
            if self.links.len() >= self.cfg.samples.max_links {
                // Forget the link heard from least recently (its files stay until pruned).
                if let Some(old) = self
                    .links
                    .iter()
                    .min_by_key(|(_, l)| l.last_seen_ms)
                    .map(|(id, _)| *id)
                {
                    self.links.remove(&old);
                }
            }
            self.prune_dirs(&peer);
            let seg = self.cfg.samples.segment_kib.saturating_mul(1024);
            let total = self
                .cfg
                .samples
                .max_mib_per_link
                .saturating_mul(1024 * 1024);
            let store = match SampleStore::open(self.links_dir().join(peer.to_string()), seg, total)
            {
                Ok(s) => Some(s),
                Err(e) => {
                    warn!(peer = %peer.short(), error = %e, "opening the PBA sample store failed; samples of this link are not recorded");
                    None
                }
            };
            let trained = self.model_status.trained_at_ms;
            let engine = match Engine::new(self.engine_cfg.clone(), boxed(&self.model), trained) {
                Ok(e) => e,
                Err(e) => {
                    warn!(error = %e, "PBA engine config refused");
                    return false;
                }
            };
            self.links.insert(
                peer,
                Link {
                    binner: Binner::default(),
                    closed_until_ms: 0,
                    engine,
                    store,
                    rtt: None,
                    rtt_last: None,
                    rtt_bins: 0,
                    loss: None,
                    bw_bins: 0,
                    last_bw_ms: None,
                    last_seen_ms: now_ms,
                    forecast: None,
                    no_forecast: None,
                },
            );
            self.metrics.links.set(self.links.len() as i64);
        }
        true
    }

    /// Keeps at most `max_links` link directories on disk: the least recently written ones
    /// of peers not tracked now go first.
    fn prune_dirs(&self, keep: &NodeId) {
        let Ok(rd) = std::fs::read_dir(self.links_dir()) else {
            return;
        };
        let mut dirs: Vec<(SystemTime, PathBuf, String)> = rd
            .flatten()
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                m.is_dir().then(|| {
                    (
                        m.modified().unwrap_or(UNIX_EPOCH),
                        e.path(),
                        e.file_name().to_string_lossy().into_owned(),
                    )
                })
            })
            .collect();
        let max = self.cfg.samples.max_links;
        if dirs.len() < max {
            return;
        }
        dirs.sort();
        let mut excess = dirs.len() + 1 - max;
        for (_, path, name) in dirs {
            if excess == 0 {
                break;
            }
            let live = name
                .parse::<NodeId>()
                .is_ok_and(|id| id == *keep || self.links.contains_key(&id));
            if !live && std::fs::remove_dir_all(&path).is_ok() {
                excess -= 1;
            }
        }
    }

    fn measure(
        &mut self,
        peer: NodeId,
        at_ms: u64,
        mbps: Option<f64>,
        rtt_ms: Option<f64>,
        loss: Option<f64>,
    ) {
        let now = wall_ms();
        if !self.ensure_link(peer, now) {
            return;
        }
        let Some(l) = self.links.get_mut(&peer) else {
            return;
        };
        let closed_until = l.closed_until_ms;
        match l.binner.add(at_ms, mbps, rtt_ms, loss, closed_until) {
            Ok(Some(bin)) => self.close(peer, bin, now),
            Ok(None) => {}
            Err(Late) => self.metrics.dropped.with_label_values(&["late"]).inc(),
        }
    }

    fn tick(&mut self) {
        let now = wall_ms();
        let due: Vec<(NodeId, Bin)> = self
            .links
            .iter_mut()
            .filter_map(|(id, l)| l.binner.flush(now).map(|b| (*id, b)))
            .collect();
        for (id, b) in due {
            self.close(id, b, now);
        }
    }

    fn close(&mut self, peer: NodeId, bin: Bin, now_ms: u64) {
        let Some(l) = self.links.get_mut(&peer) else {
            return;
        };
        l.closed_until_ms = bin.at_ms + STEP_MS;
        if let Some(r) = bin.rtt_ms {
            l.rtt = Some(l.rtt.map_or(r, |e| RTT_ALPHA * r + (1.0 - RTT_ALPHA) * e));
            l.rtt_last = Some(r);
            l.rtt_bins += 1;
            self.samples_rtt += 1;
            self.metrics.samples.with_label_values(&["rtt"]).inc();
        }
        if let Some(x) = bin.loss {
            l.loss = Some(l.loss.map_or(x, |e| RTT_ALPHA * x + (1.0 - RTT_ALPHA) * e));
        }
        let Some(mbps) = bin.mbps else {
            self.publish_estimates();
            return;
        };
        let s = LinkSample {
            at_ms: bin.at_ms,
            mbps,
            rtt_ms: bin.rtt_ms,
            loss: bin.loss,
        };
        if let Err(e) = l.engine.handle_sample(s) {
            warn!(peer = %peer.short(), error = %e, "PBA refused a link sample");
            self.metrics.dropped.with_label_values(&["invalid"]).inc();
            return;
        }
        l.bw_bins += 1;
        l.last_bw_ms = Some(bin.at_ms);
        self.samples_bw += 1;
        self.metrics.samples.with_label_values(&["bandwidth"]).inc();
        if let Some(st) = l.store.as_mut()
            && let Err(e) = st.append(&s)
        {
            warn!(peer = %peer.short(), error = %e, "recording a PBA sample failed");
            self.metrics
                .dropped
                .with_label_values(&["store_error"])
                .inc();
        }
        if l.engine.history_len() >= MIN_HISTORY {
            match l.engine.forecast(now_ms) {
                Ok(f) => {
                    self.predictions += 1;
                    self.metrics
                        .predictions
                        .with_label_values(&[f.get(Horizon::S30).source])
                        .inc();
                    l.forecast = Some(f);
                    l.no_forecast = None;
                }
                Err(e) => {
                    l.forecast = None;
                    l.no_forecast = Some(e.to_string());
                }
            }
        } else {
            l.forecast = None;
        }
        self.refresh_accuracy();
        self.publish_estimates();
    }

    /// A link's forecast is current while its newest bandwidth bin is at most 15 s old (the
    /// engine's gap rule); after that the link has no bandwidth forecast.
    fn current(l: &Link, now_ms: u64) -> Option<&LinkForecast> {
        let fresh = l
            .last_bw_ms
            .is_some_and(|t| now_ms.saturating_sub(t) <= 4 * STEP_MS + CLOSE_GRACE_MS);
        l.forecast.as_ref().filter(|_| fresh)
    }

    /// Pooled accuracy (see the module docs) and the resolved forecasts behind it.
    fn accuracy(&self) -> (Option<f64>, usize) {
        let (mut hits, mut n) = (0.0, 0usize);
        for l in self.links.values() {
            let Some(f) = &l.forecast else { continue };
            if let Some(s) = l
                .engine
                .stats(f.get(Horizon::S30).source, Horizon::S30)
                .filter(|s| s.count >= MIN_RESOLVED)
            {
                hits += s.accuracy * s.count as f64;
                n += s.count;
            }
        }
        ((n > 0).then(|| hits / n as f64), n)
    }

    fn answered_by(&self, now_ms: u64) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for l in self.links.values() {
            if let Some(f) = Self::current(l, now_ms) {
                *m.entry(f.get(Horizon::S30).source.to_owned()).or_default() += 1;
            }
        }
        m
    }

    fn refresh_accuracy(&self) {
        let now = wall_ms();
        self.metrics
            .accuracy
            .set(self.accuracy().0.unwrap_or(f64::NAN));
        self.metrics.answered_by.reset();
        for (p, n) in self.answered_by(now) {
            self.metrics
                .answered_by
                .with_label_values(&[p.as_str()])
                .set(n as i64);
        }
    }

    fn publish_estimates(&self) {
        let now = wall_ms();
        let h = self.horizon;
        let map: BTreeMap<NodeId, LinkEstimate> = self
            .links
            .iter()
            .map(|(id, l)| {
                let quality = Self::current(l, now).map(|f| {
                    let hf = f.get(h);
                    if hf.mean_mbps > 0.0 {
                        (hf.p10_mbps / hf.mean_mbps).clamp(0.0, 1.0)
                    } else {
                        0.0
                    }
                });
                (
                    *id,
                    LinkEstimate {
                        rtt_ms: l.rtt,
                        quality,
                    },
                )
            })
            .collect();
        self.estimates.send_replace(Arc::new(map));
    }

    fn status(&self) -> PbaStatus {
        let now = wall_ms();
        let (accuracy, resolved) = self.accuracy();
        let mut dropped = BTreeMap::new();
        for r in ["queue_full", "invalid", "late", "store_error"] {
            dropped.insert(
                r.to_owned(),
                self.metrics.dropped.with_label_values(&[r]).get(),
            );
        }
        PbaStatus {
            accuracy,
            accuracy_resolved: resolved,
            accuracy_threshold: self.cfg.accuracy_threshold,
            model: self.model_status.clone(),
            links: self.links.len(),
            links_forecasting: self
                .links
                .values()
                .filter(|l| Self::current(l, now).is_some())
                .count(),
            answered_by: self.answered_by(now),
            predictions: self.predictions,
            samples_bandwidth: self.samples_bw,
            samples_rtt: self.samples_rtt,
            dropped,
            store_dir: self.links_dir().display().to_string(),
            store_bytes: self.store_bytes,
            retrain: lock(&self.retrain).clone(),
            prediction_horizon_s: self.horizon.seconds(),
        }
    }

    fn predictions(&self, node: Option<&str>) -> Result<Vec<LinkPredictions>, String> {
        let now = wall_ms();
        let ids: Vec<NodeId> = match node {
            None => self.links.keys().copied().collect(),
            Some(text) => vec![self.resolve(text)?],
        };
        Ok(ids
            .into_iter()
            .filter_map(|id| self.links.get(&id).map(|l| self.view(id, l, now)))
            .collect())
    }

    fn resolve(&self, text: &str) -> Result<NodeId, String> {
        let id = text.parse::<NodeId>().ok().or_else(|| {
            text.parse::<libp2p::PeerId>()
                .ok()
                .and_then(|p| NodeId::from_peer_id(&p).ok())
        });
        if let Some(id) = id {
            return if self.links.contains_key(&id) {
                Ok(id)
            } else {
                Err(format!(
                    "no link samples of node {} yet: PBA learns a link from pings to a connected peer and from transfers",
                    id.short()
                ))
            };
        }
        let lower = text.to_ascii_lowercase();
        if lower.len() < 4 || !lower.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!(
                "`{text}` is not a node id, peer id or hex prefix (4+ characters)"
            ));
        }
        let hits: Vec<NodeId> = self
            .links
            .keys()
            .filter(|id| id.to_string().starts_with(&lower))
            .copied()
            .collect();
        match hits.as_slice() {
            [one] => Ok(*one),
            [] => Err(format!("no link samples of a node matching {text}")),
            many => Err(format!("{} links match prefix {text}", many.len())),
        }
    }

    fn view(&self, id: NodeId, l: &Link, now_ms: u64) -> LinkPredictions {
        let current = Self::current(l, now_ms);
        let horizons = current
            .map(|f| {
                f.horizons
                    .iter()
                    .map(|h| {
                        let st = l.engine.stats(h.source, h.horizon);
                        HorizonView {
                            horizon_s: h.horizon.seconds(),
                            mean_mbps: h.mean_mbps,
                            p10_mbps: h.p10_mbps,
                            predictor: h.source.to_owned(),
                            accuracy: st.map(|s| s.accuracy),
                            median_ape: st.map(|s| s.median_ape),
                            resolved: st.map_or(0, |s| s.count),
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        let no_forecast = if current.is_some() {
            None
        } else if l.bw_bins == 0 {
            Some(
                "no bandwidth samples: pings measure RTT only; bandwidth comes from transfers to this node".into(),
            )
        } else if l.forecast.is_some() || l.engine.history_len() >= MIN_HISTORY {
            Some(format!(
                "the newest bandwidth sample is {} s old: no transfer running",
                now_ms.saturating_sub(l.last_bw_ms.unwrap_or(0)) / 1000
            ))
        } else {
            Some(l.no_forecast.clone().unwrap_or_else(|| {
                format!(
                    "{} consecutive 5 s bandwidth samples, a forecast needs {MIN_HISTORY}",
                    l.engine.history_len()
                )
            }))
        };
        let accuracy = current.and_then(|f| {
            l.engine
                .stats(f.get(Horizon::S30).source, Horizon::S30)
                .filter(|s| s.count >= MIN_RESOLVED)
                .map(|s| s.accuracy)
        });
        LinkPredictions {
            node: id,
            at_ms: now_ms,
            bandwidth_history: l.engine.history_len(),
            bandwidth_samples: l.bw_bins,
            rtt_samples: l.rtt_bins,
            rtt_ms: l.rtt,
            rtt_last_ms: l.rtt_last,
            loss: l.loss,
            bandwidth_age_ms: l.last_bw_ms.map(|t| now_ms.saturating_sub(t)),
            horizons,
            no_forecast,
            accuracy,
            model: self.model_status.state,
        }
    }

    fn snapshot(&self, max: usize) -> Vec<(NodeId, Vec<LinkSample>)> {
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir(self.links_dir()) else {
            return out;
        };
        for e in rd.flatten() {
            let Ok(id) = e.file_name().to_string_lossy().parse::<NodeId>() else {
                continue;
            };
            match store::read_all(&e.path(), max) {
                Ok(v) if !v.is_empty() => out.push((id, v)),
                Ok(_) => {}
                Err(err) => warn!(peer = %id.short(), error = %err, "reading PBA samples failed"),
            }
        }
        out
    }

    fn set_model(&mut self, model: Model, status: ModelStatus) {
        info!(state = ?status.state, detail = %status.detail, "PBA model");
        self.metrics
            .model_loaded
            .set(i64::from(status.state == ModelState::Loaded));
        let trained = status.trained_at_ms;
        for l in self.links.values_mut() {
            l.engine.set_model(boxed(&model), trained);
        }
        self.model = model;
        self.model_status = status;
    }

    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Input>,
        mut stop: watch::Receiver<bool>,
        load: Vec<PathBuf>,
    ) {
        let retrained = self.dir.join("model").join(MODEL_FILE);
        match tokio::task::spawn_blocking(move || load_model(&load, &retrained)).await {
            Ok((m, s)) => self.set_model(m, s),
            Err(e) => warn!(error = %e, "loading the PBA model panicked; baselines only"),
        }
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut n = 0u64;
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                _ = tick.tick() => {
                    self.tick();
                    if n.is_multiple_of(60) {
                        self.store_bytes = dir_bytes(&self.links_dir());
                        self.metrics.store_bytes.set(self.store_bytes as i64);
                        self.refresh_accuracy();
                    }
                    n += 1;
                }
                i = rx.recv() => match i {
                    None => break,
                    Some(Input::Measure { peer, at_ms, mbps, rtt_ms, loss }) => self.measure(peer, at_ms, mbps, rtt_ms, loss),
                    Some(Input::Status(reply)) => { let _ = reply.send(self.status()); }
                    Some(Input::Predictions { node, reply }) => {
                        let _ = reply.send(self.predictions(node.as_deref()));
                    }
                    Some(Input::Snapshot { max, reply }) => { let _ = reply.send(self.snapshot(max)); }
                    Some(Input::ModelLoaded(m, s)) => self.set_model(m, s),
                },
            }
        }
    }
}

fn lock(m: &Mutex<RetrainStatus>) -> std::sync::MutexGuard<'_, RetrainStatus> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------------------------------
// The handle
// ---------------------------------------------------------------------------------------

/// The PBA service (one per node, in [`Shared`]).
#[derive(Debug, Clone)]
pub struct Pba {
    tx: mpsc::Sender<Input>,
    dropped: IntCounterVec,
    retrains: IntCounterVec,
    estimates: watch::Receiver<Arc<BTreeMap<NodeId, LinkEstimate>>>,
    retrain: Arc<Mutex<RetrainStatus>>,
    cfg: PbaSection,
    dir: PathBuf,
}

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("pba::Input")
    }
}

/// Everything the driver needs.
#[derive(Debug)]
pub struct PbaSetup<'a> {
    /// `pba:` configuration.
    pub cfg: &'a PbaSection,
    /// The node's data directory (samples go to `<data_dir>/pba/`).
    pub data_dir: &'a Path,
    /// Where the metrics go.
    pub registry: &'a Registry,
    /// Turns true at shutdown.
    pub stop: watch::Receiver<bool>,
}

/// Starts the driver (`None` when `pba.enabled` is false). The model loads in the background:
/// until it has, forecasts come from the baselines.
pub fn spawn(setup: PbaSetup<'_>) -> anyhow::Result<Option<(Pba, tokio::task::JoinHandle<()>)>> {
    let PbaSetup {
        cfg,
        data_dir,
        registry,
        stop,
    } = setup;
    if !cfg.enabled {
        return Ok(None);
    }
    let dir = data_dir.join("pba");
    let metrics = PbaMetrics::new(registry)?;
    let (tx, rx) = mpsc::channel(QUEUE);
    let (est_tx, est_rx) = watch::channel(Arc::new(BTreeMap::new()));
    let retrain = Arc::new(Mutex::new(RetrainStatus {
        state: RetrainState::Idle,
        started_at_ms: None,
        finished_at_ms: None,
        samples: None,
        job_dir: None,
        detail: "no retrain since start".into(),
    }));
    let load = model_candidates(cfg, &dir);
    let d = Driver {
        cfg: cfg.clone(),
        dir: dir.clone(),
        links: BTreeMap::new(),
        model: None,
        model_status: ModelStatus {
            state: ModelState::Loading,
            path: load.first().map(|p| p.display().to_string()),
            bytes: None,
            trained_at_ms: None,
            detail: "loading".into(),
        },
        metrics: metrics.clone(),
        predictions: 0,
        samples_bw: 0,
        samples_rtt: 0,
        retrain: retrain.clone(),
        estimates: est_tx,
        horizon: horizon_of(cfg.model.prediction_horizon),
        store_bytes: 0,
        engine_cfg: engine::Config::default().validate()?,
    };
    let task = tokio::spawn(d.run(rx, stop, load));
    Ok(Some((
        Pba {
            tx,
            dropped: metrics.dropped,
            retrains: metrics.retrains,
            estimates: est_rx,
            retrain,
            cfg: cfg.clone(),
            dir,
        },
        task,
    )))
}

/// The horizon a validated `pba.model.prediction_horizon` names.
pub fn horizon_of(d: Duration) -> Horizon {
    Horizon::covering(d.as_secs_f64())
}

impl Pba {
    fn offer(&self, i: Input) {
        if self.tx.try_send(i).is_err() {
            self.dropped.with_label_values(&["queue_full"]).inc();
        }
    }

    /// A bulk-transfer throughput sample to `peer` (non-blocking: dropped and counted when
    /// the driver's queue is full). Report at least every 5 s while a transfer runs; reports
    /// within one 5 s bin are averaged. Invalid values (negative, not finite, above 1 Tbit/s)
    /// are dropped and counted.
    pub fn record_throughput(
        &self,
        peer: &NodeId,
        bits_per_sec: f64,
        rtt: Option<std::time::Duration>,
        loss: Option<f64>,
    ) {
        let mbps = bits_per_sec / 1e6;
        if !(mbps.is_finite() && (0.0..=MAX_MBPS).contains(&mbps)) {
            self.dropped.with_label_values(&["invalid"]).inc();
            return;
        }
        self.offer(Input::Measure {
            peer: *peer,
            at_ms: wall_ms(),
            mbps: Some(mbps),
            rtt_ms: rtt.filter(|r| *r <= MAX_RTT).map(|r| r.as_secs_f64() * 1e3),
            loss: loss.filter(|x| (0.0..=1.0).contains(x)),
        });
    }

    /// A ping round trip to `peer` (non-blocking, like [`Pba::record_throughput`]).
    pub fn record_rtt(&self, peer: &NodeId, rtt: Duration) {
        if rtt > MAX_RTT {
            self.dropped.with_label_values(&["invalid"]).inc();
            return;
        }
        self.offer(Input::Measure {
            peer: *peer,
            at_ms: wall_ms(),
            mbps: None,
            rtt_ms: Some(rtt.as_secs_f64() * 1e3),
            loss: None,
        });
    }

    /// What placement reads of a link: expected RTT and link quality, if known.
    pub fn link(&self, peer: &NodeId) -> Option<LinkEstimate> {
        self.estimates.borrow().get(peer).copied()
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Input) -> anyhow::Result<T> {
        let (tx, rx) = oneshot::channel();
        tokio::time::timeout(Duration::from_secs(5), self.tx.send(make(tx)))
            .await
            .map_err(|_| anyhow::anyhow!("the PBA driver is busy"))?
            .map_err(|_| anyhow::anyhow!("the PBA driver stopped"))?;
        tokio::time::timeout(Duration::from_secs(10), rx)
            .await
            .map_err(|_| anyhow::anyhow!("the PBA driver did not answer"))?
            .map_err(|_| anyhow::anyhow!("the PBA driver stopped"))
    }

    /// `GET /v1/pba/metrics`.
    pub async fn status(&self) -> anyhow::Result<PbaStatus> {
        self.ask(Input::Status).await
    }

    /// `GET /v1/pba/predictions`: every link, or the one `node` names.
    pub async fn predictions(
        &self,
        node: Option<String>,
    ) -> anyhow::Result<Result<Vec<LinkPredictions>, String>> {
        self.ask(|reply| Input::Predictions { node, reply }).await
    }

    fn refuse(&self, code: StatusCode, why: String) -> Result<RetrainStatus, (StatusCode, String)> {
        self.retrains.with_label_values(&["refused"]).inc();
        Err((code, why))
    }

    /// `POST /v1/pba/retrain`: checks that a retrain can run, then starts the training script
    /// in the background and answers at once. Refused, saying why, when a retrain runs, too
    /// few samples are recorded, the node cannot run a model, or the script or its Python
    /// packages are missing.
    pub async fn retrain(
        &self,
        req: RetrainRequest,
    ) -> Result<RetrainStatus, (StatusCode, String)> {
        let t = &self.cfg.training;
        let want = req.samples.unwrap_or(t.min_samples);
        let before = {
            let mut g = lock(&self.retrain);
            if g.state == RetrainState::Running {
                let why = format!(
                    "a retrain is already running (log: {})",
                    g.job_dir.clone().unwrap_or_default()
                );
                drop(g);
                return self.refuse(StatusCode::CONFLICT, why);
            }
            // Claim the slot while checking; given back below on refusal.
            let before = g.clone();
            g.state = RetrainState::Running;
            g.detail = "checking whether a retrain can run".into();
            before
        };
        // In a task of its own: a client that hangs up must not leave the slot claimed.
        let me = self.clone();
        let res = tokio::spawn(async move {
            let r = me.check_and_start(want).await;
            if r.is_err() {
                *lock(&me.retrain) = before;
            }
            r
        })
        .await
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        match res {
            Ok(s) => Ok(s),
            Err((code, why)) => self.refuse(code, why),
        }
    }

    async fn check_and_start(&self, want: u64) -> Result<RetrainStatus, (StatusCode, String)> {
        let t = &self.cfg.training;
        let unproc = |s: String| (StatusCode::UNPROCESSABLE_ENTITY, s);
        if want < t.min_samples {
            return Err(unproc(format!(
                "--samples {want} is below pba.training.min_samples ({}): a model trained on fewer of this node's samples is not retrained",
                t.min_samples
            )));
        }
        let snap = self
            .ask(|reply| Input::Snapshot {
                max: usize::try_from(want).unwrap_or(usize::MAX),
                reply,
            })
            .await
            .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
        let have: u64 = snap.iter().map(|(_, v)| v.len() as u64).sum();
        if have < want {
            return Err(unproc(format!(
                "only {have} bandwidth samples are recorded on this node, {want} requested: samples come from transfers (5 s bins; pings give RTT only), under {}",
                self.dir.join("links").display()
            )));
        }
        if !cfg!(feature = "onnx") {
            return Err(unproc(
                "this dwcp-node was built without the `onnx` feature: it could not run a retrained model".into(),
            ));
        }
        let models_dir = if t.models_dir.as_os_str().is_empty() {
            [source_models_dir(), PathBuf::from(INSTALLED_MODELS_DIR)]
                .into_iter()
                .find(|d| d.join("pba/train.py").is_file())
        } else {
            Some(t.models_dir.clone()).filter(|d| d.join("pba/train.py").is_file())
        };
        let Some(models_dir) = models_dir else {
            return Err(unproc(format!(
                "the training script (pba/train.py) is not installed: set pba.training.models_dir to the repository's models/ directory (looked in {})",
                if t.models_dir.as_os_str().is_empty() {
                    format!(
                        "{} and {INSTALLED_MODELS_DIR}",
                        source_models_dir().display()
                    )
                } else {
                    t.models_dir.display().to_string()
                }
            )));
        };
        let traces = if t.traces_dir.as_os_str().is_empty() {
            std::env::var_os("DWCP_TRACES")
                .map(PathBuf::from)
                .unwrap_or_else(|| models_dir.join("../../shared/data/traces"))
        } else {
            t.traces_dir.clone()
        };
        if !traces.join("derived_5s").is_dir() {
            return Err(unproc(format!(
                "the public traces are not at {} (derived_5s/ missing): set pba.training.traces_dir",
                traces.display()
            )));
        }
        let probe = tokio::time::timeout(
            // within the CLI's 60 s request timeout
            Duration::from_secs(45),
            tokio::process::Command::new(&t.python)
                .args(["-c", "import jax, onnx, numpy"])
                .kill_on_drop(true)
                .output(),
        )
        .await;
        match probe {
            Ok(Ok(o)) if o.status.success() => {}
            Ok(Ok(o)) => {
                let err = String::from_utf8_lossy(&o.stderr);
                return Err(unproc(format!(
                    "the Python packages for training are missing ({}: {}); install them with `{} -m pip install -r {}/requirements.txt` (a venv is best) and point pba.training.python at it",
                    t.python.display(),
                    err.lines().last().unwrap_or("import failed"),
                    t.python.display(),
                    models_dir.display()
                )));
            }
            Ok(Err(e)) => {
                return Err(unproc(format!(
                    "cannot run {} ({e}): set pba.training.python",
                    t.python.display()
                )));
            }
            Err(_) => {
                return Err(unproc(format!(
                    "{} did not import jax, onnx and numpy within 45 s",
                    t.python.display()
                )));
            }
        }
        // Snapshot the newest `want` samples over all links, one file per link.
        let mut all: Vec<(u64, usize, usize)> = Vec::new();
        for (li, (_, v)) in snap.iter().enumerate() {
            for (si, s) in v.iter().enumerate() {
                all.push((s.at_ms, li, si));
            }
        }
        all.sort_unstable();
        let keep = all.split_off(all.len().saturating_sub(want as usize));
        let started = wall_ms();
        let job = self.dir.join("retrain").join(started.to_string());
        let io = |e: std::io::Error| {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("writing the retrain job under {}: {e}", job.display()),
            )
        };
        std::fs::create_dir_all(&job).map_err(io)?;
        let mut per_link: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (_, li, si) in keep {
            per_link.entry(li).or_default().push(si);
        }
        let mut files = Vec::new();
        for (li, idx) in per_link {
            let (id, v) = &snap[li];
            let mut text = format!("{}\n", store::HEADER);
            for si in idx {
                let s = &v[si];
                text.push_str(&format!(
                    "{},{},{},{}\n",
                    s.at_ms,
                    s.mbps,
                    s.rtt_ms.map(|x| x.to_string()).unwrap_or_default(),
                    s.loss.map(|x| x.to_string()).unwrap_or_default()
                ));
            }
            let f = job.join(format!("samples-{id}.csv"));
            std::fs::write(&f, text).map_err(io)?;
            files.push(f);
        }
        let log = std::fs::File::create(job.join("train.log")).map_err(io)?;
        let log2 = log.try_clone().map_err(io)?;
        let out = job.join(MODEL_FILE);
        let mut cmd = tokio::process::Command::new(&t.python);
        cmd.current_dir(&models_dir)
            .args(["-m", "pba.train", "--epochs"])
            .arg(t.epochs.to_string())
            .arg("--traces")
            .arg(&traces)
            .arg("--out")
            .arg(&out)
            .arg("--metrics")
            .arg(job.join("metrics.json"))
            .arg("--golden")
            .arg(job.join("golden"))
            .arg("--save-params")
            .arg(job.join("params.npz"))
            .arg("--split-out")
            .arg(job.join("validation_traces.txt"))
            .arg("--samples")
            .args(&files)
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| {
            unproc(format!(
                "starting {} -m pba.train failed: {e}",
                t.python.display()
            ))
        })?;
        let status = RetrainStatus {
            state: RetrainState::Running,
            started_at_ms: Some(started),
            finished_at_ms: None,
            samples: Some(want),
            job_dir: Some(job.display().to_string()),
            detail: format!(
                "training on the public traces and {want} samples of this node ({} epochs); log: {}",
                t.epochs,
                job.join("train.log").display()
            ),
        };
        *lock(&self.retrain) = status.clone();
        self.retrains.with_label_values(&["started"]).inc();
        info!(job = %job.display(), samples = want, "PBA retrain started");
        let me = self.clone();
        let timeout = t.timeout;
        tokio::spawn(async move {
            let res = tokio::time::timeout(timeout, child.wait()).await;
            let outcome: Result<(), String> = match res {
                Err(_) => {
                    let _ = child.kill().await;
                    Err(format!(
                        "timed out after {}",
                        humantime::format_duration(timeout)
                    ))
                }
                Ok(Err(e)) => Err(format!("waiting for the script failed: {e}")),
                Ok(Ok(s)) if !s.success() => Err(format!("the training script exited with {s}")),
                Ok(Ok(_)) => me.install(&out).await,
            };
            let mut g = lock(&me.retrain);
            g.finished_at_ms = Some(wall_ms());
            match outcome {
                Ok(()) => {
                    g.state = RetrainState::Succeeded;
                    g.detail = format!(
                        "new model in use ({}); validation metrics in {}",
                        me.dir.join("model").join(MODEL_FILE).display(),
                        job.join("metrics.json").display()
                    );
                    me.retrains.with_label_values(&["succeeded"]).inc();
                }
                Err(why) => {
                    g.state = RetrainState::Failed;
                    g.detail = format!("failed: {why}; log: {}", job.join("train.log").display());
                    me.retrains.with_label_values(&["failed"]).inc();
                }
            }
            info!(state = ?g.state, detail = %g.detail, "PBA retrain finished");
        });
        Ok(status)
    }

    /// Moves a trained model into `<data_dir>/pba/model/` and loads it into the driver.
    async fn install(&self, trained: &Path) -> Result<(), String> {
        let dest_dir = self.dir.join("model");
        let dest = dest_dir.join(MODEL_FILE);
        let trained = trained.to_path_buf();
        let dest2 = dest.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dest_dir).map_err(|e| e.to_string())?;
            let tmp = dest_dir.join("pba_lstm.onnx.tmp");
            std::fs::copy(&trained, &tmp).map_err(|e| e.to_string())?;
            std::fs::rename(&tmp, &dest2).map_err(|e| e.to_string())?;
            Ok::<_, String>(load_model(std::slice::from_ref(&dest2), &dest2))
        })
        .await
        .map_err(|e| e.to_string())??;
        if loaded.1.state != ModelState::Loaded {
            return Err(format!(
                "the trained model does not load: {}",
                loaded.1.detail
            ));
        }
        if !self.cfg.model.path.as_os_str().is_empty() {
            warn!(
                configured = %self.cfg.model.path.display(),
                "the retrained model is in use until restart; pba.model.path names another file"
            );
        }
        self.tx
            .send(Input::ModelLoaded(loaded.0, loaded.1))
            .await
            .map_err(|_| "the PBA driver stopped".to_owned())?;
        info!(model = %dest.display(), "retrained PBA model loaded");
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Routes
// ---------------------------------------------------------------------------------------

/// `/v1/pba/...` routes.
pub fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/v1/pba/metrics", get(api_metrics))
        .route("/v1/pba/predictions", get(api_predictions))
        .route("/v1/pba/retrain", post(api_retrain))
}

fn off() -> Response {
    err(
        StatusCode::SERVICE_UNAVAILABLE,
        "PBA is off on this node (pba.enabled: false)",
    )
}

async fn api_metrics(State(s): State<Arc<Shared>>) -> Response {
    let Some(p) = s.pba() else { return off() };
    match p.status().await {
        Ok(v) => Json(v).into_response(),
        Err(e) => err(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PredictionsQuery {
    node: Option<String>,
}

async fn api_predictions(
    State(s): State<Arc<Shared>>,
    Query(q): Query<PredictionsQuery>,
) -> Response {
    let Some(p) = s.pba() else { return off() };
    match p.predictions(q.node).await {
        Ok(Ok(v)) => Json(v).into_response(),
        Ok(Err(why)) => err(StatusCode::NOT_FOUND, why),
        Err(e) => err(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

async fn api_retrain(State(s): State<Arc<Shared>>, body: Option<Json<RetrainRequest>>) -> Response {
    let Some(p) = s.pba() else { return off() };
    let req = body.map_or(RetrainRequest { samples: None }, |Json(r)| r);
    match p.retrain(req).await {
        Ok(v) => (StatusCode::ACCEPTED, Json(v)).into_response(),
        Err((code, why)) => err(code, why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_700_000_000_000; // a multiple of 5000

    #[test]
    fn bins_follow_the_unix_grid_and_average() {
        let mut b = Binner::default();
        assert_eq!(b.add(T0 + 100, Some(10.0), None, None, 0), Ok(None));
        assert_eq!(b.add(T0 + 4_900, Some(20.0), Some(30.0), None, 0), Ok(None));
        assert_eq!(b.add(T0 + 2_000, None, Some(50.0), None, 0), Ok(None));
        // a measurement in the next bin closes the first
        let closed = b
            .add(T0 + 5_000, None, Some(7.0), None, 0)
            .unwrap()
            .unwrap();
        assert_eq!(
            closed,
            Bin {
                at_ms: T0,
                mbps: Some(15.0),
                rtt_ms: Some(40.0),
                loss: None,
            }
        );
        // not yet past the end (plus grace): nothing
        assert_eq!(b.flush(T0 + 10_000), None);
        let closed = b.flush(T0 + 10_000 + CLOSE_GRACE_MS).unwrap();
        assert_eq!(
            closed,
            Bin {
                at_ms: T0 + 5_000,
                mbps: None,
                rtt_ms: Some(7.0),
                loss: None,
            }
        );
        assert_eq!(b.flush(T0 + 60_000), None);
    }

    #[test]
    fn loss_reports_are_averaged_per_bin_and_kept_apart_from_rtt() {
        let mut b = Binner::default();
        b.add(T0, Some(10.0), Some(20.0), Some(0.02), 0).unwrap();
        b.add(T0 + 1_000, Some(12.0), None, Some(0.04), 0).unwrap();
        b.add(T0 + 2_000, None, Some(30.0), None, 0).unwrap();
        let closed = b
            .add(T0 + 5_000, None, None, Some(0.5), 0)
            .unwrap()
            .unwrap();
        assert_eq!(closed.mbps, Some(11.0));
        assert_eq!(closed.rtt_ms, Some(25.0));
        assert!((closed.loss.unwrap() - 0.03).abs() < 1e-12);
        // A bin with only a loss report still closes (and carries no bandwidth).
        let c = b.flush(T0 + 10_000 + CLOSE_GRACE_MS).unwrap();
        assert_eq!((c.mbps, c.rtt_ms, c.loss), (None, None, Some(0.5)));
    }

    #[test]
    fn late_measurements_are_refused() {
        let mut b = Binner::default();
        b.add(T0 + 12_000, Some(1.0), None, None, 0).unwrap();
        assert_eq!(b.add(T0 + 9_000, Some(1.0), None, None, 0), Err(Late));
        // a bin already closed by the driver
        let mut b = Binner::default();
        assert_eq!(
            b.add(T0 + 1_000, Some(1.0), None, None, T0 + 5_000),
            Err(Late)
        );
        // a skipped bin simply produces nothing
        let mut b = Binner::default();
        b.add(T0, Some(1.0), None, None, 0).unwrap();
        let c = b
            .add(T0 + 20_000, Some(2.0), None, None, 0)
            .unwrap()
            .unwrap();
        assert_eq!(c.at_ms, T0);
        assert_eq!(b.flush(T0 + 30_000).unwrap().at_ms, T0 + 20_000);
    }

    fn section(max_links: usize) -> PbaSection {
        let mut c = PbaSection::default();
        c.samples.max_links = max_links;
        c.samples.segment_kib = 1;
        c.samples.max_mib_per_link = 1;
        c
    }

    fn driver(dir: &Path, max_links: usize) -> Driver {
        let reg = Registry::new();
        let (est_tx, _) = watch::channel(Arc::new(BTreeMap::new()));
        let cfg = section(max_links);
        Driver {
            horizon: horizon_of(cfg.model.prediction_horizon),
            cfg,
            dir: dir.to_path_buf(),
            links: BTreeMap::new(),
            model: None,
            model_status: ModelStatus {
                state: ModelState::Missing,
                path: None,
                bytes: None,
                trained_at_ms: None,
                detail: String::new(),
            },
            metrics: PbaMetrics::new(&reg).unwrap(),
            predictions: 0,
            samples_bw: 0,
            samples_rtt: 0,
            retrain: Arc::new(Mutex::new(RetrainStatus {
                state: RetrainState::Idle,
                started_at_ms: None,
                finished_at_ms: None,
                samples: None,
                job_dir: None,
                detail: String::new(),
            })),
            estimates: est_tx,
            store_bytes: 0,
            engine_cfg: engine::Config::default(),
        }
    }

    fn id(b: u8) -> NodeId {
        dwcp_protocol::NodeKey::from_secret_bytes([b; 32]).node_id()
    }

    #[test]
    fn bandwidth_bins_feed_the_engine_and_the_bounded_store() {
        let d = tempfile::tempdir().unwrap();
        let mut dr = driver(d.path(), 2);
        let peer = id(1);
        // 2000 bins of bandwidth: far more than the 1 MiB store bound holds? No: ~40 B each,
        // so bound the store by size with 1 KiB segments and check the files stay bounded.
        for i in 0..2000u64 {
            dr.close_for_test(
                peer,
                T0 + i * STEP_MS,
                Some(10.0 + (i % 5) as f64),
                Some(20.0),
            );
        }
        let l = &dr.links[&peer];
        assert_eq!(l.bw_bins, 2000);
        assert_eq!(l.rtt_bins, 2000);
        assert!(l.forecast.is_some());
        let total = dir_bytes(&d.path().join("links"));
        assert!(total <= 1024 * 1024 + 1024, "{total}");
        let back = store::read_all(&d.path().join("links").join(peer.to_string()), 10).unwrap();
        assert_eq!(back.len(), 10);
        assert_eq!(back[9].at_ms, T0 + 1999 * STEP_MS);
        // the engine resolved forecasts: accuracy is known
        assert!(dr.accuracy().0.is_some());
        let v = dr.predictions(Some(&peer.to_string()[..8])).unwrap();
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].rtt_last_ms, Some(20.0));
    }

    #[test]
    fn links_and_their_directories_are_bounded() {
        let d = tempfile::tempdir().unwrap();
        let mut dr = driver(d.path(), 2);
        for b in 1..=4u8 {
            dr.close_for_test(id(b), T0, Some(5.0), None);
        }
        assert_eq!(dr.links.len(), 2);
        let dirs = std::fs::read_dir(d.path().join("links")).unwrap().count();
        assert!(dirs <= 2, "{dirs} link directories");
        // RTT-only bins count but are not written to disk
        dr.close_for_test(id(9), T0, None, Some(12.0));
        let l = &dr.links[&id(9)];
        assert_eq!((l.rtt_bins, l.bw_bins), (1, 0));
        let v = dr.predictions(Some(&id(9).to_string())).unwrap();
        assert!(v[0].no_forecast.as_deref().unwrap().contains("RTT only"));
        assert!(dr.predictions(Some("zz")).is_err());
    }

    #[tokio::test]
    async fn retrain_is_refused_naming_what_is_missing() {
        let d = tempfile::tempdir().unwrap();
        let reg = Registry::new();
        let (_stop_tx, stop) = watch::channel(false);
        let mut cfg = PbaSection::default();
        cfg.training.min_samples = 100;
        cfg.training.python = "/nonexistent/python3".into();
        cfg.training.models_dir = source_models_dir();
        let traces = d.path().join("traces");
        cfg.training.traces_dir = traces.clone();
        cfg.model.path = d.path().join("no-model.onnx");
        let (p, _task) = spawn(PbaSetup {
            cfg: &cfg,
            data_dir: d.path(),
            registry: &reg,
            stop,
        })
        .unwrap()
        .unwrap();
        let mut st = SampleStore::open(
            d.path().join("pba/links").join(id(3).to_string()),
            4096,
            1 << 20,
        )
        .unwrap();
        for i in 0..150 {
            st.append(&LinkSample {
                at_ms: T0 + i * STEP_MS,
                mbps: 10.0,
                rtt_ms: None,
                loss: None,
            })
            .unwrap();
        }
        let e = p
            .retrain(RetrainRequest { samples: Some(200) })
            .await
            .unwrap_err();
        assert_eq!(e.0, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(e.1.contains("only 150 bandwidth samples"), "{}", e.1);
        let e = p
            .retrain(RetrainRequest { samples: Some(120) })
            .await
            .unwrap_err();
        if cfg!(feature = "onnx") {
            assert!(e.1.contains("public traces"), "{}", e.1);
            std::fs::create_dir_all(traces.join("derived_5s")).unwrap();
            let e = p
                .retrain(RetrainRequest { samples: Some(120) })
                .await
                .unwrap_err();
            assert!(e.1.contains("cannot run /nonexistent/python3"), "{}", e.1);
        } else {
            assert!(e.1.contains("`onnx` feature"), "{}", e.1);
        }
        let s = p.status().await.unwrap();
        assert_eq!(s.retrain.state, RetrainState::Idle);
        assert_eq!(
            s.model.state,
            if cfg!(feature = "onnx") {
                ModelState::Missing
            } else {
                ModelState::NotBuilt
            }
        );
        assert!(
            !d.path().join("pba/retrain").exists(),
            "no job is written when refused"
        );
    }

    impl Driver {
        fn close_for_test(
            &mut self,
            peer: NodeId,
            at_ms: u64,
            mbps: Option<f64>,
            rtt: Option<f64>,
        ) {
            let now = at_ms + STEP_MS;
            assert!(self.ensure_link(peer, now));
            self.close(
                peer,
                Bin {
                    at_ms,
                    mbps,
                    rtt_ms: rtt,
                    loss: None,
                },
                now,
            );
        }
    }
}
