//! Choosing the zstd level from the link rate.
//!
//! The rule: a migration is as fast as its slowest stage, so compress as hard as possible
//! *while the compressors still produce bytes faster than the link drains them*. With
//! `cores` compressors at level `L` each consuming `speed(L)` input bytes per second and
//! producing `ratio(L)` output bytes per input byte, the output rate is
//! `cores × speed(L) × ratio(L)`. [`choose_level`] picks the highest measured level
//! whose output rate is at least the link rate (with headroom); if even the fastest
//! measured level cannot keep up, the fastest one.
//!
//! The speeds are measurements, an input: the shell (or the benchmark) times
//! [`compress_sample`] at a few levels on the guest's own pages and passes the figures
//! in. Nothing here reads a clock.

use crate::error::EncodeError;

/// Lowest and highest level the encoder uses (the manual's 1..19).
pub const LEVELS: std::ops::RangeInclusive<i32> = 1..=19;

/// One measured level.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LevelSample {
    /// zstd level.
    pub level: i32,
    /// Input bytes compressed per second on one core.
    pub input_bytes_per_sec: f64,
    /// Output bytes per input byte (compressed / original), in (0, 1].
    pub output_per_input: f64,
}

/// Picks the level for a link of `link_bytes_per_sec` with `cores` compressor threads,
/// keeping `headroom` (e.g. 1.2 = compressors must be 20 % faster than the link).
/// Returns `None` if `samples` is empty.
pub fn choose_level(
    samples: &[LevelSample],
    link_bytes_per_sec: f64,
    cores: u32,
    headroom: f64,
) -> Option<i32> {
    let fastest = samples
        .iter()
        .filter(|s| LEVELS.contains(&s.level))
        .max_by(|a, b| output_rate(a, cores).total_cmp(&output_rate(b, cores)))?;
    let need = link_bytes_per_sec * headroom.max(1.0);
    let best = samples
        .iter()
        .filter(|s| LEVELS.contains(&s.level) && output_rate(s, cores) >= need)
        .map(|s| s.level)
        .max();
    Some(best.unwrap_or(fastest.level))
}

fn output_rate(s: &LevelSample, cores: u32) -> f64 {
    s.input_bytes_per_sec * f64::from(cores.max(1)) * s.output_per_input
}

/// Compresses `sample` at `level` with the encoder's settings and returns the output
/// size: the caller times this call to produce a [`LevelSample`].
pub fn compress_sample(
    sample: &[u8],
    level: i32,
    dict: Option<&[u8]>,
) -> Result<usize, EncodeError> {
    let mut c = crate::sender::compressor(level, dict, crate::sender::DEFAULT_WINDOW_LOG, false)?;
    c.compress(sample)
        .map(|v| v.len())
        .map_err(|e| EncodeError::Compress(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(level: i32, mbps: f64, ratio: f64) -> LevelSample {
        LevelSample {
            level,
            input_bytes_per_sec: mbps * 1e6,
            output_per_input: ratio,
        }
    }

    #[test]
    fn picks_highest_level_that_outruns_the_link() {
        let samples = [
            s(1, 500.0, 0.30),
            s(3, 300.0, 0.27),
            s(9, 60.0, 0.25),
            s(19, 3.0, 0.22),
        ];
        // 100 MB/s link, 2 cores: level 3 produces 2*300*0.27 = 162 MB/s, level 9 30 MB/s.
        assert_eq!(choose_level(&samples, 100e6, 2, 1.2), Some(3));
        // 10 MB/s link: level 9 gives 30 MB/s.
        assert_eq!(choose_level(&samples, 10e6, 2, 1.2), Some(9));
        // 1 MB/s link: even level 19 keeps up (1.32 MB/s).
        assert_eq!(choose_level(&samples, 1e6, 2, 1.2), Some(19));
        // 10 GB/s link: nothing keeps up, take the fastest producer.
        assert_eq!(choose_level(&samples, 10e9, 2, 1.2), Some(1));
        assert_eq!(choose_level(&[], 1e6, 2, 1.2), None);
    }

    #[test]
    fn sample_compression_uses_the_encoder_settings() {
        let text: Vec<u8> = (0..50_000u32)
            .flat_map(|i| format!("page {} of {}\n", i % 97, i % 13).into_bytes())
            .collect();
        for level in [1, 3, 19] {
            let n = compress_sample(&text, level, None).unwrap();
            assert!(
                n > 0 && n < text.len() / 20,
                "level {level}: {n} of {}",
                text.len()
            );
        }
        assert!(
            compress_sample(&text, 99, None).is_ok(),
            "zstd clamps levels itself"
        );
    }
}
