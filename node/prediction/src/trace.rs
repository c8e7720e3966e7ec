//! Bandwidth trace formats (`shared/data/traces/`), parsed from text already in memory.
//!
//! - Raw: one sample per line, `<time_s> <mbps>` separated by spaces or tabs; a sample
//!   holds until the next timestamp, and the last one for one more gap of the same length.
//! - Derived CSV: `trace,t_start_s,mbps` with a header; consecutive rows of one trace are
//!   5 s apart.
//!
//! [`resample`] turns raw samples into 5 s time-weighted means exactly as
//! `models/pba/data.py::resample` does (the derived CSV was made the same way).

use crate::features::STEP_S;

/// Most lines accepted in one trace text.
pub const MAX_LINES: usize = 2_000_000;

/// A trace text that cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum TraceError {
    /// More than [`MAX_LINES`] lines.
    #[error("more than {MAX_LINES} lines")]
    TooLong,
    /// A line is not `<time_s> <mbps>` or a CSV row is malformed.
    #[error("line {line}: {why}")]
    Malformed {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        why: &'static str,
    },
}

fn num(s: &str, line: usize, why: &'static str) -> Result<f64, TraceError> {
    s.trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite())
        .ok_or(TraceError::Malformed { line, why })
}

/// Parses a raw trace into `(time_s, mbps)` pairs (times must not decrease, values >= 0).
pub fn parse_raw(text: &str) -> Result<Vec<(f64, f64)>, TraceError> {
    let mut out: Vec<(f64, f64)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if i >= MAX_LINES {
            return Err(TraceError::TooLong);
        }
        let mut parts = line.split_whitespace();
        let Some(t) = parts.next() else { continue };
        let line_no = i + 1;
        let t = num(t, line_no, "bad time")?;
        let v = parts.next().ok_or(TraceError::Malformed {
            line: line_no,
            why: "missing throughput",
        })?;
        let v = num(v, line_no, "bad throughput")?;
        if v < 0.0 {
            return Err(TraceError::Malformed {
                line: line_no,
                why: "negative throughput",
            });
        }
        if out.last().is_some_and(|(pt, _)| t < *pt) {
            return Err(TraceError::Malformed {
                line: line_no,
                why: "time goes backwards",
            });
        }
        out.push((t, v));
    }
    Ok(out)
}

/// 5 s time-weighted means of raw samples; only bins fully covered are returned.
pub fn resample(samples: &[(f64, f64)]) -> Vec<f64> {
    let n = samples.len();
    if n < 2 {
        return Vec::new();
    }
    let step = STEP_S as f64;
    let end = samples[n - 1].0 + (samples[n - 1].0 - samples[n - 2].0);
    let t0 = samples[0].0;
    let nbins = ((end - t0) / step + 1e-9).floor().max(0.0) as usize;
    let edge = |i: usize| if i < n { samples[i].0 } else { end };
    let mut out = Vec::with_capacity(nbins);
    let mut i = 0usize;
    for k in 0..nbins {
        let a = t0 + k as f64 * step;
        let b = a + step;
        while i + 1 < n && edge(i + 1) <= a {
            i += 1;
        }
        let mut acc = 0.0;
        let mut j = i;
        while j < n && edge(j) < b {
            let lo = edge(j).max(a);
            let hi = edge(j + 1).min(b);
            if hi > lo {
                acc += samples[j].1 * (hi - lo);
            }
            j += 1;
        }
        out.push(acc / step);
    }
    out
}

/// Parses the derived CSV into `(trace name, 5 s samples)` in file order.
pub fn parse_derived_csv(text: &str) -> Result<Vec<(String, Vec<f64>)>, TraceError> {
    let mut out: Vec<(String, Vec<f64>)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if i >= MAX_LINES {
            return Err(TraceError::TooLong);
        }
        let line_no = i + 1;
        if i == 0 {
            if line.trim() != "trace,t_start_s,mbps" {
                return Err(TraceError::Malformed {
                    line: 1,
                    why: "header is not trace,t_start_s,mbps",
                });
            }
            continue;
        }
        if line.trim().is_empty() {
            continue;
        }
        let mut parts = line.rsplitn(3, ',');
        let (Some(v), Some(_t), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(TraceError::Malformed {
                line: line_no,
                why: "expected 3 fields",
            });
        };
        let v = num(v, line_no, "bad mbps")?;
        if v < 0.0 {
            return Err(TraceError::Malformed {
                line: line_no,
                why: "negative throughput",
            });
        }
        match out.last_mut() {
            Some((n, s)) if n == name => s.push(v),
            _ => out.push((name.to_string(), vec![v])),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_resample_matches_python() {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../models/golden/resample.json");
        let j: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
        let t: Vec<f64> = j["t"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let v: Vec<f64> = j["mbps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let want: Vec<f64> = j["bins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let s: Vec<(f64, f64)> = t.into_iter().zip(v).collect();
        let got = resample(&s);
        assert_eq!(got.len(), want.len());
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-9, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn resample_fcc_like_and_one_second() {
        // 5 s steps: bins equal samples, the last holds one more step
        let s: Vec<(f64, f64)> = (0..4).map(|i| (i as f64 * 5.0, i as f64 + 1.0)).collect();
        assert_eq!(resample(&s), vec![1.0, 2.0, 3.0, 4.0]);
        // 1 s steps, 12 samples -> end 12 s -> 2 bins
        let s: Vec<(f64, f64)> = (0..12).map(|i| (i as f64, i as f64)).collect();
        assert_eq!(resample(&s), vec![2.0, 7.0]);
        assert!(resample(&s[..1]).is_empty());
    }

    #[test]
    fn parse_raw_formats_and_errors() {
        let s = parse_raw("0.0\t0.72\n1.0 0.80\n\n2.5   1\n").unwrap();
        assert_eq!(s, vec![(0.0, 0.72), (1.0, 0.8), (2.5, 1.0)]);
        assert_eq!(
            parse_raw("0 1\n1 x\n"),
            Err(TraceError::Malformed {
                line: 2,
                why: "bad throughput"
            })
        );
        assert!(parse_raw("0 1\n1\n").is_err());
        assert!(parse_raw("5 1\n1 1\n").is_err());
        assert!(parse_raw("0 -1\n").is_err());
        assert!(parse_raw("0 NaN\n").is_err());
    }

    #[test]
    fn parse_derived_groups_traces() {
        let text = "trace,t_start_s,mbps\na/x,0,1.5\na/x,5,2\nb/y,0,3\n";
        let t = parse_derived_csv(text).unwrap();
        assert_eq!(
            t,
            vec![("a/x".into(), vec![1.5, 2.0]), ("b/y".into(), vec![3.0])]
        );
        assert!(parse_derived_csv("nope\n").is_err());
        assert!(parse_derived_csv("trace,t_start_s,mbps\na,0\n").is_err());
    }
}
