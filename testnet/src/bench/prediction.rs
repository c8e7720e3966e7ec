//! `dwcp-testnet bench prediction <trace files...> [--json]`: the PBA LSTM, the engine
//! (model with fallback and calibrated p10) and every baseline, side by side, per source
//! and horizon, on the given traces.
//!
//! Inputs: raw traces (`<time_s> <mbps>` per line, resampled to 5 s) or the derived
//! `trace,t_start_s,mbps` CSV (several traces per file). A trace's source is the first
//! component of its name (`fcc/...`) for CSV rows, or the parent directory of a raw file.
//!
//! Metrics per forecast position (every 5 s sample with at least 12 samples of history and
//! the whole horizon ahead), actual = mean of the next horizon's samples (floored at
//! 0.01 Mbit/s): APE = |predicted - actual| / actual; over-estimation = predicted > 1.1 x
//! actual; p10 coverage = share of positions whose actual falls below the predicted p10
//! (target 10 %); inference = mean wall time of one `forecast` call.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use dwcp_prediction::engine::{Engine, LinkSample};
use dwcp_prediction::features::{MIN_HISTORY, WINDOW};
use dwcp_prediction::{BandwidthPredictor, Horizon, baselines, onnx::OnnxPredictor, trace};

/// Largest trace file read.
const MAX_FILE_BYTES: u64 = 256 * 1024 * 1024;

/// Arguments of `bench prediction`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Trace files: raw `<time_s> <mbps>` files or derived `trace,t_start_s,mbps` CSVs.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// The ONNX model.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/pba_lstm.onnx"))]
    model: PathBuf,
    /// Keep only traces named in this file (one `source/name` per line), e.g.
    /// `models/validation_traces.txt`.
    #[arg(long)]
    only: Option<PathBuf>,
    /// Evaluate every n-th position only (faster, fewer windows).
    #[arg(long, default_value_t = 1)]
    stride: usize,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(Default)]
struct Acc {
    ape: Vec<f64>,
    over: usize,
    below_p10: usize,
    with_p10: usize,
}

#[derive(Default)]
struct Timing {
    calls: u64,
    nanos: u128,
}

fn read_limited(p: &Path) -> anyhow::Result<String> {
    let len = std::fs::metadata(p)
        .with_context(|| format!("stat {}", p.display()))?
        .len();
    if len > MAX_FILE_BYTES {
        bail!(
            "{}: {len} bytes is over the {MAX_FILE_BYTES} byte limit",
            p.display()
        );
    }
    std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()))
}

fn load_traces(files: &[PathBuf]) -> anyhow::Result<Vec<(String, Vec<f64>)>> {
    let mut out = Vec::new();
    for f in files {
        let text = read_limited(f)?;
        if text.starts_with("trace,t_start_s,mbps") {
            out.extend(
                trace::parse_derived_csv(&text)
                    .with_context(|| format!("parse {}", f.display()))?,
            );
        } else {
            let raw = trace::parse_raw(&text).with_context(|| format!("parse {}", f.display()))?;
            let dir = f.parent().and_then(|p| p.file_name()).map_or_else(
                || "unknown".to_string(),
                |s| s.to_string_lossy().into_owned(),
            );
            let name = f
                .file_name()
                .map_or_else(|| "trace".to_string(), |s| s.to_string_lossy().into_owned());
            out.push((format!("{dir}/{name}"), trace::resample(&raw)));
        }
    }
    Ok(out)
}

fn source_of(name: &str) -> String {
    name.split('/').next().unwrap_or("unknown").to_string()
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

type Key = (String, Horizon, &'static str);

fn record(acc: &mut BTreeMap<Key, Acc>, key: Key, pred: f64, p10: Option<f64>, actual: f64) {
    let a = actual.max(0.01);
    let e = acc.entry(key).or_default();
    e.ape.push((pred - a).abs() / a);
    if pred > 1.1 * a {
        e.over += 1;
    }
    if let Some(q) = p10 {
        e.with_p10 += 1;
        if a < q {
            e.below_p10 += 1;
        }
    }
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    let model_bytes = std::fs::read(&args.model)
        .with_context(|| format!("read model {}", args.model.display()))?;
    let model_size = model_bytes.len();
    let model = OnnxPredictor::from_bytes(&model_bytes).context("load model")?;
    let mut traces = load_traces(&args.files)?;
    if let Some(only) = &args.only {
        let keep: std::collections::BTreeSet<String> = read_limited(only)?
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect();
        traces.retain(|(n, _)| keep.contains(n));
    }
    if traces.is_empty() {
        bail!("no traces to evaluate");
    }
    let stride = args.stride.max(1);
    let mut preds: Vec<Box<dyn BandwidthPredictor>> = vec![Box::new(model)];
    preds.extend(baselines::all());
    const ENGINE: &str = "pba-engine";

    let mut acc: BTreeMap<Key, Acc> = BTreeMap::new();
    let mut timing: BTreeMap<&'static str, Timing> = BTreeMap::new();
    let mut windows = 0u64;
    for (name, bw) in &traces {
        let src = source_of(name);
        let n = bw.len();
        if n < MIN_HISTORY + Horizon::S30.steps() {
            continue;
        }
        let mut engine = Engine::new(
            Default::default(),
            Some(Box::new(OnnxPredictor::from_bytes(&model_bytes)?)),
            None,
        )
        .context("engine")?;
        for (p, &mbps) in bw.iter().enumerate() {
            let at_ms = p as u64 * 5000;
            engine
                .handle_sample(LinkSample {
                    at_ms,
                    mbps,
                    rtt_ms: None,
                    loss: None,
                })
                .with_context(|| format!("{name}: sample {p}"))?;
            if p + 1 < MIN_HISTORY || p + Horizon::S30.steps() >= n || p % stride != 0 {
                continue;
            }
            windows += 1;
            let hist = &bw[(p + 1).saturating_sub(WINDOW)..=p];
            let actual = |h: Horizon| -> Option<f64> {
                let k = h.steps();
                (p + k < n).then(|| bw[p + 1..=p + k].iter().sum::<f64>() / k as f64)
            };
            for pr in &preds {
                let t0 = Instant::now();
                let f = pr
                    .forecast(hist, None)
                    .with_context(|| format!("{name}: {}", pr.name()))?;
                let dt = t0.elapsed().as_nanos();
                let t = timing.entry(pr.name()).or_default();
                t.calls += 1;
                t.nanos += dt;
                for h in Horizon::ALL {
                    if let Some(a) = actual(h) {
                        record(
                            &mut acc,
                            (src.clone(), h, pr.name()),
                            f.mean_mbps(h),
                            f.p10_mbps(h),
                            a,
                        );
                    }
                }
            }
            let t0 = Instant::now();
            let f = engine
                .forecast(at_ms)
                .with_context(|| format!("{name}: engine"))?;
            let t = timing.entry(ENGINE).or_default();
            t.calls += 1;
            t.nanos += t0.elapsed().as_nanos();
            for h in Horizon::ALL {
                if let Some(a) = actual(h) {
                    let hf = f.get(h);
                    record(
                        &mut acc,
                        (src.clone(), h, ENGINE),
                        hf.mean_mbps,
                        Some(hf.p10_mbps),
                        a,
                    );
                }
            }
        }
    }

    let order: Vec<&'static str> = {
        let mut v = vec!["lstm", ENGINE];
        v.extend(baselines::all().iter().map(|b| b.name()));
        v
    };
    let baseline_names: Vec<&'static str> = baselines::all().iter().map(|b| b.name()).collect();
    let mut rows = Vec::new();
    for ((src, h, p), a) in &mut acc {
        a.ape.sort_by(f64::total_cmp);
        let n = a.ape.len();
        let t = timing.get(p);
        rows.push(serde_json::json!({
            "source": src,
            "horizon_s": h.seconds(),
            "predictor": p,
            "n": n,
            "median_ape": quantile(&a.ape, 0.5),
            "p90_ape": quantile(&a.ape, 0.9),
            "over_rate": a.over as f64 / n as f64,
            "p10_coverage": (a.with_p10 > 0).then(|| a.below_p10 as f64 / a.with_p10 as f64),
            "mean_forecast_us": t.map(|t| t.nanos as f64 / t.calls.max(1) as f64 / 1000.0),
        }));
    }
    if args.json {
        let out = serde_json::json!({
            "traces": traces.len(),
            "windows": windows,
            "model_bytes": model_size,
            "rows": rows,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }

    println!(
        "PBA forecast benchmark: {} traces, {} forecast positions, model {} bytes, release={}",
        traces.len(),
        windows,
        model_size,
        !cfg!(debug_assertions)
    );
    println!();
    println!("Median APE (lower is better); gain = 1 - lstm / best baseline (target >= 20 %)");
    print!("{:<14} {:>5} {:>7}", "source", "h(s)", "n");
    for p in &order {
        print!(" {p:>10}");
    }
    println!(" {:>12} {:>7}", "best-base", "gain");
    let get = |src: &str, h: Horizon, p: &str| -> Option<&serde_json::Value> {
        rows.iter()
            .find(|r| r["source"] == src && r["horizon_s"] == h.seconds() && r["predictor"] == p)
    };
    let sources: std::collections::BTreeSet<String> =
        acc.keys().map(|(s, _, _)| s.clone()).collect();
    for src in &sources {
        for h in Horizon::ALL {
            let Some(first) = get(src, h, "lstm") else {
                continue;
            };
            print!("{:<14} {:>5} {:>7}", src, h.seconds(), first["n"]);
            for p in &order {
                let v = get(src, h, p).and_then(|r| r["median_ape"].as_f64());
                print!(" {:>10}", v.map_or("-".into(), |v| format!("{v:.3}")));
            }
            let best = baseline_names
                .iter()
                .filter_map(|b| {
                    get(src, h, b)
                        .and_then(|r| r["median_ape"].as_f64())
                        .map(|v| (*b, v))
                })
                .min_by(|a, b| a.1.total_cmp(&b.1));
            let lstm = first["median_ape"].as_f64().unwrap_or(f64::NAN);
            match best {
                Some((b, v)) => println!(" {:>12} {:>6.1}%", b, (1.0 - lstm / v) * 100.0),
                None => println!(),
            }
        }
    }
    println!();
    println!(
        "Per predictor: p90 APE / over-estimation rate (>10 %, target <= 15 %) / p10 coverage (target 10 +- 3 %)"
    );
    print!("{:<14} {:>5}", "source", "h(s)");
    for p in &order {
        print!(" {p:>20}");
    }
    println!();
    for src in &sources {
        for h in Horizon::ALL {
            if get(src, h, "lstm").is_none() {
                continue;
            }
            print!("{:<14} {:>5}", src, h.seconds());
            for p in &order {
                let cell = get(src, h, p).map_or("-".to_string(), |r| {
                    let cov = r["p10_coverage"]
                        .as_f64()
                        .map_or("-".to_string(), |c| format!("{c:.3}"));
                    format!(
                        "{:.2}/{:.2}/{}",
                        r["p90_ape"].as_f64().unwrap_or(f64::NAN),
                        r["over_rate"].as_f64().unwrap_or(f64::NAN),
                        cov
                    )
                });
                print!(" {cell:>20}");
            }
            println!();
        }
    }
    println!();
    println!("Mean time per forecast call (one core; the engine row includes its baselines):");
    for p in &order {
        if let Some(t) = timing.get(p) {
            println!(
                "  {:<12} {:>9.1} us over {} calls",
                p,
                t.nanos as f64 / t.calls.max(1) as f64 / 1000.0,
                t.calls
            );
        }
    }
    Ok(())
}
