//! `dwcp-cli pba ...` (manual, sections 2.2.3 and 8.4): bandwidth forecasts, their accuracy,
//! and retraining the model on the node's recorded link samples.

use anyhow::anyhow;
use clap::Subcommand;
use dwcp_node::pba::{
    LinkPredictions, ModelState, PbaStatus, RetrainRequest, RetrainState, RetrainStatus,
};

use super::{Api, Output, ago, print_json, table};

/// `pba` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum PbaCmd {
    /// Prediction accuracy, the model in use (or the baseline fallback), samples recorded and
    /// the retrain job; `--field accuracy` prints one figure.
    Metrics {
        /// Print only this field (`accuracy`, or any field of the JSON answer).
        #[arg(long)]
        field: Option<String>,
    },
    /// Bandwidth forecasts per horizon (mean and p10), RTT, and which predictor answered, for
    /// one node's link or every link.
    Predictions {
        /// Node id, peer id or unique hex prefix (default: every link).
        #[arg(long)]
        node: Option<String>,
    },
    /// Retrain the model on the public traces plus this node's newest N recorded samples
    /// (runs `models/`'s training script in the background; refused, saying why, when it
    /// cannot run).
    Retrain {
        /// Samples to train on (default `pba.training.min_samples`).
        #[arg(long)]
        samples: Option<u64>,
    },
}

fn pct(v: f64) -> String {
    format!("{:.0}%", v * 100.0)
}

fn model_line(s: &PbaStatus) -> String {
    let m = &s.model;
    let word = match m.state {
        ModelState::Loaded => "LSTM loaded",
        ModelState::Loading => "loading",
        ModelState::Missing => "missing (baseline fallback)",
        ModelState::Invalid => "invalid (baseline fallback)",
        ModelState::NotBuilt => "not built in (baseline fallback)",
    };
    format!(
        "{word}: {}{}",
        m.path.as_deref().unwrap_or("-"),
        m.trained_at_ms
            .map(|t| format!(", trained {} ago", ago_since(t)))
            .unwrap_or_default()
    )
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn ago_since(t_ms: u64) -> String {
    let s = now_ms().saturating_sub(t_ms) / 1000;
    match s {
        0..120 => format!("{s}s"),
        120..7200 => format!("{}m", s / 60),
        7200..172_800 => format!("{}h", s / 3600),
        _ => format!("{} days", s / 86_400),
    }
}

fn last_training(r: &RetrainStatus) -> String {
    match (r.state, r.finished_at_ms, r.started_at_ms) {
        (RetrainState::Running, _, Some(t)) => format!("running since {} ago", ago_since(t)),
        (RetrainState::Succeeded, Some(t), _) => format!("{} ago", ago_since(t)),
        (RetrainState::Failed, Some(t), _) => format!("failed {} ago", ago_since(t)),
        _ => "none since start".into(),
    }
}

pub(crate) async fn run_pba(api: &Api, out: Output, cmd: PbaCmd) -> anyhow::Result<()> {
    match cmd {
        PbaCmd::Metrics { field } => {
            let s: PbaStatus = api.get("/v1/pba/metrics").await?;
            if let Some(f) = field {
                let j = serde_json::to_value(&s)?;
                let v = j
                    .get(&f)
                    .ok_or_else(|| anyhow!("pba metrics have no field `{f}`"))?;
                if out == Output::Json {
                    return print_json(v);
                }
                if f == "accuracy" {
                    // The manual's shape (section 8.4.1).
                    match s.accuracy {
                        Some(a) => println!(
                            "Accuracy: {} (threshold: {}){}",
                            pct(a),
                            pct(s.accuracy_threshold),
                            if a < s.accuracy_threshold {
                                " -- below threshold: consider `dwcp-cli pba retrain`"
                            } else {
                                ""
                            }
                        ),
                        None => println!(
                            "Accuracy: unknown (threshold: {}): no link has 30 resolved 30 s forecasts yet",
                            pct(s.accuracy_threshold)
                        ),
                    }
                    println!("Last training: {}", last_training(&s.retrain));
                    return Ok(());
                }
                match v {
                    serde_json::Value::String(t) => println!("{t}"),
                    other => println!("{other}"),
                }
                return Ok(());
            }
            if out == Output::Json {
                return print_json(&s);
            }
            println!(
                "Accuracy:     {} (threshold {}; {} resolved 30 s forecasts)",
                s.accuracy.map(pct).unwrap_or_else(|| "unknown".into()),
                pct(s.accuracy_threshold),
                s.accuracy_resolved
            );
            println!("Model:        {}", model_line(&s));
            if s.model.state != ModelState::Loaded {
                println!("              {}", s.model.detail);
            }
            let answered: Vec<String> = s
                .answered_by
                .iter()
                .map(|(p, n)| format!("{p} {n}"))
                .collect();
            println!(
                "Links:        {} ({} with a bandwidth forecast{}{})",
                s.links,
                s.links_forecasting,
                if answered.is_empty() {
                    ""
                } else {
                    "; 30 s answered by "
                },
                answered.join(", ")
            );
            println!(
                "Samples:      {} bandwidth, {} RTT (5 s bins); {} forecasts made",
                s.samples_bandwidth, s.samples_rtt, s.predictions
            );
            let dropped: u64 = s.dropped.values().sum();
            if dropped > 0 {
                let d: Vec<String> = s
                    .dropped
                    .iter()
                    .filter(|(_, n)| **n > 0)
                    .map(|(k, n)| format!("{k} {n}"))
                    .collect();
                println!("Dropped:      {}", d.join(", "));
            }
            println!("Store:        {} ({} bytes)", s.store_dir, s.store_bytes);
            println!("Last training: {}", last_training(&s.retrain));
            if s.retrain.state != RetrainState::Idle {
                println!("              {}", s.retrain.detail);
            }
        }
        PbaCmd::Predictions { node } => {
            let path = match &node {
                Some(n) => format!("/v1/pba/predictions?node={n}"),
                None => "/v1/pba/predictions".into(),
            };
            let links: Vec<LinkPredictions> = api.get(&path).await?;
            match out {
                Output::Json => return print_json(&links),
                Output::Id => {
                    for l in &links {
                        println!("{}", l.node);
                    }
                    return Ok(());
                }
                Output::Table => {}
            }
            if links.is_empty() {
                println!("No link samples yet (PBA learns links from pings and transfers).");
            }
            for l in &links {
                println!(
                    "Node {}: RTT {} ({} samples, last {}), loss {}, bandwidth samples {} (run {}{})",
                    l.node.short(),
                    l.rtt_ms
                        .map(|r| format!("{r:.1} ms"))
                        .unwrap_or_else(|| "unknown".into()),
                    l.rtt_samples,
                    l.rtt_last_ms
                        .map(|r| format!("{r:.1} ms"))
                        .unwrap_or_else(|| "-".into()),
                    l.loss
                        .map(|x| format!("{:.2} % (TCP retransmissions of transfers)", x * 100.0))
                        .unwrap_or_else(|| "unknown (no transfer yet)".into()),
                    l.bandwidth_samples,
                    l.bandwidth_history,
                    l.bandwidth_age_ms
                        .map(|a| format!(", newest {} old", ago(a)))
                        .unwrap_or_default()
                );
                if let Some(why) = &l.no_forecast {
                    println!("  no bandwidth forecast: {why}");
                    continue;
                }
                table(
                    &[
                        "HORIZON",
                        "MEAN_MBPS",
                        "P10_MBPS",
                        "PREDICTOR",
                        "ACCURACY",
                        "MEDIAN_APE",
                        "RESOLVED",
                    ],
                    l.horizons
                        .iter()
                        .map(|h| {
                            vec![
                                format!("{}s", h.horizon_s),
                                format!("{:.2}", h.mean_mbps),
                                format!("{:.2}", h.p10_mbps),
                                h.predictor.clone(),
                                h.accuracy.map(pct).unwrap_or_else(|| "-".into()),
                                h.median_ape
                                    .map(|e| format!("{e:.3}"))
                                    .unwrap_or_else(|| "-".into()),
                                h.resolved.to_string(),
                            ]
                        })
                        .collect(),
                );
                if let Some(a) = l.accuracy {
                    println!("  link accuracy (30 s): {}", pct(a));
                }
            }
        }
        PbaCmd::Retrain { samples } => {
            let body = serde_json::to_value(RetrainRequest { samples })?;
            let r: RetrainStatus = api
                .post("/v1/pba/retrain", Some(body))
                .await
                .map_err(|e| anyhow!("retrain refused: {e:#}"))?;
            if out == Output::Json {
                return print_json(&r);
            }
            println!("Retrain started: {}", r.detail);
            println!("Follow it with `dwcp-cli pba metrics`; the new model is used once it loads.");
        }
    }
    Ok(())
}
