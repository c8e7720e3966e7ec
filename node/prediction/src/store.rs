//! The retrain hook's bounded on-disk sample series. **Not part of the sans-IO core**:
//! this module does plain `std::fs` I/O and is called by the node's driver; the engine
//! never touches it.
//!
//! Layout: a directory of CSV segments `samples-<first_at_ms>.csv`, each starting with the
//! header `t_unix_ms,mbps,rtt_ms,loss` (empty field = not measured). A segment is closed at
//! `max_segment_bytes`; the oldest segments are deleted once the directory holds more than
//! `max_total_bytes`. The training script reads the same files
//! (`python -m pba.train --samples DIR/*.csv`, see `models/README.md`).

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use crate::engine::LinkSample;

/// CSV header of every segment.
pub const HEADER: &str = "t_unix_ms,mbps,rtt_ms,loss";

/// A store I/O or format failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// File system error.
    #[error("sample store i/o at {path}")]
    Io {
        /// File or directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A line that is not a sample.
    #[error("{path}:{line}: malformed sample line")]
    Malformed {
        /// File.
        path: PathBuf,
        /// 1-based line.
        line: usize,
    },
    /// Limits that make no sense.
    #[error("invalid store limits: {0}")]
    Limits(&'static str),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Appends samples to a bounded series of CSV segments.
#[derive(Debug)]
pub struct SampleStore {
    dir: PathBuf,
    max_segment_bytes: u64,
    max_total_bytes: u64,
    current: Option<(PathBuf, File, u64)>,
}

fn segments(dir: &Path) -> Result<Vec<(PathBuf, u64)>, StoreError> {
    let mut v = Vec::new();
    for e in fs::read_dir(dir).map_err(io(dir))? {
        let e = e.map_err(io(dir))?;
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("samples-") && name.ends_with(".csv") {
            let len = e.metadata().map_err(io(&p))?.len();
            v.push((p, len));
        }
    }
    // names carry the first timestamp, zero-padded: name order is time order
    v.sort();
    Ok(v)
}

impl SampleStore {
    /// Opens (creating) `dir`. Limits: a segment closes at `max_segment_bytes`; the whole
    /// directory is trimmed to `max_total_bytes` (at least two segments' worth).
    pub fn open(
        dir: impl Into<PathBuf>,
        max_segment_bytes: u64,
        max_total_bytes: u64,
    ) -> Result<Self, StoreError> {
        if max_segment_bytes < 1024 {
            return Err(StoreError::Limits(
                "max_segment_bytes must be at least 1 KiB",
            ));
        }
        if max_total_bytes < 2 * max_segment_bytes {
            return Err(StoreError::Limits("max_total_bytes must hold two segments"));
        }
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        Ok(Self {
            dir,
            max_segment_bytes,
            max_total_bytes,
            current: None,
        })
    }

    /// Appends one sample (one line, flushed).
    pub fn append(&mut self, s: &LinkSample) -> Result<(), StoreError> {
        let line = format!(
            "{},{},{},{}\n",
            s.at_ms,
            s.mbps,
            s.rtt_ms.map(|v| v.to_string()).unwrap_or_default(),
            s.loss.map(|v| v.to_string()).unwrap_or_default()
        );
        if self
            .current
            .as_ref()
            .is_none_or(|(_, _, len)| *len + line.len() as u64 > self.max_segment_bytes)
        {
            self.rotate(s.at_ms)?;
        }
        if let Some((path, f, len)) = self.current.as_mut() {
            f.write_all(line.as_bytes()).map_err(io(path))?;
            *len += line.len() as u64;
        }
        Ok(())
    }

    fn rotate(&mut self, first_ms: u64) -> Result<(), StoreError> {
        self.current = None;
        let path = self.dir.join(format!("samples-{first_ms:020}.csv"));
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        let mut len = f.metadata().map_err(io(&path))?.len();
        if len == 0 {
            writeln!(f, "{HEADER}").map_err(io(&path))?;
            len = HEADER.len() as u64 + 1;
        }
        self.current = Some((path, f, len));
        self.trim()
    }

    fn trim(&mut self) -> Result<(), StoreError> {
        let segs = segments(&self.dir)?;
        let mut total: u64 = segs.iter().map(|(_, l)| l).sum();
        for (p, l) in segs {
            if total <= self.max_total_bytes {
                break;
            }
            if self.current.as_ref().is_some_and(|(c, _, _)| *c == p) {
                break;
            }
            fs::remove_file(&p).map_err(io(&p))?;
            total -= l;
        }
        Ok(())
    }

    /// Directory of the series.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Reads every sample in `dir`, oldest first, at most `max_samples` (the newest kept).
pub fn read_all(dir: &Path, max_samples: usize) -> Result<Vec<LinkSample>, StoreError> {
    let mut out = std::collections::VecDeque::new();
    for (p, _) in segments(dir)? {
        let f = File::open(&p).map_err(io(&p))?;
        for (i, line) in BufReader::new(f).lines().enumerate() {
            let line = line.map_err(io(&p))?;
            if i == 0 || line.is_empty() {
                continue;
            }
            let bad = || StoreError::Malformed {
                path: p.clone(),
                line: i + 1,
            };
            let mut it = line.split(',');
            let at_ms = it
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(bad)?;
            let mbps = it
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .ok_or_else(bad)?;
            let opt = |v: Option<&str>| -> Result<Option<f64>, StoreError> {
                match v {
                    None | Some("") => Ok(None),
                    Some(x) => x.parse::<f64>().map(Some).map_err(|_| bad()),
                }
            };
            let rtt_ms = opt(it.next())?;
            let loss = opt(it.next())?;
            if out.len() == max_samples {
                out.pop_front();
            }
            if max_samples > 0 {
                out.push_back(LinkSample {
                    at_ms,
                    mbps,
                    rtt_ms,
                    loss,
                });
            }
        }
    }
    Ok(out.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(i: u64) -> LinkSample {
        LinkSample {
            at_ms: 1_700_000_000_000 + i * 5000,
            mbps: 10.0 + i as f64,
            rtt_ms: if i.is_multiple_of(2) {
                Some(40.5)
            } else {
                None
            },
            loss: Some(0.0),
        }
    }

    #[test]
    fn round_trip() {
        let d = tempfile::tempdir().unwrap();
        let mut st = SampleStore::open(d.path(), 4096, 1 << 20).unwrap();
        for i in 0..50 {
            st.append(&s(i)).unwrap();
        }
        let back = read_all(d.path(), 1000).unwrap();
        assert_eq!(back.len(), 50);
        assert_eq!(back[0], s(0));
        assert_eq!(back[49], s(49));
        // newest kept when limited
        let back = read_all(d.path(), 10).unwrap();
        assert_eq!(back.len(), 10);
        assert_eq!(back[0], s(40));
    }

    #[test]
    fn bounded_on_disk() {
        let d = tempfile::tempdir().unwrap();
        let mut st = SampleStore::open(d.path(), 1024, 4096).unwrap();
        for i in 0..2000 {
            st.append(&s(i)).unwrap();
        }
        let total: u64 = segments(d.path()).unwrap().iter().map(|(_, l)| l).sum();
        assert!(total <= 4096 + 1024, "{total}");
        let back = read_all(d.path(), usize::MAX).unwrap();
        assert!(!back.is_empty() && back.len() < 2000);
        assert_eq!(back.last().unwrap(), &s(1999));
        // still in time order across segments
        assert!(back.windows(2).all(|w| w[0].at_ms < w[1].at_ms));
    }

    #[test]
    fn malformed_and_limits() {
        let d = tempfile::tempdir().unwrap();
        assert!(SampleStore::open(d.path(), 10, 100).is_err());
        assert!(SampleStore::open(d.path(), 4096, 4096).is_err());
        fs::write(
            d.path().join("samples-00000000000000000001.csv"),
            format!("{HEADER}\n1,x,,\n"),
        )
        .unwrap();
        assert!(matches!(
            read_all(d.path(), 10),
            Err(StoreError::Malformed { line: 2, .. })
        ));
    }
}
